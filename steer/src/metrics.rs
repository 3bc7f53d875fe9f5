//! Per-destination counters in the Prometheus text format, and the HTTP endpoint
//! that serves them.
//!
//! The endpoint's body comes from one function, [`render`]: it reads the
//! state (shared lock, released before it returns) and formats it with
//! [`prometheus`]. The server around it is hyper on a single-threaded tokio
//! runtime: connections are served concurrently, the state is read on a
//! small blocking pool, and every connection has one deadline for reading
//! the request, answering and writing, so an idle or slow client costs a
//! socket for at most that long and holds up nobody else.

use std::{
    convert::Infallible,
    fmt::Write as _,
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};

use crate::{
    Layout,
    dispatcher::Dispatcher,
    error::{Context, Error, Result},
    labelled::DestStats,
    socket::{Family, Protocol},
};
use serde::Serialize;

/// The only path served.
pub const PATH: &str = "/metrics";
/// The Prometheus text exposition format.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Default for [`Server::bind`]'s per-connection deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Threads reading the state (flock and map reads block).
const READ_THREADS: usize = 4;

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
    pub build: BuildInfo,
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
pub fn report<A: crate::dispatcher::Access>(d: &Dispatcher<A>) -> Result<MetricsReport> {
    let mut bindings = std::collections::BTreeMap::new();
    for b in d.bindings()? {
        let domain = if b.prefix.addr.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 };
        *bindings.entry((b.label, domain, b.protocol)).or_insert(0) += 1;
    }
    let gauges = |m: std::collections::BTreeMap<(String, Family, Protocol), u64>| {
        m.into_iter().map(|((label, domain, protocol), value)| Gauge { label, domain, protocol, value }).collect()
    };
    let registered = d.registered()?.into_iter().map(|k| (k, 1)).collect();
    let seed = d.seed_metrics()?;
    Ok(MetricsReport {
        destinations: d.metrics()?,
        bindings: gauges(bindings),
        registered_sockets: gauges(registered),
        labels: d.labels()?.len(),
        seed: SeedReport { ports: d.ports()?.len(), lookups: seed.lookups, misses: seed.misses, errors: seed.errors },
        build: BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            program_tag: format!("{:016x}", d.program_tag()?),
        },
    })
}

/// Writes one metric family: HELP, TYPE, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: impl IntoIterator<Item = (String, u64)>) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
    for (labels, value) in samples {
        let braces = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}{braces} {value}");
    }
}

fn dest_labels(label: &str, domain: Family, protocol: Protocol) -> String {
    format!("label=\"{label}\",domain=\"{domain}\",protocol=\"{protocol}\"")
}

/// The report in the Prometheus text exposition format.
pub fn prometheus(report: &MetricsReport) -> String {
    let mut out = String::new();
    let dests = &report.destinations;
    let by_dest =
        |f: fn(&DestStats) -> u64| dests.iter().map(move |s| (dest_labels(&s.label, s.domain, s.protocol), f(s)));
    family(
        &mut out,
        "steer_lookups_total",
        "counter",
        "Connections matched to a label's binding.",
        by_dest(|s| s.lookups),
    );
    family(
        &mut out,
        "steer_misses_total",
        "counter",
        "Matched connections dropped: the label has no socket for their family and protocol.",
        by_dest(|s| s.misses),
    );
    family(
        &mut out,
        "steer_errors_total",
        "counter",
        "Matched connections dropped: the kernel refused the label's socket (bpf_sk_assign), by reason.",
        dests.iter().flat_map(|s| {
            s.errors_by_reason
                .iter()
                .map(|(reason, n)| (format!("{},reason=\"{reason}\"", dest_labels(&s.label, s.domain, s.protocol)), *n))
        }),
    );
    let gauge =
        |g: &Vec<Gauge>| g.iter().map(|g| (dest_labels(&g.label, g.domain, g.protocol), g.value)).collect::<Vec<_>>();
    family(
        &mut out,
        "steer_bindings",
        "gauge",
        "Bindings of a label, by the prefix's family and protocol.",
        gauge(&report.bindings),
    );
    family(
        &mut out,
        "steer_registered_sockets",
        "gauge",
        "Sockets registered for a label, by family and protocol (0 or 1).",
        gauge(&report.registered_sockets),
    );
    family(&mut out, "steer_labels", "gauge", "Labels in use.", [(String::new(), report.labels as u64)]);
    let seed = &report.seed;
    family(&mut out, "steer_seed_ports", "gauge", "Ports on the seed port list.", [(String::new(), seed.ports as u64)]);
    family(
        &mut out,
        "steer_seed_lookups_total",
        "counter",
        "Connections to a port on the seed list.",
        [(String::new(), seed.lookups)],
    );
    family(
        &mut out,
        "steer_seed_misses_total",
        "counter",
        "Connections to a seed port dropped: no seed socket.",
        [(String::new(), seed.misses)],
    );
    family(
        &mut out,
        "steer_seed_errors_total",
        "counter",
        "Connections to a seed port dropped: the kernel refused the seed socket.",
        [(String::new(), seed.errors)],
    );
    let build = &report.build;
    family(
        &mut out,
        "steer_build_info",
        "gauge",
        "steer's version and the loaded program's tag.",
        [(format!("version=\"{}\",program_tag=\"{}\"", build.version, build.program_tag), 1)],
    );
    out
}

