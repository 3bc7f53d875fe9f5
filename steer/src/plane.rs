//! Publishing a compiled generation so that lookups switch to it at once.
//!
//! `steer_dirs` and `steer_ranges` hold two halves of chunk slots; lookups
//! read the half `steer_config` names. A write fills the idle half with
//! fresh, never-modified chunk maps, switches `active_half` (one byte, so
//! no lookup sees a mix), waits for an RCU grace period so no lookup still
//! runs on the old half, and empties it. Chunks are the only per-binding
//! memory, so the maps grow and shrink with the bindings. `steer_meta`'s
//! `idle_dirty` says when the idle half may still be read (a write died
//! between switching and emptying), so the next write waits first.

use std::{
    num::NonZeroUsize,
    os::fd::{AsFd, BorrowedFd},
};

use aya::{
    Pod,
    maps::{Array, MapData},
};
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};
use steer_common::{
    CHUNK_ENTRIES, DIR_CHUNKS, DataplaneConfig, RANGE_CHUNKS, StateMeta,
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

fn set_slot(outer: BorrowedFd<'_>, slot: u32, inner: &MapData) -> Result<()> {
    use std::os::fd::AsRawFd;
    let fd = inner.fd().as_fd().as_raw_fd() as u32;
    sys::map_update(outer, &slot.to_ne_bytes(), &fd.to_ne_bytes()).with_context(|| format!("installing chunk {slot}"))
}

/// Empties slots `first..first + count` of a map of maps.
fn clear_slots(outer: BorrowedFd<'_>, first: u32, count: u32) -> Result<()> {
    for slot in first..first + count {
        sys::map_delete(outer, &slot.to_ne_bytes()).with_context(|| format!("removing chunk {slot}"))?;
    }
    Ok(())
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
        clear_slots(dirs, idle * DIR_CHUNKS, DIR_CHUNKS)?;
        clear_slots(ranges, idle * RANGE_CHUNKS, RANGE_CHUNKS)?;
        for (&chunk, entries) in &generation.dir_chunks {
            set_slot(dirs, idle * DIR_CHUNKS + chunk, &new_chunk(entries, "steer_dir")?)?;
        }
        for (i, entries) in generation.ranges.chunks(CHUNK_ENTRIES as usize).enumerate() {
            set_slot(ranges, idle * RANGE_CHUNKS + i as u32, &new_chunk(entries, "steer_range")?)?;
        }
        meta.idle_dirty = 1;
        self.meta.set(0, meta, 0).context("writing steer_meta")?;
        config.active_half = idle as u8;
        self.config.set(0, config, 0).context("switching to the new bindings")?;
        grace_period();
        clear_slots(dirs, active * DIR_CHUNKS, DIR_CHUNKS)?;
        clear_slots(ranges, active * RANGE_CHUNKS, RANGE_CHUNKS)?;
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
