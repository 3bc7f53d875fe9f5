//! Servers followed by the kernel against `steerctl watch` polling every
//! 10 ms (the way before): connections that fail while a server restarts
//! under load, the time from listen()/bind() returning to the first steered
//! connection, and watch's CPU time while nothing happens. Each pair runs
//! in the same run, one after the other, on the benchmark's one CPU (the
//! watch child inherits the pinning). Servers are sockets of this process;
//! a polling watch takes them with pidfd_getfd, as it would a server's.

use std::{
    io::{IoSlice, IoSliceMut, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc::{Receiver, RecvTimeoutError},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::socket::{
    AddressFamily, Backlog, ControlMessage, ControlMessageOwned, MsgFlags, Shutdown, SockFlag, SockType, SockaddrIn,
    SockaddrStorage, bind, listen, recvmsg, sendmsg, setsockopt, shutdown, socket, sockopt,
};
use serde::Serialize;
use steer::{
    Dispatcher, Layout,
    model::{
        Binding, BindingsFile, Family, Prefix, Protocol,
        config::{Config, Wanted},
    },
};

use crate::{cost::Skipped, rate::median};

/// The interval `steerctl watch` polls at (its default).
pub const POLL_INTERVAL_MS: u64 = 10;
/// Servers bind here; clients reach them through `STEERED`, where nothing is bound.
const SERVER: Ipv4Addr = Ipv4Addr::LOCALHOST;
const STEERED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Unrelated listeners, on an address nothing is bound to.
const UNRELATED: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
const UNRELATED_FIRST_PORT: u16 = 40000;
/// The idle watch's registrations: label `idleNNN`, server port base + NNN.
const IDLE_FIRST_PORT: u16 = 31000;
/// A client's connect or read, and each wait for a server or for watch.
const IO_TIMEOUT: Duration = Duration::from_secs(3);
const READY_LIMIT: Duration = Duration::from_secs(10);
/// Watch's first pass may register 100 sockets among 10,000 listeners.
const WATCHING_LIMIT: Duration = Duration::from_secs(120);
/// How long a server may stay unsteered before a sample counts as missed.
const PROBE_LIMIT: Duration = Duration::from_secs(5);
/// Between probes of a server that is not steered yet.
const PROBE_PAUSE: Duration = Duration::from_micros(100);

pub struct Counts {
    pub restarts: usize,
    /// Connections that must succeed between two restarts.
    pub between: usize,
    pub samples: usize,
    pub idle_window: Duration,
    pub idle_registrations: usize,
    pub unrelated_listeners: usize,
}

impl Counts {
    pub fn new(quick: bool) -> Self {
        if quick {
            Counts {
                restarts: 3,
                between: 20,
                samples: 3,
                idle_window: Duration::from_millis(500),
                idle_registrations: 100,
                unrelated_listeners: 1_000,
            }
        } else {
            Counts {
                restarts: 50,
                between: 200,
                samples: 50,
                idle_window: Duration::from_secs(10),
                idle_registrations: 100,
                unrelated_listeners: 10_000,
            }
        }
    }
}

/// Who puts a restarted server's socket in its label's slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// The follow programs, inside listen() (TCP) or through watch's
    /// backfill on the ring buffer's event (UDP).
    Followed,
    /// `steerctl watch` with `"follow": false`, checking every 10 ms.
    Polled,
}

impl Way {
    pub const BOTH: [Way; 2] = [Way::Followed, Way::Polled];

    fn name(self) -> &'static str {
        match self {
            Way::Followed => "followed",
            Way::Polled => "polled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// A new SO_REUSEPORT listener listens, then the old one closes.
    Graceful,
    /// The old listener closes, then a new one binds and listens.
    Hard,
}

#[derive(Debug, Clone, Serialize)]
pub struct RestartRow {
    pub restart: Restart,
    pub way: Way,
    pub restarts: usize,
    /// Every connection the client tried, failed or not.
    pub connections: usize,
    /// Refused, reset or timed out.
    pub failed: usize,
    pub failed_per_restart: f64,
    pub max_failed_in_one_restart: usize,
    /// Failed although begun after the new listener's listen() returned.
    pub failed_after_listen: usize,
    /// From the new listen() returning to the first connection that
    /// succeeded after the restart's last failure, over the restarts.
    pub steered_median_ms: f64,
    pub steered_max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    pub protocol: Protocol,
    pub way: Way,
    pub samples: usize,
    /// Steered by the first probe, made right after listen()/bind() returned.
    pub at_once: usize,
    /// From listen()/bind() returning to the first steered answer.
    pub median_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Samples not steered within PROBE_LIMIT (left out of the times).
    pub missed: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdleRow {
    pub way: Way,
    pub registrations: usize,
    /// Registrations whose server listens (their slots checked to hold it).
    pub listening: usize,
    pub unrelated_listeners: usize,
    pub window_s: f64,
    /// watch's utime+stime over the window (/proc/PID/stat), in clock ticks.
    pub ticks: u64,
    pub cpu_percent: f64,
    /// The same from the scheduler's ns count (/proc/PID/task/*/schedstat).
    pub on_cpu_ms: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowReport {
    pub poll_interval_ms: u64,
    pub restarts: Vec<RestartRow>,
    pub latency: Vec<LatencyRow>,
    pub watch_idle: Vec<IdleRow>,
}

/// Label and ports of one test: the server listens on SERVER:`server_port`,
/// clients go to STEERED:`steered_port`, bound to `label`.
#[derive(Clone)]
struct Service {
    label: String,
    protocol: Protocol,
    server_port: u16,
    steered_port: u16,
}

impl Service {
    fn new(label: &str, protocol: Protocol, server_port: u16, steered_port: u16) -> Self {
        Self { label: label.into(), protocol, server_port, steered_port }
    }

    fn server(&self) -> SocketAddr {
        SocketAddr::from((SERVER, self.server_port))
    }

    fn steered(&self) -> SocketAddr {
        SocketAddr::from((STEERED, self.steered_port))
    }

    fn binding(&self) -> Binding {
        let prefix = Prefix::new(STEERED.into(), 32).expect("a /32 is a prefix");
        Binding { label: self.label.clone(), protocol: self.protocol, prefix, port: self.steered_port }
    }

    fn wanted(&self, way: Way) -> Wanted {
        wanted(&self.label, self.protocol, self.server_port, way)
    }
}

fn wanted(label: &str, protocol: Protocol, port: u16, way: Way) -> Wanted {
    Wanted {
        label: label.into(),
        protocol,
        address: SERVER.into(),
        port,
        no_reuseport: false,
        pid_file: None,
        process: None,
        follow: (way == Way::Polled).then_some(false),
        cgroup: None,
    }
}

/// Each test's service for each way: own labels and ports, so nothing one
/// leaves behind (a slot's socket, TIME_WAIT) touches another.
fn service(test: &str, protocol: Protocol, way: Way, port: u16) -> Service {
    let (label, port) = match way {
        Way::Followed => (format!("{test}-followed"), port),
        Way::Polled => (format!("{test}-polled"), port + 1),
    };
    // UDP replies come from the server's own port: steer the same port.
    let steered_port = if protocol == Protocol::Udp { port } else { port + 100 };
    Service::new(&label, protocol, port, steered_port)
}

fn restart_service(restart: Restart, way: Way) -> Service {
    match restart {
        Restart::Graceful => service("graceful", Protocol::Tcp, way, 8101),
        Restart::Hard => service("hard", Protocol::Tcp, way, 8111),
    }
}

fn latency_service(protocol: Protocol, way: Way) -> Service {
    match protocol {
        Protocol::Tcp => service("listen", protocol, way, 8121),
        Protocol::Udp => service("bind", protocol, way, 8131),
    }
}

fn idle_label(i: usize) -> String {
    format!("idle{i:03}")
}

/// Measures every row; rows needing `steerctl` (the polled ones, UDP's
/// followed one, watch's CPU) are skipped without it.
pub fn measure(
    layout: &Layout,
    scratch: &Path,
    steerctl: Option<&Path>,
    counts: &Counts,
    skipped: &mut Vec<Skipped>,
) -> Result<FollowReport> {
    let mut report = FollowReport { poll_interval_ms: POLL_INTERVAL_MS, ..Default::default() };
    if let Some(why) = steer::ops::follow::unsupported() {
        skipped.push(Skipped { program: "following servers".into(), reason: why });
        return Ok(report);
    }
    if steerctl.is_none() {
        skipped.push(Skipped {
            program: "following servers: watch-polled rows, UDP and watch's CPU".into(),
            reason: "no steerctl next to steer-bench (cargo build --workspace)".into(),
        });
    }
    // A closing listener's queued connections go to the next member of its
    // reuseport group instead of being reset: a graceful handover needs it,
    // whoever steers. This namespace's setting only.
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1").context("setting net.ipv4.tcp_migrate_req")?;
    // UDP probes learn "not steered" from the port unreachable that comes
    // back; unlimited, or the 1,000/s global limit turns them into timeouts.
    std::fs::write("/proc/sys/net/ipv4/icmp_ratemask", "0").context("setting net.ipv4.icmp_ratemask")?;
    raise_fd_limit(counts.unrelated_listeners + counts.idle_registrations + 1024)?;

    let mut bindings = Vec::new();
    for way in Way::BOTH {
        for restart in [Restart::Graceful, Restart::Hard] {
            bindings.push(restart_service(restart, way).binding());
        }
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            bindings.push(latency_service(protocol, way).binding());
        }
    }
    for i in 0..counts.idle_registrations {
        let prefix = Prefix::new(Ipv4Addr::new(10, 2, i as u8, 0).into(), 24)?;
        bindings.push(Binding { label: idle_label(i), protocol: Protocol::Tcp, prefix, port: 80 });
    }
    let state = Dispatcher::open_write(layout)?;
    steer::ops::bindings::load_bindings(&state, &BindingsFile { bindings })?;
    steer::ops::lifecycle::attach(&state)?;
    drop(state);
    let ctx = Ctx { layout, scratch, steerctl };

    let mut run = || -> Result<()> {
        for restart in [Restart::Graceful, Restart::Hard] {
            for way in Way::BOTH {
                if let Some(row) = ctx.restarts(restart, way, counts)? {
                    report.restarts.push(row);
                }
            }
        }
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            for way in Way::BOTH {
                if let Some(row) = ctx.latency(protocol, way, counts.samples)? {
                    report.latency.push(row);
                }
            }
        }
        if ctx.steerctl.is_some() {
            report.watch_idle = ctx.idle(counts)?;
        }
        Ok(())
    };
    let done = run();
    // Cleaned up even after a failure: unload is the caller's.
    let state = Dispatcher::open_write(layout)?;
    steer::ops::follow::set(&state, &[])?;
    steer::ops::bindings::load_bindings(&state, &BindingsFile::default())?;
    drop(state);
    steer::ops::lifecycle::detach(&Dispatcher::open_repair(layout)?)?;
    done?;
    Ok(report)
}

/// Room for the unrelated listeners (children inherit it: watch scans them).
fn raise_fd_limit(wanted: usize) -> Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let wanted = wanted as u64;
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted, hard.max(wanted)).context("raising RLIMIT_NOFILE")?;
    }
    Ok(())
}

