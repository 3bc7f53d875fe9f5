//! The network namespace steer acts on.

use std::{os::unix::fs::MetadataExt, path::Path};

use crate::error::{Context, Result};

pub const CURRENT: &str = "/proc/self/ns/net";

/// Inode of the caller's network namespace, as `ip netns identify` and
/// `ls -l /proc/self/ns/net` show it.
pub fn current_inode() -> Result<u64> {
    Ok(std::fs::metadata(CURRENT).context("reading /proc/self/ns/net")?.ino())
}

/// Moves the calling thread (at start-up: the whole process) into the
/// network namespace at `path`, such as /run/netns/NAME.
pub fn enter(path: &Path) -> Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {} (is it a netns file?)", path.display()))
}
