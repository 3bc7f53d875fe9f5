//! Socket slots: `sockets` (a SOCKMAP holding each label's socket per
//! family and protocol; read back as cookies) and `socket_flags` (the
//! `socket_flag` bits the program passes to bpf_sk_assign).

use std::{collections::BTreeMap, os::fd::BorrowedFd};

use serde::Serialize;
use steer_common::{map, socket_flag};

use super::{Layout, spec};
use crate::{
    error::{Context, Result},
    kernel::maps::{RawMap, SocketMap},
    model::{Family, Protocol, slot::Slot},
};

pub struct Slots {
    sockets: SocketMap,
    flags: RawMap<u32, u32>,
}

/// A socket in a label's slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Registered {
    pub label: String,
    pub family: Family,
    pub protocol: Protocol,
    pub cookie: u64,
    /// Connections go to exactly this socket, not its reuseport group.
    pub no_reuseport: bool,
}

impl Slots {
    pub fn open(layout: &Layout) -> Result<Self> {
        Ok(Self {
            sockets: SocketMap::open_spec(&layout.map(map::SOCKETS), spec(map::SOCKETS))?,
            flags: RawMap::open(&layout.map(map::SOCKET_FLAGS), spec(map::SOCKET_FLAGS))?,
        })
    }

    pub fn cookie(&self, slot: Slot) -> Result<Option<u64>> {
        self.sockets.cookie(slot.index())
    }

    pub fn flags(&self, slot: Slot) -> Result<u32> {
        Ok(self.flags.get(&slot.index())?.unwrap_or(0))
    }

    /// The slots of `labels` (ids) that hold a socket, with its cookie.
    pub fn held(&self, labels: impl IntoIterator<Item = u32>) -> Result<Vec<(Slot, u64)>> {
        let mut out = Vec::new();
        for label in labels {
            for slot in Slot::all_of(label) {
                if let Some(cookie) = self.cookie(slot)? {
                    out.push((slot, cookie));
                }
            }
        }
        Ok(out)
    }

    /// Every registered socket of the labels in `names` (id -> name).
    pub fn registered(&self, names: &BTreeMap<u32, String>) -> Result<Vec<Registered>> {
        let mut out = Vec::new();
        for (slot, cookie) in self.held(names.keys().copied())? {
            out.push(Registered {
                label: names[&slot.label].clone(),
                family: slot.family,
                protocol: slot.protocol,
                cookie,
                no_reuseport: self.flags(slot)? & socket_flag::NO_REUSEPORT != 0,
            });
        }
        out.sort_by(|a, b| (&a.label, a.family, a.protocol).cmp(&(&b.label, b.family, b.protocol)));
        Ok(out)
    }

    /// Puts `socket` in `slot` with `flags`. The flags go first, so the new
    /// socket never runs with the old ones; if the insert fails, the old
    /// flags come back, so the old socket keeps its own.
    pub fn insert(&self, slot: Slot, socket: BorrowedFd<'_>, flags: u32) -> Result<()> {
        let old = self.flags(slot)?;
        self.flags.set(&slot.index(), &flags).context("setting the socket's flags")?;
        if let Err(e) = self.sockets.insert(slot.index(), socket) {
            if let Err(restore) = self.flags.set(&slot.index(), &old) {
                log::error!("restoring the flags of slot {}: {}", slot.index(), restore.chain());
            }
            return Err(e).context("inserting into the sockets map");
        }
        Ok(())
    }

    /// Empties `slot` and clears its flags; false when it held nothing.
    pub fn clear(&self, slot: Slot) -> Result<bool> {
        let removed = self.sockets.remove(slot.index())?;
        self.flags.set(&slot.index(), &0)?;
        Ok(removed)
    }
}
