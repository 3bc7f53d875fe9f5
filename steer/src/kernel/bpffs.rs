//! Where state may live: on a mounted bpf filesystem, in directories no
//! other user can change.
//!
//! A state directory's path is checked component by component from `/`,
//! each opened relative to its parent with O_NOFOLLOW and checked on its
//! fd, so a symlink or a directory another user made cannot slip in, and
//! the check cannot be raced: once every component is one only root can
//! change (or sits in a sticky directory and is root's), nobody else can
//! swap any of them afterwards.

use std::{
    ffi::OsStr,
    os::fd::{AsFd, OwnedFd},
    path::{Component, Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::{OFlag, open, openat},
    sys::{
        stat::{Mode, fstat, mkdirat},
        statfs::{BPF_FS_MAGIC, fstatfs, statfs},
    },
};

use crate::error::{Error, Result, fail};

fn is_bpffs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

fn not_bpffs(path: &Path, pin: &Path) -> Error {
    // Suggest the conventional mount point under /sys/fs, else the
    // directory that exists but is not bpffs.
    let mount_point =
        pin.ancestors().find(|p| p.parent().is_some_and(|parent| parent == Path::new("/sys/fs"))).unwrap_or(path);
    Error::NotBpffs { path: path.to_path_buf(), mount_point: PathBuf::from(mount_point) }
}

fn not_a_real_dir(at: &Path) -> Error {
    Error::Permission(format!(
        "{} is a symlink or not a directory; steer keeps state only in real directories: remove it (rm {})",
        at.display(),
        at.display()
    ))
}

fn not_reachable(at: &Path) -> Error {
    Error::Permission(format!(
        "{} is not reachable for this user: steer's state is root's (pins and directories are root-only, mode 0700); run as root",
        at.display()
    ))
}

/// Fails unless `dir`, or the nearest directory above it that exists, is
/// on bpffs; NotLoaded when `dir` itself is missing (or goes while this
/// looks: a concurrent unload).
pub fn require_dir(dir: &Path) -> Result<()> {
    // Not followed: with fs.protected_symlinks (Debian's default) even
    // root gets EACCES following another user's symlink in a sticky dir.
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() => return Err(not_a_real_dir(dir)),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(not_reachable(dir)),
        _ => {}
    }
    if !dir.is_dir() {
        if let Some(existing) = dir.ancestors().skip(1).find(|p| p.is_dir()) {
            if !is_bpffs(existing) {
                return Err(not_bpffs(existing, dir));
            }
        }
        return Err(Error::NotLoaded { dir: dir.to_path_buf() });
    }
    match statfs(dir) {
        Ok(s) if s.filesystem_type() == BPF_FS_MAGIC => Ok(()),
        Ok(_) => Err(not_bpffs(dir, dir)),
        Err(Errno::ENOENT) => Err(Error::NotLoaded { dir: dir.to_path_buf() }),
        Err(e) => Err(std::io::Error::from(e).into()),
    }
}

/// Fails unless `path` is a file on bpffs (a pin).
pub fn require_pin(path: &Path, what: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        // A directory gone meanwhile (a concurrent unload) is "no pin" below.
        if statfs(dir).is_ok_and(|s| s.filesystem_type() != BPF_FS_MAGIC) {
            return Err(not_bpffs(dir, path));
        }
    }
    if !path.exists() {
        fail!(Pin, "no {what} pinned at {}", path.display());
    }
    Ok(())
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// What is wrong with a directory another user could change, and the fix.
fn unsafe_dir(path: &Path, uid: u32, mode: u32, why: &str, fix: &str) -> Error {
    Error::Permission(format!("{} (owner uid {uid}, mode {:04o}) {why}; {fix}", path.display(), mode & 0o7777))
}

/// [`open_checked`], and the opened directory on bpffs: checked on its fd,
/// so the directory checked is the one used.
pub fn open_checked_bpffs(path: &Path, ours: usize) -> Result<OwnedFd> {
    let dir = open_checked(path, ours)?;
    match fstatfs(&dir) {
        Ok(s) if s.filesystem_type() == BPF_FS_MAGIC => Ok(dir),
        Ok(_) => Err(not_bpffs(path, path)),
        Err(e) => Err(std::io::Error::from(e).into()),
    }
}

