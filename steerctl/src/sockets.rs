//! register-pid, register, unregister and list.

use std::os::fd::{AsFd, AsRawFd};

use anyhow::Result;
use steer::{
    Dispatcher, Layout,
    labelled::Registration,
    preflight,
    socket::{self, SocketFilter},
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

pub fn unregister(layout: &Layout, label: &str) -> Result<()> {
    let removed = Dispatcher::open_write(layout)?.unregister(label, None, None)?;
    println!("unregistered {removed} socket(s) of {label}");
    Ok(())
}

pub fn list(layout: &Layout, json: bool) -> Result<()> {
    output::show(&Registrations(Dispatcher::open_read(layout)?.registrations()?), json)
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct Registrations(Vec<Registration>);

impl View for Registrations {
    fn table(&self) -> String {
        let rows = self.0.iter().map(|r| {
            [
                r.label.clone(),
                r.protocol.to_string(),
                r.family.to_string(),
                r.address.clone().unwrap_or_else(|| "?".into()),
                r.cookie.to_string(),
                output::joined(r.owners.iter().map(ToString::to_string), ", ", "-"),
            ]
        });
        output::table(["LABEL", "PROTOCOL", "FAMILY", "ADDRESS", "COOKIE", "OWNER"], rows)
    }
}
