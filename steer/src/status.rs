//! What is loaded, attached and steered in one pin directory.

use std::os::fd::AsFd;

use anyhow::Result;
use serde::Serialize;

use crate::{
    bpffs,
    deploy::Layout,
    maps::{PortMap, SocketMap},
    netns,
    socket::{Owner, find_owners},
    sys,
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

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    pub current_netns_inode: u64,
    pub program: Option<ProgramStatus>,
    pub link: Option<LinkStatus>,
    pub ports: Vec<u16>,
    pub socket: Option<SocketStatus>,
    pub labels: usize,
    pub bindings: usize,
    pub registered_sockets: usize,
}

pub fn status(layout: &Layout) -> Result<Status> {
    bpffs::require_dir(&layout.dir)?;
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
    let link = match layout.link() {
        p if p.exists() => {
            let fd = sys::obj_get(&p)?;
            let info = sys::netns_link_info(fd.as_fd())?;
            Some(LinkStatus {
                id: info.id,
                program_id: info.prog_id,
                netns_inode: info.netns_ino,
                pin: p.display().to_string(),
            })
        }
        _ => None,
    };
    let ports = if layout.ports().exists() { PortMap::open(&layout.ports())?.list()? } else { Vec::new() };
    let socket = if layout.socket().exists() {
        SocketMap::open(&layout.socket())?
            .cookie(0)?
            .map(|cookie| SocketStatus { key: 0, cookie, owners: find_owners(cookie).0 })
    } else {
        None
    };
    let (labels, bindings, registered_sockets) = if layout.map("labels").exists() {
        let state = crate::control::State::open(layout)?;
        (state.labels()?.len(), state.bindings()?.len(), state.registered_count()?)
    } else {
        (0, 0, 0)
    };
    Ok(Status {
        labels,
        bindings,
        registered_sockets,
        pin_dir: layout.dir.display().to_string(),
        current_netns_inode: netns::current_inode()?,
        program,
        link,
        ports,
        socket,
    })
}
