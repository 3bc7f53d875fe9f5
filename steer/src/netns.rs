//! The network namespace steer acts on.

use std::{os::unix::fs::MetadataExt, path::Path};

use crate::error::{Context, Result};

/// The calling thread's network namespace. Not /proc/self/ns/net: that is
/// the main thread's, which differs in a thread that entered another one.
pub const CURRENT: &str = "/proc/thread-self/ns/net";

/// Inode of the calling thread's network namespace, as `ip netns identify`
/// and `ls -l /proc/self/ns/net` show it.
pub fn current_inode() -> Result<u64> {
    Ok(std::fs::metadata(CURRENT).with_context(|| format!("reading {CURRENT}"))?.ino())
}

/// Moves the calling thread (at start-up: the whole process) into the
/// network namespace at `path`, such as /run/netns/NAME.
pub fn enter(path: &Path) -> Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {} (is it a netns file?)", path.display()))
}
