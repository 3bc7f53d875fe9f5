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
//! updates for them, slots change in batches (five grace periods per write
//! whatever its size: four batches and the wait after the switch);
//! elsewhere one per slot changed. `idle_dirty` says
//! when the idle half may still be read (a write died between switching and
//! emptying), so the next write waits first.

use std::{cell::RefCell, collections::BTreeMap};

use aya::maps::MapData;
use bytemuck::Pod;
use serde::Serialize;
use steer_common::{
    Answer, CHUNK_ENTRIES, DIR_CHUNKS, DataplaneConfig, DirEntry, DirSlots, RANGE_CHUNKS, Range, StateMeta, map,
};

use super::{Layout, spec};
use crate::{
    error::{Context, Result},
    kernel::maps::{MapOfMaps, RawMap, filled_array, memlock, mmap_bytes, open_spec},
    model::compile::Generation,
};

/// State of the published bindings.
#[derive(Debug, Clone, Serialize)]
pub struct PlaneStatus {
    /// False when a write was interrupted between recording and publishing
    /// bindings: lookups still use the previous set until the next write.
    pub up_to_date: bool,
    pub seed_list_enabled: bool,
    /// `steer_config.trace`: lookups look for tracers (until the next
    /// lookup finds none live).
    pub tracing: bool,
}

/// Sizes of the published generation.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct PlaneStats {
    pub ranges: usize,
    pub dir_chunks: usize,
    pub range_chunks: usize,
    /// Bytes of map memory the chunks take.
    pub chunk_bytes: usize,
}

/// Kernel memory of every pinned map, the chunk maps of maps of maps
/// included (each chunk once, however many slots share it).
pub fn memory(layout: &Layout) -> Result<BTreeMap<&'static str, u64>> {
    use std::os::fd::AsFd;
    let mut out = BTreeMap::new();
    for m in steer_common::MAPS {
        let mut bytes;
        if m.inner.is_some() {
            let outer = MapOfMaps::open(&layout.map(m.name), m)?;
            bytes = memlock(outer.fd())?;
            let mut seen = std::collections::BTreeSet::new();
            for slot in 0..m.max_entries {
                if let Some(id) = outer.inner_id(slot)? {
                    if seen.insert(id) {
                        bytes += memlock(MapData::from_id(id)?.fd().as_fd())?;
                    }
                }
            }
        } else {
            bytes = memlock(open_spec(&layout.map(m.name), m)?.fd().as_fd())?;
        }
        out.insert(m.name, bytes);
    }
    Ok(out)
}

/// The generation lookups use now, read from the kernel's chunks: the
/// tables steer_dispatch searches, for userspace to search the same way.
pub struct LiveTables {
    dirs: MapOfMaps,
    ranges: MapOfMaps,
    dir_chunks: RefCell<BTreeMap<u32, Option<RawMap<u32, DirEntry>>>>,
    range_chunks: RefCell<BTreeMap<u32, Option<RawMap<u32, Range>>>>,
}

/// Entry `index` of the chunk in `slot` of `outer`, opening the chunk once.
fn chunk_entry<T: Pod>(
    outer: &MapOfMaps,
    cache: &RefCell<BTreeMap<u32, Option<RawMap<u32, T>>>>,
    slot: u32,
    index: u32,
) -> Option<T> {
    let mut cache = cache.borrow_mut();
    let chunk = cache.entry(slot).or_insert_with(|| RawMap::new(outer.inner(slot).ok()??).ok());
    chunk.as_ref()?.get(&index).ok().flatten()
}

impl LiveTables {
    pub fn open(layout: &Layout) -> Result<Self> {
        Ok(Self {
            dirs: MapOfMaps::open(&layout.map(map::STEER_DIRS), spec(map::STEER_DIRS))?,
            ranges: MapOfMaps::open(&layout.map(map::STEER_RANGES), spec(map::STEER_RANGES))?,
            dir_chunks: Default::default(),
            range_chunks: Default::default(),
        })
    }
}

impl steer_common::lookup::Tables for LiveTables {
    fn dir(&self, half: u32, key: u32) -> Option<DirEntry> {
        chunk_entry(&self.dirs, &self.dir_chunks, steer_common::dir_slot(half, key), key % CHUNK_ENTRIES)
    }

    fn range(&self, half: u32, index: u32) -> Option<Range> {
        chunk_entry(&self.ranges, &self.range_chunks, steer_common::range_slot(half, index), index % CHUNK_ENTRIES)
    }
}

