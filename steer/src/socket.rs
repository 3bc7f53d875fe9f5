//! Taking a socket out of another process and checking it can be steered to.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
};

use nix::sys::{
    socket::{SockaddrLike, SockaddrStorage, getpeername, getsockname},
    stat::{SFlag, fstat},
};
use rustix::{
    io::Errno,
    net::{AddressFamily, SocketType, ipproto, sockopt},
    process::{Pid, PidfdFlags, PidfdGetfdFlags, pidfd_getfd, pidfd_open},
};
use serde::{Deserialize, Serialize};
use steer_common::kernel::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    diag,
    error::{Context, Error, Result, fail},
    netns, sys,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => fail!(Invalid, "protocol must be tcp or udp, not {s:?}"),
        }
    }
}

impl Protocol {
    /// The IPPROTO_* number the kernel and the maps use.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP as u8,
            Protocol::Udp => IPPROTO_UDP as u8,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match u32::from(number) {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    /// The AF_* number the kernel and the maps use.
    pub fn af(self) -> u8 {
        match self {
            Family::Ipv4 => AF_INET as u8,
            Family::Ipv6 => AF_INET6 as u8,
        }
    }

    pub fn from_af(af: u8) -> Option<Self> {
        match u32::from(af) {
            AF_INET => Some(Family::Ipv4),
            AF_INET6 => Some(Family::Ipv6),
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
    let domain = sockopt::socket_domain(fd).map_err(std::io::Error::from)?;
    let family = match domain {
        AddressFamily::INET => Family::Ipv4,
        AddressFamily::INET6 => Family::Ipv6,
        other => fail!(
            Invalid,
            "it is not an IPv4 or IPv6 socket (address family {}); only TCP and UDP sockets can be steered to",
            other.as_raw()
        ),
    };
    let sock_type = sockopt::socket_type(fd).map_err(std::io::Error::from)?;
    let proto = sockopt::socket_protocol(fd).map_err(std::io::Error::from)?;
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
    let listening = sockopt::socket_acceptconn(fd).map_err(std::io::Error::from)?;
    let local =
        getsockname::<SockaddrStorage>(fd.as_raw_fd()).ok().and_then(|s| sockaddr(&s)).filter(|a| a.port() != 0);
    let connected = getpeername::<SockaddrStorage>(fd.as_raw_fd()).is_ok_and(|p| p.family().is_some());
    let netns_fd = sys::socket_netns(fd).context("reading the socket's network namespace")?;
    let v6only = family == Family::Ipv6 && sockopt::ipv6_v6only(fd).map_err(std::io::Error::from)?;
    Ok(SocketInfo {
        family,
        v6only,
        protocol,
        local,
        listening,
        connected,
        cookie: sockopt::socket_cookie(fd).map_err(std::io::Error::from)?,
        inode: stat.st_ino,
        netns_inode: fstat(netns_fd.as_fd())?.st_ino,
    })
}

/// Fails unless sk_lookup can assign connections to this socket from the
/// caller's network namespace.
pub fn check_steerable(info: &SocketInfo) -> Result<()> {
    match info.protocol {
        Protocol::Tcp if !info.listening => fail!(
            Invalid,
            "it is a TCP socket that is not listening ({}); only a listening TCP socket can take new connections",
            describe_state(info)
        ),
        Protocol::Udp if info.local.is_none() => {
            fail!(Invalid, "it is an unbound UDP socket; bind it to an address and port first")
        }
        Protocol::Udp if info.connected => {
            fail!(Invalid, "it is a connected UDP socket; it only receives from its one peer, use an unconnected one")
        }
        _ => {}
    }
    let own = netns::current_inode()?;
    if info.netns_inode != own {
        fail!(
            Invalid,
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
        e => Error::Context { context: format!("pidfd_open({pid})"), source: Box::new(std::io::Error::from(e).into()) },
    })?;
    pidfd_getfd(&pidfd, fd, PidfdGetfdFlags::empty()).map_err(|e| match e {
        Errno::BADF => Error::Invalid(format!("process {pid} has no open file descriptor {fd}")),
        Errno::PERM => Error::Permission(format!(
            "not permitted to take fd {fd} from process {pid}: run as root (CAP_SYS_PTRACE) and check kernel.yama.ptrace_scope"
        )),
        Errno::SRCH => Error::Invalid(format!("process {pid} exited")),
        Errno::NOSYS => Error::Kernel("this kernel lacks pidfd_getfd: Linux 5.6 or later is needed".into()),
        e => Error::Context { context: format!("pidfd_getfd({pid}, {fd})"), source: Box::new(std::io::Error::from(e).into()) },
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
    let found = candidates(pid)?;
    match found.as_slice() {
        [one] => take_steerable(pid, one.fd),
        [] => fail!(Invalid, "process {pid} has no listening TCP or bound UDP socket in this network namespace"),
        _ => fail!(Invalid, "process {pid} has several sockets, pick one with --fd: {}", describe(&found)),
    }
}

/// A socket of a process that sk_lookup could steer to, as sock_diag
/// describes it: no fd taken yet.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub fd: i32,
    pub info: SocketInfo,
}

/// Every socket of `pid` that sk_lookup could steer to in this network
/// namespace: its socket fds (from /proc/PID/fd) matched with a sock_diag
/// dump by inode. No fd is taken: `take_steerable` takes only the one chosen.
pub fn candidates(pid: i32) -> Result<Vec<Candidate>> {
    let process =
        procfs::process::Process::new(pid).map_err(|_| Error::Invalid(format!("no process with PID {pid}")))?;
    let mut fds = std::collections::BTreeMap::new();
    for entry in process.fd().with_context(|| format!("listing fds of process {pid}"))?.flatten() {
        if let procfs::process::FDTarget::Socket(inode) = entry.target {
            fds.entry(inode).or_insert(entry.fd);
        }
    }
    let netns = netns::current_inode()?;
    let mut found = Vec::new();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        for socket in diag::sockets(protocol)?.into_iter().filter(diag::DiagSocket::steerable) {
            if let Some(&fd) = fds.get(&socket.inode) {
                found.push(Candidate { fd, info: socket.info(netns) });
            }
        }
    }
    found.sort_by_key(|c| c.fd);
    Ok(found)
}

/// "fd 3 (tcp 127.0.0.1:80), ..." for error messages.
pub fn describe(sockets: &[Candidate]) -> String {
    sockets.iter().map(|c| format!("fd {} ({})", c.fd, c.info)).collect::<Vec<_>>().join(", ")
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
/// socket is: found with sock_diag in this network namespace and /proc,
/// taking no fd (see [`diag`]). Nothing when the socket is not found.
pub fn find_owners(cookie: u64) -> (Vec<Owner>, Option<SocketInfo>) {
    find_owners_of(&[cookie]).remove(&cookie).unwrap_or_default()
}

/// [`find_owners`] for several sockets, with one dump and one /proc scan.
/// Lookup failures are logged and leave the sockets out.
pub fn find_owners_of(cookies: &[u64]) -> BTreeMap<u64, (Vec<Owner>, Option<SocketInfo>)> {
    let found = || -> Result<_> {
        let sockets = diag::by_cookies(cookies)?;
        let inodes: Vec<u64> = sockets.values().map(|s| s.inode).collect();
        let mut owners = diag::owners(&inodes)?;
        let netns = netns::current_inode()?;
        Ok(sockets
            .into_iter()
            .map(|(cookie, s)| (cookie, (owners.remove(&s.inode).unwrap_or_default(), Some(s.info(netns)))))
            .collect())
    };
    found().unwrap_or_else(|e| {
        let chain: Vec<String> = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
            .map(ToString::to_string)
            .collect();
        log::warn!("looking for the owners of sockets {cookies:?}: {}", chain.join(": "));
        BTreeMap::new()
    })
}

/// Which of a process's sockets `register-pid` should take.
#[derive(Debug, Clone)]
pub struct SocketFilter {
    pub protocol: Protocol,
    pub address: std::net::IpAddr,
    pub port: u16,
}

impl SocketFilter {
    /// From the command line's `tcp|udp ADDR PORT`.
    pub fn parse(protocol: &str, address: &str, port: &str) -> Result<Self> {
        Ok(Self {
            protocol: protocol.parse()?,
            address: address
                .parse()
                .map_err(|_| Error::Invalid(format!("{} is not an IP address", crate::bindings::bounded(address))))?,
            port: port
                .parse()
                .map_err(|_| Error::Invalid(format!("{} is not a port", crate::bindings::bounded(port))))?,
        })
    }
}

/// The steerable sockets of `pid` matching `filter`: with a filter exactly
/// one, without one at most one per family and protocol.
pub fn sockets_of(pid: i32, filter: Option<&SocketFilter>) -> Result<Vec<TakenSocket>> {
    let mut found = candidates(pid)?;
    if let Some(f) = filter {
        found.retain(|c| {
            c.info.protocol == f.protocol && c.info.local.is_some_and(|a| a.ip() == f.address && a.port() == f.port)
        });
    }
    match filter {
        Some(f) if found.is_empty() => {
            fail!(
                Invalid,
                "process {pid} has no listening/bound {} socket on {}",
                f.protocol,
                SocketAddr::new(f.address, f.port)
            )
        }
        Some(_) if found.len() > 1 => {
            fail!(Invalid, "process {pid} has several matching sockets: {}", describe(&found))
        }
        None if found.is_empty() => {
            fail!(Invalid, "process {pid} has no listening TCP or bound UDP socket in this network namespace")
        }
        None => {
            let kinds: std::collections::BTreeSet<(Family, Protocol)> =
                found.iter().map(|c| (c.info.family, c.info.protocol)).collect();
            if kinds.len() != found.len() {
                fail!(
                    Invalid,
                    "process {pid} has several sockets of one family and protocol, name one with `tcp|udp ADDR PORT`: {}",
                    describe(&found)
                );
            }
        }
        _ => {}
    }
    // Only now, and only the chosen, are fds taken.
    found.iter().map(|c| take_steerable(pid, c.fd)).collect()
}

/// Sockets handed over by systemd socket activation (LISTEN_PID/LISTEN_FDS),
/// with the fd each was passed as.
pub fn activated_sockets() -> Result<Vec<(BorrowedFd<'static>, SocketInfo)>> {
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
    if count < 1 {
        fail!(Invalid, "LISTEN_FDS is {count}: no sockets were passed");
    }
    let mut out = Vec::new();
    for fd in 3..3 + count {
        // Safety: systemd passes fds 3.. open for this process's lifetime.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let info = inspect(borrowed).with_context(|| format!("passed fd {fd}"))?;
        check_steerable(&info).with_context(|| format!("passed fd {fd} cannot be steered to"))?;
        out.push((borrowed, info));
    }
    Ok(out)
}
