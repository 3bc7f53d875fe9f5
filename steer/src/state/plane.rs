//! Publishing compiled bindings so that lookups switch to them at once.
//!
//! `steer_dirs` and `steer_ranges` hold two halves of chunk slots; lookups
//! read the half `steer_config` names (an empty slot reads as no entry).
//! Each half has its own directory chunks; both halves' range slots hold
//! the same range chunks, an arena filled up to `steer_meta.arena_top`.
//!
//! A write of one binding ([`PendingWrite`]) writes the segments it
//! rewrites past the arena's top (no lookup reads there), then changes the
//! directory entries it touches in place, in both halves: a lookup reads
//! an entry as two 8-byte words, (start, count) and the default, and one
//! binding changes one word of each entry it touches, with one store. A
//! lookup reads at most two entries, an exact port's and a bucket's, and
//! one binding is never in both, so each lookup sees the set before the
//! write or after it. No switch and no grace period: work in proportion to
//! the segments touched, not to the bindings. Several bindings at once
//! write the idle half, switch, wait a grace period, then write the other. The old ranges stay in the
//! arena (lookups that read the old entry may still be in them) until it
//! has too much of them; then, and for `load-bindings`, a full
//! publish ([`Plane::publish`]) makes every chunk anew: it fills the idle
//! half's slots with fresh chunk maps, switches `active_half` (one byte),
//! waits for an RCU grace period so no lookup still runs on the old half,
//! and fills the other half's (own directory chunks, the same range
//! chunks), which frees the old
//! ones: memory follows the bindings. The kernel waits for a grace period
//! after every change of a map of maps: where it has batch updates for
//! them, slots change in batches (five grace periods per full publish);
//! elsewhere one per slot changed.
//!
//! Every chunk map is pinned under the state's `chunks/` directory by its
//! id: a write opens the chunks it changes, and the kernel opens a map by
//! id only for CAP_SYS_ADMIN, which writes do not otherwise need. A full
//! publish unpins the chunks it replaced.
//!
//! `steer_meta` records which slots each half fills, so a write touches
//! only those; `idle_dirty` says when the idle half may still be read (a
//! write died between switching and waiting); `halves_differ` says a write
//! died before making both halves the same (or a full publish before
//! filling both), and the next write publishes anew.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use aya::maps::MapData;
use bytemuck::Pod;
use serde::Serialize;
use steer_common::lookup::Tables;

use steer_common::{
    CHUNK_ENTRIES, DIR_CHUNKS, DataplaneConfig, DirEntry, DirSlots, MAX_RANGES, RANGE_CHUNKS, Range, StateMeta, map,
};

