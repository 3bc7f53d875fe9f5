//! The record of bindings: `bindings_0`/`bindings_1`, each an
//! open-addressed hash table of [`RecordSlot`]s in an mmapable array that
//! only userspace reads (24 bytes a slot, at most 7/8 full: about 30 bytes
//! a binding). `steer_meta` names the set in use (`active_record`);
//! `load-bindings` fills the other one and switches with one write.
//!
//! The table is part of the layout: a key's first slot is
//! [`first_slot`] of its bytes, probing goes on slot by slot (wrapping),
//! an empty slot ends a search, a removed one does not. A slot is written
//! key first and label last, each label with one 4-byte store, so a write
//! killed half way leaves a slot empty, not half made. A set is made anew,
//! larger or without its removed slots, when a binding would fill it past
//! 7/8: made, filled, then pinned over `bindings_N` in one rename.
//!
//! The version protocol: every change of the record bumps `record_version`
//! *before* it touches the record, and publishing sets `plane_version` to
//! it after the generation is live. A write killed in between leaves the
//! two unequal; `status` says so and the next write publishes the record
//! first ([`Record::interrupted`]).

use std::{
    cell::RefCell,
    sync::atomic::Ordering::{Acquire, Release},
};

use steer_common::{BindingKey, MAX_BINDINGS, MAX_RECORD_SLOTS, RECORD_INITIAL_CAPACITY, RecordSlot, StateMeta, map};

use super::{Layout, plane::Plane, spec};
use crate::{
    error::{Context, Result, fail},
    kernel::maps::{MappedArray, open_spec},
    model::text::grouped,
};

pub struct Record {
    sets: RefCell<[Option<MappedArray<RecordSlot>>; 2]>,
    layout: Layout,
}

const NAMES: [&str; 2] = [map::BINDINGS_0, map::BINDINGS_1];

/// The set `meta` says is in use.
fn active(meta: &StateMeta) -> usize {
    (meta.active_record & 1) as usize
}

/// Slots for a set of `count` bindings: a third more (whole 1,024s), so
/// that it fills to 7/8 only after growing by a sixth.
pub fn capacity_for(count: usize) -> u32 {
    let slots = (count.saturating_mul(4) / 3).div_ceil(1024).saturating_mul(1024);
    slots.clamp(RECORD_INITIAL_CAPACITY as usize, MAX_RECORD_SLOTS as usize) as u32
}

