//! Label ids: `labels` maps a label's name to its id (0..MAX_LABELS), which
//! bindings, socket slots and counter sets refer to. Ids are allocated
//! lowest-free and freed when a label has neither bindings nor sockets.

use std::collections::{BTreeMap, BTreeSet};

use steer_common::{LabelName, MAX_LABELS, map};

use super::{Layout, spec};
use crate::{
    error::{Result, fail},
    kernel::maps::RawMap,
    model::label::{label_from_key, label_key},
};

pub struct Labels {
    map: RawMap<LabelName, u32>,
}

impl Labels {
    pub fn open(layout: &Layout) -> Result<Self> {
        Ok(Self { map: RawMap::open(&layout.map(map::LABELS), spec(map::LABELS))? })
    }

    /// Name -> id.
    pub fn all(&self) -> Result<BTreeMap<String, u32>> {
        Ok(self.map.entries()?.into_iter().map(|(name, id)| (label_from_key(&name), id)).collect())
    }

    /// Id -> name.
    pub fn names(&self) -> Result<BTreeMap<u32, String>> {
        Ok(self.all()?.into_iter().map(|(name, id)| (id, name)).collect())
    }

    pub fn id(&self, label: &str) -> Result<Option<u32>> {
        self.map.get(&label_key(label)?)
    }

    /// The ids `names` would get: existing ones, and for the missing ones
    /// the lowest free. Fails (changing nothing) when too few are free.
    pub fn plan<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, (u32, bool)>> {
        let existing = self.all()?;
        let taken: BTreeSet<u32> = existing.values().copied().collect();
        let mut free = (0..MAX_LABELS).filter(|id| !taken.contains(id));
        let mut out = BTreeMap::new();
        for name in names {
            if out.contains_key(name) {
                continue;
            }
            label_key(name)?;
            let entry = match existing.get(name) {
                Some(&id) => (id, false),
                None => match free.next() {
                    Some(id) => (id, true),
                    None => fail!(
                        Full,
                        "all {MAX_LABELS} labels are in use ({} exist); this needs {} more",
                        existing.len(),
                        out.values().filter(|(_, new)| *new).count() + 1
                    ),
                },
            };
            out.insert(name.to_string(), entry);
        }
        Ok(out)
    }

    /// The ids of `names`, making the missing ones. All are planned first,
    /// so running out of ids changes nothing.
    pub fn ensure<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Result<BTreeMap<String, u32>> {
        let planned = self.plan(names)?;
        for (name, (id, new)) in &planned {
            if *new {
                self.map.set(&label_key(name)?, id)?;
            }
        }
        Ok(planned.into_iter().map(|(name, (id, _))| (name, id)).collect())
    }

    pub fn remove(&self, label: &str) -> Result<bool> {
        self.map.remove(&label_key(label)?)
    }
}
