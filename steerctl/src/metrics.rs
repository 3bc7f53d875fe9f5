//! metrics: counters per (label, domain, protocol), as a table, JSON or a
//! Prometheus endpoint.

use std::{net::SocketAddr, time::Duration};

use anyhow::{Context, Result, bail};
use steer::{
    Dispatcher, Layout,
    ops::metrics::{self, MetricsReport},
};

use crate::serve::{PATH, Server};

use crate::output::{self, View};

pub fn run(layout: &Layout, serve: Option<SocketAddr>, timeout: f64, json: bool) -> Result<()> {
    if let Some(addr) = serve {
        return self::serve(layout, addr, timeout);
    }
    output::show(&Report(metrics::report(&Dispatcher::open_read(layout)?)?), json)
}

fn serve(layout: &Layout, addr: SocketAddr, timeout: f64) -> Result<()> {
    if !(timeout.is_finite() && (0.001..=3600.0).contains(&timeout)) {
        bail!("--timeout must be between 0.001 and 3600 seconds, got {timeout}");
    }
    // Each scrape reads the state afresh and never holds off writers between
    // scrapes. Missing state is answered with 503 until it appears; anything
    // else (no capabilities, say) is worth failing for now.
    match Dispatcher::open_read(layout) {
        Ok(_) => {}
        Err(e) if metrics::is_unavailable(&e) => {
            eprintln!("steerctl: warning: {:#}; answering 503 until it exists", anyhow::Error::from(e));
        }
        Err(e) => return Err(e).context("reading the metrics"),
    }
    let server = Server::bind(layout, addr, Duration::from_secs_f64(timeout))?;
    eprintln!("serving metrics on http://{}{PATH}", server.local_addr()?);
    server.run()
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct Report(MetricsReport);

impl View for Report {
    fn table(&self) -> String {
        let r = &self.0;
        let rows = r.destinations.iter().map(|s| {
            let reasons = s.errors_by_reason.iter().filter(|(_, n)| **n > 0).map(|(r, n)| format!("{r} {n}"));
            let errors = match output::joined(reasons, ", ", "") {
                detail if detail.is_empty() => s.errors.to_string(),
                detail => format!("{} ({detail})", s.errors),
            };
            [
                s.label.clone(),
                s.domain.to_string(),
                s.protocol.to_string(),
                s.lookups.to_string(),
                s.misses.to_string(),
                errors,
            ]
        });
        let table = output::table(["LABEL", "DOMAIN", "PROTOCOL", "LOOKUPS", "MISSES", "ERRORS"], rows);
        let bindings: u64 = r.bindings.iter().map(|g| g.value).sum();
        let summary = format!(
            "labels {}, bindings {bindings}, registered sockets {}; seed list: {} ports, {} lookups, {} misses, {} errors; \
             tracing: {} tracers, {} events sent, {} lost",
            r.labels,
            r.registered_sockets.len(),
            r.seed.ports,
            r.seed.lookups,
            r.seed.misses,
            r.seed.errors,
            r.trace.tracers,
            r.trace.events,
            r.trace.lost
        );
        format!("{table}\n{summary}")
    }
}
