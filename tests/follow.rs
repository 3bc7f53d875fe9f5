//! Servers followed by the kernel: a sock_ops program puts every socket
//! that starts listening on a followed address into its label's slot
//! inside listen(), so restarts, reuseport handovers and members' exits
//! refuse nothing, with no `watch` and no fd taken. Real servers (this
//! crate's test-server, nginx), real connections, each test in a network
//! namespace of its own. On kernels before 5.15 (no netns cookie in
//! sock_ops) the tests check the fallback instead.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use steer_tests::{Count, TestNs, bin, nginx, probe, require_feature, stderr, wait_for_line, wait_until};

const FEATURE: &str = "bpf_get_netns_cookie in sock_ops programs (Linux 5.15)";

fn followable() -> bool {
    probe::kernel_at_least(5, 15)
}

fn loaded(name: &str) -> TestNs {
    let ns = TestNs::new(name);
    ns.steerctl_ok(&["load"]);
    ns.steerctl_ok(&["attach"]);
    ns
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Applies a config of these registrations (followed: the default).
fn apply(ns: &TestNs, registrations: serde_json::Value) -> String {
    let path = ns.bpffs.parent().unwrap().join("config.json");
    std::fs::write(&path, serde_json::json!({ "registrations": registrations }).to_string()).unwrap();
    ns.steerctl_ok(&["apply", path.to_str().unwrap()])
}

/// Servers this test started, killed when it ends (pass or fail).
#[derive(Default)]
struct Servers(Vec<Child>);

impl Servers {
    /// Starts `test-server ARGS` in the namespace and returns its pid once
    /// it says it listens (or is bound): listen() has returned by then.
    fn start(&mut self, ns: &TestNs, args: &[&str]) -> Pid {
        let mut cmd = ns.command(bin("test-server"));
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning test-server");
        let ready = if args[0] == "udp" { "bound" } else { "listening" };
        wait_for_line(child.stderr.take().unwrap(), ready, &format!("test-server {args:?}"));
        let pid = Pid::from_raw(child.id() as i32);
        self.0.push(child);
        pid
    }

    /// Kills `pid` (SIGKILL: a crash) and waits until it is gone.
    fn kill(&mut self, pid: Pid) {
        self.signal(pid, Signal::SIGKILL);
    }

    /// Stops `pid` gracefully (SIGTERM) and waits until it is gone.
    fn stop(&mut self, pid: Pid) {
        self.signal(pid, Signal::SIGTERM);
    }

    fn signal(&mut self, pid: Pid, signal: Signal) {
        kill(pid, signal).unwrap();
        if let Some(i) = self.0.iter().position(|c| c.id() as i32 == pid.as_raw()) {
            let mut child = self.0.remove(i);
            steer_tests::wait_exit(&mut child, steer_tests::EVENT_LIMIT);
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One connection: connect, read the server's line.
fn line(addr: SocketAddr) -> Result<String, String> {
    use std::io::{BufRead, BufReader};
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut text = String::new();
    BufReader::new(&s).read_line(&mut text).map_err(|e| e.to_string())?;
    if text.is_empty() { Err("closed without a line".into()) } else { Ok(text.trim_end().to_string()) }
}

/// A client making connections one after another on a thread (at most
/// `max`), each one's start time and outcome kept.
struct Clients {
    stop: Arc<AtomicBool>,
    done: Arc<Count>,
    thread: std::thread::JoinHandle<Vec<(Instant, Result<String, String>)>>,
}

impl Clients {
    fn start(ns: &Arc<TestNs>, to: SocketAddr, max: usize, ask: fn(SocketAddr) -> Result<String, String>) -> Self {
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(Count::default()));
        let (ns, halt, count) = (ns.clone(), stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            ns.enter(|| {
                let mut log = Vec::with_capacity(max);
                while log.len() < max && !halt.load(Ordering::SeqCst) {
                    log.push((Instant::now(), ask(to)));
                    count.add();
                }
                log
            })
        });
        Self { stop, done, thread }
    }

    /// Waits until `n` connections are done.
    fn wait_for(&self, n: u64) {
        self.done.wait_for(n, "client connections");
    }

    fn finish(self) -> Vec<(Instant, Result<String, String>)> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().unwrap()
    }
}

fn failures(log: &[(Instant, Result<String, String>)]) -> Vec<String> {
    log.iter().filter_map(|(_, r)| r.as_ref().err().cloned()).collect()
}

/// Moves a closing listener's pending connections to another member of
/// its reuseport group (net.ipv4.tcp_migrate_req, Linux 5.14): without
/// it the kernel resets them, whoever steers.
fn migrate_requests(ns: &TestNs) {
    let out = ns.command("sysctl").args(["-qw", "net.ipv4.tcp_migrate_req=1"]).output().unwrap();
    assert!(out.status.success(), "sysctl: {}", stderr(&out));
}

#[test]
fn a_restarted_server_is_steered_from_its_first_listen_with_nothing_running() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let ns = loaded("firstlisten");
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "0"]);
    let out =
        apply(&ns, serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8080}]));
    assert!(out.contains("followed in the kernel"), "{out}");
    // 50 hard restarts: each server connects to a steered address right
    // after its listen() returns; no watch runs.
    let mut steered = 0;
    for round in 0..50 {
        let out = ns
            .command(bin("test-server"))
            .args(["tcp", "127.0.0.1:8080", "web", "--check", "127.0.0.9:4444"])
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(out.status.success(), "round {round}: {}", stderr(&out));
        if said == "steered" {
            steered += 1;
        } else {
            eprintln!("round {round}: {said}");
        }
    }
    eprintln!("steered from the first listen(): {steered} of 50 restarts");
    assert_eq!(steered, 50);
    let metrics = json(&ns.steerctl_ok(&["--json", "metrics"]));
    assert!(metrics["follow"]["inserted"].as_u64().unwrap() >= 50, "{metrics}");
}

