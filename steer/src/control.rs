//! The labelled control plane: labels, bindings, sockets by label, metrics.
//! Mutations hold an exclusive flock on the state directory, so concurrent
//! steerctl runs are serialised and none loses another's update.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    net::IpAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

use anyhow::{Context, Result, bail};
use aya::maps::{Map, MapData, PerCpuArray, PerCpuValues};
use serde::Serialize;

use crate::{
    bindings::{self, Binding, BindingsFile},
    bpffs,
    deploy::Layout,
    socket::{self, Family, Owner, Protocol, SocketInfo},
    sys,
};

pub const MAX_LABELS: u32 = 4096;
const LABEL_KEY_SIZE: usize = 64;

/// Per-label counters, one copy per CPU in the `metrics` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LabelMetrics {
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
}

// Safety: plain old data, every bit pattern valid.
unsafe impl aya::Pod for LabelMetrics {}

fn label_key(label: &str) -> Result<[u8; LABEL_KEY_SIZE]> {
    let ok = !label.is_empty()
        && label.len() < LABEL_KEY_SIZE
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        bail!("bad label {label:?}: use 1 to 63 letters, digits, '-', '_', '.' or ':'");
    }
    let mut key = [0u8; LABEL_KEY_SIZE];
    key[..label.len()].copy_from_slice(label.as_bytes());
    Ok(key)
}

fn dest_key(label_id: u32, family: Family, protocol: Protocol) -> [u8; 8] {
    let mut key = [0u8; 8];
    key[0..4].copy_from_slice(&label_id.to_ne_bytes());
    key[4] = family.af();
    key[5] = protocol.number();
    key
}

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

#[derive(Debug, Clone, Serialize)]
pub struct LabelStats {
    pub label: String,
    #[serde(flatten)]
    pub metrics: LabelMetrics,
}

/// The open maps of one state directory.
pub struct State {
    labels: MapData,
    sets: [MapData; 2],
    lengths: MapData,
    active: MapData,
    sockets: MapData,
    metrics: Map,
    _lock: Option<File>,
}

/// Type, key size and value size each map of the state must have; the raw
/// map calls below size their buffers by these.
fn expected_shape(name: &str) -> (aya::maps::MapType, u32, u32) {
    use aya::maps::MapType::*;
    match name {
        "labels" => (Hash, LABEL_KEY_SIZE as u32, 4),
        "bindings_0" | "bindings_1" => (Hash, bindings::KEY_SIZE as u32, 4),
        "binding_lengths" => (Array, 4, bindings::LENGTHS_SIZE as u32),
        "active_bindings" => (Array, 4, 4),
        "sockets" => (SockHash, 8, 8),
        "metrics" => (PerCpuArray, 4, std::mem::size_of::<LabelMetrics>() as u32),
        _ => unreachable!("unknown state map {name}"),
    }
}

fn open_map(layout: &Layout, name: &str) -> Result<MapData> {
    let path = layout.map(name);
    let stale = "is this state from another steerctl version? `steerctl unload` and load again";
    bpffs::require_pin(&path, &format!("{name} map ({stale})"))?;
    let map = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
    let info = map.info()?;
    let (kind, key, value) = expected_shape(name);
    if sys::bpf_fd_kind(map.fd().as_fd()).as_deref() != Some("bpf-map")
        || !info.map_type().is_ok_and(|t| t == kind)
        || info.key_size() != key
        || info.value_size() != value
    {
        bail!("{} is not the {name} map this steerctl expects ({stale})", path.display());
    }
    Ok(map)
}

impl State {
    /// Opens the state for reading.
    pub fn open(layout: &Layout) -> Result<Self> {
        bpffs::require_dir(&layout.dir)?;
        Ok(Self {
            labels: open_map(layout, "labels")?,
            sets: [open_map(layout, "bindings_0")?, open_map(layout, "bindings_1")?],
            lengths: open_map(layout, "binding_lengths")?,
            active: open_map(layout, "active_bindings")?,
            sockets: open_map(layout, "sockets")?,
            metrics: Map::from_map_data(open_map(layout, "metrics")?)?,
            _lock: None,
        })
    }

