//! What is loaded, attached and steered in one state directory.

use std::os::fd::AsFd;

use serde::Serialize;
use steer_common::map;

use crate::{
    dispatcher::{Access, Dispatcher},
    error::Result,
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
    /// Whether lookups run the recorded bindings, and use the seed list.
    pub plane: Option<crate::labelled::PlaneStatus>,
    /// Why the state is stale (its namespace is gone), if it is.
    pub stale: Option<String>,
}

impl<A: Access> Dispatcher<A> {
    /// Everything `steerctl status` shows; pieces that are not pinned show
    /// as absent rather than failing.
    pub fn status(&self) -> Result<Status> {
        let layout = self.layout();
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
                let info = sys::netns_link_info(sys::obj_get(&p)?.as_fd())?;
                Some(LinkStatus {
                    id: info.id,
                    program_id: info.prog_id,
                    netns_inode: info.netns_ino,
                    pin: p.display().to_string(),
                })
            }
            _ => None,
        };
        let ports = if layout.ports().exists() { self.ports()? } else { Vec::new() };
        let socket = if layout.socket().exists() {
            self.seed_socket_map()?.cookie(&0)?.map(|cookie| SocketStatus {
                key: 0,
                cookie,
                owners: find_owners(cookie).0,
            })
        } else {
            None
        };
        let stale = if layout.map(map::STEER_META).exists() { self.staleness()? } else { None };
        let (labels, bindings, registered_sockets, plane) = if layout.map(map::LABELS).exists() {
            (self.labels()?.len(), self.bindings()?.len(), self.registered_count()?, Some(self.plane_status()?))
        } else {
            (0, 0, 0, None)
        };
        Ok(Status {
            labels,
            bindings,
            registered_sockets,
            plane,
            stale,
            pin_dir: layout.dir.display().to_string(),
            current_netns_inode: netns::current_inode()?,
            program,
            link,
            ports,
            socket,
        })
    }
}
