//! The metrics endpoint: `steerctl metrics --serve ADDR`.
//!
//! Its body comes from one function, `steer::ops::metrics::render`: it
//! reads the state (shared lock, released before it returns) and writes
//! the OpenMetrics text. The server around it is hyper on a
//! single-threaded tokio runtime: connections are served concurrently, the
//! state is read on a small blocking pool, and every connection has one
//! deadline for reading the request, answering and writing, so an idle or
//! slow client costs a socket for at most that long and holds up nobody
//! else.

use std::{
    convert::Infallible,
    net::{SocketAddr, TcpListener},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ACCEPT, ALLOW, CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use steer::{
    Error, Layout,
    ops::metrics::{self, render},
};
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Semaphore,
};

/// The only path served.
pub const PATH: &str = "/metrics";
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// Threads reading the state (flock and map reads block).
const READ_THREADS: usize = 4;

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
    // Prometheus asks for OpenMetrics; curl, promtool and older scrapers
    // get the classic text format.
    let openmetrics = req
        .headers()
        .get_all(ACCEPT)
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("application/openmetrics-text")));
    let content_type = if openmetrics { metrics::CONTENT_TYPE } else { metrics::CONTENT_TYPE_CLASSIC };
    Ok(match tokio::task::spawn_blocking(move || render(&layout, openmetrics)).await {
        Ok(Ok(body)) => text(StatusCode::OK, content_type, body),
        Ok(Err(e)) if metrics::is_unavailable(&e) => {
            text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{}\n", one_line(&e)))
        }
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
    fn errors_fit_on_one_line() {
        let e: steer::Result<()> =
            steer::error::Context::context(Err(Error::Pin("no map\npinned".into())), "opening maps");
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
        // No state: 503 (the tests run as root, so the capability check passes).
        let got = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(got.starts_with("HTTP/1.1 503 "), "{got}");
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
