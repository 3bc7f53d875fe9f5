//! `steerctl watch FILE`: keeps a config applied while servers come and go.
//!
//! It waits on events, not on a timer: the file's directory (inotify: a
//! write, an editor's rename over it, a Kubernetes ConfigMap's `..data`
//! swap), the state's directory (loaded anew, unloaded), the follow
//! programs' ring buffer (a followed UDP socket was bound: it is inserted
//! with a backfill pass) and the caller's wake-up fd (signals). Followed
//! registrations need nothing more: the kernel puts TCP listeners in their
//! slots inside listen(). Registrations the kernel does not follow
//! (`follow: false`, owner filters, a kernel before 5.15) are polled as
//! before: every `interval` the loop reads their slots, and a slot that
//! lost its socket gets a replacement with a sock_diag dump as soon as one
//! listens; a full pass (owner filters, pid files) runs every
//! `full_every`. With nothing to poll, the loop sleeps until an event.
//! The bindings are applied when the file is (re)loaded and when the
//! state is loaded anew. A failure is logged once and retried every
//! `full_every`. The state lock is held only while a pass plans or
//! applies, never while waiting.

use std::{
    os::{
        fd::{AsFd, BorrowedFd},
        unix::fs::MetadataExt,
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, RingBuf};
use nix::sys::{
    epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
    inotify::{AddWatchFlags, InitFlags, Inotify},
};

use log::{error, info, warn};

use super::{apply, follow, register::Choice};
use crate::{
    discovery::diag,
    error::{Context, Result},
    model::{Family, Protocol, Target, config::Config},
    state::{Dispatcher, Layout},
};

/// What the caller's signal handling asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Re-read the file (SIGHUP).
    Reload,
    /// Return (SIGTERM, SIGINT).
    Stop,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub interval: Duration,
    pub full_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self { interval: Duration::from_millis(10), full_every: Duration::from_secs(1) }
    }
}

/// The file's content: what a reload compares (a ConfigMap update makes a
/// new file behind the same path; a touch changes nothing).
fn content(path: &Path) -> Option<Vec<u8>> {
    std::fs::read(path).ok()
}

/// What woke the loop.
#[derive(Debug, Default)]
struct Woke {
    /// Something changed in the config file's directory.
    config: bool,
    /// Something changed in the state's parent directory.
    state: bool,
    /// Followed UDP binds the programs reported.
    binds: usize,
}

const WAKE: u64 = 0;
const INOTIFY: u64 = 1;
const RING: u64 = 2;

/// The loop's event sources: the caller's wake-up fd, inotify on the
/// config's and the state's directories, and the follow ring buffer.
struct Events<'a> {
    wake: BorrowedFd<'a>,
    epoll: Epoll,
    inotify: Inotify,
    config_dir: Option<nix::sys::inotify::WatchDescriptor>,
    ring: Option<RingBuf<MapData>>,
    ring_pin: PathBuf,
}

