//! The labelled control plane on an open [`Dispatcher`]: labels, bindings,
//! sockets by label and their counters.
//!
//! The bindings are recorded in `bindings_0`/`bindings_1` (one of them in
//! use, named by `steer_meta`), compiled into a generation and published
//! (see `plane`). Each change bumps `record_version` before publishing and
//! sets `plane_version` after, so a write killed in between is seen (status
//! says so) and finished by the next write, which publishes the record.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use serde::Serialize;
use steer_common::{
    BindingKey, DestKey, DestMetrics, ErrorReason, LabelName, MAX_BINDINGS, MAX_DESTINATIONS, MAX_LABELS, StateMeta,
    map, socket_slot,
};

use crate::{
    bindings::{self, Binding, BindingsFile},
    compile::{self, Destinations},
    dispatcher::{Access, Dispatcher, ReadWrite, spec},
    error::{Context, Result, fail},
    maps::SocketMap,
    plane::{Plane, PlaneStats},
    socket::{self, Family, Owner, Protocol, SocketInfo},
};

/// A socket registered under a label.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub label: String,
    pub family: Family,
    pub protocol: Protocol,
    pub cookie: u64,
    pub address: Option<String>,
    pub owners: Vec<Owner>,
}

/// The counters of one destination: a label's traffic of one family
/// ("domain") and protocol, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestStats {
    pub label: String,
    pub domain: Family,
    pub protocol: Protocol,
    pub lookups: u64,
    pub misses: u64,
    /// All refusals by the kernel, and by reason.
    pub errors: u64,
    pub errors_by_reason: BTreeMap<&'static str, u64>,
}

fn protocol_index(p: Protocol) -> u32 {
    u32::from(p == Protocol::Udp)
}

/// A family's index in socket slots and counter sets: IPv4 0, IPv6 1.
pub(crate) fn family_index(f: Family) -> u32 {
    u32::from(f == Family::Ipv6)
}

/// A record set: the typed map, and its fd for batch reads aya lacks.
struct Record {
    map: HashMap<MapData, BindingKey, u32>,
    fd: OwnedFd,
}

impl Record {
    fn new(data: MapData) -> Result<Self> {
        let fd = data.fd().as_fd().try_clone_to_owned()?;
        Ok(Self { map: HashMap::try_from(aya::maps::Map::HashMap(data))?, fd })
    }

    fn open<A: Access>(d: &Dispatcher<A>, name: &str) -> Result<Self> {
        Self::new(crate::maps::open_spec(&d.layout().map(name), spec(name))?)
    }

    /// Every entry, read in batches.
    fn entries(&self) -> Result<Vec<(BindingKey, u32)>> {
        let raw = crate::sys::map_entries_batch(self.fd.as_fd(), size_of::<BindingKey>(), size_of::<u32>())
            .context("reading the binding record")?;
        // Safety: each key is a BindingKey's bytes (Pod), each value a u32's.
        Ok(raw
            .iter()
            .map(|(k, v)| {
                let key = unsafe { std::ptr::read_unaligned(k.as_ptr().cast::<BindingKey>()) };
                (key, u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            })
            .collect())
    }
}

/// A record set holding `entries`, with room for `capacity` bindings: a new
/// map, filled, then pinned over `bindings_N` in one rename, so a write
/// killed half way leaves the old record whole (only userspace reads these).
fn fresh_record(
    layout: &crate::Layout,
    index: usize,
    capacity: u32,
    entries: impl IntoIterator<Item = (BindingKey, u32)>,
) -> Result<Record> {
    let name = [map::BINDINGS_0, map::BINDINGS_1][index];
    let spec = spec(name);
    let obj = aya_obj::Map::new_from_params(spec.map_type, spec.key_size, spec.value_size, capacity, spec.flags);
    let mut record = Record::new(MapData::create(obj, name, None).context("creating a binding record")?)?;
    for (key, label) in entries {
        record.map.insert(key, label, 0).context("recording the bindings")?;
    }
    let staged = layout.dir.join(format!("{name}_next"));
    let _ = std::fs::remove_file(&staged);
    MapData::from_fd(record.fd.try_clone()?)?.pin(&staged).context("pinning a binding record")?;
    std::fs::rename(&staged, layout.map(name)).context("replacing a binding record")?;
    Ok(record)
}

/// A record capacity with room to grow for `count` bindings.
fn record_capacity(count: usize) -> u32 {
    (count.saturating_mul(2).next_power_of_two() as u32).clamp(steer_common::RECORD_INITIAL_CAPACITY, MAX_BINDINGS)
}

/// The labelled maps of one state directory, opened and checked.
struct Maps {
    records: [Record; 2],
    labels: HashMap<MapData, LabelName, u32>,
    dests: HashMap<MapData, DestKey, u32>,
    sockets: SocketMap<u32>,
    socket_flags: aya::maps::Array<MapData, u32>,
    metrics: PerCpuArray<MapData, DestMetrics>,
    plane: Plane,
    meta: StateMeta,
    layout: crate::Layout,
}

/// `map[key]`, or None when absent.
fn lookup<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>, key: &K) -> Result<Option<V>> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Counter-set ids: the recorded ones, new ones allocated lowest-free.
struct DestTable {
    known: BTreeMap<DestKey, u32>,
    taken: BTreeSet<u32>,
    used: BTreeSet<u32>,
    new: Vec<(DestKey, u32)>,
}

