//! `steerctl trace`: every outcome of real TCP and UDP connections over
//! IPv4 and IPv6 shows with its fields; filters select; several tracers run
//! at once; a killed tracer turns tracing off (read from the map); the
//! counts agree with `steerctl metrics`; lost decisions are counted and
//! shown; bad input changes nothing. Each wait is on a line the tracer
//! prints or its exit, never on a timer.

use std::{
    io::{BufRead, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::fd::{AsFd, AsRawFd},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
};

use nix::{
    sys::{
        signal::{Signal, kill},
        socket::{
            AddressFamily, MsgFlags, Shutdown, SockFlag, SockType, SockaddrStorage, bind, connect, getsockname, send,
            shutdown, socket,
        },
    },
    unistd::Pid,
};
use serde_json::Value;
use steer_tests::{EVENT_LIMIT, TestNs, bin, me, stderr, wait_exit};

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

fn loaded(name: &str) -> TestNs {
    let ns = TestNs::new(name);
    ns.steerctl_ok(&["load"]);
    ns.steerctl_ok(&["attach"]);
    ns
}

/// A running `steerctl --json trace ARGS`: its stdout lines as they come,
/// its stderr kept for messages.
struct Trace {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    /// Reads stderr until the tracer closes it.
    stderr_reader: std::thread::JoinHandle<()>,
}

impl Trace {
    /// Starts it and returns once it says it traces (its ready line on stderr).
    fn start(ns: &TestNs, args: &[&str]) -> Self {
        Self::start_with(ns, &["--json", "trace"], args)
    }

    fn start_with(ns: &TestNs, command: &[&str], args: &[&str]) -> Self {
        let mut child = ns
            .command(bin("steerctl"))
            .args(["--pin-dir", ns.pin_dir().to_str().unwrap()])
            .args(command)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting steerctl trace");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready) = mpsc::channel();
        let (log, err) = (stderr.clone(), child.stderr.take().unwrap());
        let stderr_reader = std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let is_ready = line.contains("tracing decisions in");
                log.lock().unwrap().push_str(&format!("{line}\n"));
                if is_ready {
                    let _ = ready_tx.send(());
                }
            }
        });
        let trace = Trace { child, lines, stderr, stderr_reader };
        if ready.recv_timeout(EVENT_LIMIT).is_err() {
            panic!("steerctl trace {args:?} did not say it traces: {}", trace.stderr());
        }
        trace
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The next line it prints.
    fn line(&self) -> String {
        self.lines
            .recv_timeout(EVENT_LIMIT)
            .unwrap_or_else(|e| panic!("no line from the tracer ({e}): {}", self.stderr()))
    }

    /// The next decision it prints (a lost notice first fails).
    fn decision(&self) -> Value {
        let v = json(&self.line());
        assert_eq!(v["type"], "decision", "{v}");
        v
    }

    /// SIGINT, then its remaining lines and its exit status.
    fn interrupt(self) -> (Vec<Value>, ExitStatus, String) {
        kill(self.pid(), Signal::SIGINT).unwrap();
        self.exited()
    }

    /// Once it exits by itself or was told to: its remaining lines, its
    /// exit status and all it wrote to stderr.
    fn exited(mut self) -> (Vec<Value>, ExitStatus, String) {
        let status = wait_exit(&mut self.child, EVENT_LIMIT);
        let rest: Vec<Value> = self.lines.iter().filter_map(|l| serde_json::from_str(&l).ok()).collect();
        self.stderr_reader.join().unwrap();
        let err = self.stderr.lock().unwrap().clone();
        (rest, status, err)
    }

    /// Its closing summary (JSON mode), after SIGINT.
    fn summary(self) -> Value {
        let (rest, status, err) = self.interrupt();
        assert!(status.success(), "trace exited {status}: {err}");
        let last = rest.last().cloned().unwrap_or_default();
        assert_eq!(last["type"], "summary", "{rest:?}");
        last["summary"].clone()
    }

    fn sigkill(mut self) {
        kill(self.pid(), Signal::SIGKILL).unwrap();
        wait_exit(&mut self.child, EVENT_LIMIT);
    }
}

