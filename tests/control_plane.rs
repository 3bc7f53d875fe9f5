//! The labelled control plane on a real kernel: bindings by protocol,
//! prefix and port, sockets by label, UDP and IPv6, atomic reloads,
//! concurrency, upgrade and metrics.

use std::{
    net::SocketAddr,
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use steer_tests::{Count, TestNs, bin, me, stderr, strace, udp_echo};

fn loaded() -> TestNs {
    let ns = TestNs::new(std::thread::current().name().unwrap_or("cp"));
    ns.steerctl_ok(&["load"]);
    ns.steerctl_ok(&["attach"]);
    ns
}

fn register(ns: &TestNs, label: &str, proto: &str, addr: SocketAddr) {
    ns.steerctl_ok(&["register-pid", label, &me(), proto, &addr.ip().to_string(), &addr.port().to_string()]);
}

fn who(ns: &TestNs, addr: &str) -> String {
    let addr: SocketAddr = addr.parse().unwrap();
    ns.first_line(addr).unwrap_or_else(|e| format!("error: {e}"))
}

#[test]
fn overlapping_ipv4_bindings_take_longest_prefix_then_exact_port() {
    let ns = loaded();
    ns.overlapping_bindings(false);
    // Same /8 prefix: the exact port beats the wildcard.
    assert_eq!(who(&ns, "127.1.0.1:80"), "b");
    assert_eq!(who(&ns, "127.1.0.1:81"), "a");
    // A longer prefix beats an exact port on a shorter one.
    assert_eq!(who(&ns, "127.0.0.9:80"), "c");
    assert_eq!(who(&ns, "127.0.0.9:443"), "c");
    assert_eq!(who(&ns, "127.0.0.5:80"), "d");
    assert_eq!(who(&ns, "127.0.0.5:81"), "c");
}

#[test]
fn overlapping_ipv6_bindings_take_longest_prefix_then_exact_port() {
    let ns = loaded();
    ns.add_local_route("2001:db8::/32");
    ns.overlapping_bindings(true);
    assert_eq!(who(&ns, "[2001:db8:1::1]:80"), "b");
    assert_eq!(who(&ns, "[2001:db8:1::1]:81"), "a");
    assert_eq!(who(&ns, "[2001:db8::9]:80"), "c");
    assert_eq!(who(&ns, "[2001:db8::5]:80"), "d");
    assert_eq!(who(&ns, "[2001:db8::5]:22"), "c");
    // IPv4 traffic does not match IPv6 bindings.
    let err = ns.first_line("127.0.0.5:80".parse().unwrap()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

#[test]
fn udp_echo_over_ipv4_and_ipv6() {
    let ns = loaded();
    ns.add_local_route("2001:db8::/64");
    let v4 = udp_echo::spawn(&ns, "127.0.0.1:5353");
    let v6 = udp_echo::spawn(&ns, "[::1]:5353");
    register(&ns, "dns", "udp", v4);
    register(&ns, "dns", "udp", v6);
    ns.steerctl_ok(&["bind", "dns", "udp", "127.0.0.0/8", "5353"]);
    ns.steerctl_ok(&["bind", "dns", "udp", "2001:db8::/64", "5353"]);
    // The client's socket is connected, so a reply from any other address
    // than the one it asked would never reach it.
    for to in ["127.0.0.1:5353", "127.0.0.44:5353", "[2001:db8::44]:5353", "[2001:db8::1]:5353"] {
        let to: SocketAddr = to.parse().unwrap();
        assert_eq!(udp_echo::request(&ns, to, &format!("q {to}")).unwrap(), format!("q {to}"));
    }
    // TCP on the same address and port is not bound: normal lookup takes
    // it to the plain TCP listener there. (Bound, with no TCP socket for
    // the label, it would be dropped: an error too, so is_err() could not
    // tell the two apart.)
    let plain = ns.named_tcp_server("127.0.0.44:5353", "plain tcp");
    assert_eq!(ns.first_line(plain).unwrap(), "plain tcp");
    let list: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "list"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    assert!(list.as_array().unwrap().iter().all(|r| r["protocol"] == "udp" && r["label"] == "dns"));
}

#[test]
fn label_protocol_and_family_must_match_the_socket() {
    let ns = loaded();
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    udp_echo::spawn(&ns, "127.0.0.1:8080");
    let out = ns.steerctl(&["register-pid", "web", &me(), "udp", "127.0.0.1", "8080"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("label web is bound to tcp ipv4 but this is a udp ipv4 socket"), "{}", stderr(&out));
    let v6 = ns.enter(v6only_listener);
    let out = ns.steerctl(&["register-pid", "web", &me(), "tcp", "::1", &v6.local_addr().unwrap().port().to_string()]);
    assert!(stderr(&out).contains("but this is a tcp ipv6 socket"), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "list"])).unwrap();
    assert_eq!(list, serde_json::json!([]));
}

/// An IPv6-only TCP listener on [::1] (cannot serve IPv4 bindings).
fn v6only_listener() -> std::net::TcpListener {
    use nix::sys::socket::*;
    let s = socket(AddressFamily::Inet6, SockType::Stream, SockFlag::empty(), None).unwrap();
    setsockopt(&s, sockopt::Ipv6V6Only, &true).unwrap();
    bind(s.as_raw_fd(), &SockaddrIn6::from(std::net::SocketAddrV6::new(std::net::Ipv6Addr::LOCALHOST, 0, 0, 0)))
        .unwrap();
    listen(&s, Backlog::new(16).unwrap()).unwrap();
    std::net::TcpListener::from(s)
}

#[test]
fn register_takes_systemd_activated_sockets() {
    let ns = loaded();
    let listener = ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap());
    let port = listener.local_addr().unwrap().port();
    let spawn_register = |listen_pid: &str| {
        let fd = listener.as_raw_fd();
        let mut cmd = ns.command("sh");
        cmd.arg("-c")
            .arg(format!("LISTEN_PID={listen_pid} exec \"$0\" \"$@\""))
            .arg(bin("steerctl"))
            .args(["--pin-dir", ns.pin_dir().to_str().unwrap(), "register", "svc"])
            .env("LISTEN_FDS", "1");
        // systemd passes sockets from fd 3 on.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || if libc::dup2(fd, 3) < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) });
        }
        cmd.output().unwrap()
    };
    let out = spawn_register("1");
    assert!(stderr(&out).contains("LISTEN_PID is 1, not this process"), "{}", stderr(&out));
    let out = spawn_register("$$");
    assert!(out.status.success(), "{}", stderr(&out));
    let list: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "list"])).unwrap();
    assert_eq!(list[0]["label"], "svc");
    assert_eq!(list[0]["address"], format!("127.0.0.1:{port}"));
    ns.steerctl_ok(&["bind", "svc", "tcp", "127.0.0.77", "0"]);
    let accepted = std::thread::spawn(move || listener.accept().map(|(_, peer)| peer));
    ns.enter(|| std::net::TcpStream::connect("127.0.0.77:9999").unwrap());
    accepted.join().unwrap().unwrap();
}