impl Destinations for DestTable {
    fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16> {
        let key =
            DestKey { label, family_index: family_index as u8, protocol_index: protocol_index as u8, _pad: [0; 2] };
        let id = match self.known.get(&key) {
            Some(&id) => id,
            None => {
                let Some(id) = (0..MAX_DESTINATIONS).find(|id| !self.taken.contains(id)) else {
                    fail!(Full, "all {MAX_DESTINATIONS} counter sets (label, family, protocol) are in use")
                };
                self.taken.insert(id);
                self.known.insert(key, id);
                self.new.push((key, id));
                id
            }
        };
        self.used.insert(id);
        Ok(id as u16)
    }
}

impl Maps {
    fn open<A: Access>(d: &Dispatcher<A>) -> Result<Self> {
        let plane = Plane::open(d)?;
        let meta = plane.meta()?;
        Ok(Self {
            records: [Record::open(d, map::BINDINGS_0)?, Record::open(d, map::BINDINGS_1)?],
            labels: d.typed_map(map::LABELS)?,
            dests: d.typed_map(map::DESTINATIONS)?,
            sockets: SocketMap::open_spec(&d.layout().map(map::SOCKETS), spec(map::SOCKETS))?,
            socket_flags: d.typed_map(map::SOCKET_FLAGS)?,
            metrics: d.typed_map(map::METRICS)?,
            plane,
            meta,
            layout: d.layout().clone(),
        })
    }