/// `steer_config.trace`, the byte the program reads, straight from the map.
fn trace_flag(ns: &TestNs) -> u64 {
    let pin = ns.pin_dir().join("steer_config");
    let out = Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned", pin.to_str().unwrap(), "key", "0", "0", "0", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let byte = v["value"][2].as_str().unwrap_or_else(|| panic!("{v}"));
    u64::from_str_radix(byte.trim_start_matches("0x"), 16).unwrap()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

/// From `from` (port 0: any), a TCP connect or one UDP datagram to `to`,
/// inside the namespace. Returns the client's address and whether the
/// connect succeeded (UDP: the send). The UDP socket is connected: the
/// ICMP error a dropped datagram brings back is then matched to it at
/// once, where for an unconnected sender the kernel looks the sender's
/// socket up again, sk_lookup included (a decision of its own, traced).
fn client(ns: &TestNs, proto: Proto, from: IpAddr, to: SocketAddr) -> (SocketAddr, bool) {
    ns.enter(|| {
        let family = if to.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
        let kind = if proto == Proto::Tcp { SockType::Stream } else { SockType::Datagram };
        let fd = socket(family, kind, SockFlag::SOCK_CLOEXEC, None).unwrap();
        bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(from, 0))).unwrap();
        let local: SockaddrStorage = getsockname(fd.as_raw_fd()).unwrap();
        let local = match (local.as_sockaddr_in(), local.as_sockaddr_in6()) {
            (Some(v4), _) => SocketAddr::from(std::net::SocketAddrV4::from(*v4)),
            (_, Some(v6)) => SocketAddr::from(std::net::SocketAddrV6::from(*v6)),
            _ => panic!("no address"),
        };
        let to = SockaddrStorage::from(to);
        let ok = match proto {
            Proto::Tcp => connect(fd.as_raw_fd(), &to).is_ok(),
            Proto::Udp => {
                connect(fd.as_raw_fd(), &to).unwrap();
                send(fd.as_raw_fd(), b"x", MsgFlags::empty()).is_ok()
            }
        };
        (local, ok)
    })
}

/// The kernel refuses (ESOCKTNOSUPPORT) a TCP socket not in LISTEN in
/// bpf_sk_assign from sk_lookup: seen on 6.1 and later, not on 5.10.
fn refuses_closed_tcp() -> bool {
    steer_tests::probe::kernel_at_least(6, 1)
}

fn continue_without_tcp_refusal() {
    steer_tests::require_feature("the refusal of non-listening TCP sockets in bpf_sk_assign (6.1 here)", false);
}

fn lo(v6: bool) -> IpAddr {
    if v6 { IpAddr::V6(Ipv6Addr::LOCALHOST) } else { IpAddr::V4(Ipv4Addr::LOCALHOST) }
}

fn cookie_of(fd: impl AsFd) -> u64 {
    steer::kernel::socket::inspect(fd.as_fd()).unwrap().cookie
}

fn register(ns: &TestNs, label: &str, proto: Proto, addr: SocketAddr) {
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    ns.steerctl_ok(&["register-pid", label, &me(), proto.name(), &ip, &port]);
}

/// Checks what every decision has.
fn check(d: &Value, outcome: &str, proto: Proto, from: SocketAddr, to: SocketAddr) {
    assert_eq!(d["outcome"], outcome, "{d}");
    assert_eq!(d["protocol"], proto.name(), "{d}");
    assert_eq!(d["local"], to.to_string(), "{d}");
    assert_eq!(d["remote"], from.to_string(), "{d}");
    assert!(d["time"].as_str().is_some_and(|t| t.ends_with('Z')) && d["unix_ns"].as_u64().is_some(), "{d}");
    let drops = ["miss", "error", "seed-miss", "seed-error"].contains(&outcome);
    assert_eq!(d["dropped"], drops, "{d}");
}

fn check_binding(d: &Value, label: &str, proto: Proto, prefix: &str, port: u16) {
    assert_eq!(d["label"], label, "{d}");
    let want = serde_json::json!({"label": label, "protocol": proto.name(), "prefix": prefix, "port": port});
    assert_eq!(d["binding"], want, "{d}");
}

fn check_socket(d: &Value, cookie: u64, slot: Option<&str>) {
    assert_eq!(d["socket"]["cookie"].as_u64(), Some(cookie), "{d}");
    assert_eq!(d["socket"]["slot"].as_str(), slot, "{d}");
    let pid = std::process::id();
    assert!(d["socket"]["owners"].as_array().unwrap().iter().any(|o| o["pid"] == pid), "owner is not us: {d}");
}

