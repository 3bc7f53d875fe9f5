//! The seed walkthrough on a real kernel: one ncat echo socket on
//! 127.0.0.1:7777 serves ports 7, 77 and 777 through sk_lookup.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpListener},
    process::Command,
    time::Duration,
};

use steer::{discovery::diag, model::Protocol};
use steer_tests::{TestNs, repo_root, stderr};

/// Load, start ncat, attach, steer 7 77 777, hand over ncat's socket.
fn steered_echo(ns: &mut TestNs) -> u32 {
    ns.steerctl_ok(&["load"]);
    let ncat = ns.start_ncat_echo();
    ns.steerctl_ok(&["attach"]);
    ns.steerctl_ok(&["ports", "add", "7", "77", "777"]);
    ns.steerctl_ok(&["socket", "set", "--pid", &ncat.to_string()]);
    ncat
}

#[test]
fn listed_ports_reach_the_one_socket_and_echo() {
    let mut ns = TestNs::new("listed");
    // Before steering, nothing listens on the service ports.
    ns.assert_refused(7);
    steered_echo(&mut ns);
    for port in [7, 77, 777] {
        assert_eq!(ns.echo(port, &format!("hello {port}")).unwrap(), format!("hello {port}"));
    }
    ns.assert_refused(8);
    ns.assert_refused(7778);
}

#[test]
fn ports_del_closes_a_port_again() {
    let mut ns = TestNs::new("portsdel");
    steered_echo(&mut ns);
    assert_eq!(ns.echo(77, "x").unwrap(), "x");
    ns.steerctl_ok(&["ports", "del", "77"]);
    ns.assert_refused(77);
    assert_eq!(ns.echo(7, "still").unwrap(), "still");
    let listed: Vec<u16> = serde_json::from_str(&ns.steerctl_ok(&["--json", "ports", "list"])).unwrap();
    assert_eq!(listed, vec![7, 777]);
}

#[test]
fn socket_clear_refuses_the_steered_ports() {
    let mut ns = TestNs::new("sockclear");
    steered_echo(&mut ns);
    ns.steerctl_ok(&["socket", "clear"]);
    // Listed but socketless ports are dropped, never passed on.
    ns.assert_refused(7);
    assert!(ns.status()["socket"].is_null());
    let out = ns.steerctl(&["socket", "clear"]);
    assert!(steer_tests::stderr(&out).contains("no socket is set"), "{}", steer_tests::stderr(&out));
}

#[test]
fn detach_restores_normal_lookup() {
    let mut ns = TestNs::new("detach");
    steered_echo(&mut ns);
    // A socket bound to 77 itself: steering wins over it while attached.
    let direct = ns.enter(|| TcpListener::bind("127.0.0.1:77").unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = direct.accept().unwrap();
        conn.write_all(b"direct\n").unwrap();
    });
    assert_eq!(ns.echo(77, "steered").unwrap(), "steered");
    ns.steerctl_ok(&["detach"]);
    assert_eq!(ns.echo(77, "anything").unwrap(), "direct");
    server.join().unwrap();
    ns.assert_refused(7);
    assert!(ns.status()["link"].is_null());
}

#[test]
fn unload_leaves_no_pins() {
    let mut ns = TestNs::new("unload");
    steered_echo(&mut ns);
    assert_eq!(
        ns.pins(),
        [
            "steer",
            "steer/backfill",
            "steer/bindings_0",
            "steer/bindings_1",
            "steer/dest_bindings",
            "steer/destinations",
            "steer/echo_ports",
            "steer/echo_socket",
            "steer/follow_events",
            "steer/follow_metrics",
            "steer/follow_scopes",
            "steer/follows",
            "steer/labels",
            "steer/metrics",
            "steer/seed_metrics",
            "steer/socket_flags",
            "steer/sockets",
            "steer/steer_config",
            "steer/steer_dirs",
            "steer/steer_dispatch",
            "steer/steer_dispatch_link",
            "steer/steer_meta",
            "steer/steer_ranges",
            "steer/trace_filters",
            "steer/trace_metrics",
            "steer/trace_rings",
            "steer/trace_tracers",
        ]
    );
    ns.steerctl_ok(&["unload"]);
    assert!(ns.pins().is_empty(), "pins left behind: {:?}", ns.pins());
    ns.assert_refused(7);
}

