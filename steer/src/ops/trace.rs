//! `steerctl trace`: every decision `steer_dispatch` makes, live.
//!
//! A tracer takes a slot of the `trace_*` maps under the state's exclusive
//! lock: a ring buffer of its own, its kernel-side filter and sampling, and
//! a socket of its own in `trace_tracers`. The kernel takes that socket out
//! of the map when the tracer exits, however it exits (SIGKILL included),
//! and the program turns the slot off when it finds it gone, and
//! `steer_config.trace` with it when no live slot is left: nothing a tracer
//! leaves behind costs lookups, and no cleanup code has to run. The events
//! are raw ([`TraceEvent`]); a [`Resolver`] names their label, binding,
//! socket and owners from the state, caching what it read.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    os::fd::{AsFd, BorrowedFd},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};
use serde::Serialize;
use steer_common::{
    Answer, MAX_TRACERS, SLOT_MEMBERS, TRACE_RING_BYTES, TraceEvent, TraceMetrics, TraceOutcome, kernel::AF_INET6,
};

use crate::{
    error::{Context, Result, fail},
    kernel::maps::new_ringbuf,
    model::{Binding, Owner, Protocol, slot::Slot, trace::Filter},
    state::{Dispatcher, Layout, ReadWrite, plane::grace_period, tracing::Tracing},
};

/// What a tracer asks for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub filter: Filter,
    /// One decision in `sample` (0 and 1: every one).
    pub sample: u32,
}

/// CLOCK_MONOTONIC (what bpf_ktime_get_ns reads) against the wall clock,
/// read together once.
#[derive(Debug, Clone, Copy)]
struct Clock {
    monotonic_ns: u64,
    unix_ns: u64,
}

impl Clock {
    fn now() -> Self {
        let mono = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Self { monotonic_ns: mono.tv_sec as u64 * 1_000_000_000 + mono.tv_nsec as u64, unix_ns: unix.as_nanos() as u64 }
    }

    /// The wall-clock time (ns since the epoch) of monotonic time `ns`.
    fn wall(&self, ns: u64) -> u64 {
        (self.unix_ns as i128 + ns as i128 - self.monotonic_ns as i128).max(0) as u64
    }
}

/// A socket whose one job is to sit in the tracer's slot of
/// `trace_tracers` for as long as this process lives (the kernel takes a
/// socket out of a socket map when it closes). Bound, as a socket map
/// wants a UDP socket; on loopback when there is one.
fn liveness_socket() -> Result<UdpSocket> {
    let mut last = None;
    for addr in [SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), SocketAddr::from((Ipv6Addr::LOCALHOST, 0))] {
        match UdpSocket::bind(addr) {
            Ok(socket) => return Ok(socket),
            Err(e) => last = Some(e),
        }
    }
    match UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))) {
        Ok(socket) => Ok(socket),
        Err(e) => Err(last.unwrap_or(e)).context("making the tracer's socket"),
    }
}

/// A live tracer: its slot, ring buffer and socket.
pub struct Tracer {
    layout: Layout,
    slot: u32,
    maps: Tracing,
    ring: RingBuf<MapData>,
    socket: Option<UdpSocket>,
    clock: Clock,
}

