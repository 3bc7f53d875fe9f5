//! The state layer: one network namespace's pinned state, opened through a
//! [`Dispatcher`] handle that validated the directory, holds its lock for as
//! long as it lives, and opens the maps once. Reads take the lock shared,
//! writes and repairs exclusive; which methods exist depends on how the
//! handle was opened (the typestates [`ReadOnly`], [`ReadWrite`], [`Repair`]).
//!
//! The maps are grouped by concern, each in its own module: the record of
//! bindings and its version protocol ([`record`]), label ids ([`labels`]),
//! socket slots ([`slots`]), counters ([`counters`]), the published
//! generation ([`plane`]), the seed's port list and socket ([`seed`]), the
//! servers the kernel follows ([`follows`]), live tracers ([`tracing`]),
//! and the state's identity ([`identity`]).

pub mod counters;
pub mod follows;
pub mod identity;
pub mod labels;
pub mod layout;
pub mod layouts;
pub mod plane;
pub mod record;
pub mod seed;
pub mod slots;
pub mod tracing;

use std::{cell::OnceCell, collections::BTreeMap, marker::PhantomData, net::IpAddr};

use serde::Serialize;
use steer_common::{StateMeta, map, map_spec};

pub use self::{
    counters::DestStats,
    layout::Layout,
    plane::{PlaneStats, PlaneStatus},
    slots::Registered,
};
use crate::{
    error::{Result, fail},
    kernel::{
        bpffs, caps,
        lock::{LockMode, StateLock},
    },
    model::{Binding, Family, Protocol, binding, label::label_key, prefix::mapped_addr},
};

mod sealed {
    pub trait Sealed {}
}

/// How a [`Dispatcher`] was opened: [`ReadOnly`], [`ReadWrite`] or [`Repair`].
pub trait Access: sealed::Sealed {
    const MODE: LockMode;
}

/// Handles whose state may be read: opened read-only or read-write.
pub trait Read: Access {}

/// Reads under a shared lock.
#[derive(Debug)]
pub struct ReadOnly;
/// Reads and changes under an exclusive lock; the state was checked to be
/// this namespace's and this build's.
#[derive(Debug)]
pub struct ReadWrite;
/// Repairs and removes under an exclusive lock: stale state, another
/// build's program, a half-made state. Only unload, detach, upgrade and gc
/// take one.
#[derive(Debug)]
pub struct Repair;

impl sealed::Sealed for ReadOnly {}
impl sealed::Sealed for ReadWrite {}
impl sealed::Sealed for Repair {}
impl Access for ReadOnly {
    const MODE: LockMode = LockMode::Shared;
}
impl Access for ReadWrite {
    const MODE: LockMode = LockMode::Exclusive;
}
impl Access for Repair {
    const MODE: LockMode = LockMode::Exclusive;
}
impl Read for ReadOnly {}
impl Read for ReadWrite {}

/// The spec of one of the object's maps.
pub(crate) fn spec(name: &str) -> &'static steer_common::MapSpec {
    map_spec(name).expect("steer-common lists every map the library opens")
}

/// Every map of a state directory, opened and checked once per handle.
pub(crate) struct Maps {
    pub plane: plane::Plane,
    pub record: record::Record,
    pub labels: labels::Labels,
    pub slots: slots::Slots,
    pub counters: counters::Counters,
    pub seed: seed::Seed,
    pub follows: follows::Follows,
    pub tracing: tracing::Tracing,
}

impl Maps {
    fn open(layout: &Layout) -> Result<Self> {
        Ok(Self {
            plane: plane::Plane::open(layout)?,
            record: record::Record::open(layout)?,
            labels: labels::Labels::open(layout)?,
            slots: slots::Slots::open(layout)?,
            counters: counters::Counters::open(layout)?,
            seed: seed::Seed::open(layout)?,
            follows: follows::Follows::open(layout)?,
            tracing: tracing::Tracing::open(layout)?,
        })
    }
}

