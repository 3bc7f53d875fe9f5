//! Test harness: a network namespace with its own bpffs mount, the real
//! binaries run inside it, and cleanup of everything on drop, pass or fail.

use std::{
    io::{BufRead, BufReader, ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns},
};

/// Directory holding the workspace's built binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace` before the tests", path.display());
    path
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A fresh network namespace with loopback up and a private bpffs mount.
pub struct TestNs {
    pub name: String,
    pub bpffs: PathBuf,
    children: Vec<Child>,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Removes the namespaces and bpffs mounts of test runs that were killed
/// before their Drop could (names carry the run's pid).
fn sweep_dead_runs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else { return };
        for name in String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next()) {
            let parts: Vec<&str> = name.split('-').collect();
            let [prefix, _, pid, _] = parts[..] else { continue };
            let Ok(pid) = pid.parse::<i32>() else { continue };
            if prefix != "steer" || Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            let _ = Command::new("ip").args(["netns", "del", name]).status();
            let base = std::env::temp_dir().join(format!("{name}.d"));
            let _ = umount2(&base.join("bpffs"), MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir_all(base);
        }
    });
}

fn must(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

impl TestNs {
    pub fn new(test: &str) -> Self {
        sweep_dead_runs();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let short: String = test.chars().filter(char::is_ascii_alphanumeric).take(12).collect();
        let name = format!("steer-{short}-{}-{n}", std::process::id());
        let base = std::env::temp_dir().join(format!("{name}.d"));
        let bpffs = base.join("bpffs");
        must(Command::new("ip").args(["netns", "add", &name]));
        // From here on Drop cleans up, even if the rest of setup fails.
        let ns = TestNs { name, bpffs, children: Vec::new() };
        std::fs::create_dir_all(&ns.bpffs).expect("creating bpffs mount point");
        must(Command::new("ip").args(["-n", &ns.name, "link", "set", "lo", "up"]));
        mount(Some("bpf"), &ns.bpffs, Some("bpf"), MsFlags::empty(), None::<&str>).expect("mounting bpffs");
        ns
    }

    pub fn pin_dir(&self) -> PathBuf {
        self.bpffs.join("steer")
    }

    /// Inode of the namespace, as the kernel reports it in link info.
    pub fn inode(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/run/netns/{}", self.name)).expect("netns file").ino()
    }

    /// A command that runs inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs one of the workspace binaries inside the namespace.
    pub fn run(&self, binary: &str, args: &[&str]) -> Output {
        self.command(bin(binary)).args(args).output().expect("running a binary")
    }

    /// `steerctl --pin-dir <this test's dir> ARGS`.
    pub fn steerctl(&self, args: &[&str]) -> Output {
        let pin_dir = self.pin_dir();
        let mut all = vec!["--pin-dir", pin_dir.to_str().unwrap()];
        all.extend_from_slice(args);
        self.run("steerctl", &all)
    }

    /// Like `steerctl` but panics with its stderr unless it succeeds.
    pub fn steerctl_ok(&self, args: &[&str]) -> String {
        let out = self.steerctl(args);
        assert!(out.status.success(), "steerctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts a long-running process in the namespace; killed on drop.
    pub fn spawn(&mut self, mut cmd: Command) -> u32 {
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawning");
        let pid = child.id();
        self.children.push(child);
        pid
    }

    /// Starts a long-running process in the namespace (killed on drop) and
    /// returns once it has written a line containing `ready` to its stderr:
    /// the process's own word that it is ready (a server prints it once it
    /// listens), not a guess at how long starting takes.
    pub fn spawn_ready(&mut self, mut cmd: Command, ready: &str) -> u32 {
        let what = format!("{cmd:?}");
        let mut child =
            cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawning");
        let stderr = child.stderr.take().unwrap();
        let pid = child.id();
        self.children.push(child);
        wait_for_line(stderr, ready, &what);
        pid
    }

    /// The seed's echo service: one ncat socket on 127.0.0.1:7777 running
    /// cat. Returns once ncat says it listens (`-v` prints that after
    /// listen()), without a probe connection, so its socket has one owner.
    pub fn start_ncat_echo(&mut self) -> u32 {
        let mut cmd = self.command("ncat");
        cmd.args(["-v", "-4kle", "/bin/cat", "127.0.0.1", "7777"]);
        self.spawn_ready(cmd, "Listening on 127.0.0.1:7777")
    }

    /// Runs `f` on a thread that has joined this namespace, so sockets it
    /// makes live there. The calling thread stays where it was.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).expect("opening netns");
                setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("thread inside netns panicked")
        })
    }

    /// Connects to 127.0.0.1:`port`, sends a line, and returns the line that
    /// comes back; Err on refusal or a silent close.
    pub fn echo(&self, port: u16, line: &str) -> std::io::Result<String> {
        self.enter(|| {
            let mut stream =
                TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.write_all(format!("{line}\n").as_bytes())?;
            let mut reply = String::new();
            BufReader::new(&stream).read_line(&mut reply)?;
            Ok(reply.trim_end().to_string())
        })
    }

    /// Asserts a TCP connect to `port` is refused.
    pub fn assert_refused(&self, port: u16) {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let err = self
            .enter(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map(drop))
            .expect_err("connect should fail");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "port {port}: {err}");
    }

    /// Names in the bpffs mount, recursively, relative to it; without the
    /// `maps.debug` and `progs.debug` iterators the kernel puts in every bpffs.
    pub fn pins(&self) -> Vec<String> {
        fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if dir == root && ["maps.debug", "progs.debug"].contains(&entry.file_name().to_str().unwrap_or("")) {
                    continue;
                }
                out.push(path.strip_prefix(root).unwrap().display().to_string());
                if path.is_dir() {
                    walk(&path, root, out);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.bpffs, &self.bpffs, &mut out);
        out.sort();
        out
    }

    /// `steerctl status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.steerctl_ok(&["--json", "status"])).expect("status --json is JSON")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Anything else still running in the namespace goes too.
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
        let _ = umount2(&self.bpffs, MntFlags::MNT_DETACH);
        if let Some(base) = self.bpffs.parent() {
            let _ = std::fs::remove_dir_all(base);
        }
    }
}

