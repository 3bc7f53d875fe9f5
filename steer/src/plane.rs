//! Publishing a compiled generation so that lookups switch to it at once.
//!
//! `steer_dirs` and `steer_ranges` hold two halves of chunk slots; lookups
//! read the half `steer_config` names (an empty slot reads as no entry). A
//! write fills the idle half's slots the generation needs with fresh,
//! never-modified chunk maps, switches `active_half` (one byte, so no lookup
//! sees a mix), waits for an RCU grace period so no lookup still runs on the
//! old half, and replaces the old half's chunks with an empty one, which
//! frees them: memory follows the bindings. `steer_meta` records which slots
//! each half fills, so a write touches only those. The kernel waits for a
//! grace period after every change of a map of maps: where it has batch
//! updates for them, slots change in batches (three grace periods per write
//! whatever its size); elsewhere one per slot changed. `idle_dirty` says
//! when the idle half may still be read (a write died between switching and
//! emptying), so the next write waits first.

use std::{
    collections::BTreeMap,
    num::NonZeroUsize,
    os::fd::{AsFd, BorrowedFd},
};

use aya::{
    Pod,
    maps::{Array, MapData},
};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use steer_common::{
    Answer, CHUNK_ENTRIES, DIR_CHUNKS, DataplaneConfig, DirEntry, DirSlots, RANGE_CHUNKS, Range, StateMeta,
    kernel::{BPF_F_MMAPABLE, BPF_MAP_TYPE_ARRAY},
    map,
};

use crate::{
    compile::Generation,
    dispatcher::{Access, Dispatcher, spec},
    error::{Context, Result},
    maps::open_spec,
    sys,
};

/// Sizes of the published generation.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PlaneStats {
    pub ranges: usize,
    pub dir_chunks: usize,
    pub range_chunks: usize,
    /// Bytes of map memory the chunks take.
    pub chunk_bytes: usize,
}

/// Kernel memory of one map fd, as /proc reports it (`memlock`; the bytes
/// in use since Linux 6.2, the bytes reserved before).
fn memlock(fd: BorrowedFd<'_>) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(info.lines().find_map(|l| l.strip_prefix("memlock:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0))
}

/// Kernel memory of every pinned map, the chunk maps of maps of maps
/// included (each chunk once, however many slots share it).
pub fn memory<A: Access>(d: &Dispatcher<A>) -> Result<BTreeMap<&'static str, u64>> {
    let mut out = BTreeMap::new();
    for m in steer_common::MAPS {
        let data = open_spec(&d.layout().map(m.name), m)?;
        let fd = data.fd().as_fd();
        let mut bytes = memlock(fd)?;
        if m.inner.is_some() {
            let mut seen = std::collections::BTreeSet::new();
            for slot in 0..m.max_entries {
                let mut id = [0u8; 4];
                if sys::map_lookup(fd, &slot.to_ne_bytes(), &mut id)? && seen.insert(u32::from_ne_bytes(id)) {
                    let inner = aya::maps::MapInfo::from_id(u32::from_ne_bytes(id))?.fd()?;
                    bytes += memlock(inner.as_fd())?;
                }
            }
        }
        out.insert(m.name, bytes);
    }
    Ok(out)
}

/// The generation lookups use now, read from the kernel's chunks: the
/// tables steer_dispatch searches, for userspace to search the same way.
pub struct LiveTables {
    dirs: MapData,
    ranges: MapData,
    chunks: std::cell::RefCell<BTreeMap<(bool, u32), Option<MapData>>>,
}

impl LiveTables {
    pub fn open<A: Access>(d: &Dispatcher<A>) -> Result<Self> {
        let path = |name| d.layout().map(name);
        Ok(Self {
            dirs: open_spec(&path(map::STEER_DIRS), spec(map::STEER_DIRS))?,
            ranges: open_spec(&path(map::STEER_RANGES), spec(map::STEER_RANGES))?,
            chunks: Default::default(),
        })
    }

    /// Entry `index` of the chunk in `slot` of the directory (`dir`) or the ranges.
    fn entry<T: Pod>(&self, dir: bool, slot: u32, index: u32) -> Option<T> {
        let mut chunks = self.chunks.borrow_mut();
        let chunk = chunks.entry((dir, slot)).or_insert_with(|| {
            let outer = if dir { &self.dirs } else { &self.ranges };
            let mut id = [0u8; 4];
            let found = sys::map_lookup(outer.fd().as_fd(), &slot.to_ne_bytes(), &mut id).ok()?;
            found.then(|| MapData::from_id(u32::from_ne_bytes(id)).ok()).flatten()
        });
        let chunk = chunk.as_ref()?;
        let mut value = vec![0u8; size_of::<T>()];
        sys::map_lookup(chunk.fd().as_fd(), &index.to_ne_bytes(), &mut value).ok()?.then_some(())?;
        // Safety: the chunk's values are T's bytes (checked shapes, Pod).
        Some(unsafe { std::ptr::read_unaligned(value.as_ptr().cast::<T>()) })
    }
}

