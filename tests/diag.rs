//! Socket discovery with sock_diag and /proc on a real kernel: every
//! socket is made inside the test's own namespace, and the library looks
//! from inside it (it acts on the calling thread's namespace).

use std::{
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd, OwnedFd},
    time::Instant,
};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, SockaddrStorage, bind, listen, setsockopt,
    socket, sockopt,
};
use steer::{
    discovery::{
        diag::{self, DiagSocket, TCP_CLOSE, TCP_ESTABLISHED, TCP_LISTEN},
        owners::{owners, sockets_and_owners},
    },
    kernel::socket::inspect,
    model::{Family, Protocol},
};
use steer_tests::TestNs;

fn ns() -> TestNs {
    TestNs::new(std::thread::current().name().unwrap_or("diag"))
}

/// (cookie, inode) of a socket, read through its fd.
fn ids(fd: impl AsFd) -> (u64, u64) {
    let info = inspect(fd.as_fd()).expect("inspecting a test socket");
    (info.cookie, info.inode)
}

fn find(all: &[DiagSocket], fd: impl AsFd) -> DiagSocket {
    let (cookie, inode) = ids(fd);
    let found = all.iter().find(|s| s.cookie == cookie).unwrap_or_else(|| panic!("cookie {cookie} not in {all:#?}"));
    assert_eq!(found.inode, inode);
    found.clone()
}

/// A TCP listener on `addr` with SO_REUSEPORT and, for IPv6, `v6only`.
fn listener(addr: &str, v6only: bool) -> OwnedFd {
    let addr: SocketAddr = addr.parse().unwrap();
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let s = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None).unwrap();
    setsockopt(&s, sockopt::ReusePort, &true).unwrap();
    match addr {
        SocketAddr::V4(a) => bind(s.as_raw_fd(), &SockaddrIn::from(a)).unwrap(),
        SocketAddr::V6(a) => {
            setsockopt(&s, sockopt::Ipv6V6Only, &v6only).unwrap();
            bind(s.as_raw_fd(), &SockaddrIn6::from(a)).unwrap();
        }
    }
    listen(&s, Backlog::new(16).unwrap()).unwrap();
    s
}