/// The maps lookups read, opened for publishing.
pub struct Plane {
    config: RawMap<u32, DataplaneConfig>,
    meta: RawMap<u32, StateMeta>,
    dirs: MapOfMaps,
    ranges: MapOfMaps,
}

fn chunk_bytes(value_size: usize) -> usize {
    mmap_bytes(CHUNK_ENTRIES, value_size)
}

/// A new chunk map holding `entries` (at most CHUNK_ENTRIES; the rest zero).
fn new_chunk<T: Pod>(entries: &[T], name: &str) -> Result<MapData> {
    filled_array(entries, CHUNK_ENTRIES, name)
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
pub(crate) fn grace_period() {
    if rustix::thread::membarrier(rustix::thread::MembarrierCommand::Global).is_err() {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

impl Plane {
    pub fn open(layout: &Layout) -> Result<Self> {
        let path = |name| layout.map(name);
        Ok(Self {
            config: RawMap::open(&path(map::STEER_CONFIG), spec(map::STEER_CONFIG))?,
            meta: RawMap::open(&path(map::STEER_META), spec(map::STEER_META))?,
            dirs: MapOfMaps::open(&path(map::STEER_DIRS), spec(map::STEER_DIRS))?,
            ranges: MapOfMaps::open(&path(map::STEER_RANGES), spec(map::STEER_RANGES))?,
        })
    }

    pub fn config(&self) -> Result<DataplaneConfig> {
        Ok(self.config.get(&0)?.unwrap_or_default())
    }

    pub fn meta(&self) -> Result<StateMeta> {
        Ok(self.meta.get(&0)?.unwrap_or_default())
    }

    pub fn set_meta(&self, meta: &StateMeta) -> Result<()> {
        self.meta.set(&0, meta).context("writing steer_meta")
    }

    /// Turns the seed list on or off (one byte of `steer_config`).
    pub fn set_seed(&self, enabled: bool) -> Result<()> {
        let mut config = self.config()?;
        config.seed_enabled = u8::from(enabled);
        self.config.set(&0, &config).context("writing steer_config")
    }

    /// Turns tracing on or off (one byte of `steer_config`; the program
    /// turns it off itself when it finds no live tracer).
    pub fn set_trace(&self, enabled: bool) -> Result<()> {
        let mut config = self.config()?;
        config.trace = u8::from(enabled);
        self.config.set(&0, &config).context("writing steer_config")
    }

    /// Makes `generation` the one lookups use.
    pub fn publish(&self, generation: &Generation) -> Result<PlaneStats> {
        let active = u32::from(self.config()?.active_half & 1);
        let idle = 1 - active;
        let mut meta = self.meta()?;
        if meta.idle_dirty != 0 {
            // A write died after switching: lookups may still read the idle half.
            grace_period();
        }
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
        self.set_meta(&meta)?;
        let (slots, refs): (Vec<u32>, Vec<&MapData>) = dir_chunks_in(&touched)
            .map(|chunk| (idle * DIR_CHUNKS + chunk, dir_chunks.get(&chunk).unwrap_or(&empty_dir)))
            .unzip();
        self.dirs.install(&slots, &refs)?;
        let mut range_refs: Vec<&MapData> = range_chunks.iter().collect();
        range_refs.resize(range_refs.len().max(held_ranges.into()), &empty_ranges);
        let slots: Vec<u32> = (0..range_refs.len() as u32).map(|i| idle * RANGE_CHUNKS + i).collect();
        self.ranges.install(&slots, &range_refs)?;
        meta.dir_slots[idle as usize] = needed;
        meta.range_slots[idle as usize] = range_chunks.len() as u16;
        meta.idle_dirty = 1;
        self.set_meta(&meta)?;
        // Read again: the program may have turned `trace` off meanwhile.
        let mut config = self.config()?;
        config.active_half = idle as u8;
        self.config.set(&0, &config).context("switching to the new bindings")?;
        grace_period();
        // The old half's chunks are freed as empty ones replace them.
        let slots: Vec<u32> =
            dir_chunks_in(&meta.dir_slots[active as usize]).map(|c| active * DIR_CHUNKS + c).collect();
        self.dirs.install(&slots, &vec![&empty_dir; slots.len()])?;
        let slots: Vec<u32> =
            (0..u32::from(meta.range_slots[active as usize])).map(|i| active * RANGE_CHUNKS + i).collect();
        self.ranges.install(&slots, &vec![&empty_ranges; slots.len()])?;
        meta.dir_slots[active as usize] = DirSlots::default();
        meta.range_slots[active as usize] = 0;
        meta.idle_dirty = 0;
        self.set_meta(&meta)?;
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
