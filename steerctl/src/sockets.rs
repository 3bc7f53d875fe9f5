//! register-pid, register, unregister and list.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::{Result, bail};
use steer::{
    Dispatcher, Layout,
    labelled::Registration,
    preflight,
    socket::{self, Family, Protocol, SocketFilter},
};

use crate::output::{self, View};

/// `register-pid LABEL PID [tcp|udp ADDR PORT]`.
pub fn register_pid(layout: &Layout, label: &str, pid: i32, socket: Option<&[String]>) -> Result<()> {
    let filter = match socket {
        Some([protocol, address, port]) => Some(SocketFilter::parse(protocol, address, port)?),
        _ => None,
    };
    preflight::require_fd_taking_caps()?;
    let state = Dispatcher::open_write(layout)?;
    let taken = socket::sockets_of(pid, filter.as_ref())?;
    let sockets: Vec<_> = taken.iter().map(|t| (&t.info, t.socket.as_fd())).collect();
    state.register(label, &sockets)?;
    for t in &taken {
        println!("registered {} (pid {pid} fd {}, cookie {}) as {label}", t.info, t.fd, t.info.cookie);
    }
    Ok(())
}

/// `register LABEL`: the sockets systemd passed (LISTEN_FDS).
pub fn register_activated(layout: &Layout, label: &str) -> Result<()> {
    let activated = socket::activated_sockets()?;
    let sockets: Vec<_> = activated.iter().map(|(fd, info)| (info, *fd)).collect();
    Dispatcher::open_write(layout)?.register(label, &sockets)?;
    for (fd, info) in &activated {
        println!("registered {info} (fd {}, cookie {}) as {label}", fd.as_raw_fd(), info.cookie);
    }
    Ok(())
}

/// `unregister LABEL [tcp|udp] [ipv4|ipv6]`, the two in either order.
pub fn unregister(layout: &Layout, label: &str, which: &[String]) -> Result<()> {
    let (mut protocol, mut family) = (None, None);
    for word in which {
        match word.as_str() {
            "tcp" | "udp" if protocol.is_none() => protocol = Some(word.parse::<Protocol>()?),
            "ipv4" if family.is_none() => family = Some(Family::Ipv4),
            "ipv6" if family.is_none() => family = Some(Family::Ipv6),
            other => bail!("expected tcp|udp and/or ipv4|ipv6, got {other:?}"),
        }
    }
    let removed = Dispatcher::open_write(layout)?.unregister(label, protocol, family)?;
    let which = if which.is_empty() { String::new() } else { format!(" {}", which.join(" ")) };
    println!("unregistered {removed} socket(s) of {label}{which}");
    Ok(())
}

pub fn list(layout: &Layout, json: bool) -> Result<()> {
    let state = Dispatcher::open_read(layout)?;
    let registrations = state.registrations()?;
    let keys: Vec<(Protocol, u64)> = registrations.iter().map(|r| (r.protocol, r.cookie)).collect();
    let mut groups = steer::servers::groups_of(&keys)?;
    let mut out = Vec::new();
    for registration in registrations {
        let flags = state.socket_flags(&registration.label, registration.family, registration.protocol)?;
        out.push(Listed {
            group: groups.remove(&registration.cookie).unwrap_or_default(),
            no_reuseport: flags & steer::common::socket_flag::NO_REUSEPORT != 0,
            registration,
        });
    }
    output::show(&Registrations(out), json)
}

/// A registered socket with its SO_REUSEPORT group (every socket bound to
/// the same address and port, itself included).
#[derive(serde::Serialize)]
struct Listed {
    #[serde(flatten)]
    registration: Registration,
    no_reuseport: bool,
    group: Vec<steer::servers::Member>,
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct Registrations(Vec<Listed>);

impl View for Registrations {
    fn table(&self) -> String {
        let rows = self.0.iter().map(|l| {
            let r = &l.registration;
            let group = match (l.group.len(), l.no_reuseport) {
                (0 | 1, _) => "-".to_string(),
                (n, pinned) => format!(
                    "{n} sockets{}: {}",
                    if pinned { " (pinned to this one)" } else { "" },
                    crate::servers::members(&l.group)
                ),
            };
            [
                r.label.clone(),
                r.protocol.to_string(),
                r.family.to_string(),
                r.address.clone().unwrap_or_else(|| "?".into()),
                r.cookie.to_string(),
                output::joined(r.owners.iter().map(ToString::to_string), ", ", "-"),
                group,
            ]
        });
        output::table(["LABEL", "PROTOCOL", "FAMILY", "ADDRESS", "COOKIE", "OWNER", "REUSEPORT GROUP"], rows)
    }
}
