//! The state directory's lock: exclusive for changes, shared for reads, so
//! concurrent steer commands never lose an update or read one half done.
//! It is a flock on the directory itself, which is root's and mode 0700:
//! nobody else can open it, so nobody else can take the lock. A command
//! that waits says after a second who holds it, and gives up after the
//! wait set with [`set_wait`] (`steerctl --wait`, 30 s by default).

use std::{
    fs::File,
    os::{fd::OwnedFd, unix::fs::MetadataExt},
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    fcntl::{Flock, FlockArg},
};

use crate::error::{Context, Error, Result};

/// Held for as long as it lives; released on drop.
#[derive(Debug)]
pub struct StateLock {
    _lock: Flock<File>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    Shared,
    Exclusive,
}

static WAIT_MS: AtomicU64 = AtomicU64::new(30_000);

/// How long a command waits for another's lock before giving up.
pub fn set_wait(wait: Duration) {
    WAIT_MS.store(wait.as_millis().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
}

fn wait() -> Duration {
    Duration::from_millis(WAIT_MS.load(Ordering::Relaxed))
}

/// "pid 123 (steerctl)" for the processes holding a lock on `file`, from /proc/locks.
fn holders(file: &File) -> String {
    let Ok(meta) = file.metadata() else { return "another process".into() };
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    let found: Vec<String> = procfs::locks()
        .unwrap_or_default()
        .into_iter()
        .filter(|l| l.inode == meta.ino() && u64::from(l.devmaj) == major && u64::from(l.devmin) == minor)
        .filter_map(|l| l.pid)
        .map(|pid| {
            let comm = procfs::process::Process::new(pid).and_then(|p| p.stat()).map(|s| s.comm).unwrap_or_default();
            format!("pid {pid} ({comm})")
        })
        .collect();
    if found.is_empty() { "another process".into() } else { found.join(", ") }
}

impl StateLock {
    /// Locks the directory `dir` (an fd opened for reading), waiting as
    /// the module describes; `path` names it in messages.
    pub fn acquire(dir: OwnedFd, path: &Path, mode: LockMode) -> Result<Self> {
        let nonblocking = match mode {
            LockMode::Shared => FlockArg::LockSharedNonblock,
            LockMode::Exclusive => FlockArg::LockExclusiveNonblock,
        };
        let mut file = File::from(dir);
        let start = Instant::now();
        let mut told = false;
        let mut pause = Duration::from_millis(1);
        loop {
            match Flock::lock(file, nonblocking) {
                Ok(lock) => return Ok(Self { _lock: lock }),
                Err((back, Errno::EWOULDBLOCK)) => file = back,
                Err((_, e)) => return Err(e).context("locking the state directory"),
            }
            let waited = start.elapsed();
            if waited >= wait() {
                return Err(Error::Conflict(format!(
                    "gave up after {}s waiting for the lock on {}, held by {}; pass --wait SECONDS to wait longer",
                    wait().as_secs_f64(),
                    path.display(),
                    holders(&file)
                )));
            }
            if !told && waited >= Duration::from_secs(1) {
                log::warn!("waiting for the lock on {}, held by {}", path.display(), holders(&file));
                told = true;
            }
            std::thread::sleep(pause.min(wait() - waited));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    /// Locks a directory nobody else can have yet (a new one), without waiting.
    pub fn fresh(dir: OwnedFd) -> Result<Self> {
        let file = File::from(dir);
        Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map(|lock| Self { _lock: lock })
            .map_err(|(_, e)| e)
            .context("locking a new state directory")
    }
}