impl Tracer {
    /// Takes a free slot (emptying what exited tracers left) and turns
    /// tracing on. Labels the filter names must exist; nothing changes
    /// when anything is refused.
    pub fn start(state: &Dispatcher<ReadWrite>, options: &Options) -> Result<Self> {
        let maps = state.maps()?;
        let layout = state.layout();
        let mut ids = Vec::new();
        for name in &options.filter.labels {
            match maps.labels.id(name)? {
                Some(id) => ids.push(id),
                None => {
                    let known: Vec<String> = maps.labels.all()?.into_keys().collect();
                    fail!(
                        Invalid,
                        "no label {name} in {}: {}",
                        layout.dir.display(),
                        if known.is_empty() {
                            "it has no labels".to_string()
                        } else {
                            format!("labels are {}", known.join(", "))
                        }
                    );
                }
            }
        }
        let tracing = Tracing::open(layout)?;
        let slots = tracing.slots()?;
        let Some(slot) = slots.iter().find(|s| !s.live()).map(|s| s.slot) else {
            let pids: Vec<String> = slots.iter().map(|s| s.filter.pid.to_string()).collect();
            fail!(Full, "{MAX_TRACERS} tracers already run here (pids {}): stop one first", pids.join(", "));
        };
        let socket = liveness_socket()?;
        let ring = new_ringbuf(TRACE_RING_BYTES, "steer_trace")?;
        let filter = options.filter.kernel(&ids, options.sample, std::process::id());
        // What exited tracers left, then this one's slot.
        for dead in slots.iter().filter(|s| s.dead()) {
            tracing.release(dead.slot)?;
        }
        if let Err(e) = tracing.claim(slot, socket.as_fd(), &ring, &filter).and_then(|()| maps.plane.set_trace(true)) {
            let _ = tracing.release(slot);
            return Err(e).context("taking a tracer slot");
        }
        // A lookup that began before the claim may have seen the slot or
        // the whole of tracing without a live tracer and turned it off
        // after the claim: once every such lookup is over, turn them on
        // again. Lookups that begin later see this tracer live.
        grace_period();
        if tracing.filter(slot)?.active == 0 {
            tracing.set_filter(slot, &filter)?;
        }
        if maps.plane.config()?.trace == 0 {
            maps.plane.set_trace(true)?;
        }
        let ring = RingBuf::try_from(Map::RingBuf(ring))?;
        Ok(Self { layout: layout.clone(), slot, maps: tracing, ring, socket: Some(socket), clock: Clock::now() })
    }

    /// The tracer's slot (0..MAX_TRACERS).
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// Readable when events wait (for epoll).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }

    /// The events waiting, at most a ring buffer's worth.
    pub fn read(&mut self) -> Vec<TraceEvent> {
        const MAX: usize = (TRACE_RING_BYTES as usize) / size_of::<TraceEvent>();
        let mut out = Vec::new();
        while out.len() < MAX {
            let Some(item) = self.ring.next() else { break };
            if let Some(bytes) = item.get(..size_of::<TraceEvent>()) {
                out.push(bytemuck::pod_read_unaligned(bytes));
            }
        }
        out
    }

    /// What this tracer's slot selected, was sent and lost so far.
    pub fn counters(&self) -> Result<TraceMetrics> {
        self.maps.metrics(self.slot)
    }

    /// The wall-clock time (ns since the epoch) of an event.
    pub fn wall_ns(&self, event: &TraceEvent) -> u64 {
        self.clock.wall(event.time_ns)
    }

    /// Gives the slot back and, when no tracer is left, turns tracing off
    /// (needing the state's lock; without it, the next lookup does).
    /// Returns the slot's final counters.
    pub fn stop(mut self) -> Result<TraceMetrics> {
        let counters = self.counters()?;
        self.release()?;
        match Dispatcher::open_write(&self.layout) {
            Ok(state) => {
                let maps = state.maps()?;
                if !maps.tracing.slots()?.iter().any(|s| s.live()) {
                    maps.plane.set_trace(false)?;
                }
            }
            Err(e) => log::debug!("leaving tracing off to the next lookup: {}", e.chain()),
        }
        Ok(counters)
    }

    fn release(&mut self) -> Result<()> {
        if let Some(socket) = self.socket.take() {
            self.maps.release(self.slot)?;
            drop(socket);
        }
        Ok(())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            log::warn!("giving tracer slot {} back: {}", self.slot, e.chain());
        }
    }
}

/// The socket a decision assigned (or the kernel refused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TracedSocket {
    pub cookie: u64,
    /// The label slot it sits in ("ipv6 tcp"); None for the seed socket.
    pub slot: Option<String>,
    pub owners: Vec<Owner>,
}

/// bpf_sk_assign's refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Refusal {
    pub errno: u32,
    /// ESOCKTNOSUPPORT, EEXIST, ...
    pub name: String,
    /// The counter it counts under (`steerctl metrics`): bad_socket, ...
    pub reason: &'static str,
}