use super::{Layout, spec};
use crate::{
    error::{Context, Result},
    kernel::maps::{MapOfMaps, MappedArray, RawMap, filled_array, memlock, mmap_bytes, open_spec},
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
            let mut seen = BTreeSet::new();
            for slot in 0..m.max_entries {
                if let Some(id) = outer.inner_id(slot)? {
                    if seen.insert(id) {
                        bytes += memlock(open_chunk(&layout.chunks_dir(), id)?.fd().as_fd())?;
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

/// The maps lookups read, opened for publishing.
pub struct Plane {
    config: RawMap<u32, DataplaneConfig>,
    meta: RawMap<u32, StateMeta>,
    dirs: MapOfMaps,
    ranges: MapOfMaps,
    /// Where the chunk maps are pinned, each under its id.
    chunks: PathBuf,
}

/// Chunk map `id`, from its pin under `chunks`; by id (CAP_SYS_ADMIN) if
/// it has none there, as a state a write died in may have.
fn open_chunk(chunks: &Path, id: u32) -> Result<MapData> {
    let pin = chunks.join(id.to_string());
    if let Ok(data) = MapData::from_pin(&pin) {
        if data.info()?.id() == id {
            return Ok(data);
        }
        log::warn!("{} is not chunk map {id}; ignoring it", pin.display());
    }
    MapData::from_id(id).map_err(|e| {
        crate::error::Error::Permission(format!(
            "chunk map {id} is not pinned at {}, and opening a map by id needs CAP_SYS_ADMIN ({e}); \
             run this with CAP_SYS_ADMIN (root, or `--cap-add SYS_ADMIN`); the next bind or unbind pins \
             every chunk again",
            pin.display()
        ))
    })
}

/// Pins each of `maps` under its id in `chunks` (made if missing), before
/// any is installed, so a write can always open what lookups read.
fn pin_chunks<'m>(chunks: &Path, maps: impl IntoIterator<Item = &'m MapData>) -> Result<BTreeSet<u32>> {
    match std::fs::symlink_metadata(chunks) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => crate::error::fail!(
            Pin,
            "{} is not a directory; steer pins its chunk maps there: remove it and run `steerctl load-bindings`",
            chunks.display()
        ),
        Err(_) => {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(chunks)
                .with_context(|| format!("making {}", chunks.display()))?;
        }
    }
    let mut ids = BTreeSet::new();
    for map in maps {
        let id = map.info()?.id();
        if ids.insert(id) {
            let pin = chunks.join(id.to_string());
            if !pin.exists() {
                map.pin(&pin)
                    .map_err(crate::error::Error::PinObject)
                    .with_context(|| format!("pinning {}", pin.display()))?;
            }
        }
    }
    Ok(ids)
}

/// Unpins every chunk under `chunks` but those in `keep`: the maps a full
/// publish replaced (and any a killed write pinned but never installed).
fn unpin_chunks_but(chunks: &Path, keep: &BTreeSet<u32>) -> Result<()> {
    for entry in std::fs::read_dir(chunks).with_context(|| format!("listing {}", chunks.display()))? {
        let path = entry?.path();
        let id = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse::<u32>().ok());
        if id.is_some_and(|id| !keep.contains(&id)) {
            std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        }
    }
    Ok(())
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
            chunks: layout.chunks_dir(),
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

    /// Makes `generation` the one lookups use, every chunk made anew.
    pub fn publish(&self, generation: &Generation) -> Result<PlaneStats> {
        let active = u32::from(self.config()?.active_half & 1);
        let idle = 1 - active;
        let mut meta = self.meta()?;
        if meta.idle_dirty != 0 {
            // A write died after switching: lookups may still read the idle half.
            grace_period();
        }
        let no_entry = DirEntry::NONE;
        let empty_dir = new_chunk(&vec![no_entry; CHUNK_ENTRIES as usize], "steer_dir")?;
        let empty_ranges = new_chunk::<Range>(&[], "steer_range")?;
        // Each half writes its own directory chunks in place later: two copies.
        let dir_copies = [0, 1].map(|_| {
            generation
                .dir_chunks
                .iter()
                .map(|(&chunk, entries)| Ok((chunk, new_chunk(entries, "steer_dir")?)))
                .collect::<Result<BTreeMap<u32, MapData>>>()
        });
        let [dirs_idle, dirs_other] = dir_copies;
        let (dirs_idle, dirs_other) = (dirs_idle?, dirs_other?);
        let range_chunks = generation
            .ranges
            .chunks(CHUNK_ENTRIES as usize)
            .map(|entries| new_chunk(entries, "steer_range"))
            .collect::<Result<Vec<_>>>()?;
        let every_chunk = dirs_idle.values().chain(dirs_other.values()).chain(&range_chunks);
        let pinned = pin_chunks(&self.chunks, every_chunk.chain([&empty_dir, &empty_ranges]))?;
        let needed = dir_slots_of(dirs_idle.keys().copied());
        meta.halves_differ = 1;
        self.fill_half(&mut meta, idle, needed, &dirs_idle, &range_chunks, (&empty_dir, &empty_ranges))?;
        meta.idle_dirty = 1;
        self.set_meta(&meta)?;
        self.switch_to(idle)?;
        grace_period();
        meta.idle_dirty = 0;
        self.fill_half(&mut meta, active, needed, &dirs_other, &range_chunks, (&empty_dir, &empty_ranges))?;
        meta.halves_differ = 0;
        meta.arena_top = generation.ranges.len() as u32;
        meta.arena_live = meta.arena_top;
        self.set_meta(&meta)?;
        unpin_chunks_but(&self.chunks, &pinned)?;
        let stats = PlaneStats {
            ranges: generation.ranges.len(),
            dir_chunks: generation.dir_chunks.len(),
            range_chunks: generation.range_chunks(),
            chunk_bytes: 2 * generation.dir_chunks.len() * chunk_bytes(size_of::<steer_common::DirEntry>())
                + generation.range_chunks() * chunk_bytes(size_of::<steer_common::Range>()),
        };
        Ok(stats)
    }

    /// Points half `half`'s slots at `dirs` and `ranges`, and the slots it
    /// filled before that these do not at the empty chunks. The slots are
    /// recorded in `meta` before they change, so a write killed while
    /// installing leaves no filled slot unaccounted for.
    fn fill_half(
        &self,
        meta: &mut StateMeta,
        half: u32,
        needed: DirSlots,
        dirs: &BTreeMap<u32, MapData>,
        ranges: &[MapData],
        (empty_dir, empty_ranges): (&MapData, &MapData),
    ) -> Result<()> {
        let h = half as usize;
        let touched = std::array::from_fn(|w| needed[w] | meta.dir_slots[h][w]);
        let held_ranges = meta.range_slots[h];
        meta.dir_slots[h] = touched;
        meta.range_slots[h] = held_ranges.max(ranges.len() as u16);
        self.set_meta(meta)?;
        let (slots, refs): (Vec<u32>, Vec<&MapData>) = dir_chunks_in(&touched)
            .map(|chunk| (half * DIR_CHUNKS + chunk, dirs.get(&chunk).unwrap_or(empty_dir)))
            .unzip();
        self.dirs.install(&slots, &refs)?;
        let mut range_refs: Vec<&MapData> = ranges.iter().collect();
        range_refs.resize(range_refs.len().max(held_ranges.into()), empty_ranges);
        let slots: Vec<u32> = (0..range_refs.len() as u32).map(|i| half * RANGE_CHUNKS + i).collect();
        self.ranges.install(&slots, &range_refs)?;
        meta.dir_slots[h] = needed;
        meta.range_slots[h] = ranges.len() as u16;
        Ok(())
    }

    /// Makes lookups read half `half` from now on.
    fn switch_to(&self, half: u32) -> Result<()> {
        // Read again: the program may have turned `trace` off meanwhile.
        let mut config = self.config()?;
        config.active_half = half as u8;
        self.config.set(&0, &config).context("switching to the new bindings")
    }

    /// A write of bindings in place, over the published generation: None
    /// when the state does not allow one (a write died half way), and the
    /// caller publishes the whole set anew.
    pub fn begin_write(&self) -> Result<Option<PendingWrite<'_>>> {
        let meta = self.meta()?;
        if meta.halves_differ != 0 || meta.idle_dirty != 0 || meta.range_slots[0] != meta.range_slots[1] {
            return Ok(None);
        }
        let active = u32::from(self.config()?.active_half & 1);
        Ok(Some(PendingWrite {
            plane: self,
            live: LiveTables::new(self),
            active,
            meta,
            entries: BTreeMap::new(),
            ranges: Vec::new(),
            bindings: 0,
        }))
    }

    /// The chunk in `slot` of `outer`, mapped; None where the slot is empty.
    fn mapped_chunk<T: Pod>(&self, outer: &MapOfMaps, slot: u32) -> Result<Option<MappedArray<T>>> {
        match outer.inner_id(slot)? {
            Some(id) => Ok(Some(MappedArray::new(open_chunk(&self.chunks, id)?, CHUNK_ENTRIES)?)),
            None => Ok(None),
        }
    }

    /// The chunk in `slot` of `outer`, which the state says is filled, mapped.
    fn filled_chunk<T: Pod>(&self, outer: &MapOfMaps, slot: u32) -> Result<MappedArray<T>> {
        let Some(chunk) = self.mapped_chunk(outer, slot)? else {
            crate::error::fail!(
                Pin,
                "chunk slot {slot} is empty where the state says it is filled; run a full load-bindings"
            )
        };
        Ok(chunk)
    }

    /// Half `half`'s directory chunks that `entries` land in, mapped: all
    /// opened before any is written, so a chunk that cannot be opened
    /// fails the write before it changes what lookups read.
    fn entry_chunks(
        &self,
        half: u32,
        entries: &BTreeMap<u32, DirEntry>,
    ) -> Result<BTreeMap<u32, MappedArray<DirEntry>>> {
        let numbers: BTreeSet<u32> = entries.keys().map(|key| key / CHUNK_ENTRIES).collect();
        numbers.into_iter().map(|n| Ok((n, self.filled_chunk(&self.dirs, half * DIR_CHUNKS + n)?))).collect()
    }

    /// Writes `entries` (directory key -> entry) into `chunks` (one half's,
    /// from [`Plane::entry_chunks`]), in place: each word that changes with
    /// one store, the new ranges it may point at written (and fenced) before.
    fn write_entries(
        chunks: &BTreeMap<u32, MappedArray<DirEntry>>,
        entries: &BTreeMap<u32, DirEntry>,
        one_binding: bool,
    ) {
        use std::sync::atomic::Ordering::{Acquire, Release};
        for (&key, entry) in entries {
            let target = &chunks[&(key / CHUNK_ENTRIES)];
            let at = (key % CHUNK_ENTRIES) as usize * 2;
            let words = &target.words()[at..at + 2];
            let new = entry.words();
            let changed: Vec<usize> = (0..2).filter(|i| words[*i].load(Acquire) != new[*i]).collect();
            // A change of one binding changes one word of a key: a segment's
            // (start, count), or a bucket's default.
            debug_assert!(!one_binding || changed.len() <= 1, "directory key {key}: both words change");
            for i in changed {
                words[i].store(new[i], Release);
            }
        }
    }
}