/// Where the search for `key` starts in a table of `slots` slots: a fixed
/// mix of its 20 bytes (little-endian words), scaled to the table.
pub fn first_slot(key: &BindingKey, slots: u32) -> u32 {
    let bytes = bytemuck::bytes_of(key);
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let last = u64::from(u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")));
    // splitmix64's finalizer after each word.
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let h = [word(0), word(8), last].into_iter().fold(0x9e37_79b9_7f4a_7c15, |h, w| mix(h ^ w));
    ((u128::from(h) * u128::from(slots)) >> 64) as u32
}

/// What [`Record::insert`] did.
pub enum Inserted {
    /// Into a slot; `reused` when it was a removed one.
    Slot { reused: bool },
    /// The set was made anew (larger, or without removed slots): here is
    /// every binding it holds, which the caller publishes.
    Remade(Vec<(BindingKey, u32)>),
}

/// Where `key` is in `slots`, or the slot a new key would take (the first
/// removed one on the way, else the empty one that ends the search); None
/// when the table has neither (full of removed slots).
fn probe(slots: &MappedArray<RecordSlot>, key: &BindingKey) -> (Option<usize>, Option<usize>) {
    let n = slots.len();
    let labels = slots.words32();
    let all = slots.as_slice();
    let mut free = None;
    let mut at = first_slot(key, n as u32) as usize;
    for _ in 0..n {
        // The label is the slot's last word: 6 words a slot.
        match labels[at * 6 + 5].load(Acquire) {
            RecordSlot::EMPTY => return (None, free.or(Some(at))),
            RecordSlot::REMOVED => {
                free.get_or_insert(at);
            }
            _ if all[at].key == *key => return (Some(at), free),
            _ => {}
        }
        at = (at + 1) % n;
    }
    (None, free)
}

impl Record {
    pub fn open(layout: &Layout) -> Result<Self> {
        Ok(Self { sets: RefCell::new([None, None]), layout: layout.clone() })
    }

    fn with_set<T>(&self, index: usize, f: impl FnOnce(&MappedArray<RecordSlot>) -> T) -> Result<T> {
        let mut sets = self.sets.borrow_mut();
        if sets[index].is_none() {
            let data = open_spec(&self.layout.map(NAMES[index]), spec(NAMES[index]))
                .with_context(|| format!("opening {}", NAMES[index]))?;
            let slots = data.info()?.max_entries();
            sets[index] = Some(MappedArray::new(data, slots)?);
        }
        Ok(f(sets[index].as_ref().expect("set above")))
    }

    /// Every binding of the set in use.
    pub fn entries(&self, meta: &StateMeta) -> Result<Vec<(BindingKey, u32)>> {
        self.with_set(active(meta), |set| {
            set.as_slice()
                .iter()
                .filter(|s| s.label != RecordSlot::EMPTY && s.label != RecordSlot::REMOVED)
                .map(|s| (s.key, s.label - 1))
                .collect()
        })
    }

    pub fn get(&self, meta: &StateMeta, key: &BindingKey) -> Result<Option<u32>> {
        self.with_set(active(meta), |set| probe(set, key).0.map(|at| set.as_slice()[at].label - 1))
    }

    /// Adds a binding (not recorded yet) to the set in use; makes the set
    /// anew when it would fill past 7/8 (`meta` counts what it holds).
    pub fn insert(&self, meta: &StateMeta, key: BindingKey, label: u32) -> Result<Inserted> {
        let index = active(meta);
        let (slots, (found, free)) = self.with_set(index, |set| (set.len(), probe(set, &key)))?;
        if found.is_some() {
            fail!(Conflict, "the record holds this binding already");
        }
        let filled = meta.bindings as usize + meta.record_removed as usize + 1;
        match free {
            Some(at) if filled <= slots / 8 * 7 => {
                self.with_set(index, |set| {
                    let reused = set.words32()[at * 6 + 5].load(Acquire) == RecordSlot::REMOVED;
                    let words = set.words32();
                    let mut key_words = [0u32; 5];
                    bytemuck::bytes_of_mut(&mut key_words).copy_from_slice(bytemuck::bytes_of(&key));
                    for (i, w) in key_words.iter().enumerate() {
                        words[at * 6 + i].store(*w, Release);
                    }
                    // Last: the slot holds the binding from this store on.
                    words[at * 6 + 5].store(label + 1, Release);
                    Inserted::Slot { reused }
                })
            }
            _ => {
                let mut entries = self.entries(meta)?;
                if entries.len() >= MAX_BINDINGS as usize {
                    fail!(Full, "bindings map full ({} entries)", grouped(MAX_BINDINGS.into()));
                }
                entries.push((key, label));
                self.replace(index, capacity_for(entries.len()), &entries)?;
                Ok(Inserted::Remade(entries))
            }
        }
    }

    /// Removes a binding from the set in use; false when it was not there.
    pub fn remove(&self, meta: &StateMeta, key: &BindingKey) -> Result<bool> {
        self.with_set(active(meta), |set| match probe(set, key).0 {
            Some(at) => {
                set.words32()[at * 6 + 5].store(RecordSlot::REMOVED, Release);
                true
            }
            None => false,
        })
    }

    /// Makes set `index` a new table holding `entries` (distinct keys),
    /// with `capacity` slots: made, filled, then pinned over `bindings_N`
    /// in one rename, so a write killed half way leaves the old set whole.
    pub fn replace(&self, index: usize, capacity: u32, entries: &[(BindingKey, u32)]) -> Result<()> {
        let name = NAMES[index];
        assert!(entries.len() <= capacity as usize / 8 * 7 || entries.is_empty(), "a record made too small");
        let mut set = MappedArray::<RecordSlot>::create(&[], capacity, name)?;
        let mut slots = vec![RecordSlot::default(); capacity as usize];
        for (key, label) in entries {
            let mut at = first_slot(key, capacity) as usize;
            while slots[at].label != RecordSlot::EMPTY {
                at = (at + 1) % slots.len();
            }
            slots[at] = RecordSlot { key: *key, label: label + 1 };
        }
        set.write(0, &slots);
        drop(slots);
        let staged = self.layout.dir.join(format!("{name}_next"));
        let _ = std::fs::remove_file(&staged);
        set.map().pin(&staged).context("pinning a binding record")?;
        std::fs::rename(&staged, self.layout.map(name)).context("replacing a binding record")?;
        self.sets.borrow_mut()[index] = Some(set);
        Ok(())
    }

    /// Whether a write died between changing the record and publishing it.
    pub fn interrupted(meta: &StateMeta) -> bool {
        meta.plane_version != meta.record_version
    }

    /// Marks the record as changing: bumped before the change, so a write
    /// killed after it is seen as unpublished. Returns the new meta.
    pub fn begin_change(plane: &Plane, meta: &StateMeta) -> Result<StateMeta> {
        let meta = StateMeta { record_version: meta.record_version + 1, ..*meta };
        plane.set_meta(&meta)?;
        Ok(meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_leave_room_and_stay_in_range() {
        assert_eq!(capacity_for(0), RECORD_INITIAL_CAPACITY);
        assert_eq!(capacity_for(1025), 2048);
        assert!(capacity_for(MAX_BINDINGS as usize) as usize / 8 * 7 >= MAX_BINDINGS as usize);
        assert_eq!(capacity_for(MAX_BINDINGS as usize), MAX_RECORD_SLOTS);
        assert_eq!(capacity_for(usize::MAX), MAX_RECORD_SLOTS);
        for n in [1, 100, 1000, 5000, 100_000] {
            assert!(capacity_for(n) as usize / 8 * 7 > n, "{n}");
        }
    }

    #[test]
    fn first_slots_are_fixed_and_spread() {
        // Part of the layout: these must never change.
        let key = BindingKey::new(6, 128, 80, [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(first_slot(&key, 1 << 20), first_slot(&key, 1 << 20));
        assert_eq!(first_slot(&BindingKey::default(), 1024), 207);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..1000u32 {
            let mut addr = [0u8; 16];
            addr[12..].copy_from_slice(&i.to_be_bytes());
            seen.insert(first_slot(&BindingKey::new(6, 128, 0, addr), 4096) / 16);
        }
        assert!(seen.len() > 200, "{} of 256 blocks of slots used", seen.len());
    }
}
