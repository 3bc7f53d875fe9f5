//! Upgrading a loaded state to this build: from the previous release's
//! layout (this build's less one, made by that release's own steerctl,
//! built once from the local history by scripts/old-release.sh), in place,
//! under a client loop of real connections to a binding, a followed server
//! and a seed port, and the same from every older layout's last release;
//! failed and killed at each step and run again; the 0755 directories of
//! old releases; a state of a newer layout refused; and, within this
//! layout, the follow programs swapped on their links.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::Value;
use steer::{
    common::LAYOUT_VERSION,
    state::layouts::{self, LayoutVersion},
};
use steer_tests::{
    Count, TestNs, me, repo_root, stderr,
    strace::{self, Traced},
    udp_echo,
};

/// A release built by scripts/old-release.sh: its tools and the layout
/// its steerctl makes.
#[derive(Debug)]
struct Release {
    dir: PathBuf,
    layout: u32,
}

impl Release {
    fn layout(&self) -> &'static LayoutVersion {
        layouts::find(self.layout).expect("this build knows every older layout")
    }

    /// Whether it follows servers in the kernel (layout 4 on, Linux 5.15
    /// on): its state then has follow programs on cgroup links.
    fn follows(&self) -> bool {
        self.layout >= 4 && steer_tests::probe::kernel_at_least(5, 15)
    }

    /// Its steerctl, `--pin-dir` the test's state.
    fn steerctl(&self, ns: &TestNs, args: &[&str]) -> String {
        let out = self.run(ns, &["--pin-dir", ns.pin_dir().to_str().unwrap()], args);
        assert!(out.status.success(), "{} steerctl {args:?} failed: {}", self.layout().describe(), stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    }

    fn run(&self, ns: &TestNs, flags: &[&str], args: &[&str]) -> Output {
        ns.command(self.dir.join("bin/steerctl")).args(flags).args(args).output().unwrap()
    }
}

/// The previous release (old-release.sh's choice: $STEER_OLD_RELEASE, or
/// the last commit of the layout before this build's).
fn previous() -> &'static Release {
    release(None)
}

/// The last release of `layout` (old-release.sh --layout), or the previous
/// release. Built on the first call of the test run, a cached build after
/// that; one build at a time (they share the target directory).
fn release(layout: Option<u32>) -> &'static Release {
    static BUILT: Mutex<Vec<(Option<u32>, &'static Release)>> = Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, release)) = built.iter().find(|(l, _)| *l == layout) {
        return release;
    }
    let mut script = Command::new(repo_root().join("scripts/old-release.sh"));
    if let Some(layout) = layout {
        script.args(["--layout", &layout.to_string()]);
    }
    let out = script.current_dir(repo_root()).output().expect("running scripts/old-release.sh");
    assert!(out.status.success(), "scripts/old-release.sh {layout:?} failed: {}", stderr(&out));
    let dir = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    let made = std::fs::read_to_string(dir.join("layout")).unwrap_or_else(|e| panic!("{}/layout: {e}", dir.display()));
    let release: &'static Release = Box::leak(Box::new(Release { dir, layout: made.trim().parse().unwrap() }));
    built.push((layout, release));
    release
}

/// The previous release's steerctl, `--pin-dir` the test's state.
fn old(ns: &TestNs, args: &[&str]) -> String {
    previous().steerctl(ns, args)
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// What a state steers, as both releases print it: the bindings file, the
/// registered sockets (label, protocol, family, cookie, --no-reuseport),
/// the seed list and socket.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Steered {
    bindings: Value,
    sockets: BTreeSet<(String, String, String, u64, bool)>,
    ports: Value,
    seed_cookie: Value,
}

fn steered(run: impl Fn(&[&str]) -> String) -> Steered {
    let list = json(&run(&["--json", "list"]));
    let sockets = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let field = |k: &str| s[k].as_str().unwrap().to_string();
            (
                field("label"),
                field("protocol"),
                field("family"),
                s["cookie"].as_u64().unwrap(),
                s["no_reuseport"] == true,
            )
        })
        .collect();
    let status = json(&run(&["--json", "status"]));
    Steered {
        bindings: json(&run(&["--json", "bindings"])),
        sockets,
        ports: status["ports"].clone(),
        seed_cookie: status["socket"]["cookie"].clone(),
    }
}