/// Changes of bindings applied one after another over the published
/// generation (each sees the ones before), then written in one go by
/// [`PendingWrite::commit`].
pub struct PendingWrite<'a> {
    plane: &'a Plane,
    live: LiveTables<'a>,
    active: u32,
    meta: StateMeta,
    /// Directory entries as the changes leave them.
    entries: BTreeMap<u32, DirEntry>,
    /// Ranges the changes made, to go at the arena's top (some may end up
    /// unused, rewritten by a later change of the same segment).
    ranges: Vec<Range>,
    bindings: usize,
}

impl steer_common::lookup::Tables for PendingWrite<'_> {
    fn dir(&self, _half: u32, key: u32) -> Option<DirEntry> {
        self.entries.get(&key).copied().or_else(|| self.live.dir(self.active, key))
    }

    fn range(&self, _half: u32, index: u32) -> Option<Range> {
        match index.checked_sub(self.meta.arena_top) {
            Some(new) => self.ranges.get(new as usize).copied(),
            None => self.live.range(self.active, index),
        }
    }
}

impl crate::model::compile::SegmentTables for PendingWrite<'_> {
    fn segment(&self, half: u32, entry: &DirEntry) -> Option<Vec<Range>> {
        match entry.start.checked_sub(self.meta.arena_top) {
            Some(new) => self.ranges.get(new as usize..(new + entry.count) as usize).map(<[Range]>::to_vec),
            None => self.live.segment(half, entry),
        }
    }
}

