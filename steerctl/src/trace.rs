//! trace: every steering decision as it happens, one line each (or JSON
//! lines), until Ctrl-C, `--count` or `--duration`; a summary line at the end.

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use steer::{
    Dispatcher, Layout,
    common::TraceOutcome,
    model::{
        Protocol,
        trace::{Filter, parse_sample},
    },
    ops::{
        explain,
        trace::{self, Decision, Ended, Limits, Line, Options, Summary, Tracer},
    },
};

use crate::output;

#[derive(clap::Args)]
pub struct TraceArgs {
    /// What to trace, as tcpdump-like words: tcp, udp, port N, local PREFIX
    /// (or dst), remote PREFIX (or src), label NAME[,NAME], outcome
    /// NAME[,NAME]; `and` between them is optional. Nothing: every decision.
    #[arg(value_name = "FILTER")]
    filter: Vec<String>,
    /// Only these protocols (comma-separated).
    #[arg(long, value_name = "tcp|udp")]
    protocol: Vec<String>,
    /// Only connections to this local (destination) address or prefix.
    #[arg(long, value_name = "PREFIX")]
    local: Option<String>,
    /// Only connections to this local port.
    #[arg(long, value_name = "PORT")]
    port: Option<String>,
    /// Only connections from this remote (source) address or prefix.
    #[arg(long, value_name = "PREFIX")]
    remote: Option<String>,
    /// Only decisions whose matched binding is one of these labels (comma-separated, at most 4).
    #[arg(long, value_name = "NAME")]
    label: Vec<String>,
    /// Only these outcomes (comma-separated): assigned, miss, error, seed,
    /// seed-miss, seed-error, normal, and drop for every dropping one.
    #[arg(long, value_name = "OUTCOME")]
    outcome: Vec<String>,
    /// Trace one selected decision in N, picked at random in the kernel.
    #[arg(long, value_name = "1/N")]
    sample: Option<String>,
    /// Stop after N decisions.
    #[arg(long, short = 'c', value_name = "N")]
    count: Option<u64>,
    /// Stop after this long: 500ms, 30s, 5m, 1h (a bare number is seconds).
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
}

/// "500ms", "30s", "1.5m", "2h", "10".
fn parse_duration(text: &str) -> Result<Duration> {
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let scale = match unit {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => bail!("--duration takes a number with ms, s, m or h (such as 30s), not {text:?}"),
    };
    match number.parse::<f64>() {
        Ok(n) if n.is_finite() && n > 0.0 && n * scale < 1e9 => Ok(Duration::from_secs_f64(n * scale)),
        _ => bail!("--duration takes a positive number with ms, s, m or h (such as 30s), not {text:?}"),
    }
}

impl TraceArgs {
    fn options(&self) -> Result<(Options, Limits)> {
        let mut filter = Filter::default();
        filter.add_words(&self.filter)?;
        for list in &self.protocol {
            filter.add_protocols(list)?;
        }
        for list in &self.label {
            filter.add_labels(list)?;
        }
        for list in &self.outcome {
            filter.add_outcomes(list)?;
        }
        if let Some(p) = &self.local {
            filter.set_local(p)?;
        }
        if let Some(p) = &self.remote {
            filter.set_remote(p)?;
        }
        if let Some(p) = &self.port {
            filter.set_port(p)?;
        }
        let sample = self.sample.as_deref().map(parse_sample).transpose()?.unwrap_or(1);
        if self.count == Some(0) {
            bail!("--count takes a number of decisions, at least 1");
        }
        let duration = self.duration.as_deref().map(parse_duration).transpose()?;
        Ok((Options { filter, sample }, Limits { count: self.count, duration }))
    }
}

pub fn run(layout: &Layout, args: TraceArgs, json: bool) -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Bad input fails here, before the state is even opened.
    let (options, limits) = args.options()?;
    let stop = Arc::new(AtomicBool::new(false));
    let (wake, wake_writer) = std::os::unix::net::UnixStream::pair().context("making the wake-up pipe")?;
    wake.set_nonblocking(true)?;
    wake_writer.set_nonblocking(true)?;
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
        signal_hook::low_level::pipe::register(signal, wake_writer.try_clone()?)
            .context("installing signal handlers")?;
    }
    let tracer = {
        // The exclusive lock only while the tracer takes its slot.
        let state = Dispatcher::open_write(layout)?;
        Tracer::start(&state, &options)?
    };
    if !layout.link().exists() {
        eprintln!("steerctl: warning: steer's program is not attached (`steerctl attach`): no connection runs it");
    }
    match explain::other_links(&layout.link()) {
        Ok(links) if !links.is_empty() => eprintln!("steerctl: warning: {}", explain::other_links_note(&links)),
        _ => {}
    }
    let sampled = if options.sample > 1 { format!(", one in {} sampled", options.sample) } else { String::new() };
    eprintln!(
        "steerctl: tracing decisions in {} ({}{sampled}; tracer slot {}); Ctrl-C to stop",
        layout.dir.display(),
        options.filter,
        tracer.slot()
    );
    let mut out = std::io::stdout().lock();
    let summary = trace::run(
        tracer,
        limits,
        std::os::fd::AsFd::as_fd(&wake),
        || stop.load(Ordering::SeqCst),
        |line| {
            let text = if json { json_line(line) } else { text_line(line) };
            writeln!(out, "{text}").and_then(|()| out.flush()).is_ok()
        },
    )?;
    if json {
        let _ = writeln!(out, "{}", serde_json::json!({"type": "summary", "summary": summary}));
    }
    drop(out);
    eprintln!("steerctl: {}", summary_text(&summary));
    if summary.ended == Ended::Unloaded {
        bail!("the state at {} was unloaded while tracing", layout.dir.display());
    }
    Ok(())
}