#[test]
fn every_outcome_shows_with_its_fields_for_tcp_and_udp_over_ipv4_and_ipv6() {
    let ns = loaded("outcomes");
    // Label web: a socket of each family and protocol, of this process.
    let tcp = [false, true].map(|v6| ns.enter(|| TcpListener::bind(SocketAddr::new(lo(v6), 0)).unwrap()));
    let udp = [false, true].map(|v6| ns.enter(|| UdpSocket::bind(SocketAddr::new(lo(v6), 0)).unwrap()));
    // Label brk: sockets the kernel will refuse, a shut-down listener and
    // a connected UDP socket (both stay in their slot).
    let brk_tcp = [false, true].map(|v6| ns.enter(|| TcpListener::bind(SocketAddr::new(lo(v6), 0)).unwrap()));
    let brk_udp = [false, true].map(|v6| ns.enter(|| UdpSocket::bind(SocketAddr::new(lo(v6), 0)).unwrap()));
    for v6 in [0, 1] {
        register(&ns, "web", Proto::Tcp, tcp[v6].local_addr().unwrap());
        register(&ns, "web", Proto::Udp, udp[v6].local_addr().unwrap());
        register(&ns, "brk", Proto::Tcp, brk_tcp[v6].local_addr().unwrap());
        register(&ns, "brk", Proto::Udp, brk_udp[v6].local_addr().unwrap());
    }
    // The hosts each label is bound to, by family: web, gone (no socket), brk.
    let hosts = [["127.0.0.10", "127.0.0.11", "127.0.0.12"], ["::1", "::1", "::1"]];
    let ports = [[80u16, 53], [81, 54], [82, 55]];
    for (v6, hosts) in hosts.iter().enumerate() {
        for (l, label) in ["web", "gone", "brk"].iter().enumerate() {
            for (p, proto) in [Proto::Tcp, Proto::Udp].iter().enumerate() {
                let port = ports[l][p] + if v6 == 1 { 1000 } else { 0 };
                ns.steerctl_ok(&["bind", label, proto.name(), hosts[l], &port.to_string()]);
            }
        }
    }
    for v6 in [0, 1] {
        shutdown(brk_tcp[v6].as_raw_fd(), Shutdown::Both).unwrap();
        ns.enter(|| brk_udp[v6].connect(SocketAddr::new(lo(v6 == 1), 9)).unwrap());
    }
    // The seed: port 7, served by a dual-stack TCP socket.
    let seed = ns.enter(|| TcpListener::bind("[::]:0").unwrap());
    ns.steerctl_ok(&["ports", "add", "7"]);
    ns.steerctl_ok(&["socket", "set", "--pid", &me(), "--fd", &seed.as_raw_fd().to_string()]);

    let trace = Trace::start(&ns, &[]);
    for v6 in [false, true] {
        let fam = if v6 { "ipv6" } else { "ipv4" };
        let prefix = |host: &str| if v6 { format!("{host}/128") } else { format!("{host}/32") };
        let i = usize::from(v6);
        for (p, proto) in [Proto::Tcp, Proto::Udp].into_iter().enumerate() {
            let shift = if v6 { 1000 } else { 0 };
            let at = |l: usize| SocketAddr::new(hosts[i][l].parse().unwrap(), ports[l][p] + shift);
            let slot = format!("{fam} {}", proto.name());

            // Assigned, with the socket's owner.
            let (from, ok) = client(&ns, proto, lo(v6), at(0));
            assert!(ok, "{proto:?} to {}", at(0));
            let d = trace.decision();
            check(&d, "assigned", proto, from, at(0));
            check_binding(&d, "web", proto, &prefix(hosts[i][0]), at(0).port());
            let cookie = if proto == Proto::Tcp { cookie_of(&tcp[i]) } else { cookie_of(&udp[i]) };
            check_socket(&d, cookie, Some(&slot));
            assert!(d["refusal"].is_null(), "{d}");

            // A miss: label gone has no socket.
            let (from, ok) = client(&ns, proto, lo(v6), at(1));
            assert!(!ok || proto == Proto::Udp, "a miss connected");
            let d = trace.decision();
            check(&d, "miss", proto, from, at(1));
            check_binding(&d, "gone", proto, &prefix(hosts[i][1]), at(1).port());
            assert!(d["socket"].is_null() && d["refusal"].is_null(), "{d}");

            // The kernel's refusal, by errno. Before 6.1 (5.10 here) the
            // kernel assigns a TCP socket that no longer listens, whose SYNs
            // then go unanswered: there is no TCP refusal to show.
            if proto == Proto::Tcp && !refuses_closed_tcp() {
                continue_without_tcp_refusal();
            } else {
                let (from, ok) = client(&ns, proto, lo(v6), at(2));
                assert!(!ok || proto == Proto::Udp, "a refused socket connected");
                let d = trace.decision();
                check(&d, "error", proto, from, at(2));
                check_binding(&d, "brk", proto, &prefix(hosts[i][2]), at(2).port());
                let refused = if proto == Proto::Tcp { cookie_of(&brk_tcp[i]) } else { cookie_of(&brk_udp[i]) };
                assert_eq!(d["socket"]["cookie"].as_u64(), Some(refused), "{d}");
                assert_eq!(
                    d["refusal"],
                    serde_json::json!({"errno": 94, "name": "ESOCKTNOSUPPORT", "reason": "bad_socket"})
                );
            }

            // The seed port: TCP gets the seed socket; UDP is refused it (a TCP socket).
            let to = SocketAddr::new(lo(v6), 7);
            let (from, _) = client(&ns, proto, lo(v6), to);
            let d = trace.decision();
            assert!(d["label"].is_null() && d["binding"].is_null(), "{d}");
            if proto == Proto::Tcp {
                check(&d, "seed", proto, from, to);
                check_socket(&d, cookie_of(&seed), None);
            } else {
                check(&d, "seed-error", proto, from, to);
                assert_eq!(d["refusal"], serde_json::json!({"errno": 91, "name": "EPROTOTYPE", "reason": "protocol"}));
            }

            // No binding, no seed port: the kernel's normal lookup.
            let to = SocketAddr::new(lo(v6), 9);
            let (from, _) = client(&ns, proto, lo(v6), to);
            let d = trace.decision();
            check(&d, "normal", proto, from, to);
            assert!(d["label"].is_null() && d["binding"].is_null() && d["socket"].is_null(), "{d}");
        }
    }
    // No seed socket: a listed port is dropped.
    ns.steerctl_ok(&["socket", "clear"]);
    for v6 in [false, true] {
        let to = SocketAddr::new(lo(v6), 7);
        let (from, ok) = client(&ns, Proto::Tcp, lo(v6), to);
        assert!(!ok);
        let d = trace.decision();
        check(&d, "seed-miss", Proto::Tcp, from, to);
        assert!(d["socket"].is_null(), "{d}");
    }
    let summary = trace.summary();
    // 22 decisions, less the two TCP refusals a kernel before 6.1 cannot show.
    let decisions = if refuses_closed_tcp() { 22 } else { 20 };
    assert_eq!((summary["shown"].as_u64(), summary["sent"].as_u64()), (Some(decisions), Some(decisions)), "{summary}");
    assert_eq!((summary["lost"].as_u64(), summary["ended"].as_str()), (Some(0), Some("interrupted")), "{summary}");
}