/// The body of a scrape: the state read afresh.
pub fn render(layout: &Layout) -> Result<String> {
    Ok(prometheus(&report(&Dispatcher::open_read(layout)?)?))
}

/// True when `e` means there is no state to report (never loaded, unloaded,
/// bpffs not mounted, a pin gone): the endpoint answers 503 then.
pub fn is_unavailable(e: &Error) -> bool {
    matches!(e.root(), Error::NotLoaded { .. } | Error::NotBpffs { .. } | Error::Pin(_))
}

/// An error and its causes on one line.
fn one_line(e: &Error) -> String {
    let chain: Vec<String> =
        std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source()).map(ToString::to_string).collect();
    chain.join(": ").replace(['\r', '\n'], " ")
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// One request: GET or HEAD of [`PATH`] reads the state afresh.
async fn answer(req: Request<Incoming>, layout: Arc<Layout>) -> Result<Response<Full<Bytes>>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    log::debug!("{} {}", req.method(), req.uri());
    if req.uri().path() != PATH {
        return Ok(text(StatusCode::NOT_FOUND, PLAIN, format!("not found: metrics are served at {PATH}\n")));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "method not allowed: use GET\n".into());
        response.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    Ok(match tokio::task::spawn_blocking(move || render(&layout)).await {
        Ok(Ok(body)) => text(StatusCode::OK, CONTENT_TYPE_TEXT, body),
        Ok(Err(e)) if is_unavailable(&e) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{}\n", one_line(&e))),
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("{}\n", one_line(&e))),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, PLAIN, format!("reading the metrics failed: {e}\n")),
    })
}

/// The metrics endpoint, bound and ready; [`Server::run`] serves it until
/// SIGTERM or SIGINT.
pub struct Server {
    runtime: tokio::runtime::Runtime,
    listener: TcpListener,
    layout: Arc<Layout>,
    timeout: Duration,
    /// Installed at bind, so a SIGTERM right after startup is a clean stop too.
    signals: [tokio::signal::unix::Signal; 2],
}

