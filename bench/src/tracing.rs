//! What `steerctl trace` costs lookups: steer_dispatch on one binding set
//! with tracing off, and with one tracer attached sent every decision,
//! sampling one in 100, and selecting none (its kernel-side filter names
//! a port no lookup uses). Each lookup runs in batches small enough for
//! the tracer's ring buffer, drained between batches, so every decision
//! is really written (a full ring would time the cheaper failure).

use std::os::fd::AsFd;

use anyhow::{Result, bail};
use serde::Serialize;
use steer::{
    Dispatcher, Layout,
    common::{SkLookupCtx, TRACE_RING_BYTES, TraceEvent},
    model::trace::Filter,
    ops::trace::{Options, Tracer},
};

use crate::{rate::median, sets};

#[derive(Debug, Clone, Serialize)]
pub struct TraceRow {
    pub tracing: String,
    pub hit_ns: f64,
    pub miss_ns: f64,
    pub unrelated_ns: f64,
    /// Decisions the tracer was sent, and lost (its ring was full).
    pub sent: u64,
    pub lost: u64,
}

/// Runs in a batch: well inside a ring buffer (each event takes 8 bytes
/// of header beside its own).
const BATCH: u32 = TRACE_RING_BYTES / (2 * (size_of::<TraceEvent>() as u32 + 8));

/// Times `contexts` (hit, miss, unrelated) on the pinned program at
/// `layout`, for each tracing mode in turn, interleaving the modes sample
/// by sample: `repeat` runs a sample, in batches of at most [`BATCH`].
pub fn measure(layout: &Layout, contexts: &[SkLookupCtx; 3], repeat: u32, samples: usize) -> Result<Vec<TraceRow>> {
    let program = crate::bpf::obj_get(&layout.program())?;
    let mut modes: Vec<(String, Option<Options>)> = vec![("off".into(), None)];
    let mut nothing = Filter::default();
    nothing.set_port("1")?;
    modes.push(("on: every decision sent".into(), Some(Options::default())));
    modes.push(("on: --sample 1/100".into(), Some(Options { sample: 100, ..Default::default() })));
    modes.push(("on: filter selects none".into(), Some(Options { filter: nothing, sample: 1 })));
    let batch = BATCH.min(repeat).max(1);
    let batches = repeat.div_ceil(batch);
    let mut times = vec![[Vec::new(), Vec::new(), Vec::new()]; modes.len()];
    let mut counts = vec![(0u64, 0u64); modes.len()];
    for _ in 0..samples {
        for (m, (_, options)) in modes.iter().enumerate() {
            let mut tracer = match options {
                Some(o) => Some(Tracer::start(&Dispatcher::open_write(layout)?, o)?),
                None => None,
            };
            for (c, ctx) in contexts.iter().enumerate() {
                let mut ns = 0.0;
                for _ in 0..batches {
                    ns += f64::from(sets::run(program.as_fd(), ctx, batch)?.duration_ns);
                    if let Some(t) = &mut tracer {
                        t.read();
                    }
                }
                times[m][c].push(ns / f64::from(batches));
            }
            if let Some(t) = tracer {
                let counters = t.stop()?;
                counts[m].0 += counters.events;
                counts[m].1 += counters.lost;
            }
            if Dispatcher::open_read(layout)?.plane_status()?.tracing {
                bail!("tracing stayed on after the tracer stopped");
            }
        }
    }
    Ok(modes
        .into_iter()
        .zip(times)
        .zip(counts)
        .map(|(((tracing, _), [hit, miss, unrelated]), (sent, lost))| TraceRow {
            tracing,
            hit_ns: median(hit),
            miss_ns: median(miss),
            unrelated_ns: median(unrelated),
            sent,
            lost,
        })
        .collect())
}
