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

/// The calling thread's namespace's cookie (SO_NETNS_COOKIE, Linux 5.14):
/// unlike its inode number, never reused by a later namespace. None where
/// the kernel lacks it.
pub fn cookie() -> Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = rustix::net::socket(rustix::net::AddressFamily::UNIX, rustix::net::SocketType::DGRAM, None)
        .map_err(std::io::Error::from)
        .context("making a socket to read the namespace cookie")?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // Safety: cookie and len are live stack slots of the sizes given. (Neither
    // rustix nor nix wraps this option.)
    let ret = unsafe {
        libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
    };
    if ret == 0 {
        return Ok(Some(cookie));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(None),
        e => Err(e).context("reading SO_NETNS_COOKIE"),
    }
}

/// Moves the calling thread (at start-up: the whole process) into the
/// network namespace at `path`, such as /run/netns/NAME.
pub fn enter(path: &Path) -> Result<()> {
    let ns = std::fs::File::open(path).with_context(|| format!("opening network namespace {}", path.display()))?;
    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("entering network namespace {} (is it a netns file?)", path.display()))
}