impl steer_common::lookup::Tables for LiveTables {
    fn dir(&self, half: u32, key: u32) -> Option<DirEntry> {
        self.entry(true, steer_common::dir_slot(half, key), key % CHUNK_ENTRIES)
    }

    fn range(&self, half: u32, index: u32) -> Option<Range> {
        self.entry(false, steer_common::range_slot(half, index), index % CHUNK_ENTRIES)
    }
}

/// The maps lookups read, opened for publishing.
pub struct Plane {
    config: Array<MapData, DataplaneConfig>,
    meta: Array<MapData, StateMeta>,
    dirs: MapData,
    ranges: MapData,
}

fn chunk_bytes(value_size: usize) -> usize {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok().flatten().unwrap_or(4096) as usize;
    (CHUNK_ENTRIES as usize * value_size).next_multiple_of(page)
}

/// A new chunk map holding `entries` (at most CHUNK_ENTRIES; the rest stay
/// zero), written through mmap: one copy, no syscall per entry.
fn new_chunk<T: Pod>(entries: &[T], name: &str) -> Result<MapData> {
    assert!(entries.len() <= CHUNK_ENTRIES as usize);
    let obj =
        aya_obj::Map::new_from_params(BPF_MAP_TYPE_ARRAY, 4, size_of::<T>() as u32, CHUNK_ENTRIES, BPF_F_MMAPABLE);
    let map = MapData::create(obj, name, None).context("creating a chunk map")?;
    let len = chunk_bytes(size_of::<T>());
    let fd = map.fd().as_fd();
    // Safety: a fresh shared mapping of the map's value area, which is `len`
    // bytes; unmapped below, and nothing else maps it.
    unsafe {
        let area = mmap(
            None,
            NonZeroUsize::new(len).expect("chunks are never empty"),
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            fd,
            0,
        )
        .context("mapping a chunk map")?;
        std::ptr::copy_nonoverlapping(entries.as_ptr().cast::<u8>(), area.as_ptr().cast::<u8>(), size_of_val(entries));
        munmap(area, len).context("unmapping a chunk map")?;
    }
    Ok(map)
}

/// Points `slots` of a map of maps at `chunks`, in one batch where the
/// kernel has batch updates for maps of maps, slot by slot otherwise.
fn install(outer: BorrowedFd<'_>, slots: &[u32], chunks: &[&MapData]) -> Result<()> {
    use std::os::fd::AsRawFd;
    if slots.is_empty() {
        return Ok(());
    }
    let keys: Vec<u8> = slots.iter().flat_map(|slot| slot.to_ne_bytes()).collect();
    let fds: Vec<u8> = chunks.iter().flat_map(|c| (c.fd().as_fd().as_raw_fd() as u32).to_ne_bytes()).collect();
    match sys::map_update_batch(outer, &keys, &fds, slots.len() as u32) {
        Ok(()) => Ok(()),
        // EINVAL, ENOTSUPP (524): no batch updates for maps of maps here.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | 524)) => {
            for (key, fd) in keys.chunks(4).zip(fds.chunks(4)) {
                sys::map_update(outer, key, fd).context("installing a chunk")?;
            }
            Ok(())
        }
        Err(e) => Err(e).context("installing chunks"),
    }
}

/// The chunk numbers set in `bits`.
fn dir_chunks_in(bits: &DirSlots) -> impl Iterator<Item = u32> + '_ {
    (0..DIR_CHUNKS).filter(|c| bits[*c as usize / 64] >> (c % 64) & 1 != 0)
}

fn dir_slots_of(chunks: impl IntoIterator<Item = u32>) -> DirSlots {
    let mut bits = DirSlots::default();
    for c in chunks {
        bits[c as usize / 64] |= 1 << (c % 64);
    }
    bits
}