#[test]
fn status_reports_program_link_netns_ports_and_socket_owner() {
    let mut ns = TestNs::new("status");
    let ncat = steered_echo(&mut ns);
    let status = ns.status();
    assert_eq!(status["program"]["name"], "steer_dispatch");
    let prog_id = status["program"]["id"].as_u64().unwrap();
    assert!(prog_id > 0);
    assert_eq!(status["link"]["program_id"].as_u64(), Some(prog_id));
    assert_eq!(status["link"]["netns_inode"].as_u64(), Some(ns.inode()));
    assert_eq!(status["current_netns_inode"].as_u64(), Some(ns.inode()));
    assert_eq!(status["ports"], serde_json::json!([7, 77, 777]));
    assert!(status["socket"]["cookie"].as_u64().unwrap() > 0);
    let owners = status["socket"]["owners"].as_array().unwrap();
    assert!(
        owners.iter().any(|o| o["pid"].as_u64() == Some(ncat as u64) && o["command"] == "ncat"),
        "ncat should own the socket: {owners:?}"
    );
    // The table form carries the same facts.
    let table = ns.steerctl_ok(&["status"]);
    assert!(table.contains("steer_dispatch id"), "{table}");
    assert!(table.contains("7 77 777"), "{table}");
    assert!(table.contains(&format!("ncat (pid {ncat}, fd 3)")), "{table}");
}

/// The seed's own steps: bpftool for the port map, sk-lookup-attach and
/// sockmap-update with a PID and FD, beside steerctl's pins.
#[test]
fn seed_tools_and_bpftool_work_beside_steerctl() {
    let mut ns = TestNs::new("seedtools");
    ns.steerctl_ok(&["load"]);
    let ncat = ns.start_ncat_echo();
    let dir = ns.pin_dir();
    let prog = dir.join("steer_dispatch");
    let link = dir.join("steer_dispatch_link");
    let out = ns.run("sk-lookup-attach", &[prog.to_str().unwrap(), link.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let map = dir.join("echo_socket");
    let out = ns.run("sockmap-update", &[&ncat.to_string(), "3", map.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ports = dir.join("echo_ports");
    let out = ns
        .command("bpftool")
        .args(["map", "update", "pinned", ports.to_str().unwrap(), "key", "0x07", "0x00", "value", "0x00"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool: {}", stderr(&out));
    assert_eq!(ns.echo(7, "seed").unwrap(), "seed");
    ns.assert_refused(77);
    assert_eq!(ns.status()["ports"], serde_json::json!([7]));
}

#[test]
fn nmap_sees_exactly_the_steered_ports() {
    let mut ns = TestNs::new("nmap");
    steered_echo(&mut ns);
    let out = Command::new(repo_root().join("scripts/verify-nmap.sh"))
        .args(["--netns", &ns.name, "127.0.0.1", "1-1000"])
        .output()
        .expect("running verify-nmap.sh");
    assert!(out.status.success(), "verify-nmap.sh: {}", stderr(&out));
    let open: Vec<String> = String::from_utf8(out.stdout).unwrap().lines().map(str::to_string).collect();
    assert_eq!(open, ["open tcp 7", "open tcp 77", "open tcp 777"]);
}

#[test]
fn many_connections_all_land_on_the_same_socket() {
    let mut ns = TestNs::new("many");
    steered_echo(&mut ns);
    for i in 0..50u16 {
        let port = [7, 77, 777][usize::from(i % 3)];
        assert_eq!(ns.echo(port, &format!("n{i}")).unwrap(), format!("n{i}"));
    }
    // Keep a connection to 777 open and show it arrived at 7777's socket:
    // the only listener in the namespace is ncat's on 7777, and the
    // connection was accepted there with the address the client asked for
    // (the server's end has local address 127.0.0.1:777).
    let (line, listeners, server_end) = ns.enter(|| {
        let s = std::net::TcpStream::connect("127.0.0.1:777").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (&s).write_all(b"ping\n").unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let client = s.local_addr().unwrap();
        let all = diag::sockets(Protocol::Tcp).unwrap();
        let listeners: Vec<SocketAddr> = all.iter().filter(|d| d.state == diag::TCP_LISTEN).map(|d| d.local).collect();
        let server_end: Vec<_> =
            all.into_iter().filter(|d| d.remote == Some(client) && d.state == diag::TCP_ESTABLISHED).collect();
        (line, listeners, server_end)
    });
    assert_eq!(line, "ping\n");
    assert_eq!(listeners, ["127.0.0.1:7777".parse::<SocketAddr>().unwrap()], "the namespace's listeners");
    assert_eq!(
        server_end.iter().map(|d| d.local).collect::<Vec<_>>(),
        ["127.0.0.1:777".parse::<SocketAddr>().unwrap()],
        "the server's end of the connection: {server_end:#?}"
    );
}
