//! The labelled control plane on an open [`Dispatcher`]: labels, bindings,
//! sockets by label and their counters.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::BorrowedFd,
};

use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use serde::Serialize;
use steer_common::{
    ActiveBindings, BindingKey, LabelMetrics, LabelName, MAX_LABELS, PrefixLengths, SocketKey, lengths_slot, map,
};

use crate::{
    bindings::{self, Binding, BindingsFile},
    dispatcher::{Access, Dispatcher, ReadWrite, spec},
    error::{Context, Result, fail},
    maps::SocketMap,
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

/// A label's counters, summed over CPUs.
#[derive(Debug, Clone, Serialize)]
pub struct LabelStats {
    pub label: String,
    #[serde(flatten)]
    pub metrics: Counters,
}

/// The serialisable form of [`LabelMetrics`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
}

impl std::ops::AddAssign<&LabelMetrics> for Counters {
    fn add_assign(&mut self, m: &LabelMetrics) {
        self.lookups += m.lookups;
        self.misses += m.misses;
        self.errors += m.errors;
    }
}

/// The labelled maps of one state directory, opened and checked.
struct Maps {
    labels: HashMap<MapData, LabelName, u32>,
    sets: [HashMap<MapData, BindingKey, u32>; 2],
    lengths: Array<MapData, PrefixLengths>,
    active: Array<MapData, ActiveBindings>,
    sockets: SocketMap<SocketKey>,
    metrics: PerCpuArray<MapData, LabelMetrics>,
}