#[test]
fn a_hard_restart_refuses_nothing_after_the_new_listen_returns() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let ns = Arc::new(loaded("hardrestart"));
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "81"]);
    apply(&ns, serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8081}]));
    let mut servers = Servers::default();
    let mut old = servers.start(&ns, &["tcp", "127.0.0.1:8081", "old"]);
    let clients = Clients::start(&ns, "127.0.0.10:81".parse().unwrap(), 40_000, line);
    // (killed, listening again): nothing listens in between.
    let mut gaps = Vec::new();
    for round in 0..5u64 {
        clients.wait_for(400 * round + 200);
        let killed = Instant::now();
        servers.kill(old);
        old = servers.start(&ns, &["tcp", "127.0.0.1:8081", &format!("new{round}")]);
        gaps.push((killed, Instant::now()));
    }
    clients.wait_for(2_200);
    let log = clients.finish();
    // One client thread: a connection ends when the next one starts. One
    // that overlaps a kill may have been accepted by the killed server,
    // which resets it: that is the gap's, as much as one refused in it.
    let ends: Vec<Instant> = log.iter().skip(1).map(|(t, _)| *t).chain([Instant::now()]).collect();
    let in_gap = |start: &Instant, end: &Instant| gaps.iter().any(|(killed, ready)| end >= killed && start < ready);
    let outcomes: Vec<_> = log.iter().zip(&ends).map(|((start, r), end)| (in_gap(start, end), r)).collect();
    let refused_in_gaps = outcomes.iter().filter(|(gap, r)| *gap && r.is_err()).count();
    let late: Vec<_> = outcomes.iter().filter(|(gap, r)| !gap && r.is_err()).collect();
    eprintln!(
        "5 hard restarts: {} connections, {refused_in_gaps} failed across a kill, {} otherwise",
        log.len(),
        late.len()
    );
    // Every connection begun while a server listened lands: in particular
    // each one after a new server's listen() returned.
    assert!(late.is_empty(), "refused while a server listened: {late:?}");
}