struct Ctx<'a> {
    layout: &'a Layout,
    scratch: &'a Path,
    steerctl: Option<&'a Path>,
}

/// What keeps a way's registrations while it is measured: a watch child,
/// or nothing (the kernel follows TCP on its own).
struct Keeper {
    _watch: Option<Watch>,
}

impl Ctx<'_> {
    /// Sets up `way` for `registrations`: a followed TCP config is applied
    /// (no watch: the kernel follows); otherwise `steerctl watch` runs it.
    /// None when that needs steerctl and there is none.
    fn keep(&self, name: &str, registrations: Vec<Wanted>, way: Way) -> Result<Option<Keeper>> {
        let config = Config { bindings: None, registrations };
        let tcp_only = config.registrations.iter().all(|w| w.protocol == Protocol::Tcp);
        if way == Way::Followed && tcp_only {
            let applied = steer::ops::apply::apply(&Dispatcher::open_write(self.layout)?, &config)?;
            if !applied.failed.is_empty() {
                bail!("applying the {name} config: {:?}", applied.failed);
            }
            return Ok(Some(Keeper { _watch: None }));
        }
        let Some(steerctl) = self.steerctl else { return Ok(None) };
        let path = self.scratch.join(format!("{name}.json"));
        std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
        Ok(Some(Keeper { _watch: Some(Watch::start(steerctl, self.layout, &path)?) }))
    }

    fn restarts(&self, restart: Restart, way: Way, counts: &Counts) -> Result<Option<RestartRow>> {
        let svc = restart_service(restart, way);
        let Some(_keeper) = self.keep(&svc.label, vec![svc.wanted(way)], way)? else { return Ok(None) };
        let reuseport = restart == Restart::Graceful;
        let mut server = TcpServer::start(svc.server(), reuseport)
            .with_context(|| format!("{} {restart:?} restarts: starting the first server", way.name()))?;
        wait_steered(svc.steered()).with_context(|| format!("{} {restart:?} restarts: first server", way.name()))?;
        // Room for PROBE_LIMIT of failures (paced by PROBE_PAUSE) per restart.
        let most = (counts.restarts + 1) * (counts.between + 50_000);
        let client = Client::start(svc.steered(), most, Duration::from_secs(300));
        // (began, listening): the restart's start, and the new listen() returning.
        let mut marks: Vec<(Instant, Instant)> = Vec::new();
        let mut run = || -> Result<()> {
            client.wait_for(counts.between).context("before the first restart")?;
            for r in 0..counts.restarts {
                let began = Instant::now();
                let listening = match restart {
                    Restart::Graceful => {
                        let new = TcpServer::start(svc.server(), true)
                            .with_context(|| format!("{} graceful restart {r}", way.name()))?;
                        let listening = Instant::now();
                        std::mem::replace(&mut server, new).stop();
                        listening
                    }
                    Restart::Hard => {
                        std::mem::replace(&mut server, TcpServer::placeholder()).stop();
                        server = TcpServer::start(svc.server(), false)?;
                        Instant::now()
                    }
                };
                marks.push((began, listening));
                // `between` more after the restart: at least between - 1 of
                // them begun after it, so each restart sees its server back.
                client.wait_for(client.succeeded() + counts.between).with_context(|| format!("after restart {r}"))?;
            }
            Ok(())
        };
        let ran = run();
        let outcome = client.finish();
        server.stop();
        ran.with_context(|| format!("{} {restart:?} restarts", way.name()))?;
        // A failure goes to the last restart begun before it ended: one
        // begun just before a restart and failed by it is that restart's.
        let restart_of = |t: Instant| marks.iter().rposition(|(began, _)| *began <= t);
        let mut per_restart = vec![0usize; marks.len().max(1)];
        let mut last_failure: Vec<Option<usize>> = vec![None; marks.len()];
        let mut after_listen = 0;
        for (n, t) in outcome.tries.iter().enumerate().filter(|(_, t)| !t.ok) {
            let i = restart_of(t.ended);
            per_restart[i.unwrap_or(0)] += 1;
            if let Some(i) = i {
                last_failure[i] = Some(n);
                if t.began >= marks[i].1 {
                    after_listen += 1;
                }
            }
        }
        // Steered again: the first success begun after both the new
        // listen() and the restart's last failure (the client's next
        // connection at best: its resolution is one connection).
        let mut steered = Vec::new();
        for (i, (_, listening)) in marks.iter().enumerate() {
            let from = last_failure[i].map_or(0, |n| n + 1);
            let back = outcome.tries[from.min(outcome.tries.len())..].iter().find(|t| t.ok && t.began >= *listening);
            match back {
                Some(t) => steered.push(t.began.duration_since(*listening).as_secs_f64() * 1000.0),
                None => bail!("{} {restart:?} restart {i}: no connection succeeded after it", way.name()),
            }
        }
        let failed = outcome.tries.iter().filter(|t| !t.ok).count();
        Ok(Some(RestartRow {
            restart,
            way,
            restarts: counts.restarts,
            connections: outcome.tries.len(),
            failed,
            failed_per_restart: failed as f64 / counts.restarts.max(1) as f64,
            max_failed_in_one_restart: per_restart.iter().copied().max().unwrap_or(0),
            failed_after_listen: after_listen,
            steered_max_ms: steered.iter().copied().fold(f64::NAN, f64::max),
            steered_median_ms: median(steered),
        }))
    }

    fn latency(&self, protocol: Protocol, way: Way, samples: usize) -> Result<Option<LatencyRow>> {
        let svc = latency_service(protocol, way);
        let Some(_keeper) = self.keep(&svc.label, vec![svc.wanted(way)], way)? else { return Ok(None) };
        let mut times = Vec::new();
        let (mut at_once, mut missed) = (0, 0);
        for i in 0..samples {
            // Not in step with the polling: servers start at any point of its interval.
            std::thread::sleep(Duration::from_micros(fastrand::u64(0..POLL_INTERVAL_MS * 1000)));
            let probe = match protocol {
                Protocol::Tcp => tcp_first_steered(&svc),
                Protocol::Udp => udp_first_steered(&svc),
            };
            match probe.with_context(|| format!("{} {protocol} sample {i}", way.name()))? {
                Some((elapsed, first)) => {
                    times.push(elapsed.as_secs_f64() * 1000.0);
                    at_once += usize::from(first);
                }
                None => missed += 1,
            }
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = |q: f64| sorted.get(((q * sorted.len() as f64).ceil() as usize).saturating_sub(1)).copied();
        Ok(Some(LatencyRow {
            protocol,
            way,
            samples,
            at_once,
            median_ms: median(times),
            p99_ms: rank(0.99).unwrap_or(f64::NAN),
            max_ms: sorted.last().copied().unwrap_or(f64::NAN),
            missed,
        }))
    }

    /// watch's CPU over an idle window, with 100 registrations of which
    /// 10 and then all have their server listening, among `unrelated`
    /// listeners nothing steers to.
    fn idle(&self, counts: &Counts) -> Result<Vec<IdleRow>> {
        let n = counts.idle_registrations;
        let _unrelated = (0..counts.unrelated_listeners)
            .map(|i| listen_tcp(SocketAddr::from((UNRELATED, UNRELATED_FIRST_PORT + i as u16)), false, 16))
            .collect::<Result<Vec<_>>>()
            .context("opening the unrelated listeners")?;
        let mut servers = Vec::new();
        let mut rows = Vec::new();
        for listening in [n / 10, n] {
            while servers.len() < listening {
                let port = IDLE_FIRST_PORT + servers.len() as u16;
                servers.push(listen_tcp(SocketAddr::from((SERVER, port)), false, 16)?);
            }
            for way in Way::BOTH {
                self.unregister_idle(n)?;
                let registrations =
                    (0..n).map(|i| wanted(&idle_label(i), Protocol::Tcp, IDLE_FIRST_PORT + i as u16, way)).collect();
                let config = Config { bindings: None, registrations };
                let steerctl = self.steerctl.context("no steerctl")?;
                let path = self.scratch.join(format!("idle-{}.json", way.name()));
                std::fs::write(&path, serde_json::to_vec_pretty(&config)?)?;
                let watch = Watch::start(steerctl, self.layout, &path)?;
                self.wait_held(n, listening).with_context(|| format!("{} watch, {listening} listening", way.name()))?;
                let pid = watch.pid();
                let (ticks0, ns0) = (cpu_ticks(pid)?, on_cpu_ns(pid));
                let start = Instant::now();
                std::thread::sleep(counts.idle_window);
                let (ticks1, ns1) = (cpu_ticks(pid)?, on_cpu_ns(pid));
                let window = start.elapsed().as_secs_f64();
                drop(watch);
                let ticks = ticks1.saturating_sub(ticks0);
                let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
                rows.push(IdleRow {
                    way,
                    registrations: n,
                    listening,
                    unrelated_listeners: counts.unrelated_listeners,
                    window_s: window,
                    ticks,
                    cpu_percent: ticks as f64 / per_second / window * 100.0,
                    on_cpu_ms: ns0.zip(ns1).map(|(a, b)| b.saturating_sub(a) as f64 / 1e6),
                });
            }
        }
        self.unregister_idle(n)?;
        Ok(rows)
    }

    /// Empties the idle labels' slots (a polled registration keeps its
    /// socket; a followed one's stays in after the config changes).
    fn unregister_idle(&self, n: usize) -> Result<()> {
        let state = Dispatcher::open_write(self.layout)?;
        steer::ops::follow::set(&state, &[])?;
        for label in (0..n).map(idle_label) {
            if state.slot_cookie(&label, Family::Ipv4, Protocol::Tcp)?.is_some() {
                steer::ops::register::unregister(&state, &label, None, None)?;
            }
        }
        Ok(())
    }

    /// Waits until the first `listening` idle labels' slots hold a socket
    /// (and no others do): the watch is idle with its servers registered.
    fn wait_held(&self, n: usize, listening: usize) -> Result<()> {
        let deadline = Instant::now() + READY_LIMIT;
        loop {
            let state = Dispatcher::open_read(self.layout)?;
            let held: Vec<bool> = (0..n)
                .map(|i| Ok(state.slot_cookie(&idle_label(i), Family::Ipv4, Protocol::Tcp)?.is_some()))
                .collect::<Result<_>>()?;
            if held.iter().enumerate().all(|(i, h)| *h == (i < listening)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let count = held.iter().filter(|h| **h).count();
                bail!("{count} slots hold a socket after {READY_LIMIT:?}, expected the first {listening}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// A TCP listener of SERVER, `reuseport` or not; SO_REUSEADDR always, so
/// a restarted server binds past its predecessor's connections.
fn listen_tcp(addr: SocketAddr, reuseport: bool, backlog: i32) -> Result<TcpListener> {
    let SocketAddr::V4(v4) = addr else { bail!("{addr} is not IPv4") };
    let s = socket(AddressFamily::Inet, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&s, sockopt::ReuseAddr, &true)?;
    if reuseport {
        setsockopt(&s, sockopt::ReusePort, &true)?;
    }
    bind(s.as_raw_fd(), &SockaddrIn::from(v4)).with_context(|| format!("binding {addr}"))?;
    listen(&s, Backlog::new(backlog)?).with_context(|| format!("listening on {addr}"))?;
    Ok(TcpListener::from(s))
}

/// Takes a listener out of LISTEN now, whoever else holds it (a watch's
/// pidfd_getfd copy, a thread blocked in accept()): it leaves its slot.
fn shut(fd: &impl AsRawFd) {
    let _ = shutdown(fd.as_raw_fd(), Shutdown::Both);
}

/// A restarting server: one listener, answering each connection with a
/// byte on a thread of its own.
struct TcpServer {
    listener: Option<TcpListener>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TcpServer {
    fn start(addr: SocketAddr, reuseport: bool) -> Result<Self> {
        let listener = listen_tcp(addr, reuseport, 1024)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (serving, halt) = (listener.try_clone()?, stop.clone());
        let thread = std::thread::spawn(move || {
            // Ends when stop() shuts the listener down (accept then fails).
            while !halt.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = serving.accept() else { continue };
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                if conn.write_all(b"x").is_ok() {
                    // The client closes first: TIME_WAIT stays on its side.
                    let _ = conn.read(&mut [0u8; 1]);
                }
            }
        });
        Ok(Self { listener: Some(listener), stop, thread: Some(thread) })
    }

    /// Stands in between a hard restart's stop and start.
    fn placeholder() -> Self {
        Self { listener: None, stop: Arc::new(AtomicBool::new(true)), thread: None }
    }

    fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(listener) = self.listener.take() {
            shut(&listener);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for TcpServer {
    fn drop(&mut self) {
        self.halt();
    }
}

/// One client connection: connect, read the server's byte, close.
fn connect_once(to: SocketAddr) -> std::io::Result<()> {
    let mut conn = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.read_exact(&mut [0u8; 1])
}

/// Probes until a connection lands (the first server is registered).
fn wait_steered(to: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    while let Err(e) = connect_once(to) {
        if Instant::now() > deadline {
            bail!("{to} not steered after {READY_LIMIT:?}: {e}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// What the client saw: its connections, in order.
struct Outcome {
    tries: Vec<Try>,
}

/// One connection: when it began and ended, and whether it succeeded.
struct Try {
    began: Instant,
    ended: Instant,
    ok: bool,
}

/// Connections one after another on a thread (PROBE_PAUSE after a
/// failure), until stopped, `most` of them, or `limit` elapsed.
struct Client {
    stop: Arc<AtomicBool>,
    succeeded: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Outcome>>,
}

impl Client {
    fn start(to: SocketAddr, most: usize, limit: Duration) -> Self {
        let (stop, succeeded) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let (halt, ok) = (stop.clone(), succeeded.clone());
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut out = Outcome { tries: Vec::new() };
            while out.tries.len() < most && !halt.load(Ordering::SeqCst) && start.elapsed() < limit {
                let began = Instant::now();
                let succeeded = connect_once(to).is_ok();
                out.tries.push(Try { began, ended: Instant::now(), ok: succeeded });
                if succeeded {
                    ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    // Paced like a client retrying: failures count time
                    // unsteered, and leave the CPU to watch meanwhile.
                    std::thread::sleep(PROBE_PAUSE);
                }
            }
            out
        });
        Self { stop, succeeded, thread: Some(thread) }
    }

    fn succeeded(&self) -> usize {
        self.succeeded.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have succeeded in all.
    fn wait_for(&self, n: usize) -> Result<()> {
        let deadline = Instant::now() + READY_LIMIT;
        while self.succeeded.load(Ordering::SeqCst) < n {
            if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                bail!("the client stopped (its count or time limit) before {n} connections succeeded");
            }
            if Instant::now() > deadline {
                let done = self.succeeded.load(Ordering::SeqCst);
                bail!("{done} connections succeeded after {READY_LIMIT:?}, waiting for {n}: the server is not steered");
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    fn finish(mut self) -> Outcome {
        self.stop.store(true, Ordering::SeqCst);
        let thread = self.thread.take().expect("finished once");
        thread.join().unwrap_or(Outcome { tries: Vec::new() })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Listens, then connects to the steered address right away and until a
/// connection lands in this listener (checked by accepting it). Returns
/// the time from listen() returning to that connection, and whether the
/// first connect was it; None when not steered within PROBE_LIMIT.
fn tcp_first_steered(svc: &Service) -> Result<Option<(Duration, bool)>> {
    let listener = listen_tcp(svc.server(), false, 16)?;
    let listened = Instant::now();
    let steered = svc.steered();
    let mut first = true;
    let found = loop {
        match TcpStream::connect_timeout(&steered, IO_TIMEOUT) {
            Ok(conn) => {
                let elapsed = listened.elapsed();
                accept_own(&listener, &conn)?;
                break Some((elapsed, first));
            }
            Err(_) if listened.elapsed() > PROBE_LIMIT => break None,
            Err(_) => std::thread::sleep(PROBE_PAUSE),
        }
        first = false;
    };
    shut(&listener);
    Ok(found)
}

/// Checks that `conn` waits in `listener`'s queue: a loopback connect
/// returns once the handshake is done, so it is there or nowhere.
fn accept_own(listener: &TcpListener, conn: &TcpStream) -> Result<()> {
    listener.set_nonblocking(true)?;
    let mine = conn.local_addr()?;
    for _ in 0..1000 {
        match listener.accept() {
            Ok((_, peer)) if peer == mine => return Ok(()),
            Ok((_, peer)) => bail!("accepted {peer}, not the probe {mine}"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
            Err(e) => return Err(e.into()),
        }
    }
    bail!("the steered connection from {mine} never reached the new listener")
}

/// Binds a UDP server and sends datagrams to the steered address until
/// one is answered. Returns the time from bind() returning to that answer
/// (first: the first datagram was answered); None when not within PROBE_LIMIT.
fn udp_first_steered(svc: &Service) -> Result<Option<(Duration, bool)>> {
    let server = UdpServer::start(svc.server())?;
    let bound = server.bound;
    // Connected: a datagram nothing takes comes back as ECONNREFUSED at once.
    let client = UdpSocket::bind((SERVER, 0))?;
    client.connect(svc.steered())?;
    client.set_read_timeout(Some(Duration::from_millis(20)))?;
    let mut first = true;
    let mut buf = [0u8; 64];
    let found = loop {
        let tag = fastrand::u64(..).to_ne_bytes();
        if client.send(&tag).is_ok() {
            match client.recv(&mut buf) {
                Ok(len) if buf[..len] == tag => break Some((bound.elapsed(), first)),
                // A late answer to an earlier datagram: steered too.
                Ok(_) => break Some((bound.elapsed(), false)),
                Err(_) => {}
            }
        }
        if bound.elapsed() > PROBE_LIMIT {
            break None;
        }
        std::thread::sleep(PROBE_PAUSE);
        first = false;
    };
    drop(server);
    Ok(found)
}

/// A UDP echo server that answers from the address a datagram was sent
/// to (a steered one, not its own): IP_ORIGDSTADDR in, IP_PKTINFO out.
struct UdpServer {
    socket: Option<UdpSocket>,
    bound: Instant,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpServer {
    fn start(addr: SocketAddr) -> Result<Self> {
        let SocketAddr::V4(v4) = addr else { bail!("{addr} is not IPv4") };
        let s: OwnedFd = socket(AddressFamily::Inet, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
        setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true)?;
        bind(s.as_raw_fd(), &SockaddrIn::from(v4)).with_context(|| format!("binding udp {addr}"))?;
        let bound = Instant::now();
        let socket = UdpSocket::from(s);
        let stop = Arc::new(AtomicBool::new(false));
        let (serving, halt) = (socket.try_clone()?, stop.clone());
        let thread = std::thread::spawn(move || udp_echo(&serving, &halt));
        Ok(Self { socket: Some(socket), bound, stop, thread: Some(thread) })
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(socket) = &self.socket {
            // Wakes the thread's recvmsg (it returns 0).
            shut(socket);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // The last fd closed: the socket leaves its slot.
        self.socket.take();
    }
}

fn udp_echo(socket: &UdpSocket, stop: &AtomicBool) {
    let fd = socket.as_raw_fd();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::SeqCst) {
        let mut cmsg = nix::cmsg_space!(libc::sockaddr_in);
        let (len, peer, orig) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()) else {
                continue;
            };
            let orig = msg.cmsgs().into_iter().flatten().find_map(|c| match c {
                ControlMessageOwned::Ipv4OrigDstAddr(a) => Some(a.sin_addr),
                _ => None,
            });
            (msg.bytes, msg.address, orig)
        };
        let (Some(peer), Some(orig)) = (peer, orig) else { continue };
        let info = libc::in_pktinfo { ipi_ifindex: 0, ipi_spec_dst: orig, ipi_addr: orig };
        let iov = [IoSlice::new(&buf[..len])];
        let _ = sendmsg(fd, &iov, &[ControlMessage::Ipv4PacketInfo(&info)], MsgFlags::empty(), Some(&peer));
    }
}

/// `steerctl watch CONFIG` as a child, ready once it logged "watching"
/// (its first pass done); killed and reaped when dropped.
struct Watch {
    child: Child,
    lines: Receiver<String>,
}

impl Watch {
    fn start(steerctl: &Path, layout: &Layout, config: &Path) -> Result<Self> {
        let mut cmd = Command::new(steerctl);
        cmd.arg("--pin-dir")
            .arg(&layout.dir)
            .arg("watch")
            .arg(config)
            .args(["--interval-ms", &POLL_INTERVAL_MS.to_string()])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // Killed with steer-bench however it ends, even by SIGKILL: a watch
        // left behind would keep the benchmark's network namespace alive.
        // SAFETY: only prctl(2), async-signal-safe, runs between fork and exec.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let stderr = child.stderr.take().context("no stderr pipe")?;
        let (tx, lines) = std::sync::mpsc::channel();
        // Drained all along, so that watch never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let watch = Watch { child, lines };
        watch.wait_for_line("watching", WATCHING_LIMIT).with_context(|| format!("{cmd:?}"))?;
        Ok(watch)
    }

    fn wait_for_line(&self, text: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(text) => return Ok(()),
                Ok(line) => seen.push(line),
                Err(RecvTimeoutError::Timeout) => bail!("no {text:?} line after {limit:?}; said: {seen:?}"),
                Err(RecvTimeoutError::Disconnected) => bail!("exited before saying {text:?}; said: {seen:?}"),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if std::env::var_os("BENCH_DEBUG").is_some() {
            std::thread::sleep(Duration::from_millis(100));
            while let Ok(l) = self.lines.try_recv() {
                eprintln!("watch: {l}");
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of every thread of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    // Fields after the command name (in parentheses, which may hold spaces).
    let rest = &stat[stat.rfind(')').context("no command name in /proc/PID/stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let field = |n: usize| -> Result<u64> {
        fields.get(n - 3).context("short /proc/PID/stat")?.parse().context("a tick count in /proc/PID/stat")
    };
    Ok(field(14)? + field(15)?)
}

/// The ns every thread of `pid` spent on a CPU (schedstat), if the kernel keeps it.
fn on_cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let text = std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok()?;
        total += text.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}
