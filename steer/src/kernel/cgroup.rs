//! cgroup v2: where the follow programs attach. A scope is a cgroup of the
//! unified hierarchy, named by its path under the hierarchy's root. The
//! hierarchy is found where it is mounted (/proc/self/mountinfo: hybrid
//! hosts mount it at /sys/fs/cgroup/unified, not /sys/fs/cgroup); where no
//! mount is visible (`ip netns exec` mounts a sysfs of its own over /sys,
//! a container may mount none), a detached mount of it is made for this
//! process alone (fsopen/fsmount, Linux 5.2), which touches no mount table.
//! Everything is opened relative to the hierarchy's root fd. Only sockets
//! made inside a scope's cgroup (or below it) are seen by the programs
//! attached there.

use std::{
    os::fd::{AsFd, OwnedFd},
    path::{Component, Path},
};

use nix::{
    dir::Dir,
    fcntl::{OFlag, open, openat},
    sys::{
        stat::{Mode, fstat},
        statfs::{CGROUP2_SUPER_MAGIC, fstatfs},
    },
};

use crate::error::{Context, Error, Result, fail};

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// The root of the cgroup v2 hierarchy, opened.
fn root_fd() -> Result<OwnedFd> {
    let mounts = procfs::process::Process::myself().and_then(|p| p.mountinfo()).ok();
    if let Some(m) = mounts.into_iter().flatten().find(|m| m.fs_type == "cgroup2" && m.root == "/") {
        let fd = open(&m.mount_point, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(io)
            .with_context(|| format!("opening the cgroup v2 hierarchy at {}", m.mount_point.display()))?;
        return Ok(fd);
    }
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, fsconfig_create, fsmount, fsopen};
    let detached = || -> rustix::io::Result<OwnedFd> {
        let fs = fsopen("cgroup2", FsOpenFlags::FSOPEN_CLOEXEC)?;
        fsconfig_create(&fs)?;
        fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty())
    };
    let mount = detached().map_err(|e| {
        Error::Kernel(format!(
            "no cgroup v2 hierarchy is mounted here, and mounting one failed ({e}): following servers in the \
             kernel attaches to a cgroup v2; mount one (`mount -t cgroup2 none /sys/fs/cgroup/unified`)"
        ))
    })?;
    // fsmount gives a path-only fd: reopen it to read and attach to.
    Ok(openat(&mount, ".", OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map_err(io)?)
}

/// A cgroup of the unified hierarchy.
#[derive(Debug)]
pub struct Cgroup {
    /// Its path relative to the hierarchy's root ("" for the root).
    pub path: String,
    /// The cgroup id: the inode of its directory, as the kernel reports it
    /// (sock_diag's INET_DIAG_CGROUP_ID, bpf_get_current_cgroup_id).
    pub id: u64,
    dir: OwnedFd,
}

impl Cgroup {
    /// The root of the hierarchy: every process's sockets.
    pub fn root() -> Result<Self> {
        Self::named("")
    }

    /// The cgroup at `path`, relative to the hierarchy's root
    /// (`system.slice/nginx.service`; a leading `/` is allowed).
    pub fn named(path: &str) -> Result<Self> {
        let relative = Path::new(path.trim_start_matches('/'));
        if relative.components().any(|c| !matches!(c, Component::Normal(_))) {
            fail!(Invalid, "cgroup {path:?} must be a path under the cgroup v2 root, without `.` or `..`");
        }
        let root = root_fd()?;
        let dir = if relative.as_os_str().is_empty() {
            root
        } else {
            openat(&root, relative, OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC, Mode::empty()).map_err(
                |e| {
                    Error::Invalid(format!(
                        "no cgroup {path} ({e}): name an existing cgroup v2, relative to its root \
                         (`systemd-cgls`, or the line of `cat /proc/PID/cgroup` that starts with 0::)"
                    ))
                },
            )?
        };
        if !fstatfs(&dir).is_ok_and(|s| s.filesystem_type() == CGROUP2_SUPER_MAGIC) {
            fail!(Invalid, "{path} is not a cgroup v2 directory");
        }
        let id = fstat(&dir).map_err(io)?.st_ino;
        Ok(Self { path: relative.to_string_lossy().into_owned(), id, dir })
    }

    /// The ids of this cgroup and every cgroup below it: whose sockets the
    /// programs attached here see.
    pub fn subtree_ids(&self) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let first = self.dir.as_fd().try_clone_to_owned()?;
        let mut stack = vec![first];
        // Bounded by the number of cgroups.
        while let Some(dir) = stack.pop() {
            out.push(fstat(&dir).map_err(io)?.st_ino);
            let mut listing = Dir::from_fd(dir.try_clone()?).map_err(io)?;
            for entry in listing.iter().flatten() {
                let name = entry.file_name();
                if name.to_bytes() == b"." || name.to_bytes() == b".." {
                    continue;
                }
                if entry.file_type() == Some(nix::dir::Type::Directory) {
                    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
                    if let Ok(child) = openat(&dir, name, flags, Mode::empty()) {
                        stack.push(child);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The directory, to attach programs to.
    pub fn fd(&self) -> &OwnedFd {
        &self.dir
    }

    /// How it reads in messages: its path, or "the root cgroup".
    pub fn describe(&self) -> String {
        if self.path.is_empty() { "the root cgroup".into() } else { format!("cgroup {}", self.path) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_found_and_bad_names_are_refused() {
        let root = Cgroup::root().unwrap();
        assert_eq!(root.path, "");
        assert!(root.subtree_ids().unwrap().contains(&root.id));
        assert!(Cgroup::named("no/such/cgroup").unwrap_err().to_string().contains("no cgroup"));
        assert!(Cgroup::named("../etc").unwrap_err().to_string().contains("without `.` or `..`"));
    }
}