/// A state made by the previous release, steering real servers: web (TCP,
/// 127.0.0.0/8 port 80), api (TCP over IPv6, --no-reuseport), dns (UDP,
/// port 53), idle (bound, no socket: a miss), the seed list (ports 7 and 77
/// to an ncat echo), and, when it follows servers, front (127.0.0.0/8 port
/// 81): a test-server on 127.0.0.1:8081 the kernel follows. Returns what it
/// steers, as the old steerctl says.
fn old_state(ns: &mut TestNs) -> Steered {
    release_state(ns, previous())
}

/// `old_state`, made by `release`.
fn release_state(ns: &mut TestNs, release: &Release) -> Steered {
    let old = |ns: &TestNs, args: &[&str]| release.steerctl(ns, args);
    old(ns, &["load"]);
    old(ns, &["attach"]);
    ns.add_local_route("2001:db8::/32");
    let web = ns.named_tcp_server("127.0.0.1:0", "web");
    let api = ns.named_tcp_server("[::1]:0", "api");
    // The echo answers from its own port: the binding's.
    let dns = udp_echo::spawn(ns, "127.0.0.1:53");
    let pid = me();
    for (label, proto, addr, extra) in
        [("web", "tcp", web, None), ("api", "tcp", api, Some("--no-reuseport")), ("dns", "udp", dns, None)]
    {
        let (ip, port) = (addr.ip().to_string(), addr.port().to_string());
        let mut args = vec!["register-pid", label, &pid, proto, &ip, &port];
        args.extend(extra);
        old(ns, &args);
    }
    old(ns, &["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    old(ns, &["bind", "api", "tcp", "2001:db8::/32", "443"]);
    old(ns, &["bind", "dns", "udp", "127.0.0.0/8", "53"]);
    old(ns, &["bind", "idle", "tcp", "127.0.0.0/8", "8080"]);
    if release.follows() {
        front_server(ns, "front");
        old(ns, &["register", "--follow", "front", "tcp", "127.0.0.1", "8081"]);
        old(ns, &["bind", "front", "tcp", "127.0.0.0/8", "81"]);
        assert_eq!(ns.first_line("127.0.0.81:81".parse().unwrap()).unwrap(), "front");
    }
    let echo = ns.start_ncat_echo();
    old(ns, &["socket", "set", "--pid", &echo.to_string()]);
    old(ns, &["ports", "add", "7", "77"]);
    // Counters in every map that has them (so every copy is a write).
    assert_eq!(ns.first_line("127.0.0.80:80".parse().unwrap()).unwrap(), "web");
    assert_eq!(ns.echo(7, "seed").unwrap(), "seed");
    assert_eq!(udp_echo::request(ns, "127.0.0.53:53".parse().unwrap(), "dns").unwrap(), "dns");
    steered(|args| old(ns, args))
}

/// A test-server on 127.0.0.1:8081 answering `name`; its pid once it listens.
fn front_server(ns: &mut TestNs, name: &str) -> i32 {
    let mut cmd = ns.command(steer_tests::bin("test-server"));
    cmd.args(["tcp", "127.0.0.1:8081", name]);
    ns.spawn_ready(cmd, "listening") as i32
}

/// The programs of the follow links (cgroup links) pinned in the state.
fn follow_programs(ns: &TestNs) -> BTreeSet<u64> {
    let mut ids = BTreeSet::new();
    for entry in std::fs::read_dir(ns.pin_dir()).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // follow_tcp_N, follow_udp4_N, follow_udp6_N (not the follow_* maps).
        if name.starts_with("follow_tcp_") || name.starts_with("follow_udp") {
            ids.insert(link_program(&entry.path()));
        }
    }
    ids
}

fn link_program(pin: &Path) -> u64 {
    let out = Command::new("bpftool").args(["--json", "link", "show", "pinned"]).arg(pin).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    json(&String::from_utf8(out.stdout).unwrap())["prog_id"].as_u64().unwrap()
}

/// How many links of the system run one of `programs`.
fn links_running(programs: &BTreeSet<u64>) -> usize {
    let out = Command::new("bpftool").args(["--json", "link", "show"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let links = json(&String::from_utf8(out.stdout).unwrap());
    links.as_array().unwrap().iter().filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p))).count()
}