/// Web (a socket on 127.0.0.1, bound to 127.0.0.0/8 port 80) and gone
/// (bound to 127.0.0.6 port 81, no socket).
fn web_and_gone(ns: &TestNs) -> TcpListener {
    let web = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap());
    register(ns, "web", Proto::Tcp, web.local_addr().unwrap());
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    ns.steerctl_ok(&["bind", "gone", "tcp", "127.0.0.6", "81"]);
    ns.steerctl_ok(&["bind", "gone", "udp", "127.0.0.6", "53"]);
    web
}

fn tcp_to(ns: &TestNs, to: &str) -> SocketAddr {
    client(ns, Proto::Tcp, lo(false), to.parse().unwrap()).0
}

#[test]
fn filters_select_what_they_name_and_nothing_else() {
    let ns = loaded("filters");
    let _web = web_and_gone(&ns);
    let by_label = Trace::start(&ns, &["--label", "web", "--outcome", "miss,error"]);
    let by_words = Trace::start(&ns, &["udp", "and", "dst", "127.0.0.0/8", "port", "53"]);
    let by_remote = Trace::start(&ns, &["--remote", "127.0.0.77", "--protocol", "tcp"]);
    // Each one selects some of these, in this order.
    tcp_to(&ns, "127.0.0.2:80");
    tcp_to(&ns, "127.0.0.6:81");
    let (udp_gone, _) = client(&ns, Proto::Udp, lo(false), "127.0.0.6:53".parse().unwrap());
    client(&ns, Proto::Tcp, lo(false), "127.0.0.1:53".parse().unwrap());
    client(&ns, Proto::Udp, lo(false), "127.0.0.1:54".parse().unwrap());
    let (from_77, _) = client(&ns, Proto::Tcp, "127.0.0.77".parse().unwrap(), "127.0.0.1:9".parse().unwrap());
    ns.steerctl_ok(&["unregister", "web"]);
    let web_miss = tcp_to(&ns, "127.0.0.3:80");
    let (udp_53, _) = client(&ns, Proto::Udp, lo(false), "127.0.0.1:53".parse().unwrap());
    client(&ns, Proto::Udp, "127.0.0.77".parse().unwrap(), "127.0.0.1:9".parse().unwrap());
    let (from_77_last, _) = client(&ns, Proto::Tcp, "127.0.0.77".parse().unwrap(), "127.0.0.1:10".parse().unwrap());
    // Each saw only what it selects, in order, and the filter is the kernel's:
    // its slot counted only those.
    let remote = |t: &Trace| t.decision()["remote"].as_str().unwrap().to_string();
    assert_eq!(remote(&by_label), web_miss.to_string());
    assert_eq!(remote(&by_words), udp_gone.to_string());
    assert_eq!(remote(&by_words), udp_53.to_string());
    assert_eq!(remote(&by_remote), from_77.to_string());
    assert_eq!(remote(&by_remote), from_77_last.to_string());
    for (trace, n) in [(by_label, 1), (by_words, 2), (by_remote, 2)] {
        let summary = trace.summary();
        assert_eq!(
            (summary["shown"].as_u64(), summary["matched"].as_u64(), summary["sent"].as_u64()),
            (Some(n), Some(n), Some(n)),
            "{summary}"
        );
    }
}

