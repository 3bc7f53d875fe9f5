//! Publishing a compiled generation so that lookups switch to it at once.
//!
//! `steer_dirs` and `steer_ranges` hold two halves of chunk slots; lookups
//! read the half `steer_config` names. A write fills the idle half with
//! fresh, never-modified chunk maps (slots it does not need get a shared
//! empty chunk), switches `active_half` (one byte, so no lookup sees a mix),
//! waits for an RCU grace period so no lookup still runs on the old half,
//! and replaces the old half's chunks with the empty one, which frees them:
//! memory follows the bindings. The kernel waits for a grace period after
//! every change of a map of maps, so slots change in batches: three grace
//! periods per write whatever its size. `steer_meta`'s `idle_dirty` says
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
    Answer, CHUNK_ENTRIES, DIR_CHUNKS, DataplaneConfig, DirEntry, RANGE_CHUNKS, Range, StateMeta,
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

/// Points slots `first..` of a map of maps at `chunks`, in one batch where
/// the kernel has batch updates for maps of maps, slot by slot otherwise.
fn install(outer: BorrowedFd<'_>, first: u32, chunks: &[&MapData]) -> Result<()> {
    use std::os::fd::AsRawFd;
    let keys: Vec<u8> = (first..first + chunks.len() as u32).flat_map(u32::to_ne_bytes).collect();
    let fds: Vec<u8> = chunks.iter().flat_map(|c| (c.fd().as_fd().as_raw_fd() as u32).to_ne_bytes()).collect();
    match sys::map_update_batch(outer, &keys, &fds, chunks.len() as u32) {
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
        // The idle half: every directory slot (absent chunks empty), and the
        // range slots this generation needs or the half held before.
        let mut dir_chunks = Vec::with_capacity(DIR_CHUNKS as usize);
        for chunk in 0..DIR_CHUNKS {
            dir_chunks.push(match generation.dir_chunks.get(&chunk) {
                Some(entries) => Some(new_chunk(entries, "steer_dir")?),
                None => None,
            });
        }
        let dir_refs: Vec<&MapData> = dir_chunks.iter().map(|c| c.as_ref().unwrap_or(&empty_dir)).collect();
        install(dirs, idle * DIR_CHUNKS, &dir_refs)?;
        let range_chunks = generation
            .ranges
            .chunks(CHUNK_ENTRIES as usize)
            .map(|entries| new_chunk(entries, "steer_range"))
            .collect::<Result<Vec<_>>>()?;
        // Empty chunks also replace what a killed write may have left.
        let held = usize::from(meta.range_slots[idle as usize]).max(usize::from(meta.range_slots[active as usize]));
        let mut range_refs: Vec<&MapData> = range_chunks.iter().collect();
        range_refs.resize(range_refs.len().max(held), &empty_ranges);
        install(ranges, idle * RANGE_CHUNKS, &range_refs)?;
        meta.range_slots[idle as usize] = range_chunks.len() as u16;
        meta.idle_dirty = 1;
        self.meta.set(0, meta, 0).context("writing steer_meta")?;
        config.active_half = idle as u8;
        self.config.set(0, config, 0).context("switching to the new bindings")?;
        grace_period();
        // The old half's chunks are freed as empty ones replace them.
        install(dirs, active * DIR_CHUNKS, &vec![&empty_dir; DIR_CHUNKS as usize])?;
        let old = usize::from(meta.range_slots[active as usize]);
        if old > 0 {
            install(ranges, active * RANGE_CHUNKS, &vec![&empty_ranges; old])?;
        }
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