impl<'a> Events<'a> {
    fn new(layout: &Layout, file: &Path, wake: BorrowedFd<'a>) -> Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).context("epoll_create")?;
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK).context("inotify_init")?;
        let changes = AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_ATTRIB;
        let dir = |p: &Path| p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf();
        let config_dir = Some(
            inotify
                .add_watch(&dir(file), changes)
                .with_context(|| format!("watching {} for changes", dir(file).display()))?,
        );
        // The state's parent may not exist yet (never loaded): then the
        // state is looked for on the full pass's cadence.
        let _ = inotify.add_watch(&dir(&layout.dir), changes);
        epoll.add(wake, EpollEvent::new(EpollFlags::EPOLLIN, WAKE)).context("epoll_ctl")?;
        epoll.add(&inotify, EpollEvent::new(EpollFlags::EPOLLIN, INOTIFY)).context("epoll_ctl")?;
        let ring_pin = layout.map(steer_common::map::FOLLOW_EVENTS);
        let mut events = Self { wake, epoll, inotify, config_dir, ring: None, ring_pin };
        events.reopen_ring();
        Ok(events)
    }

    /// Opens the state's ring buffer (again: after a load, it is another map).
    fn reopen_ring(&mut self) {
        if let Some(old) = self.ring.take() {
            let _ = self.epoll.delete(old.as_fd());
        }
        let ring = MapData::from_pin(&self.ring_pin).ok().and_then(|data| RingBuf::try_from(Map::RingBuf(data)).ok());
        if let Some(ring) = ring {
            if self.epoll.add(ring.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, RING)).is_ok() {
                self.ring = Some(ring);
            }
        }
    }

    /// Waits for an event, or `timeout`; says what happened.
    fn wait(&mut self, timeout: Option<Duration>) -> Result<Woke> {
        let mut ready = [EpollEvent::empty(); 4];
        let timeout = match timeout {
            None => EpollTimeout::NONE,
            Some(t) => EpollTimeout::try_from(t.max(Duration::from_millis(1))).unwrap_or(EpollTimeout::MAX),
        };
        let n = match self.epoll.wait(&mut ready, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e).context("epoll_wait"),
        };
        let mut woke = Woke::default();
        for event in &ready[..n] {
            match event.data() {
                WAKE => {
                    // Drained, or it stays readable (the caller made it non-blocking).
                    let mut buf = [0u8; 64];
                    while nix::unistd::read(self.wake, &mut buf).is_ok_and(|n| n > 0) {}
                }
                INOTIFY => {
                    for e in self.inotify.read_events().unwrap_or_default() {
                        if Some(e.wd) == self.config_dir {
                            woke.config = true;
                        } else {
                            woke.state = true;
                        }
                    }
                }
                RING => {
                    if let Some(ring) = &mut self.ring {
                        // Bounded by the ring's size.
                        while ring.next().is_some() {
                            woke.binds += 1;
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(woke)
    }
}

/// What each registration's slot should hold after the last pass.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Held {
        label: String,
        family: Family,
        protocol: Protocol,
        cookie: u64,
    },
    /// Waiting for a socket: looked for again every interval (one
    /// sock_diag dump when nothing listens).
    Waiting,
    /// The kernel follows it: nothing to look at.
    Followed,
    /// Waiting while the sockets `listeners` (cookies) listen at `target`
    /// but none can be taken: no accepted process holds one, or taking it
    /// failed alike twice. Looking again scans /proc, so that waits for the
    /// full pass, or for the listeners to change (a restart's old socket
    /// going, say).
    Blocked {
        target: Target,
        listeners: Vec<u64>,
    },
}

/// The cookies of the sockets listening at `target` (one sock_diag dump).
fn listeners(target: &Target) -> Result<Vec<u64>> {
    Ok(diag::listening(target.protocol, target.address, target.port)?.iter().map(|s| s.cookie).collect())
}

/// A blocked wait for what listens at `target` now.
fn blocked(target: Target) -> Slot {
    // Unknown listeners never match: the next check looks again.
    let listeners = listeners(&target).unwrap_or_default();
    Slot::Blocked { target, listeners }
}

/// What a check of the slots found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Every slot holds what the last pass put there.
    Held,
    /// Some registrations wait; `costly` when every one is blocked with the
    /// same listeners as at the last pass (looking again would scan /proc).
    Waiting { costly: bool },
    /// A registered socket left its slot (closed, or replaced by hand).
    Changed,
}

/// Logs a failure once, not every interval, and when it clears.
#[derive(Default)]
struct Failures {
    last: Option<String>,
    /// Registrations that failed in the last pass, with the error.
    registrations: Vec<(String, String)>,
}

impl Failures {
    fn failed(&mut self, what: &str, e: &crate::Error) {
        let text = format!("{what}: {}", e.chain());
        if self.last.as_ref() != Some(&text) {
            error!("{text}; retrying every second");
            self.last = Some(text);
        }
    }

    fn ok(&mut self) {
        if self.last.take().is_some() {
            info!("working again");
        }
    }

    fn failing(&self) -> bool {
        self.last.is_some()
    }

    /// Logs the registrations that failed this pass and not the last one.
    fn registrations(&mut self, failed: &[(String, String)]) {
        for (what, err) in failed {
            if !self.registrations.iter().any(|(w, e)| w == what && e == err) {
                warn!("{what}: {err}; retrying every second");
            }
        }
        self.registrations = failed.to_vec();
    }
}

