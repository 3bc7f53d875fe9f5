//! Safe on a shared host: an unprivileged user (nobody, through setpriv)
//! can neither freeze, take over, redirect nor hide steer's state; stale
//! state never leaks into a new namespace; killed writes leave state the
//! next command accepts; owners are found without taking anyone's fds;
//! and bad input gets a short message that says what to do. Each test
//! asserts the refusal and that steering kept working.

use std::{
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use steer_tests::{
    EVENT_LIMIT, TestNs, bin, stderr,
    strace::{self, Traced},
    wait_exit, wait_for_line, wait_until,
};

/// Loads with the default layout under the test's bpffs (so BPFFS/steer is
/// steer's to make), steers port 7 to ncat, and returns the state dir.
fn steered(ns: &mut TestNs) -> PathBuf {
    let ok = |ns: &TestNs, args: &[&str]| {
        let out = steerctl(ns, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    ok(ns, &["load"]);
    ok(ns, &["attach"]);
    ok(ns, &["ports", "add", "7"]);
    let ncat = ns.start_ncat_echo();
    ok(ns, &["socket", "set", "--pid", &ncat.to_string()]);
    assert_eq!(ns.echo(7, "up").unwrap(), "up");
    ns.bpffs.join("steer").join(ns.inode().to_string())
}

/// `steerctl --bpffs <the test's bpffs> ARGS` inside the namespace.
fn steerctl(ns: &TestNs, args: &[&str]) -> Output {
    ns.command(bin("steerctl")).arg("--bpffs").arg(&ns.bpffs).args(args).output().unwrap()
}

/// A command run as nobody, with no capabilities, inside the namespace.
fn as_nobody(ns: &TestNs, program: &str, args: &[&str]) -> Output {
    ns.command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(program)
        .args(args)
        .output()
        .unwrap()
}

fn still_steered(ns: &TestNs) {
    assert_eq!(ns.echo(7, "still").unwrap(), "still", "steering changed");
}

#[test]
fn nobody_cannot_take_the_lock_and_a_held_lock_names_its_holder() {
    let mut ns = TestNs::new("lockdos");
    let dir = steered(&mut ns);
    // The lock is the state directory: root's, 0700.
    let out = as_nobody(&ns, "flock", &["--exclusive", "--nonblock", dir.to_str().unwrap(), "true"]);
    assert!(!out.status.success(), "nobody locked {}", dir.display());
    assert!(stderr(&out).contains("Permission denied"), "{}", stderr(&out));
    let parent = dir.parent().unwrap();
    let out = as_nobody(&ns, "flock", &["--exclusive", "--nonblock", parent.to_str().unwrap(), "true"]);
    assert!(!out.status.success(), "nobody locked {}", parent.display());
    // Nobody holds it: a reader that does not wait at all gets it.
    let out = steerctl(&ns, &["--wait", "0", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // A root process holding it: a writer waits, says who, gives up at
    // --wait. flock says when it holds the lock (it runs the command only
    // then), and holds it until this test closes the command's stdin.
    let mut holder = ns
        .command("flock")
        .args(["--exclusive", dir.to_str().unwrap(), "sh", "-c", "echo holding >&2; exec cat >/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let holder_pid = holder.id();
    let release = holder.stdin.take().unwrap();
    wait_for_line(holder.stderr.take().unwrap(), "holding", "flock");
    // The wait exercised: --wait 1.5 gives up after 1.5 s, not at the
    // default 30 s (the holder holds it for as long as the test likes).
    let start = Instant::now();
    let out = steerctl(&ns, &["--wait", "1.5", "ports", "add", "8"]);
    let waited = start.elapsed();
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("waiting for the lock on {}, held by pid {holder_pid} (flock)", dir.display())),
        "{err}"
    );
    assert!(err.contains("gave up after 1.5s waiting for the lock") && err.contains("--wait SECONDS"), "{err}");
    assert!(waited >= Duration::from_millis(1500) && waited < Duration::from_secs(10), "{waited:?}");
    // Once it is released (the holder has exited), the same command goes
    // through without waiting.
    drop(release);
    assert!(wait_exit(&mut holder, EVENT_LIMIT).success());
    let out = steerctl(&ns, &["--wait", "0", "ports", "add", "8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    still_steered(&ns);
}

#[test]
fn nobody_cannot_take_over_the_state_directory() {
    let mut ns = TestNs::new("takeover");
    let bpffs = ns.bpffs.clone();
    let root = bpffs.join("steer");
    // bpffs's root is 1777, as `mount -t bpf bpf DIR` makes it.
    let out = as_nobody(&ns, "mkdir", &[root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steerctl(&ns, &["load"]);
    assert!(!out.status.success(), "load used a directory nobody made");
    let err = stderr(&out);
    assert!(err.contains(&format!("{} (owner uid 65534, mode 0755)", root.display())), "{err}");
    assert!(err.contains("rm -r"), "{err}");
    assert_eq!(ns.pins(), ["steer"], "load left something behind");
    std::fs::remove_dir(&root).unwrap();

    // A symlink in its place: refused, and nothing made where it points.
    let elsewhere = bpffs.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let out = as_nobody(&ns, "ln", &["-s", elsewhere.to_str().unwrap(), root.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steerctl(&ns, &["load"]);
    assert!(stderr(&out).contains("is a symlink or not a directory"), "{}", stderr(&out));
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    std::fs::remove_file(&root).unwrap();
    std::fs::remove_dir(&elsewhere).unwrap();

    // Made by steer, nobody can rename, delete or read anything in it.
    let dir = steered(&mut ns);
    let meta = std::fs::metadata(&root).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777, 0o700);
    let moved = bpffs.join("moved");
    for (program, args) in [
        ("mv", [root.to_str().unwrap(), moved.to_str().unwrap()]),
        ("rm", ["-rf", dir.to_str().unwrap()]),
        ("ls", ["-a", dir.to_str().unwrap()]),
    ] {
        let out = as_nobody(&ns, program, &args);
        assert!(!out.status.success(), "nobody ran {program} {args:?}");
    }
    assert!(dir.join("steer_dispatch_link").exists());
    assert_eq!(ns.status_at(&dir)["link"]["netns_inode"].as_u64(), Some(ns.inode()));
    still_steered(&ns);
    // unload keeps BPFFS/steer, root's, so the name stays taken.
    assert!(steerctl(&ns, &["unload"]).status.success());
    assert_eq!(ns.pins(), ["steer"]);
    let out = as_nobody(&ns, "mkdir", &[dir.to_str().unwrap()]);
    assert!(!out.status.success());
}

trait StatusAt {
    fn status_at(&self, dir: &Path) -> serde_json::Value;
}

impl StatusAt for TestNs {
    fn status_at(&self, dir: &Path) -> serde_json::Value {
        let out = self.run("steerctl", &["--pin-dir", dir.to_str().unwrap(), "--json", "status"]);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

#[test]
fn a_dead_namespaces_state_is_stale_refused_and_collected() {
    let survivor = TestNs::new("survivor");
    let bpffs = survivor.bpffs.to_str().unwrap().to_string();
    let dead_dir;
    {
        // A namespace that dies, its state in the survivor's bpffs.
        let doomed = TestNs::new("doomed");
        let netns = format!("/run/netns/{}", doomed.name);
        let run = |args: &[&str]| {
            let out =
                Command::new(bin("steerctl")).args(["--netns", &netns, "--bpffs", &bpffs]).args(args).output().unwrap();
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        };
        run(&["load"]);
        run(&["attach"]);
        run(&["bind", "old", "tcp", "127.0.0.0/8", "0"]);
        dead_dir = survivor.bpffs.join("steer").join(doomed.inode().to_string());
    }
    // As a namespace reusing its inode would see it.
    let pin_dir = dead_dir.to_str().unwrap();
    let status = survivor.status_at(&dead_dir);
    let stale = status["stale"].as_str().unwrap_or_default().to_string();
    assert!(stale.contains("is stale"), "{status}");
    for args in [&["bind", "x", "tcp", "127.0.0.1", "1"][..], &["attach"], &["ports", "add", "9"]] {
        let out = survivor.run("steerctl", &[&["--pin-dir", pin_dir][..], args].concat());
        assert!(!out.status.success(), "{args:?} on stale state");
        assert!(stderr(&out).contains("steerctl gc"), "{args:?}: {}", stderr(&out));
    }
    // The survivor's own traffic is untouched by the old bindings.
    survivor.assert_refused(80);
    let gc = |dry: bool| {
        let mut cmd = Command::new(bin("steerctl"));
        cmd.args(["--bpffs", &bpffs, "--json", "gc"]);
        if dry {
            cmd.arg("--dry-run");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    // The kernel detaches a dead namespace's links once it has cleaned it
    // up, in the background: nothing announces it, so poll for it.
    wait_until("the dead namespace's state listed as stale", Duration::from_secs(10), || {
        gc(true)[0]["stale"].is_string()
    });
    let listed = gc(true);
    assert_eq!(listed[0]["dir"], pin_dir, "{listed}");
    assert!(listed[0]["stale"].is_string() && listed[0]["removed"] == false, "{listed}");
    assert!(dead_dir.exists());
    let removed = gc(false);
    assert_eq!(removed[0]["removed"], true, "{removed}");
    assert!(!dead_dir.exists());
    // The survivor loads its own state as new.
    let out = survivor.command(bin("steerctl")).args(["--bpffs", &bpffs, "load"]).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(gc(true).as_array().unwrap().iter().all(|e| e["stale"].is_null()));
}

fn big_bindings(labels: usize, per_label: usize) -> String {
    let bindings: Vec<serde_json::Value> = (0..labels * per_label)
        .map(|i| {
            serde_json::json!({"label": format!("l{}", i % labels), "protocol": "tcp",
                "prefix": format!("10.{}.{}.0/24", i / 256 % 256, i % 256), "port": 443})
        })
        .collect();
    serde_json::json!({ "bindings": bindings }).to_string()
}

/// The start of a line of strace's output, for messages.
fn short(line: &str) -> &str {
    &line[..line.len().min(100)]
}

/// A load-bindings of 2,000 bindings (more than the 1,024 the record made
/// by `load` holds, so it grows the record too) killed at each step it
/// takes (strace delivers SIGKILL on entry to the chosen call): the state
/// is accepted and truthful (the old set or the whole new one), steering
/// kept working, and the next write leaves no orphan label and the plane
/// current. The old set is put back before each kill.
#[test]
fn a_load_bindings_killed_at_any_step_leaves_state_the_next_command_accepts() {
    let mut ns = TestNs::new("killed");
    let dir = steered(&mut ns);
    let scratch = ns.bpffs.parent().unwrap().to_path_buf();
    let (big, empty) = (scratch.join("big.json"), scratch.join("empty.json"));
    std::fs::write(&big, big_bindings(200, 10)).unwrap();
    std::fs::write(&empty, r#"{"bindings": []}"#).unwrap();
    let load_big = ["load-bindings", big.to_str().unwrap()];
    let ok = |args: &[&str]| {
        let out = steerctl(&ns, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    };
    let restore = || {
        ok(&["load-bindings", empty.to_str().unwrap()]);
        let status = ns.status_at(&dir);
        assert_eq!((status["bindings"].as_u64(), status["labels"].as_u64()), (Some(0), Some(0)), "{status}");
    };
    restore();
    let traced = Traced::bpffs(&ns);
    let files = "bpf,rename,renameat2,unlink";
    let calls = traced.calls(files, &load_big);
    restore();
    let points = strace::crash_points(&calls);
    assert!((10..=80).contains(&points.len()), "{} kill points of {} calls", points.len(), calls.len());
    for p in points {
        let (syscall, index) = strace::nth_of_its_name(&calls, p);
        let at = format!("killed before call {p} ({})", short(&calls[p]));
        traced.killed_at(&syscall, index, &load_big);
        // Accepted, and truthful: the old set or the whole new one.
        let status = ns.status_at(&dir);
        let bound = status["bindings"].as_u64().unwrap();
        assert!(bound == 0 || bound == 2_000, "{at}: {bound} bindings");
        still_steered(&ns);
        // The next write finishes the job: no orphan label, the plane current.
        ok(&["bind", "after", "tcp", "192.0.2.1", "1"]);
        let status = ns.status_at(&dir);
        let bindings: serde_json::Value =
            serde_json::from_slice(&steerctl(&ns, &["--json", "bindings"]).stdout).unwrap();
        let labels: std::collections::BTreeSet<&str> =
            bindings["bindings"].as_array().unwrap().iter().map(|b| b["label"].as_str().unwrap()).collect();
        assert_eq!(status["labels"].as_u64(), Some(labels.len() as u64), "{at}: orphan labels left: {status}");
        assert_eq!(status["plane"]["up_to_date"], true, "{at}: {status}");
        restore();
    }
    // Each killed run took the steps traced: from the restored state the
    // command makes the same calls as at first.
    assert_eq!(strace::shape(&traced.calls(files, &load_big)), strace::shape(&calls), "the steps changed");
}

/// A load killed at each step it takes (before and after making its
/// staging directory, at each pin, before and just after the rename that
/// publishes it) leaves no half-built state: before the rename there is no
/// state and `gc` removes the staging directory, so the next load works;
/// after it the state is whole.
#[test]
fn a_load_killed_at_any_step_leaves_nothing_half_built() {
    let ns = TestNs::new("killedload");
    let ok = |args: &[&str]| {
        let out = steerctl(&ns, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        out
    };
    let state = ns.bpffs.join("steer").join(ns.inode().to_string());
    // The first load makes BPFFS/steer too; the traced load and the killed
    // ones find it there.
    ok(&["load"]);
    ok(&["unload"]);
    let traced = Traced::bpffs(&ns);
    let calls = traced.calls("bpf,mkdirat,flock,renameat2,write", &["load"]);
    ok(&["unload"]);
    let renamed = calls.iter().position(|l| l.starts_with("renameat2(")).expect("load renames its state into place");
    let points = strace::crash_points(&calls);
    assert!(points.iter().any(|p| *p > renamed), "no kill point after the rename: {calls:#?}");
    for p in points {
        let (syscall, index) = strace::nth_of_its_name(&calls, p);
        let at = format!("killed before call {p} ({})", short(&calls[p]));
        traced.killed_at(&syscall, index, &["load"]);
        let staged: Vec<PathBuf> = std::fs::read_dir(ns.bpffs.join("steer"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().contains("-tmp-"))
            .collect();
        let gc: serde_json::Value = serde_json::from_slice(&ok(&["--json", "gc"]).stdout).unwrap();
        for dir in &staged {
            let entry = gc.as_array().unwrap().iter().find(|e| e["dir"] == dir.to_str().unwrap());
            assert!(entry.is_some_and(|e| e["removed"] == true), "{at}: gc left {}: {gc}", dir.display());
        }
        let own = format!("steer/{}", ns.inode());
        let left: Vec<String> =
            ns.pins().into_iter().filter(|p| p != "steer" && *p != own && !p.starts_with(&format!("{own}/"))).collect();
        assert!(left.is_empty(), "{at}: {left:?}");
        if p > renamed {
            // Published whole.
            assert_eq!(ns.status_at(&state)["program"]["name"], "steer_dispatch", "{at}");
        } else {
            // Nothing published: the next load makes it.
            assert!(!state.exists(), "{at}: {} exists before the rename", state.display());
            ok(&["load"]);
        }
        ok(&["unload"]);
    }
}

/// The fds a command takes out of other processes, per strace.
fn taken_fds(ns: &TestNs, args: &[&str]) -> usize {
    let out = ns
        .command("strace")
        .args(["-f", "-qq", "-e", "trace=pidfd_getfd", "-o", "/dev/stderr"])
        .arg(bin("steerctl"))
        .arg("--bpffs")
        .arg(&ns.bpffs)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    stderr(&out).lines().filter(|l| l.contains("pidfd_getfd(")).count()
}

#[test]
fn owners_are_found_without_taking_anyones_fds() {
    let mut ns = TestNs::new("nofds");
    steered(&mut ns);
    let server = ns.named_tcp_server("127.0.0.1:0", "web");
    // A process with several sockets: register-pid takes only the chosen one.
    let _others: Vec<_> = (0..3).map(|_| ns.enter(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap())).collect();
    let me = std::process::id().to_string();
    let port = server.port().to_string();
    assert_eq!(taken_fds(&ns, &["register-pid", "web", &me, "tcp", "127.0.0.1", &port]), 1);
    assert_eq!(taken_fds(&ns, &["status"]), 0);
    assert_eq!(taken_fds(&ns, &["list"]), 0);
    let list: serde_json::Value = serde_json::from_slice(&steerctl(&ns, &["--json", "list"]).stdout).unwrap();
    assert_eq!(list[0]["owners"][0]["pid"].as_u64(), Some(std::process::id() as u64), "{list}");
    let status = ns.status_at(&ns.bpffs.join("steer").join(ns.inode().to_string()));
    assert_eq!(status["socket"]["owners"][0]["command"], "ncat", "{status}");
    still_steered(&ns);
}

#[test]
fn bind_checks_the_label_s_sockets_as_register_checks_its_bindings() {
    let mut ns = TestNs::new("bindcheck");
    steered(&mut ns);
    let v6 = ns.enter(|| {
        use nix::sys::socket::*;
        let s = socket(AddressFamily::Inet6, SockType::Stream, SockFlag::empty(), None).unwrap();
        setsockopt(&s, sockopt::Ipv6V6Only, &true).unwrap();
        bind(s.as_raw_fd(), &SockaddrIn6::from(std::net::SocketAddrV6::new(std::net::Ipv6Addr::LOCALHOST, 0, 0, 0)))
            .unwrap();
        listen(&s, Backlog::new(8).unwrap()).unwrap();
        std::net::TcpListener::from(s)
    });
    let port = v6.local_addr().unwrap().port().to_string();
    let me = std::process::id().to_string();
    let out = steerctl(&ns, &["register-pid", "v6", &me, "tcp", "::1", &port]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = steerctl(&ns, &["bind", "v6", "tcp", "127.0.0.0/8", "8080"]);
    assert!(!out.status.success(), "an IPv4 binding for an IPv6-only socket");
    assert!(
        stderr(&out).contains("label v6 has tcp ipv6 (IPv6-only) socket(s), none of which can take tcp ipv4 traffic"),
        "{}",
        stderr(&out)
    );
    let bindings: serde_json::Value = serde_json::from_slice(&steerctl(&ns, &["--json", "bindings"]).stdout).unwrap();
    assert_eq!(bindings["bindings"], serde_json::json!([]));
    let out = steerctl(&ns, &["bind", "v6", "tcp", "::1", "8080"]);
    assert!(out.status.success(), "{}", stderr(&out));
    still_steered(&ns);
}

#[test]
fn bad_input_gets_short_messages_that_say_what_to_do() {
    let mut ns = TestNs::new("texts");
    let dir = steered(&mut ns);
    // A 30 MiB label is not echoed whole.
    let file = std::env::temp_dir().join(format!("steer-hugelabel-{}.json", std::process::id()));
    let huge = "x".repeat(30 << 20);
    std::fs::write(&file, format!(r#"{{"bindings":[{{"label":"{huge}","protocol":"tcp","prefix":"::1","port":1}}]}}"#))
        .unwrap();
    let out = steerctl(&ns, &["load-bindings", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).len() < 1024 && stderr(&out).contains("bad label"), "{} bytes", stderr(&out).len());
    std::fs::remove_file(&file).unwrap();

    // An epoll fd is named, once.
    // Safety: epoll_create1 has no memory arguments; the fd is closed below.
    let epoll = unsafe { libc::epoll_create1(0) };
    assert!(epoll >= 0);
    let fd = epoll.to_string();
    let out = steerctl(&ns, &["socket", "set", "--pid", &std::process::id().to_string(), "--fd", &fd]);
    let err = stderr(&out);
    assert!(err.contains("it is anon_inode:[eventpoll], not a socket") && !err.contains("not a socket, not"), "{err}");
    // Safety: closes the epoll fd made above.
    unsafe { libc::close(epoll) };

    // --bpffs on something that is not bpffs: the hint names that path.
    let plain = std::env::temp_dir().join(format!("steer-notbpffs-{}", std::process::id()));
    std::fs::create_dir_all(&plain).unwrap();
    let out = ns.run("steerctl", &["--bpffs", plain.to_str().unwrap(), "status"]);
    assert!(
        stderr(&out).contains(&format!("mount it with `mount -t bpf bpf {}`", plain.display())),
        "{}",
        stderr(&out)
    );
    std::fs::remove_dir(&plain).unwrap();

    // Capabilities without root: the state is root's, and the message says so.
    let out = ns
        .command("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .args(["--inh-caps=+bpf,+net_admin,+sys_admin", "--ambient-caps=+bpf,+net_admin,+sys_admin", "--"])
        .arg(bin("steerctl"))
        .args(["--bpffs", ns.bpffs.to_str().unwrap(), "status"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("root-only") && stderr(&out).contains("run as root"), "{}", stderr(&out));
    assert!(dir.exists());
    still_steered(&ns);
}

#[test]
fn loads_racing_unloads_never_say_load_first() {
    let ns = TestNs::new("loadrace2");
    let bpffs = ns.bpffs.to_str().unwrap().to_string();
    let run = |args: Vec<&'static str>| {
        let mut cmd = ns.command(bin("steerctl"));
        cmd.args(["--bpffs", &bpffs]).args(args);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    assert!(steerctl(&ns, &["load"]).status.success());
    for _ in 0..4 {
        let racers = [
            ("unload", run(vec!["unload"])),
            ("load", run(vec!["load"])),
            ("unload", run(vec!["unload"])),
            ("load", run(vec!["load"])),
        ];
        for (what, r) in racers {
            let out = r.join().unwrap();
            let err = stderr(&out);
            if what == "load" {
                assert!(out.status.success() || err.contains("already loaded"), "load: {err}");
            } else {
                // Nothing to unload is fine; waiting through another's unload says so.
                assert!(
                    out.status.success()
                        || err.contains("no steer state")
                        || err.contains("was unloaded while this command waited"),
                    "unload: {err}"
                );
            }
        }
    }
}