impl Server {
    /// Binds `addr`. `timeout` bounds each connection from accept to the
    /// last byte written: reading the request, reading the state, writing.
    pub fn bind(layout: &Layout, addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .max_blocking_threads(READ_THREADS)
            .build()
            .context("starting the metrics server's runtime")?;
        let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
        listener.set_nonblocking(true)?;
        let signals = {
            let _runtime = runtime.enter();
            [
                signal(SignalKind::terminate()).context("handling SIGTERM")?,
                signal(SignalKind::interrupt()).context("handling SIGINT")?,
            ]
        };
        Ok(Self { runtime, listener, layout: Arc::new(layout.clone()), timeout, signals })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until SIGTERM or SIGINT, then stops accepting, lets the
    /// connections in flight finish (within the timeout) and returns.
    pub fn run(self) -> Result<()> {
        let Self { runtime, listener, layout, timeout, signals: [mut term, mut int] } = self;
        runtime.block_on(async move {
            let stop = async move {
                tokio::select! {
                    _ = term.recv() => log::info!("SIGTERM: shutting down"),
                    _ = int.recv() => log::info!("SIGINT: shutting down"),
                }
            };
            serve(tokio::net::TcpListener::from_std(listener)?, layout, timeout, stop).await
        })
    }
}

/// Accepts and serves connections until `stop` completes.
async fn serve(
    listener: tokio::net::TcpListener,
    layout: Arc<Layout>,
    timeout: Duration,
    stop: impl Future<Output = ()>,
) -> Result<()> {
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(stop);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut stop => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    log::debug!("connection from {peer}");
                    stream
                }
                Err(e) => {
                    // Out of fds or memory: back off instead of spinning.
                    log::warn!("accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let layout = layout.clone();
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeout)
            // One request per connection: the deadline below covers all of it.
            .keep_alive(false)
            // `printf 'GET ...' | nc` shuts its side down after the request:
            // still answer it.
            .half_close(true)
            .serve_connection(TokioIo::new(stream), service_fn(move |req| answer(req, layout.clone())));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            match tokio::time::timeout(timeout, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => log::debug!("connection: {e}"),
                Err(_) => log::debug!("connection dropped after {timeout:?}"),
            }
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(timeout, graceful.shutdown()).await.is_err() {
        log::warn!("connections still open after {timeout:?}; closing them");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

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
        let report = MetricsReport {
            destinations: vec![stat("web", 6, 0), stat("dns", 2, 3)],
            bindings: vec![Gauge { label: "web".into(), domain: Family::Ipv6, protocol: Protocol::Udp, value: 4 }],
            labels: 2,
            seed: SeedReport { ports: 3, lookups: 5, misses: 1, errors: 0 },
            build: BuildInfo { version: "0.1.0".into(), program_tag: "00ff".into() },
            ..Default::default()
        };
        let text = prometheus(&report);
        assert!(text.contains("# TYPE steer_lookups_total counter\n"));
        assert!(text.contains("steer_bindings{label=\"web\",domain=\"ipv6\",protocol=\"udp\"} 4\n"), "{text}");
        assert!(text.contains("# TYPE steer_registered_sockets gauge\n"), "{text}");
        assert!(
            text.contains("steer_labels 2\nsteer_seed_ports 3\n") || text.contains("steer_seed_ports 3\n"),
            "{text}"
        );
        assert!(text.contains("steer_seed_lookups_total 5\n"), "{text}");
        assert!(text.contains("steer_build_info{version=\"0.1.0\",program_tag=\"00ff\"} 1\n"), "{text}");
        assert!(text.contains("steer_lookups_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 6\n"), "{text}");
        assert!(
            text.contains(
                "steer_errors_total{label=\"dns\",domain=\"ipv4\",protocol=\"tcp\",reason=\"bad_socket\"} 3\n"
            )
        );
        // 2 lookups, 2 misses, 4 errors, 1 binding gauge, labels, 4 seed lines, build info.
        assert_eq!(text.lines().filter(|l| !l.starts_with('#')).count(), 15);
    }

    #[test]
    fn errors_fit_on_one_line() {
        let e: Result<()> = Err(Error::Pin("no map\npinned".into())).context("opening maps");
        assert_eq!(one_line(&e.unwrap_err()), "opening maps: no map pinned");
    }

    /// Serves on an ephemeral port with a state directory that does not
    /// exist, until the returned sender is dropped.
    fn start() -> (SocketAddr, std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>) {
        let server =
            Server::bind(&Layout::new("/nonexistent/steer"), "127.0.0.1:0".parse().unwrap(), Duration::from_secs(1))
                .unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let Server { runtime, listener, layout, timeout, .. } = server;
            runtime.block_on(async move {
                let stop = async move {
                    let _ = tokio::task::spawn_blocking(move || rx.recv()).await;
                };
                serve(tokio::net::TcpListener::from_std(listener).unwrap(), layout, timeout, stop).await.unwrap();
            });
        });
        (addr, tx, thread)
    }

    /// Sends `head`, shuts down the write side (as `nc` does at the end
    /// of its input) and reads the whole answer.
    fn request(addr: SocketAddr, head: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn other_paths_and_methods_are_refused_and_idle_clients_are_cut_off() {
        let (addr, stop, thread) = start();
        let idle = std::net::TcpStream::connect(addr).unwrap();
        let got = request(addr, "GET /other HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 404 Not Found\r\n"), "{got}");
        let got = request(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"), "{got}");
        assert!(got.to_ascii_lowercase().contains("allow: get, head\r\n"), "{got}");
        // No state: 503 (as root) or 500 (no capabilities), one line either way.
        let got = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 503 ") || got.starts_with("HTTP/1.1 500 "), "{got}");
        assert_eq!(got.split("\r\n\r\n").nth(1).unwrap().lines().count(), 1, "{got}");
        // The idle client is closed once its deadline passes.
        let started = std::time::Instant::now();
        idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = (&idle).read(&mut [0u8; 64]).unwrap_or(0);
        assert_eq!(n, 0);
        assert!(started.elapsed() < Duration::from_secs(3), "idle client kept for {:?}", started.elapsed());
        drop(stop);
        thread.join().unwrap();
    }
}