fn summary_text(s: &Summary) -> String {
    let why = match s.ended {
        Ended::Interrupted => "interrupted",
        Ended::Count => "count reached",
        Ended::Duration => "duration over",
        Ended::OutputClosed => "output closed",
        Ended::Unloaded => "state unloaded",
    };
    format!(
        "{} decisions shown ({why}); {} selected by the filter, {} left out by sampling, {} sent, {} lost (ring buffer full)",
        s.shown, s.matched, s.sampled_out, s.sent, s.lost
    )
}

fn time_of(unix_ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(unix_ns)
}

fn json_line(line: &Line) -> String {
    match line {
        Line::Decision(d) => {
            let time = chrono::DateTime::<chrono::Utc>::from(time_of(d.unix_ns))
                .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
            let mut value = serde_json::to_value(d).unwrap_or_default();
            if let Some(object) = value.as_object_mut() {
                object.insert("type".into(), "decision".into());
                object.insert("time".into(), time.into());
            }
            value.to_string()
        }
        Line::Lost { count, total } => serde_json::json!({"type": "lost", "count": count, "total": total}).to_string(),
    }
}

fn owners(d: &Decision) -> String {
    let owners = d.socket.as_ref().map(|s| s.owners.as_slice()).unwrap_or_default();
    output::joined(owners.iter().map(ToString::to_string), ", ", "held by no process")
}

/// "tcp" connections are refused when dropped; UDP datagrams just go.
fn dropped(protocol: Protocol) -> &'static str {
    if protocol == Protocol::Tcp { "dropped (refused)" } else { "dropped" }
}

fn text_line(line: &Line) -> String {
    let d = match line {
        Line::Decision(d) => d,
        Line::Lost { count, total } => {
            return format!(
                "lost {count} decisions ({total} in all): the ring buffer was full; narrow the filter or --sample"
            );
        }
    };
    let time = chrono::DateTime::<chrono::Local>::from(time_of(d.unix_ns)).format("%H:%M:%S%.6f");
    let binding = match (&d.binding, &d.label) {
        (Some(b), _) => format!("binding {b}"),
        (None, Some(label)) => format!("label {label}"),
        (None, None) => String::new(),
    };
    let socket = |what: &str| match &d.socket {
        Some(s) => format!("{what} socket cookie {} ({})", s.cookie, owners(d)),
        None => format!("{what} socket (gone)"),
    };
    let refusal = d.refusal.as_ref().map(|r| format!("{} ({})", r.name, r.reason)).unwrap_or_default();
    let what = match d.outcome {
        TraceOutcome::Assigned => {
            let slot = d.socket.as_ref().and_then(|s| s.slot.clone()).unwrap_or_default();
            format!("{binding}: assigned {}", socket(&slot))
        }
        TraceOutcome::Miss => format!(
            "{binding}: miss, {}: label {} has no socket for this {} {} connection",
            dropped(d.protocol),
            d.label.as_deref().unwrap_or("?"),
            if d.local.is_ipv4() { "ipv4" } else { "ipv6" },
            d.protocol
        ),
        TraceOutcome::Error => {
            format!("{binding}: error {refusal}, {}: the kernel refused {}", dropped(d.protocol), socket("the"))
        }
        TraceOutcome::Seed => format!("seed port {}: assigned {}", d.local.port(), socket("the seed")),
        TraceOutcome::SeedMiss => {
            format!("seed port {}: miss, {}: no seed socket", d.local.port(), dropped(d.protocol))
        }
        TraceOutcome::SeedError => format!(
            "seed port {}: error {refusal}, {}: the kernel refused {}",
            d.local.port(),
            dropped(d.protocol),
            socket("the seed")
        ),
        TraceOutcome::Normal => "no binding: normal lookup".to_string(),
    };
    format!("{time} {} {} > {} {what}", d.protocol, d.remote, d.local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1.5m").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        for bad in ["", "s", "0s", "-1s", "5d", "1e3", "nan"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