impl PendingWrite<'_> {
    /// Applies `edit` of `binding` (already recorded, its counter sets
    /// made) over what this write holds so far.
    pub fn add(
        &mut self,
        binding: &crate::model::compile::Input,
        edit: crate::model::compile::Edit,
        dests: &mut impl crate::model::compile::Destinations,
    ) -> Result<()> {
        let delta = crate::model::compile::delta(&*self, self.active, binding, edit, dests)?;
        self.live.check()?;
        let no_entry = DirEntry::NONE;
        let mut top = self.meta.arena_top + self.ranges.len() as u32;
        let entries = delta.entries(
            |key| Tables::dir(&*self, self.active, key).unwrap_or(no_entry),
            |count| {
                top += count;
                top - count
            },
        );
        for (_, ranges) in &delta.segments {
            self.ranges.extend_from_slice(ranges);
        }
        self.entries.extend(entries);
        self.bindings += 1;
        Ok(())
    }

    /// Writes what was added, as the module says: one binding in place,
    /// several in the idle half and then one switch. False, having changed
    /// nothing lookups read, when the arena has no room or too much left
    /// over: the caller then publishes the whole set anew.
    pub fn commit(self) -> Result<bool> {
        let PendingWrite { plane, live, active, mut meta, entries, ranges, bindings } = self;
        let idle = 1 - active;
        let no_entry = DirEntry::NONE;
        let released: u32 = entries.keys().map(|k| live.dir(active, *k).unwrap_or(no_entry).count).sum();
        let kept: u32 = entries.values().map(|e| e.count).sum();
        live.check()?;
        drop(live);
        let live_after = (meta.arena_live + kept).saturating_sub(released);
        let top_after = meta.arena_top + ranges.len() as u32;
        if top_after > MAX_RANGES || top_after - live_after > live_after / 4 + 8 * CHUNK_ENTRIES {
            return Ok(false);
        }
        // Room in the arena: new chunks in both halves' slots at once.
        let have = u32::from(meta.range_slots[0]);
        let want = top_after.div_ceil(CHUNK_ENTRIES).max(have);
        if want > have {
            meta.range_slots = [want as u16; 2];
            plane.set_meta(&meta)?;
            let fresh = (have..want).map(|_| new_chunk::<Range>(&[], "steer_range")).collect::<Result<Vec<_>>>()?;
            let slots: Vec<u32> =
                [0, RANGE_CHUNKS].iter().flat_map(|base| (have..want).map(move |i| base + i)).collect();
            let refs: Vec<&MapData> = fresh.iter().chain(fresh.iter()).collect();
            pin_chunks(&plane.chunks, &fresh)?;
            plane.ranges.install(&slots, &refs)?;
        }
        // Directory chunks of their own in both halves where an entry lands.
        let chunks: std::collections::BTreeSet<u32> = entries.keys().map(|key| key / CHUNK_ENTRIES).collect();
        let missing: Vec<u32> = chunks.iter().copied().filter(|c| !has_bit(&meta.dir_slots[0], *c)).collect();
        if missing.iter().any(|c| has_bit(&meta.dir_slots[1], *c)) {
            return Ok(false);
        }
        if !missing.is_empty() {
            let bits = dir_slots_of(missing.iter().copied());
            for half in &mut meta.dir_slots {
                *half = std::array::from_fn(|w| half[w] | bits[w]);
            }
            plane.set_meta(&meta)?;
            let fresh = missing
                .iter()
                .flat_map(|_| [0, 1])
                .map(|_| new_chunk(&vec![no_entry; CHUNK_ENTRIES as usize], "steer_dir"))
                .collect::<Result<Vec<_>>>()?;
            let slots: Vec<u32> = missing.iter().flat_map(|c| [*c, DIR_CHUNKS + c]).collect();
            pin_chunks(&plane.chunks, &fresh)?;
            plane.dirs.install(&slots, &fresh.iter().collect::<Vec<_>>())?;
        }
        // The new segments, past the top: nothing reads there yet.
        let mut at = meta.arena_top;
        let mut chunk_maps: BTreeMap<u32, MappedArray<Range>> = BTreeMap::new();
        let mut rest: &[Range] = &ranges;
        while !rest.is_empty() {
            let chunk = at / CHUNK_ENTRIES;
            let offset = (at % CHUNK_ENTRIES) as usize;
            let n = rest.len().min(CHUNK_ENTRIES as usize - offset);
            let target = match chunk_maps.entry(chunk) {
                std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::btree_map::Entry::Vacant(e) => e.insert(plane.filled_chunk(&plane.ranges, chunk)?),
            };
            target.write(offset, &rest[..n]);
            rest = &rest[n..];
            at += n as u32;
        }
        let (active_chunks, idle_chunks) = (plane.entry_chunks(active, &entries)?, plane.entry_chunks(idle, &entries)?);
        meta.halves_differ = 1;
        meta.arena_top = top_after;
        plane.set_meta(&meta)?;
        if bindings <= 1 {
            // One binding: in place in both halves, the read one first.
            Plane::write_entries(&active_chunks, &entries, true);
            Plane::write_entries(&idle_chunks, &entries, true);
        } else {
            // Several: the idle half, one switch, a grace period, the other.
            Plane::write_entries(&idle_chunks, &entries, false);
            plane.switch_to(idle)?;
            grace_period();
            Plane::write_entries(&active_chunks, &entries, false);
        }
        meta.halves_differ = 0;
        meta.arena_live = live_after;
        plane.set_meta(&meta)?;
        Ok(true)
    }
}