/// An open state directory.
pub struct Dispatcher<A: Access = ReadOnly> {
    layout: Layout,
    lock: StateLock,
    maps: OnceCell<Maps>,
    /// The state's layout version, read when opened (None: no steer_meta).
    version: Option<u32>,
    _access: PhantomData<A>,
}

impl<A: Access> std::fmt::Debug for Dispatcher<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").field("dir", &self.layout.dir).finish()
    }
}

impl Dispatcher<ReadOnly> {
    /// Opens the state for reading, waiting while a writer holds it.
    /// Stale state opens (status reports it).
    pub fn open_read(layout: &Layout) -> Result<Self> {
        Self::open(layout)
    }
}

impl Dispatcher<ReadWrite> {
    /// Opens the state for changing it, waiting for other readers and
    /// writers. Refused when the state is stale (its namespace is gone) or
    /// its program is not this build's.
    pub fn open_write(layout: &Layout) -> Result<Self> {
        let state = Self::open(layout)?;
        identity::check_usable(&state)?;
        Ok(state)
    }

    /// A state this process just made and locked (`load`).
    pub(crate) fn made(layout: Layout, lock: StateLock) -> Self {
        Self { layout, lock, maps: OnceCell::new(), version: Some(steer_common::LAYOUT_VERSION), _access: PhantomData }
    }

    /// The lock, to carry over to the handle of the renamed directory.
    pub(crate) fn into_lock(self) -> StateLock {
        self.lock
    }
}

impl Dispatcher<Repair> {
    /// Opens the state to repair or remove it: stale state, another build's
    /// program and missing maps are accepted (unload, detach, upgrade and
    /// gc are how one fixes them).
    pub fn open_repair(layout: &Layout) -> Result<Self> {
        Self::open(layout)
    }
}