/// stderr of a finished command, for message assertions.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// How long a test waits for an event before it fails: a bound on a
/// failure, never how long a test waits when things work.
pub const EVENT_LIMIT: Duration = Duration::from_secs(30);

/// Reads `stream` (a child's stdout or stderr) until a line containing
/// `text`, and keeps draining it on a thread after that, so the child never
/// blocks on a full pipe. Panics with what it read if the stream closes
/// first (the child exited) or nothing matches within [`EVENT_LIMIT`].
pub fn wait_for_line(stream: impl Read + Send + 'static, text: &str, what: &str) {
    let (tx, rx) = mpsc::channel();
    let seen = Arc::new(Mutex::new(String::new()));
    let (wanted, log) = (text.to_string(), seen.clone());
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if tx.is_some() {
                let found = line.contains(&wanted);
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
                if found {
                    let _ = tx.take().unwrap().send(());
                }
            }
        }
    });
    match rx.recv_timeout(EVENT_LIMIT) {
        Ok(()) => {}
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            panic!("{what} closed its output without printing {text:?}:\n{}", seen.lock().unwrap())
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what} did not print {text:?} within {EVENT_LIMIT:?}:\n{}", seen.lock().unwrap())
        }
    }
}

/// Waits for `child` to exit and returns its status: the wait is on the
/// kernel's word (its pidfd turns readable when it exits), and fails if
/// that takes longer than `limit`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let pid = child.id() as libc::pid_t;
    // Safety: pidfd_open takes no pointers; the fd returned is ours to own.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(raw >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
    // Safety: a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = libc::pollfd { fd: pidfd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // Safety: one valid pollfd.
        let n = unsafe { libc::poll(&raw mut fds, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n < 0 && std::io::Error::last_os_error().kind() == ErrorKind::Interrupted {
            continue;
        }
        assert!(n >= 0, "poll on the pidfd of {pid}: {}", std::io::Error::last_os_error());
        assert!(n > 0, "pid {pid} still running {limit:?} later");
        return child.wait().expect("reaping a child");
    }
}

/// A count that one thread raises and another waits on (a condition
/// variable: the waiter wakes when the count changes, not on a timer).
#[derive(Default)]
pub struct Count {
    n: Mutex<u64>,
    changed: Condvar,
}

impl Count {
    pub fn add(&self) {
        *self.n.lock().unwrap() += 1;
        self.changed.notify_all();
    }

    pub fn get(&self) -> u64 {
        *self.n.lock().unwrap()
    }