/// This build's steerctl; panics with its stderr unless it succeeds.
fn new(ns: &TestNs, args: &[&str]) -> String {
    ns.steerctl_ok(args)
}

/// Checks the state serves what `before` said, through real connections
/// and datagrams, and that this build reads back the same.
fn serves(ns: &TestNs, before: &Steered) {
    serves_as(ns, before, previous());
}

/// `serves`, for a state `release` made.
fn serves_as(ns: &TestNs, before: &Steered, release: &Release) {
    assert_eq!(steered(|args| new(ns, args)), *before);
    assert_eq!(ns.first_line("127.0.0.80:80".parse().unwrap()).unwrap(), "web");
    assert_eq!(ns.first_line("[2001:db8::1]:443".parse().unwrap()).unwrap(), "api");
    assert_eq!(udp_echo::request(ns, "127.0.0.53:53".parse().unwrap(), "dns").unwrap(), "dns");
    assert_eq!(ns.echo(7, "seven").unwrap(), "seven");
    assert_eq!(ns.echo(77, "seventy-seven").unwrap(), "seventy-seven");
    if release.follows() {
        assert_eq!(ns.first_line("127.0.0.81:81".parse().unwrap()).unwrap(), "front");
    }
    ns.assert_refused(8080);
}

/// One state directory: no upgrade left over beside it.
fn one_state(ns: &TestNs) {
    let dirs: Vec<String> = ns.pins().into_iter().filter(|p| !p.contains('/')).collect();
    assert_eq!(dirs, ["steer"], "{:?}", ns.pins());
}

/// What the client loop connects to: an address, the line it sends (if
/// any), the line it expects back.
type Target = (&'static str, Option<&'static str>, &'static str);

/// The binding 127.0.0.80:80 (the web server says "web"), the seed port 7
/// (an echo), and the followed server at 127.0.0.81:81 when there is one.
fn targets() -> &'static [Target] {
    targets_of(previous())
}

fn targets_of(release: &Release) -> &'static [Target] {
    const ALL: [Target; 3] =
        [("127.0.0.80:80", None, "web"), ("127.0.0.1:7", Some("x"), "x"), ("127.0.0.81:81", None, "front")];
    if release.follows() { &ALL } else { &ALL[..2] }
}

/// Connects in a loop to each target in turn, each time a connect and one
/// line, counting successes and failures until stopped.
struct Clients {
    done: Arc<AtomicBool>,
    ok: Arc<Count>,
    thread: Option<std::thread::JoinHandle<Vec<String>>>,
}

impl Clients {
    fn start(ns: &Arc<TestNs>, targets: &'static [Target]) -> Self {
        let (done, ok) = (Arc::new(AtomicBool::new(false)), Arc::new(Count::default()));
        let thread = {
            let (ns, done, ok) = (ns.clone(), done.clone(), ok.clone());
            std::thread::spawn(move || {
                ns.enter(|| {
                    let mut errors = Vec::new();
                    // Bounded: 200,000 connections or until stopped.
                    for i in 0..200_000usize {
                        if done.load(Ordering::SeqCst) {
                            break;
                        }
                        let (addr, send, expect) = targets[i % targets.len()];
                        match line(addr, send) {
                            Ok(l) if l == expect => ok.add(),
                            other => errors.push(format!("connection {i} to {addr}: {other:?}")),
                        }
                    }
                    errors
                })
            })
        };
        let clients = Self { done, ok, thread: Some(thread) };
        clients.ok.wait_for(20, "connections before the upgrade");
        clients
    }

    /// Waits for a few more connections, stops, and returns (ok, failures).
    fn stop(mut self) -> (u64, Vec<String>) {
        let now = self.ok.get();
        self.ok.wait_for(now + 20, "connections after the upgrade");
        self.done.store(true, Ordering::SeqCst);
        let errors = self.thread.take().unwrap().join().unwrap();
        (self.ok.get(), errors)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
    }
}