#[test]
fn two_tracers_at_once_and_a_killed_tracer_turns_tracing_off() {
    let ns = loaded("twotracers");
    let _web = web_and_gone(&ns);
    assert_eq!(trace_flag(&ns), 0);
    let first = Trace::start(&ns, &[]);
    let second = Trace::start(&ns, &[]);
    assert_eq!(trace_flag(&ns), 1);
    let status = ns.status();
    assert_eq!(status["tracers"].as_array().unwrap().len(), 2, "{status}");
    for to in ["127.0.0.2:80", "127.0.0.6:81", "127.0.0.1:9"] {
        let from = tcp_to(&ns, to).to_string();
        assert_eq!(first.decision()["remote"], from.as_str());
        assert_eq!(second.decision()["remote"], from.as_str());
    }
    // SIGKILL runs no cleanup: its socket leaves trace_tracers with it, and
    // the other tracer goes on; the flag stays on for it.
    let first_pid = first.child.id();
    first.sigkill();
    let from = tcp_to(&ns, "127.0.0.2:80");
    assert_eq!(second.decision()["remote"], from.to_string());
    assert_eq!(trace_flag(&ns), 1);
    let tracers = ns.status()["tracers"].clone();
    let dead = tracers.as_array().unwrap().iter().find(|t| t["pid"] == first_pid).unwrap().clone();
    assert_eq!(dead["exited"], true, "{tracers}");
    // The last one killed too: no tracer is left, and the next lookup (any,
    // steered or not) turns tracing off.
    second.sigkill();
    assert_eq!(trace_flag(&ns), 1, "nothing ran since the kill");
    assert!(ns.status()["tracers"].as_array().unwrap().iter().all(|t| t["exited"] == true));
    tcp_to(&ns, "127.0.0.1:9");
    assert_eq!(trace_flag(&ns), 0, "the lookup after the last tracer died left tracing on");
    // A new tracer empties what the killed ones left; stopping it cleanly
    // turns the flag off at once, no lookup needed.
    let third = Trace::start(&ns, &[]);
    let tracers = ns.status()["tracers"].clone();
    assert_eq!(tracers.as_array().unwrap().len(), 1, "{tracers}");
    assert_eq!(
        (tracers[0]["pid"].as_u64(), tracers[0]["exited"].as_bool()),
        (Some(third.child.id().into()), Some(false))
    );
    assert_eq!(trace_flag(&ns), 1);
    third.summary();
    assert_eq!(trace_flag(&ns), 0);
    assert_eq!(ns.status()["tracers"], serde_json::json!([]));
}