#[test]
fn reuseport_members_leaving_one_by_one_and_a_handover_refuse_nothing() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let ns = Arc::new(loaded("members"));
    migrate_requests(&ns);
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "82"]);
    apply(&ns, serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8082}]));
    let mut servers = Servers::default();
    let mut members: Vec<Pid> =
        (0..4).map(|i| servers.start(&ns, &["tcp", "127.0.0.1:8082", &format!("m{i}"), "--reuseport"])).collect();
    let list = json(&ns.steerctl_ok(&["--json", "list"]));
    assert_eq!(list.as_array().unwrap().len(), 4, "every member is held: {list}");
    assert!(list.as_array().unwrap().iter().all(|r| r["followed"] == true), "{list}");
    let clients = Clients::start(&ns, "127.0.0.11:82".parse().unwrap(), 12_000, line);
    // Each member's exit, from SIGTERM until it is gone.
    let mut exits = Vec::new();
    let mut stop = |servers: &mut Servers, member: Pid| {
        let signalled = Instant::now();
        servers.stop(member);
        exits.push((signalled, Instant::now()));
    };
    // Down to one, a member leaving (SIGTERM) every 2,000 connections.
    for step in 1..=3u64 {
        clients.wait_for(2_000 * step);
        stop(&mut servers, members.remove(0));
    }
    // A handover: a new process joins the group, then the last old one goes.
    clients.wait_for(8_000);
    members.push(servers.start(&ns, &["tcp", "127.0.0.1:8082", "next", "--reuseport"]));
    clients.wait_for(9_000);
    stop(&mut servers, members.remove(0));
    clients.wait_for(12_000);
    let log = clients.finish();
    // A connection in its handshake with a member as that member's socket
    // goes can be reset (2 of 12,000 once in CI): the kernel moves a
    // closing listener's pending connections to another member
    // (tcp_migrate_req), but not every one in flight. Those may only
    // overlap an exit, a few each; any other failure is steering's.
    let ends: Vec<Instant> = log.iter().skip(1).map(|(t, _)| *t).chain([Instant::now()]).collect();
    let overlaps_exit = |start: &Instant, end: &Instant| exits.iter().any(|(from, to)| end >= from && start <= to);
    let (mut at_exits, mut failed) = (Vec::new(), Vec::new());
    for ((start, r), end) in log.iter().zip(&ends) {
        if let Err(e) = r {
            if overlaps_exit(start, end) { at_exits.push(e.clone()) } else { failed.push(e.clone()) }
        }
    }
    let next = log.iter().filter(|(_, r)| r.as_deref() == Ok("next")).count();
    eprintln!(
        "reuseport group of 4 down to 1, then a handover: {} connections, {} reset or refused across a member's exit, {} otherwise, {next} served by the new member",
        log.len(),
        at_exits.len(),
        failed.len()
    );
    assert_eq!(failed, Vec::<String>::new());
    assert!(at_exits.len() <= 2 * exits.len(), "{} failed across {} exits: {at_exits:?}", at_exits.len(), exits.len());
    assert!(log.len() >= 10_000);
    assert!(next > 0, "the new member never served");
}

#[test]
fn nginx_binary_upgrade_and_worker_kills_refuse_nothing() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let nginx = nginx::nginx().expect("nginx is not installed: run scripts/setup.sh (Debian's nginx package)");
    let ns = Arc::new(loaded("nginxupgrade"));
    migrate_requests(&ns);
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    apply(&ns, serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8088}]));
    let dir = ns.bpffs.parent().unwrap().join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let conf = nginx::config(&dir, "127.0.0.1:8088", 4);
    // Daemonised, as nginx runs in production: the binary upgrade forks a
    // new master off the old one.
    let out = ns.command(&nginx).args(["-p", dir.to_str().unwrap(), "-c", conf.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "nginx: {}", stderr(&out));
    let pid_file = dir.join("nginx.pid");
    let master = || -> Option<Pid> { std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok().map(Pid::from_raw) };
    let held = || json(&ns.steerctl_ok(&["--json", "list"])).as_array().unwrap().len();
    wait_until("nginx's four reuseport sockets are held", Duration::from_secs(10), || held() == 4);
    let first = master().expect("nginx wrote its pid");
    let _stop = NginxStop(dir.clone());
    let clients = Clients::start(&ns, "127.0.0.12:80".parse().unwrap(), 12_000, |a| {
        nginx::http_get(a).map_err(|e| e.to_string())
    });
    clients.wait_for(2_000);
    // The binary upgrade: USR2 starts a new master on the inherited
    // sockets, QUIT makes the old one finish and exit.
    kill(first, Signal::SIGUSR2).unwrap();
    let old_pid_file = dir.join("nginx.pid.oldbin");
    wait_until("the new master runs", Duration::from_secs(10), || old_pid_file.exists() && master() != Some(first));
    clients.wait_for(4_000);
    kill(first, Signal::SIGQUIT).unwrap();
    wait_until("the old master exited", Duration::from_secs(10), || kill(first, None).is_err());
    let second = master().unwrap();
    // Workers killed one by one; the master starts new ones on the same sockets.
    for step in 0..3u64 {
        clients.wait_for(6_000 + 2_000 * step);
        let workers = children_of(second);
        kill(workers[0], Signal::SIGKILL).unwrap();
    }
    clients.wait_for(12_000);
    let log = clients.finish();
    let failed = failures(&log);
    let workers: std::collections::BTreeSet<&str> = log.iter().filter_map(|(_, r)| r.as_deref().ok()).collect();
    eprintln!(
        "nginx: binary upgrade and 3 worker kills, {} connections, {} failed, {} workers answered",
        log.len(),
        failed.len(),
        workers.len()
    );
    assert_eq!(failed, Vec::<String>::new());
    assert!(log.len() >= 10_000);
}