/// One decision, named.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Wall-clock time, ns since the epoch.
    pub unix_ns: u64,
    pub protocol: Protocol,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    #[serde(serialize_with = "outcome_name")]
    pub outcome: TraceOutcome,
    /// The connection was dropped (TCP: refused).
    pub dropped: bool,
    /// The matched binding's label and the binding itself.
    pub label: Option<String>,
    pub binding: Option<Binding>,
    pub socket: Option<TracedSocket>,
    pub refusal: Option<Refusal>,
}

fn outcome_name<S: serde::Serializer>(outcome: &TraceOutcome, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(outcome.name())
}

fn address(event: &TraceEvent, words: [u64; 2], port: u16) -> SocketAddr {
    let addr = Ipv6Addr::from(u128::from(words[0]) << 64 | u128::from(words[1]));
    let ip = match (u32::from(event.family), addr.to_ipv4_mapped()) {
        (AF_INET6, _) | (_, None) => IpAddr::V6(addr),
        (_, Some(v4)) => IpAddr::V4(v4),
    };
    SocketAddr::new(ip, port)
}

/// The name of errno `n` ("ESOCKTNOSUPPORT").
fn errno_name(n: u32) -> String {
    let errno = nix::errno::Errno::from_raw(n as i32);
    match errno {
        nix::errno::Errno::UnknownErrno => format!("errno {n}"),
        e => format!("{e:?}"),
    }
}

/// Names what events refer to (labels, bindings, sockets, owners) from
/// the state, opening it (shared lock, briefly) only for what it has not
/// seen in the last second or so.
pub struct Resolver {
    layout: Layout,
    labels: BTreeMap<u32, String>,
    bindings: HashMap<(Protocol, u32, u8, u16, u128), Option<Binding>>,
    sockets: HashMap<(u32, bool), Option<u64>>,
    owners: HashMap<u64, Vec<Owner>>,
    since: Instant,
}

/// How long what a resolver read stays believed.
const FRESH: Duration = Duration::from_secs(1);

impl Resolver {
    pub fn new(layout: &Layout) -> Self {
        Self {
            layout: layout.clone(),
            labels: BTreeMap::new(),
            bindings: HashMap::new(),
            sockets: HashMap::new(),
            owners: HashMap::new(),
            since: Instant::now(),
        }
    }

    /// Names `events`; `wall_ns` gives an event's wall-clock time. What
    /// cannot be read (the state locked for too long, or gone) shows as
    /// unknown rather than ending the trace.
    pub fn resolve(&mut self, events: &[TraceEvent], wall_ns: impl Fn(&TraceEvent) -> u64) -> Vec<Decision> {
        if self.since.elapsed() > FRESH {
            self.labels.clear();
            self.bindings.clear();
            self.sockets.clear();
            self.owners.clear();
            self.since = Instant::now();
        }
        let unknown = events.iter().any(|e| {
            (e.label != Answer::NONE
                && (!self.labels.contains_key(&e.label) || !self.bindings.contains_key(&binding_key(e))))
                || (e.member != TraceEvent::NO_MEMBER && !self.sockets.contains_key(&socket_key(e)))
        });
        if unknown {
            match Dispatcher::open_read(&self.layout) {
                Ok(state) => self.read(&state, events),
                Err(e) => log::warn!("naming traced decisions: {}", e.chain()),
            }
        }
        let mut cookies: Vec<u64> = events
            .iter()
            .filter_map(|e| self.sockets.get(&socket_key(e)).copied().flatten())
            .filter(|c| !self.owners.contains_key(c))
            .collect();
        if !cookies.is_empty() {
            cookies.sort_unstable();
            cookies.dedup();
            match crate::discovery::owners::sockets_and_owners(&cookies) {
                Ok(mut found) => {
                    for cookie in cookies {
                        self.owners.insert(cookie, found.remove(&cookie).map(|(_, o)| o).unwrap_or_default());
                    }
                }
                Err(e) => log::warn!("looking for the owners of traced sockets: {}", e.chain()),
            }
        }
        events.iter().map(|e| self.decision(e, wall_ns(e))).collect()
    }

