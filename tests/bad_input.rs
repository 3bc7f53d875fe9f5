//! Bad input gets a clear error that says what to do, and changes nothing.

use std::{
    net::{TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd},
};

use steer_tests::{TestNs, me, stderr};

/// A loaded, attached dispatcher whose socket map holds ncat's socket, and
/// that socket's cookie: every bad `socket set` must leave it in place.
fn loaded(ns: &mut TestNs) -> u64 {
    ns.steerctl_ok(&["load"]);
    let ncat = ns.start_ncat_echo();
    ns.steerctl_ok(&["attach"]);
    ns.steerctl_ok(&["ports", "add", "7"]);
    ns.steerctl_ok(&["socket", "set", "--pid", &ncat.to_string()]);
    ns.status()["socket"]["cookie"].as_u64().unwrap()
}

/// Runs `socket set` and `sockmap-update` with these arguments, checks both
/// fail saying `message`, and that the socket map and ports are unchanged.
fn assert_rejected(ns: &TestNs, cookie: u64, pid: &str, fd: &str, message: &str) {
    let out = ns.steerctl(&["socket", "set", "--pid", pid, "--fd", fd]);
    assert!(!out.status.success(), "socket set {pid} {fd} should fail");
    assert!(stderr(&out).contains(message), "steerctl said: {}", stderr(&out));
    let map = ns.pin_dir().join("echo_socket");
    let out = ns.run("sockmap-update", &[pid, fd, map.to_str().unwrap()]);
    assert!(!out.status.success(), "sockmap-update {pid} {fd} should fail");
    assert!(stderr(&out).contains(message), "sockmap-update said: {}", stderr(&out));
    let status = ns.status();
    assert_eq!(status["socket"]["cookie"].as_u64(), Some(cookie), "socket map changed");
    assert_eq!(status["ports"], serde_json::json!([7]));
    assert_eq!(ns.echo(7, "still served").unwrap(), "still served");
}

#[test]
fn nonexistent_pid() {
    let mut ns = TestNs::new("nopid");
    let cookie = loaded(&mut ns);
    // PIDs never reach this value (pid_max is at most 2^22).
    assert_rejected(&ns, cookie, "99999999", "3", "no process with PID 99999999");
    assert_rejected(&ns, cookie, "-4", "3", "PID must be a positive number");
}

#[test]
fn fd_not_open_in_the_process() {
    let mut ns = TestNs::new("nofd");
    let cookie = loaded(&mut ns);
    assert_rejected(&ns, cookie, &me(), "999999", &format!("process {} has no open file descriptor 999999", me()));
}

#[test]
fn fd_that_is_a_regular_file() {
    let mut ns = TestNs::new("regfile");
    let cookie = loaded(&mut ns);
    let file = std::fs::File::open("/etc/hostname").unwrap();
    assert_rejected(&ns, cookie, &me(), &file.as_raw_fd().to_string(), "it is a regular file, not a socket");
}

#[test]
fn unbound_udp_socket() {
    let mut ns = TestNs::new("udpunbound");
    let cookie = loaded(&mut ns);
    let sock: OwnedFd = ns.enter(|| {
        nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Datagram,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap()
    });
    assert_rejected(&ns, cookie, &me(), &sock.as_raw_fd().to_string(), "unbound UDP socket");
}

#[test]
fn connected_udp_socket() {
    let mut ns = TestNs::new("udpconn");
    let cookie = loaded(&mut ns);
    let sock = ns.enter(|| {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.connect("127.0.0.1:9").unwrap();
        s
    });
    assert_rejected(&ns, cookie, &me(), &sock.as_raw_fd().to_string(), "connected UDP socket");
}

#[test]
fn tcp_socket_that_is_not_listening() {
    let mut ns = TestNs::new("tcpconn");
    let cookie = loaded(&mut ns);
    // An established connection, and a bound but never listening socket.
    let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let addr = listener.local_addr().unwrap();
    let client = ns.enter(|| TcpStream::connect(addr).unwrap());
    assert_rejected(&ns, cookie, &me(), &client.as_raw_fd().to_string(), "not listening (connected)");
    let bound: OwnedFd = ns.enter(|| {
        use nix::sys::socket::*;
        let s = socket(AddressFamily::Inet, SockType::Stream, SockFlag::empty(), None).unwrap();
        bind(s.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 0)).unwrap();
        s
    });
    assert_rejected(&ns, cookie, &me(), &bound.as_raw_fd().to_string(), "not listening (bound)");
}

#[test]
fn socket_from_another_network_namespace() {
    let mut ns = TestNs::new("otherns");
    let cookie = loaded(&mut ns);
    // Made in the test's own namespace, not the one steered.
    let foreign = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_rejected(&ns, cookie, &me(), &foreign.as_raw_fd().to_string(), "lives in network namespace");
}

#[test]
fn socket_set_without_fd_needs_exactly_one_candidate() {
    let mut ns = TestNs::new("pickfd");
    let cookie = loaded(&mut ns);
    // A process with no socket at all.
    let mut sleeper = ns.command("sleep");
    sleeper.arg("60");
    let pid = ns.spawn(sleeper).to_string();
    let out = ns.steerctl(&["socket", "set", "--pid", &pid]);
    assert!(stderr(&out).contains("has no listening TCP or bound UDP socket"), "{}", stderr(&out));
    // The test process with two listeners in the namespace: ambiguous.
    let _a = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let _b = ns.enter(|| UdpSocket::bind("127.0.0.1:0").unwrap());
    let out = ns.steerctl(&["socket", "set", "--pid", &me()]);
    assert!(stderr(&out).contains("has several sockets, pick one with --fd"), "{}", stderr(&out));
    assert_eq!(ns.status()["socket"]["cookie"].as_u64(), Some(cookie));
}

