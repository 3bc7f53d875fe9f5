//! metrics: counters per (label, domain, protocol), as a table, JSON or a
//! Prometheus endpoint.

use std::net::SocketAddr;

use anyhow::Result;
use steer::{Dispatcher, Layout, labelled::DestStats};

use crate::output::{self, View};

pub fn run(layout: &Layout, serve: Option<SocketAddr>, json: bool) -> Result<()> {
    if let Some(addr) = serve {
        // Check the state once up front; each scrape then reads it afresh
        // and never holds off writers between scrapes.
        Dispatcher::open_read(layout)?;
        eprintln!("serving metrics on http://{addr}/metrics");
        steer::metrics::serve(layout, addr)?;
    }
    output::show(&Stats(Dispatcher::open_read(layout)?.metrics()?), json)
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct Stats(Vec<DestStats>);

impl View for Stats {
    fn table(&self) -> String {
        let rows = self.0.iter().map(|s| {
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
        output::table(["LABEL", "DOMAIN", "PROTOCOL", "LOOKUPS", "MISSES", "ERRORS"], rows)
    }
}
