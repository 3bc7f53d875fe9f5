//! Counters: a counter set (destination) per (label, traffic family,
//! protocol) some binding can reach. `destinations` maps each to its id,
//! `metrics` holds its per-CPU counters; `seed_metrics` the seed list's.
//! `dest_bindings` counts the bindings that reach each id, so a write of
//! one binding adds or drops counter sets without reading the record.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use serde::Serialize;
use steer_common::{BindingKey, DestKey, DestMetrics, ErrorReason, MAX_DESTINATIONS, MAX_LABELS, SeedMetrics, map};

use super::{Layout, spec};
use crate::{
    error::{Result, fail},
    kernel::maps::{MappedArray, RawMap, open_spec, open_typed},
    model::{
        Family, Protocol,
        compile::{Destinations, Input},
    },
};

/// The counters of one destination: a label's traffic of one family
/// ("domain") and protocol, summed over CPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DestStats {
    pub label: String,
    pub domain: Family,
    pub protocol: Protocol,
    pub lookups: u64,
    pub misses: u64,
    /// All refusals by the kernel, and by reason.
    pub errors: u64,
    pub errors_by_reason: BTreeMap<&'static str, u64>,
}

pub struct Counters {
    dests: RawMap<DestKey, u32>,
    metrics: RefCell<PerCpuArray<MapData, DestMetrics>>,
    seed: PerCpuArray<MapData, SeedMetrics>,
    /// Bindings per destination id (`dest_bindings`), mapped on first use.
    counts: RefCell<Option<MappedArray<u32>>>,
    layout: Layout,
}

fn dest_key(label: u32, family_index: u32, protocol_index: u32) -> DestKey {
    DestKey { label, family_index: family_index as u8, protocol_index: protocol_index as u8, _pad: [0; 2] }
}

/// The counter sets a binding reaches: its label's, for each family its
/// prefix holds addresses of, on its protocol.
fn dest_keys(binding: &Input) -> impl Iterator<Item = DestKey> + '_ {
    let families = binding.families();
    (0..2u32).filter(move |f| families[*f as usize]).map(|f| dest_key(binding.label, f, binding.protocol_index))
}

impl Counters {
    pub fn open(layout: &Layout) -> Result<Self> {
        let path = |name| layout.map(name);
        Ok(Self {
            dests: RawMap::open(&path(map::DESTINATIONS), spec(map::DESTINATIONS))?,
            metrics: RefCell::new(open_typed(&path(map::METRICS), spec(map::METRICS))?),
            seed: open_typed(&path(map::SEED_METRICS), spec(map::SEED_METRICS))?,
            counts: RefCell::new(None),
            layout: layout.clone(),
        })
    }

    fn with_counts<T>(&self, f: impl FnOnce(&mut MappedArray<u32>) -> T) -> Result<T> {
        let mut counts = self.counts.borrow_mut();
        if counts.is_none() {
            let data = open_spec(&self.layout.map(map::DEST_BINDINGS), spec(map::DEST_BINDINGS))?;
            *counts = Some(MappedArray::new(data, MAX_DESTINATIONS)?);
        }
        Ok(f(counts.as_mut().expect("set above")))
    }

    /// Counts `binding` in its counter sets, making the missing ones (from
    /// zero, before any lookup can count in them).
    pub fn add_binding(&self, binding: &Input) -> Result<()> {
        for key in dest_keys(binding) {
            let id = match self.dests.get(&key)? {
                Some(id) => id,
                None => {
                    let free = self.with_counts(|c| c.as_slice().iter().position(|n| *n == 0))?;
                    let Some(id) = free else {
                        fail!(Full, "all {MAX_DESTINATIONS} counter sets (label, family, protocol) are in use")
                    };
                    self.zero(id as u32)?;
                    self.dests.set(&key, &(id as u32))?;
                    id as u32
                }
            };
            self.with_counts(|c| {
                let n = c.as_slice()[id as usize];
                c.write(id as usize, &[n + 1]);
            })?;
        }
        Ok(())
    }

