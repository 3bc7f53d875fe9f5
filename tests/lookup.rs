//! The data plane against a model written here (independent of the
//! library's): longest prefix first, then the exact port over the wildcard,
//! IPv4 as v4-mapped IPv6. Nested prefixes at every length, IPv4 and IPv6,
//! through real connections; and random sets of many lengths through the
//! kernel's own program (BPF_PROG_TEST_RUN), many lookups each, loaded
//! whole and changed one binding at a time.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
};

use steer::{
    Dispatcher, Layout,
    discovery::OwnerFilter,
    model::{Binding, BindingsFile, Prefix, Protocol},
    ops::{
        bindings::{bind, change_bindings, load_bindings, unbind},
        register::{Options, Source, register},
    },
};
use steer_tests::{TestNs, stderr};

/// A binding as the model sees it.
#[derive(Debug, Clone)]
struct Rule {
    label: String,
    addr: u128,
    len: u32,
    port: u16,
}

fn mapped(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => 0xffff_0000_0000 | u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl Rule {
    fn new(label: &str, prefix: IpAddr, len: u32, port: u16) -> Self {
        let (addr, len) = (mapped(prefix), if prefix.is_ipv4() { len + 96 } else { len });
        let mask = if len == 0 { 0 } else { u128::MAX << (128 - len) };
        Rule { label: label.into(), addr: addr & mask, len, port }
    }

    fn covers(&self, addr: u128) -> bool {
        let mask = if self.len == 0 { 0 } else { u128::MAX << (128 - self.len) };
        addr & mask == self.addr
    }

    fn binding(&self, protocol: Protocol) -> Binding {
        let v6 = Ipv6Addr::from(self.addr);
        let prefix = match v6.to_ipv4_mapped() {
            Some(v4) if self.len >= 96 => Prefix::new(IpAddr::V4(v4), (self.len - 96) as u8),
            _ => Prefix::new(IpAddr::V6(v6), self.len as u8),
        }
        .unwrap();
        Binding { label: self.label.clone(), protocol, prefix, port: self.port }
    }
}

/// The model: the longest covering prefix, then the exact port.
fn model(rules: &[Rule], addr: IpAddr, port: u16) -> Option<&str> {
    let addr = mapped(addr);
    rules
        .iter()
        .filter(|r| (r.port == 0 || r.port == port) && r.covers(addr))
        .max_by_key(|r| (r.len, r.port != 0))
        .map(|r| r.label.as_str())
}

fn flip(addr: IpAddr, bit: u32) -> IpAddr {
    match addr {
        IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) ^ (1 << (31 - bit)))),
        IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) ^ (1 << (127 - bit)))),
    }
}

