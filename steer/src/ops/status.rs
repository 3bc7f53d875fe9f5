//! What is loaded, attached and steered in one state directory.

use serde::Serialize;
use steer_common::MAPS;

use crate::{
    discovery::owners,
    error::Result,
    kernel::{netns, program},
    model::Owner,
    ops::upgrade::{self, Planned},
    state::{Dispatcher, PlaneStatus, Read, layouts},
};

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub id: u32,
    pub name: String,
    pub pin: String,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub id: u32,
    pub program_id: u32,
    pub netns_inode: u32,
    pub pin: String,
}

#[derive(Debug, Serialize)]
pub struct SocketStatus {
    pub key: u32,
    pub cookie: u64,
    pub owners: Vec<Owner>,
}

/// A registration the kernel follows.
#[derive(Debug, Serialize)]
pub struct Followed {
    #[serde(flatten)]
    pub follow: crate::model::follow::Follow,
    /// Sockets its slots hold now.
    pub held: usize,
}

/// The state's layout, and what `upgrade` would do with it.
#[derive(Debug, Serialize)]
pub struct LayoutStatus {
    /// `steer_meta`'s layout version; None for a state from before layouts
    /// were numbered.
    pub version: Option<u32>,
    pub name: Option<&'static str>,
    /// Whether it is this steerctl's layout.
    pub current: bool,
    pub upgrade: Planned,
    /// What `upgrade` would do, in a sentence.
    pub note: String,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub layout: Option<LayoutStatus>,
    pub current_netns_inode: u64,
    pub program: Option<ProgramStatus>,
    pub link: Option<LinkStatus>,
    pub ports: Vec<u16>,
    pub socket: Option<SocketStatus>,
    pub labels: usize,
    pub bindings: usize,
    pub registered_sockets: usize,
    /// Whether lookups run the recorded bindings, use the seed list, and
    /// look for tracers.
    pub plane: Option<PlaneStatus>,
    /// Tracers (`steerctl trace`) running, and exited ones whose ring
    /// buffer the next tracer frees.
    pub tracers: Vec<super::trace::TracerStatus>,
    /// Why the state is stale (its namespace is gone), if it is.
    pub stale: Option<String>,
    /// The state's layout version.
    pub layout_version: Option<u32>,
    /// The registrations the kernel follows, and how many sockets each holds.
    pub followed: Vec<Followed>,
    /// Why this kernel follows no server (watch polls instead), if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_unsupported: Option<String>,
    /// What could not be read, and what to do.
    pub warnings: Vec<String>,
}

/// Everything `steerctl status` shows. Pieces that are not pinned show as
/// absent, and what cannot be read is said in `warnings`, rather than
/// failing: status is what one runs on a broken state.
pub fn status<A: Read>(state: &Dispatcher<A>) -> Result<Status> {
    let layout = state.layout();
    let mut warnings = Vec::new();
    let program = match layout.program() {
        p if p.exists() => {
            let info = aya::programs::ProgramInfo::from_pin(&p)?;
            Some(ProgramStatus {
                id: info.id(),
                name: info.name_as_str().unwrap_or_default().to_string(),
                pin: p.display().to_string(),
            })
        }
        _ => None,
    };
    let link = program::link_info(&layout.link())?.map(|info| LinkStatus {
        id: info.id,
        program_id: info.program_id,
        netns_inode: info.netns_inode,
        pin: layout.link().display().to_string(),
    });
    let stale = state.staleness()?;
    let missing: Vec<&str> = MAPS.iter().map(|m| m.name).filter(|name| !layout.map(name).exists()).collect();
    let version = state.layout_version();
    let layout_status = match upgrade::plan(layout) {
        Ok((planned, note)) => Some(LayoutStatus {
            version,
            name: version.and_then(layouts::find).map(|l| l.name),
            current: version == Some(steer_common::LAYOUT_VERSION),
            upgrade: planned,
            note,
        }),
        Err(e) => {
            warnings.push(format!("what `steerctl upgrade` would do is unknown: {}", e.chain()));
            None
        }
    };
    let mut out = Status {
        pin_dir: layout.dir.display().to_string(),
        layout: layout_status,
        current_netns_inode: netns::current_inode()?,
        program,
        link,
        ports: Vec::new(),
        socket: None,
        labels: 0,
        bindings: 0,
        registered_sockets: 0,
        plane: None,
        tracers: Vec::new(),
        stale,
        layout_version: version,
        followed: Vec::new(),
        follow_unsupported: super::follow::unsupported(),
        warnings: Vec::new(),
    };
    if let Some(old) = version.filter(|v| *v != steer_common::LAYOUT_VERSION) {
        // An older layout's state: what its own maps say.
        match upgrade::read_old(layout, old) {
            Ok((read, _)) => {
                out.ports = read.ports;
                out.socket = read.seed_cookie.map(|cookie| SocketStatus { key: 0, cookie, owners: Vec::new() });
                out.labels = read.labels;
                out.bindings = read.bindings;
                out.registered_sockets = read.registered_sockets;
            }
            Err(e) => warnings.push(format!("reading the {} state: {}", layouts::describe(old), e.chain())),
        }
        seed_owners(&mut out, &mut warnings);
        out.warnings = warnings;
        return Ok(out);
    }
    if !missing.is_empty() {
        warnings.push(format!(
            "the state is incomplete ({} missing): `steerctl unload` and load again",
            missing.join(", ")
        ));
        out.warnings = warnings;
        return Ok(out);
    }
    out.ports = state.ports()?;
    out.socket = state.seed_cookie()?.map(|cookie| SocketStatus { key: 0, cookie, owners: Vec::new() });
    seed_owners(&mut out, &mut warnings);
    out.labels = state.labels()?.len();
    out.bindings = state.binding_count()?;
    out.registered_sockets = state.registered()?.len();
    out.plane = Some(state.plane_status()?);
    for follow in super::follow::list(state)? {
        let held = crate::model::Family::ALL
            .iter()
            .map(|f| state.slot_members(&follow.label, *f, follow.target.protocol).map(|m| m.len()))
            .sum::<Result<usize>>()?;
        out.followed.push(Followed { follow, held });
    }
    out.tracers = super::trace::tracers(state)?;
    out.warnings = warnings;
    Ok(out)
}

/// Who holds the seed socket, or a warning saying why that is unknown.
fn seed_owners(out: &mut Status, warnings: &mut Vec<String>) {
    if let Some(socket) = &mut out.socket {
        match owners::sockets_and_owners(&[socket.cookie]) {
            Ok(mut found) => socket.owners = found.remove(&socket.cookie).map(|(_, o)| o).unwrap_or_default(),
            Err(e) => warnings.push(format!("the seed socket's owners are unknown: {}", e.chain())),
        }
    }
}
