//! Taking a socket out of another process and checking it can be steered to.

use std::{
    fmt,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use anyhow::{Context, Result, bail};
use nix::sys::{
    socket::{SockaddrLike, SockaddrStorage, getpeername, getsockname},
    stat::{SFlag, fstat},
};
use serde::Serialize;

use crate::{netns, sys};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => bail!("protocol must be tcp or udp, not {s:?}"),
        }
    }
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match i32::from(number) {
            libc::IPPROTO_TCP => Some(Protocol::Tcp),
            libc::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn af(self) -> u8 {
        match self {
            Family::Ipv4 => libc::AF_INET as u8,
            Family::Ipv6 => libc::AF_INET6 as u8,
        }
    }
    pub fn from_af(af: u8) -> Option<Self> {
        match i32::from(af) {
            libc::AF_INET => Some(Family::Ipv4),
            libc::AF_INET6 => Some(Family::Ipv6),
            _ => None,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// What the kernel says about a socket fd.
#[derive(Debug, Clone, Serialize)]
pub struct SocketInfo {
    pub family: Family,
    /// An IPv6 socket that refuses IPv4 (IPV6_V6ONLY).
    pub v6only: bool,
    pub protocol: Protocol,
    pub local: Option<SocketAddr>,
    pub listening: bool,
    pub connected: bool,
    pub cookie: u64,
    pub inode: u64,
    pub netns_inode: u64,
}

impl fmt::Display for SocketInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.local {
            Some(addr) => write!(f, "{} {addr}", self.protocol),
            None => write!(f, "{} (unbound)", self.protocol),
        }
    }
}

fn sockaddr(storage: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = storage.as_sockaddr_in() {
        return Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)));
    }
    storage.as_sockaddr_in6().map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
}

/// Describes `fd`, failing with a clear message when it is not a TCP or UDP
/// socket of the IPv4/IPv6 families.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketInfo> {
    let stat = fstat(fd).context("fstat")?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFSOCK {
        let what = match kind {
            SFlag::S_IFREG => "a regular file",
            SFlag::S_IFDIR => "a directory",
            SFlag::S_IFIFO => "a pipe",
            SFlag::S_IFCHR => "a character device",
            _ => "not a socket",
        };
        bail!("it is {what}, not a socket");
    }
    let domain = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_DOMAIN)?;
    if domain != libc::AF_INET && domain != libc::AF_INET6 {
        bail!("it is not an IPv4 or IPv6 socket (address family {domain}); only TCP and UDP sockets can be steered to");
    }
    let sock_type = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_TYPE)?;
    let proto = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_PROTOCOL)?;
    let protocol = match (sock_type, proto) {
        (libc::SOCK_STREAM, libc::IPPROTO_TCP) => Protocol::Tcp,
        (libc::SOCK_DGRAM, libc::IPPROTO_UDP) => Protocol::Udp,
        _ => bail!("it is neither a TCP nor a UDP socket (type {sock_type}, protocol {proto})"),
    };
    let listening = sys::getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN)? != 0;
    let local = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|s| sockaddr(&s))
        .filter(|a| a.port() != 0);
    let connected = getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok_and(|p| p.family().is_some());
    let netns_fd = sys::socket_netns(fd).context("reading the socket's network namespace")?;
    let family = if domain == libc::AF_INET { Family::Ipv4 } else { Family::Ipv6 };
    let v6only = family == Family::Ipv6 && sys::getsockopt_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)? != 0;
    Ok(SocketInfo {
        family,
        v6only,
        protocol,
        local,
        listening,
        connected,
        cookie: sys::socket_cookie(fd)?,
        inode: stat.st_ino,
        netns_inode: fstat(netns_fd.as_fd())?.st_ino,
    })
}

/// Fails unless sk_lookup can assign connections to this socket from the
/// caller's network namespace.
pub fn check_steerable(info: &SocketInfo) -> Result<()> {
    match info.protocol {
        Protocol::Tcp if !info.listening => {
            bail!("it is a TCP socket that is not listening ({}); only a listening TCP socket can take new connections", describe_state(info))
        }
        Protocol::Udp if info.local.is_none() => {
            bail!("it is an unbound UDP socket; bind it to an address and port first")
        }
        Protocol::Udp if info.connected => {
            bail!("it is a connected UDP socket; it only receives from its one peer, use an unconnected one")
        }
        _ => {}
    }
    let own = netns::current_inode()?;
    if info.netns_inode != own {
        bail!(
            "it lives in network namespace {} but this command runs in {own}; run it inside the socket's namespace (ip netns exec NAME ...)",
            info.netns_inode
        );
    }
    Ok(())
}

fn describe_state(info: &SocketInfo) -> &'static str {
    match (info.local, info.connected) {
        (_, true) => "connected",
        (Some(_), false) => "bound",
        (None, false) => "unbound",
    }
}

