//! metrics: per-label counters, as a table, JSON or a Prometheus endpoint.

use std::net::SocketAddr;

use anyhow::Result;
use steer::{Dispatcher, Layout, labelled::LabelStats};

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
struct Stats(Vec<LabelStats>);

impl View for Stats {
    fn table(&self) -> String {
        let rows = self.0.iter().map(|s| {
            [s.label.clone(), s.metrics.lookups.to_string(), s.metrics.misses.to_string(), s.metrics.errors.to_string()]
        });
        output::table(["LABEL", "LOOKUPS", "MISSES", "ERRORS"], rows)
    }
}
