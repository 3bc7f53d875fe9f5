//! Per-destination counters and gauges: read from the state in one go
//! ([`report`]) and written in the OpenMetrics text format Prometheus
//! scrapes ([`openmetrics`], with the prometheus-client crate), or in the
//! older Prometheus text format for clients that do not ask for
//! OpenMetrics ([`classic`]: curl, promtool, older scrapers). The HTTP
//! endpoint that serves them lives in steerctl.

use std::collections::BTreeMap;

use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family as MetricFamily, gauge::Gauge as MetricGauge, info::Info},
    registry::Registry,
};
use serde::Serialize;

use crate::{
    error::{Error, Result},
    model::{Family, Protocol},
    state::{DestStats, Dispatcher, Layout, Read},
};

/// OpenMetrics' content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's (0.0.4).
pub const CONTENT_TYPE_CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything `steerctl metrics` and the endpoint report, read in one go.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MetricsReport {
    /// Counters per (label, domain, protocol).
    pub destinations: Vec<DestStats>,
    /// Bindings per (label, domain of the prefix, protocol).
    pub bindings: Vec<Gauge>,
    /// Registered sockets per (label, socket family, protocol): 0 or 1.
    pub registered_sockets: Vec<Gauge>,
    pub labels: usize,
    pub seed: SeedReport,
    /// Registrations the kernel follows per (label, family of the address, protocol).
    pub followed: Vec<Gauge>,
    /// What the follow programs did.
    /// The follow programs' counters.
    pub follow: steer_common::FollowMetrics,
    pub trace: TraceReport,
    pub build: BuildInfo,
}

/// Live tracing (`steerctl trace`): tracers running now, and what every
/// tracer was sent and lost since the state was loaded.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TraceReport {
    pub tracers: usize,
    /// Decisions written to a tracer's ring buffer.
    pub events: u64,
    /// Decisions a tracer's filter selected but its ring buffer was full for.
    pub lost: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Gauge {
    pub label: String,
    pub domain: Family,
    pub protocol: Protocol,
    pub value: u64,
}

/// The seed port list's own counters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SeedReport {
    pub ports: usize,
    pub lookups: u64,
    pub misses: u64,
    pub errors: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BuildInfo {
    pub version: String,
    /// The loaded program's tag, as `bpftool prog` shows it.
    pub program_tag: String,
}

/// Reads the report from an open state.
pub fn report<A: Read>(d: &Dispatcher<A>) -> Result<MetricsReport> {
    let mut bindings = BTreeMap::new();
    for b in d.bindings()? {
        *bindings.entry((b.label.clone(), b.family(), b.protocol)).or_insert(0) += 1;
    }
    let gauges = |m: BTreeMap<(String, Family, Protocol), u64>| {
        m.into_iter().map(|((label, domain, protocol), value)| Gauge { label, domain, protocol, value }).collect()
    };
    let registered = d.registered()?.into_iter().map(|r| ((r.label, r.family, r.protocol), 1)).collect();
    let seed = d.seed_metrics()?;
    let followed =
        super::follow::list(d)?.into_iter().map(|f| ((f.label, f.target.family(), f.target.protocol), 1)).collect();
    let trace = d.trace_totals()?;
    Ok(MetricsReport {
        followed: gauges(followed),
        follow: super::follow::metrics(d)?,
        destinations: d.metrics()?,
        bindings: gauges(bindings),
        registered_sockets: gauges(registered),
        labels: d.labels()?.len(),
        seed: SeedReport { ports: d.ports()?.len(), lookups: seed.lookups, misses: seed.misses, errors: seed.errors },
        trace: TraceReport {
            tracers: d.tracers()?.iter().filter(|s| s.live()).count(),
            events: trace.events,
            lost: trace.lost,
        },
        build: BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            program_tag: format!("{:016x}", d.program_tag()?),
        },
    })
}

type Labels = Vec<(&'static str, String)>;

fn dest_labels(label: &str, domain: Family, protocol: Protocol) -> Labels {
    vec![("label", label.to_string()), ("domain", domain.to_string()), ("protocol", protocol.to_string())]
}

/// A counter family with one counter per label set.
fn counters(samples: impl IntoIterator<Item = (Labels, u64)>) -> MetricFamily<Labels, Counter> {
    let family = MetricFamily::<Labels, Counter>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).inc_by(value);
    }
    family
}