    /// Reads what `events` name and the caches lack.
    fn read(&mut self, state: &Dispatcher, events: &[TraceEvent]) {
        for e in events {
            if e.label != Answer::NONE {
                self.labels
                    .entry(e.label)
                    .or_insert_with(|| state.label_name(e.label).unwrap_or_else(|_| format!("#{}", e.label)));
                let key = binding_key(e);
                if !self.bindings.contains_key(&key) {
                    let local = address(e, e.local, e.local_port);
                    let label = &self.labels[&e.label];
                    let b = state.answered_binding(key.0, label, e.label, e.len, local.ip(), local.port()).ok();
                    self.bindings.insert(key, b);
                }
            }
            if e.member != TraceEvent::NO_MEMBER {
                let key = socket_key(e);
                self.sockets.entry(key).or_insert_with(|| state.socket_at(key.0, key.1).ok().flatten());
            }
        }
    }

    fn decision(&self, event: &TraceEvent, unix_ns: u64) -> Decision {
        let outcome = TraceOutcome::from_u8(event.outcome).unwrap_or(TraceOutcome::Normal);
        let (seed, key) = (is_seed(outcome), socket_key(event));
        let socket = self.sockets.get(&key).copied().flatten().map(|cookie| TracedSocket {
            cookie,
            slot: (!seed).then(|| {
                let slot = Slot::from_index(event.member / SLOT_MEMBERS);
                format!("{} {}", slot.family, slot.protocol)
            }),
            owners: self.owners.get(&cookie).cloned().unwrap_or_default(),
        });
        let refusal = matches!(outcome, TraceOutcome::Error | TraceOutcome::SeedError).then(|| Refusal {
            errno: event.errno,
            name: errno_name(event.errno),
            reason: steer_common::ErrorReason::from_errno(-i64::from(event.errno)).name(),
        });
        let label = (event.label != Answer::NONE)
            .then(|| self.labels.get(&event.label).cloned().unwrap_or_else(|| format!("#{}", event.label)));
        Decision {
            unix_ns,
            protocol: binding_key(event).0,
            remote: address(event, event.remote, event.remote_port),
            local: address(event, event.local, event.local_port),
            outcome,
            dropped: crate::model::trace::drops(outcome),
            binding: label.as_ref().and_then(|_| self.bindings.get(&binding_key(event)).cloned().flatten()),
            label,
            socket,
            refusal,
        }
    }
}

fn is_seed(outcome: TraceOutcome) -> bool {
    matches!(outcome, TraceOutcome::Seed | TraceOutcome::SeedMiss | TraceOutcome::SeedError)
}

/// What names an event's binding: protocol, label, length, port, and the
/// local address under the length.
fn binding_key(e: &TraceEvent) -> (Protocol, u32, u8, u16, u128) {
    let protocol = Protocol::from_number(e.protocol).unwrap_or(Protocol::Tcp);
    let addr = u128::from(e.local[0]) << 64 | u128::from(e.local[1]);
    (protocol, e.label, e.len, e.local_port, addr & steer_common::prefix_mask(e.len))
}

/// Where an event's socket sits: its key, in `echo_socket` (the seed) or `sockets`.
fn socket_key(e: &TraceEvent) -> (u32, bool) {
    (e.member, TraceOutcome::from_u8(e.outcome).is_some_and(is_seed))
}

/// A live tracer, for `steerctl status`.
#[derive(Debug, Clone, Serialize)]
pub struct TracerStatus {
    pub slot: u32,
    pub pid: u32,
    /// Still holding a ring buffer after its process exited (until the
    /// next tracer starts, which empties the slot).
    pub exited: bool,
}

/// The tracer slots in use, for `steerctl status`.
pub fn tracers<A: crate::state::Read>(state: &Dispatcher<A>) -> Result<Vec<TracerStatus>> {
    Ok(state
        .tracers()?
        .into_iter()
        .filter(|s| s.live() || s.dead())
        .map(|s| TracerStatus { slot: s.slot, pid: s.filter.pid, exited: !s.live() })
        .collect())
}