fn port_of(fd: &OwnedFd) -> u16 {
    let addr: SockaddrStorage = nix::sys::socket::getsockname(fd.as_raw_fd()).unwrap();
    addr.as_sockaddr_in().map(|a| a.port()).or_else(|| addr.as_sockaddr_in6().map(|a| a.port())).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn dumps_list_tcp_and_udp_sockets_of_both_families() {
    let ns = ns();
    let (v4, v6, udp, connected, tcp, udps) = ns.enter(|| {
        let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
        let v6 = TcpListener::bind("[::1]:0").unwrap();
        let udp = UdpSocket::bind("[::1]:0").unwrap();
        let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect("127.0.0.1:9").unwrap();
        let tcp = diag::sockets(Protocol::Tcp).unwrap();
        let udps = diag::sockets(Protocol::Udp).unwrap();
        (v4, v6, udp, connected, tcp, udps)
    });
    let s = find(&tcp, &v4);
    assert_eq!(
        (s.protocol, s.family, s.local, s.remote),
        (Protocol::Tcp, Family::Ipv4, v4.local_addr().unwrap(), None)
    );
    assert_eq!((s.state, s.uid, s.v6only), (TCP_LISTEN, 0, None));
    assert!(s.steerable());
    let s = find(&tcp, &v6);
    assert_eq!(
        (s.family, s.local, s.state, s.v6only),
        (Family::Ipv6, v6.local_addr().unwrap(), TCP_LISTEN, Some(true))
    );
    // Binding a specific IPv6 address sets v6only, as getsockopt says too.
    assert!(inspect(v6.as_fd()).unwrap().v6only);
    let s = find(&udps, &udp);
    assert_eq!(
        (s.protocol, s.family, s.local, s.remote),
        (Protocol::Udp, Family::Ipv6, udp.local_addr().unwrap(), None)
    );
    assert_eq!(s.state, TCP_CLOSE);
    assert!(s.steerable());
    let s = find(&udps, &connected);
    assert_eq!((s.state, s.remote), (TCP_ESTABLISHED, Some("127.0.0.1:9".parse().unwrap())));
    assert!(!s.steerable());
    // Only sockets of this namespace: the test process's others are elsewhere.
    assert_eq!(tcp.len(), 2, "{tcp:#?}");
    assert_eq!(udps.len(), 2, "{udps:#?}");
}

#[test]
fn listening_excludes_connected_udp_and_ranks_exact_binds_first() {
    let ns = ns();
    ns.enter(|| {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let connected = UdpSocket::bind("127.0.0.1:0").unwrap();
        connected.connect(udp.local_addr().unwrap()).unwrap();
        let found = diag::listening(Protocol::Udp, ip("127.0.0.1"), udp.local_addr().unwrap().port()).unwrap();
        assert_eq!(found.iter().map(|s| s.cookie).collect::<Vec<_>>(), [ids(&udp).0]);
        let connected_port = connected.local_addr().unwrap().port();
        assert_eq!(diag::listening(Protocol::Udp, ip("127.0.0.1"), connected_port).unwrap(), []);
        // TCP on the UDP socket's port: nothing.
        assert_eq!(diag::listening(Protocol::Tcp, ip("127.0.0.1"), udp.local_addr().unwrap().port()).unwrap(), []);

        // An exact bind hides the wildcard one on the same port.
        let wild = listener("0.0.0.0:0", false);
        let port = port_of(&wild);
        let exact = listener(&format!("127.0.0.1:{port}"), false);
        let cookies = |addr: &str| -> Vec<u64> {
            diag::listening(Protocol::Tcp, ip(addr), port).unwrap().iter().map(|s| s.cookie).collect()
        };
        assert_eq!(cookies("127.0.0.1"), [ids(&exact).0]);
        assert_eq!(cookies("127.0.0.2"), [ids(&wild).0]);
        assert_eq!(cookies("::ffff:127.0.0.2"), [ids(&wild).0]);
        assert!(cookies("::1").is_empty());

        // A dual-stack [::] serves IPv4 addresses; a v6only one does not.
        let dual = listener("[::]:0", false);
        let found = diag::listening(Protocol::Tcp, ip("127.0.0.9"), port_of(&dual)).unwrap();
        assert_eq!(found.iter().map(|s| (s.cookie, s.v6only)).collect::<Vec<_>>(), [(ids(&dual).0, Some(false))]);
        let only = listener("[::]:0", true);
        assert_eq!(diag::listening(Protocol::Tcp, ip("127.0.0.9"), port_of(&only)).unwrap(), []);
        let found = diag::listening(Protocol::Tcp, ip("::1"), port_of(&only)).unwrap();
        assert_eq!(found.iter().map(|s| (s.cookie, s.v6only)).collect::<Vec<_>>(), [(ids(&only).0, Some(true))]);
    });
}

#[test]
fn a_reuseport_group_is_reported_whole_with_its_owners() {
    let ns = ns();
    let (sockets, found, owners) = ns.enter(|| {
        let first = listener("127.0.0.1:0", false);
        let addr = format!("127.0.0.1:{}", port_of(&first));
        let sockets = [first, listener(&addr, false), listener(&addr, false)];
        let found = diag::listening(Protocol::Tcp, ip("127.0.0.1"), port_of(&sockets[0])).unwrap();
        let owners = owners(&found.iter().map(|s| s.inode).collect::<Vec<_>>()).unwrap();
        (sockets, found, owners)
    });
    let groups: Vec<&[DiagSocket]> = diag::groups(&found).collect();
    assert_eq!(groups.len(), 1, "{found:#?}");
    let mut want: Vec<(u64, u64)> = sockets.iter().map(ids).collect();
    want.sort_by_key(|&(_, inode)| inode);
    assert_eq!(groups[0].iter().map(|s| (s.cookie, s.inode)).collect::<Vec<_>>(), want);
    // The test process holds them (from outside the namespace: it made
    // them on a thread that had entered it).
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap().trim_end().to_string();
    for s in &sockets {
        let held = &owners[&ids(s).1];
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!((held[0].pid, held[0].fd), (std::process::id() as i32, s.as_raw_fd()));
        assert_eq!(held[0].command, comm);
    }
}

#[test]
fn a_child_process_socket_is_found_with_pid_fd_and_command() {
    let mut ns = ns();
    // Returns once ncat says it listens; no connection was made, so no
    // child of ncat shares the listening fd.
    let ncat = ns.start_ncat_echo() as i32;
    let (found, held, by_cookie, (info, find_owners)) = ns.enter(|| {
        let found = diag::listening(Protocol::Tcp, ip("127.0.0.1"), 7777).unwrap();
        let first = found.first().expect("ncat's listener is not in the dump");
        let held = owners(&[first.inode]).unwrap();
        let both = sockets_and_owners(&[first.cookie]).unwrap().remove(&first.cookie).unzip();
        (found.clone(), held, diag::by_cookie(first.cookie).unwrap(), both)
    });
    assert_eq!(found.len(), 1, "{found:#?}");
    let held = &held[&found[0].inode];
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!((held[0].pid, held[0].fd, held[0].command.as_str()), (ncat, 3, "ncat"));
    assert_eq!(held[0].to_string(), format!("ncat (pid {ncat}, fd 3)"));
    assert_eq!(by_cookie.as_ref(), Some(&found[0]));
    // The existing entry point, now without pidfd_getfd.
    assert_eq!(find_owners.unwrap_or_default().iter().map(|o| (o.pid, o.fd)).collect::<Vec<_>>(), [(ncat, 3)]);
    let info = info.expect("socket info");
    assert_eq!((info.local, info.listening, info.connected), (Some("127.0.0.1:7777".parse().unwrap()), true, false));
    assert_eq!((info.cookie, info.netns_inode), (found[0].cookie, ns.inode()));
}

#[test]
fn sockets_of_other_namespaces_are_not_reported() {
    let (here, there) = (ns(), ns());
    let (tcp, udp) = there.enter(|| (listener("127.0.0.1:0", false), UdpSocket::bind("127.0.0.1:0").unwrap()));
    let (tcp_port, udp_port) = (port_of(&tcp), udp.local_addr().unwrap().port());
    let (cookie, udp_cookie) = (ids(&tcp).0, ids(&udp).0);
    // Seen from its own namespace...
    assert!(there.enter(|| diag::by_cookie(cookie).unwrap()).is_some());
    // ...but not from another one, nor from the test's.
    let seen = here.enter(|| lookups(cookie, udp_cookie, tcp_port, udp_port));
    assert_eq!(seen, (None, None, 0, 0));
    assert_eq!(lookups(cookie, udp_cookie, tcp_port, udp_port), (None, None, 0, 0));
}

/// What the calling thread's namespace shows of the given sockets.
fn lookups(
    cookie: u64,
    udp_cookie: u64,
    tcp_port: u16,
    udp_port: u16,
) -> (Option<DiagSocket>, Option<DiagSocket>, usize, usize) {
    (
        diag::by_cookie(cookie).unwrap(),
        diag::by_cookie(udp_cookie).unwrap(),
        diag::listening(Protocol::Tcp, ip("127.0.0.1"), tcp_port).unwrap().len(),
        diag::listening(Protocol::Udp, ip("127.0.0.1"), udp_port).unwrap().len(),
    )
}

/// Prints (does not assert) what a dump and an owner scan cost here: on
/// the host's namespace as it is, and on a namespace with 1000 TCP
/// listeners and 1000 UDP sockets held by this process (fewer if the hard
/// fd limit is below 2200).
#[test]
fn timings() {
    let time = || {
        let start = Instant::now();
        let mut all = diag::sockets(Protocol::Tcp).unwrap();
        all.extend(diag::sockets(Protocol::Udp).unwrap());
        let dumped = start.elapsed();
        let inodes: Vec<u64> = all.iter().map(|s| s.inode).collect();
        let start = Instant::now();
        let owners = owners(&inodes).unwrap();
        (all.len(), dumped, owners.len(), start.elapsed())
    };
    let processes = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
        .count();
    let (n, dumped, owned, scanned) = time();
    println!(
        "host netns: {n} sockets dumped in {dumped:?}; owners of {owned} found in {scanned:?} ({processes} processes)"
    );
    // 2000 sockets need more fds than the usual soft limit (1024).
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    let pairs = 1000.min(hard.saturating_sub(200) / 2);
    let ns = ns();
    let (held, (n, dumped, owned, scanned)) = ns.enter(|| {
        let mut held: Vec<OwnedFd> = Vec::new();
        for _ in 0..pairs {
            held.push(TcpListener::bind("127.0.0.1:0").unwrap().into());
            held.push(UdpSocket::bind("127.0.0.1:0").unwrap().into());
        }
        (held, time())
    });
    println!(
        "test netns: {n} sockets dumped in {dumped:?}; owners of {owned} found in {scanned:?} (held by this process, outside the namespace)"
    );
    assert_eq!((n, owned), (held.len(), held.len()));
}
