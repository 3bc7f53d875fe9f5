//! Socket slots: `sockets` (a SOCKMAP holding each label's sockets per
//! family and protocol, SLOT_MEMBERS of them, tried in order; read back as
//! cookies) and `socket_flags` (the `socket_flag` bits the program passes
//! to bpf_sk_assign, one set per slot).

use std::{collections::BTreeMap, os::fd::BorrowedFd};

use serde::Serialize;
use steer_common::{SLOT_MEMBERS, map, member_key, socket_flag};

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
    /// Its place in the slot: members are tried in order.
    pub member: u32,
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

    /// The cookie of the slot's first member (the one lookups take first).
    pub fn cookie(&self, slot: Slot) -> Result<Option<u64>> {
        Ok(self.members(slot)?.first().map(|&(_, cookie)| cookie))
    }

    /// The cookie of the socket at `key` of `sockets`.
    pub fn cookie_at(&self, key: u32) -> Result<Option<u64>> {
        self.sockets.cookie(key)
    }

    /// The slot's members, in order: (member, cookie).
    pub fn members(&self, slot: Slot) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        for member in 0..SLOT_MEMBERS {
            if let Some(cookie) = self.cookie_at(member_key(slot.index(), member))? {
                out.push((member, cookie));
            }
        }
        Ok(out)
    }

    pub fn flags(&self, slot: Slot) -> Result<u32> {
        Ok(self.flags.get(&slot.index())?.unwrap_or(0))
    }

    /// The sockets the slots of `labels` (ids) hold: (slot, member, cookie).
    pub fn held(&self, labels: impl IntoIterator<Item = u32>) -> Result<Vec<(Slot, u32, u64)>> {
        let mut out = Vec::new();
        for label in labels {
            for slot in Slot::all_of(label) {
                out.extend(self.members(slot)?.into_iter().map(|(member, cookie)| (slot, member, cookie)));
            }
        }
        Ok(out)
    }

    /// Every registered socket of the labels in `names` (id -> name).
    pub fn registered(&self, names: &BTreeMap<u32, String>) -> Result<Vec<Registered>> {
        let mut out = Vec::new();
        for (slot, member, cookie) in self.held(names.keys().copied())? {
            out.push(Registered {
                label: names[&slot.label].clone(),
                family: slot.family,
                protocol: slot.protocol,
                cookie,
                member,
                no_reuseport: self.flags(slot)? & socket_flag::NO_REUSEPORT != 0,
            });
        }
        out.sort_by(|a, b| (&a.label, a.family, a.protocol, a.member).cmp(&(&b.label, b.family, b.protocol, b.member)));
        Ok(out)
    }

    /// Makes `socket` the slot's one socket, with `flags`. The flags go
    /// first, so the new socket never runs with the old ones; if the insert
    /// fails, the old flags come back, so the old socket keeps its own. The
    /// other members go only once the new socket is in: no gap.
    pub fn insert(&self, slot: Slot, socket: BorrowedFd<'_>, flags: u32) -> Result<()> {
        let old = self.flags(slot)?;
        self.flags.set(&slot.index(), &flags).context("setting the socket's flags")?;
        if let Err(e) = self.sockets.insert(member_key(slot.index(), 0), socket) {
            if let Err(restore) = self.flags.set(&slot.index(), &old) {
                log::error!("restoring the flags of slot {}: {}", slot.index(), restore.chain());
            }
            return Err(e).context("inserting into the sockets map");
        }
        for member in 1..SLOT_MEMBERS {
            self.sockets.remove(member_key(slot.index(), member))?;
        }
        Ok(())
    }

    /// Sets the slot's flags (followed sockets get them as they come).
    pub fn set_flags(&self, slot: Slot, flags: u32) -> Result<()> {
        self.flags.set(&slot.index(), &flags).context("setting the slot's flags")
    }

    /// Removes one member; false when it held nothing.
    pub fn remove_member(&self, slot: Slot, member: u32) -> Result<bool> {
        self.sockets.remove(member_key(slot.index(), member))
    }

    /// Empties `slot` and clears its flags; false when it held nothing.
    pub fn clear(&self, slot: Slot) -> Result<bool> {
        let mut removed = false;
        for member in 0..SLOT_MEMBERS {
            removed |= self.sockets.remove(member_key(slot.index(), member))?;
        }
        self.flags.set(&slot.index(), &0)?;
        Ok(removed)
    }
}