fn metrics_of(ns: &TestNs, label: &str) -> (u64, u64, u64) {
    let m = json(&ns.steerctl_ok(&["--json", "metrics"]));
    let d = m["destinations"].as_array().unwrap().iter().find(|d| d["label"] == label && d["protocol"] == "tcp");
    d.map_or((0, 0, 0), |d| {
        (d["lookups"].as_u64().unwrap(), d["misses"].as_u64().unwrap(), d["errors"].as_u64().unwrap())
    })
}

#[test]
fn the_counts_agree_with_metrics_and_lost_decisions_are_counted_and_shown() {
    let ns = loaded("tracecounts");
    let web = web_and_gone(&ns);
    let brk = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap());
    register(&ns, "brk", Proto::Tcp, brk.local_addr().unwrap());
    ns.steerctl_ok(&["bind", "brk", "tcp", "127.0.0.12", "80"]);
    shutdown(brk.as_raw_fd(), Shutdown::Both).unwrap();
    let before = [metrics_of(&ns, "web"), metrics_of(&ns, "gone"), metrics_of(&ns, "brk")];
    let trace = Trace::start(&ns, &[]);
    // Before 6.1 the kernel assigns brk's closed listener (see refuses_closed_tcp).
    let brk_tries = if refuses_closed_tcp() { 2 } else { 0 };
    let plan = [("127.0.0.2:80", 5), ("127.0.0.6:81", 3), ("127.0.0.12:80", brk_tries), ("127.0.0.1:9", 4)];
    let mut seen = std::collections::BTreeMap::new();
    for (to, n) in plan {
        for _ in 0..n {
            tcp_to(&ns, to);
            let d = trace.decision();
            *seen
                .entry((d["label"].as_str().unwrap_or("-").to_string(), d["outcome"].as_str().unwrap().to_string()))
                .or_insert(0u64) += 1;
        }
    }
    let summary = trace.summary();
    assert_eq!((summary["sent"].as_u64(), summary["lost"].as_u64()), (Some(12 + brk_tries), Some(0)), "{summary}");
    let after = [metrics_of(&ns, "web"), metrics_of(&ns, "gone"), metrics_of(&ns, "brk")];
    let delta = |i: usize| (after[i].0 - before[i].0, after[i].1 - before[i].1, after[i].2 - before[i].2);
    let get = |label: &str, outcome: &str| seen.get(&(label.to_string(), outcome.to_string())).copied().unwrap_or(0);
    assert_eq!(delta(0), (get("web", "assigned"), 0, 0), "{seen:?}");
    assert_eq!(delta(1), (get("gone", "miss"), get("gone", "miss"), 0), "{seen:?}");
    assert_eq!(delta(2), (get("brk", "error"), 0, get("brk", "error")), "{seen:?}");
    assert_eq!(
        (get("web", "assigned"), get("gone", "miss"), get("brk", "error"), get("-", "normal")),
        (5, 3, brk_tries, 4)
    );
    let m = json(&ns.steerctl_ok(&["--json", "metrics"]));
    assert_eq!(m["trace"], serde_json::json!({"tracers": 0, "events": 12 + brk_tries, "lost": 0}), "{m}");

    // A tracer that does not read (stopped): its ring fills, and what did
    // not fit is counted, shown when it reads again, and in metrics.
    let stalled = Trace::start(&ns, &["udp"]);
    kill(stalled.pid(), Signal::SIGSTOP).unwrap();
    let datagrams = steer::common::TRACE_RING_BYTES as usize / 64 + 500;
    ns.enter(|| {
        // To a bound socket, which never answers with an ICMP error (and
        // so runs no lookup of the sender's socket, see `client`).
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        for _ in 0..datagrams {
            s.send_to(b"x", sink.local_addr().unwrap()).unwrap();
        }
    });
    kill(stalled.pid(), Signal::SIGCONT).unwrap();
    let mut lost_line = None;
    for _ in 0..datagrams + 2 {
        let v = json(&stalled.line());
        if v["type"] == "lost" {
            lost_line = Some(v);
            break;
        }
    }
    let lost_line = lost_line.expect("no lost line");
    let lost = lost_line["total"].as_u64().unwrap();
    assert!(lost > 0 && lost_line["count"].as_u64() == Some(lost), "{lost_line}");
    let summary = stalled.summary();
    assert_eq!(summary["lost"].as_u64(), Some(lost), "{summary}");
    assert_eq!(summary["sent"].as_u64().unwrap() + lost, datagrams as u64, "{summary}");
    let m = json(&ns.steerctl_ok(&["--json", "metrics"]));
    assert_eq!(m["trace"]["lost"].as_u64(), Some(lost), "{m}");
    let text = ns.steerctl_ok(&["metrics"]);
    assert!(text.contains(&format!("{lost} lost")), "{text}");
    drop(web);
}