#[test]
fn wrong_map_type() {
    let mut ns = TestNs::new("maptype");
    let cookie = loaded(&mut ns);
    let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap().into());
    let _: &OwnedFd = &listener;
    let ports = ns.pin_dir().join("echo_ports");
    let out = ns.run("sockmap-update", &[&me(), &listener.as_raw_fd().to_string(), ports.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is a Hash map, not a socket map"), "{}", stderr(&out));
    // A path that is no map at all: the program pin.
    let prog = ns.pin_dir().join("steer_dispatch");
    let out = ns.run("sockmap-update", &[&me(), &listener.as_raw_fd().to_string(), prog.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("it is a BPF program, not a map"), "{}", stderr(&out));
    let status = ns.status();
    assert_eq!(status["socket"]["cookie"].as_u64(), Some(cookie));
    assert_eq!(status["ports"], serde_json::json!([7]));
}

#[test]
fn missing_pin_dir() {
    let ns = TestNs::new("nopindir");
    for args in
        [&["ports", "list"][..], &["ports", "add", "7"], &["attach"], &["status"], &["socket", "set", "--pid", "1"]]
    {
        let out = ns.steerctl(args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("no steer state at") && stderr(&out).contains("run `steerctl load` first"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let map = ns.pin_dir().join("echo_socket");
    let out = ns.run("sockmap-update", &["1", "3", map.to_str().unwrap()]);
    assert!(stderr(&out).contains("no socket map pinned at"), "{}", stderr(&out));
    assert!(ns.pins().is_empty());
}

#[test]
fn pin_dir_not_on_bpffs() {
    let ns = TestNs::new("notbpffs");
    let plain = tempdir("notbpffs");
    let dir = plain.join("steer");
    let out = ns.run("steerctl", &["--pin-dir", dir.to_str().unwrap(), "load"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not on a bpf filesystem; mount it with `mount -t bpf bpf"), "{}", stderr(&out));
    assert!(!dir.exists(), "load created {} on a non-bpffs", dir.display());
    std::fs::remove_dir_all(plain).unwrap();
}

#[test]
fn load_twice_is_refused_and_keeps_the_first() {
    let mut ns = TestNs::new("loadtwice");
    let cookie = loaded(&mut ns);
    let id = ns.status()["program"]["id"].as_u64();
    let out = ns.steerctl(&["load"]);
    assert!(stderr(&out).contains("already loaded"), "{}", stderr(&out));
    let out = ns.steerctl(&["attach"]);
    assert!(stderr(&out).contains("already attached"), "{}", stderr(&out));
    let status = ns.status();
    assert_eq!(status["program"]["id"].as_u64(), id);
    assert_eq!(status["socket"]["cookie"].as_u64(), Some(cookie));
    assert_eq!(ns.echo(7, "one").unwrap(), "one");
}

#[test]
fn missing_capabilities() {
    let mut ns = TestNs::new("nocaps");
    let cookie = loaded(&mut ns);
    // Drop to nobody: no capabilities at all.
    let as_nobody = |args: &[&str]| {
        ns.command("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(steer_tests::bin("steerctl"))
            .arg("--pin-dir")
            .arg(ns.pin_dir())
            .args(args)
            .output()
            .unwrap()
    };
    for args in [
        &["load"][..],
        &["ports", "add", "8"],
        &["ports", "list"],
        &["socket", "set", "--pid", "1", "--fd", "3"],
        &["attach"],
        &["detach"],
        &["status"],
        &["unload"],
    ] {
        let out = as_nobody(args);
        assert!(!out.status.success(), "{args:?} as nobody should fail");
        let err = stderr(&out);
        assert!(
            err.contains("missing capabilities: CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN are needed; run as root"),
            "{args:?}: {err}"
        );
    }
    let status = ns.status();
    assert_eq!(status["ports"], serde_json::json!([7]));
    assert_eq!(status["socket"]["cookie"].as_u64(), Some(cookie));
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("steer-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn bpffs_not_mounted_at_the_default_place() {
    // `ip netns exec` gives the command a fresh /sys without bpffs, the
    // state a new user meets before mounting it.
    let ns = TestNs::new("nobpffs");
    for args in [&["load"][..], &["status"], &["ports", "list"]] {
        let out = ns.run("steerctl", args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("is not on a bpf filesystem; mount it with `mount -t bpf bpf /sys/fs/bpf`"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn sockmap_key_out_of_range() {
    let mut ns = TestNs::new("sockkey");
    let cookie = loaded(&mut ns);
    let listener = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap());
    let map = ns.pin_dir().join("echo_socket");
    let out = ns.run("sockmap-update", &[&me(), &listener.as_raw_fd().to_string(), map.to_str().unwrap(), "5"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("key 5 is out of the socket map's range"), "{}", stderr(&out));
    assert_eq!(ns.status()["socket"]["cookie"].as_u64(), Some(cookie));
}

#[test]
fn concurrent_loads_leave_one_consistent_state() {
    let ns = TestNs::new("loadrace");
    let loads: Vec<_> = (0..6)
        .map(|_| {
            let mut cmd = ns.command(steer_tests::bin("steerctl"));
            cmd.arg("--pin-dir").arg(ns.pin_dir()).arg("load");
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    let outs: Vec<_> = loads.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(outs.iter().filter(|o| o.status.success()).count(), 1, "exactly one load wins");
    for o in outs.iter().filter(|o| !o.status.success()) {
        assert!(stderr(o).contains("already loaded"), "{}", stderr(o));
    }
    let status = ns.status();
    assert_eq!(status["program"]["name"], "steer_dispatch");
    ns.steerctl_ok(&["attach"]);
    ns.steerctl_ok(&["unload"]);
    assert!(ns.pins().is_empty(), "{:?}", ns.pins());
}