/// Runs until `poll` returns [`Event::Stop`]; `wake` becomes readable
/// when it may have something to say (the caller's signal handler writes
/// to it). Fails only when the file cannot be loaded at start; later
/// failures are logged and retried.
pub fn run(
    layout: &Layout,
    file: &Path,
    options: &Options,
    wake: BorrowedFd<'_>,
    mut poll: impl FnMut() -> Option<Event>,
) -> Result<()> {
    let mut config = Config::load(file)?;
    let mut seen = content(file);
    let mut events = Events::new(layout, file, wake)?;
    let mut failures = Failures::default();
    let mut missing_since: Vec<Option<Instant>> = vec![None; config.registrations.len()];
    // The file's bindings are applied when the file is (re)read and when
    // the state is new (loaded again under this watch): by the first pass
    // that includes them and succeeds.
    let mut state = state_inode(layout);
    let (mut expected, applied) = pass(layout, &config, true, &mut missing_since, &mut failures);
    let mut bindings_pending = !applied;
    // Said once the first pass is done: from here, binds are followed.
    info!(
        "watching {} ({} registrations, bindings {})",
        file.display(),
        config.registrations.len(),
        if config.bindings.is_some() { "managed" } else { "left alone" },
    );
    let mut last_full = Instant::now();
    let mut polled = !expected.iter().all(|s| *s == Slot::Followed);
    if polled {
        info!("some registrations are not followed in the kernel: checking them every {:?}", options.interval);
    }
    loop {
        // Only what the kernel does not follow, bindings waiting for a
        // state, or a failure to retry need a timer.
        let timeout = if polled || (bindings_pending && state.is_some() && !failures.failing()) {
            Some(options.interval)
        } else if failures.failing() || bindings_pending {
            Some(options.full_every.saturating_sub(last_full.elapsed()))
        } else {
            None
        };
        let woke = events.wait(timeout)?;
        let mut reload = false;
        match poll() {
            Some(Event::Stop) => {
                info!("stopping");
                return Ok(());
            }
            Some(Event::Reload) => {
                info!("reload requested");
                reload = true;
            }
            None => {}
        }
        if woke.config || reload {
            let now = content(file);
            if now != seen {
                seen = now;
                reload = true;
            }
        }
        if woke.state {
            events.reopen_ring();
        }
        if woke.binds > 0 {
            udp_binds(layout, &config, woke.binds, &mut failures);
        }
        if reload {
            match Config::load(file) {
                Ok(new) => {
                    info!("reloaded {}", file.display());
                    config = new;
                    missing_since = vec![None; config.registrations.len()];
                    let applied;
                    (expected, applied) = pass(layout, &config, true, &mut missing_since, &mut failures);
                    bindings_pending = !applied;
                    last_full = Instant::now();
                    polled = !expected.iter().all(|s| *s == Slot::Followed);
                }
                Err(e) => error!("keeping the previous config: {}", e.chain()),
            }
        } else if polled
            || woke.state
            || failures.failing()
            || bindings_pending
            || last_full.elapsed() >= options.full_every
        {
            let now_state = state_inode(layout);
            if now_state != state {
                state = now_state;
                bindings_pending = true;
            }
            // Bindings waiting for a new state: at once, unless failing.
            let due = last_full.elapsed() >= options.full_every
                || (bindings_pending && state.is_some() && !failures.failing());
            // While failing (unloaded, say), retry on the full pass's cadence.
            let health = if failures.failing() {
                Health::Held
            } else {
                match check(layout, &expected, &mut missing_since) {
                    Ok(health) => health,
                    Err(e) => {
                        failures.failed("reading the socket slots", &e);
                        Health::Held
                    }
                }
            };
            if due || matches!(health, Health::Changed | Health::Waiting { costly: false }) {
                let applied;
                (expected, applied) = pass(layout, &config, bindings_pending, &mut missing_since, &mut failures);
                bindings_pending &= !applied;
                if due {
                    last_full = Instant::now();
                }
                if applied && woke.state {
                    // A state loaded anew has an empty ring buffer of its own.
                    events.reopen_ring();
                }
            }
        }
    }
}

/// Followed UDP binds were reported: inserts the sockets now bound for
/// the config's followed UDP registrations.
fn udp_binds(layout: &Layout, config: &Config, count: usize, failures: &mut Failures) {
    let unsupported = follow::unsupported();
    let udp: Vec<_> = config
        .registrations
        .iter()
        .filter(|w| w.protocol == Protocol::Udp && w.followed(unsupported.as_deref()).unwrap_or(false))
        .map(|w| w.as_follow())
        .collect();
    if udp.is_empty() {
        return;
    }
    match Dispatcher::open_write(layout).and_then(|state| follow::backfill(&state, &udp)) {
        Ok(done) => {
            if done.backfilled > 0 {
                info!("{count} followed UDP bind(s): {} socket(s) inserted", done.backfilled);
            }
            if done.full > 0 {
                warn!("{} UDP socket(s) found their slot full ({} members)", done.full, steer_common::SLOT_MEMBERS);
            }
        }
        Err(e) => failures.failed("inserting followed UDP sockets", &e),
    }
}

/// The state directory's inode: another one is a state loaded anew.
fn state_inode(layout: &Layout) -> Option<u64> {
    std::fs::metadata(&layout.dir).ok().map(|m| m.ino())
}

