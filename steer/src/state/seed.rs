//! The seed's maps, names and layouts as the seed C program has them
//! (bpftool-compatible): `echo_ports` (ports to steer) and `echo_socket`
//! (the one socket serving them, at key 0).

use std::os::fd::BorrowedFd;

use steer_common::{MAX_SEED_PORTS, map};

use super::{Layout, spec};
use crate::{
    error::{Result, fail},
    kernel::maps::{PortMap, SocketMap},
};

pub struct Seed {
    ports: std::cell::RefCell<PortMap>,
    socket: SocketMap,
}

impl Seed {
    pub fn open(layout: &Layout) -> Result<Self> {
        Ok(Self {
            ports: std::cell::RefCell::new(PortMap::open(&layout.ports())?),
            socket: SocketMap::open_spec(&layout.socket(), spec(map::ECHO_SOCKET))?,
        })
    }

    pub fn ports(&self) -> Result<Vec<u16>> {
        self.ports.borrow().list()
    }

    /// Adds ports to the list: all or none, a list that would not fit
    /// fails before any is added.
    pub fn add(&self, ports: &[u16]) -> Result<()> {
        let mut listed: std::collections::BTreeSet<u16> = self.ports()?.into_iter().collect();
        let before = listed.len();
        listed.extend(ports);
        if listed.len() > MAX_SEED_PORTS as usize {
            fail!(
                Full,
                "the seed list holds at most {MAX_SEED_PORTS} ports: {before} are listed and this adds {} more",
                listed.len() - before
            );
        }
        let mut map = self.ports.borrow_mut();
        ports.iter().try_for_each(|&port| map.add(port))
    }

    /// Removes ports from the list: all or none, an unlisted port fails
    /// before any goes.
    pub fn remove(&self, ports: &[u16]) -> Result<()> {
        let steered = self.ports()?;
        if let Some(port) = ports.iter().find(|p| !steered.contains(p)) {
            fail!(Conflict, "port {port} is not steered");
        }
        let mut map = self.ports.borrow_mut();
        ports.iter().try_for_each(|&port| map.remove(port).map(drop))
    }

    pub fn cookie(&self) -> Result<Option<u64>> {
        self.socket.cookie(0)
    }

    pub fn set_socket(&self, socket: BorrowedFd<'_>) -> Result<()> {
        self.socket.insert(0, socket)
    }

    /// Removes the seed socket; false when none was set.
    pub fn clear_socket(&self) -> Result<bool> {
        self.socket.remove(0)
    }
}