    /// Adds a binding to the record in use, moving it to a larger map when full.
    fn record_insert(&mut self, key: BindingKey, label: u32) -> Result<()> {
        let active = (self.meta.active_record & 1) as usize;
        match self.records[active].map.insert(key, label, 0) {
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
                let entries = self.record_entries()?;
                if entries.len() >= MAX_BINDINGS as usize {
                    fail!(Full, "bindings map full ({} entries)", separated(MAX_BINDINGS));
                }
                let capacity = record_capacity(entries.len() + 1);
                self.records[active] =
                    fresh_record(&self.layout, active, capacity, entries.into_iter().chain([(key, label)]))?;
                Ok(())
            }
            other => other.context("adding the binding"),
        }
    }

    fn record(&self) -> &Record {
        &self.records[(self.meta.active_record & 1) as usize]
    }

    fn labels(&self) -> Result<BTreeMap<String, u32>> {
        let mut out = BTreeMap::new();
        for entry in self.labels.iter() {
            let (name, id) = entry?;
            out.insert(bindings::label_from_key(&name), id);
        }
        Ok(out)
    }

    /// Label names by id.
    fn label_names(&self) -> Result<BTreeMap<u32, String>> {
        Ok(self.labels()?.into_iter().map(|(name, id)| (id, name)).collect())
    }

    fn label_id(&self, label: &str) -> Result<Option<u32>> {
        lookup(&self.labels, &bindings::label_key(label)?)
    }

    /// The ids of `names`, making the missing labels in one pass.
    fn ensure_labels<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, u32>> {
        let existing = self.labels()?;
        let mut taken: BTreeSet<u32> = existing.values().copied().collect();
        let mut free = 0..MAX_LABELS;
        let mut out = BTreeMap::new();
        for name in names {
            if out.contains_key(name) {
                continue;
            }
            let id = match existing.get(name) {
                Some(&id) => id,
                None => {
                    let Some(id) = free.find(|id| !taken.contains(id)) else {
                        fail!(Full, "all {MAX_LABELS} labels are in use")
                    };
                    taken.insert(id);
                    self.labels.insert(bindings::label_key(name)?, id, 0)?;
                    id
                }
            };
            out.insert(name.to_string(), id);
        }
        Ok(out)
    }

    /// Labels with a registered socket, with the slots that hold one.
    fn socket_slots(&self, ids: impl IntoIterator<Item = u32>) -> Result<Vec<(u32, u32, u64)>> {
        let mut out = Vec::new();
        for id in ids {
            for slot in socket_slot(id, 0, 0)..socket_slot(id, 0, 0) + 4 {
                if let Some(cookie) = self.sockets.cookie(&slot)? {
                    out.push((id, slot, cookie));
                }
            }
        }
        Ok(out)
    }

    /// Forgets labels with neither bindings nor sockets: ones an interrupted
    /// write left behind too.
    fn collect_labels(&mut self) -> Result<()> {
        let in_use: BTreeSet<u32> = self.record_entries()?.into_iter().map(|(_, id)| id).collect();
        self.forget_labels(|_, id| in_use.contains(&id))
    }

    /// Forgets labels that have no socket and that `keep` does not keep.
    fn forget_labels(&mut self, keep: impl Fn(&str, u32) -> bool) -> Result<()> {
        let labels = self.labels()?;
        let with_sockets: BTreeSet<u32> =
            self.socket_slots(labels.values().copied())?.into_iter().map(|(id, _, _)| id).collect();
        for (label, id) in labels {
            if !with_sockets.contains(&id) && !keep(&label, id) {
                self.labels.remove(&bindings::label_key(&label)?)?;
            }
        }
        Ok(())
    }

    /// Fails when the label has sockets and none can take `b`'s traffic:
    /// the check `register` makes, for a binding added after the sockets.
    fn check_sockets_serve(&self, b: &Binding) -> Result<()> {
        let Some(id) = self.label_id(&b.label)? else { return Ok(()) };
        let cookies: Vec<u64> = self.socket_slots([id])?.into_iter().map(|(_, _, cookie)| cookie).collect();
        if cookies.is_empty() {
            return Ok(());
        }
        let netns = crate::netns::current_inode()?;
        let infos: Vec<SocketInfo> = match crate::diag::by_cookies(&cookies) {
            Ok(found) => found.values().map(|s| s.info(netns)).collect(),
            Err(e) => {
                log::warn!("cannot check label {}'s sockets against the binding: {e}", b.label);
                return Ok(());
            }
        };
        if !infos.is_empty() && !infos.iter().any(|info| serves(info, b)) {
            let kinds: BTreeSet<String> = infos
                .iter()
                .map(|i| format!("{} {}{}", i.protocol, i.family, if i.v6only { " (IPv6-only)" } else { "" }))
                .collect();
            fail!(
                Invalid,
                "label {} has {} socket(s), none of which can take {} {} traffic; register a matching socket first",
                b.label,
                kinds.into_iter().collect::<Vec<_>>().join(", "),
                b.protocol,
                if b.prefix.addr.is_ipv4() { "ipv4" } else { "ipv6" }
            );
        }
        Ok(())
    }

    /// Publishes the record when a write died between changing it and
    /// publishing it, so the same command run again finds the plane current
    /// whatever it then decides (a repeated bind has nothing to add, a
    /// repeated unbind nothing to remove).
    fn finish_interrupted(&mut self) -> Result<()> {
        if self.meta.plane_version != self.meta.record_version {
            let entries = self.record_entries()?;
            self.publish(&entries)?;
        }
        Ok(())
    }

    fn bump_record(&mut self) -> Result<()> {
        self.meta.record_version += 1;
        self.plane.set_meta(self.meta)
    }

    /// Compiles `entries` (the recorded bindings) and publishes them.
    fn publish(&mut self, entries: &[(BindingKey, u32)]) -> Result<PlaneStats> {
        let inputs: Vec<compile::Input> = entries
            .iter()
            .map(|(key, label)| compile::Input {
                protocol_index: u32::from(key.protocol == Protocol::Udp.number()),
                port: key.port(),
                addr: u128::from_be_bytes(key.addr),
                len: key.prefixlen,
                label: *label,
            })
            .collect();
        let known: BTreeMap<DestKey, u32> = self.dests.iter().collect::<Result<_, _>>()?;
        let taken = known.values().copied().collect();
        let mut table = DestTable { known, taken, used: BTreeSet::new(), new: Vec::new() };
        let generation = compile::compile(&inputs, &mut table)?;
        // New counter sets start from zero, and are recorded before any
        // lookup can count in them.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        for &(key, id) in &table.new {
            self.metrics.set(id, PerCpuValues::try_from(vec![DestMetrics::default(); cpus])?, 0)?;
            self.dests.insert(key, id, 0)?;
        }
        let stats = self.plane.publish(&generation)?;
        self.meta = StateMeta { plane_version: self.meta.record_version, ..self.plane.meta()? };
        self.plane.set_meta(self.meta)?;
        for (key, id) in &table.known {
            if !table.used.contains(id) {
                self.dests.remove(key)?;
            }
        }
        Ok(stats)
    }

    fn record_entries(&self) -> Result<Vec<(BindingKey, u32)>> {
        self.record().entries()
    }
}

