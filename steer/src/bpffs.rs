//! Checks that pins go to a mounted bpf filesystem.

use std::path::Path;

use anyhow::{Result, bail};
use nix::sys::statfs::{BPF_FS_MAGIC, statfs};

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn mount_hint(path: &Path) -> String {
    let mount_point = path
        .ancestors()
        .find(|p| p.parent().is_some_and(|parent| parent == Path::new("/sys/fs")))
        .unwrap_or(path);
    format!("mount it with `mount -t bpf bpf {}`", mount_point.display())
}

/// Fails unless `dir` is an existing directory on bpffs.
pub fn require_dir(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        if let Some(existing) = dir.ancestors().skip(1).find(|p| p.is_dir()) {
            if !is_bpffs(existing) {
                bail!("{} is not on a bpf filesystem; {}", existing.display(), mount_hint(dir));
            }
        }
        bail!("no steer state at {}: run `steerctl load` first, or pass the --pin-dir it was loaded with", dir.display());
    }
    if !is_bpffs(dir) {
        bail!("{} is not on a bpf filesystem; {}", dir.display(), mount_hint(dir));
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
        Some(existing) => bail!("{} is not on a bpf filesystem; {}", existing.display(), mount_hint(dir)),
        None => bail!("{} has no existing parent directory", dir.display()),
    }
}

/// Fails unless `path` is a file on bpffs (a pin).
pub fn require_pin(path: &Path, what: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        if dir.is_dir() && !is_bpffs(dir) {
            bail!("{} is not on a bpf filesystem; {}", dir.display(), mount_hint(path));
        }
    }
    if !path.exists() {
        bail!("no {what} pinned at {}", path.display());
    }
    Ok(())
}