/// What a trace prints, in order.
#[derive(Debug, Clone)]
pub enum Line {
    Decision(Box<Decision>),
    /// `count` more decisions were selected but lost (the ring buffer was
    /// full); `total` so far.
    Lost {
        count: u64,
        total: u64,
    },
}

/// Why a trace ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Ended {
    /// SIGINT or SIGTERM.
    Interrupted,
    /// `--count` decisions were shown.
    Count,
    /// `--duration` passed.
    Duration,
    /// Whoever reads the output went away.
    OutputClosed,
    /// The state was unloaded (or loaded anew) under the tracer.
    Unloaded,
}

/// When a trace ends by itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub count: Option<u64>,
    pub duration: Option<Duration>,
}

/// What a trace did, for its summary line.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Decisions shown.
    pub shown: u64,
    /// What the tracer's slot counted: selected by the filter, left out by
    /// sampling, sent, lost.
    pub matched: u64,
    pub sampled_out: u64,
    pub sent: u64,
    pub lost: u64,
    pub ended: Ended,
}

/// How often a trace looks at its lost count and the state when no event comes.
const TICK: Duration = Duration::from_millis(500);

/// Prints `tracer`'s decisions through `emit` (false: the output is gone)
/// until `limits` are reached or `stop` says so (it is asked whenever
/// `wake` turns readable: the caller's signal handler writes to it), then
/// gives the slot back.
pub fn run(
    mut tracer: Tracer,
    limits: Limits,
    wake: BorrowedFd<'_>,
    mut stop: impl FnMut() -> bool,
    mut emit: impl FnMut(&Line) -> bool,
) -> Result<Summary> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
    const RING: u64 = 0;
    const WAKE: u64 = 1;
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
    epoll.add(tracer.fd(), EpollEvent::new(EpollFlags::EPOLLIN, RING)).context("epoll_ctl")?;
    epoll.add(wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE)).context("epoll_ctl")?;
    let state_inode =
        |layout: &Layout| std::fs::metadata(&layout.dir).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
    let inode = state_inode(&tracer.layout);
    let mut resolver = Resolver::new(&tracer.layout);
    let start = Instant::now();
    let (mut shown, mut lost) = (0u64, 0u64);
    let mut last_tick = Instant::now();
    let ended = 'trace: loop {
        let mut timeout = TICK;
        if let Some(d) = limits.duration {
            match d.checked_sub(start.elapsed()) {
                Some(left) => timeout = timeout.min(left),
                None => break Ended::Duration,
            }
        }
        let mut ready = [EpollEvent::empty(); 2];
        let n = match epoll.wait(&mut ready, EpollTimeout::try_from(timeout).unwrap_or(EpollTimeout::MAX)) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        if ready[..n].iter().any(|e| e.data() == WAKE) {
            let mut buf = [0u8; 64];
            while nix::unistd::read(wake, &mut buf).is_ok_and(|n| n > 0) {}
        }
        if stop() {
            break Ended::Interrupted;
        }
        let events = tracer.read();
        for decision in resolver.resolve(&events, |e| tracer.wall_ns(e)) {
            if !emit(&Line::Decision(Box::new(decision))) {
                break 'trace Ended::OutputClosed;
            }
            shown += 1;
            if limits.count.is_some_and(|c| shown >= c) {
                break 'trace Ended::Count;
            }
        }
        // The lost count, after what came before the loss was shown.
        if !events.is_empty() || last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            let now = tracer.counters()?.lost;
            if now > lost {
                if !emit(&Line::Lost { count: now - lost, total: now }) {
                    break Ended::OutputClosed;
                }
                lost = now;
            }
            if state_inode(&tracer.layout) != inode {
                break Ended::Unloaded;
            }
        }
    };
    let counters = tracer.stop()?;
    Ok(Summary {
        shown,
        matched: counters.matched,
        sampled_out: counters.sampled_out,
        sent: counters.events,
        lost: counters.lost,
        ended,
    })
}
