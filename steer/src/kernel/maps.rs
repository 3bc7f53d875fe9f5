//! Pinned maps, opened and checked against their spec in steer-common
//! before anything reads or writes them, and the map operations aya 0.14
//! lacks, as safe calls whose buffer sizes are checked against the map:
//! batch reads and writes, socket maps with 8-byte (cookie) values, maps of
//! maps and mmapped arrays.

use std::{
    marker::PhantomData,
    num::NonZeroUsize,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData, MapError, MapInfo, MapType};
use bytemuck::Pod;
use steer_common::{
    MapSpec,
    kernel::{BPF_F_MMAPABLE, BPF_MAP_TYPE_ARRAY},
};

use super::{bpffs, sys};
use crate::error::{Context, Result, fail};

fn type_name(info: &MapInfo) -> String {
    match info.map_type() {
        Ok(t) => format!("{t:?}"),
        Err(_) => "unknown".into(),
    }
}

/// Opens the pin at `path`, failing unless it is a BPF map.
fn open_pinned(path: &Path, what: &str) -> Result<(MapData, MapInfo)> {
    bpffs::require_pin(path, what)?;
    let data = MapData::from_pin(path).with_context(|| format!("opening pinned map {}", path.display()))?;
    // BPF_OBJ_GET opens any pinned object; only the fd's kind says it is a map.
    let kind = sys::bpf_fd_kind(data.fd().as_fd());
    if kind.as_deref() != Some("bpf-map") {
        let what = match kind.as_deref() {
            Some("bpf-prog") => "a BPF program",
            Some("bpf_link") | Some("bpf-link") => "a BPF link",
            _ => "not a BPF map",
        };
        fail!(Pin, "opening pinned map {}: it is {what}, not a map", path.display());
    }
    let info = data.info().with_context(|| format!("reading map info of {}", path.display()))?;
    Ok((data, info))
}

/// Opens one of the dispatcher's maps, checked against its spec: a pin of
/// another shape (an older steer's state, or a foreign object) is refused
/// before anything reads or writes it.
pub fn open_spec(path: &Path, spec: &MapSpec) -> Result<MapData> {
    let stale = "is this state from another steerctl version? `steerctl upgrade`, or `steerctl unload` and load again";
    let (data, info) = open_pinned(path, &format!("{} map ({stale})", spec.name))?;
    let map_type = info.map_type().ok().map(|t| t as u32);
    if map_type != Some(spec.map_type) || info.key_size() != spec.key_size || info.value_size() != spec.value_size {
        fail!(Pin, "{} is not the {} map this steerctl expects ({stale})", path.display(), spec.name);
    }
    Ok(data)
}

/// [`open_spec`], as an aya typed map.
pub fn open_typed<M: TryFrom<Map, Error = MapError>>(path: &Path, spec: &MapSpec) -> Result<M> {
    Ok(M::try_from(Map::from_map_data(open_spec(path, spec)?)?)?)
}

/// A map with keys `K` and values `V` whose sizes were checked against the
/// map's own: the element calls aya lacks (batches, flags) go through it.
#[derive(Debug)]
pub struct RawMap<K, V> {
    data: MapData,
    _kv: PhantomData<(K, V)>,
}

impl<K: Pod, V: Pod> RawMap<K, V> {
    pub fn new(data: MapData) -> Result<Self> {
        let info = data.info()?;
        if info.key_size() as usize != size_of::<K>() || info.value_size() as usize != size_of::<V>() {
            fail!(
                Pin,
                "map {} has {}-byte keys and {}-byte values, not {} and {}",
                info.name_as_str().unwrap_or("?"),
                info.key_size(),
                info.value_size(),
                size_of::<K>(),
                size_of::<V>()
            );
        }
        Ok(Self { data, _kv: PhantomData })
    }