    /// Opens the state for changing it, waiting for other writers. (Callers
    /// already holding `deploy::lock` use `open`: a second flock would wait
    /// on the first.)
    pub fn open_locked(layout: &Layout) -> Result<Self> {
        crate::preflight::require_bpf_caps()?;
        let lock = crate::deploy::lock(layout)?;
        let mut state = Self::open(layout)?;
        state._lock = Some(lock);
        Ok(state)
    }

    fn fd(map: &MapData) -> BorrowedFd<'_> {
        map.fd().as_fd()
    }

    // ---- labels

    pub fn labels(&self) -> Result<BTreeMap<String, u32>> {
        let mut out = BTreeMap::new();
        for key in sys::map_keys(Self::fd(&self.labels), LABEL_KEY_SIZE)? {
            let mut id = [0u8; 4];
            if sys::map_lookup(Self::fd(&self.labels), &key, &mut id)?.is_some() {
                let end = key.iter().position(|&b| b == 0).unwrap_or(key.len());
                out.insert(String::from_utf8_lossy(&key[..end]).into_owned(), u32::from_ne_bytes(id));
            }
        }
        Ok(out)
    }

    /// Label names by id.
    fn label_names(&self) -> Result<BTreeMap<u32, String>> {
        Ok(self.labels()?.into_iter().map(|(name, id)| (id, name)).collect())
    }

    pub fn label_id(&self, label: &str) -> Result<Option<u32>> {
        let mut id = [0u8; 4];
        Ok(sys::map_lookup(Self::fd(&self.labels), &label_key(label)?, &mut id)?.map(|()| u32::from_ne_bytes(id)))
    }

    fn ensure_label(&mut self, label: &str) -> Result<u32> {
        if let Some(id) = self.label_id(label)? {
            return Ok(id);
        }
        let used: BTreeSet<u32> = self.labels()?.into_values().collect();
        let id = (0..MAX_LABELS).find(|id| !used.contains(id)).context("all 4096 labels are in use")?;
        // A reused id starts its counters from zero.
        let mut metrics: PerCpuArray<&mut MapData, LabelMetrics> = PerCpuArray::try_from(&mut self.metrics)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        metrics.set(id, PerCpuValues::try_from(vec![LabelMetrics::default(); cpus])?, 0)?;
        sys::map_update(Self::fd(&self.labels), &label_key(label)?, &id.to_ne_bytes())?;
        Ok(id)
    }

    /// Forgets labels with neither bindings nor sockets.
    fn collect_labels(&self) -> Result<()> {
        let mut in_use: BTreeSet<u32> = self.binding_entries()?.into_iter().map(|(_, id)| id).collect();
        for key in sys::map_keys(Self::fd(&self.sockets), 8)? {
            in_use.insert(u32::from_ne_bytes(key[0..4].try_into()?));
        }
        for (label, id) in self.labels()? {
            if !in_use.contains(&id) {
                sys::map_delete(Self::fd(&self.labels), &label_key(&label)?)?;
            }
        }
        Ok(())
    }

    // ---- bindings

    /// `active_bindings`: bit 0 the binding set in use, bit 1 the version
    /// of its length list (slot set * 2 + version of `binding_lengths`).
    fn active_state(&self) -> Result<u32> {
        let mut value = [0u8; 4];
        sys::map_lookup(Self::fd(&self.active), &0u32.to_ne_bytes(), &mut value)?;
        Ok(u32::from_ne_bytes(value) & 3)
    }

    fn active_index(&self) -> Result<usize> {
        Ok((self.active_state()? & 1) as usize)
    }

    fn set_active_state(&self, state: u32) -> Result<()> {
        sys::map_update(Self::fd(&self.active), &0u32.to_ne_bytes(), &state.to_ne_bytes())
            .context("switching the active bindings")
    }

    /// (key, label id) of every binding of the set in use.
    fn binding_entries(&self) -> Result<Vec<(Vec<u8>, u32)>> {
        let set = Self::fd(&self.sets[self.active_index()?]);
        let mut out = Vec::new();
        for key in sys::map_keys(set, bindings::KEY_SIZE)? {
            let mut id = [0u8; 4];
            if sys::map_lookup(set, &key, &mut id)?.is_some() {
                out.push((key, u32::from_ne_bytes(id)));
            }
        }
        Ok(out)
    }

    fn read_lengths(&self, slot: u32) -> Result<Vec<u8>> {
        let mut value = [0u8; bindings::LENGTHS_SIZE];
        sys::map_lookup(Self::fd(&self.lengths), &slot.to_ne_bytes(), &mut value)?;
        let count = (u32::from_ne_bytes(value[0..4].try_into()?) as usize).min(bindings::LENGTHS_SIZE - 4);
        Ok(value[4..4 + count].to_vec())
    }

    /// Publishes a new length list for the set in use: written to the idle
    /// copy, then switched in with one write, never rewritten under a lookup.
    fn publish_lengths(&self, lengths: impl IntoIterator<Item = u8>) -> Result<()> {
        let state = self.active_state()?;
        let (set, version) = (state & 1, (state >> 1) & 1);
        let slot = lengths_slot(set, 1 - version);
        sys::map_update(Self::fd(&self.lengths), &slot.to_ne_bytes(), &bindings::encode_lengths(lengths))
            .context("updating the prefix-length list")?;
        self.set_active_state(set | (1 - version) << 1)
    }

    /// Makes sure lookups probe `len`; no scan of the bindings, so a bind
    /// costs the same at any count.
    fn add_length(&self, len: u8) -> Result<()> {
        let state = self.active_state()?;
        let current = self.read_lengths(lengths_slot(state & 1, (state >> 1) & 1))?;
        if current.contains(&len) {
            return Ok(());
        }
        self.publish_lengths(current.into_iter().chain([len]))
    }

    pub fn bindings(&self) -> Result<Vec<Binding>> {
        let names = self.label_names()?;
        let mut out = Vec::new();
        for (key, id) in self.binding_entries()? {
            let (protocol, prefix, port) = bindings::decode_key(&key)?;
            let label = names.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
            out.push(Binding { label, protocol, prefix, port });
        }
        out.sort_by(|a, b| (&a.label, a.protocol, a.prefix, a.port).cmp(&(&b.label, b.protocol, b.prefix, b.port)));
        Ok(out)
    }

    /// Label id bound to exactly this (protocol, prefix, port), if any.
    fn exact_binding(&self, set: BorrowedFd<'_>, b: &Binding) -> Result<Option<u32>> {
        let mut id = [0u8; 4];
        Ok(sys::map_lookup(set, &bindings::encode_key(b.protocol, &b.prefix, b.port), &mut id)?
            .map(|()| u32::from_ne_bytes(id)))
    }

    /// Adds a binding; false when it was already there.
    pub fn bind(&mut self, b: &Binding) -> Result<bool> {
        label_key(&b.label)?;
        let index = self.active_index()?;
        let names = self.label_names()?;
        let key = bindings::encode_key(b.protocol, &b.prefix, b.port);
        if let Some(id) = self.exact_binding(Self::fd(&self.sets[index]), b)? {
            let owner = names.get(&id).cloned().unwrap_or_default();
            if owner == b.label {
                // Repairs a length list an interrupted bind left short.
                self.add_length(key[1])?;
                return Ok(false);
            }
            bail!("{} {} {} is already bound to label {owner}; unbind it first", b.protocol, b.prefix, b.port);
        }
        // The length first: probing a length with no key yet is harmless.
        self.add_length(key[1])?;
        let id = self.ensure_label(&b.label)?;
        if let Err(e) = sys::map_update(Self::fd(&self.sets[index]), &key, &id.to_ne_bytes()) {
            let _ = self.collect_labels();
            return Err(e).context("adding the binding");
        }
        Ok(true)
    }

    pub fn unbind(&mut self, b: &Binding) -> Result<()> {
        let index = self.active_index()?;
        let set = Self::fd(&self.sets[index]);
        match (self.exact_binding(set, b)?, self.label_id(&b.label)?) {
            (Some(bound), Some(id)) if bound == id => {}
            _ => bail!("no binding {} {} {} {}", b.label, b.protocol, b.prefix, b.port),
        }
        sys::map_delete(set, &bindings::encode_key(b.protocol, &b.prefix, b.port))?;
        let keys = sys::map_keys(set, bindings::KEY_SIZE)?;
        self.publish_lengths(keys.iter().map(|k| k[1]))?;
        self.collect_labels()
    }

    fn fill_set(&mut self, index: usize, list: &[Binding]) -> Result<()> {
        let mut ids = BTreeMap::new();
        for b in list {
            if !ids.contains_key(&b.label) {
                ids.insert(b.label.clone(), self.ensure_label(&b.label)?);
            }
        }
        for b in list {
            let key = bindings::encode_key(b.protocol, &b.prefix, b.port);
            sys::map_update(Self::fd(&self.sets[index]), &key, &ids[&b.label].to_ne_bytes())
                .with_context(|| format!("adding binding {b}"))?;
        }
        Ok(())
    }

    /// Replaces every binding with `file`'s in one switch of the active set.
    pub fn load_bindings(&mut self, file: &BindingsFile) -> Result<()> {
        // By key: 10.0.0.0/8 and ::ffff:10.0.0.0/104 are one binding.
        let mut seen: BTreeMap<[u8; bindings::KEY_SIZE], &str> = BTreeMap::new();
        for b in &file.bindings {
            label_key(&b.label)?;
            if let Some(other) = seen.insert(bindings::encode_key(b.protocol, &b.prefix, b.port), &b.label) {
                if other != b.label {
                    bail!("{} {} {} is bound to both {other} and {}", b.protocol, b.prefix, b.port, b.label);
                }
            }
        }
        let idle = 1 - self.active_index()?;
        // The idle set still holds the set before last; lookups no longer use it.
        clear(Self::fd(&self.sets[idle]), bindings::KEY_SIZE)?;
        let filled = self.fill_set(idle, &file.bindings);
        if let Err(e) = filled {
            // Labels made for the file go again; the bindings in use were never touched.
            let _ = self.collect_labels();
            return Err(e);
        }
        let slot = lengths_slot(idle as u32, 0);
        sys::map_update(
            Self::fd(&self.lengths),
            &slot.to_ne_bytes(),
            &bindings::encode_lengths(seen.keys().map(|k| k[1])),
        )
        .context("writing the new prefix-length list")?;
        // The old set stays as it is: a lookup that began before the switch
        // may still be reading it.
        self.set_active_state(idle as u32)?;
        self.collect_labels()
    }

    // ---- sockets

    /// Registers checked sockets under `label`, each replacing the label's
    /// socket of its family and protocol. All are checked before any is
    /// inserted, so a mismatch changes nothing.
    pub fn register(&mut self, label: &str, sockets: &[(&SocketInfo, BorrowedFd<'_>)]) -> Result<()> {
        label_key(label)?;
        let served: Vec<Binding> = self.bindings()?.into_iter().filter(|b| b.label == label).collect();
        for (info, _) in sockets {
            if !served.is_empty() && !served.iter().any(|b| serves(info, b)) {
                let kinds: BTreeSet<String> = served
                    .iter()
                    .map(|b| format!("{} {}", b.protocol, if b.prefix.addr.is_ipv4() { "ipv4" } else { "ipv6" }))
                    .collect();
                bail!(
                    "label {label} is bound to {} but this is a {} {} socket ({info}); register a matching socket",
                    kinds.into_iter().collect::<Vec<_>>().join(", "),
                    info.protocol,
                    info.family
                );
            }
        }
        let id = self.ensure_label(label)?;
        for (info, socket) in sockets {
            let fd = socket.as_raw_fd() as u64;
            if let Err(e) = sys::map_update(Self::fd(&self.sockets), &dest_key(id, info.family, info.protocol), &fd.to_ne_bytes())
            {
                let _ = self.collect_labels();
                return Err(e).context("inserting into the sockets map");
            }
        }
        Ok(())
    }

    /// Removes the label's sockets; returns how many.
    pub fn unregister(&mut self, label: &str) -> Result<usize> {
        let Some(id) = self.label_id(label)? else { bail!("no label {label}") };
        let mut removed = 0;
        for key in sys::map_keys(Self::fd(&self.sockets), 8)? {
            if u32::from_ne_bytes(key[0..4].try_into()?) == id {
                sys::map_delete(Self::fd(&self.sockets), &key)?;
                removed += 1;
            }
        }
        if removed == 0 {
            bail!("label {label} has no registered socket");
        }
        self.collect_labels()?;
        Ok(removed)
    }

    /// How many sockets are registered, without looking for their owners.
    pub fn registered_count(&self) -> Result<usize> {
        Ok(sys::map_keys(Self::fd(&self.sockets), 8)?.len())
    }

    pub fn registrations(&self) -> Result<Vec<Registration>> {
        let names = self.label_names()?;
        let mut out = Vec::new();
        for key in sys::map_keys(Self::fd(&self.sockets), 8)? {
            let mut cookie = [0u8; 8];
            if sys::map_lookup(Self::fd(&self.sockets), &key, &mut cookie)?.is_none() {
                continue;
            }
            let id = u32::from_ne_bytes(key[0..4].try_into()?);
            let cookie = u64::from_ne_bytes(cookie);
            let (owners, info) = socket::find_owners(cookie);
            out.push(Registration {
                label: names.get(&id).cloned().unwrap_or_else(|| format!("#{id}")),
                family: Family::from_af(key[4]).context("bad family in sockets map")?,
                protocol: Protocol::from_number(key[5]).context("bad protocol in sockets map")?,
                cookie,
                address: info.and_then(|i| i.local).map(|a| a.to_string()),
                owners,
            });
        }
        out.sort_by(|a, b| (&a.label, a.family, a.protocol).cmp(&(&b.label, b.family, b.protocol)));
        Ok(out)
    }

    // ---- metrics

    pub fn metrics(&self) -> Result<Vec<LabelStats>> {
        let metrics: PerCpuArray<&MapData, LabelMetrics> = PerCpuArray::try_from(&self.metrics)?;
        let mut out = Vec::new();
        for (label, id) in self.labels()? {
            let mut sum = LabelMetrics::default();
            for m in metrics.get(&id, 0)?.iter() {
                sum.lookups += m.lookups;
                sum.misses += m.misses;
                sum.errors += m.errors;
            }
            out.push(LabelStats { label, metrics: sum });
        }
        Ok(out)
    }
}

/// Where in `binding_lengths` the list for binding set `set`, copy
/// `version`, lives (the program computes the same).
fn lengths_slot(set: u32, version: u32) -> u32 {
    set * 2 + version
}

/// Whether `info`'s socket can take connections matched by `b`.
fn serves(info: &SocketInfo, b: &Binding) -> bool {
    info.protocol == b.protocol
        && match (info.family, b.prefix.addr) {
            (Family::Ipv4, IpAddr::V4(_)) | (Family::Ipv6, IpAddr::V6(_)) => true,
            (Family::Ipv6, IpAddr::V4(_)) => !info.v6only,
            // Such as ::/0: IPv4 lookups match it as v4-mapped addresses.
            (Family::Ipv4, IpAddr::V6(_)) => {
                b.prefix.len <= 96 && b.prefix.contains(IpAddr::V6(std::net::Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()))
            }
        }
}

fn clear(map: BorrowedFd<'_>, key_size: usize) -> Result<()> {
    for key in sys::map_keys(map, key_size)? {
        sys::map_delete(map, &key)?;
    }
    Ok(())
}

/// Which of a process's sockets `register-pid` should take.
#[derive(Debug, Clone)]
pub struct SocketFilter {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
}

/// The steerable sockets of `pid` matching `filter`: with a filter exactly
/// one, without one at most one per family and protocol.
pub fn sockets_of(pid: i32, filter: Option<&SocketFilter>) -> Result<Vec<socket::TakenSocket>> {
    let mut found = socket::steerable_sockets(pid)?;
    if let Some(f) = filter {
        found.retain(|t| {
            t.info.protocol == f.protocol && t.info.local.is_some_and(|a| a.ip() == f.address && a.port() == f.port)
        });
    }
    match filter {
        Some(f) if found.is_empty() => {
            bail!("process {pid} has no listening/bound {} socket on {}", f.protocol, std::net::SocketAddr::new(f.address, f.port))
        }
        Some(_) if found.len() > 1 => bail!("process {pid} has several matching sockets: {}", socket::describe(&found)),
        None if found.is_empty() => {
            bail!("process {pid} has no listening TCP or bound UDP socket in this network namespace")
        }
        None => {
            let kinds: BTreeSet<(Family, Protocol)> = found.iter().map(|t| (t.info.family, t.info.protocol)).collect();
            if kinds.len() != found.len() {
                bail!(
                    "process {pid} has several sockets of one family and protocol, name one with `tcp|udp ADDR PORT`: {}",
                    socket::describe(&found)
                );
            }
        }
        _ => {}
    }
    Ok(found)
}

/// Sockets handed over by systemd socket activation (LISTEN_PID/LISTEN_FDS).
pub fn activated_sockets() -> Result<Vec<(i32, SocketInfo)>> {
    let pid: u32 = std::env::var("LISTEN_PID")
        .context("LISTEN_PID is not set: `register` takes sockets passed by systemd socket activation")?
        .parse()
        .context("LISTEN_PID is not a number")?;
    if pid != std::process::id() {
        bail!("LISTEN_PID is {pid}, not this process ({}): the sockets were meant for another process", std::process::id());
    }
    let count: i32 = std::env::var("LISTEN_FDS").context("LISTEN_FDS is not set")?.parse().context("LISTEN_FDS is not a number")?;
    if count < 1 {
        bail!("LISTEN_FDS is {count}: no sockets were passed");
    }
    let mut out = Vec::new();
    for fd in 3..3 + count {
        // Safety: systemd passes fds 3.. open for this process's lifetime.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let info = socket::inspect(borrowed).with_context(|| format!("passed fd {fd}"))?;
        socket::check_steerable(&info).with_context(|| format!("passed fd {fd} cannot be steered to"))?;
        out.push((fd, info));
    }
    Ok(out)
}

/// The metrics in the Prometheus text exposition format.
pub fn prometheus(stats: &[LabelStats]) -> String {
    type Counter = (&'static str, &'static str, fn(&LabelMetrics) -> u64);
    let counters: [Counter; 3] = [
        ("steer_lookups_total", "Connections matched to a label's binding.", |m| m.lookups),
        ("steer_misses_total", "Matched connections dropped because the label has no socket.", |m| m.misses),
        ("steer_errors_total", "Matched connections dropped because the socket was refused (sk_assign).", |m| m.errors),
    ];
    let mut out = String::new();
    for (name, help, value) in counters {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for s in stats {
            out.push_str(&format!("{name}{{label=\"{}\"}} {}\n", s.label, value(&s.metrics)));
        }
    }
    out
}

/// Answers every HTTP request on `addr` with the current metrics, until killed.
pub fn serve_metrics(layout: &Layout, addr: std::net::SocketAddr) -> Result<()> {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    log::info!("serving metrics on http://{}/metrics", listener.local_addr()?);
    for mut conn in listener.incoming().flatten() {
        // The request itself does not matter: every path gets the metrics.
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request);
        let body = match State::open(layout).and_then(|s| s.metrics()) {
            Ok(stats) => prometheus(&stats),
            Err(e) => format!("# error: {e:#}\n"),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}
