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
//! (SIGHUP); the bindings are applied when the file is (re)loaded, the
//! registrations continuously. The state lock is held only while a pass
//! plans or applies, never while sleeping.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use log::{error, info, warn};

use crate::{
    Dispatcher, Layout,
    config::{self, Config},
    error::Result,
    servers::{self, Choice},
    socket::{Family, Protocol},
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

/// What each slot should hold after the last pass: (label, family,
/// protocol, cookie), or None for a registration still waiting.
type Expected = Vec<Option<(String, Family, Protocol, u64)>>;

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
    let mut expected = pass(layout, &config, true, &mut Vec::new());
    let mut last_full = Instant::now();
    let mut missing_since: Vec<Option<Instant>> = vec![None; config.registrations.len()];
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
                    expected = pass(layout, &config, true, &mut missing_since);
                    last_full = Instant::now();
                }
                Err(e) => error!("keeping the previous config: {:#}", anyhow_like(&e)),
            }
        } else if last_full.elapsed() >= options.full_every || !healthy(layout, &expected, &mut missing_since) {
            expected = pass(layout, &config, false, &mut missing_since);
            if last_full.elapsed() >= options.full_every {
                last_full = Instant::now();
            }
        }
        std::thread::sleep(options.interval);
    }
}

/// The error and its causes on one line.
fn anyhow_like(e: &crate::Error) -> String {
    std::iter::successors(Some(e as &dyn std::error::Error), |e| e.source())
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

/// Whether every slot still holds what the last pass put there (reads
/// only the socket map, under a shared lock). Notes when a slot empties.
fn healthy(layout: &Layout, expected: &Expected, missing_since: &mut [Option<Instant>]) -> bool {
    let Ok(state) = Dispatcher::open_read(layout) else { return false };
    let mut ok = true;
    for (i, slot) in expected.iter().enumerate() {
        let Some((label, family, protocol, cookie)) = slot else {
            ok = false;
            continue;
        };
        let now = servers::slot_cookie(&state, label, *family, *protocol).ok().flatten();
        if now != Some(*cookie) {
            if let Some(since) = missing_since.get_mut(i).filter(|s| s.is_none()) {
                *since = Some(Instant::now());
                warn!("{label} {protocol} {family}: registered socket {cookie} is gone; looking for a replacement");
            }
            ok = false;
        }
    }
    ok
}

/// Plans and, when something changes, applies the config under the write
/// lock; with `bindings` false the config's bindings are left out (they
/// are applied on load). Returns what each slot should hold.
fn pass(layout: &Layout, config: &Config, bindings: bool, missing_since: &mut Vec<Option<Instant>>) -> Expected {
    missing_since.resize(config.registrations.len(), None);
    let scoped;
    let config = if bindings {
        config
    } else {
        scoped = Config { bindings: None, registrations: config.registrations.clone() };
        &scoped
    };
    let planned = Dispatcher::open_read(layout).and_then(|state| config::plan(&state, config));
    let plan = match planned {
        Ok(plan) if !plan.changes() => plan,
        Ok(_) => match Dispatcher::open_write(layout).and_then(|state| config::apply(&state, config)) {
            Ok(applied) => {
                for line in applied.plan.describe(false) {
                    if !line.contains(": unchanged (") && !line.contains(": waiting: ") {
                        info!("{line}");
                    }
                }
                for (what, err) in &applied.failed {
                    warn!("{what}: {err}; retrying");
                }
                applied.plan
            }
            Err(e) => {
                error!("applying {:#}", anyhow_like(&e));
                return vec![None; config.registrations.len()];
            }
        },
        Err(e) => {
            error!("planning: {}", anyhow_like(&e));
            return vec![None; config.registrations.len()];
        }
    };
    plan.registrations
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let w = &step.wanted;
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
            step.outcome().map(|(family, cookie)| (w.label.clone(), family, w.protocol, cookie))
        })
        .collect()
}