    /// Fails, changing nothing, when `bindings` need counter sets that no
    /// free id is left for.
    pub fn check_room<'a>(&self, bindings: impl IntoIterator<Item = &'a Input>) -> Result<()> {
        let mut missing = BTreeSet::new();
        for binding in bindings {
            for key in dest_keys(binding) {
                if self.dests.get(&key)?.is_none() {
                    missing.insert(key);
                }
            }
        }
        let needed = missing.len();
        let free = self.with_counts(|c| c.as_slice().iter().filter(|n| **n == 0).count())?;
        if needed > free {
            fail!(
                Full,
                "all {MAX_DESTINATIONS} counter sets (label, family, protocol) are in use; {needed} more are needed"
            );
        }
        Ok(())
    }

    /// Uncounts `binding`, dropping the counter sets no binding reaches now.
    pub fn remove_binding(&self, binding: &Input) -> Result<()> {
        for key in dest_keys(binding) {
            let Some(id) = self.dests.get(&key)? else { continue };
            let left = self.with_counts(|c| {
                let n = c.as_slice()[id as usize].saturating_sub(1);
                c.write(id as usize, &[n]);
                n
            })?;
            if left == 0 {
                self.dests.remove(&key)?;
            }
        }
        Ok(())
    }

    /// The labels among `labels` that some binding reaches.
    pub fn bound_labels(&self, labels: impl IntoIterator<Item = u32>) -> Result<BTreeSet<u32>> {
        let mut out = BTreeSet::new();
        for label in labels {
            for (family, protocol) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                if self.dests.get(&dest_key(label, family, protocol))?.is_some() {
                    out.insert(label);
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Looks counter sets up one by one, for a write of one binding.
    pub fn lookup(&self) -> Lookup<'_> {
        Lookup { counters: self, known: BTreeMap::new() }
    }

    fn zero(&self, id: u32) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        self.metrics.borrow_mut().set(id, PerCpuValues::try_from(vec![DestMetrics::default(); cpus])?, 0)?;
        Ok(())
    }

    /// Every destination's counters; `names` is label id -> name.
    pub fn all(&self, names: &BTreeMap<u32, String>) -> Result<Vec<DestStats>> {
        let metrics = self.metrics.borrow();
        let mut out = Vec::new();
        for (key, id) in self.dests.entries()? {
            let Some(label) = names.get(&key.label) else { continue };
            let mut sum = DestMetrics::default();
            for m in metrics.get(&id, 0)?.iter() {
                sum.lookups += m.lookups;
                sum.misses += m.misses;
                for (total, n) in sum.errors.iter_mut().zip(m.errors) {
                    *total += n;
                }
            }
            out.push(DestStats {
                label: label.clone(),
                domain: Family::from_index(key.family_index.into()),
                protocol: Protocol::from_index(key.protocol_index.into()),
                lookups: sum.lookups,
                misses: sum.misses,
                errors: sum.errors.iter().sum(),
                errors_by_reason: ErrorReason::ALL.iter().map(|r| (r.name(), sum.errors[*r as usize])).collect(),
            });
        }
        out.sort_by(|a, b| (&a.label, a.domain, a.protocol).cmp(&(&b.label, b.domain, b.protocol)));
        Ok(out)
    }

    /// The seed list's counters, summed over CPUs.
    pub fn seed(&self) -> Result<SeedMetrics> {
        let mut sum = SeedMetrics::default();
        for m in self.seed.get(&0, 0)?.iter() {
            sum.lookups += m.lookups;
            sum.misses += m.misses;
            sum.errors += m.errors;
        }
        Ok(sum)
    }

    /// The counter sets `entries` (the whole record) reach, by id: the
    /// recorded ids, and new ones allocated lowest-free.
    pub fn plan(&self, entries: &[(BindingKey, u32)]) -> Result<DestPlan> {
        let known: BTreeMap<DestKey, u32> = self.dests.entries()?.into_iter().collect();
        // Counted by dense index (a record holds label ids below
        // MAX_LABELS; any other, in a map).
        let mut dense = vec![0u32; DENSE];
        let mut counts: BTreeMap<DestKey, u32> = BTreeMap::new();
        for (key, label) in entries {
            for dest in dest_keys(&Input::from_key(key, *label)) {
                match dense_index(&dest) {
                    Some(i) => dense[i] += 1,
                    None => *counts.entry(dest).or_default() += 1,
                }
            }
        }
        for (i, count) in dense.into_iter().enumerate().filter(|(_, n)| *n > 0) {
            let (label, rest) = ((i / 4) as u32, i % 4);
            counts.insert(dest_key(label, (rest / 2) as u32, (rest % 2) as u32), count);
        }
        let taken: BTreeSet<u32> = counts.keys().filter_map(|k| known.get(k)).copied().collect();
        let mut free = (0..MAX_DESTINATIONS).filter(|id| !taken.contains(id));
        let mut ids = BTreeMap::new();
        let mut new = Vec::new();
        for (key, count) in counts {
            let id = match known.get(&key) {
                Some(&id) => id,
                None => {
                    let Some(id) = free.next() else {
                        fail!(Full, "all {MAX_DESTINATIONS} counter sets (label, family, protocol) are in use")
                    };
                    new.push(id);
                    id
                }
            };
            ids.insert(key, (id, count));
        }
        let mut dense = vec![u16::MAX; DENSE];
        for (key, &(id, _)) in &ids {
            if let Some(i) = dense_index(key) {
                dense[i] = id as u16;
            }
        }
        Ok(DestPlan { known, ids, new, dense })
    }

    /// Records the counter sets `plan` makes, from zero, before any lookup
    /// can count in them.
    pub fn add_new(&self, plan: &DestPlan) -> Result<()> {
        for (key, &(id, _)) in &plan.ids {
            if plan.new.contains(&id) {
                self.zero(id)?;
                self.dests.set(key, &id)?;
            }
        }
        Ok(())
    }

    /// Forgets the counter sets the published generation no longer uses,
    /// and records how many bindings reach each.
    pub fn drop_unused(&self, plan: &DestPlan) -> Result<()> {
        for (key, id) in &plan.known {
            if plan.ids.get(key).is_none_or(|(now, _)| now != id) {
                self.dests.remove(key)?;
            }
        }
        let mut counts = vec![0u32; MAX_DESTINATIONS as usize];
        for &(id, count) in plan.ids.values() {
            counts[id as usize] = count;
        }
        self.with_counts(|c| c.write(0, &counts))
    }
}