    /// Waits until the count reaches `at_least`, for at most [`EVENT_LIMIT`]
    /// (`what` names the wait in the panic message).
    pub fn wait_for(&self, at_least: u64, what: &str) {
        let n = self.n.lock().unwrap();
        let (n, timeout) = self.changed.wait_timeout_while(n, EVENT_LIMIT, |n| *n < at_least).unwrap();
        assert!(!timeout.timed_out(), "{what}: the count is {} after {EVENT_LIMIT:?}, not {at_least}", *n);
    }
}

/// Polls `condition` until it holds, failing after `limit`: only for a
/// change nothing announces (the kernel cleaning up a namespace in the
/// background, say). Prefer an event where there is one.
pub fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    while !condition() {
        assert!(Instant::now() < deadline, "{what}: not so after {limit:?}");
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

impl TestNs {
    /// A TCP listener inside the namespace that answers every connection
    /// with `name` and closes; it lives until the test process ends.
    pub fn named_tcp_server(&self, addr: &str, name: &str) -> SocketAddr {
        let listener = self.enter(|| std::net::TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        let local = listener.local_addr().unwrap();
        let reply = format!("{name}\n");
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = (&conn).write_all(reply.as_bytes());
            }
        });
        local
    }

    /// Labels a..d, each with its own named socket (registered from this
    /// process), and TCP bindings that overlap on purpose: a on the wide
    /// prefix, any port; b on it, port 80; c on a narrower prefix, any port;
    /// d on one host, port 80.
    pub fn overlapping_bindings(&self, v6: bool) {
        let (wide, narrow, host, server_addr) = if v6 {
            ("2001:db8::/32", "2001:db8::/64", "2001:db8::5/128", "[::1]:0")
        } else {
            ("127.0.0.0/8", "127.0.0.0/24", "127.0.0.5/32", "127.0.0.1:0")
        };
        let me = std::process::id().to_string();
        for label in ["a", "b", "c", "d"] {
            let addr = self.named_tcp_server(server_addr, label);
            self.steerctl_ok(&["register-pid", label, &me, "tcp", &addr.ip().to_string(), &addr.port().to_string()]);
        }
        self.steerctl_ok(&["bind", "a", "tcp", wide, "0"]);
        self.steerctl_ok(&["bind", "b", "tcp", wide, "80"]);
        self.steerctl_ok(&["bind", "c", "tcp", narrow, "0"]);
        self.steerctl_ok(&["bind", "d", "tcp", host, "80"]);
    }

    /// Connects to `addr` and returns the first line the server sends.
    pub fn first_line(&self, addr: SocketAddr) -> std::io::Result<String> {
        self.enter(|| {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(line.trim_end().to_string())
        })
    }

    /// Adds `ip route add local PREFIX dev lo`, so every address in it is
    /// this host's (how tubular-style deployments own whole prefixes).
    pub fn add_local_route(&self, prefix: &str) {
        let family = if prefix.contains(':') { "-6" } else { "-4" };
        must(Command::new("ip").args(["-n", &self.name, family, "route", "add", "local", prefix, "dev", "lo"]));
    }
}

/// A UDP echo server written the way sk_lookup needs: it learns each
/// datagram's original destination (IP_RECVORIGDSTADDR) and replies from it
/// (IP_PKTINFO), so clients see the reply come from the address they used.
pub mod udp_echo {
    use std::{
        io::{IoSlice, IoSliceMut},
        net::{SocketAddr, UdpSocket},
        os::fd::AsRawFd,
    };

    use nix::sys::socket::{
        ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, sendmsg, setsockopt, sockopt,
    };

