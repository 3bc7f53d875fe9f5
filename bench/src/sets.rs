//! Binding sets that stress the lookup (many distinct prefix lengths, a hot
//! port, many bindings), and the program's cost on each: a hit, a miss
//! inside bound prefixes, and unrelated traffic, beside an empty program.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsFd, BorrowedFd},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use steer::{
    Dispatcher, Layout, ReadWrite,
    common::{SkLookupCtx, kernel::SK_PASS},
    kernel::test_run,
    model::{Binding, BindingsFile, Prefix, Protocol},
    ops::register::{Options, Source, register},
};

use crate::rate::median;

/// The label the hit resolves to; its socket is registered.
pub const HIT_LABEL: &str = "bench";
/// Inside the densely bound 10.0.0.0/8, on a port with exact bindings.
pub const HIT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 123, 45, 67);
pub const HIT_PORT: u16 = 8080;
/// In the hit's /16 bucket but not its /24 (so every set's hit binding
/// misses it), on the same port, covered by no binding.
const MISS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 123, 200, 1);
/// Where unrelated traffic goes: nothing is bound on its port or address.
const UNRELATED: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 22);
/// Ports short prefixes (wider than the dense regions) are bound on, so
/// they never cover unrelated traffic.
const SHORT_PREFIX_PORTS: [u16; 2] = [80, 443];
const LABELS: u32 = 16;

/// A set to measure.
pub struct BindingSet {
    pub name: String,
    pub file: BindingsFile,
    pub lengths: usize,
    /// The miss's port: the hit's, except on the hot port, where every
    /// address has a binding.
    pub miss_port: u16,
}

/// `count` distinct lengths in the v4-mapped space (0..=128), spread out,
/// always including 128; 33 means every IPv4 length (96..=128).
pub fn spread(count: usize) -> Vec<u8> {
    if count == 33 {
        return (96..=128).collect();
    }
    let mut lengths: BTreeSet<u8> = (0..count).map(|i| (128 - i * 128 / (count - 1).max(1)) as u8).collect();
    if count == 1 {
        lengths = [120].into();
    }
    lengths.into_iter().collect()
}

fn mapped(addr: IpAddr) -> u128 {
    u128::from_be_bytes(steer::model::prefix::mapped_addr(addr))
}

/// A prefix of `len` mapped bits around `addr` (IPv4 ones as IPv4).
fn prefix_at(addr: u128, len: u8) -> Prefix {
    let v6 = Ipv6Addr::from(addr);
    match v6.to_ipv4_mapped() {
        Some(v4) if len >= 96 => Prefix::new(IpAddr::V4(v4), len - 96).unwrap(),
        _ => Prefix::new(IpAddr::V6(v6), len).unwrap(),
    }
}

/// About `n` bindings of `lengths` (mapped), IPv4 and IPv6 mixed, in
/// 10.0.0.0/8 and 2001:db8::/32, on exact and wildcard ports; plus the
/// hit's binding, and `hot` prefixes of every length on the hit's port.
pub fn generate(name: &str, n: usize, lengths: &[u8], hot: bool) -> BindingSet {
    // Seeded: every run measures the same sets.
    let mut rng = fastrand::Rng::with_seed(0x5eed_0000_0000_0001 ^ n as u64 ^ (lengths.len() as u64) << 32);
    let v4_base = mapped(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)));
    let v6_base = mapped("2001:db8::".parse().unwrap());
    let mut bindings = vec![Binding {
        label: HIT_LABEL.into(),
        protocol: Protocol::Tcp,
        prefix: prefix_at(mapped(IpAddr::V4(HIT_ADDR)), *lengths.iter().max().unwrap()),
        port: HIT_PORT,
    }];
    if hot {
        // Every length but the hit's own, which the hit binding holds.
        for len in 0..128 {
            let label = format!("hot{}", len % LABELS as u8);
            bindings.push(Binding {
                label,
                protocol: Protocol::Tcp,
                prefix: prefix_at(mapped(IpAddr::V4(HIT_ADDR)), len),
                port: HIT_PORT,
            });
        }
    }
    // Generated keys collide now and then (and some cover the miss, below):
    // draw until `n` distinct keys remain.
    let miss = IpAddr::V4(MISS_ADDR);
    let miss_port = if hot { HIT_PORT + 1 } else { HIT_PORT };
    let covers_miss =
        |b: &Binding| b.prefix.covers(miss) && (b.port == 0 || b.port == miss_port) && b.protocol == Protocol::Tcp;
    let mut seen: BTreeSet<_> = bindings.iter().map(Binding::key).collect();
    bindings.retain(|b| !covers_miss(b));
    while bindings.len() < n {
        let len = lengths[rng.usize(..lengths.len())];
        // IPv4 only has lengths 96..=128 in the mapped space.
        let v4 = len >= 96 && rng.bool();
        let addr =
            if v4 { v4_base | u128::from(rng.u32(..0x0100_0000)) } else { v6_base | u128::from(rng.u64(..)) << 32 };
        let dense = if v4 { 104 } else { 32 };
        let port = if len < dense { SHORT_PREFIX_PORTS[rng.usize(..2)] } else { [0, 0, 443, HIT_PORT][rng.usize(..4)] };
        let binding = Binding {
            label: format!("l{}", rng.u32(..LABELS)),
            protocol: if rng.u8(..5) == 0 { Protocol::Udp } else { Protocol::Tcp },
            prefix: prefix_at(addr, len),
            port,
        };
        if !covers_miss(&binding) && seen.insert(binding.key()) {
            bindings.push(binding);
        }
    }
    let distinct: BTreeSet<u8> = bindings.iter().map(|b| b.prefix.mapped().1).collect();
    BindingSet { name: name.into(), lengths: distinct.len(), file: BindingsFile { bindings }, miss_port }
}