    pub fn open(path: &Path, spec: &MapSpec) -> Result<Self> {
        Self::new(open_spec(path, spec)?)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    pub fn data(&self) -> &MapData {
        &self.data
    }

    pub fn get(&self, key: &K) -> Result<Option<V>> {
        let mut value = V::zeroed();
        // Safety: key and value are K and V, whose sizes new() checked.
        let found = unsafe { sys::map_lookup(self.fd(), bytemuck::bytes_of(key), bytemuck::bytes_of_mut(&mut value)) }
            .context("looking up a map element")?;
        Ok(found.then_some(value))
    }

    pub fn set(&self, key: &K, value: &V) -> Result<()> {
        // Safety: as in get().
        unsafe { sys::map_update(self.fd(), bytemuck::bytes_of(key), bytemuck::bytes_of(value), 0) }
            .context("updating a map element")
    }

    /// Removes `key`; false when it was absent.
    pub fn remove(&self, key: &K) -> Result<bool> {
        // Safety: as in get().
        unsafe { sys::map_delete(self.fd(), bytemuck::bytes_of(key)) }.context("deleting a map element")
    }

    /// Every entry of a hash map, a few thousand per call.
    pub fn entries(&self) -> Result<Vec<(K, V)>> {
        // Safety: the sizes are K's and V's, which new() checked.
        let raw = unsafe { sys::map_entries_batch(self.fd(), size_of::<K>(), size_of::<V>()) }
            .context("reading a map in batches")?;
        Ok(raw.iter().map(|(k, v)| (bytemuck::pod_read_unaligned(k), bytemuck::pod_read_unaligned(v))).collect())
    }
}

/// Opens a pinned map whatever its shape: for reading a map of an older
/// layout whose spec the caller checks itself.
pub fn open_any(path: &Path, what: &str) -> Result<(MapData, MapInfo)> {
    open_pinned(path, what)
}

/// The value at u32 `key` of the map `data`, whatever its size; None when
/// absent. For a map whose value layout differs between layouts
/// (`steer_meta`), read by its common prefix.
pub fn raw_value(data: &MapData, key: u32) -> Result<Option<Vec<u8>>> {
    let info = data.info()?;
    if info.key_size() != 4 {
        fail!(Pin, "map {} has {}-byte keys, not 4", info.name_as_str().unwrap_or("?"), info.key_size());
    }
    let mut value = vec![0u8; info.value_size() as usize];
    // Safety: a 4-byte key and a buffer of the map's value size.
    let found = unsafe { sys::map_lookup(data.fd().as_fd(), &key.to_ne_bytes(), &mut value) }
        .context("looking up a map element")?;
    Ok(found.then_some(value))
}

fn is_per_cpu(map_type: u32) -> bool {
    use steer_common::kernel::BPF_MAP_TYPE_PERCPU_ARRAY;
    // PERCPU_HASH (5), LRU_PERCPU_HASH (10) too.
    matches!(map_type, BPF_MAP_TYPE_PERCPU_ARRAY | 5 | 10)
}

/// Copies every element of `from` into `to`, maps of one type with equal
/// key and value sizes (per-CPU values whole, every CPU's): one batch read
/// and one batch write (element by element where the kernel has no batch
/// updates). Array elements that are all zero are skipped (a new array
/// holds zeros already). Fails, writing nothing, when `to` is too small.
/// Returns the number of elements written.
pub fn copy_entries(from: &MapData, to: &MapData) -> Result<usize> {
    let (src, dst) = (from.info()?, to.info()?);
    let kind = |i: &MapInfo| i.map_type().ok().map(|t| t as u32);
    let name = src.name_as_str().unwrap_or("?").to_string();
    if kind(&src) != kind(&dst) || src.key_size() != dst.key_size() || src.value_size() != dst.value_size() {
        fail!(Pin, "map {name}: cannot copy between maps of different shapes");
    }
    let map_type = kind(&src).unwrap_or(0);
    let key_size = src.key_size() as usize;
    let value_size = if is_per_cpu(map_type) {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        (src.value_size() as usize).next_multiple_of(8) * cpus
    } else {
        src.value_size() as usize
    };
    // Safety: the sizes are the map's own (per-CPU values for every possible CPU).
    let mut entries = unsafe { sys::map_entries_batch(from.fd().as_fd(), key_size, value_size) }
        .with_context(|| format!("reading map {name}"))?;
    let is_array = matches!(map_type, BPF_MAP_TYPE_ARRAY | steer_common::kernel::BPF_MAP_TYPE_PERCPU_ARRAY);
    if is_array {
        entries.retain(|(_, v)| v.iter().any(|&b| b != 0));
    }
    if entries.is_empty() {
        return Ok(0);
    }
    if entries.len() > dst.max_entries() as usize {
        fail!(Full, "map {name}: {} elements do not fit the new map's {}", entries.len(), dst.max_entries());
    }
    let keys: Vec<u8> = entries.iter().flat_map(|(k, _)| k.iter().copied()).collect();
    let values: Vec<u8> = entries.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    // Safety: `entries.len()` keys and values of the map's sizes.
    match unsafe { sys::map_update_batch(to.fd().as_fd(), &keys, &values, entries.len() as u32) } {
        Ok(()) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) => {
            for (key, value) in &entries {
                // Safety: one key and one value of the map's sizes.
                unsafe { sys::map_update(to.fd().as_fd(), key, value, 0) }
                    .with_context(|| format!("writing map {name}"))?;
            }
        }
        Err(e) => return Err(e).with_context(|| format!("writing map {name}")),
    }
    Ok(entries.len())
}