impl<A: Access> Dispatcher<A> {
    fn open(layout: &Layout) -> Result<Self> {
        // Every pin is root's; say so before any EPERM can.
        caps::require_bpf()?;
        // An upgrade replaces the directory with another (one rename) while
        // this may wait for its lock: then the lock is taken again on the
        // new one. Three replacements in a row are not an upgrade.
        for _attempt in 0..3 {
            bpffs::require_dir(&layout.dir)?;
            let dir = bpffs::open_checked_bpffs(&layout.dir, layout.owned)?;
            if A::MODE == LockMode::Exclusive {
                bpffs::require_writable(&dir, &layout.dir)?;
            }
            let inode = nix::sys::stat::fstat(&dir).map_err(std::io::Error::from)?.st_ino;
            let lock = StateLock::acquire(dir, &layout.dir, A::MODE)?;
            match std::fs::metadata(&layout.dir).map(|m| std::os::unix::fs::MetadataExt::ino(&m)) {
                Ok(now) if now == inode => {
                    // A newer steer's state is refused before anything reads it.
                    layouts::refuse_newer(layout)?;
                    let version = match layouts::detect(layout) {
                        Ok(layouts::Found::Tagged(meta)) => Some(meta.layout_version),
                        _ => None,
                    };
                    return Ok(Self {
                        layout: layout.clone(),
                        lock,
                        maps: OnceCell::new(),
                        version,
                        _access: PhantomData,
                    });
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        // An unload removed the directory while this waited, or loads and
        // unloads keep replacing it.
        fail!(
            Conflict,
            "the state at {} was unloaded while this command waited for it; run it again",
            layout.dir.display()
        )
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The layout version `steer_meta` records (None: it has none).
    pub fn layout_version(&self) -> Option<u32> {
        self.version
    }

    /// The state's maps, opened on first use and kept for the handle's life.
    /// A state of an older layout has maps of other shapes: refused, saying
    /// that `upgrade` migrates it.
    pub(crate) fn maps(&self) -> Result<&Maps> {
        if let Some(maps) = self.maps.get() {
            return Ok(maps);
        }
        if let Some(version) = self.version.filter(|v| *v < steer_common::LAYOUT_VERSION) {
            fail!(
                Conflict,
                "{} has {}, an older steer's; this steerctl reads {}: run `steerctl upgrade` to migrate it in place \
                 (steering goes on meanwhile)",
                self.layout.dir.display(),
                layouts::describe(version),
                layouts::current().describe()
            );
        }
        let maps = Maps::open(&self.layout)?;
        Ok(self.maps.get_or_init(|| maps))
    }

    /// The bookkeeping in `steer_meta`.
    pub fn meta(&self) -> Result<StateMeta> {
        self.maps()?.plane.meta()
    }

    /// Why this state is stale, if it is (see [`identity`]).
    pub fn staleness(&self) -> Result<Option<String>> {
        identity::staleness(self)
    }
}

/// What the published bindings answer for one lookup.
#[derive(Debug, Clone, Serialize)]
pub struct Resolved {
    pub label: String,
    /// The binding that matched (longest prefix, then exact port).
    pub binding: Binding,
    /// The counter set the lookup counts in.
    pub dest: u16,
}

/// The read side: what every command that looks at the state uses.
impl<A: Read> Dispatcher<A> {
    /// Label name -> id.
    pub fn labels(&self) -> Result<BTreeMap<String, u32>> {
        self.maps()?.labels.all()
    }

    /// Every recorded binding, sorted.
    pub fn bindings(&self) -> Result<Vec<Binding>> {
        let maps = self.maps()?;
        let names = maps.labels.names()?;
        let mut out = Vec::new();
        for (key, id) in maps.record.entries(&maps.plane.meta()?)? {
            let (protocol, prefix, port) = binding::decode_key(&key)?;
            let label = names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
            out.push(Binding { label, protocol, prefix, port });
        }
        out.sort_by(|a, b| (&a.label, a.protocol, a.prefix, a.port).cmp(&(&b.label, b.protocol, b.prefix, b.port)));
        Ok(out)
    }

    /// How many bindings are recorded (kept in `steer_meta`, so nothing
    /// reads the record to count them).
    pub fn binding_count(&self) -> Result<usize> {
        Ok(self.maps()?.plane.meta()?.bindings as usize)
    }

    /// Whether lookups run the recorded bindings, and use the seed list.
    pub fn plane_status(&self) -> Result<PlaneStatus> {
        let plane = &self.maps()?.plane;
        let meta = plane.meta()?;
        let config = plane.config()?;
        Ok(PlaneStatus {
            up_to_date: meta.plane_version == meta.record_version,
            seed_list_enabled: config.seed_enabled != 0,
            tracing: config.trace != 0,
        })
    }

    /// The seed's port list.
    pub fn ports(&self) -> Result<Vec<u16>> {
        self.maps()?.seed.ports()
    }

    /// The seed socket's cookie, if one is set.
    pub fn seed_cookie(&self) -> Result<Option<u64>> {
        self.maps()?.seed.cookie()
    }

    /// The seed list's counters, summed over CPUs.
    pub fn seed_metrics(&self) -> Result<steer_common::SeedMetrics> {
        self.maps()?.counters.seed()
    }

    /// Every destination's counters.
    pub fn metrics(&self) -> Result<Vec<DestStats>> {
        let maps = self.maps()?;
        maps.counters.all(&maps.labels.names()?)
    }

    /// Every registered socket: its label, slot, cookie and flags.
    pub fn registered(&self) -> Result<Vec<Registered>> {
        let maps = self.maps()?;
        maps.slots.registered(&maps.labels.names()?)
    }

    /// The cookie of the socket in `label`'s slot for (`family`, `protocol`).
    pub fn slot_cookie(&self, label: &str, family: Family, protocol: Protocol) -> Result<Option<u64>> {
        let maps = self.maps()?;
        match maps.labels.id(label)? {
            Some(id) => maps.slots.cookie(crate::model::slot::Slot::new(id, family, protocol)),
            None => Ok(None),
        }
    }

    /// The cookies of every socket `label`'s slot for (`family`,
    /// `protocol`) holds, in the order lookups try them.
    pub fn slot_members(&self, label: &str, family: Family, protocol: Protocol) -> Result<Vec<u64>> {
        let maps = self.maps()?;
        match maps.labels.id(label)? {
            Some(id) => Ok(maps
                .slots
                .members(crate::model::slot::Slot::new(id, family, protocol))?
                .into_iter()
                .map(|(_, cookie)| cookie)
                .collect()),
            None => Ok(Vec::new()),
        }
    }

    /// The `socket_flag` bits of that slot (0 for an unknown label).
    pub fn slot_flags(&self, label: &str, family: Family, protocol: Protocol) -> Result<u32> {
        let maps = self.maps()?;
        match maps.labels.id(label)? {
            Some(id) => maps.slots.flags(crate::model::slot::Slot::new(id, family, protocol)),
            None => Ok(0),
        }
    }

    /// The program tag recorded when it was loaded or upgraded.
    pub fn program_tag(&self) -> Result<u64> {
        Ok(self.meta()?.program_tag)
    }

    /// What the published bindings answer for a lookup of `protocol` to
    /// `addr`:`port`: the program's own search over the chunks it reads.
    pub fn resolve(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Result<Option<Resolved>> {
        let maps = self.maps()?;
        let tables = plane::LiveTables::new(&maps.plane);
        let half = u32::from(maps.plane.config()?.active_half & 1);
        let mapped = u128::from_be_bytes(mapped_addr(addr));
        let address = steer_common::lookup::Address::v6((mapped >> 64) as u64, mapped as u64);
        let answer = steer_common::lookup::lookup(&tables, half, protocol.index(), u32::from(port), address);
        tables.check()?;
        let Some(answer) = answer else {
            return Ok(None);
        };
        let label = self.label_name(answer.label)?;
        let binding = self.answered_binding(protocol, &label, answer.label, answer.len, addr, port)?;
        Ok(Some(Resolved { label, binding, dest: answer.dest }))
    }

    /// The name of label `id`, or `#id` when it has none (any more).
    pub fn label_name(&self, id: u32) -> Result<String> {
        Ok(self.maps()?.labels.names()?.remove(&id).unwrap_or_else(|| format!("#{id}")))
    }

    /// The binding behind a lookup's answer (label `id` called `label`,
    /// prefix length `len` in the v4-mapped space) for `protocol` to
    /// `addr`:`port`: the exact-port binding of that length if the record
    /// has one for the label, else the wildcard.
    pub fn answered_binding(
        &self,
        protocol: Protocol,
        label: &str,
        id: u32,
        len: u8,
        addr: IpAddr,
        port: u16,
    ) -> Result<Binding> {
        let maps = self.maps()?;
        let mut key = steer_common::BindingKey::new(protocol.number(), len, port, mapped_addr(addr));
        if maps.record.get(&maps.plane.meta()?, &key)? != Some(id) {
            key.port = [0, 0];
        }
        let (protocol, prefix, port) = binding::decode_key(&key)?;
        Ok(Binding { label: label.to_string(), protocol, prefix, port })
    }

    /// The cookie of the socket at `key` of `sockets` (or, for the seed,
    /// of `echo_socket`).
    pub fn socket_at(&self, key: u32, seed: bool) -> Result<Option<u64>> {
        let maps = self.maps()?;
        if seed { maps.seed.cookie() } else { maps.slots.cookie_at(key) }
    }

    /// The tracer slots: who traces, and what tracers left behind.
    pub fn tracers(&self) -> Result<Vec<tracing::TracerSlot>> {
        self.maps()?.tracing.slots()
    }

    /// Every tracer's counters since the state was loaded.
    pub fn trace_totals(&self) -> Result<steer_common::TraceMetrics> {
        self.maps()?.tracing.totals()
    }

    /// The id of `label`, if it exists.
    pub fn label_id(&self, label: &str) -> Result<Option<u32>> {
        label_key(label)?;
        self.maps()?.labels.id(label)
    }
}

/// Whether a map of the layout is pinned (status of a half-made state).
pub fn has_map(layout: &Layout, name: &str) -> bool {
    layout.map(name).exists()
}

/// Whether `layout` has the labelled maps (a state from before them has not).
pub fn has_labels(layout: &Layout) -> bool {
    has_map(layout, map::LABELS)
}