#[test]
fn nested_prefixes_at_every_length_through_real_connections() {
    let ns = TestNs::new("everylen");
    // Every address local, so connections to any of them stay on lo.
    ns.add_local_route("0.0.0.0/0");
    ns.add_local_route("::/0");
    let (t4, t6): (IpAddr, IpAddr) = ("10.77.1.5".parse().unwrap(), "2001:db8:7::5".parse().unwrap());
    let mut rules = Vec::new();
    for (target, max) in [(t4, 32), (t6, 128)] {
        let family = if target.is_ipv4() { "v4" } else { "v6" };
        for len in 0..=max {
            rules.push(Rule::new(&format!("{family}w{len}"), target, len, 0));
            // Exact-port bindings at every third length, on one port.
            if len % 3 == 0 {
                rules.push(Rule::new(&format!("{family}e{len}"), target, len, 4242));
            }
        }
    }
    // Each label answers with its name from its own socket.
    let layout_dir = ns.pin_dir();
    let pin_dir = layout_dir.to_str().unwrap();
    ns.steerctl_ok(&["load"]);
    ns.steerctl_ok(&["attach"]);
    let file = BindingsFile { bindings: rules.iter().map(|r| r.binding(Protocol::Tcp)).collect() };
    let path = std::env::temp_dir().join(format!("steer-everylen-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_string(&file).unwrap()).unwrap();
    ns.steerctl_ok(&["load-bindings", path.to_str().unwrap()]);
    std::fs::remove_file(&path).unwrap();
    let me = std::process::id().to_string();
    for r in &rules {
        let v6 = Ipv6Addr::from(r.addr).to_ipv4_mapped().is_none() || r.len < 96;
        let server = ns.named_tcp_server(if v6 { "[::1]:0" } else { "127.0.0.1:0" }, &r.label);
        let out = ns.run(
            "steerctl",
            &[
                "--pin-dir",
                pin_dir,
                "register-pid",
                &r.label,
                &me,
                "tcp",
                &server.ip().to_string(),
                &server.port().to_string(),
            ],
        );
        assert!(out.status.success(), "{}: {}", r.label, stderr(&out));
    }
    // Every binding must answer some connection, or a length went untested.
    let mut answered = std::collections::BTreeSet::new();
    for (target, max) in [(t4, 32), (t6, 128)] {
        for port in [4242, 80] {
            let queries = (0..max).map(|bit| flip(target, bit)).chain([target]);
            for addr in queries {
                let want = model(&rules, addr, port).expect("the /0 covers everything");
                let got = ns.first_line(SocketAddr::new(addr, port)).unwrap_or_else(|e| format!("error: {e}"));
                assert_eq!(got, want, "{addr} port {port}");
                answered.insert(got);
            }
        }
    }
    let unanswered: Vec<&str> = rules.iter().map(|r| r.label.as_str()).filter(|l| !answered.contains(*l)).collect();
    assert_eq!(unanswered, Vec::<&str>::new(), "bindings no connection reached");
}

/// Addresses from a few regions, so prefixes nest often.
fn random_addr(rng: &mut fastrand::Rng) -> IpAddr {
    let noise = rng.u64(..);
    match rng.u8(..4) {
        0 => IpAddr::V4(Ipv4Addr::new(10, (noise & 1) as u8, (noise >> 8) as u8 & 3, (noise >> 16) as u8)),
        1 => IpAddr::V4(Ipv4Addr::new(192, 0, 2, (noise >> 8) as u8)),
        2 => IpAddr::V6(Ipv6Addr::from(0x2001_0db8u128 << 96 | u128::from(noise & 0xff00_0000_0003))),
        _ => IpAddr::V6(Ipv6Addr::from(u128::from(noise) << 64 | u128::from(rng.u8(..4)))),
    }
}

/// A loaded namespace with a dual-stack TCP socket registered for each of
/// six labels: the labels, their sockets' cookies and the sockets.
fn six_labels(name: &str) -> (TestNs, Layout, Vec<String>, BTreeMap<String, u64>, Vec<std::net::TcpListener>) {
    let ns = TestNs::new(name);
    ns.steerctl_ok(&["load"]);
    let layout = Layout::new(ns.pin_dir());
    let labels: Vec<String> = (0..6).map(|i| format!("l{i}")).collect();
    // One dual-stack TCP socket per label: serves its IPv4 and IPv6 lookups.
    let sockets: Vec<std::net::TcpListener> =
        labels.iter().map(|_| ns.enter(|| std::net::TcpListener::bind("[::]:0").unwrap())).collect();
    let cookies: BTreeMap<String, u64> = ns.enter(|| {
        let state = Dispatcher::open_write(&layout).unwrap();
        labels
            .iter()
            .zip(&sockets)
            .map(|(label, s)| {
                let info = steer::kernel::socket::inspect(s.as_fd()).unwrap();
                let local = info.local.unwrap();
                let target = steer::model::Target { protocol: Protocol::Tcp, address: local.ip(), port: local.port() };
                let source = Source::Address { target, filter: OwnerFilter::pid(std::process::id() as i32) };
                register(&state, label, &source, &Options::default()).unwrap();
                (label.clone(), info.cookie)
            })
            .collect()
    });
    (ns, layout, labels, cookies, sockets)
}

/// A random rule of `labels`: prefixes of every length, short and long
/// ones common, on the wildcard and a few exact ports.
fn random_rule(rng: &mut fastrand::Rng, labels: &[String]) -> Rule {
    let addr = random_addr(rng);
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = match rng.u8(..3) {
        0 => rng.u32(..=max),
        1 => max - rng.u32(..9),
        _ => rng.u32(..17),
    };
    Rule::new(&labels[rng.usize(..labels.len())], addr, len, [0, 0, 80, 443, 1][rng.usize(..5)])
}

/// Runs `count` random lookups through the kernel's program and checks
/// each against the model; returns (hits, misses).
fn check_lookups(
    program: &std::os::fd::OwnedFd,
    rng: &mut fastrand::Rng,
    rules: &[Rule],
    cookies: &BTreeMap<String, u64>,
    count: usize,
    what: &str,
) -> (usize, usize) {
    let (mut hits, mut misses) = (0, 0);
    for _ in 0..count {
        let addr = random_addr(rng);
        let port = [80, 443, 1, 2][rng.usize(..4)];
        let remote = if addr.is_ipv4() { "127.0.0.1:40000" } else { "[::1]:40000" };
        let ctx =
            steer::kernel::test_run::lookup_ctx(Protocol::Tcp, SocketAddr::new(addr, port), remote.parse().unwrap());
        let run = steer::kernel::test_run::run(program.as_fd(), &ctx, 1).unwrap();
        let want = model(rules, addr, port).map(|label| cookies[label]).unwrap_or(0);
        assert_eq!(run.cookie, want, "{what}: {addr} port {port}: the kernel assigned another socket\n{rules:#?}");
        assert_eq!(run.retval, 1, "{what}: {addr} port {port} dropped");
        if want == 0 {
            misses += 1;
        } else {
            hits += 1;
        }
    }
    (hits, misses)
}

#[test]
fn random_sets_of_many_lengths_agree_with_the_model_in_the_kernel() {
    let (ns, layout, labels, cookies, _sockets) = six_labels("randkernel");
    let program = steer::kernel::links::open_program(&layout.program()).unwrap();
    // Seeded, so a failing round reproduces.
    let mut rng = fastrand::Rng::with_seed(0x5eed_4b1d_0000_0001);
    // Lookups the model expects a socket for, and misses: both must be
    // common, or the rounds test little (a program that assigned nothing
    // would pass every miss).
    let (mut hits, mut misses) = (0, 0);
    for round in 0..40 {
        let mut rules: Vec<Rule> = Vec::new();
        for _ in 0..rng.usize(1..=60) {
            let rule = random_rule(&mut rng, &labels);
            if !rules.iter().any(|o| (o.addr, o.len, o.port) == (rule.addr, rule.len, rule.port)) {
                rules.push(rule);
            }
        }
        let file = BindingsFile { bindings: rules.iter().map(|r| r.binding(Protocol::Tcp)).collect() };
        ns.enter(|| load_bindings(&Dispatcher::open_write(&layout).unwrap(), &file).unwrap());
        let (h, m) = check_lookups(&program, &mut rng, &rules, &cookies, 250, &format!("round {round}"));
        hits += h;
        misses += m;
    }
    assert!(hits >= 5_000 && misses >= 2_000, "{hits} hits and {misses} misses of {} lookups", 40 * 250);
}

/// Binds and unbinds one at a time, and sometimes several at once (one
/// switch), which rewrites only the segments each touches (in place, past
/// the arena's top): after every write the kernel answers as the model does. Most writes must be in place, or this tests
/// the full publish again.
#[test]
fn random_binds_and_unbinds_agree_with_the_model_in_the_kernel() {
    let (ns, layout, labels, cookies, _sockets) = six_labels("randwrites");
    let program = steer::kernel::links::open_program(&layout.program()).unwrap();
    let mut rng = fastrand::Rng::with_seed(0x5eed_4b1d_0000_0002);
    let mut rules: Vec<Rule> = Vec::new();
    let (mut hits, mut misses, mut in_place) = (0, 0, 0);
    let writes = 400;
    for write in 0..writes {
        let top_before = ns.enter(|| Dispatcher::open_read(&layout).unwrap().meta().unwrap().arena_top);
        if rules.len() > 10 && rng.u8(..6) == 0 {
            // Several at once, in one switch: some leave, some come.
            let gone: Vec<Rule> = (0..rng.usize(1..4)).map(|_| rules.swap_remove(rng.usize(..rules.len()))).collect();
            let mut come: Vec<Rule> = Vec::new();
            for _ in 0..rng.usize(0..6) {
                let rule = random_rule(&mut rng, &labels);
                let taken = |o: &Rule| (o.addr, o.len, o.port) == (rule.addr, rule.len, rule.port);
                if !rules.iter().any(taken) && !come.iter().any(taken) && !gone.iter().any(taken) {
                    come.push(rule);
                }
            }
            let added: Vec<Binding> = come.iter().map(|r| r.binding(Protocol::Tcp)).collect();
            let removed: Vec<Binding> = gone.iter().map(|r| r.binding(Protocol::Tcp)).collect();
            ns.enter(|| change_bindings(&Dispatcher::open_write(&layout).unwrap(), &added, &removed).unwrap());
            rules.extend(come);
        } else if rules.len() > 5 && rng.u8(..3) == 0 {
            let gone = rules.swap_remove(rng.usize(..rules.len()));
            ns.enter(|| unbind(&Dispatcher::open_write(&layout).unwrap(), &gone.binding(Protocol::Tcp)).unwrap());
        } else {
            let rule = random_rule(&mut rng, &labels);
            if rules.iter().any(|o| (o.addr, o.len, o.port) == (rule.addr, rule.len, rule.port)) {
                continue;
            }
            let binding = rule.binding(Protocol::Tcp);
            assert!(ns.enter(|| bind(&Dispatcher::open_write(&layout).unwrap(), &binding).unwrap()));
            rules.push(rule);
        }
        let meta = ns.enter(|| Dispatcher::open_read(&layout).unwrap().meta().unwrap());
        assert_eq!(meta.bindings as usize, rules.len(), "write {write}: bindings counted");
        assert_eq!((meta.halves_differ, meta.plane_version), (0, meta.record_version), "write {write}");
        // A full publish restarts the arena at the live ranges.
        if meta.arena_top >= top_before && meta.arena_top > meta.arena_live {
            in_place += 1;
        }
        let (h, m) = check_lookups(&program, &mut rng, &rules, &cookies, 40, &format!("write {write}"));
        hits += h;
        misses += m;
    }
    assert!(in_place >= writes * 3 / 4, "only {in_place} of {writes} writes were in place");
    assert!(hits >= 4_000 && misses >= 2_000, "{hits} hits and {misses} misses");
    drop(ns);
}

/// Lookups that run while bindings of their segment change, one write at a
/// time, see the set before each write or after it, never a mix: a host
/// binding on port 80 keeps its answer through 300 binds and unbinds of
/// other prefixes on port 80 and on the wildcard, each of which moves the
/// port's segment in the arena while the kernel reads it.
#[test]
fn lookups_during_single_writes_see_one_set_or_the_other() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let (ns, layout, labels, cookies, _sockets) = six_labels("midwrite");
    let program = Arc::new(steer::kernel::links::open_program(&layout.program()).unwrap());
    let kept = Rule::new(&labels[0], "10.1.2.3".parse().unwrap(), 32, 80);
    ns.enter(|| bind(&Dispatcher::open_write(&layout).unwrap(), &kept.binding(Protocol::Tcp)).unwrap());
    let want = cookies[&labels[0]];
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (program, done) = (program.clone(), done.clone());
        std::thread::spawn(move || {
            let ctx = steer::kernel::test_run::lookup_ctx(
                Protocol::Tcp,
                "10.1.2.3:80".parse().unwrap(),
                "127.0.0.1:40000".parse().unwrap(),
            );
            let (mut runs, mut wrong) = (0u64, Vec::new());
            // Bounded in count; ends when the writes are done.
            while !done.load(Ordering::SeqCst) && runs < 2_000_000 {
                let run = steer::kernel::test_run::run(program.as_fd(), &ctx, 64).unwrap();
                runs += 64;
                if run.cookie != want && wrong.len() < 10 {
                    wrong.push(run.cookie);
                }
            }
            (runs, wrong)
        })
    };
    let mut rng = fastrand::Rng::with_seed(0x5eed_4b1d_0000_0003);
    let mut bound: Vec<Rule> = Vec::new();
    for _ in 0..300 {
        if bound.len() > 10 && rng.bool() {
            let gone = bound.swap_remove(rng.usize(..bound.len()));
            ns.enter(|| unbind(&Dispatcher::open_write(&layout).unwrap(), &gone.binding(Protocol::Tcp)).unwrap());
            continue;
        }
        // Anything but a longer prefix over 10.1.2.3 (none is longer than /32).
        let host = IpAddr::V4(Ipv4Addr::new(10, 1, rng.u8(..), rng.u8(..)));
        let rule =
            Rule::new(&labels[1 + rng.usize(..5)], host, [32, 24, 20, 12][rng.usize(..4)], [80, 0][rng.usize(..2)]);
        if (rule.addr, rule.len, rule.port) == (kept.addr, kept.len, kept.port)
            || bound.iter().any(|o| (o.addr, o.len, o.port) == (rule.addr, rule.len, rule.port))
        {
            continue;
        }
        ns.enter(|| bind(&Dispatcher::open_write(&layout).unwrap(), &rule.binding(Protocol::Tcp)).unwrap());
        bound.push(rule);
    }
    done.store(true, Ordering::SeqCst);
    let (runs, wrong) = reader.join().unwrap();
    assert!(wrong.is_empty(), "{} lookups of 10.1.2.3:80 found other sockets: {wrong:?}", wrong.len());
    assert!(runs >= 10_000, "only {runs} lookups ran during the writes");
    drop(ns);
}