/// A new, unpinned map of `spec`'s type and shape with room for
/// `max_entries` (a record that grew past its spec's size).
pub fn create_like(spec: &MapSpec, max_entries: u32) -> Result<MapData> {
    let obj = aya_obj::Map::new_from_params(spec.map_type, spec.key_size, spec.value_size, max_entries, spec.flags);
    MapData::create(obj, spec.name, None).with_context(|| format!("creating a {} map", spec.name))
}

/// Kernel memory of one map fd, as /proc reports it (`memlock`; the bytes
/// in use since Linux 6.2, the bytes reserved before).
pub fn memlock(fd: BorrowedFd<'_>) -> Result<u64> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
}

/// An array of maps (u32 slot -> inner map).
#[derive(Debug)]
pub struct MapOfMaps {
    data: MapData,
}

impl MapOfMaps {
    pub fn open(path: &Path, spec: &MapSpec) -> Result<Self> {
        Ok(Self { data: open_spec(path, spec)? })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    /// The id of the inner map in `slot`, if any.
    pub fn inner_id(&self, slot: u32) -> Result<Option<u32>> {
        let mut id = [0u8; 4];
        // Safety: a map of maps has 4-byte keys and reads back 4-byte ids.
        let found =
            unsafe { sys::map_lookup(self.fd(), &slot.to_ne_bytes(), &mut id) }.context("looking up a map of maps")?;
        Ok(found.then(|| u32::from_ne_bytes(id)))
    }

    /// Points `slots` at `chunks`, in one batch where the kernel has batch
    /// updates for maps of maps, slot by slot otherwise (each change of a
    /// map of maps costs the kernel an RCU grace period).
    pub fn install(&self, slots: &[u32], chunks: &[&MapData]) -> Result<()> {
        assert_eq!(slots.len(), chunks.len());
        if slots.is_empty() {
            return Ok(());
        }
        let keys: Vec<u8> = slots.iter().flat_map(|slot| slot.to_ne_bytes()).collect();
        let fds: Vec<u8> = chunks.iter().flat_map(|c| (c.fd().as_fd().as_raw_fd() as u32).to_ne_bytes()).collect();
        // Safety: 4-byte keys and 4-byte fd values, `slots.len()` of each.
        match unsafe { sys::map_update_batch(self.fd(), &keys, &fds, slots.len() as u32) } {
            Ok(()) => Ok(()),
            // EINVAL, ENOTSUPP (524): no batch updates for maps of maps here.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) => {
                for (key, fd) in keys.chunks(4).zip(fds.chunks(4)) {
                    // Safety: as above, one element.
                    unsafe { sys::map_update(self.fd(), key, fd, 0) }.context("installing a chunk")?;
                }
                Ok(())
            }
            Err(e) => Err(e).context("installing chunks"),
        }
    }

