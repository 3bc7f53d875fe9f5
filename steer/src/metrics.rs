//! Per-label counters in the Prometheus text format, and a tiny endpoint.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener},
};

use crate::{
    Layout,
    dispatcher::Dispatcher,
    error::{Context, Result},
    labelled::{Counters, LabelStats},
};

/// The metrics in the Prometheus text exposition format.
pub fn prometheus(stats: &[LabelStats]) -> String {
    type Counter = (&'static str, &'static str, fn(&Counters) -> u64);
    let counters: [Counter; 3] = [
        ("steer_lookups_total", "Connections matched to a label's binding.", |m| m.lookups),
        ("steer_misses_total", "Matched connections dropped because the label has no socket.", |m| m.misses),
        ("steer_errors_total", "Matched connections dropped because the socket was refused (sk_assign).", |m| m.errors),
    ];
    let mut out = String::new();
    for (name, help, value) in counters {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
        for s in stats {
            out.push_str(&format!("{name}{{label=\"{}\"}} {}\n", s.label, value(&s.metrics)));
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

    #[test]
    fn prometheus_text_has_help_type_and_one_line_per_label() {
        let stats = [
            LabelStats { label: "web".into(), metrics: Counters { lookups: 6, misses: 1, errors: 0 } },
            LabelStats { label: "dns".into(), metrics: Counters { lookups: 2, misses: 0, errors: 3 } },
        ];
        let text = prometheus(&stats);
        assert!(text.contains("# TYPE steer_lookups_total counter\n"));
        assert!(text.contains("steer_lookups_total{label=\"web\"} 6\n"));
        assert!(text.contains("steer_errors_total{label=\"dns\"} 3\n"));
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 6);
    }
}
