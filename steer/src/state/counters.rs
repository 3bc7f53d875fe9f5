//! Counters: a counter set (destination) per (label, traffic family,
//! protocol) some binding can reach. `destinations` maps each to its id,
//! `metrics` holds its per-CPU counters; `seed_metrics` the seed list's.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use serde::Serialize;
use steer_common::{DestKey, DestMetrics, ErrorReason, MAX_DESTINATIONS, SeedMetrics, map};

use super::{Layout, spec};
use crate::{
    error::{Result, fail},
    kernel::maps::{RawMap, open_typed},
    model::{Family, Protocol, compile::Destinations},
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
}

impl Counters {
    pub fn open(layout: &Layout) -> Result<Self> {
        let path = |name| layout.map(name);
        Ok(Self {
            dests: RawMap::open(&path(map::DESTINATIONS), spec(map::DESTINATIONS))?,
            metrics: RefCell::new(open_typed(&path(map::METRICS), spec(map::METRICS))?),
            seed: open_typed(&path(map::SEED_METRICS), spec(map::SEED_METRICS))?,
        })
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

    /// The ids a compile will use: the recorded ones, and new ones
    /// allocated lowest-free.
    pub fn table(&self) -> Result<DestTable> {
        let known: BTreeMap<DestKey, u32> = self.dests.entries()?.into_iter().collect();
        let taken = known.values().copied().collect();
        Ok(DestTable { known, taken, used: BTreeSet::new(), new: Vec::new() })
    }

    /// Records the counter sets `table` made, from zero, before any lookup
    /// can count in them.
    pub fn add_new(&self, table: &DestTable) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut metrics = self.metrics.borrow_mut();
        for &(key, id) in &table.new {
            metrics.set(id, PerCpuValues::try_from(vec![DestMetrics::default(); cpus])?, 0)?;
            self.dests.set(&key, &id)?;
        }
        Ok(())
    }

    /// Forgets the counter sets the published generation no longer uses.
    pub fn drop_unused(&self, table: &DestTable) -> Result<()> {
        for (key, id) in &table.known {
            if !table.used.contains(id) {
                self.dests.remove(key)?;
            }
        }
        Ok(())
    }
}

/// Counter-set ids for a compile: the recorded ones, new ones allocated
/// lowest-free.
pub struct DestTable {
    known: BTreeMap<DestKey, u32>,
    taken: BTreeSet<u32>,
    used: BTreeSet<u32>,
    new: Vec<(DestKey, u32)>,
}

impl Destinations for DestTable {
    fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16> {
        let key =
            DestKey { label, family_index: family_index as u8, protocol_index: protocol_index as u8, _pad: [0; 2] };
        let id = match self.known.get(&key) {
            Some(&id) => id,
            None => {
                let Some(id) = (0..MAX_DESTINATIONS).find(|id| !self.taken.contains(id)) else {
                    fail!(Full, "all {MAX_DESTINATIONS} counter sets (label, family, protocol) are in use")
                };
                self.taken.insert(id);
                self.known.insert(key, id);
                self.new.push((key, id));
                id
            }
        };
        self.used.insert(id);
        Ok(id as u16)
    }
}