    /// Empties `slot`; false when it held nothing.
    pub fn remove(&self, slot: u32) -> Result<bool> {
        // Safety: a map of maps has 4-byte keys.
        unsafe { sys::map_delete(self.fd(), &slot.to_ne_bytes()) }.context("emptying a slot of a map of maps")
    }
}

/// A new ring buffer map of `bytes` (a power of two, whole pages).
pub fn new_ringbuf(bytes: u32, name: &str) -> Result<MapData> {
    let obj = aya_obj::Map::new_from_params(steer_common::kernel::BPF_MAP_TYPE_RINGBUF, 0, 0, bytes, 0);
    MapData::create(obj, name, None).context("creating a ring buffer map")
}

/// The bytes a `BPF_F_MMAPABLE` array of `entries` values of `value_size`
/// maps: whole pages.
pub fn mmap_bytes(entries: u32, value_size: usize) -> usize {
    let page = rustix::param::page_size();
    (entries as usize * value_size).next_multiple_of(page)
}

/// A `BPF_F_MMAPABLE` array of T mapped into this process: reads and
/// writes are memory accesses, no system call per entry. Writes are seen
/// by BPF programs at once, so only write what no lookup reads.
pub struct MappedArray<T: Pod> {
    map: MapData,
    area: std::ptr::NonNull<std::ffi::c_void>,
    bytes: usize,
    entries: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: Pod> MappedArray<T> {
    /// Maps `map`, an mmapable array of `entries` T.
    pub fn new(map: MapData, entries: u32) -> Result<Self> {
        let len = mmap_bytes(entries, size_of::<T>());
        // Safety: a shared mapping of the map's value area, which is `len`
        // bytes; it lives as long as this value, which unmaps it on drop.
        let area = unsafe {
            nix::sys::mman::mmap(
                None,
                NonZeroUsize::new(len).expect("arrays are never empty"),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
                nix::sys::mman::MapFlags::MAP_SHARED,
                map.fd().as_fd(),
                0,
            )
        }
        .context("mapping an array map")?;
        Ok(Self { map, area, bytes: len, entries: entries as usize, _values: std::marker::PhantomData })
    }

    /// A new array of `capacity` T holding `entries` (the rest zero).
    pub fn create(entries: &[T], capacity: u32, name: &str) -> Result<Self> {
        assert!(entries.len() <= capacity as usize);
        let obj = aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, size_of::<T>() as u32, capacity, BPF_F_MMAPABLE);
        let map = MapData::create(obj, name, None).context("creating an array map")?;
        let mut array = Self::new(map, capacity)?;
        array.write(0, entries);
        Ok(array)
    }

    pub fn map(&self) -> &MapData {
        &self.map
    }

    pub fn into_map(self) -> MapData {
        // Unmapped by drop; the map itself lives on in the returned value.
        let this = std::mem::ManuallyDrop::new(self);
        // Safety: `this` is never used or dropped again but for its area.
        let map = unsafe { std::ptr::read(&this.map) };
        // Safety: the area this value mapped, `len` bytes.
        if let Err(e) = unsafe { nix::sys::mman::munmap(this.area, this.bytes) } {
            log::warn!("unmapping an array map: {e}");
        }
        map
    }

    pub fn as_slice(&self) -> &[T] {
        // Safety: `entries` T fit in the mapped area, and any bit pattern is
        // a valid T (Pod).
        unsafe { std::slice::from_raw_parts(self.area.as_ptr().cast::<T>(), self.entries) }
    }

    /// The entries as 8-byte words that lookups may be reading while they
    /// change: each store is seen whole.
    pub fn words(&self) -> &[std::sync::atomic::AtomicU64] {
        assert!(size_of::<T>().is_multiple_of(8), "entries of whole words");
        // Safety: the area is page-aligned and holds `entries` T, a whole
        // number of words; AtomicU64 has u64's layout, and every access to
        // it through this slice is atomic.
        unsafe {
            std::slice::from_raw_parts(
                self.area.as_ptr().cast::<std::sync::atomic::AtomicU64>(),
                self.entries * size_of::<T>() / 8,
            )
        }
    }

