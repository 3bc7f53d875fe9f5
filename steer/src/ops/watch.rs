//! `steerctl watch FILE`: keeps a config applied while servers come and go.
//!
//! Every `interval` (10 ms by default) the loop reads each registration's
//! socket slot, a few map lookups and no lock held past them. The kernel
//! empties a slot the moment its socket closes (a server restart, a
//! reuseport member's exit), so a slot that no longer holds what the last
//! pass registered is seen within one interval; from then on each pass
//! looks for a replacement with a sock_diag dump filtered to listening
//! sockets (cheap even on a busy host: established connections are not
//! dumped) and registers it as soon as one listens. A full pass (owner
//! filters, pid files) also runs every `full_every`. The file is re-read
//! when it changes (its mtime, size or inode) or on [`Event::Reload`]
//! (SIGHUP); the bindings are applied when the file is (re)loaded and when
//! the state is loaded anew, the registrations continuously. A failure is
//! logged once and retried every `full_every`. The state lock is held only
//! while a pass plans or applies, never while sleeping.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use log::{error, info, warn};

use super::{apply, register::Choice};
use crate::{
    discovery::diag,
    error::Result,
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

/// (mtime ns, size, inode): changes when the file is written or replaced.
fn stamp(path: &Path) -> Option<(i64, i64, u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.mtime(), m.mtime_nsec(), m.size(), m.ino()))
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

/// Runs until `poll` returns [`Event::Stop`]. Fails only when the file
/// cannot be loaded at start; later failures are logged and retried.
pub fn run(layout: &Layout, file: &Path, options: &Options, mut poll: impl FnMut() -> Option<Event>) -> Result<()> {
    let mut config = Config::load(file)?;
    let mut seen = stamp(file);
    info!(
        "watching {} ({} registrations, bindings {}), checking every {:?}",
        file.display(),
        config.registrations.len(),
        if config.bindings.is_some() { "managed" } else { "left alone" },
        options.interval
    );
    let mut failures = Failures::default();
    let mut missing_since: Vec<Option<Instant>> = vec![None; config.registrations.len()];
    // The file's bindings are applied when the file is (re)read and when
    // the state is new (loaded again under this watch): by the first pass
    // that includes them and succeeds.
    let mut state = state_inode(layout);
    let (mut expected, applied) = pass(layout, &config, true, &mut missing_since, &mut failures);
    let mut bindings_pending = !applied;
    let mut last_full = Instant::now();
    loop {
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
        let now_stamp = stamp(file);
        if now_stamp != seen {
            seen = now_stamp;
            reload = true;
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
                }
                Err(e) => error!("keeping the previous config: {}", e.chain()),
            }
        } else {
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
            }
        }
        std::thread::sleep(options.interval);
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