/// Connects, sends `send` (a line) if given, reads one line.
fn line(addr: &str, send: Option<&str>) -> std::io::Result<String> {
    let addr: SocketAddr = addr.parse().unwrap();
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    if let Some(text) = send {
        stream.write_all(format!("{text}\n").as_bytes())?;
    }
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply)?;
    Ok(reply.trim_end().to_string())
}

#[test]
fn the_previous_releases_state_is_migrated_in_place_without_a_refused_connection() {
    migrated_in_place(previous(), "upgrade-prev");
}

/// A host that skipped releases: the last release of each layout before
/// the previous one (old-release.sh --layout N), upgraded straight to this
/// build's layout the same way.
#[test]
fn every_older_layouts_last_release_is_migrated_in_place_too() {
    let older = layouts::HISTORY.iter().map(|l| l.version).filter(|v| *v < previous().layout);
    for layout in older {
        let release = release(Some(layout));
        assert_eq!(release.layout, layout, "{release:?}");
        migrated_in_place(release, &format!("upgrade-from-{layout}"));
    }
}

/// A state `release` made (`release_state`), upgraded by this build under
/// a client loop: not one connection fails, the state is this layout's,
/// steering the same bindings to the same sockets (by cookie) on the same
/// link, with its counters, and follows servers with this build's programs.
fn migrated_in_place(release: &Release, name: &str) {
    let old = |ns: &TestNs, args: &[&str]| release.steerctl(ns, args);
    let prev = release.layout();
    let mut ns = TestNs::new(name);
    let before = release_state(&mut ns, release);
    let old_status = json(&old(&ns, &["--json", "status"]));
    let old_metrics = json(&old(&ns, &["--json", "metrics"]));
    let old_follow_programs = follow_programs(&ns);
    let (labels, sockets) = if release.follows() { (5, 4) } else { (4, 3) };
    // This build reads the old state, names its layout and what upgrade does.
    let status = ns.status();
    assert_eq!(status["layout"]["version"], prev.version, "{status}");
    assert_eq!(status["layout"]["name"], prev.name);
    assert_eq!(status["layout"]["upgrade"], "migrate");
    assert_eq!((status["labels"].as_u64(), status["bindings"].as_u64()), (Some(labels), Some(labels)), "{status}");
    assert_eq!(status["registered_sockets"], sockets);
    let table = new(&ns, &["status"]);
    let says = format!(
        "{} ({}): `steerctl upgrade` migrates it to {}",
        prev.version,
        prev.name,
        layouts::current().describe()
    );
    assert!(table.contains(&says), "{table}");
    // Writes are refused, saying what to do; nothing changes.
    let pins = ns.pins();
    let refused = ns.steerctl(&["bind", "web", "tcp", "10.0.0.0/8", "80"]);
    assert!(!refused.status.success());
    let err = stderr(&refused);
    assert!(
        err.contains(&format!("has {}, an older steer's", prev.describe())) && err.contains("run `steerctl upgrade`"),
        "{err}"
    );
    assert_eq!(ns.pins(), pins);

    let ns = Arc::new(ns);
    let clients = Clients::start(&ns, targets_of(release));
    let out = new(&ns, &["upgrade"]);
    let (ok, errors) = clients.stop();
    eprintln!("upgrade from {}: {ok} connections during it, {} failed", prev.describe(), errors.len());
    assert!(errors.is_empty(), "connections failed during the upgrade ({ok} ok): {errors:?}");
    let from_to = format!("from {} to {}", prev.describe(), layouts::current().describe());
    assert!(out.contains("migrated") && out.contains(&from_to), "{out}");
    let carried =
        format!("{labels} labels, {labels} bindings, {sockets} registered sockets, 2 seed ports, the seed socket");
    assert!(out.contains(&carried), "{out}");
    if release.follows() {
        assert!(out.contains("1 follow links"), "{out}");
    }

    one_state(&ns);
    serves_as(&ns, &before, release);
    let status = ns.status();
    assert_eq!(status["layout"]["version"], LAYOUT_VERSION);
    assert_eq!(status["layout_version"], LAYOUT_VERSION);
    assert_eq!(status["layout"]["upgrade"], "nothing");
    let table = new(&ns, &["status"]);
    assert!(
        table.contains(&format!("{}: this steerctl's", layouts::current().describe().trim_start_matches("layout "))),
        "{table}"
    );
    // The same link, now running this build's program; counters carried.
    assert_eq!(status["link"]["id"], old_status["link"]["id"]);
    assert_eq!(status["link"]["program_id"], status["program"]["id"]);
    assert_ne!(status["program"]["id"], old_status["program"]["id"]);
    let metrics = json(&new(&ns, &["--json", "metrics"]));
    let lookups = |m: &Value, label: &str| -> u64 {
        m["destinations"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["label"] == label)
            .map(|d| d["lookups"].as_u64().unwrap())
            .sum()
    };
    assert!(lookups(&metrics, "web") > lookups(&old_metrics, "web"), "{old_metrics} -> {metrics}");
    let mut ns = Arc::try_unwrap(ns).ok().expect("the clients are done");
    if release.follows() {
        // The followed registration and its cgroup link came along: new
        // follow programs on it, the old ones detached.
        assert_eq!(status["followed"].as_array().map(Vec::len), Some(1), "{status}");
        let now = follow_programs(&ns);
        assert_eq!(now.len(), old_follow_programs.len());
        assert!(now.is_disjoint(&old_follow_programs), "{now:?} {old_follow_programs:?}");
        assert_eq!(links_running(&old_follow_programs), 0, "the old state's follow links are still attached");
        // This build's follow program puts a restarted server in, from its listen().
        let front = status["followed"][0]["held"].as_u64();
        assert_eq!(front, Some(1), "{status}");
        let pid = front_pid(&ns);
        kill(pid);
        front_server(&mut ns, "front-2");
        answers_at(&ns, "127.0.0.81:81", "front-2");
    }
    // And it is a state of this build: writes work, and upgrade has nothing to do.
    new(&ns, &["bind", "web", "tcp", "10.0.0.0/8", "80"]);
    assert!(new(&ns, &["upgrade", "--if-needed"]).starts_with("up to date"));
}