/// Counter-set ids for compiling a whole record, and how many bindings
/// reach each.
pub struct DestPlan {
    known: BTreeMap<DestKey, u32>,
    ids: BTreeMap<DestKey, (u32, u32)>,
    new: Vec<u32>,
    /// The ids by dense index (u16::MAX: none), for compiling.
    dense: Vec<u16>,
}

/// Counter sets of labels below MAX_LABELS, indexed densely.
const DENSE: usize = MAX_LABELS as usize * 4;

fn dense_index(key: &DestKey) -> Option<usize> {
    (key.label < MAX_LABELS && key.family_index < 2 && key.protocol_index < 2)
        .then(|| key.label as usize * 4 + usize::from(key.family_index) * 2 + usize::from(key.protocol_index))
}

impl Destinations for DestPlan {
    fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16> {
        let key = dest_key(label, family_index, protocol_index);
        if let Some(&id) = dense_index(&key).and_then(|i| self.dense.get(i)).filter(|id| **id != u16::MAX) {
            return Ok(id);
        }
        match self.ids.get(&key) {
            Some(&(id, _)) => Ok(id as u16),
            None => fail!(
                Pin,
                "no counter set planned for label #{label}, family {family_index}, protocol {protocol_index}"
            ),
        }
    }
}

/// Counter-set ids looked up in `destinations` as a write needs them.
pub struct Lookup<'a> {
    counters: &'a Counters,
    known: BTreeMap<DestKey, u16>,
}

impl Destinations for Lookup<'_> {
    fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16> {
        let key = dest_key(label, family_index, protocol_index);
        if let Some(id) = self.known.get(&key) {
            return Ok(*id);
        }
        match self.counters.dests.get(&key)? {
            Some(id) => {
                self.known.insert(key, id as u16);
                Ok(id as u16)
            }
            None => fail!(
                Pin,
                "label #{label} has no counter set for family {family_index}, protocol {protocol_index}; \
                 `steerctl load-bindings` with the full set rebuilds them"
            ),
        }
    }
}