/// Stops nginx (QUIT to whatever master the pid file names) when the test ends.
struct NginxStop(PathBuf);

impl Drop for NginxStop {
    fn drop(&mut self) {
        for file in ["nginx.pid", "nginx.pid.oldbin"] {
            if let Some(pid) = std::fs::read_to_string(self.0.join(file)).ok().and_then(|p| p.trim().parse().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                for worker in children_of(Pid::from_raw(pid)) {
                    let _ = kill(worker, Signal::SIGKILL);
                }
            }
        }
    }
}

/// The children of `pid`, from /proc/PID/task/PID/children.
fn children_of(pid: Pid) -> Vec<Pid> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok().map(Pid::from_raw))
        .collect()
}

#[test]
fn a_listener_of_another_namespace_is_not_taken() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let ns = loaded("ownns");
    let other = TestNs::new("otherns");
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "83"]);
    apply(&ns, serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8083}]));
    let mut servers = Servers::default();
    // Same address and port, same cgroup, another namespace.
    servers.start(&other, &["tcp", "127.0.0.1:8083", "other"]);
    assert_eq!(json(&ns.steerctl_ok(&["--json", "list"])), serde_json::json!([]));
    servers.start(&ns, &["tcp", "127.0.0.1:8083", "own"]);
    assert_eq!(ns.enter(|| line("127.0.0.13:83".parse().unwrap())), Ok("own".to_string()));
}

/// A cgroup v2 of this test's own, removed when it ends.
struct TestCgroup {
    dir: PathBuf,
    name: String,
}

impl TestCgroup {
    fn new(tag: &str) -> Option<Self> {
        let mount = procfs::process::Process::myself()
            .ok()?
            .mountinfo()
            .ok()?
            .into_iter()
            .find(|m| m.fs_type == "cgroup2" && m.root == "/")?
            .mount_point;
        let name = format!("steer-test-{tag}-{}", std::process::id());
        let dir = mount.join(&name);
        std::fs::create_dir(&dir).ok()?;
        Some(Self { dir, name })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_squatter_outside_the_registrations_cgroup_is_not_steered_to() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let cgroup = TestCgroup::new("scope").expect("a cgroup v2 hierarchy to make a cgroup in");
    let ns = loaded("squatter");
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "84"]);
    let mut servers = Servers::default();
    // Another user listens first on the registered (unprivileged) port.
    let squat_cmd = |ns: &TestNs| {
        let mut cmd = ns.command("setpriv");
        cmd.args(["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"]).arg(bin("test-server"));
        cmd
    };
    let mut cmd = squat_cmd(&ns);
    cmd.args(["tcp", "127.0.0.1:9000", "squatter"]).stdin(Stdio::null()).stderr(Stdio::piped());
    let mut squatter = cmd.spawn().unwrap();
    wait_for_line(squatter.stderr.take().unwrap(), "listening", "the squatter");
    let out = apply(
        &ns,
        serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 9000,
            "cgroup": cgroup.name}]),
    );
    assert!(out.contains(&format!("sockets of cgroup {}", cgroup.name)) && out.contains("nothing"), "{out}");
    assert_eq!(json(&ns.steerctl_ok(&["--json", "list"])), serde_json::json!([]));
    assert!(ns.enter(|| line("127.0.0.14:84".parse().unwrap())).is_err(), "steered to the squatter");
    let _ = squatter.kill();
    let _ = squatter.wait();
    // The service, started in its cgroup, takes the label at its listen().
    let procs = cgroup.dir.join("cgroup.procs");
    let mut cmd = ns.command(bin("test-server"));
    cmd.args(["tcp", "127.0.0.1:9000", "service"]).stdin(Stdio::null()).stderr(Stdio::piped());
    // Safety: the child only writes its pid into a file before exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || std::fs::write(&procs, "0"));
    }
    let mut service = cmd.spawn().unwrap();
    wait_for_line(service.stderr.take().unwrap(), "listening", "the service");
    servers.0.push(service);
    assert_eq!(ns.enter(|| line("127.0.0.14:84".parse().unwrap())), Ok("service".to_string()));
    // The squatter, back while the service runs, cannot bind; after the
    // service stops it binds, and is still not steered to.
    drop(servers);
    let mut cmd = squat_cmd(&ns);
    cmd.args(["tcp", "127.0.0.1:9000", "squatter"]).stdin(Stdio::null()).stderr(Stdio::piped());
    let mut squatter = cmd.spawn().unwrap();
    wait_for_line(squatter.stderr.take().unwrap(), "listening", "the squatter");
    assert!(ns.enter(|| line("127.0.0.14:84".parse().unwrap())).is_err(), "steered to the squatter");
    let _ = squatter.kill();
    let _ = squatter.wait();
}

