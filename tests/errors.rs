//! A command that fails says so, and one that is refused changes nothing:
//! errors the library used to swallow, checks it let through, flags it
//! dropped, and state it left half changed. Faults are placed with strace
//! (an error injected into one chosen system call).

use std::{
    net::{SocketAddr, TcpListener},
    os::fd::AsRawFd,
    process::Command,
};

use steer_tests::{TestNs, bin, me, stderr, strace};

fn loaded(name: &str) -> TestNs {
    let ns = TestNs::new(name);
    ns.steerctl_ok(&["load"]);
    ns.steerctl_ok(&["attach"]);
    ns
}

/// A TCP listener of this test process, inside the namespace.
fn listener(ns: &TestNs, addr: &str) -> (TcpListener, SocketAddr) {
    let l = ns.enter(|| TcpListener::bind(addr).unwrap());
    let local = l.local_addr().unwrap();
    (l, local)
}

fn register(ns: &TestNs, label: &str, addr: SocketAddr, extra: &[&str]) -> std::process::Output {
    let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
    ns.steerctl(&[&["register-pid", label, &me(), "tcp", &ip, &port][..], extra].concat())
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// 0-based index of the first `socket()` call for sock_diag (AF_NETLINK)
/// that `steerctl ARGS` makes.
fn netlink_socket_call(ns: &TestNs, args: &[&str]) -> usize {
    let calls = strace::calls(ns, "socket", args);
    calls.iter().position(|c| c.contains("AF_NETLINK")).unwrap_or_else(|| panic!("no netlink socket: {calls:?}"))
}

#[test]
fn a_file_with_more_labels_than_fit_changes_nothing() {
    let ns = loaded("toomanylabels");
    ns.steerctl_ok(&["bind", "keep", "tcp", "192.0.2.0/24", "0"]);
    let bindings: Vec<serde_json::Value> = (0..4097)
        .map(|i| {
            serde_json::json!({"label": format!("l{i}"), "protocol": "tcp",
            "prefix": format!("10.{}.{}.0/24", i / 256, i % 256), "port": 0})
        })
        .collect();
    let file = ns.bpffs.parent().unwrap().join("many.json");
    std::fs::write(&file, serde_json::json!({ "bindings": bindings }).to_string()).unwrap();
    let out = ns.steerctl(&["load-bindings", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at most 4096 labels fit"), "{}", stderr(&out));
    let status = ns.status();
    assert_eq!((status["labels"].as_u64(), status["bindings"].as_u64()), (Some(1), Some(1)), "{status}");
    assert_eq!(status["plane"]["up_to_date"], true, "{status}");
}

#[test]
fn ports_past_the_seed_lists_limit_are_refused_whole() {
    let ns = loaded("toomanyports");
    let first: Vec<String> = (1..=1000).map(|p| p.to_string()).collect();
    ns.steerctl_ok(&[&["ports", "add"][..], &first.iter().map(String::as_str).collect::<Vec<_>>()].concat());
    let more: Vec<String> = (2001..=2030).map(|p| p.to_string()).collect();
    let out = ns.steerctl(&[&["ports", "add"][..], &more.iter().map(String::as_str).collect::<Vec<_>>()].concat());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("at most 1024 ports: 1000 are listed and this adds 30 more"), "{}", stderr(&out));
    assert_eq!(ns.status()["ports"].as_array().unwrap().len(), 1000);
}

#[test]
fn sockmap_update_refuses_steers_labelled_socket_map() {
    let ns = loaded("labelledmap");
    let (l, _) = listener(&ns, "127.0.0.1:0");
    let sockets = ns.pin_dir().join("sockets");
    let out = ns.run("sockmap-update", &[&me(), &l.as_raw_fd().to_string(), sockets.to_str().unwrap(), "0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is steer's labelled socket map, not the seed's"), "{}", stderr(&out));
    assert_eq!(ns.status()["registered_sockets"], 0);
}

#[test]
fn register_pid_without_an_address_honours_no_reuseport() {
    let ns = loaded("pidflags");
    let (_l, _) = listener(&ns, "127.0.0.1:0");
    ns.steerctl_ok(&["register-pid", "web", &me(), "--no-reuseport"]);
    let list = json(&ns.steerctl_ok(&["--json", "list"]));
    assert_eq!(list[0]["no_reuseport"], true, "{list}");
}

#[test]
fn register_of_passed_sockets_refuses_a_process_filter() {
    let ns = loaded("passedfilter");
    let out = ns.steerctl(&["register", "web", "--process", "nginx"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--process <NAME>") && stderr(&out).contains("required"), "{}", stderr(&out));
}

#[test]
fn passed_fds_that_are_not_open_are_refused_with_the_reason() {
    let ns = loaded("passedclosed");
    // The shell closes fd 3 and becomes steerctl: LISTEN_PID is its pid.
    let script = r#"exec 3<&-; export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@""#;
    let out = ns
        .command("sh")
        .args(["-c", script])
        .arg(bin("steerctl"))
        .args(["--pin-dir", ns.pin_dir().to_str().unwrap(), "register", "web"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("LISTEN_FDS is 1 but fd 3 is not open"), "{}", stderr(&out));
    assert_eq!(ns.status()["registered_sockets"], 0);
}

#[test]
fn a_failed_socket_insert_leaves_the_old_sockets_flags() {
    let ns = loaded("insertflags");
    let (_a, a) = listener(&ns, "127.0.0.1:0");
    let (_b, b) = listener(&ns, "127.0.0.2:0");
    assert!(register(&ns, "web", a, &[]).status.success());
    let args = ["register-pid", "web", &me(), "tcp", &b.ip().to_string(), &b.port().to_string(), "--no-reuseport"];
    // The sockets map's insert is the last map write of a registration.
    let calls = strace::calls(&ns, "bpf", &args);
    let insert = calls.iter().rposition(|c| c.contains("BPF_MAP_UPDATE_ELEM")).unwrap();
    // Put a back first: the traced run registered b.
    assert!(register(&ns, "web", a, &[]).status.success());
    let out = strace::failed_at(&ns, "bpf", insert, "EBUSY", &args);
    assert!(!out.status.success(), "{}", stderr(&out));
    let list = json(&ns.steerctl_ok(&["--json", "list"]));
    assert_eq!(list[0]["address"], a.to_string(), "{list}");
    assert_eq!(list[0]["no_reuseport"], false, "the old socket took the new flag: {list}");
}

#[test]
fn a_bind_whose_socket_check_cannot_be_made_is_refused() {
    let ns = loaded("bindcheck");
    let (_l, addr) = listener(&ns, "127.0.0.1:0");
    assert!(register(&ns, "web", addr, &[]).status.success());
    let bind = ["bind", "web", "tcp", "192.0.2.0/24", "0"];
    let at = netlink_socket_call(&ns, &bind);
    ns.steerctl_ok(&["unbind", "web", "tcp", "192.0.2.0/24", "0"]);
    let out = strace::failed_at(&ns, "socket", at, "EACCES", &bind);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("checking that label web's registered sockets"), "{}", stderr(&out));
    assert_eq!(ns.status()["bindings"], 0);
}

#[test]
fn a_sock_diag_failure_is_reported_not_shown_as_no_owners() {
    let ns = loaded("diagfail");
    let (_l, addr) = listener(&ns, "127.0.0.1:0");
    assert!(register(&ns, "web", addr, &[]).status.success());
    let at = netlink_socket_call(&ns, &["list"]);
    let out = strace::failed_at(&ns, "socket", at, "EACCES", &["list"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("warning: owners unknown"), "{}", stderr(&out));
}

/// A state directory whose namespace is gone, in `survivor`'s bpffs.
fn dead_state(survivor: &TestNs) -> std::path::PathBuf {
    let doomed = TestNs::new("doomed");
    let netns = format!("/run/netns/{}", doomed.name);
    let bpffs = survivor.bpffs.to_str().unwrap();
    for args in [&["load"][..], &["bind", "old", "tcp", "127.0.0.0/8", "0"]] {
        let out =
            Command::new(bin("steerctl")).args(["--netns", &netns, "--bpffs", bpffs]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    survivor.bpffs.join("steer").join(doomed.inode().to_string())
}

#[test]
fn bindings_of_a_stale_state_come_with_a_warning() {
    let survivor = TestNs::new("stalebindings");
    let dead = dead_state(&survivor);
    let out = survivor.run("steerctl", &["--pin-dir", dead.to_str().unwrap(), "bindings"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("is stale") && stderr(&out).contains("steer nothing here"), "{}", stderr(&out));
}

#[test]
fn gc_says_when_it_cannot_remove_a_stale_state() {
    let survivor = TestNs::new("gcforeign");
    let dead = dead_state(&survivor);
    // A pin steer did not make keeps the directory from going.
    let foreign = dead.join("foreign");
    let out = Command::new("bpftool")
        .args(["map", "create", foreign.to_str().unwrap(), "type", "array", "key", "4", "value", "4"])
        .args(["entries", "1", "name", "foreign"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", stderr(&out));
    let bpffs = survivor.bpffs.to_str().unwrap();
    let out = Command::new(bin("steerctl")).args(["--bpffs", bpffs, "--json", "gc"]).output().unwrap();
    assert!(!out.status.success(), "gc claimed success");
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entry = entries.as_array().unwrap().iter().find(|e| e["dir"] == dead.to_str().unwrap()).unwrap();
    assert_eq!(entry["removed"], false, "{entry}");
    assert!(entry["error"].as_str().unwrap().contains("holds pins steer did not make"), "{entry}");
    assert!(foreign.exists());
}