/// The socket slots alone (three maps, not all of them): for loops that
/// read them often, such as `watch`'s check every 10 ms.
pub struct Slots {
    labels: HashMap<MapData, LabelName, u32>,
    sockets: SocketMap<u32>,
    flags: aya::maps::Array<MapData, u32>,
}

impl Slots {
    pub fn open<A: Access>(d: &Dispatcher<A>) -> Result<Self> {
        Ok(Self {
            labels: d.typed_map(map::LABELS)?,
            sockets: SocketMap::open_spec(&d.layout().map(map::SOCKETS), spec(map::SOCKETS))?,
            flags: d.typed_map(map::SOCKET_FLAGS)?,
        })
    }

    fn slot(&self, label: &str, family: Family, protocol: Protocol) -> Result<Option<u32>> {
        let id = lookup(&self.labels, &bindings::label_key(label)?)?;
        Ok(id.map(|id| socket_slot(id, family_index(family), protocol_index(protocol))))
    }

    /// The cookie of the socket in `label`'s slot for (`family`, `protocol`).
    pub fn cookie(&self, label: &str, family: Family, protocol: Protocol) -> Result<Option<u64>> {
        match self.slot(label, family, protocol)? {
            Some(slot) => self.sockets.cookie(&slot),
            None => Ok(None),
        }
    }

    /// The `socket_flag` bits of that slot (0 for an unknown label).
    pub fn flags(&self, label: &str, family: Family, protocol: Protocol) -> Result<u32> {
        match self.slot(label, family, protocol)? {
            Some(slot) => Ok(self.flags.get(&slot, 0)?),
            None => Ok(0),
        }
    }
}