#[test]
fn a_udp_server_bound_anew_is_followed_through_watch() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let ns = Arc::new(loaded("udpfollow"));
    // The same port: a UDP reply comes from the socket's own port.
    ns.steerctl_ok(&["bind", "dns", "udp", "127.0.0.0/8", "5300"]);
    let config = ns.bpffs.parent().unwrap().join("udp.json");
    std::fs::write(
        &config,
        serde_json::json!({"registrations": [{"label": "dns", "protocol": "udp", "address": "127.0.0.1",
            "port": 5300}]})
        .to_string(),
    )
    .unwrap();
    let mut watch = ns.command(bin("steerctl"));
    watch
        .args(["--pin-dir", ns.pin_dir().to_str().unwrap(), "watch", config.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut watch = watch.spawn().unwrap();
    let log = watch.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(log).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let wait_log = |text: &str| loop {
        let l = rx.recv_timeout(steer_tests::EVENT_LIMIT).unwrap_or_else(|_| panic!("watch never said {text:?}"));
        eprintln!("watch: {l}");
        if l.contains(text) {
            return;
        }
    };
    wait_log("watching");
    let mut servers = Servers::default();
    let to: SocketAddr = "127.0.0.15:5300".parse().unwrap();
    let mut latencies = Vec::new();
    for round in 0..5 {
        let server = servers.start(&ns, &["udp", "127.0.0.1:5300", "dns"]);
        // From bind() returning to watch's word that it inserted the socket.
        let bound = Instant::now();
        wait_log("socket(s) inserted");
        latencies.push(bound.elapsed());
        assert_eq!(steer_tests::udp_echo::request(&ns, to, "q").as_deref().ok(), Some("q"), "round {round}");
        servers.kill(server);
    }
    eprintln!("udp: bind returned -> steered (post_bind event, watch's backfill): {latencies:?}");
    let _ = watch.kill();
    let _ = watch.wait();
}

#[test]
fn register_follow_and_unregister_from_the_command_line() {
    if !require_feature(FEATURE, followable()) {
        return;
    }
    let ns = loaded("followcli");
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "85"]);
    let out = ns.steerctl_ok(&["register", "web", "tcp", "127.0.0.1", "8085", "--follow"]);
    assert!(out.contains("following tcp 127.0.0.1:8085 as web in the kernel"), "{out}");
    let mut servers = Servers::default();
    let first = servers.start(&ns, &["tcp", "127.0.0.1:8085", "first"]);
    assert_eq!(ns.enter(|| line("127.0.0.16:85".parse().unwrap())), Ok("first".to_string()));
    let status = ns.status();
    assert_eq!(status["followed"][0]["label"], "web", "{status}");
    assert_eq!(status["followed"][0]["held"], 1, "{status}");
    let explained = json(&ns.steerctl_ok(&["--json", "explain", "tcp", "127.0.0.16", "85"]));
    assert_eq!(explained["followed"][0]["target"]["port"], 8085, "{explained}");
    // With the server gone, explain says what will fill the slot.
    servers.kill(first);
    let explained = json(&ns.steerctl_ok(&["--json", "explain", "tcp", "127.0.0.16", "85"]));
    assert_eq!(explained["verdict"], "dropped", "{explained}");
    assert!(explained["reason"].as_str().unwrap().contains("the kernel follows it"), "{explained}");
    let first = servers.start(&ns, &["tcp", "127.0.0.1:8085", "first again"]);
    assert_eq!(ns.enter(|| line("127.0.0.16:85".parse().unwrap())), Ok("first again".to_string()));
    // Not following any more: a restarted server is not taken.
    ns.steerctl_ok(&["unregister", "web"]);
    servers.kill(first);
    servers.start(&ns, &["tcp", "127.0.0.1:8085", "second"]);
    assert!(ns.enter(|| line("127.0.0.16:85".parse().unwrap())).is_err());
    assert_eq!(ns.status()["followed"], serde_json::json!([]));
    // Bad input changes nothing.
    for (args, message) in [
        (vec!["--cgroup", "no/such/cgroup"], "no cgroup no/such/cgroup"),
        (vec!["--cgroup", "../x"], "without `.` or `..`"),
    ] {
        let mut all = vec!["register", "web", "tcp", "127.0.0.1", "8085", "--follow"];
        all.extend(args);
        let out = ns.steerctl(&all);
        assert!(!out.status.success() && stderr(&out).contains(message), "{all:?}: {}", stderr(&out));
    }
    let out = ns.steerctl(&["register", "web", "tcp", "127.0.0.1", "0", "--follow"]);
    assert!(!out.status.success() && stderr(&out).contains("port 0"), "{}", stderr(&out));
    assert_eq!(ns.status()["followed"], serde_json::json!([]));
    // unload takes the follow programs' links out of the cgroup with the rest.
    ns.steerctl_ok(&["register", "web", "tcp", "127.0.0.1", "8085", "--follow"]);
    let is_hook_link = |pin: &str| ["/follow_tcp_", "/follow_udp4_", "/follow_udp6_"].iter().any(|k| pin.contains(k));
    let links: Vec<String> = ns.pins().into_iter().filter(|p| is_hook_link(p)).collect();
    assert!(!links.is_empty(), "no follow link pinned: {:?}", ns.pins());
    // This state's own links: tests running beside it have theirs.
    let before: Vec<u64> = links.iter().map(|pin| pinned_link_id(&ns, pin)).collect();
    let all = follow_link_ids(&ns);
    assert!(before.iter().all(|id| all.contains(id)), "pinned follow links {before:?} not in the kernel: {all:?}");
    ns.steerctl_ok(&["unload"]);
    assert!(ns.pins().is_empty(), "pins left behind: {:?}", ns.pins());
    let after = follow_link_ids(&ns);
    assert!(before.iter().all(|id| !after.contains(id)), "follow links left in the kernel: {after:?}");
}