    /// Binds `addr` and echoes forever on a thread; returns the socket's address.
    pub fn spawn(ns: &super::TestNs, addr: &str) -> SocketAddr {
        let socket = ns.enter(|| bind(UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}"))));
        let local = socket.local_addr().unwrap();
        std::thread::spawn(move || serve(socket));
        local
    }

    /// Makes a bound socket answer from the address a datagram was sent to
    /// (steered datagrams arrive for other addresses than its own).
    pub fn bind(s: UdpSocket) -> UdpSocket {
        {
            if s.local_addr().unwrap().is_ipv4() {
                setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true).unwrap();
            } else {
                setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true).unwrap();
                // Replying from an address the socket is not bound to.
                let one: libc::c_int = 1;
                // Safety: plain setsockopt with an int.
                let rc = unsafe {
                    libc::setsockopt(s.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_FREEBIND, (&raw const one).cast(), 4)
                };
                assert_eq!(rc, 0, "IPV6_FREEBIND");
            }
            s
        }
    }

    /// Echoes every datagram back, from the address it was sent to.
    pub fn serve(socket: UdpSocket) {
        let fd = socket.as_raw_fd();
        let mut buf = [0u8; 2048];
        loop {
            let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
            let (len, peer, orig) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let Ok(msg) = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty()) else {
                    return;
                };
                let mut orig = None;
                for c in msg.cmsgs().into_iter().flatten() {
                    match c {
                        ControlMessageOwned::Ipv4OrigDstAddr(a) => orig = Some(OrigDst::V4(a.sin_addr)),
                        ControlMessageOwned::Ipv6OrigDstAddr(a) => orig = Some(OrigDst::V6(a.sin6_addr)),
                        _ => {}
                    }
                }
                (msg.bytes, msg.address, orig)
            };
            let Some(peer) = peer else { continue };
            let iov = [IoSlice::new(&buf[..len])];
            let _ = match orig {
                Some(OrigDst::V4(addr)) => {
                    let info = libc::in_pktinfo { ipi_ifindex: 0, ipi_spec_dst: addr, ipi_addr: addr };
                    sendmsg(fd, &iov, &[ControlMessage::Ipv4PacketInfo(&info)], MsgFlags::empty(), Some(&peer))
                }
                Some(OrigDst::V6(addr)) => {
                    let info = libc::in6_pktinfo { ipi6_addr: addr, ipi6_ifindex: 0 };
                    sendmsg(fd, &iov, &[ControlMessage::Ipv6PacketInfo(&info)], MsgFlags::empty(), Some(&peer))
                }
                None => sendmsg(fd, &iov, &[], MsgFlags::empty(), Some(&peer)),
            };
        }
    }

    enum OrigDst {
        V4(libc::in_addr),
        V6(libc::in6_addr),
    }

    /// From a connected client socket (which only accepts replies from the
    /// address it sent to), sends `text` to `to` and returns the reply.
    pub fn request(ns: &super::TestNs, to: SocketAddr, text: &str) -> std::io::Result<String> {
        ns.enter(|| {
            let any = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let client = UdpSocket::bind(any)?;
            client.connect(to)?;
            client.set_read_timeout(Some(std::time::Duration::from_secs(2)))?;
            client.send(text.as_bytes())?;
            let mut buf = [0u8; 2048];
            let n = client.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
    }
}

/// Feature probes for a test that cannot work on an older kernel (the
/// matrix, `scripts/vm-test.sh`, runs every test on 5.10, 6.1 and 6.12).
/// Only for a feature the kernel genuinely lacks, never to hide a bug:
///
/// ```ignore
/// if !steer_tests::require_feature("SO_NETNS_COOKIE (Linux 5.14)", steer_tests::probe::netns_cookie()) {
///     return;
/// }
/// ```
///
/// A skipped test prints `SKIPPED: <test>: this kernel lacks <feature>` to
/// stderr, past libtest's capture so it always shows (vm-test.sh counts
/// these lines), and passes.
pub fn require_feature(feature: &str, available: bool) -> bool {
    if !available {
        let test = std::thread::current().name().unwrap_or("?").to_string();
        // One write, so lines of tests running in parallel never mix.
        let line = format!("SKIPPED: {test}: this kernel ({}) lacks {feature}\n", probe::kernel_release());
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    available
}

pub mod probe {
    use std::os::fd::AsRawFd;

    pub fn kernel_release() -> String {
        nix::sys::utsname::uname().map(|u| u.release().to_string_lossy().into_owned()).unwrap_or_default()
    }

    /// The running kernel is MAJOR.MINOR or later: for features no cheap
    /// probe detects (prefer a probe where there is one: distributions
    /// backport).
    pub fn kernel_at_least(major: u32, minor: u32) -> bool {
        let release = kernel_release();
        let mut parts = release.split(|c: char| !c.is_ascii_digit()).filter_map(|p| p.parse::<u32>().ok());
        (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
    }

    /// getsockopt(SO_NETNS_COOKIE), Linux 5.14.
    pub fn netns_cookie() -> bool {
        const SO_NETNS_COOKIE: libc::c_int = 71;
        let Ok(socket) = std::net::UdpSocket::bind("127.0.0.1:0") else { return false };
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // Safety: getsockopt writes at most `len` bytes into `cookie`.
        let rc = unsafe {
            libc::getsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&raw mut cookie).cast(), &mut len)
        };
        rc == 0
    }
}

/// This test process's pid, as an argument.
pub fn me() -> String {
    std::process::id().to_string()
}

/// steerctl under strace: the system calls it makes, and faults placed at
/// one of them (SIGKILL or an error on entry), deterministically.
pub mod strace {
    use std::{ffi::OsString, process::Output};

    use super::{TestNs, bin, stderr};

    /// steerctl under strace, pointed at the test's state one of two ways:
    /// `--pin-dir` (as [`TestNs::steerctl`] runs it; the free functions of
    /// this module) or `--bpffs` (the default layout under the test's bpffs).
    pub struct Traced<'a> {
        ns: &'a TestNs,
        flags: [OsString; 2],
    }

    impl<'a> Traced<'a> {
        pub fn pin_dir(ns: &'a TestNs) -> Self {
            Traced { ns, flags: ["--pin-dir".into(), ns.pin_dir().into()] }
        }

        pub fn bpffs(ns: &'a TestNs) -> Self {
            Traced { ns, flags: ["--bpffs".into(), ns.bpffs.clone().into()] }
        }

        /// `steerctl FLAGS ARGS` under `strace STRACE_ARGS`, in the namespace.
        pub fn run(&self, strace_args: &[&str], args: &[&str]) -> Output {
            let mut cmd = self.ns.command("strace");
            cmd.args(strace_args).arg(bin("steerctl")).args(&self.flags).args(args);
            cmd.output().unwrap()
        }

        /// The `syscalls` calls (one name, or several joined with commas) of
        /// `steerctl ARGS` (its main thread), as strace shows them.
        pub fn calls(&self, syscalls: &str, args: &[&str]) -> Vec<String> {
            let trace = format!("trace={syscalls}");
            let out = self.run(&["-qq", "-e", &trace, "-o", "/dev/stderr"], args);
            assert!(out.status.success(), "{args:?}: {}", stderr(&out));
            let names: Vec<&str> = syscalls.split(',').collect();
            stderr(&out).lines().filter(|l| name(l).is_some_and(|n| names.contains(&n))).map(str::to_string).collect()
        }

        /// Runs `steerctl ARGS`, killed (strace delivers SIGKILL on entry)
        /// just before its `syscall` call at 0-based `index`; fails if it
        /// was not killed.
        pub fn killed_at(&self, syscall: &str, index: usize, args: &[&str]) {
            // strace counts from 1.
            let inject = format!("inject={syscall}:signal=SIGKILL:when={}", index + 1);
            let trace = format!("trace={syscall}");
            let out = self.run(&["-qq", "-o", "/dev/null", "-e", &trace, "-e", &inject], args);
            assert!(!out.status.success(), "{args:?} killed at {syscall} call {index} finished: {}", stderr(&out));
        }

        /// Runs `steerctl ARGS` with its `syscall` call at 0-based `index`
        /// failing with `errno` (strace injects it on entry; the call is not made).
        pub fn failed_at(&self, syscall: &str, index: usize, errno: &str, args: &[&str]) -> Output {
            let inject = format!("inject={syscall}:error={errno}:when={}", index + 1);
            let trace = format!("trace={syscall}");
            self.run(&["-qq", "-o", "/dev/null", "-e", &trace, "-e", &inject], args)
        }
    }

    /// The name of the call on a line of strace's output.
    pub fn name(line: &str) -> Option<&str> {
        let (name, _) = line.split_once('(')?;
        (!name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')).then_some(name)
    }

    /// Where call `position` of `calls` (as [`Traced::calls`] lists them)
    /// stands among the calls of its own name: the `(syscall, index)` to
    /// give [`Traced::killed_at`] to kill just before it.
    pub fn nth_of_its_name(calls: &[String], position: usize) -> (String, usize) {
        let syscall = name(&calls[position]).expect("a line naming a call");
        let index = calls[..position].iter().filter(|l| name(l) == Some(syscall)).count();
        (syscall.to_string(), index)
    }

    /// `steerctl --pin-dir DIR ARGS` under `strace STRACE_ARGS`, in the namespace.
    pub fn steerctl(ns: &TestNs, strace_args: &[&str], args: &[&str]) -> Output {
        Traced::pin_dir(ns).run(strace_args, args)
    }

    /// The `syscall` calls of `steerctl ARGS` (its main thread), as strace shows them.
    pub fn calls(ns: &TestNs, syscall: &str, args: &[&str]) -> Vec<String> {
        Traced::pin_dir(ns).calls(syscall, args)
    }

    /// Where to kill a command whose bpf calls are `calls`: before each map
    /// write, and after the last (0-based indices into `calls`).
    pub fn kill_points(calls: &[String]) -> Vec<usize> {
        let is_write = |l: &String| ["BPF_MAP_UPDATE", "BPF_MAP_DELETE"].iter().any(|c| l.contains(c));
        let mut at: Vec<usize> = calls.iter().enumerate().filter(|(_, l)| is_write(l)).map(|(i, _)| i).collect();
        if let Some(after_last) = at.last().map(|i| i + 1).filter(|i| *i < calls.len()) {
            at.push(after_last);
        }
        at
    }

    /// The bpf command of a `bpf(...)` line (`BPF_MAP_UPDATE_ELEM`), or the
    /// call's name for another call.
    fn kind(line: &str) -> &str {
        match line.strip_prefix("bpf(") {
            Some(rest) => rest.split(',').next().unwrap_or(""),
            None => name(line).unwrap_or(""),
        }
    }

    /// Where to kill a command whose calls (bpf and file calls, as
    /// [`Traced::calls`] lists them) are `calls`, so that each step it
    /// takes is cut, without a run for each of thousands of like writes:
    /// before the first, middle and last of each run of like map writes and
    /// after the last write; before each pin; before each file call
    /// (mkdirat, unlink, rename, ...) and just after each rename. Sorted
    /// positions in `calls`.
    pub fn crash_points(calls: &[String]) -> Vec<usize> {
        fn close_run(run: &mut Vec<usize>, at: &mut std::collections::BTreeSet<usize>) {
            if let (Some(first), Some(last)) = (run.first(), run.last()) {
                at.extend([*first, run[run.len() / 2], *last]);
            }
            run.clear();
        }
        let writes = kill_points(calls);
        let mut at = std::collections::BTreeSet::new();
        let mut run: Vec<usize> = Vec::new();
        for &i in &writes {
            let joins = run.last().is_some_and(|&prev| prev + 1 == i && kind(&calls[prev]) == kind(&calls[i]));
            if !joins {
                close_run(&mut run, &mut at);
            }
            run.push(i);
        }
        close_run(&mut run, &mut at);
        for (i, line) in calls.iter().enumerate() {
            if kind(line) == "BPF_OBJ_PIN" || !line.starts_with("bpf(") {
                at.insert(i);
            }
            if kind(line).starts_with("rename") && i + 1 < calls.len() {
                at.insert(i + 1);
            }
        }
        at.into_iter().collect()
    }

    /// The calls' kinds in order (bpf commands and call names, without
    /// arguments): two runs of a command took the same steps when these match.
    pub fn shape(calls: &[String]) -> Vec<&str> {
        calls.iter().map(|l| kind(l)).collect()
    }

    /// Runs `steerctl ARGS`, killed (strace delivers SIGKILL on entry) just
    /// before its `syscall` call at 0-based `index`; fails if it was not killed.
    pub fn killed_at(ns: &TestNs, syscall: &str, index: usize, args: &[&str]) {
        Traced::pin_dir(ns).killed_at(syscall, index, args);
    }

    /// Runs `steerctl ARGS` with its `syscall` call at 0-based `index`
    /// failing with `errno` (strace injects it on entry; the call is not made).
    pub fn failed_at(ns: &TestNs, syscall: &str, index: usize, errno: &str, args: &[&str]) -> Output {
        Traced::pin_dir(ns).failed_at(syscall, index, errno, args)
    }
}

/// nginx, the real server the tests run with `reuseport` workers.
pub mod nginx {
    use std::{
        io::{Read, Write},
        net::{SocketAddr, TcpStream},
        path::{Path, PathBuf},
        time::Duration,
    };

    /// A config in `dir` serving `listen` with `reuseport` (one socket per
    /// worker) and `workers` workers, each answering "worker PID".
    pub fn config(dir: &Path, listen: &str, workers: u32) -> PathBuf {
        let d = dir.display();
        let conf = format!(
            "worker_processes {workers};\nuser root;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen {listen} reuseport;\n    location / {{ return 200 \"worker $pid\\n\"; }}\n  }}\n}}\n"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        path
    }

    /// GET / over HTTP/1.0; the body's last line.
    pub fn http_get(addr: SocketAddr) -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: steer\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body.lines().last().unwrap_or_default().to_string())
    }

    pub fn nginx() -> Option<PathBuf> {
        ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists())
    }
}