/// The sets the bench measures.
pub fn standard(quick: bool) -> Vec<BindingSet> {
    let n = if quick { 200 } else { 10_000 };
    let mut sets: Vec<BindingSet> =
        [1, 4, 16, 33, 64, 129].iter().map(|&l| generate(&format!("{l} lengths"), n, &spread(l), false)).collect();
    sets.push(generate("hot port: 129 lengths on one port", n, &spread(33), true));
    // The million before the 100,000: the last set is the one the tracing
    // and control-plane groups use.
    if !quick {
        sets.push(generate("1,000,000 bindings, 33 lengths", 1_000_000, &spread(33), false));
    }
    let big = if quick { 500 } else { 100_000 };
    sets.push(generate("100,000 bindings, 33 lengths", big, &spread(33), false));
    sets
}

/// What another build's program costs on the same set and lookups
/// (`--baseline`), measured interleaved with this build's.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineCost {
    pub hit_ns: f64,
    pub miss_ns: f64,
    pub unrelated_ns: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetRow {
    pub set: String,
    pub bindings: usize,
    pub distinct_lengths: usize,
    pub hit_ns: f64,
    pub miss_ns: f64,
    pub unrelated_ns: f64,
    /// The empty program, measured interleaved with this set's runs.
    pub empty_ns: f64,
    /// The `--baseline` programs, in the order given, measured interleaved too.
    pub baselines: Vec<BaselineCost>,
    pub unrelated_over_empty: f64,
    /// Kernel memory of all of steer's maps with this set loaded.
    pub memory_bytes: u64,
    /// Of which the compiled lookup chunks.
    pub chunk_bytes: u64,
    pub ranges: usize,
    pub load_seconds: f64,
}

pub fn run(fd: BorrowedFd<'_>, ctx: &SkLookupCtx, repeat: u32) -> Result<test_run::TestRun> {
    test_run::run(fd, ctx, repeat).context("BPF_PROG_TEST_RUN")
}

/// The lookups timed on `set`: a hit, a miss inside bound prefixes, and
/// unrelated traffic.
pub fn contexts(set: &BindingSet) -> [SkLookupCtx; 3] {
    let remote = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 40000);
    [
        test_run::lookup_ctx(Protocol::Tcp, SocketAddr::new(IpAddr::V4(HIT_ADDR), HIT_PORT), remote),
        test_run::lookup_ctx(Protocol::Tcp, SocketAddr::new(IpAddr::V4(MISS_ADDR), set.miss_port), remote),
        test_run::lookup_ctx(Protocol::Tcp, UNRELATED, remote),
    ]
}

