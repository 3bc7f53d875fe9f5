use anyhow::{Context, Result};
use std::os::unix::fs::MetadataExt;

pub const CURRENT: &str = "/proc/self/ns/net";

/// Inode of the caller's network namespace, as `ip netns identify` and
/// `ls -l /proc/self/ns/net` show it.
pub fn current_inode() -> Result<u64> {
    Ok(std::fs::metadata(CURRENT).context("reading /proc/self/ns/net")?.ino())
}
