//! The Prometheus endpoint, `steerctl metrics --serve`: concurrent scrapes
//! beside an idle client, only /metrics, 503 without state, a clean exit on
//! SIGTERM, and output that `promtool check metrics` accepts.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Barrier},
    time::Duration,
};

use steer_tests::{TestNs, bin, wait_exit, wait_for_line};

const ADDR: &str = "127.0.0.1:9966";
/// The server's deadline per connection (`--timeout`).
const TIMEOUT: Duration = Duration::from_secs(4);
/// How long it may take to exit after SIGTERM or SIGINT with nothing in flight.
const EXIT_LIMIT: Duration = Duration::from_secs(5);

/// Status line and body of one request sent as `head`.
fn request(head: &str) -> std::io::Result<(String, String)> {
    let addr: SocketAddr = ADDR.parse().unwrap();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(TIMEOUT + Duration::from_secs(1)))?;
    s.write_all(head.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (header, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    Ok((header.lines().next().unwrap_or("").to_string(), body.to_string()))
}

fn get(path: &str) -> std::io::Result<(String, String)> {
    request(&format!("GET {path} HTTP/1.1\r\nHost: steer\r\n\r\n"))
}

/// Starts the endpoint in the namespace and returns once it says it
/// serves (it prints that once it listens); the caller keeps the child to
/// signal it (the namespace's Drop kills it if the test fails first).
fn start_server(ns: &TestNs) -> Child {
    let mut child = ns
        .command(bin("steerctl"))
        .args(["--pin-dir", ns.pin_dir().to_str().unwrap(), "metrics", "--serve", ADDR, "--timeout"])
        .arg(TIMEOUT.as_secs().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting steerctl metrics --serve");
    let stderr = child.stderr.take().unwrap();
    wait_for_line(stderr, &format!("serving metrics on http://{ADDR}/metrics"), "steerctl metrics --serve");
    child
}

/// `promtool check metrics` on `body`, when promtool is installed
/// (scripts/setup.sh --test installs it).
fn promtool_check(body: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not installed: skipping the lint (scripts/setup.sh --test installs it)");
        return;
    };
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\nbody:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn endpoint_serves_concurrent_scrapes_beside_an_idle_client_and_stops_on_sigterm() {
    let ns = TestNs::new("metricshttp");
    ns.steerctl_ok(&["load"]);
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    ns.steerctl_ok(&["bind", "dns", "udp", "::1", "53"]);
    let mut server = start_server(&ns);

    let (status, body) = ns.enter(|| get("/metrics")).unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(body.contains("\nsteer_lookups_total{label=\"web\","), "{body}");
    promtool_check(&body);

    // 20 scrapers at once while a client that connected and sent nothing
    // holds its connection: every scrape is answered while that connection
    // is still open. (A server that served one connection at a time would
    // be waiting on the idle one, and answer the scrapers only after
    // cutting it off.) Then the deadline cuts the idle one off: the server
    // closes it, before the client's own read timeout.
    let (results, held, cut_off) = ns.enter(|| {
        let idle = TcpStream::connect(ADDR).unwrap();
        let barrier = Arc::new(Barrier::new(20));
        let scrapers: Vec<_> = (0..20)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    get("/metrics")
                })
            })
            .collect();
        let results: Vec<_> = scrapers.into_iter().map(|t| t.join().unwrap()).collect();
        idle.set_nonblocking(true).unwrap();
        let held = (&idle).read(&mut [0u8; 16]).map_err(|e| e.kind());
        idle.set_nonblocking(false).unwrap();
        idle.set_read_timeout(Some(TIMEOUT + Duration::from_secs(10))).unwrap();
        let cut_off = (&idle).read(&mut [0u8; 16]).map_err(|e| e.kind());
        (results, held, cut_off)
    });
    for (i, result) in results.into_iter().enumerate() {
        let (status, body) = result.unwrap_or_else(|e| panic!("scrape {i}: {e}"));
        assert_eq!(status, "HTTP/1.1 200 OK", "scrape {i}");
        assert!(body.contains("\nsteer_lookups_total{label=\"dns\","), "scrape {i}: {body}");
    }
    assert_eq!(held, Err(ErrorKind::WouldBlock), "the idle connection was not open after the scrapes");
    assert_eq!(cut_off, Ok(0), "the idle connection was not closed by the server at its deadline");

    let (status, body) = ns.enter(|| get("/other")).unwrap();
    assert_eq!(status, "HTTP/1.1 404 Not Found", "{body}");
    let (status, _) = ns.enter(|| request("DELETE /metrics HTTP/1.1\r\nHost: steer\r\n\r\n")).unwrap();
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

    // Without state: 503 and one line saying why, and the endpoint stays up.
    ns.steerctl_ok(&["unload"]);
    let (status, body) = ns.enter(|| get("/metrics")).unwrap();
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    assert!(body.contains("no steer state at") && body.contains("steerctl load"), "{body}");
    ns.steerctl_ok(&["load"]);
    let (status, _) = ns.enter(|| get("/metrics")).unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK");

    // SIGTERM: a clean exit, promptly.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = wait_exit(&mut server, EXIT_LIMIT);
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(ns.enter(|| TcpStream::connect(ADDR)).is_err(), "still listening after exit");
}

#[test]
fn endpoint_starts_without_state_and_answers_503() {
    let ns = TestNs::new("metrics503");
    let mut server = start_server(&ns);
    let (status, body) = ns.enter(|| get("/metrics")).unwrap();
    assert_eq!(status, "HTTP/1.1 503 Service Unavailable", "{body}");
    assert_eq!(body.lines().count(), 1, "{body}");
    ns.steerctl_ok(&["load"]);
    let (status, body) = ns.enter(|| get("/metrics")).unwrap();
    assert_eq!(status, "HTTP/1.1 200 OK", "{body}");
    promtool_check(&body);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(server.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = wait_exit(&mut server, EXIT_LIMIT);
    assert!(status.success(), "exit after SIGINT: {status}");
}