/// Duplicates `fd` out of process `pid` with pidfd_open + pidfd_getfd.
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    if pid <= 0 {
        bail!("PID must be a positive number, got {pid}");
    }
    if fd < 0 {
        bail!("FD must be zero or positive, got {fd}");
    }
    let pidfd = sys::pidfd_open(pid).map_err(|e| match e.raw_os_error() {
        Some(libc::ESRCH) => anyhow::anyhow!("no process with PID {pid}"),
        Some(libc::ENOSYS) => anyhow::anyhow!("this kernel lacks pidfd_open: Linux 5.6 or later is needed"),
        _ => anyhow::Error::new(e).context(format!("pidfd_open({pid})")),
    })?;
    sys::pidfd_getfd(pidfd.as_fd(), fd).map_err(|e| match e.raw_os_error() {
        Some(libc::EBADF) => anyhow::anyhow!("process {pid} has no open file descriptor {fd}"),
        Some(libc::EPERM) => anyhow::anyhow!(
            "not permitted to take fd {fd} from process {pid}: run as root (CAP_SYS_PTRACE) and check kernel.yama.ptrace_scope"
        ),
        Some(libc::ESRCH) => anyhow::anyhow!("process {pid} exited"),
        Some(libc::ENOSYS) => anyhow::anyhow!("this kernel lacks pidfd_getfd: Linux 5.6 or later is needed"),
        _ => anyhow::Error::new(e).context(format!("pidfd_getfd({pid}, {fd})")),
    })
}

/// A socket duplicated from its owner, checked and ready for a sockmap.
pub struct TakenSocket {
    pub pid: i32,
    pub fd: i32,
    pub info: SocketInfo,
    pub socket: OwnedFd,
}

/// Takes `pid`'s `fd` and checks it can be steered to.
pub fn take_steerable(pid: i32, fd: i32) -> Result<TakenSocket> {
    let socket = take_fd(pid, fd)?;
    let context = || format!("fd {fd} of process {pid} cannot be steered to");
    let info = inspect(socket.as_fd()).with_context(context)?;
    check_steerable(&info).with_context(context)?;
    Ok(TakenSocket { pid, fd, info, socket })
}

/// The single steerable socket among `pid`'s fds.
pub fn find_steerable(pid: i32) -> Result<TakenSocket> {
    let mut found = steerable_sockets(pid)?;
    match found.len() {
        1 => Ok(found.pop().expect("one element")),
        0 => bail!("process {pid} has no listening TCP or bound UDP socket in this network namespace"),
        _ => bail!("process {pid} has several sockets, pick one with --fd: {}", describe(&found)),
    }
}

/// Every socket of `pid` that sk_lookup could steer to, duplicated.
pub fn steerable_sockets(pid: i32) -> Result<Vec<TakenSocket>> {
    let process = procfs::process::Process::new(pid).map_err(|_| anyhow::anyhow!("no process with PID {pid}"))?;
    let mut found = Vec::new();
    for entry in process.fd().with_context(|| format!("listing fds of process {pid}"))?.flatten() {
        if !matches!(entry.target, procfs::process::FDTarget::Socket(_)) {
            continue;
        }
        // Failing to take the fd (EPERM, exit) is an error; a socket that
        // cannot be steered to is just not a candidate.
        let socket = take_fd(pid, entry.fd)?;
        let Ok(info) = inspect(socket.as_fd()) else { continue };
        if check_steerable(&info).is_ok() {
            found.push(TakenSocket { pid, fd: entry.fd, info, socket });
        }
    }
    Ok(found)
}

/// "fd 3 (tcp 127.0.0.1:80), ..." for error messages.
pub fn describe(sockets: &[TakenSocket]) -> String {
    sockets.iter().map(|t| format!("fd {} ({})", t.fd, t.info)).collect::<Vec<_>>().join(", ")
}

/// A process holding a socket.
#[derive(Debug, Clone, Serialize)]
pub struct Owner {
    pub pid: i32,
    pub fd: i32,
    pub command: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {}, fd {})", self.command, self.pid, self.fd)
    }
}

/// Every process fd that refers to the socket with `cookie`, and what the
/// socket is (read through one of them).
pub fn find_owners(cookie: u64) -> (Vec<Owner>, Option<SocketInfo>) {
    let me = std::process::id() as i32;
    let Ok(processes) = procfs::process::all_processes() else {
        return (Vec::new(), None);
    };
    let mut owners = Vec::new();
    let mut info = None;
    for process in processes.flatten() {
        if process.pid == me {
            continue;
        }
        let Ok(fds) = process.fd() else { continue };
        for entry in fds.flatten() {
            if !matches!(entry.target, procfs::process::FDTarget::Socket(_)) {
                continue;
            }
            let Ok(fd) = take_fd(process.pid, entry.fd) else { continue };
            if sys::socket_cookie(fd.as_fd()).is_ok_and(|c| c == cookie) {
                if info.is_none() {
                    info = inspect(fd.as_fd()).ok();
                }
                let command = process.stat().map(|s| s.comm).unwrap_or_default();
                owners.push(Owner { pid: process.pid, fd: entry.fd, command });
            }
        }
    }
    (owners, info)
}
