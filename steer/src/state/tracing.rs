//! Live tracing: a slot per tracer in `trace_tracers` (its socket: the
//! kernel takes it out when the tracer exits, however it exits, so a slot
//! is live exactly while its socket is there), `trace_filters` (what it
//! selects), `trace_rings` (its own ring buffer) and `trace_metrics` (what
//! it was sent and lost; the last entry sums every tracer's since load).
//! `steer_config.trace` tells the program to look here at all.

use std::{cell::RefCell, os::fd::BorrowedFd};

use aya::maps::{MapData, PerCpuArray, PerCpuValues};
use steer_common::{MAX_TRACERS, TraceFilter, TraceMetrics, map};

use super::{Layout, spec};
use crate::{
    error::{Context, Result},
    kernel::maps::{MapOfMaps, RawMap, SocketMap, open_typed},
};

pub struct Tracing {
    tracers: SocketMap,
    filters: RawMap<u32, TraceFilter>,
    rings: MapOfMaps,
    metrics: RefCell<PerCpuArray<MapData, TraceMetrics>>,
}

/// One tracer slot as the maps have it.
#[derive(Debug, Clone, Copy)]
pub struct TracerSlot {
    pub slot: u32,
    /// The cookie of the tracer's socket while the tracer lives.
    pub socket: Option<u64>,
    pub filter: TraceFilter,
    /// A ring buffer is installed.
    pub ring: bool,
}

impl TracerSlot {
    pub fn live(&self) -> bool {
        self.socket.is_some()
    }

    /// Holds something a tracer left: its filter or its ring buffer.
    pub fn dead(&self) -> bool {
        !self.live() && (self.filter.active != 0 || self.ring)
    }
}

fn sum(values: &PerCpuValues<TraceMetrics>) -> TraceMetrics {
    values.iter().fold(TraceMetrics::default(), |a, m| TraceMetrics {
        matched: a.matched + m.matched,
        sampled_out: a.sampled_out + m.sampled_out,
        events: a.events + m.events,
        lost: a.lost + m.lost,
    })
}

impl Tracing {
    pub fn open(layout: &Layout) -> Result<Self> {
        let path = |name| layout.map(name);
        Ok(Self {
            tracers: SocketMap::open_spec(&path(map::TRACE_TRACERS), spec(map::TRACE_TRACERS))?,
            filters: RawMap::open(&path(map::TRACE_FILTERS), spec(map::TRACE_FILTERS))?,
            rings: MapOfMaps::open(&path(map::TRACE_RINGS), spec(map::TRACE_RINGS))?,
            metrics: RefCell::new(open_typed(&path(map::TRACE_METRICS), spec(map::TRACE_METRICS))?),
        })
    }

    pub fn slot(&self, slot: u32) -> Result<TracerSlot> {
        Ok(TracerSlot {
            slot,
            socket: self.tracers.cookie(slot)?,
            filter: self.filters.get(&slot)?.unwrap_or_default(),
            ring: self.rings.inner_id(slot)?.is_some(),
        })
    }

    pub fn slots(&self) -> Result<Vec<TracerSlot>> {
        (0..MAX_TRACERS).map(|slot| self.slot(slot)).collect()
    }

    pub fn filter(&self, slot: u32) -> Result<TraceFilter> {
        Ok(self.filters.get(&slot)?.unwrap_or_default())
    }

    pub fn set_filter(&self, slot: u32, filter: &TraceFilter) -> Result<()> {
        self.filters.set(&slot, filter).context("writing a tracer's filter")
    }

    /// Gives `slot` to a tracer: counters from zero, its ring buffer, its
    /// socket, then its filter, which turns it on: the program never sees
    /// the slot on without the socket (it would turn it off again).
    pub fn claim(&self, slot: u32, socket: BorrowedFd<'_>, ring: &MapData, filter: &TraceFilter) -> Result<()> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        self.metrics.borrow_mut().set(slot, PerCpuValues::try_from(vec![TraceMetrics::default(); cpus])?, 0)?;
        self.rings.install(&[slot], &[ring]).context("installing the tracer's ring buffer")?;
        self.tracers.insert(slot, socket).context("registering the tracer's socket")?;
        self.set_filter(slot, filter)
    }

    /// Empties `slot`: its filter first (so the program stops looking at
    /// it), its ring buffer, and its socket last (while the socket is
    /// there, no other tracer takes the slot).
    pub fn release(&self, slot: u32) -> Result<()> {
        self.set_filter(slot, &TraceFilter::default())?;
        self.rings.remove(slot)?;
        self.tracers.remove(slot)?;
        Ok(())
    }

    /// What `slot`'s tracer was sent and lost, summed over CPUs.
    pub fn metrics(&self, slot: u32) -> Result<TraceMetrics> {
        Ok(sum(&self.metrics.borrow().get(&slot, 0)?))
    }

    /// Every tracer's, since the state was loaded.
    pub fn totals(&self) -> Result<TraceMetrics> {
        self.metrics(MAX_TRACERS)
    }
}
