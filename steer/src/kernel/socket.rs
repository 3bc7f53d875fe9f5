//! Socket fds: what the kernel says about one (its family, protocol,
//! state, cookie and namespace), and taking one out of another process
//! (pidfd_open + pidfd_getfd, which needs ptrace rights over it).

use std::{
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
};

use nix::sys::stat::{SFlag, fstat};
use rustix::{
    io::Errno,
    net::{AddressFamily, SocketType, ipproto, sockopt},
    process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open},
};

use super::{netns, sys};
use crate::{
    error::{Context, Error, Result, fail},
    model::{Family, Protocol, SocketInfo},
};

fn io(e: Errno) -> std::io::Error {
    std::io::Error::from(e)
}

/// Describes `fd`, failing with a clear message when it is not a TCP or UDP
/// socket of the IPv4/IPv6 families.
pub fn inspect(fd: BorrowedFd<'_>) -> Result<SocketInfo> {
    let stat = fstat(fd).context("fstat")?;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    if kind != SFlag::S_IFSOCK {
        let what = match kind {
            SFlag::S_IFREG => "a regular file".to_string(),
            SFlag::S_IFDIR => "a directory".to_string(),
            SFlag::S_IFIFO => "a pipe".to_string(),
            SFlag::S_IFCHR => "a character device".to_string(),
            // Such as anon_inode:[eventpoll]: the fd's own name says what it is.
            _ => std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                .map(|l| l.display().to_string())
                .unwrap_or_else(|_| "another kind of file".into()),
        };
        fail!(Invalid, "it is {what}, not a socket");
    }
    let family = match sockopt::socket_domain(fd).map_err(io)? {
        AddressFamily::INET => Family::Ipv4,
        AddressFamily::INET6 => Family::Ipv6,
        other => fail!(
            Invalid,
            "it is not an IPv4 or IPv6 socket (address family {}); only TCP and UDP sockets can be steered to",
            other.as_raw()
        ),
    };
    let sock_type = sockopt::socket_type(fd).map_err(io)?;
    let proto = sockopt::socket_protocol(fd).map_err(io)?;
    let protocol = match (sock_type, proto) {
        (SocketType::STREAM, Some(ipproto::TCP)) => Protocol::Tcp,
        (SocketType::DGRAM, Some(ipproto::UDP)) => Protocol::Udp,
        _ => fail!(
            Invalid,
            "it is neither a TCP nor a UDP socket (type {}, protocol {})",
            sock_type.as_raw(),
            proto.map_or(0, |p| p.as_raw().get())
        ),
    };
    let address = |a: Option<rustix::net::SocketAddrAny>| -> Option<SocketAddr> { a?.try_into().ok() };
    let local = address(rustix::net::getsockname(fd).ok()).filter(|a| a.port() != 0);
    let connected = address(rustix::net::getpeername(fd).ok().flatten()).is_some();
    let netns_fd = sys::socket_netns(fd).context("reading the socket's network namespace")?;
    Ok(SocketInfo {
        family,
        v6only: family == Family::Ipv6 && sockopt::ipv6_v6only(fd).map_err(io)?,
        protocol,
        local,
        listening: sockopt::socket_acceptconn(fd).map_err(io)?,
        connected,
        cookie: sockopt::socket_cookie(fd).map_err(io)?,
        inode: stat.st_ino,
        netns_inode: fstat(netns_fd.as_fd())?.st_ino,
    })
}