#[test]
fn load_bindings_replaces_atomically_and_a_bad_file_changes_nothing() {
    let ns = loaded();
    let dir = std::env::temp_dir().join(format!("steer-lb-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    ns.steerctl_ok(&["bind", "old", "tcp", "10.0.0.0/8", "22"]);
    let good = serde_json::json!({"bindings": [
        {"label": "web", "protocol": "tcp", "prefix": "127.0.0.0/8", "port": 80},
        {"label": "web", "protocol": "tcp", "prefix": "::1/128", "port": 443},
        {"label": "dns", "protocol": "udp", "prefix": "127.0.0.53/32", "port": 0},
    ]});
    let file = dir.join("good.json");
    std::fs::write(&file, good.to_string()).unwrap();
    ns.steerctl_ok(&["load-bindings", file.to_str().unwrap()]);
    let first = ns.steerctl_ok(&["--json", "bindings"]);
    let mut expected = good["bindings"].as_array().unwrap().clone();
    expected.sort_by_key(|b| (b["label"].to_string(), b["protocol"].to_string(), b["prefix"].to_string()));
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&first).unwrap()["bindings"],
        serde_json::Value::Array(expected)
    );
    // Idempotent, and `bindings --json` reads back in.
    std::fs::write(&file, &first).unwrap();
    ns.steerctl_ok(&["load-bindings", file.to_str().unwrap()]);
    assert_eq!(ns.steerctl_ok(&["--json", "bindings"]), first);

    for (name, text, message) in [
        ("syntax.json", "{\"bindings\": [", "is not a valid bindings file"),
        (
            "prefix.json",
            r#"{"bindings":[{"label":"x","protocol":"tcp","prefix":"300.0.0.1","port":1}]}"#,
            "not an IPv4 or IPv6 address",
        ),
        ("proto.json", r#"{"bindings":[{"label":"x","protocol":"sctp","prefix":"::1","port":1}]}"#, "unknown variant"),
        ("label.json", r#"{"bindings":[{"label":"bad label","protocol":"tcp","prefix":"::1","port":1}]}"#, "bad label"),
        (
            "clash.json",
            r#"{"bindings":[{"label":"x","protocol":"tcp","prefix":"::1","port":1},{"label":"y","protocol":"tcp","prefix":"::1","port":1}]}"#,
            "is bound to both x and y",
        ),
    ] {
        let bad = dir.join(name);
        std::fs::write(&bad, text).unwrap();
        let out = ns.steerctl(&["load-bindings", bad.to_str().unwrap()]);
        assert!(!out.status.success(), "{name} should be refused");
        assert!(stderr(&out).contains(message), "{name}: {}", stderr(&out));
        assert_eq!(ns.steerctl_ok(&["--json", "bindings"]), first, "{name} changed the bindings");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn concurrent_binds_all_land() {
    let ns = loaded();
    let pin_dir = ns.pin_dir();
    let handles: Vec<_> = (1..=20)
        .map(|i| {
            let mut cmd = ns.command(bin("steerctl"));
            cmd.args([
                "--pin-dir",
                pin_dir.to_str().unwrap(),
                // Twenty writers queue on the lock; under emulation (the VM
                // matrix) each bind takes seconds, so the default 30 s is short.
                "--wait",
                "600",
                "bind",
                &format!("l{i}"),
                "tcp",
                &format!("127.0.0.{i}"),
                "80",
            ]);
            std::thread::spawn(move || cmd.output().unwrap())
        })
        .collect();
    for h in handles {
        let out = h.join().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
    }
    let bindings: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "bindings"])).unwrap();
    let labels: std::collections::BTreeSet<String> =
        bindings["bindings"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap().to_string()).collect();
    assert_eq!(labels.len(), 20, "{bindings}");
    // Each label got its own id: every socket answers for its own address.
    for i in [1, 7, 20] {
        let addr = ns.named_tcp_server("127.0.0.1:0", &format!("l{i}"));
        register(&ns, &format!("l{i}"), "tcp", addr);
    }
    for i in [1, 7, 20] {
        assert_eq!(who(&ns, &format!("127.0.0.{i}:80")), format!("l{i}"));
    }
}

#[test]
fn upgrade_keeps_serving_without_refusing_a_connection() {
    let ns = Arc::new(loaded());
    let addr = ns.named_tcp_server("127.0.0.1:0", "web");
    register(&ns, "web", "tcp", addr);
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    let before = ns.status();
    let done = Arc::new(AtomicBool::new(false));
    // The client counts its connections; this thread waits on the count.
    let (ok, failed) = (Arc::new(Count::default()), Arc::new(Count::default()));
    let client = {
        let (ns, done, ok, failed) = (ns.clone(), done.clone(), ok.clone(), failed.clone());
        std::thread::spawn(move || {
            ns.enter(|| {
                // Bounded: stops after the upgrades or 200,000 connections.
                for _ in 0..200_000 {
                    if done.load(Ordering::SeqCst) {
                        break;
                    }
                    match std::net::TcpStream::connect("127.0.0.80:80") {
                        Ok(_) => ok.add(),
                        Err(_) => failed.add(),
                    };
                }
            })
        })
    };
    ok.wait_for(50, "connections before the upgrades");
    for _ in 0..3 {
        ns.steerctl_ok(&["upgrade"]);
    }
    let during = ok.get();
    ok.wait_for(during + 50, "connections after the upgrades");
    done.store(true, Ordering::SeqCst);
    client.join().unwrap();
    assert_eq!(failed.get(), 0, "connections refused during upgrade ({} ok)", ok.get());
    let after = ns.status();
    assert_ne!(after["program"]["id"], before["program"]["id"]);
    assert_eq!(after["link"]["program_id"], after["program"]["id"]);
    assert_eq!(after["link"]["id"], before["link"]["id"]);
    assert_eq!(who(&ns, "127.0.0.80:80"), "web");
}

#[test]
fn metrics_count_lookups_misses_and_serve_prometheus() {
    let mut ns = loaded();
    let addr = ns.named_tcp_server("127.0.0.1:0", "web");
    register(&ns, "web", "tcp", addr);
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    for _ in 0..5 {
        assert_eq!(who(&ns, "127.0.0.2:80"), "web");
    }
    ns.steerctl_ok(&["unregister", "web"]);
    // The label stays while bound; with no socket its connections are dropped.
    assert!(ns.first_line("127.0.0.2:80".parse().unwrap()).is_err());
    let metrics: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "metrics"])).unwrap();
    let reasons = serde_json::json!({"already_assigned": 0, "bad_socket": 0, "other": 0, "protocol": 0});
    let expected = serde_json::json!([{"label": "web", "domain": "ipv4", "protocol": "tcp", "lookups": 6, "misses": 1, "errors": 0, "errors_by_reason": reasons}]);
    assert_eq!(metrics["destinations"], expected);
    // The gauges: one label, one binding, no socket left; the seed list unused.
    assert_eq!(metrics["labels"], 1);
    assert_eq!(
        metrics["bindings"],
        serde_json::json!([{"label": "web", "domain": "ipv4", "protocol": "tcp", "value": 1}])
    );
    assert_eq!(metrics["registered_sockets"], serde_json::json!([]));
    assert_eq!(metrics["seed"], serde_json::json!({"ports": 0, "lookups": 0, "misses": 0, "errors": 0}));
    assert!(metrics["build"]["program_tag"].as_str().is_some_and(|t| t.len() == 16), "{metrics}");

    let mut serve = ns.command(bin("steerctl"));
    serve.args(["--pin-dir", ns.pin_dir().to_str().unwrap(), "metrics", "--serve", "127.0.0.1:9100"]);
    // It says so once it listens.
    ns.spawn_ready(serve, "serving metrics on http://127.0.0.1:9100/metrics");
    let body = ns
        .enter(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect("127.0.0.1:9100")?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: steer\r\nConnection: close\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })
        .expect("scraping the metrics endpoint");
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("# TYPE steer_lookups_total counter"), "{body}");
    assert!(body.contains("steer_lookups_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 6"), "{body}");
    assert!(body.contains("steer_misses_total{label=\"web\",domain=\"ipv4\",protocol=\"tcp\"} 1"), "{body}");
}