#[test]
fn text_lines_read_like_tcpdump_and_count_and_duration_end_a_trace() {
    let ns = loaded("tracetext");
    let web = web_and_gone(&ns);
    let trace = Trace::start_with(&ns, &["trace", "--count", "2"], &[]);
    let from = tcp_to(&ns, "127.0.0.2:80");
    let line = trace.line();
    let cookie = cookie_of(&web);
    let want =
        format!("tcp {from} > 127.0.0.2:80 binding web tcp 127.0.0.0/8 80: assigned ipv4 tcp socket cookie {cookie} (");
    assert!(line.contains(&want) && line.contains(&format!("(pid {}, fd", std::process::id())), "{line}\nwant {want}");
    let from = tcp_to(&ns, "127.0.0.6:81");
    let line = trace.line();
    assert!(
        line.contains(&format!("tcp {from} > 127.0.0.6:81 binding gone tcp 127.0.0.6/32 81: miss, dropped (refused)")),
        "{line}"
    );
    // --count 2: it ends by itself, with its summary on stderr.
    let (_, status, err) = trace.exited();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("steerctl: 2 decisions shown (count reached); 2 selected by the filter"), "{err}");
    assert_eq!(trace_flag(&ns), 0);

    let out = ns.steerctl(&["trace", "--duration", "200ms"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("0 decisions shown (duration over)"), "{}", stderr(&out));
    assert_eq!(trace_flag(&ns), 0);
}

#[test]
fn bad_input_is_refused_with_a_reason_and_changes_nothing() {
    let ns = TestNs::new("tracebad");
    let out = ns.steerctl(&["trace"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no steer state at") && stderr(&out).contains("steerctl load"), "{}", stderr(&out));
    ns.steerctl_ok(&["load"]);
    let _web = web_and_gone(&ns);
    for (args, message) in [
        (&["port", "http"][..], "\"http\" is not a port"),
        (&["tcp", "port"], "`port` needs a port"),
        (&["sctp"], "\"sctp\" is not a filter word"),
        (&["--outcome", "lost"], "unknown outcome \"lost\""),
        (&["--local", "10.0.0.0/33"], "longer than 32 bits"),
        (&["--sample", "1/0"], "--sample takes 1/N"),
        (&["--duration", "5d"], "--duration takes"),
        (&["--count", "0"], "--count takes"),
        (&["--label", "nope"], "no label nope in"),
        (&["label", "a,b,c,d,e"], "at most 4 labels"),
    ] {
        let out = ns.steerctl(&[&["trace"][..], args].concat());
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr(&out).contains(message), "{args:?}: {}", stderr(&out));
    }
    let out = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin("steerctl"))
        .args(["--pin-dir", ns.pin_dir().to_str().unwrap(), "trace"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("missing capabilities"), "{}", stderr(&out));
    assert_eq!(trace_flag(&ns), 0);
    assert_eq!(ns.status()["tracers"], serde_json::json!([]));
    // Unattached: it traces (test runs, such as explain's, do run the
    // program) and says connections do not.
    let trace = Trace::start(&ns, &[]);
    assert!(trace.stderr().contains("not attached"), "{}", trace.stderr());
    ns.steerctl_ok(&["explain", "tcp", "127.0.0.2", "80"]);
    assert_eq!(trace.decision()["outcome"], "assigned");
    trace.summary();
}