/// 1048576 as "1,048,576".
fn separated(n: u32) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Whether `info`'s socket can take connections matched by `b`.
pub(crate) fn serves(info: &SocketInfo, b: &Binding) -> bool {
    info.protocol == b.protocol
        && match (info.family, b.prefix.addr) {
            (Family::Ipv4, IpAddr::V4(_)) | (Family::Ipv6, IpAddr::V6(_)) => true,
            (Family::Ipv6, IpAddr::V4(_)) => !info.v6only,
            // Such as ::/0: IPv4 lookups match it as v4-mapped addresses.
            (Family::Ipv4, IpAddr::V6(_)) => b.prefix.len <= 96 && b.prefix.covers(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        }
}

/// When `served` (a label's bindings) is not empty and none of them can use
/// `info`'s socket, the kinds they are ("tcp ipv4, udp ipv6"), for an error.
pub(crate) fn unserved<B: std::borrow::Borrow<Binding>>(info: &SocketInfo, served: &[B]) -> Option<String> {
    if served.is_empty() || served.iter().any(|b| serves(info, b.borrow())) {
        return None;
    }
    let kinds: BTreeSet<String> = served
        .iter()
        .map(|b| {
            let b = b.borrow();
            format!("{} {}", b.protocol, if b.prefix.addr.is_ipv4() { "ipv4" } else { "ipv6" })
        })
        .collect();
    Some(kinds.into_iter().collect::<Vec<_>>().join(", "))
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

/// State of the published bindings.
#[derive(Debug, Clone, Serialize)]
pub struct PlaneStatus {
    /// False when a write was interrupted between recording and publishing
    /// bindings: lookups still use the previous set until the next write.
    pub up_to_date: bool,
    pub seed_list_enabled: bool,
}

impl<A: Access> Dispatcher<A> {
    /// Label name -> id.
    pub fn labels(&self) -> Result<BTreeMap<String, u32>> {
        Maps::open(self)?.labels()
    }

    /// Every recorded binding, sorted.
    pub fn bindings(&self) -> Result<Vec<Binding>> {
        let maps = Maps::open(self)?;
        let names = maps.label_names()?;
        let mut out = Vec::new();
        for (key, id) in maps.record_entries()? {
            let (protocol, prefix, port) = bindings::decode_key(&key)?;
            let label = names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
            out.push(Binding { label, protocol, prefix, port });
        }
        out.sort_by(|a, b| (&a.label, a.protocol, a.prefix, a.port).cmp(&(&b.label, b.protocol, b.prefix, b.port)));
        Ok(out)
    }

    pub fn plane_status(&self) -> Result<PlaneStatus> {
        let maps = Maps::open(self)?;
        Ok(PlaneStatus {
            up_to_date: maps.meta.plane_version == maps.meta.record_version,
            seed_list_enabled: maps.plane.config()?.seed_enabled != 0,
        })
    }

    /// What the published bindings answer for a lookup of `protocol` to
    /// `addr`:`port`: the program's own search over the chunks it reads.
    pub fn resolve(&self, protocol: Protocol, addr: IpAddr, port: u16) -> Result<Option<Resolved>> {
        let maps = Maps::open(self)?;
        let tables = crate::plane::LiveTables::open(self)?;
        let half = u32::from(maps.plane.config()?.active_half & 1);
        let mapped = u128::from_be_bytes(bindings::mapped_addr(addr));
        let address = steer_common::lookup::Address::v6((mapped >> 64) as u64, mapped as u64);
        let Some(answer) =
            steer_common::lookup::lookup(&tables, half, protocol_index(protocol), u32::from(port), address)
        else {
            return Ok(None);
        };
        let names = maps.label_names()?;
        let label = names.get(&answer.label).cloned().unwrap_or_else(|| format!("#{}", answer.label));
        // The exact-port binding of that length if there is one, else the wildcard.
        let mut key = steer_common::BindingKey::new(protocol.number(), answer.len, port, bindings::mapped_addr(addr));
        if lookup(&maps.record().map, &key)? != Some(answer.label) {
            key.port = [0, 0];
        }
        let (protocol, prefix, port) = bindings::decode_key(&key)?;
        let binding = Binding { label: label.clone(), protocol, prefix, port };
        Ok(Some(Resolved { label, binding, dest: answer.dest }))
    }

    /// The `socket_flag` bits of a socket slot.
    pub fn socket_flags(&self, label: &str, family: Family, protocol: Protocol) -> Result<u32> {
        Slots::open(self)?.flags(label, family, protocol)
    }

    /// How many sockets are registered, without looking for their owners.
    pub fn registered_count(&self) -> Result<usize> {
        let maps = Maps::open(self)?;
        Ok(maps.socket_slots(maps.labels()?.into_values())?.len())
    }

    /// Every registered socket with its owners.
    pub fn registrations(&self) -> Result<Vec<Registration>> {
        let maps = Maps::open(self)?;
        let names = maps.label_names()?;
        let registered = maps.socket_slots(names.keys().copied())?;
        let cookies: Vec<u64> = registered.iter().map(|&(_, _, cookie)| cookie).collect();
        let found = socket::find_owners_of(&cookies);
        let mut out = Vec::new();
        for (id, slot, cookie) in registered {
            let (owners, info) = found.get(&cookie).cloned().unwrap_or_default();
            out.push(Registration {
                label: names[&id].clone(),
                family: if slot % 4 >= 2 { Family::Ipv6 } else { Family::Ipv4 },
                protocol: if slot % 2 == 1 { Protocol::Udp } else { Protocol::Tcp },
                cookie,
                address: info.and_then(|i| i.local).map(|a| a.to_string()),
                owners,
            });
        }
        out.sort_by(|a, b| (&a.label, a.family, a.protocol).cmp(&(&b.label, b.family, b.protocol)));
        Ok(out)
    }

    /// (label, socket family, protocol) of every registered socket, without
    /// looking for owners.
    pub fn registered(&self) -> Result<Vec<(String, Family, Protocol)>> {
        let maps = Maps::open(self)?;
        let names = maps.label_names()?;
        Ok(maps
            .socket_slots(names.keys().copied())?
            .into_iter()
            .map(|(id, slot, _)| {
                let family = if slot % 4 >= 2 { Family::Ipv6 } else { Family::Ipv4 };
                let protocol = if slot % 2 == 1 { Protocol::Udp } else { Protocol::Tcp };
                (names[&id].clone(), family, protocol)
            })
            .collect())
    }

    /// The seed list's counters, summed over CPUs.
    pub fn seed_metrics(&self) -> Result<steer_common::SeedMetrics> {
        let per_cpu: PerCpuArray<MapData, steer_common::SeedMetrics> = self.typed_map(map::SEED_METRICS)?;
        let mut sum = steer_common::SeedMetrics::default();
        for m in per_cpu.get(&0, 0)?.iter() {
            sum.lookups += m.lookups;
            sum.misses += m.misses;
            sum.errors += m.errors;
        }
        Ok(sum)
    }

    /// The program tag recorded when it was loaded or upgraded.
    pub fn program_tag(&self) -> Result<u64> {
        Ok(Maps::open(self)?.meta.program_tag)
    }

    /// Every destination's counters.
    pub fn metrics(&self) -> Result<Vec<DestStats>> {
        let maps = Maps::open(self)?;
        let names = maps.label_names()?;
        let mut out = Vec::new();
        for entry in maps.dests.iter() {
            let (key, id) = entry?;
            let Some(label) = names.get(&key.label) else { continue };
            let mut sum = DestMetrics::default();
            for m in maps.metrics.get(&id, 0)?.iter() {
                sum.lookups += m.lookups;
                sum.misses += m.misses;
                for (total, n) in sum.errors.iter_mut().zip(m.errors) {
                    *total += n;
                }
            }
            out.push(DestStats {
                label: label.clone(),
                domain: if key.family_index == 0 { Family::Ipv4 } else { Family::Ipv6 },
                protocol: if key.protocol_index == 0 { Protocol::Tcp } else { Protocol::Udp },
                lookups: sum.lookups,
                misses: sum.misses,
                errors: sum.errors.iter().sum(),
                errors_by_reason: ErrorReason::ALL.iter().map(|r| (r.name(), sum.errors[*r as usize])).collect(),
            });
        }
        out.sort_by(|a, b| (&a.label, a.domain, a.protocol).cmp(&(&b.label, b.domain, b.protocol)));
        Ok(out)
    }
}

impl Dispatcher<ReadWrite> {
    /// Adds a binding; false when it was already there.
    pub fn bind(&self, b: &Binding) -> Result<bool> {
        bindings::label_key(&b.label)?;
        let mut maps = Maps::open(self)?;
        maps.finish_interrupted()?;
        maps.collect_labels()?;
        let key = b.key();
        if let Some(id) = lookup(&maps.record().map, &key)? {
            let owner = maps.label_names()?.get(&id).cloned().unwrap_or_default();
            if owner != b.label {
                fail!(
                    Conflict,
                    "{} {} {} is already bound to label {owner}; unbind it first",
                    b.protocol,
                    b.prefix,
                    b.port
                );
            }
            return Ok(false);
        }
        maps.check_sockets_serve(b)?;
        let id = maps.ensure_labels([b.label.as_str()])?[&b.label];
        // Bumped first: a write killed after changing the record is seen as unpublished.
        maps.bump_record()?;
        maps.record_insert(key, id)?;
        let entries = maps.record_entries()?;
        maps.publish(&entries)?;
        Ok(true)
    }

    pub fn unbind(&self, b: &Binding) -> Result<()> {
        let mut maps = Maps::open(self)?;
        maps.finish_interrupted()?;
        let key = b.key();
        match (lookup(&maps.record().map, &key)?, maps.label_id(&b.label)?) {
            (Some(bound), Some(id)) if bound == id => {}
            _ => fail!(Conflict, "no binding {} {} {} {}", b.label, b.protocol, b.prefix, b.port),
        }
        let active = (maps.meta.active_record & 1) as usize;
        maps.bump_record()?;
        maps.records[active].map.remove(&key)?;
        let entries = maps.record_entries()?;
        maps.publish(&entries)?;
        maps.collect_labels()
    }

    /// Replaces every binding with `file`'s: recorded in the idle record set,
    /// switched to with one write, then published as one generation.
    pub fn load_bindings(&self, file: &BindingsFile) -> Result<PlaneStats> {
        // By key: 10.0.0.0/8 and ::ffff:10.0.0.0/104 are one binding.
        let mut seen: BTreeMap<BindingKey, &str> = BTreeMap::new();
        for b in &file.bindings {
            bindings::label_key(&b.label)?;
            if let Some(other) = seen.insert(b.key(), &b.label) {
                if other != b.label {
                    fail!(Invalid, "{} {} {} is bound to both {other} and {}", b.protocol, b.prefix, b.port, b.label);
                }
            }
        }
        if seen.len() > MAX_BINDINGS as usize {
            fail!(Full, "bindings map full ({} entries): the file has {}", separated(MAX_BINDINGS), seen.len());
        }
        let mut maps = Maps::open(self)?;
        let staying: BTreeSet<&str> = seen.values().copied().collect();
        let existing = maps.labels()?;
        let arriving = staying.iter().filter(|label| !existing.contains_key(**label)).count();
        if existing.len() + arriving > MAX_LABELS as usize {
            // Only when the ids are needed (a set replacing another of about
            // as many labels): labels leaving without a socket give theirs up
            // before the switch. Otherwise they are collected after it, so a
            // write killed in between leaves no published binding whose
            // label is gone (and whose id a later label could take).
            maps.bump_record()?;
            maps.forget_labels(|label, _| staying.contains(label))?;
        }
        let ids = maps.ensure_labels(seen.values().copied())?;
        let entries: Vec<(BindingKey, u32)> = seen.iter().map(|(key, label)| (*key, ids[*label])).collect();
        let idle = (1 - (maps.meta.active_record & 1)) as usize;
        // The idle set held the set before last; only this writer reads it.
        maps.records[idle] =
            fresh_record(self.layout(), idle, record_capacity(entries.len()), entries.iter().copied())?;
        maps.meta.active_record = idle as u32;
        maps.bump_record()?;
        let stats = maps.publish(&entries)?;
        maps.collect_labels()?;
        Ok(stats)
    }

    /// Registers checked sockets under `label`, each replacing the label's
    /// socket of its family and protocol. All are checked before any is
    /// inserted, so a mismatch changes nothing. Connections go to the
    /// socket's SO_REUSEPORT group, as the kernel balances it, unless
    /// `no_reuseport`, when they go to exactly this socket.
    pub fn register(&self, label: &str, sockets: &[(&SocketInfo, BorrowedFd<'_>)]) -> Result<()> {
        self.register_with(label, sockets, false)
    }

    /// [`Self::register`], choosing whether the reuseport group is bypassed.
    pub fn register_with(
        &self,
        label: &str,
        sockets: &[(&SocketInfo, BorrowedFd<'_>)],
        no_reuseport: bool,
    ) -> Result<()> {
        bindings::label_key(label)?;
        let served: Vec<Binding> = self.bindings()?.into_iter().filter(|b| b.label == label).collect();
        for (info, _) in sockets {
            if let Some(kinds) = unserved(info, &served) {
                fail!(
                    Invalid,
                    "label {label} is bound to {kinds} but this is a {} {} socket ({info}); register a matching socket",
                    info.protocol,
                    info.family
                );
            }
        }
        let mut maps = Maps::open(self)?;
        maps.collect_labels()?;
        let id = maps.ensure_labels([label])?[label];
        let flags = if no_reuseport { steer_common::socket_flag::NO_REUSEPORT } else { 0 };
        for (info, socket) in sockets {
            let slot = socket_slot(id, family_index(info.family), protocol_index(info.protocol));
            // The flag first: for a moment the old socket may carry the new flag, never
            // the new socket the old one.
            maps.socket_flags.set(slot, flags, 0).context("setting the socket's flags")?;
            if let Err(e) = maps.sockets.insert(&slot, *socket) {
                let _ = maps.collect_labels();
                return Err(e).context("inserting into the sockets map");
            }
        }
        Ok(())
    }

    /// Removes the label's sockets, or only those of `protocol` and/or
    /// `family`; returns how many.
    pub fn unregister(&self, label: &str, protocol: Option<Protocol>, family: Option<Family>) -> Result<usize> {
        let mut maps = Maps::open(self)?;
        let Some(id) = maps.label_id(label)? else { fail!(Conflict, "no label {label}") };
        let wanted = |slot: u32| {
            protocol.is_none_or(|p| slot % 2 == protocol_index(p))
                && family.is_none_or(|f| slot % 4 / 2 == family_index(f))
        };
        let slots: Vec<_> = maps.socket_slots([id])?.into_iter().filter(|&(_, slot, _)| wanted(slot)).collect();
        if slots.is_empty() {
            let which = [protocol.map(|p| p.to_string()), family.map(|f| f.to_string())].into_iter().flatten();
            let which: Vec<String> = which.collect();
            let which = if which.is_empty() { String::new() } else { format!(" {}", which.join(" ")) };
            fail!(Conflict, "label {label} has no registered{which} socket");
        }
        for (_, slot, _) in &slots {
            maps.sockets.remove(slot)?;
            maps.socket_flags.set(*slot, 0, 0)?;
        }
        maps.collect_labels()?;
        Ok(slots.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(family: Family, v6only: bool, protocol: Protocol) -> SocketInfo {
        SocketInfo {
            family,
            v6only,
            protocol,
            local: None,
            listening: true,
            connected: false,
            cookie: 1,
            inode: 1,
            netns_inode: 1,
        }
    }

    #[test]
    fn sockets_serve_the_bindings_their_family_can_take() {
        let bind = |prefix: &str| Binding {
            label: "x".into(),
            protocol: Protocol::Tcp,
            prefix: prefix.parse().unwrap(),
            port: 0,
        };
        let v4 = info(Family::Ipv4, false, Protocol::Tcp);
        let dual = info(Family::Ipv6, false, Protocol::Tcp);
        let v6only = info(Family::Ipv6, true, Protocol::Tcp);
        assert!(serves(&v4, &bind("10.0.0.0/8")));
        assert!(serves(&dual, &bind("10.0.0.0/8")));
        assert!(!serves(&v6only, &bind("10.0.0.0/8")));
        assert!(serves(&v4, &bind("::/0")), "::/0 matches IPv4 as v4-mapped");
        assert!(!serves(&v4, &bind("2001:db8::/32")));
        assert!(!serves(&info(Family::Ipv4, false, Protocol::Udp), &bind("10.0.0.0/8")));
    }

    #[test]
    fn capacities_read_with_separators() {
        assert_eq!(separated(MAX_BINDINGS), "1,048,576");
        assert_eq!(separated(4096), "4,096");
        assert_eq!(separated(12), "12");
    }
}