#[test]
fn netns_and_bpffs_flags_drive_a_namespace_from_outside() {
    let ns = TestNs::new("flags");
    let netns = format!("/run/netns/{}", ns.name);
    let bpffs = ns.bpffs.to_str().unwrap().to_string();
    // Run from the test's own namespace, not through `ip netns exec`.
    let steerctl = |args: &[&str]| {
        let out =
            Command::new(bin("steerctl")).args(["--netns", &netns, "--bpffs", &bpffs]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    steerctl(&["load"]);
    steerctl(&["attach"]);
    let state_dir = ns.bpffs.join("steer").join(ns.inode().to_string());
    assert!(state_dir.join("steer_dispatch_link").exists(), "state not in {}", state_dir.display());
    let addr = ns.named_tcp_server("127.0.0.1:0", "outside");
    steerctl(&["bind", "outside", "tcp", "127.0.0.0/8", "8443"]);
    steerctl(&["register-pid", "outside", &me(), "tcp", "127.0.0.1", &addr.port().to_string()]);
    assert_eq!(who(&ns, "127.0.0.3:8443"), "outside");
    let status: serde_json::Value = serde_json::from_str(&steerctl(&["--json", "status"])).unwrap();
    assert_eq!(status["link"]["netns_inode"].as_u64(), Some(ns.inode()));
    steerctl(&["unload"]);
    // BPFFS/steer stays, root's and 0700, so nobody else can claim the name.
    assert_eq!(ns.pins(), ["steer"]);
    let out = Command::new(bin("steerctl")).args(["--netns", "/nonexistent", "status"]).output().unwrap();
    assert!(stderr(&out).contains("opening network namespace /nonexistent"), "{}", stderr(&out));
}

#[test]
fn dual_stack_ipv6_socket_serves_ipv4_bindings() {
    let ns = loaded();
    // [::]:port without IPV6_V6ONLY takes IPv4 too.
    let addr = ns.named_tcp_server("[::]:0", "dual");
    ns.steerctl_ok(&["register-pid", "dual", &me(), "tcp", "::", &addr.port().to_string()]);
    ns.steerctl_ok(&["bind", "dual", "tcp", "127.0.0.0/8", "8080"]);
    assert_eq!(who(&ns, "127.0.0.8:8080"), "dual");
    let list: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "list"])).unwrap();
    assert_eq!(list[0]["family"], "ipv6");
}