impl Maps {
    fn open<A: Access>(d: &Dispatcher<A>) -> Result<Self> {
        Ok(Self {
            labels: d.typed_map(map::LABELS)?,
            sets: [d.typed_map(map::BINDINGS_0)?, d.typed_map(map::BINDINGS_1)?],
            lengths: d.typed_map(map::BINDING_LENGTHS)?,
            active: d.typed_map(map::ACTIVE_BINDINGS)?,
            sockets: SocketMap::open_spec(&d.layout().map(map::SOCKETS), spec(map::SOCKETS))?,
            metrics: d.typed_map(map::METRICS)?,
        })
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

    fn active(&self) -> Result<ActiveBindings> {
        Ok(ActiveBindings(self.active.get(&0, 0)?.0 & 3))
    }

    fn set_active(&mut self, state: ActiveBindings) -> Result<()> {
        self.active.set(0, state, 0).context("switching the active bindings")
    }

    /// (key, label id) of every binding of the set in use.
    fn binding_entries(&self) -> Result<Vec<(BindingKey, u32)>> {
        let set = &self.sets[self.active()?.set() as usize];
        Ok(set.iter().collect::<Result<Vec<_>, _>>()?)
    }

    fn read_lengths(&self, slot: u32) -> Result<Vec<u8>> {
        Ok(self.lengths.get(&slot, 0)?.as_slice().to_vec())
    }

    /// Publishes a new length list for the set in use: written to the idle
    /// copy, then switched in with one write, never rewritten under a lookup.
    fn publish_lengths(&mut self, lengths: impl IntoIterator<Item = u8>) -> Result<()> {
        let state = self.active()?;
        let next = ActiveBindings::new(state.set(), 1 - state.version());
        self.lengths.set(next.lengths_slot(), encode_lengths(lengths), 0).context("updating the prefix-length list")?;
        self.set_active(next)
    }

    /// Makes sure lookups probe `len`; no scan of the bindings, so a bind
    /// costs the same at any count.
    fn add_length(&mut self, len: u8) -> Result<()> {
        let current = self.read_lengths(self.active()?.lengths_slot())?;
        if current.contains(&len) {
            return Ok(());
        }
        self.publish_lengths(current.into_iter().chain([len]))
    }

    fn ensure_label(&mut self, label: &str) -> Result<u32> {
        if let Some(id) = self.label_id(label)? {
            return Ok(id);
        }
        let used: BTreeSet<u32> = self.labels()?.into_values().collect();
        let Some(id) = (0..MAX_LABELS).find(|id| !used.contains(id)) else {
            fail!(Full, "all {MAX_LABELS} labels are in use")
        };
        // A reused id starts its counters from zero.
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        self.metrics.set(id, PerCpuValues::try_from(vec![LabelMetrics::default(); cpus])?, 0)?;
        self.labels.insert(bindings::label_key(label)?, id, 0)?;
        Ok(id)
    }

    /// Forgets labels with neither bindings nor sockets.
    fn collect_labels(&mut self) -> Result<()> {
        let mut in_use: BTreeSet<u32> = self.binding_entries()?.into_iter().map(|(_, id)| id).collect();
        in_use.extend(self.sockets.keys()?.iter().map(|k| k.label_id));
        for (label, id) in self.labels()? {
            if !in_use.contains(&id) {
                self.labels.remove(&bindings::label_key(&label)?)?;
            }
        }
        Ok(())
    }
}

/// `map[key]`, or None when absent.
fn lookup<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>, key: &K) -> Result<Option<V>> {
    match map.get(key, 0) {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The prefix-length list the program probes, longest first.
fn encode_lengths(lengths: impl IntoIterator<Item = u8>) -> PrefixLengths {
    let lengths: BTreeSet<u8> = lengths.into_iter().collect();
    let mut out = PrefixLengths { count: lengths.len() as u32, ..Default::default() };
    for (slot, len) in out.lengths.iter_mut().zip(lengths.iter().rev()) {
        *slot = *len;
    }
    out
}

/// Whether `info`'s socket can take connections matched by `b`.
fn serves(info: &SocketInfo, b: &Binding) -> bool {
    info.protocol == b.protocol
        && match (info.family, b.prefix.addr) {
            (Family::Ipv4, IpAddr::V4(_)) | (Family::Ipv6, IpAddr::V6(_)) => true,
            (Family::Ipv6, IpAddr::V4(_)) => !info.v6only,
            // Such as ::/0: IPv4 lookups match it as v4-mapped addresses.
            (Family::Ipv4, IpAddr::V6(_)) => b.prefix.len <= 96 && b.prefix.covers(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        }
}

impl<A: Access> Dispatcher<A> {
    /// Label name -> id.
    pub fn labels(&self) -> Result<BTreeMap<String, u32>> {
        Maps::open(self)?.labels()
    }

    /// Every binding of the set in use, sorted.
    pub fn bindings(&self) -> Result<Vec<Binding>> {
        let maps = Maps::open(self)?;
        let names = maps.label_names()?;
        let mut out = Vec::new();
        for (key, id) in maps.binding_entries()? {
            let (protocol, prefix, port) = bindings::decode_key(&key)?;
            let label = names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
            out.push(Binding { label, protocol, prefix, port });
        }
        out.sort_by(|a, b| (&a.label, a.protocol, a.prefix, a.port).cmp(&(&b.label, b.protocol, b.prefix, b.port)));
        Ok(out)
    }

    /// How many sockets are registered, without looking for their owners.
    pub fn registered_count(&self) -> Result<usize> {
        Ok(Maps::open(self)?.sockets.keys()?.len())
    }

    /// Every registered socket with its owners.
    pub fn registrations(&self) -> Result<Vec<Registration>> {
        let maps = Maps::open(self)?;
        let names = maps.label_names()?;
        let mut registered = Vec::new();
        for key in maps.sockets.keys()? {
            if let Some(cookie) = maps.sockets.cookie(&key)? {
                registered.push((key, cookie));
            }
        }
        let cookies: Vec<u64> = registered.iter().map(|&(_, cookie)| cookie).collect();
        let found = socket::find_owners_of(&cookies);
        let mut out = Vec::new();
        for (key, cookie) in registered {
            let (owners, info) = found.get(&cookie).cloned().unwrap_or_default();
            let id = key.label_id;
            out.push(Registration {
                label: names.get(&id).cloned().unwrap_or_else(|| format!("#{id}")),
                family: Family::from_af(key.family)
                    .ok_or_else(|| crate::Error::Pin("bad family in sockets map".into()))?,
                protocol: Protocol::from_number(key.protocol)
                    .ok_or_else(|| crate::Error::Pin("bad protocol in sockets map".into()))?,
                cookie,
                address: info.and_then(|i| i.local).map(|a| a.to_string()),
                owners,
            });
        }
        out.sort_by(|a, b| (&a.label, a.family, a.protocol).cmp(&(&b.label, b.family, b.protocol)));
        Ok(out)
    }

    /// Every label's counters.
    pub fn metrics(&self) -> Result<Vec<LabelStats>> {
        let maps = Maps::open(self)?;
        let mut out = Vec::new();
        for (label, id) in maps.labels()? {
            let mut metrics = Counters::default();
            for m in maps.metrics.get(&id, 0)?.iter() {
                metrics += m;
            }
            out.push(LabelStats { label, metrics });
        }
        Ok(out)
    }
}

impl Dispatcher<ReadWrite> {
    /// Adds a binding; false when it was already there.
    pub fn bind(&self, b: &Binding) -> Result<bool> {
        bindings::label_key(&b.label)?;
        let mut maps = Maps::open(self)?;
        let index = maps.active()?.set() as usize;
        let key = b.key();
        if let Some(id) = lookup(&maps.sets[index], &key)? {
            let owner = maps.label_names()?.get(&id).cloned().unwrap_or_default();
            if owner == b.label {
                // Repairs a length list an interrupted bind left short.
                maps.add_length(key.prefixlen)?;
                return Ok(false);
            }
            fail!(
                Conflict,
                "{} {} {} is already bound to label {owner}; unbind it first",
                b.protocol,
                b.prefix,
                b.port
            );
        }
        // The length first: probing a length with no key yet is harmless.
        maps.add_length(key.prefixlen)?;
        let id = maps.ensure_label(&b.label)?;
        if let Err(e) = maps.sets[index].insert(key, id, 0) {
            let _ = maps.collect_labels();
            return Err(e).context("adding the binding");
        }
        Ok(true)
    }

    pub fn unbind(&self, b: &Binding) -> Result<()> {
        let mut maps = Maps::open(self)?;
        let index = maps.active()?.set() as usize;
        let key = b.key();
        match (lookup(&maps.sets[index], &key)?, maps.label_id(&b.label)?) {
            (Some(bound), Some(id)) if bound == id => {}
            _ => fail!(Conflict, "no binding {} {} {} {}", b.label, b.protocol, b.prefix, b.port),
        }
        maps.sets[index].remove(&key)?;
        let lengths = maps.sets[index].keys().map(|k| k.map(|k| k.prefixlen)).collect::<Result<Vec<_>, _>>()?;
        maps.publish_lengths(lengths)?;
        maps.collect_labels()
    }

    /// Replaces every binding with `file`'s in one switch of the active set.
    pub fn load_bindings(&self, file: &BindingsFile) -> Result<()> {
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
        let mut maps = Maps::open(self)?;
        let idle = 1 - maps.active()?.set();
        // The idle set still holds the set before last; lookups no longer use it.
        let stale = maps.sets[idle as usize].keys().collect::<Result<Vec<_>, _>>()?;
        for key in stale {
            maps.sets[idle as usize].remove(&key)?;
        }
        if let Err(e) = fill_set(&mut maps, idle as usize, &file.bindings) {
            // Labels made for the file go again; the bindings in use were never touched.
            let _ = maps.collect_labels();
            return Err(e);
        }
        maps.lengths
            .set(lengths_slot(idle, 0), encode_lengths(seen.keys().map(|k| k.prefixlen)), 0)
            .context("writing the new prefix-length list")?;
        // The old set stays as it is: a lookup that began before the switch
        // may still be reading it.
        maps.set_active(ActiveBindings::new(idle, 0))?;
        maps.collect_labels()
    }

    /// Registers checked sockets under `label`, each replacing the label's
    /// socket of its family and protocol. All are checked before any is
    /// inserted, so a mismatch changes nothing.
    pub fn register(&self, label: &str, sockets: &[(&SocketInfo, BorrowedFd<'_>)]) -> Result<()> {
        bindings::label_key(label)?;
        let served: Vec<Binding> = self.bindings()?.into_iter().filter(|b| b.label == label).collect();
        for (info, _) in sockets {
            if !served.is_empty() && !served.iter().any(|b| serves(info, b)) {
                let kinds: BTreeSet<String> = served
                    .iter()
                    .map(|b| format!("{} {}", b.protocol, if b.prefix.addr.is_ipv4() { "ipv4" } else { "ipv6" }))
                    .collect();
                fail!(
                    Invalid,
                    "label {label} is bound to {} but this is a {} {} socket ({info}); register a matching socket",
                    kinds.into_iter().collect::<Vec<_>>().join(", "),
                    info.protocol,
                    info.family
                );
            }
        }
        let mut maps = Maps::open(self)?;
        let id = maps.ensure_label(label)?;
        for (info, socket) in sockets {
            let key = SocketKey::new(id, info.family.af(), info.protocol.number());
            if let Err(e) = maps.sockets.insert(&key, *socket) {
                let _ = maps.collect_labels();
                return Err(e).context("inserting into the sockets map");
            }
        }
        Ok(())
    }

    /// Removes the label's sockets; returns how many.
    pub fn unregister(&self, label: &str) -> Result<usize> {
        let mut maps = Maps::open(self)?;
        let Some(id) = maps.label_id(label)? else { fail!(Conflict, "no label {label}") };
        let mut removed = 0;
        for key in maps.sockets.keys()? {
            if key.label_id == id {
                maps.sockets.remove(&key)?;
                removed += 1;
            }
        }
        if removed == 0 {
            fail!(Conflict, "label {label} has no registered socket");
        }
        maps.collect_labels()?;
        Ok(removed)
    }
}

fn fill_set(maps: &mut Maps, index: usize, list: &[Binding]) -> Result<()> {
    let mut ids = BTreeMap::new();
    for b in list {
        if !ids.contains_key(&b.label) {
            ids.insert(b.label.clone(), maps.ensure_label(&b.label)?);
        }
    }
    for b in list {
        maps.sets[index].insert(b.key(), ids[&b.label], 0).with_context(|| format!("adding binding {b}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_lists_are_deduplicated_longest_first() {
        let lengths = encode_lengths([96, 128, 24, 128]);
        assert_eq!(lengths.count, 3);
        assert_eq!(lengths.as_slice(), [128, 96, 24]);
        assert_eq!(encode_lengths([]).as_slice(), [] as [u8; 0]);
        assert_eq!(encode_lengths(0..=128).as_slice().len(), 129);
    }

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
}