/// Waits until every BPF program run that began before now has finished
/// (an RCU grace period: membarrier(MEMBARRIER_CMD_GLOBAL) is
/// synchronize_rcu). Where that is unavailable (nohz_full CPUs), a pause
/// far longer than any lookup.
fn grace_period() {
    if rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Plane {
    pub fn open<A: Access>(d: &Dispatcher<A>) -> Result<Self> {
        let path = |name| d.layout().map(name);
        Ok(Self {
            config: d.typed_map(map::STEER_CONFIG)?,
            meta: d.typed_map(map::STEER_META)?,
            dirs: open_spec(&path(map::STEER_DIRS), spec(map::STEER_DIRS))?,
            ranges: open_spec(&path(map::STEER_RANGES), spec(map::STEER_RANGES))?,
        })
    }

    pub fn config(&self) -> Result<DataplaneConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    pub fn meta(&self) -> Result<StateMeta> {
        Ok(self.meta.get(&0, 0)?)
    }

    pub fn set_meta(&mut self, meta: StateMeta) -> Result<()> {
        self.meta.set(0, meta, 0).context("writing steer_meta")
    }

    /// Turns the seed list on or off (one byte of `steer_config`).
    pub fn set_seed(&mut self, enabled: bool) -> Result<()> {
        let mut config = self.config()?;
        config.seed_enabled = u8::from(enabled);
        self.config.set(0, config, 0).context("writing steer_config")
    }

    /// Makes `generation` the one lookups use.
    pub fn publish(&mut self, generation: &Generation) -> Result<PlaneStats> {
        let mut config = self.config()?;
        let active = u32::from(config.active_half & 1);
        let idle = 1 - active;
        let mut meta = self.meta()?;
        if meta.idle_dirty != 0 {
            // A write died after switching: lookups may still read the idle half.
            grace_period();
        }
        let (dirs, ranges) = (self.dirs.fd().as_fd(), self.ranges.fd().as_fd());
        let no_entry = DirEntry { start: 0, count: 0, default: Answer::none() };
        let empty_dir = new_chunk(&vec![no_entry; CHUNK_ENTRIES as usize], "steer_dir")?;
        let empty_ranges = new_chunk::<Range>(&[], "steer_range")?;
        let dir_chunks = generation
            .dir_chunks
            .iter()
            .map(|(&chunk, entries)| Ok((chunk, new_chunk(entries, "steer_dir")?)))
            .collect::<Result<BTreeMap<u32, MapData>>>()?;
        let range_chunks = generation
            .ranges
            .chunks(CHUNK_ENTRIES as usize)
            .map(|entries| new_chunk(entries, "steer_range"))
            .collect::<Result<Vec<_>>>()?;
        // The idle half: the slots this generation needs, and those a killed
        // write left filled (emptied). Recorded first, so a write killed
        // while installing leaves no filled slot unaccounted for.
        let needed = dir_slots_of(dir_chunks.keys().copied());
        let touched = std::array::from_fn(|w| needed[w] | meta.dir_slots[idle as usize][w]);
        let held_ranges = meta.range_slots[idle as usize];
        meta.dir_slots[idle as usize] = touched;
        meta.range_slots[idle as usize] = held_ranges.max(range_chunks.len() as u16);
        self.meta.set(0, meta, 0).context("writing steer_meta")?;
        let (slots, refs): (Vec<u32>, Vec<&MapData>) = dir_chunks_in(&touched)
            .map(|chunk| (idle * DIR_CHUNKS + chunk, dir_chunks.get(&chunk).unwrap_or(&empty_dir)))
            .unzip();
        install(dirs, &slots, &refs)?;
        let mut range_refs: Vec<&MapData> = range_chunks.iter().collect();
        range_refs.resize(range_refs.len().max(held_ranges.into()), &empty_ranges);
        let slots: Vec<u32> = (0..range_refs.len() as u32).map(|i| idle * RANGE_CHUNKS + i).collect();
        install(ranges, &slots, &range_refs)?;
        meta.dir_slots[idle as usize] = needed;
        meta.range_slots[idle as usize] = range_chunks.len() as u16;
        meta.idle_dirty = 1;
        self.meta.set(0, meta, 0).context("writing steer_meta")?;
        config.active_half = idle as u8;
        self.config.set(0, config, 0).context("switching to the new bindings")?;
        grace_period();
        // The old half's chunks are freed as empty ones replace them.
        let slots: Vec<u32> =
            dir_chunks_in(&meta.dir_slots[active as usize]).map(|c| active * DIR_CHUNKS + c).collect();
        install(dirs, &slots, &vec![&empty_dir; slots.len()])?;
        let slots: Vec<u32> =
            (0..u32::from(meta.range_slots[active as usize])).map(|i| active * RANGE_CHUNKS + i).collect();
        install(ranges, &slots, &vec![&empty_ranges; slots.len()])?;
        meta.dir_slots[active as usize] = DirSlots::default();
        meta.range_slots[active as usize] = 0;
        meta.idle_dirty = 0;
        self.meta.set(0, meta, 0).context("writing steer_meta")?;
        let stats = PlaneStats {
            ranges: generation.ranges.len(),
            dir_chunks: generation.dir_chunks.len(),
            range_chunks: generation.range_chunks(),
            chunk_bytes: generation.dir_chunks.len() * chunk_bytes(size_of::<steer_common::DirEntry>())
                + generation.range_chunks() * chunk_bytes(size_of::<steer_common::Range>()),
        };
        Ok(stats)
    }
}
