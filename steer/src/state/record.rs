//! The record of bindings: `bindings_0`/`bindings_1`, hash maps of
//! BindingKey -> label id that only userspace reads. `steer_meta` names the
//! set in use (`active_record`); `load-bindings` fills the other one and
//! switches with one write.
//!
//! The version protocol: every change of the record bumps `record_version`
//! *before* it touches the record, and publishing sets `plane_version` to
//! it after the generation is live. A write killed in between leaves the
//! two unequal; `status` says so and the next write publishes the record
//! first ([`Record::interrupted`]).

use std::cell::RefCell;

use steer_common::{BindingKey, MAX_BINDINGS, RECORD_INITIAL_CAPACITY, StateMeta, map};

use super::{Layout, plane::Plane, spec};
use crate::{
    error::{Context, Result, fail},
    kernel::maps::{RawMap, new_hash},
    model::text::grouped,
};

pub struct Record {
    sets: RefCell<[RawMap<BindingKey, u32>; 2]>,
    layout: Layout,
}

const NAMES: [&str; 2] = [map::BINDINGS_0, map::BINDINGS_1];

/// The set `meta` says is in use.
fn active(meta: &StateMeta) -> usize {
    (meta.active_record & 1) as usize
}

/// A record capacity with room to grow for `count` bindings.
pub fn capacity_for(count: usize) -> u32 {
    (count.saturating_mul(2).min(MAX_BINDINGS as usize).next_power_of_two() as u32)
        .clamp(RECORD_INITIAL_CAPACITY, MAX_BINDINGS)
}

impl Record {
    pub fn open(layout: &Layout) -> Result<Self> {
        let open = |name| RawMap::open(&layout.map(name), spec(name));
        Ok(Self { sets: RefCell::new([open(NAMES[0])?, open(NAMES[1])?]), layout: layout.clone() })
    }

    /// Every binding of the set in use.
    pub fn entries(&self, meta: &StateMeta) -> Result<Vec<(BindingKey, u32)>> {
        self.sets.borrow()[active(meta)].entries().context("reading the binding record")
    }

    pub fn get(&self, meta: &StateMeta, key: &BindingKey) -> Result<Option<u32>> {
        self.sets.borrow()[active(meta)].get(key)
    }

    /// Adds a binding to the set in use, moving it to a larger map when
    /// full: then returns every binding (it read them all).
    pub fn insert(&self, meta: &StateMeta, key: BindingKey, label: u32) -> Result<Option<Vec<(BindingKey, u32)>>> {
        let index = active(meta);
        let inserted = self.sets.borrow()[index].set(&key, &label);
        match inserted {
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                let mut entries = self.entries(meta)?;
                if entries.len() >= MAX_BINDINGS as usize {
                    fail!(Full, "bindings map full ({} entries)", grouped(MAX_BINDINGS.into()));
                }
                entries.push((key, label));
                self.replace(index, capacity_for(entries.len()), &entries)?;
                Ok(Some(entries))
            }
            other => other.context("adding the binding").map(|()| None),
        }
    }

    pub fn remove(&self, meta: &StateMeta, key: &BindingKey) -> Result<bool> {
        self.sets.borrow()[active(meta)].remove(key)
    }

    /// Makes set `index` a new map holding `entries`, with room for
    /// `capacity`: made, filled, then pinned over `bindings_N` in one
    /// rename, so a write killed half way leaves the old set whole.
    pub fn replace(&self, index: usize, capacity: u32, entries: &[(BindingKey, u32)]) -> Result<()> {
        let name = NAMES[index];
        let set: RawMap<BindingKey, u32> = new_hash(spec(name), capacity)?;
        for (key, label) in entries {
            set.set(key, label).context("recording the bindings")?;
        }
        let staged = self.layout.dir.join(format!("{name}_next"));
        let _ = std::fs::remove_file(&staged);
        set.data().pin(&staged).context("pinning a binding record")?;
        std::fs::rename(&staged, self.layout.map(name)).context("replacing a binding record")?;
        self.sets.borrow_mut()[index] = set;
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
    fn capacities_double_and_stay_in_range() {
        assert_eq!(capacity_for(0), RECORD_INITIAL_CAPACITY);
        assert_eq!(capacity_for(1025), 4096);
        assert_eq!(capacity_for(MAX_BINDINGS as usize), MAX_BINDINGS);
        assert_eq!(capacity_for(usize::MAX), MAX_BINDINGS);
    }
}