/// The pid of the process listening on 127.0.0.1:8081 (the followed server).
fn front_pid(ns: &TestNs) -> i32 {
    let out = ns.command("ss").args(["-Htlnp", "sport = :8081"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let pid = text.split("pid=").nth(1).and_then(|r| r.split(',').next()).unwrap_or_else(|| panic!("ss: {text}"));
    pid.parse().unwrap()
}

/// Waits until `addr` answers `name` (the kernel put a new server in).
fn answers_at(ns: &TestNs, addr: &str, name: &str) {
    steer_tests::wait_until(&format!("{name} answers at {addr}"), Duration::from_secs(10), || {
        ns.first_line(addr.parse().unwrap()).is_ok_and(|l| l == name)
    });
}

/// Kill points of `upgrade` on a fixture like `old_state`'s: before each
/// step it takes (crash_points: map writes, pins, file calls, just after
/// each rename), and at the switch (BPF_LINK_UPDATE) and just after it.
fn upgrade_kill_points() -> Vec<(String, usize)> {
    let mut ns = TestNs::new("upgrade-trace");
    old_state(&mut ns);
    let calls = Traced::pin_dir(&ns).calls("bpf,mkdirat,renameat2,unlink,unlinkat,rmdir,fchmod", &["upgrade"]);
    let mut at: BTreeSet<usize> = strace::crash_points(&calls).into_iter().collect();
    for (i, call) in calls.iter().enumerate() {
        if call.starts_with("bpf(BPF_LINK_UPDATE") {
            at.extend([i, i + 1]);
        }
    }
    at.into_iter().filter(|i| *i < calls.len()).map(|i| strace::nth_of_its_name(&calls, i)).collect()
}

#[test]
fn an_upgrade_killed_at_any_step_is_finished_by_running_it_again() {
    let points = upgrade_kill_points();
    assert!(points.len() >= 20, "{points:?}");
    let (mut connections, mut switched) = (0, 0);
    for (syscall, index) in &points {
        let mut ns = TestNs::new("upgrade-kill");
        let before = old_state(&mut ns);
        let old_follow_programs = follow_programs(&ns);
        let ns = Arc::new(ns);
        let clients = Clients::start(&ns, targets());
        Traced::pin_dir(&ns).killed_at(syscall, *index, &["upgrade"]);
        // Whichever state serves now is whole.
        assert_eq!(ns.first_line("127.0.0.80:80".parse().unwrap()).unwrap(), "web", "killed at {syscall} {index}");
        assert_eq!(ns.echo(77, "after the kill").unwrap(), "after the kill");
        if ns.bpffs.join("steer-upgrade").exists() {
            // While an upgrade is half done nothing may write to the old state.
            let refused = ns.steerctl(&["bind", "web", "tcp", "10.0.0.0/8", "80"]);
            assert!(!refused.status.success(), "a bind went through at {syscall} {index}");
            if json(&new(&ns, &["--json", "status"]))["layout"]["upgrade"] == "finish" {
                switched += 1;
            }
        }
        let out = new(&ns, &["upgrade"]);
        let (ok, errors) = clients.stop();
        connections += ok;
        assert!(errors.is_empty(), "killed at {syscall} {index}, then run again: {errors:?}\n{out}");
        one_state(&ns);
        serves(&ns, &before);
        assert_eq!(ns.status()["layout"]["upgrade"], "nothing", "killed at {syscall} {index}");
        // One follow link per hook, this build's: none left over from either state.
        assert_eq!(follow_programs(&ns).len(), old_follow_programs.len(), "killed at {syscall} {index}");
        assert_eq!(links_running(&old_follow_programs), 0, "killed at {syscall} {index}");
    }
    eprintln!(
        "upgrade killed at {} points ({switched} after the switch) and run again: {connections} connections, none failed",
        points.len()
    );
    assert!(switched > 0, "no kill point fell after the switch: {points:?}");
}

#[test]
fn an_upgrade_that_fails_half_way_leaves_the_old_state_serving_and_nothing_else() {
    // Where to fail: a map write in the middle of the copies, the first pin,
    // and the switch itself (BPF_LINK_UPDATE), each refused by the kernel
    // (strace injects the error; the call is not made).
    let calls = {
        let mut ns = TestNs::new("upgrade-fail-trace");
        old_state(&mut ns);
        Traced::pin_dir(&ns).calls("bpf", &["upgrade"])
    };
    let find = |what: &str, nth: usize| {
        let at = calls.iter().enumerate().filter(|(_, c)| c.starts_with(what)).map(|(i, _)| i).nth(nth);
        strace::nth_of_its_name(&calls, at.unwrap_or_else(|| panic!("no {what} in {calls:?}")))
    };
    let updates = calls.iter().filter(|c| c.starts_with("bpf(BPF_MAP_UPDATE_ELEM")).count();
    for (what, (syscall, index)) in [
        ("a map write half way", find("bpf(BPF_MAP_UPDATE_ELEM", updates / 2)),
        ("a pin", find("bpf(BPF_OBJ_PIN", 0)),
        ("the switch", find("bpf(BPF_LINK_UPDATE", 0)),
    ] {
        let mut ns = TestNs::new("upgrade-fail");
        let before = old_state(&mut ns);
        let old_status = ns.status();
        let old_follow_programs = follow_programs(&ns);
        let pins = ns.pins();
        let ns = Arc::new(ns);
        let clients = Clients::start(&ns, targets());
        let out = Traced::pin_dir(&ns).failed_at(&syscall, index, "EPERM", &["upgrade"]);
        let (ok, errors) = clients.stop();
        assert!(!out.status.success(), "upgrade went through with {what} failing");
        assert!(errors.is_empty(), "{what} failed: {ok} ok, {errors:?}");
        // The old state, as it was, serves; nothing of the new one is left.
        assert_eq!(ns.pins(), pins, "{what} failed: {}", stderr(&out));
        let status = ns.status();
        assert_eq!(status["layout"]["version"], previous().layout, "{what}");
        assert_eq!(status["program"]["id"], old_status["program"]["id"], "{what}");
        assert_eq!(status["link"]["program_id"], old_status["program"]["id"], "{what}");
        assert_eq!(follow_programs(&ns), old_follow_programs, "{what}");
        assert_eq!(links_running(&old_follow_programs), old_follow_programs.len(), "{what}");
        assert_eq!(steered(|args| old(&ns, args)), before, "{what}");
        // Run again, it goes through.
        let out = new(&ns, &["upgrade"]);
        assert!(out.contains("migrated"), "{what}: {out}");
        one_state(&ns);
        serves(&ns, &before);
        eprintln!("{what} ({syscall} {index}) failed: the old state served, {ok} connections");
    }
}

#[test]
fn old_releases_0755_directories_are_closed_by_upgrade_and_a_grown_record_is_carried_whole() {
    let ns = TestNs::new("upgrade-0755");
    let bpffs = ns.bpffs.to_str().unwrap().to_string();
    let flags = ["--bpffs", bpffs.as_str()];
    let old_ok = |args: &[&str]| {
        let out = previous().run(&ns, &flags, args);
        assert!(out.status.success(), "old steerctl {args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    old_ok(&["load"]);
    old_ok(&["attach"]);
    // 1,500 bindings: the old steerctl grows its record past 1,024.
    let bindings: Vec<Value> = (0..1500u32)
        .map(|i| serde_json::json!({"label": format!("l{}", i % 7), "protocol": "tcp", "prefix": format!("10.{}.{}.0/24", i / 256, i % 256), "port": 80}))
        .collect();
    let file = ns.bpffs.parent().unwrap().join("bindings.json");
    std::fs::write(&file, serde_json::json!({ "bindings": bindings }).to_string()).unwrap();
    old_ok(&["load-bindings", file.to_str().unwrap()]);
    let before = json(&old_ok(&["--json", "bindings"]));
    // Releases before b2bce37 made their directories 0755.
    let base = ns.bpffs.join("steer");
    let dir = base.join(ns.inode().to_string());
    for d in [&base, &dir] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let run = |args: &[&str]| ns.run("steerctl", &[&flags[..], args].concat());
    let status = run(&["status"]);
    assert!(!status.status.success());
    assert!(
        stderr(&status).contains("mode 0755") && stderr(&status).contains("`steerctl upgrade` closes it"),
        "{}",
        stderr(&status)
    );
    let out = run(&["upgrade"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    for d in [&base, &dir] {
        assert!(text.contains(&format!("made {} 0700 (it was 0755", d.display())), "{text}");
        assert_eq!(std::fs::metadata(d).unwrap().permissions().mode() & 0o7777, 0o700);
    }
    assert!(text.contains("1500 bindings"), "{text}");
    let after = run(&["--json", "bindings"]);
    assert!(after.status.success(), "{}", stderr(&after));
    assert_eq!(json(&String::from_utf8(after.stdout).unwrap()), before);
    // The grown record kept its size: a bind adds to it without a replacement.
    let bind = run(&["bind", "l0", "tcp", "192.0.2.0/24", "80"]);
    assert!(bind.status.success(), "{}", stderr(&bind));
}

#[test]
fn a_state_of_a_newer_layout_is_refused_by_every_command_and_left_alone() {
    use aya::maps::{Array, Map, MapData};
    use steer::common::StateMeta;

    let ns = TestNs::new("upgrade-newer");
    new(&ns, &["load"]);
    new(&ns, &["attach"]);
    new(&ns, &["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    // What a steer of the next layout would have left.
    let meta_pin = ns.pin_dir().join("steer_meta");
    let mut meta: Array<_, StateMeta> = Array::try_from(Map::Array(MapData::from_pin(&meta_pin).unwrap())).unwrap();
    let mut value = meta.get(&0, 0).unwrap();
    value.layout_version = LAYOUT_VERSION + 1;
    meta.set(0, value, 0).unwrap();
    let pins = ns.pins();
    for args in [
        &["status"][..],
        &["bindings"],
        &["list"],
        &["metrics"],
        &["bind", "web", "tcp", "10.0.0.0/8", "80"],
        &["ports", "add", "7"],
        &["upgrade"],
        &["upgrade", "--if-needed"],
        &["detach"],
        &["unload"],
        &["load", "--if-needed"],
    ] {
        let out = ns.steerctl(args);
        assert!(!out.status.success(), "{args:?} went through");
        let err = stderr(&out);
        let newer = format!("has layout {}, made by a newer steer", LAYOUT_VERSION + 1);
        assert!(err.contains(&newer) && err.contains(&layouts::current().describe()), "{args:?}: {err}");
    }
    assert_eq!(ns.pins(), pins, "a refused command changed the state");
    assert_eq!(meta.get(&0, 0).unwrap(), value);
    assert_eq!(
        ns.first_line("127.0.0.80:80".parse().unwrap()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused)
    );
}

/// An ncat in the namespace answering every connection to 127.0.0.1:8090
/// with `name`; returns its pid once it listens.
fn ncat_server(ns: &mut TestNs, name: &str) -> i32 {
    let mut cmd = ns.command("ncat");
    cmd.args(["-v", "-4kl", "127.0.0.1", "8090", "-c", &format!("echo {name}")]);
    ns.spawn_ready(cmd, "Listening on 127.0.0.1:8090") as i32
}

fn kill(pid: i32) {
    let pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    // Reaped by the TestNs, which spawned it; gone from the map when closed.
    let _ = nix::sys::wait::waitpid(pid, None);
}

/// Who answers at the binding, once the kernel put the new server in.
fn answers(ns: &TestNs, name: &str) {
    steer_tests::wait_until(&format!("{name} answers at 127.0.0.80:80"), Duration::from_secs(10), || {
        ns.first_line("127.0.0.80:80".parse().unwrap()).is_ok_and(|l| l == name)
    });
}

#[test]
fn an_upgrade_within_the_layout_swaps_the_follow_programs_too() {
    if !steer_tests::require_feature(
        "following servers in the kernel (Linux 5.15)",
        steer_tests::probe::kernel_at_least(5, 15),
    ) {
        return;
    }
    let mut ns = TestNs::new("upgrade-follow");
    new(&ns, &["load"]);
    new(&ns, &["attach"]);
    let first = ncat_server(&mut ns, "first");
    new(&ns, &["register", "--follow", "web", "tcp", "127.0.0.1", "8090"]);
    new(&ns, &["bind", "web", "tcp", "127.0.0.0/8", "80"]);
    answers(&ns, "first");
    let follow_link = ns.pin_dir().join("follow_tcp_0");
    let program_of = |pin: &Path| {
        let out = Command::new("bpftool").args(["--json", "link", "show", "pinned"]).arg(pin).output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        json(&String::from_utf8(out.stdout).unwrap())["prog_id"].as_u64().unwrap()
    };
    let before = program_of(&follow_link);
    let out = new(&ns, &["upgrade"]);
    assert!(out.contains("1 follow link(s) switched"), "{out}");
    let swapped = program_of(&follow_link);
    assert_ne!(swapped, before, "the follow link still runs the old program");
    // The new program follows: a restarted server is in the slot from its listen().
    kill(first);
    let second = ncat_server(&mut ns, "second");
    answers(&ns, "second");
    // A rebuild (the path an older layout takes) attaches follow programs
    // for the new state, under traffic, and the old ones go.
    const SECOND: [Target; 1] = [("127.0.0.80:80", None, "second")];
    let ns = Arc::new(ns);
    let clients = Clients::start(&ns, &SECOND);
    let out = new(&ns, &["upgrade", "--rebuild"]);
    let (ok, errors) = clients.stop();
    assert!(errors.is_empty(), "{ok} ok: {errors:?}");
    assert!(out.contains("1 follow links"), "{out}");
    one_state(&ns);
    let rebuilt = program_of(&follow_link);
    assert_ne!(rebuilt, swapped);
    let links = Command::new("bpftool").args(["--json", "link", "show"]).output().unwrap();
    let follow_programs = json(&String::from_utf8(links.stdout).unwrap())
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["prog_id"] == swapped)
        .count();
    assert_eq!(follow_programs, 0, "the old state's follow link is still attached");
    let mut ns = Arc::try_unwrap(ns).ok().expect("the clients are done");
    kill(second);
    ncat_server(&mut ns, "third");
    answers(&ns, "third");
}