    /// The entries as 4-byte words, each stored whole (see [`Self::words`]).
    pub fn words32(&self) -> &[std::sync::atomic::AtomicU32] {
        assert!(size_of::<T>().is_multiple_of(4), "entries of whole words");
        // Safety: as for `words`, with 4-byte words.
        unsafe {
            std::slice::from_raw_parts(
                self.area.as_ptr().cast::<std::sync::atomic::AtomicU32>(),
                self.entries * size_of::<T>() / 4,
            )
        }
    }

    pub fn len(&self) -> usize {
        self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }

    /// Writes `values` from entry `at` on.
    pub fn write(&mut self, at: usize, values: &[T]) {
        assert!(at + values.len() <= self.entries, "writing past the end of an array map");
        // Safety: in bounds (above) of the mapped area, which only this
        // value's `&mut` writes through in this process.
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.area.as_ptr().cast::<T>().add(at), values.len()) };
    }
}

// Safety: the mapping belongs to this value alone (like a Vec's buffer);
// moving it to another thread moves that ownership.
unsafe impl<T: Pod> Send for MappedArray<T> {}

impl<T: Pod> Drop for MappedArray<T> {
    fn drop(&mut self) {
        // Safety: the area this value mapped, `len` bytes, used no more.
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.area, self.bytes) } {
            log::warn!("unmapping an array map: {e}");
        }
    }
}

/// A new `BPF_F_MMAPABLE` array of `capacity` T holding `entries` (the rest
/// zero), written through mmap: one copy, no system call per entry.
pub fn filled_array<T: Pod>(entries: &[T], capacity: u32, name: &str) -> Result<MapData> {
    Ok(MappedArray::create(entries, capacity, name)?.into_map())
}

/// A new hash map for `spec`'s keys and values with room for `capacity`.
pub fn new_hash<K: Pod, V: Pod>(spec: &MapSpec, capacity: u32) -> Result<RawMap<K, V>> {
    let obj = aya_obj::Map::new_from_params(spec.map_type, spec.key_size, spec.value_size, capacity, spec.flags);
    RawMap::new(MapData::create(obj, spec.name, None).with_context(|| format!("creating a {} map", spec.name))?)
}

/// The set of steered ports (the seed's `echo_ports`: HASH u16 -> u8).
/// Opened by shape, not spec: the seed tools accept any such map.
pub struct PortMap {
    map: HashMap<MapData, u16, u8>,
}

impl PortMap {
    pub fn open(path: &Path) -> Result<Self> {
        let (data, info) = open_pinned(path, "port map")?;
        if !matches!(info.map_type(), Ok(MapType::Hash)) || info.key_size() != 2 {
            fail!(
                Pin,
                "{} is a {} map with {}-byte keys; a port map is a hash map keyed by a 2-byte port",
                path.display(),
                type_name(&info),
                info.key_size()
            );
        }
        Ok(Self { map: HashMap::try_from(Map::from_map_data(data)?)? })
    }

    pub fn add(&mut self, port: u16) -> Result<()> {
        self.map.insert(port, 0, 0).with_context(|| format!("adding port {port}"))
    }

    /// Removes `port`; false when it was not listed.
    pub fn remove(&mut self, port: u16) -> Result<bool> {
        match self.map.remove(&port) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing port {port}")),
        }
    }

    pub fn list(&self) -> Result<Vec<u16>> {
        let mut ports = self.map.keys().collect::<Result<Vec<_>, _>>()?;
        ports.sort_unstable();
        Ok(ports)
    }
}

