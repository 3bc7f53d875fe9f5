//! Servers followed by the kernel: `follows` (listening addresses -> the
//! registrations they serve, read by the follow programs), `backfill`
//! (sockets a backfill pass inserts, by cookie), `follow_metrics` and
//! `follow_scopes` (which cgroup each scope id's programs are attached to).

use std::{cell::RefCell, collections::BTreeMap};

use aya::maps::{MapData, PerCpuArray};
use steer_common::{BackfillValue, FollowKey, FollowMetrics, FollowValue, MAX_SCOPES, ScopeInfo, map};

use super::{Layout, spec};
use crate::{
    error::{Context, Result, fail},
    kernel::maps::{RawMap, open_typed},
};

pub struct Follows {
    map: RawMap<FollowKey, FollowValue>,
    backfill: RawMap<u64, BackfillValue>,
    metrics: RefCell<PerCpuArray<MapData, FollowMetrics>>,
    scopes: RawMap<u32, ScopeInfo>,
}

/// A scope: the cgroup its programs are attached to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    pub id: u16,
    pub cgroup_id: u64,
    pub path: String,
}

impl Follows {
    pub fn open(layout: &Layout) -> Result<Self> {
        let path = |name| layout.map(name);
        Ok(Self {
            map: RawMap::open(&path(map::FOLLOWS), spec(map::FOLLOWS))?,
            backfill: RawMap::open(&path(map::BACKFILL), spec(map::BACKFILL))?,
            metrics: RefCell::new(open_typed(&path(map::FOLLOW_METRICS), spec(map::FOLLOW_METRICS))?),
            scopes: RawMap::open(&path(map::FOLLOW_SCOPES), spec(map::FOLLOW_SCOPES))?,
        })
    }

    pub fn all(&self) -> Result<BTreeMap<FollowKey, FollowValue>> {
        Ok(self.map.entries()?.into_iter().collect())
    }

    /// Makes the map `wanted`: new and changed keys first, then the ones
    /// that go, so a listener never finds a registration missing that
    /// both the old and the new set have.
    pub fn replace(&self, wanted: &BTreeMap<FollowKey, FollowValue>) -> Result<()> {
        let current = self.all()?;
        for (key, value) in wanted {
            if current.get(key) != Some(value) {
                self.map.set(key, value).context("writing the followed addresses")?;
            }
        }
        for key in current.keys().filter(|k| !wanted.contains_key(k)) {
            self.map.remove(key).context("removing a followed address")?;
        }
        Ok(())
    }

    /// The follow programs' counters, summed over CPUs.
    pub fn metrics(&self) -> Result<FollowMetrics> {
        let mut sum = FollowMetrics::default();
        for m in self.metrics.borrow().get(&0, 0)?.iter() {
            sum.inserted += m.inserted;
            sum.full += m.full;
            sum.errors += m.errors;
            sum.events += m.events;
            sum.lost_events += m.lost_events;
            sum.backfilled += m.backfilled;
        }
        Ok(sum)
    }

    /// Names the sockets the next backfill pass inserts (cookie -> keys).
    pub fn set_backfill(&self, wanted: &BTreeMap<u64, BackfillValue>) -> Result<()> {
        self.clear_backfill()?;
        for (cookie, value) in wanted {
            self.backfill.set(cookie, value).context("naming the sockets to backfill")?;
        }
        Ok(())
    }

    pub fn clear_backfill(&self) -> Result<()> {
        for (cookie, _) in self.backfill.entries()? {
            self.backfill.remove(&cookie)?;
        }
        Ok(())
    }

    /// The scopes in use, by id.
    pub fn scopes(&self) -> Result<BTreeMap<u16, Scope>> {
        let mut out = BTreeMap::new();
        for id in 0..MAX_SCOPES {
            let info = self.scopes.get(&id)?.unwrap_or_default();
            if info.cgroup_id != 0 {
                let end = info.path.iter().position(|&b| b == 0).unwrap_or(info.path.len());
                let path = String::from_utf8_lossy(&info.path[..end]).into_owned();
                out.insert(id as u16, Scope { id: id as u16, cgroup_id: info.cgroup_id, path });
            }
        }
        Ok(out)
    }

    /// Records scope `id` as the cgroup `cgroup_id` at `path`.
    pub fn set_scope(&self, id: u16, cgroup_id: u64, path: &str) -> Result<()> {
        let mut info = ScopeInfo { cgroup_id, ..Default::default() };
        if path.len() >= info.path.len() {
            fail!(Invalid, "cgroup path {path} is longer than {} bytes", info.path.len() - 1);
        }
        info.path[..path.len()].copy_from_slice(path.as_bytes());
        self.scopes.set(&u32::from(id), &info).context("recording a scope")
    }

    pub fn clear_scope(&self, id: u16) -> Result<()> {
        self.scopes.set(&u32::from(id), &ScopeInfo::default()).context("forgetting a scope")
    }
}