/// Loads each set, registers the hit's socket, checks the program answers
/// each context as it must, and times them beside the empty program (and
/// the baseline programs, when given).
pub fn measure(
    layout: &Layout,
    sets: &[BindingSet],
    socket: &std::net::TcpListener,
    empty: BorrowedFd<'_>,
    baselines: &[BorrowedFd<'_>],
    repeat: u32,
    samples: usize,
) -> Result<Vec<SetRow>> {
    let info = steer::kernel::socket::inspect(socket.as_fd())?;
    let program = crate::bpf::obj_get(&layout.program())?;
    let mut rows = Vec::new();
    for set in sets {
        let [hit, miss, unrelated] = contexts(set);
        let state: Dispatcher<ReadWrite> = Dispatcher::open_write(layout)?;
        let start = std::time::Instant::now();
        let plane = steer::ops::bindings::load_bindings(&state, &set.file)?;
        let load_seconds = start.elapsed().as_secs_f64();
        register(&state, HIT_LABEL, &Source::Socket(socket.as_fd()), &Options::default())?;
        let memory: u64 = steer::state::plane::memory(state.layout())?.values().sum();
        drop(state);
        check(program.as_fd(), &set.name, [&hit, &miss, &unrelated], info.cookie)?;
        for (i, fd) in baselines.iter().enumerate() {
            check(*fd, &format!("{} (baseline {})", set.name, i + 1), [&hit, &miss, &unrelated], info.cookie)?;
        }
        let mut runs =
            vec![(program.as_fd(), &hit), (program.as_fd(), &miss), (program.as_fd(), &unrelated), (empty, &unrelated)];
        runs.extend(baselines.iter().flat_map(|fd| [(*fd, &hit), (*fd, &miss), (*fd, &unrelated)]));
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
        for _ in 0..samples {
            for (i, (fd, ctx)) in runs.iter().enumerate() {
                times[i].push(f64::from(run(*fd, ctx, repeat)?.duration_ns));
            }
        }
        let times: Vec<f64> = times.into_iter().map(median).collect();
        let (hit_ns, miss_ns, unrelated_ns, empty_ns) = (times[0], times[1], times[2], times[3]);
        let baselines = times[4..]
            .chunks_exact(3)
            .map(|t| BaselineCost { hit_ns: t[0], miss_ns: t[1], unrelated_ns: t[2] })
            .collect();
        rows.push(SetRow {
            set: set.name.clone(),
            bindings: set.file.bindings.len(),
            distinct_lengths: set.lengths,
            hit_ns,
            miss_ns,
            unrelated_ns,
            empty_ns,
            baselines,
            unrelated_over_empty: unrelated_ns / empty_ns,
            memory_bytes: memory,
            chunk_bytes: plane.chunk_bytes as u64,
            ranges: plane.ranges,
            load_seconds,
        });
    }
    Ok(rows)
}

/// Fails unless `program` answers the hit with the bench socket
/// (`cookie`) and the miss and unrelated lookups with no socket: else the
/// timings would be of some other path.
pub fn check(
    program: BorrowedFd<'_>,
    name: &str,
    [hit, miss, unrelated]: [&SkLookupCtx; 3],
    cookie: u64,
) -> Result<()> {
    let h = run(program, hit, 1)?;
    if h.retval != SK_PASS || h.cookie != cookie {
        bail!("{name}: the hit returned {} with cookie {}, not the bench socket", h.retval, h.cookie);
    }
    for (what, ctx) in [("miss", miss), ("unrelated", unrelated)] {
        let r = run(program, ctx, 1)?;
        if r.retval != SK_PASS || r.cookie != 0 {
            bail!("{name}: the {what} returned {} with cookie {}", r.retval, r.cookie);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sets_have_the_lengths_they_promise_and_keep_the_miss_a_miss() {
        for (l, want) in [(1, 1), (4, 4), (16, 16), (33, 33), (64, 64), (129, 129)] {
            let set = generate("t", 3000, &spread(l), false);
            assert_eq!(set.lengths, want, "{l}");
            let model = |addr: Ipv4Addr, port| {
                steer::model::binding::resolve(&set.file.bindings, Protocol::Tcp, IpAddr::V4(addr), port)
                    .map(|b| b.label.clone())
            };
            assert_eq!(model(HIT_ADDR, HIT_PORT).as_deref(), Some(HIT_LABEL));
            assert_eq!(model(MISS_ADDR, set.miss_port), None);
            assert_eq!(model(Ipv4Addr::LOCALHOST, 22), None);
        }
        let hot = generate("hot", 3000, &spread(33), true);
        let on_hot_port: BTreeSet<u8> =
            hot.file.bindings.iter().filter(|b| b.port == HIT_PORT).map(|b| b.prefix.mapped().1).collect();
        assert_eq!(on_hot_port.len(), 129);
    }
}