/// A SOCKMAP or SOCKHASH with u32 keys. Values are written as socket fds
/// and read back as socket cookies, which needs 8-byte values: aya's typed
/// socket maps fix them at 4 bytes, so this drives the map directly. Maps
/// with 4-byte values (the seed tools accept them) insert, but have no
/// cookie to read.
#[derive(Debug)]
pub struct SocketMap {
    data: MapData,
    value_size: u32,
    is_sockmap: bool,
}

impl SocketMap {
    /// Any socket map keyed by u32: what the seed tools (`sockmap-update`) take.
    pub fn open(path: &Path) -> Result<Self> {
        let (data, info) = open_pinned(path, "socket map")?;
        if !matches!(info.map_type(), Ok(MapType::SockMap | MapType::SockHash)) {
            fail!(
                Pin,
                "{} is a {} map, not a socket map; pass a BPF_MAP_TYPE_SOCKMAP or SOCKHASH pin (such as .../echo_socket)",
                path.display(),
                type_name(&info)
            );
        }
        if info.key_size() != 4 || !matches!(info.value_size(), 4 | 8) {
            fail!(
                Pin,
                "{} has {}-byte keys and {}-byte values; only 4-byte keys and 4- or 8-byte values are supported",
                path.display(),
                info.key_size(),
                info.value_size()
            );
        }
        Self::from_data(data, &info)
    }

    /// One of the dispatcher's socket maps, checked against its spec.
    pub fn open_spec(path: &Path, spec: &MapSpec) -> Result<Self> {
        let data = open_spec(path, spec)?;
        let info = data.info()?;
        Self::from_data(data, &info)
    }

    fn from_data(data: MapData, info: &MapInfo) -> Result<Self> {
        Ok(Self { data, value_size: info.value_size(), is_sockmap: matches!(info.map_type(), Ok(MapType::SockMap)) })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    /// Puts `socket` at `key`, replacing whatever was there.
    pub fn insert(&self, key: u32, socket: BorrowedFd<'_>) -> Result<()> {
        let fd = socket.as_raw_fd();
        // The kernel reads a u32 or u64 fd depending on the map's value size.
        let value =
            if self.value_size == 8 { (fd as u64).to_ne_bytes().to_vec() } else { (fd as u32).to_ne_bytes().to_vec() };
        // Safety: 4-byte keys (checked at open) and a value of the map's size.
        match unsafe { sys::map_update(self.fd(), &key.to_ne_bytes(), &value, 0) } {
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                fail!(Invalid, "key {key} is out of the socket map's range")
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => fail!(
                Invalid,
                "the kernel refused the socket for a socket map (it must be a listening TCP or a bound UDP socket)"
            ),
            other => other.with_context(|| format!("inserting into the socket map at key {key}")),
        }
    }

    /// Cookie of the socket at `key`, if any (needs 8-byte values).
    pub fn cookie(&self, key: u32) -> Result<Option<u64>> {
        if self.value_size != 8 {
            return Ok(None);
        }
        let mut value = [0u8; 8];
        // Safety: 4-byte keys and 8-byte values, both checked.
        let found = unsafe { sys::map_lookup(self.fd(), &key.to_ne_bytes(), &mut value) }
            .context("looking up the socket map")?;
        Ok(found.then(|| u64::from_ne_bytes(value)))
    }

    /// Every socket of the map, as (key, cookie): one lookup per key (a
    /// socket map has no batch reads). Empty for 4-byte values.
    pub fn cookies(&self) -> Result<Vec<(u32, u64)>> {
        let max = self.data.info()?.max_entries();
        let mut out = Vec::new();
        for key in 0..max {
            if let Some(cookie) = self.cookie(key)? {
                out.push((key, cookie));
            }
        }
        Ok(out)
    }

    /// Removes the socket at `key`; false when there was none.
    pub fn remove(&self, key: u32) -> Result<bool> {
        // Safety: 4-byte keys, checked at open.
        match unsafe { sys::map_delete(self.fd(), &key.to_ne_bytes()) } {
            // A SOCKMAP answers EINVAL, not ENOENT, for an empty slot.
            Err(e) if self.is_sockmap && e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            other => other.context("removing from the socket map"),
        }
    }
}