#[test]
fn load_and_attach_if_needed_leave_existing_state_alone() {
    let ns = TestNs::new("ifneeded");
    ns.steerctl_ok(&["load", "--if-needed"]);
    ns.steerctl_ok(&["attach", "--if-needed"]);
    let before = ns.status();
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    assert!(ns.steerctl_ok(&["load", "--if-needed"]).starts_with("already loaded"));
    assert!(ns.steerctl_ok(&["attach", "--if-needed"]).starts_with("already attached"));
    let after = ns.status();
    assert_eq!(after["program"]["id"], before["program"]["id"]);
    assert_eq!(after["link"]["id"], before["link"]["id"]);
    assert_eq!(ns.steerctl_ok(&["--json", "bindings"]).matches("\"web\"").count(), 1);
    // Without the flag, both still refuse.
    assert!(!ns.steerctl(&["load"]).status.success());
    assert!(!ns.steerctl(&["attach"]).status.success());
    // Leftover maps without a program are not "loaded".
    ns.steerctl_ok(&["detach"]);
    std::fs::remove_file(ns.pin_dir().join("steer_dispatch")).unwrap();
    let out = ns.steerctl(&["load", "--if-needed"]);
    assert!(!out.status.success(), "load --if-needed over leftover maps succeeded");
    assert!(stderr(&out).contains("already loaded"), "{}", stderr(&out));
}

