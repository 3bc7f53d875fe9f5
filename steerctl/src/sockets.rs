//! register, register-pid, unregister and list.

use anyhow::{Result, bail};
use steer::{
    Dispatcher, Layout,
    model::{Family, Protocol, Target},
    ops::register::{self, Listed, Options, Source},
};

use crate::output::{self, View};

/// The options every registration takes.
#[derive(clap::Args)]
pub struct RegisterArgs {
    /// Steer to exactly this socket, not its SO_REUSEPORT group.
    #[arg(long)]
    pub no_reuseport: bool,
}

/// Following a server in the kernel (`register ... --follow`).
#[derive(clap::Args)]
pub struct FollowArgs {
    /// Follow the server in the kernel (Linux 5.15): every socket that
    /// listens at the address from now on (a restarted server's, each
    /// reuseport member's) is steered to from its listen(), and those
    /// listening already are inserted now. No fd is taken.
    #[arg(long, requires = "socket", conflicts_with = "process")]
    pub follow: bool,
    /// With --follow: only sockets made in this cgroup v2 (or below it)
    /// may take the label, e.g. system.slice/nginx.service.
    #[arg(long, value_name = "PATH", requires = "follow")]
    pub cgroup: Option<String>,
}

impl From<RegisterArgs> for Options {
    fn from(a: RegisterArgs) -> Self {
        Options { no_reuseport: a.no_reuseport }
    }
}

/// Parses `tcp|udp ADDR PORT`.
pub fn target(args: &[String]) -> Result<Target> {
    let [protocol, address, port] = args else { bail!("expected tcp|udp ADDR PORT") };
    Ok(Target::parse(protocol, address, port)?)
}

/// `register LABEL tcp|udp ADDR PORT --follow`.
pub fn follow(layout: &Layout, label: &str, target: Target, options: &Options, cgroup: Option<String>) -> Result<()> {
    let state = Dispatcher::open_write(layout)?;
    let f = steer::model::follow::Follow {
        label: label.to_string(),
        target,
        cgroup: cgroup.unwrap_or_default(),
        no_reuseport: options.no_reuseport,
    };
    let scope = if f.cgroup.is_empty() { "any cgroup".to_string() } else { format!("cgroup {}", f.cgroup) };
    let done = steer::ops::follow::add(&state, f)?;
    let held = state.slot_members(label, target.family(), target.protocol)?;
    println!(
        "following {target} as {label} in the kernel (sockets of {scope}): {} listening now, {} inserted{}",
        held.len(),
        done.backfilled,
        if done.full > 0 { format!(", {} without room (slots hold 8)", done.full) } else { String::new() }
    );
    Ok(())
}

/// `register` and `register-pid`, in all their forms.
pub fn register(layout: &Layout, label: &str, source: &Source, options: &Options) -> Result<()> {
    let state = Dispatcher::open_write(layout)?;
    for registration in register::register(&state, label, source, options)? {
        println!("{}", registration.describe());
    }
    Ok(())
}

/// `unregister LABEL [tcp|udp] [ipv4|ipv6]`, the two in either order.
pub fn unregister(layout: &Layout, label: &str, which: &[String]) -> Result<()> {
    let (mut protocol, mut family) = (None, None);
    for word in which {
        match word.as_str() {
            "tcp" | "udp" if protocol.is_none() => protocol = Some(word.parse::<Protocol>()?),
            "ipv4" | "ipv6" if family.is_none() => family = Some(word.parse::<Family>()?),
            other => bail!("expected tcp|udp and/or ipv4|ipv6, got {other:?}"),
        }
    }
    let removed = register::unregister(&Dispatcher::open_write(layout)?, label, protocol, family)?;
    let which = if which.is_empty() { String::new() } else { format!(" {}", which.join(" ")) };
    println!("unregistered {removed} socket(s) of {label}{which}");
    Ok(())
}

pub fn list(layout: &Layout, json: bool) -> Result<()> {
    let listing = register::list(&Dispatcher::open_read(layout)?)?;
    for warning in &listing.warnings {
        eprintln!("steerctl: warning: {warning}");
    }
    output::show(&Registrations(listing.sockets), json)
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct Registrations(Vec<Listed>);

impl View for Registrations {
    fn table(&self) -> String {
        let rows = self.0.iter().map(|l| {
            let group = match (l.group.len(), l.no_reuseport) {
                (0 | 1, _) => "-".to_string(),
                (n, pinned) => format!(
                    "{n} sockets{}: {}",
                    if pinned { " (pinned to this one)" } else { "" },
                    crate::servers::members(&l.group)
                ),
            };
            [
                l.label.clone(),
                l.protocol.to_string(),
                l.family.to_string(),
                l.address.clone().unwrap_or_else(|| "?".into()),
                l.cookie.to_string(),
                output::joined(l.owners.iter().map(ToString::to_string), ", ", "-"),
                group,
                if l.followed { "yes" } else { "no" }.to_string(),
            ]
        });
        output::table(
            ["LABEL", "PROTOCOL", "FAMILY", "ADDRESS", "COOKIE", "OWNER", "REUSEPORT GROUP", "FOLLOWED"],
            rows,
        )
    }
}