fn has_bit(bits: &DirSlots, chunk: u32) -> bool {
    bits[chunk as usize / 64] >> (chunk % 64) & 1 != 0
}

/// The generation lookups use now, read from the kernel's chunks through
/// mmap: the tables steer_dispatch searches, for userspace to search the
/// same way (explain) and for a write to read the segments it changes.
/// A chunk that cannot be opened reads as empty, and [`LiveTables::check`]
/// then fails: what was read is not the published generation.
pub struct LiveTables<'a> {
    plane: &'a Plane,
    dirs: RefCell<BTreeMap<u32, Option<MappedArray<DirEntry>>>>,
    ranges: RefCell<BTreeMap<u32, Option<MappedArray<Range>>>>,
    failure: RefCell<Option<crate::error::Error>>,
}

impl<'a> LiveTables<'a> {
    pub fn new(plane: &'a Plane) -> Self {
        Self { plane, dirs: Default::default(), ranges: Default::default(), failure: Default::default() }
    }

    /// Fails with the first chunk that could not be opened, if any.
    pub fn check(&self) -> Result<()> {
        self.failure.take().map_or(Ok(()), Err)
    }

    /// The chunk in `slot` of `outer`, from `cache` or mapped into it.
    fn chunk<'c, T: Pod>(
        &self,
        outer: &MapOfMaps,
        cache: &'c mut BTreeMap<u32, Option<MappedArray<T>>>,
        slot: u32,
    ) -> Option<&'c MappedArray<T>> {
        cache
            .entry(slot)
            .or_insert_with(|| {
                self.plane.mapped_chunk(outer, slot).unwrap_or_else(|e| {
                    self.failure.borrow_mut().get_or_insert(e);
                    None
                })
            })
            .as_ref()
    }
}