/// Map writes (`bpf()` updates and deletes) a `steerctl bind` makes, per strace.
fn map_writes_of_bind(ns: &TestNs, args: &[&str]) -> Vec<String> {
    let bind: Vec<&str> = ["bind"].into_iter().chain(args.iter().copied()).collect();
    let out = strace::steerctl(ns, &["-f", "-qq", "-e", "trace=bpf", "-o", "/dev/stderr"], &bind);
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stderr(&out)
        .lines()
        .filter(|l| {
            ["BPF_MAP_UPDATE_ELEM", "BPF_MAP_UPDATE_BATCH", "BPF_MAP_DELETE_ELEM"].iter().any(|c| l.contains(c))
        })
        .map(str::to_string)
        .collect()
}

/// A bindings file of (label, prefix) pairs, port 0, in the test's scratch directory.
fn bindings_file<'a>(ns: &TestNs, name: &str, entries: impl IntoIterator<Item = (&'a str, String)>) -> String {
    let bindings: Vec<serde_json::Value> = entries
        .into_iter()
        .map(|(label, prefix)| serde_json::json!({"label": label, "protocol": "tcp", "prefix": prefix, "port": 0}))
        .collect();
    let path = ns.bpffs.parent().unwrap().join(name);
    std::fs::write(&path, serde_json::json!({ "bindings": bindings }).to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// A bind killed just before any one of its map writes (strace delivers
/// SIGKILL on entry to that bpf call), and after the last, then run
/// again: it always ends recorded, published and serving.
#[test]
fn a_bind_killed_before_any_map_write_is_finished_by_running_it_again() {
    let ns = loaded();
    let addr = ns.named_tcp_server("127.0.0.1:0", "b");
    register(&ns, "b", "tcp", addr);
    ns.add_local_route("192.0.2.0/24");
    // Each run starts from the same published set, so that it makes the
    // same calls as the traced one (a write in place depends on the chunks
    // and arena it finds).
    let only_a = bindings_file(&ns, "only-a.json", [("a", "10.0.0.0/8".to_string())]);
    let with_b =
        bindings_file(&ns, "with-b.json", [("a", "10.0.0.0/8".to_string()), ("b", "192.0.2.0/24".to_string())]);
    let bind = ["bind", "b", "tcp", "192.0.2.0/24", "0"];
    let unbind = ["unbind", "b", "tcp", "192.0.2.0/24", "0"];
    ns.steerctl_ok(&["load-bindings", &only_a]);
    let calls = strace::calls(&ns, "bpf", &bind);
    let kill_at = strace::kill_points(&calls);
    assert!((3..=60).contains(&kill_at.len()), "{} writes:\n{}", kill_at.len(), calls.join("\n"));
    for i in kill_at {
        ns.steerctl_ok(&["load-bindings", &only_a]);
        strace::killed_at(&ns, "bpf", i, &bind);
        ns.steerctl_ok(&bind);
        let status: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "status"])).unwrap();
        assert_eq!(status["plane"]["up_to_date"], true, "killed at bpf call {i} ({}): {status}", calls[i]);
        assert_eq!(who(&ns, "192.0.2.9:1234"), "b", "killed at bpf call {i}: {}", calls[i]);
    }
    // An unbind killed the same way, then run again (it may find nothing
    // left to remove): the plane is current and the binding gone.
    ns.steerctl_ok(&["load-bindings", &with_b]);
    let calls = strace::calls(&ns, "bpf", &unbind);
    for i in strace::kill_points(&calls) {
        ns.steerctl_ok(&["load-bindings", &with_b]);
        strace::killed_at(&ns, "bpf", i, &unbind);
        let _ = ns.steerctl(&unbind);
        let status: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "status"])).unwrap();
        assert_eq!(status["plane"]["up_to_date"], true, "unbind killed at {}: {status}", calls[i]);
        assert_ne!(who(&ns, "192.0.2.9:1234"), "b", "unbind killed at {}: still steered", calls[i]);
    }
}