/// The id of the link pinned at `pin` (relative to the test's bpffs).
fn pinned_link_id(ns: &TestNs, pin: &str) -> u64 {
    let path = ns.bpffs.join(pin);
    let out = ns.command("bpftool").args(["--json", "link", "show", "pinned"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "bpftool link show pinned {}: {}", path.display(), stderr(&out));
    json(&String::from_utf8_lossy(&out.stdout))["id"].as_u64().unwrap()
}

/// Ids of the links attaching a follow program (steer_follow*) to a cgroup.
/// A detached link may live on a moment (the kernel frees it from a
/// workqueue), with cgroup_id 0: not counted.
fn follow_link_ids(ns: &TestNs) -> Vec<u64> {
    let out = ns.command("bpftool").args(["--json", "link", "show"]).output().unwrap();
    assert!(out.status.success(), "bpftool link show: {}", stderr(&out));
    let progs = ns.command("bpftool").args(["--json", "prog", "show"]).output().unwrap();
    let progs = json(&String::from_utf8_lossy(&progs.stdout));
    let follow_progs: Vec<u64> = (progs.as_array().unwrap().iter())
        .filter(|p| p["name"].as_str().is_some_and(|n| n.starts_with("steer_follow")))
        .filter_map(|p| p["id"].as_u64())
        .collect();
    (json(&String::from_utf8_lossy(&out.stdout)).as_array().unwrap().iter())
        .filter(|l| l["prog_id"].as_u64().is_some_and(|id| follow_progs.contains(&id)))
        .filter(|l| l["cgroup_id"].as_u64().is_some_and(|id| id != 0))
        .filter_map(|l| l["id"].as_u64())
        .collect()
}

#[test]
fn without_the_kernels_help_apply_says_so_and_watch_polls() {
    if followable() {
        // The fallback is for kernels before 5.15; here the kernel follows.
        return;
    }
    let ns = loaded("fallback");
    ns.steerctl_ok(&["bind", "web", "tcp", "127.0.0.0/8", "86"]);
    let out =
        apply(&ns, serde_json::json!([{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8086}]));
    assert!(out.contains("not followed in the kernel") && out.contains("Linux 5.15"), "{out}");
    let status = ns.status();
    assert!(status["follow_unsupported"].as_str().unwrap().contains("5.15"), "{status}");
    let out = ns.steerctl(&["register", "web", "tcp", "127.0.0.1", "8086", "--follow"]);
    assert!(!out.status.success() && stderr(&out).contains("5.15"), "{}", stderr(&out));
}
