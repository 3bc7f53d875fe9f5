//! Checks that pins go to a mounted bpf filesystem.

use std::path::{Path, PathBuf};

use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

use crate::error::{Error, Result, fail};

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn not_bpffs(path: &Path, pin: &Path) -> Error {
    // Suggest the conventional mount point when the path is under /sys/fs.
    let mount_point =
        pin.ancestors().find(|p| p.parent().is_some_and(|parent| parent == Path::new("/sys/fs"))).unwrap_or(pin);
    Error::NotBpffs { path: path.to_path_buf(), mount_point: PathBuf::from(mount_point) }
}

/// Fails unless `dir` is an existing directory on bpffs.
pub fn require_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        if let Some(existing) = dir.ancestors().skip(1).find(|p| p.is_dir()) {
            if !is_bpffs(existing) {
                return Err(not_bpffs(existing, dir));
            }
        }
        return Err(Error::NotLoaded { dir: dir.to_path_buf() });
    }
    if !is_bpffs(dir) {
        return Err(not_bpffs(dir, dir));
    }
    Ok(())
}

/// Fails unless `dir` either is on bpffs or can be created on it.
pub fn require_creatable_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return require_dir(dir);
    }
    match dir.ancestors().skip(1).find(|p| p.is_dir()) {
        Some(existing) if is_bpffs(existing) => Ok(()),
        Some(existing) => Err(not_bpffs(existing, dir)),
        None => fail!(Invalid, "{} has no existing parent directory", dir.display()),
    }
}

/// Fails unless `path` is a file on bpffs (a pin).
pub fn require_pin(path: &Path, what: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        if dir.is_dir() && !is_bpffs(dir) {
            return Err(not_bpffs(dir, path));
        }
    }
    if !path.exists() {
        fail!(Pin, "no {what} pinned at {}", path.display());
    }
    Ok(())
}