/// The directory `path`, every component checked as the module describes;
/// the last `ours` components are steer's own and must also be the
/// caller's, closed to everyone else (mode 0700). Errors name the path,
/// its owner and mode, and what to do. A missing component is NotLoaded.
/// The directory is opened for reading, so it can be locked.
pub fn open_checked(path: &Path, ours: usize) -> Result<OwnedFd> {
    if !path.is_absolute() {
        fail!(Invalid, "{} is not an absolute path", path.display());
    }
    let names: Vec<&OsStr> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(Ok(n)),
            Component::RootDir => None,
            _ => Some(Err(())),
        })
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Invalid(format!("{} must not contain `.` or `..`", path.display())))?;
    let me = euid();
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut dir: OwnedFd = open("/", flags, Mode::empty()).map_err(std::io::Error::from)?;
    let mut at = PathBuf::from("/");
    let mut parent_shared = false;
    for (i, name) in names.iter().enumerate() {
        at.push(name);
        let last = i + 1 == names.len();
        let flags = if last { (flags - OFlag::O_PATH) | OFlag::O_RDONLY } else { flags };
        let next = match openat(dir.as_fd(), *name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => return Err(Error::NotLoaded { dir: path.to_path_buf() }),
            Err(Errno::ENOTDIR | Errno::ELOOP) => return Err(not_a_real_dir(&at)),
            Err(Errno::EACCES) => return Err(not_reachable(&at)),
            Err(e) => return Err(std::io::Error::from(e).into()),
        };
        let stat = fstat(&next).map_err(std::io::Error::from)?;
        let (uid, mode) = (stat.st_uid, stat.st_mode);
        let trusted_owner = uid == 0 || uid == me;
        if parent_shared && !trusted_owner {
            // In a directory others may write, only an entry's owner can move it.
            return Err(unsafe_dir(
                &at,
                uid,
                mode,
                "belongs to another user in a directory everyone may write",
                &format!("remove it (rm -r {}) and let steer create it", at.display()),
            ));
        }
        if i + ours >= names.len() {
            if uid == me && mode & 0o077 != 0 && mode & 0o022 == 0 {
                // Readable by others but theirs to change: how steer
                // releases before b2bce37 made their directories.
                return Err(unsafe_dir(
                    &at,
                    uid,
                    mode,
                    "must be closed to other users (0700); an older steer made it so",
                    &format!("`steerctl upgrade` closes it (and migrates the state), or chmod 700 {}", at.display()),
                ));
            }
            if uid != me || mode & 0o077 != 0 {
                return Err(unsafe_dir(
                    &at,
                    uid,
                    mode,
                    "must be this user's and closed to others (0700)",
                    &format!("remove it (rm -r {}) and load again, or chown {me} and chmod 700 it", at.display()),
                ));
            }
        } else if !trusted_owner || (mode & 0o022 != 0 && mode & 0o1000 == 0) {
            return Err(unsafe_dir(
                &at,
                uid,
                mode,
                "could be changed by another user",
                "keep steer's state under a directory only root can write (or a sticky one such as bpffs's root)",
            ));
        }
        parent_shared = mode & 0o022 != 0;
        dir = next;
    }
    Ok(dir)
}

/// `dir`'s last component and its parent, for *at() calls.
pub fn split(dir: &Path) -> Result<(&Path, &OsStr)> {
    match (dir.parent(), dir.file_name()) {
        (Some(parent), Some(name)) => Ok((parent, name)),
        _ => fail!(Invalid, "{} is not a directory steer can keep state in", dir.display()),
    }
}

/// Makes `name` (mode 0700) in the checked directory `parent` unless it
/// exists; true when made.
pub fn make_private_dir(parent: &OwnedFd, name: &OsStr) -> Result<bool> {
    match mkdirat(parent, name, Mode::S_IRWXU) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(Errno::EROFS) => {
            let at = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(parent)))
                .map_or_else(|_| PathBuf::from(name), |dir| dir.join(name));
            Err(Error::Permission(format!("cannot make {}: {}", at.display(), read_only_hint())))
        }
        Err(e) => Err(std::io::Error::from(e).into()),
    }
}

/// Fails (saying which mount and what to do) when the directory `dir`
/// (opened) is on a read-only mount: a write that detached a link and then
/// could not remove its pin would leave a state that reads as stale.
pub fn require_writable(dir: &OwnedFd, path: &Path) -> Result<()> {
    match nix::sys::statvfs::fstatvfs(dir) {
        Ok(s) if s.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) => {
            Err(Error::Permission(format!("{} cannot be changed: {}", path.display(), read_only_hint())))
        }
        _ => Ok(()),
    }
}

/// Why a write to bpffs failed with EROFS, and the fix: containers are
/// where a read-only bpffs (or /sys) is met.
pub(crate) fn read_only_hint() -> &'static str {
    "the bpf filesystem is mounted read-only here (EROFS), and steer pins its state there; mount it read-write. In a \
     container: no `:ro` on `-v /sys/fs/bpf:/sys/fs/bpf` (podman, docker), no `readOnly: true` on its volumeMount \
     (Kubernetes); an unprivileged container's /sys is read-only, so bpffs must be a volume of its own on /sys/fs/bpf"
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("steer-bpffs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new().mode(0o755).create(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir
    }

    #[test]
    fn private_dirs_pass_and_open_ones_do_not() {
        let base = scratch("modes");
        let ours = base.join("state");
        std::fs::DirBuilder::new().mode(0o700).create(&ours).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o700)).unwrap();
        open_checked(&ours, 1).unwrap();
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = open_checked(&ours, 1).unwrap_err().to_string();
        assert!(err.contains("mode 0755") && err.contains("`steerctl upgrade` closes it"), "{err}");
        std::fs::set_permissions(&ours, std::fs::Permissions::from_mode(0o775)).unwrap();
        let err = open_checked(&ours, 1).unwrap_err().to_string();
        assert!(err.contains("mode 0775") && err.contains("must be this user's and closed to others"), "{err}");
        assert!(matches!(open_checked(&base.join("missing"), 1), Err(Error::NotLoaded { .. })));
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn symlinks_are_refused_wherever_they_are() {
        let base = scratch("links");
        std::fs::DirBuilder::new().mode(0o700).create(base.join("real")).unwrap();
        symlink(base.join("real"), base.join("link")).unwrap();
        let err = open_checked(&base.join("link"), 1).unwrap_err().to_string();
        assert!(err.contains("is a symlink or not a directory"), "{err}");
        let err = open_checked(&base.join("link").join("x"), 1).unwrap_err().to_string();
        assert!(err.contains("is a symlink"), "{err}");
        std::fs::remove_dir_all(base).unwrap();
    }

    #[test]
    fn relative_and_dotted_paths_are_refused() {
        assert!(open_checked(Path::new("relative/dir"), 1).is_err());
        assert!(open_checked(Path::new("/tmp/../etc"), 1).unwrap_err().to_string().contains("must not contain"));
    }
}