impl crate::model::compile::SegmentTables for LiveTables<'_> {
    fn segment(&self, half: u32, entry: &DirEntry) -> Option<Vec<Range>> {
        let mut out = Vec::with_capacity(entry.count as usize);
        let (mut at, end) = (entry.start, entry.start + entry.count);
        while at < end {
            let slot = steer_common::range_slot(half, at);
            let offset = (at % CHUNK_ENTRIES) as usize;
            let n = ((end - at) as usize).min(CHUNK_ENTRIES as usize - offset);
            let mut cache = self.ranges.borrow_mut();
            let chunk = self.chunk(&self.plane.ranges, &mut cache, slot)?;
            out.extend_from_slice(&chunk.as_slice()[offset..offset + n]);
            at += n as u32;
        }
        Some(out)
    }
}

impl steer_common::lookup::Tables for LiveTables<'_> {
    fn dir(&self, half: u32, key: u32) -> Option<DirEntry> {
        let mut cache = self.dirs.borrow_mut();
        let chunk = self.chunk(&self.plane.dirs, &mut cache, steer_common::dir_slot(half, key))?;
        Some(chunk.as_slice()[(key % CHUNK_ENTRIES) as usize])
    }

    fn range(&self, half: u32, index: u32) -> Option<Range> {
        let mut cache = self.ranges.borrow_mut();
        let chunk = self.chunk(&self.plane.ranges, &mut cache, steer_common::range_slot(half, index))?;
        Some(chunk.as_slice()[(index % CHUNK_ENTRIES) as usize])
    }
}