/// A load-bindings killed before any of its map writes (and after the
/// last) never leaves a recorded binding whose label is gone: the labels
/// that leave are forgotten only after the switch.
#[test]
fn a_load_bindings_killed_at_any_map_write_leaves_no_binding_without_its_label() {
    let ns = loaded();
    let file = |labels: [&'static str; 2], name: &str| {
        bindings_file(&ns, name, labels.into_iter().enumerate().map(|(i, label)| (label, format!("10.{i}.0.0/16"))))
    };
    let (old, new) = (file(["old-a", "old-b"], "old.json"), file(["new-a", "new-b"], "new.json"));
    ns.steerctl_ok(&["load-bindings", &old]);
    let calls = strace::calls(&ns, "bpf", &["load-bindings", &new]);
    for i in strace::kill_points(&calls) {
        ns.steerctl_ok(&["load-bindings", &old]);
        strace::killed_at(&ns, "bpf", i, &["load-bindings", &new]);
        let listed: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "bindings"])).unwrap();
        let labels: Vec<&str> =
            listed["bindings"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap()).collect();
        assert!(
            labels == ["old-a", "old-b"] || labels == ["new-a", "new-b"],
            "killed at {}: bindings of {labels:?}",
            calls[i]
        );
    }
}

/// A set of 4,096 labels (all there are) replaces another of 4,096 others.
#[test]
fn a_full_set_of_labels_replaces_another() {
    let ns = loaded();
    let file = |prefix: &str| {
        let labels: Vec<String> = (0..4096u32).map(|i| format!("{prefix}{i}")).collect();
        let entries =
            labels.iter().enumerate().map(|(i, label)| (label.as_str(), format!("10.{}.{}.0/24", i / 256, i % 256)));
        bindings_file(&ns, &format!("{prefix}.json"), entries)
    };
    ns.steerctl_ok(&["load-bindings", &file("a")]);
    ns.steerctl_ok(&["load-bindings", &file("b")]);
    let status: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "status"])).unwrap();
    assert_eq!((status["labels"].as_u64(), status["bindings"].as_u64()), (Some(4096), Some(4096)), "{status}");
    assert!(ns.steerctl_ok(&["bindings"]).contains("b4095"));
}