/// Reads every registration's slot (three maps, opened once, under a
/// shared lock) against what the last pass put there. Notes when a slot
/// empties.
fn check(layout: &Layout, expected: &[Slot], missing_since: &mut [Option<Instant>]) -> Result<Health> {
    let state = Dispatcher::open_read(layout)?;
    let mut changed = false;
    let mut waiting: Option<bool> = None;
    for (i, slot) in expected.iter().enumerate() {
        match slot {
            Slot::Followed => {}
            Slot::Waiting => waiting = Some(false),
            Slot::Blocked { target, listeners: then } => {
                let unchanged = listeners(target).is_ok_and(|now| now == *then);
                waiting = Some(waiting.unwrap_or(true) && unchanged);
            }
            Slot::Held { label, family, protocol, cookie } => {
                if state.slot_cookie(label, *family, *protocol)? != Some(*cookie) {
                    if let Some(since) = missing_since.get_mut(i).filter(|s| s.is_none()) {
                        *since = Some(Instant::now());
                        warn!(
                            "{label} {protocol} {family}: registered socket {cookie} is gone; looking for a replacement"
                        );
                    }
                    changed = true;
                }
            }
        }
    }
    Ok(match (changed, waiting) {
        (true, _) => Health::Changed,
        (false, Some(costly)) => Health::Waiting { costly },
        (false, None) => Health::Held,
    })
}

/// Plans and, when something changes, applies the config under the write
/// lock; with `bindings` false the config's bindings are left out (they
/// are applied once per (re)load). Returns what each slot should hold,
/// and whether the pass got as far as planning and applying.
fn pass(
    layout: &Layout,
    config: &Config,
    bindings: bool,
    missing_since: &mut Vec<Option<Instant>>,
    failures: &mut Failures,
) -> (Vec<Slot>, bool) {
    missing_since.resize(config.registrations.len(), None);
    let scoped;
    let config = if bindings {
        config
    } else {
        scoped = Config { bindings: None, registrations: config.registrations.clone() };
        &scoped
    };
    let unknown = vec![Slot::Waiting; config.registrations.len()];
    let planned = Dispatcher::open_read(layout).and_then(|state| apply::plan(&state, config));
    // Registrations that failed to apply, and whether they failed alike in
    // the pass before (then they wait, as blocked registrations do).
    let mut failed: Vec<(String, bool)> = Vec::new();
    let plan = match planned {
        Ok(plan) if !plan.changes() => {
            failures.registrations(&[]);
            plan
        }
        Ok(_) => match Dispatcher::open_write(layout).and_then(|state| apply::apply(&state, config)) {
            Ok(applied) => {
                for line in applied.plan.describe(false) {
                    let quiet = line.contains(": unchanged (") || line.contains(": waiting: ");
                    // A step's line starts with its "label target"; a failed one did not happen.
                    let failed = applied.failed.iter().any(|(what, _)| line.starts_with(&format!("{what}: ")));
                    if !quiet && !failed {
                        info!("{line}");
                    }
                }
                failed = applied
                    .failed
                    .iter()
                    .map(|(what, err)| {
                        (what.clone(), failures.registrations.iter().any(|f| f.0 == *what && f.1 == *err))
                    })
                    .collect();
                failures.registrations(&applied.failed);
                applied.plan
            }
            Err(e) => {
                failures.failed("applying", &e);
                return (unknown, false);
            }
        },
        Err(e) => {
            failures.failed("planning", &e);
            return (unknown, false);
        }
    };
    failures.ok();
    let slots = plan
        .registrations
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let w = &step.wanted;
            // A registration that failed (the socket closed meanwhile, its
            // fd could not be taken) is tried again at once; failing alike
            // twice, blocked.
            let what = format!("{} {}", w.label, w.target());
            if let Some((_, again)) = failed.iter().find(|(w, _)| *w == what) {
                return if *again { blocked(w.target()) } else { Slot::Waiting };
            }
            let since = match &step.choice {
                Choice::Register { member, .. } => missing_since[i].take().map(|since| (member, since)),
                _ => None,
            };
            if let Some((member, since)) = since {
                info!(
                    "{} {}: replacement cookie {} registered {} ms after the old socket went missing",
                    w.label,
                    w.target(),
                    member.cookie,
                    since.elapsed().as_millis()
                );
            }
            match (step.outcome(), &step.choice) {
                (_, Choice::Follow { .. }) => Slot::Followed,
                (Some((family, cookie)), _) => {
                    Slot::Held { label: w.label.clone(), family, protocol: w.protocol, cookie }
                }
                (None, Choice::Wait { listening: true, .. }) => blocked(w.target()),
                (None, _) => Slot::Waiting,
            }
        })
        .collect();
    (slots, true)
}
