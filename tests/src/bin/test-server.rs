//! A server for the follow tests, whose own word says when it is ready:
//!
//! test-server tcp ADDR NAME [--reuseport]   listens, prints "listening" to
//!     stderr once listen() returned, then answers every connection with NAME
//! test-server tcp ADDR NAME --check STEERED listens, then connects to
//!     STEERED at once: prints "steered" when that connection reached its
//!     own listener, "not steered: ..." otherwise, and exits
//! test-server udp ADDR NAME [--reuseport]   binds, prints "bound" once
//!     bind() returned, then echoes every datagram
//!
//! SIGTERM stops a TCP server gracefully: its listener is shut down (the
//! kernel then moves connections not yet accepted to another member of its
//! reuseport group, with net.ipv4.tcp_migrate_req) and the ones accepted
//! are answered before it exits. SO_REUSEADDR is always set, so a restarted
//! server binds past TIME_WAIT.

use std::{
    io::Write,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
    process::ExitCode,
    time::Duration,
};

use nix::sys::{
    signal::{SigSet, Signal},
    socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen, setsockopt, socket, sockopt,
    },
};

fn bound(kind: SockType, addr: SocketAddr, reuseport: bool) -> OwnedFd {
    let family = if addr.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
    let s = socket(family, kind, SockFlag::SOCK_CLOEXEC, None).expect("socket");
    setsockopt(&s, sockopt::ReuseAddr, &true).expect("SO_REUSEADDR");
    if reuseport {
        setsockopt(&s, sockopt::ReusePort, &true).expect("SO_REUSEPORT");
    }
    match addr {
        SocketAddr::V4(a) => bind(s.as_raw_fd(), &SockaddrIn::from(a)),
        SocketAddr::V6(a) => bind(s.as_raw_fd(), &SockaddrIn6::from(a)),
    }
    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    s
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let [_, kind, addr, name, rest @ ..] = &args[..] else {
        eprintln!("usage: test-server tcp|udp ADDR NAME [--reuseport] [--check STEERED]");
        return ExitCode::FAILURE;
    };
    let addr: SocketAddr = addr.parse().expect("ADDR");
    let reuseport = rest.iter().any(|a| a == "--reuseport");
    let check = rest.iter().position(|a| a == "--check").map(|i| rest[i + 1].parse::<SocketAddr>().expect("STEERED"));
    if kind == "udp" {
        let socket = steer_tests::udp_echo::bind(UdpSocket::from(bound(SockType::Datagram, addr, reuseport)));
        eprintln!("bound");
        steer_tests::udp_echo::serve(socket);
        return ExitCode::SUCCESS;
    }
    let s = bound(SockType::Stream, addr, reuseport);
    listen(&s, Backlog::new(1024).unwrap()).expect("listen");
    let listener = TcpListener::from(s);
    if let Some(steered) = check {
        // Connected once the kernel took it: the SYN went through sk_lookup.
        let client = match TcpStream::connect_timeout(&steered, Duration::from_secs(1)) {
            Ok(c) => c,
            Err(e) => {
                println!("not steered: {e}");
                return ExitCode::SUCCESS;
            }
        };
        let mine = client.local_addr().unwrap();
        // Wait (up to a second) for it in this listener's queue.
        let mut fds = [nix::poll::PollFd::new(std::os::fd::AsFd::as_fd(&listener), nix::poll::PollFlags::POLLIN)];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
        listener.set_nonblocking(true).unwrap();
        let accepted = listener.accept().map(|(_, peer)| peer);
        match accepted {
            Ok(peer) if peer == mine => println!("steered"),
            Ok(peer) => println!("not steered: accepted {peer}, not {mine}"),
            Err(e) => println!("not steered: another socket took it ({e})"),
        }
        return ExitCode::SUCCESS;
    }
    // SIGTERM is taken by sigwait below, in every thread's stead.
    let term = SigSet::from(Signal::SIGTERM);
    term.thread_block().expect("blocking SIGTERM");
    let fd = listener.as_raw_fd();
    let name = name.clone();
    let server = std::thread::spawn(move || {
        for mut conn in listener.incoming() {
            match conn {
                Ok(ref mut c) => drop(c.write_all(format!("{name}\n").as_bytes())),
                Err(_) => return,
            }
        }
    });
    eprintln!("listening");
    let _ = term.wait();
    // Out of LISTEN: accept() in the server thread fails and it returns.
    let _ = nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Both);
    let _ = server.join();
    ExitCode::SUCCESS
}