/// A bind that finds the record 7/8 full makes it anew, larger. Killed
/// after making the new table, after pinning it, or just after it replaced
/// the old, and then run again: every binding is still recorded and
/// published.
#[test]
fn a_bind_killed_while_the_record_grows_loses_no_binding() {
    let ns = loaded();
    let bind = ["bind", "fill", "tcp", "192.0.2.0/24", "0"];
    // A record of 1,024 slots is made anew when a binding would fill it
    // past 896 (7/8): filled to 896 by load-bindings and binds.
    let file = std::env::temp_dir().join(format!("steer-fill-{}.json", std::process::id()));
    let layout = steer::Layout::new(ns.pin_dir());
    let fill = || {
        let host = |i: u32| format!("10.1.{}.{}/32", i / 256, i % 256);
        let bindings: Vec<String> = (0..768u32)
            .map(|i| format!(r#"{{"label":"fill","protocol":"tcp","prefix":"{}","port":1}}"#, host(i)))
            .collect();
        std::fs::write(&file, format!(r#"{{"bindings":[{}]}}"#, bindings.join(","))).unwrap();
        ns.steerctl_ok(&["load-bindings", file.to_str().unwrap()]);
        ns.enter(|| {
            for i in 768..896u32 {
                let b = steer::model::Binding {
                    label: "fill".into(),
                    protocol: steer::model::Protocol::Tcp,
                    prefix: host(i).parse().unwrap(),
                    port: 1,
                };
                steer::ops::bindings::bind(&steer::Dispatcher::open_write(&layout).unwrap(), &b).unwrap();
            }
        });
    };
    let reload = || {
        ns.steerctl_ok(&["unload"]);
        ns.steerctl_ok(&["load"]);
        ns.steerctl_ok(&["attach"]);
    };
    fill();
    let calls = strace::calls(&ns, "bpf", &bind);
    let created = calls
        .iter()
        .position(|l| l.contains("BPF_MAP_CREATE"))
        .unwrap_or_else(|| panic!("the bind made no new record:\n{}", calls.join("\n")));
    let pinned = created + calls[created..].iter().position(|l| l.contains("BPF_OBJ_PIN")).unwrap();
    for (stage, index) in [("made, not pinned", created + 1), ("pinned", pinned), ("replaced", pinned + 1)] {
        reload();
        fill();
        strace::killed_at(&ns, "bpf", index, &bind);
        ns.steerctl_ok(&bind);
        let status: serde_json::Value = serde_json::from_str(&ns.steerctl_ok(&["--json", "status"])).unwrap();
        assert_eq!(status["bindings"], 897, "killed {stage}: {status}");
        assert_eq!(status["plane"]["up_to_date"], true, "killed {stage}: {status}");
        let e = ns.steerctl_ok(&["explain", "tcp", "10.1.3.127", "1"]);
        assert!(e.contains("label fill"), "killed {stage}: a recorded binding is not published: {e}");
        let e = ns.steerctl_ok(&["explain", "tcp", "192.0.2.7", "9"]);
        assert!(e.contains("label fill"), "killed {stage}: the bind's binding is not published: {e}");
    }
    let _ = std::fs::remove_file(&file);
}

/// Each change of a map of maps costs a grace period (milliseconds) where
/// the kernel has no batch updates for them (5.10, 6.1): a bind changes
/// only the chunks its bindings need, not every slot (about 390 calls).
#[test]
fn a_bind_changes_only_the_chunks_it_needs() {
    let ns = loaded();
    ns.steerctl_ok(&["bind", "a", "tcp", "10.0.0.0/8", "80"]);
    for args in [["b", "tcp", "192.0.2.0/24", "0"], ["c", "udp", "2001:db8::/32", "53"]] {
        let writes = map_writes_of_bind(&ns, &args);
        assert!(writes.len() <= 40, "{} map writes for bind {args:?}:\n{}", writes.len(), writes.join("\n"));
    }
    assert_eq!(ns.steerctl_ok(&["--json", "bindings"]).matches("\"label\"").count(), 3);
    let addr = ns.named_tcp_server("127.0.0.1:0", "b");
    register(&ns, "b", "tcp", addr);
    ns.add_local_route("192.0.2.0/24");
    assert_eq!(who(&ns, "192.0.2.9:1234"), "b");
}

/// The kernel opens a map by id only for CAP_SYS_ADMIN, which writes do
/// not need (a container holds CAP_BPF and CAP_NET_ADMIN): binds and
/// unbinds in place, and explain, open the chunks from their pins.
#[test]
fn writes_in_place_need_no_cap_sys_admin() {
    let ns = loaded();
    ns.steerctl_ok(&["bind", "a", "tcp", "10.0.0.0/8", "80"]);
    let pin_dir = ns.pin_dir();
    let without_sys_admin = |args: &[&str], in_place: bool| {
        let out = ns
            .command("setpriv")
            .args(["--bounding-set=-sys_admin", "--"])
            .arg(bin("steerctl"))
            .args(["--pin-dir", pin_dir.to_str().unwrap()])
            .args(args)
            .env("RUST_LOG", "steer=debug")
            .output()
            .unwrap();
        let err = stderr(&out);
        assert!(out.status.success(), "steerctl {args:?} without CAP_SYS_ADMIN: {err}");
        assert_eq!(!err.contains("anew"), in_place, "steerctl {args:?}: {err}");
        String::from_utf8(out.stdout).unwrap()
    };
    without_sys_admin(&["bind", "b", "tcp", "192.0.2.0/24", "0"], true);
    without_sys_admin(&["bind", "c", "tcp", "192.0.2.0/25", "0"], true);
    without_sys_admin(&["unbind", "c", "tcp", "192.0.2.0/25", "0"], true);
    assert!(without_sys_admin(&["explain", "tcp", "192.0.2.9", "1234"], true).contains("192.0.2.0/24"));
    // Pins gone (by hand): the write publishes every chunk anew, pinned.
    let chunks = pin_dir.join("chunks");
    for pin in std::fs::read_dir(&chunks).unwrap() {
        std::fs::remove_file(pin.unwrap().path()).unwrap();
    }
    without_sys_admin(&["bind", "c", "tcp", "192.0.2.0/25", "0"], false);
    without_sys_admin(&["unbind", "c", "tcp", "192.0.2.0/25", "0"], true);
    assert_eq!(ns.steerctl_ok(&["--json", "bindings"]).matches("\"label\"").count(), 2);
    let addr = ns.named_tcp_server("127.0.0.1:0", "b");
    register(&ns, "b", "tcp", addr);
    ns.add_local_route("192.0.2.0/24");
    assert_eq!(who(&ns, "192.0.2.9:1234"), "b");
}