/// Duplicates `fd` out of process `pid` with pidfd_open + pidfd_getfd.
pub fn take_fd(pid: i32, fd: i32) -> Result<OwnedFd> {
    // Checked first: Pid::from_raw panics on negative numbers.
    let Some(target) = (pid > 0).then(|| Pid::from_raw(pid)).flatten() else {
        fail!(Invalid, "PID must be a positive number, got {pid}");
    };
    if fd < 0 {
        fail!(Invalid, "FD must be zero or positive, got {fd}");
    }
    let pidfd = pidfd_open(target, PidfdFlags::empty()).map_err(|e| match e {
        Errno::SRCH => Error::Invalid(format!("no process with PID {pid}")),
        Errno::NOSYS => Error::Kernel("this kernel lacks pidfd_open: Linux 5.6 or later is needed".into()),
        e => Error::Context { context: format!("pidfd_open({pid})"), source: Box::new(io(e).into()) },
    })?;
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| match e {
        Errno::BADF => Error::Invalid(format!("process {pid} has no open file descriptor {fd}")),
        Errno::PERM => Error::Permission(format!(
            "not permitted to take fd {fd} from process {pid}: run as root (CAP_SYS_PTRACE) and check kernel.yama.ptrace_scope"
        )),
        Errno::SRCH => Error::Invalid(format!("process {pid} exited")),
        Errno::NOSYS => Error::Kernel("this kernel lacks pidfd_getfd: Linux 5.6 or later is needed".into()),
        e => Error::Context { context: format!("pidfd_getfd({pid}, {fd})"), source: Box::new(io(e).into()) },
    })
}

/// A socket duplicated from its owner (or handed to this process), checked
/// and ready for a socket map.
#[derive(Debug)]
pub struct TakenSocket {
    pub pid: i32,
    pub fd: i32,
    pub info: SocketInfo,
    pub socket: OwnedFd,
}

/// Takes `pid`'s `fd` and checks it can be steered to from this namespace.
pub fn take_steerable(pid: i32, fd: i32) -> Result<TakenSocket> {
    let socket = take_fd(pid, fd)?;
    let context = || format!("fd {fd} of process {pid} cannot be steered to");
    let info = inspect(socket.as_fd()).with_context(context)?;
    info.check_steerable(netns::current_inode()?).with_context(context)?;
    Ok(TakenSocket { pid, fd, info, socket })
}

/// The fds systemd passed this process (LISTEN_PID/LISTEN_FDS, from fd 3
/// on), each checked open and taken as this process's own. Call it before
/// the process opens anything else: a passed fd that is not open would
/// otherwise be confused with the next file opened.
pub fn passed_fds() -> Result<Vec<(i32, OwnedFd)>> {
    let var = |name: &str| std::env::var(name).map_err(|_| Error::Invalid(format!("{name} is not set")));
    let pid: u32 = var("LISTEN_PID")
        .map_err(|_| {
            Error::Invalid("LISTEN_PID is not set: `register` takes sockets passed by systemd socket activation".into())
        })?
        .parse()
        .map_err(|_| Error::Invalid("LISTEN_PID is not a number".into()))?;
    if pid != std::process::id() {
        fail!(
            Invalid,
            "LISTEN_PID is {pid}, not this process ({}): the sockets were meant for another process",
            std::process::id()
        );
    }
    let count: i32 = var("LISTEN_FDS")?.parse().map_err(|_| Error::Invalid("LISTEN_FDS is not a number".into()))?;
    if !(1..=4096).contains(&count) {
        fail!(Invalid, "LISTEN_FDS is {count}: expected 1 to 4096 passed sockets");
    }
    let mut out = Vec::new();
    for fd in 3..3 + count {
        // Safety: only a borrow for the open check, which touches nothing.
        if rustix::io::fcntl_getfd(unsafe { BorrowedFd::borrow_raw(fd) }).is_err() {
            fail!(Invalid, "LISTEN_FDS is {count} but fd {fd} is not open");
        }
        // Safety: fd is open (checked above) and systemd handed it to this
        // process, where nothing else owns it (the caller runs first).
        out.push((fd, unsafe { OwnedFd::from_raw_fd(fd) }));
    }
    Ok(out)
}

/// The passed fds, each checked to be a steerable socket of this namespace.
pub fn passed_sockets(fds: &[(i32, OwnedFd)]) -> Result<Vec<(i32, SocketInfo)>> {
    let netns = netns::current_inode()?;
    fds.iter()
        .map(|(fd, socket)| {
            let info = inspect(socket.as_fd()).with_context(|| format!("passed fd {fd}"))?;
            info.check_steerable(netns).with_context(|| format!("passed fd {fd} cannot be steered to"))?;
            Ok((*fd, info))
        })
        .collect()
}