fn gauges(samples: impl IntoIterator<Item = (Labels, u64)>) -> MetricFamily<Labels, MetricGauge> {
    let family = MetricFamily::<Labels, MetricGauge>::default();
    for (labels, value) in samples {
        family.get_or_create(&labels).set(i64::try_from(value).unwrap_or(i64::MAX));
    }
    family
}

/// A single counter or gauge with no labels.
fn one_counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

fn one_gauge(value: usize) -> MetricGauge {
    let g = MetricGauge::default();
    g.set(i64::try_from(value).unwrap_or(i64::MAX));
    g
}

/// The report in the OpenMetrics text format.
pub fn openmetrics(report: &MetricsReport) -> String {
    let mut registry = Registry::with_prefix("steer");
    let dests = &report.destinations;
    let by_dest = |f: fn(&DestStats) -> u64| -> Vec<(Labels, u64)> {
        dests.iter().map(|s| (dest_labels(&s.label, s.domain, s.protocol), f(s))).collect()
    };
    registry.register("lookups", "Connections matched to a label's binding", counters(by_dest(|s| s.lookups)));
    registry.register(
        "misses",
        "Matched connections dropped: the label has no socket for their family and protocol",
        counters(by_dest(|s| s.misses)),
    );
    let errors = dests.iter().flat_map(|s| {
        s.errors_by_reason.iter().map(|(reason, n)| {
            let mut labels = dest_labels(&s.label, s.domain, s.protocol);
            labels.push(("reason", (*reason).to_string()));
            (labels, *n)
        })
    });
    registry.register(
        "errors",
        "Matched connections dropped: the kernel refused the label's socket (bpf_sk_assign), by reason",
        counters(errors),
    );
    let by_gauge = |g: &[Gauge]| -> Vec<(Labels, u64)> {
        g.iter().map(|g| (dest_labels(&g.label, g.domain, g.protocol), g.value)).collect()
    };
    registry.register(
        "bindings",
        "Bindings of a label, by the prefix's family and protocol",
        gauges(by_gauge(&report.bindings)),
    );
    registry.register(
        "registered_sockets",
        "Sockets registered for a label, by family and protocol (0 or 1)",
        gauges(by_gauge(&report.registered_sockets)),
    );
    registry.register("labels", "Labels in use", one_gauge(report.labels));
    let seed = &report.seed;
    registry.register("seed_ports", "Ports on the seed port list", one_gauge(seed.ports));
    registry.register("seed_lookups", "Connections to a port on the seed list", one_counter(seed.lookups));
    registry.register("seed_misses", "Connections to a seed port dropped: no seed socket", one_counter(seed.misses));
    registry.register(
        "seed_errors",
        "Connections to a seed port dropped: the kernel refused the seed socket",
        one_counter(seed.errors),
    );
    registry.register(
        "followed_registrations",
        "Registrations the kernel follows (sockets go in at listen()), by family of the address and protocol",
        gauges(by_gauge(&report.followed)),
    );
    let f = &report.follow;
    registry.register(
        "follow_inserted",
        "Listening sockets the kernel put in a followed registration's slot inside listen()",
        one_counter(f.inserted),
    );
    registry.register(
        "follow_full",
        "Listening sockets a followed registration's full slot had no room for",
        one_counter(f.full),
    );
    registry.register("follow_errors", "Inserts of followed sockets the kernel refused", one_counter(f.errors));
    registry.register("follow_events", "Followed UDP binds reported to watch", one_counter(f.events));
    registry.register(
        "follow_lost_events",
        "Followed UDP binds not reported: the ring buffer was full",
        one_counter(f.lost_events),
    );
    registry.register("follow_backfilled", "Sockets a backfill pass inserted", one_counter(f.backfilled));
    let trace = &report.trace;
    registry.register("tracers", "Tracers (steerctl trace) running", one_gauge(trace.tracers));
    registry.register(
        "trace_events",
        "Decisions sent to tracers (steerctl trace), all tracers since load",
        one_counter(trace.events),
    );
    registry.register(
        "trace_lost_events",
        "Decisions a tracer selected but could not be sent: its ring buffer was full",
        one_counter(trace.lost),
    );
    let build: Labels =
        vec![("version", report.build.version.clone()), ("program_tag", report.build.program_tag.clone())];
    registry.register("build", "steer's version and the loaded program's tag", Info::new(build));
    let mut out = String::new();
    encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// OpenMetrics text in the Prometheus text format (0.0.4): a counter
/// family's HELP and TYPE name its `_total` samples, an info family is a
/// gauge of its `_info` sample, and there is no `# EOF`.
pub fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut suffix: BTreeMap<String, &str> = BTreeMap::new();
    // TYPE follows HELP: find each family's kind first.
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|l| l.split_once(' ')) {
            match kind {
                "counter" => suffix.insert(name.to_string(), "_total"),
                "info" => suffix.insert(name.to_string(), "_info"),
                _ => None,
            };
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "].into_iter().find_map(|p| Some((p, line.strip_prefix(p)?)));
        match meta.and_then(|(p, rest)| Some((p, rest.split_once(' ')?))) {
            Some((prefix, (name, rest))) => {
                let kind = if prefix == "# TYPE " && rest == "info" { "gauge" } else { rest };
                let name = format!("{name}{}", suffix.get(name).copied().unwrap_or(""));
                out.push_str(&format!("{prefix}{name} {kind}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// The body of a scrape (the state read afresh), OpenMetrics or classic.
pub fn render(layout: &Layout, openmetrics_wanted: bool) -> Result<String> {
    let text = openmetrics(&report(&Dispatcher::open_read(layout)?)?);
    Ok(if openmetrics_wanted { text } else { classic(&text) })
}

/// True when `e` means there is no state to report (never loaded, unloaded,
/// bpffs not mounted, a pin gone): the endpoint answers 503 then.
pub fn is_unavailable(e: &Error) -> bool {
    matches!(e.root(), Error::NotLoaded { .. } | Error::NotBpffs { .. } | Error::Pin(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_has_help_type_and_one_line_per_destination() {
        let mut by_reason = BTreeMap::new();
        for r in steer_common::ErrorReason::ALL {
            by_reason.insert(r.name(), 0);
        }
        by_reason.insert("bad_socket", 2);
        let report = MetricsReport {
            destinations: vec![DestStats {
                label: "web".into(),
                domain: Family::Ipv4,
                protocol: Protocol::Tcp,
                lookups: 7,
                misses: 1,
                errors: 2,
                errors_by_reason: by_reason,
            }],
            bindings: vec![Gauge { label: "web".into(), domain: Family::Ipv4, protocol: Protocol::Tcp, value: 3 }],
            labels: 1,
            build: BuildInfo { version: "0.1.0".into(), program_tag: "00ff".into() },
            ..Default::default()
        };
        let text = openmetrics(&report);
        for line in [
            "# TYPE steer_lookups counter",
            "steer_lookups_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 7",
            "steer_misses_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 1",
            "steer_errors_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\",reason=\"bad_socket\"} 2",
            "steer_bindings{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 3",
            "steer_labels 1",
            "steer_seed_lookups_total 0",
            "steer_trace_lost_events_total 0",
            "steer_tracers 0",
            "steer_build_info{version=\"0.1.0\",program_tag=\"00ff\"} 1",
            "# EOF",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in:\n{text}");
        }
        let classic = classic(&text);
        for line in [
            "# TYPE steer_lookups_total counter",
            "# HELP steer_lookups_total Connections matched to a label's binding.",
            "steer_lookups_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 7",
            "# TYPE steer_labels gauge",
            "# TYPE steer_build_info gauge",
            "steer_build_info{version=\"0.1.0\",program_tag=\"00ff\"} 1",
        ] {
            assert!(classic.lines().any(|l| l == line), "missing {line:?} in:\n{classic}");
        }
        assert!(!classic.contains("# EOF"));
    }
}
