//! Per-destination counters in the Prometheus text format, and a tiny endpoint.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
};

use crate::{
    Layout,
    dispatcher::Dispatcher,
    error::{Context, Result},
    labelled::DestStats,
};

/// The metrics in the Prometheus text exposition format.
pub fn prometheus(stats: &[DestStats]) -> String {
    type Counter = (&'static str, &'static str, fn(&DestStats) -> u64);
    let counters: [Counter; 2] = [
        ("steer_lookups_total", "Connections matched to a label's binding.", |s| s.lookups),
        (
            "steer_misses_total",
            "Matched connections dropped: the label has no socket for their family and protocol.",
            |s| s.misses,
        ),
    ];
    let mut out = String::new();
    let labels = |s: &DestStats| format!("label=\"{}\",domain=\"{}\",protocol=\"{}\"", s.label, s.domain, s.protocol);
    for (name, help, value) in counters {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} counter\n");
        for s in stats {
            let _ = writeln!(out, "{name}{{{}}} {}", labels(s), value(s));
        }
    }
    let name = "steer_errors_total";
    let _ = write!(
        out,
        "# HELP {name} Matched connections dropped: the kernel refused the socket (sk_assign), by reason.\n# TYPE {name} counter\n"
    );
    for s in stats {
        for (reason, n) in &s.errors_by_reason {
            let _ = writeln!(out, "{name}{{{},reason=\"{reason}\"}} {n}", labels(s));
        }
    }
    out
}

/// Answers every HTTP request on `addr` with the current metrics, until killed.
pub fn serve(layout: &Layout, addr: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    log::info!("serving metrics on http://{}/metrics", listener.local_addr()?);
    for mut conn in listener.incoming().flatten() {
        // The request itself does not matter: every path gets the metrics.
        let mut request = [0u8; 1024];
        let _ = conn.read(&mut request);
        let body = match Dispatcher::open_read(layout).and_then(|d| d.metrics()) {
            Ok(stats) => prometheus(&stats),
            Err(e) => format!("# error: {e}\n"),
        };
        let _ = write!(
            conn,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::socket::{Family, Protocol};

    #[test]
    fn prometheus_text_has_help_type_and_one_line_per_destination() {
        let stat = |label: &str, lookups, errors: u64| DestStats {
            label: label.into(),
            domain: Family::Ipv4,
            protocol: Protocol::Tcp,
            lookups,
            misses: 1,
            errors,
            errors_by_reason: [("bad_socket", errors), ("other", 0)].into_iter().collect(),
        };
        let text = prometheus(&[stat("web", 6, 0), stat("dns", 2, 3)]);
        assert!(text.contains("# TYPE steer_lookups_total counter\n"));
        assert!(text.contains("steer_lookups_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 6\n"), "{text}");
        assert!(
            text.contains(
                "steer_errors_total{label=\"dns\",domain=\"ipv4\",protocol=\"tcp\",reason=\"bad_socket\"} 3\n"
            )
        );
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 8);
    }
}
