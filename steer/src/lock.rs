//! The state directory's lock: exclusive for changes, shared for reads, so
//! concurrent steer commands never lose an update or read one half done.

use std::{fs::File, os::unix::fs::MetadataExt, path::Path};

use nix::fcntl::{Flock, FlockArg};

use crate::{
    bpffs,
    error::{Context, Result},
};

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

impl StateLock {
    /// Waits for the lock on the state directory `dir`.
    pub fn acquire(dir: &Path, mode: LockMode) -> Result<Self> {
        let arg = match mode {
            LockMode::Shared => FlockArg::LockShared,
            LockMode::Exclusive => FlockArg::LockExclusive,
        };
        loop {
            bpffs::require_dir(dir)?;
            let file = File::open(dir).with_context(|| format!("opening {}", dir.display()))?;
            let inode = file.metadata()?.ino();
            let lock = Flock::lock(file, arg).map_err(|(_, errno)| errno).context("locking the state directory")?;
            // An unload may have removed the directory while we waited: then
            // the lock is on a dead inode and the path names another, or none.
            match std::fs::metadata(dir) {
                Ok(now) if now.ino() == inode => return Ok(Self { _lock: lock }),
                _ => continue,
            }
        }
    }
}
