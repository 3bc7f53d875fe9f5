//! steer-bench: what steering costs, measured side by side in one run, in a
//! network namespace the benchmark creates for itself: connection rates
//! against a native listener, per-lookup program cost against an empty
//! program across binding sets, the control plane's cost, and servers
//! followed by the kernel against `steerctl watch` polling.

mod bpf;
mod control;
mod cost;
mod follow;
mod rate;
mod sandbox;
mod scale;
mod sets;
mod tracing;

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use steer::{
    Dispatcher,
    common::names::{PASS_PROGRAM, STEER_PROGRAM},
    model::Protocol,
    model::{Binding, BindingsFile, Prefix},
};
use tabled::{Table, Tabled, settings::Style};

use crate::{
    cost::{CostRow, Skipped},
    rate::{RateRow, TcpWorkload, UdpWorkload, Workload},
    sandbox::Sandbox,
    sets::SetRow,
};

/// Connection-rate goals (issue targets): steered/native and
/// unrelated/native, TCP then UDP. Reported, not enforced.
const GOAL_STEERED: [f64; 2] = [0.97, 0.95];
const GOAL_UNRELATED: [f64; 2] = [0.99, 0.97];
/// Per-lookup goals: unrelated traffic within 2x of the empty program;
/// hits and misses under 120 ns and flat across sets (largest/smallest).
const GOAL_UNRELATED_OVER_EMPTY: f64 = 2.0;
const GOAL_LOOKUP_NS: f64 = 120.0;
const GOAL_FLAT: f64 = 1.5;
/// Following: a followed server's restart fails no connection begun after
/// its new listen() returned; an idle watch with everything followed
/// costs at most this share of a core.
const GOAL_FOLLOWED_FAILED: f64 = 0.0;
const GOAL_IDLE_CPU_PERCENT: f64 = 0.1;

const NATIVE_PORT: u16 = 7001;
/// Where the steered-to sockets are bound; clients never address it.
const TARGET_PORT: u16 = 7002;
/// Bound to the steered label, nothing listening: only sk_lookup delivers here.
const STEERED_PORT: u16 = 7777;
/// Listed in the seed's `echo_ports` for the seed program cost rows.
const SEED_PORT: u16 = 7007;

#[derive(Parser)]
#[command(version, about = "Benchmark steered vs native sockets (run as root; uses its own network namespace)")]
struct Args {
    /// Print a JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// Tiny counts, for smoke tests: finishes in seconds, numbers are noisy.
    #[arg(long)]
    quick: bool,
    /// Another build's dispatch.bpf.o (such as `git show
    /// REV:dispatch-ebpf/dispatch.bpf.o`): its steer_dispatch runs on the
    /// same maps, timed interleaved with this build's on every binding set.
    /// May be given more than once (this build's own object too: the
    /// difference two loads of one program show is the noise floor).
    #[arg(long, value_name = "OBJECT")]
    baseline: Vec<std::path::PathBuf>,
    /// Only the per-lookup groups: the binding sets, tracing and the
    /// baseline (about 15 s), for repeated runs of the program's cost.
    #[arg(long)]
    lookups_only: bool,
    /// Only the writes-at-scale rows (a 100,000 and a 1,000,000 binding
    /// set; with --quick, 2,000).
    #[arg(long)]
    scale: bool,
}

struct Counts {
    rounds: usize,
    tcp_ops: usize,
    udp_ops: usize,
    test_repeat: u32,
    test_samples: usize,
    labels: usize,
    bind_sample: usize,
}

impl Counts {
    fn new(quick: bool) -> Self {
        if quick {
            Counts {
                rounds: 1,
                tcp_ops: 50,
                udp_ops: 200,
                test_repeat: 100,
                test_samples: 1,
                labels: 16,
                bind_sample: 1,
            }
        } else {
            Counts {
                rounds: 11,
                tcp_ops: 4000,
                udp_ops: 20000,
                test_repeat: 200_000,
                test_samples: 9,
                labels: 4096,
                bind_sample: 20,
            }
        }
    }
}

#[derive(Serialize)]
struct Report {
    quick: bool,
    /// Only the per-lookup groups ran (`--lookups-only`).
    lookups_only: bool,
    /// The one CPU every benchmark thread runs on.
    cpu: usize,
    kernel: String,
    connection_rate: Vec<RateRow>,
    /// The seed port list's path, against the seed's C program.
    program_cost: Vec<CostRow>,
    /// steer_dispatch across binding sets.
    program_cost_by_set: Vec<SetRow>,
    /// The `--baseline` objects timed beside this build's, in order.
    baselines: Vec<String>,
    /// steer_dispatch with tracing off and on, on the last binding set.
    tracing_set: String,
    tracing: Vec<tracing::TraceRow>,
    /// Largest over smallest hit and miss cost across the sets.
    hit_spread: f64,
    miss_spread: f64,
    control_plane: Vec<control::ControlRow>,
    /// Kernel-followed servers against watch-polled ones.
    following: follow::FollowReport,
    skipped: Vec<Skipped>,
}

fn main() -> Result<()> {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == scale::MEASURE_CHILD) {
        return scale::measure_child(&argv[2..]);
    }
    let args = Args::parse();
    // Read before the sandbox's tmpfs hides the temp dir.
    let baselines = args
        .baseline
        .iter()
        .map(|path| {
            Ok(Baseline {
                name: path.display().to_string(),
                object: std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // First, while the process is still single-threaded.
    let sandbox = Sandbox::enter()?;
    let cpu = pin_to_one_cpu()?;
    if args.scale {
        let rows = scale_rows(&sandbox, args.quick)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else {
            print_scale(&rows);
        }
        return Ok(());
    }
    let report = bench(&sandbox, Counts::new(args.quick), &args, cpu, &baselines)?;
    if args.json {
        for s in &report.skipped {
            eprintln!("{s}");
        }
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&report);
    }
    Ok(())
}

/// Sizes of the writes-at-scale rows.
fn scale_sizes(quick: bool) -> Vec<usize> {
    if quick { vec![2_000] } else { vec![100_000, 1_000_000] }
}

/// The writes-at-scale rows, on a state of their own.
fn scale_rows(sandbox: &Sandbox, quick: bool) -> Result<Vec<scale::ScaleRow>> {
    let layout = steer::Layout::new(sandbox.bpffs.join("steer-scale"));
    steer::ops::lifecycle::load(&layout).context("loading steer's dispatcher")?;
    let steerctl = control::steerctl_binary();
    let mut rows = Vec::new();
    for n in scale_sizes(quick) {
        let set = sets::generate(&format!("{n} bindings"), n, &sets::spread(33), false);
        rows.push(scale::measure(&layout, &set, if quick { 3 } else { 21 }, steerctl.as_deref(), &sandbox.dir)?);
    }
    steer::ops::lifecycle::unload(steer::Dispatcher::open_repair(&layout)?)?;
    Ok(rows)
}

fn print_scale(rows: &[scale::ScaleRow]) {
    let mib = |b: u64| format!("{:.0} MiB", b as f64 / (1 << 20) as f64);
    let ms = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1} ms"));
    let mut b = tabled::builder::Builder::default();
    b.push_record([
        "bindings",
        "bind (median)",
        "unbind",
        "bind into the largest segment",
        "steerctl bind",
        "load-bindings (library / steerctl)",
        "steerctl peak RSS (load)",
        "kernel memory per binding",
        "steerctl status",
        "steerctl --json bindings",
    ]);
    for r in rows {
        b.push_record([
            r.bindings.to_string(),
            format!("{:.1} ms", r.bind_ms),
            format!("{:.1} ms", r.unbind_ms),
            format!("{:.1} ms", r.bind_into_largest_segment_ms),
            ms(r.steerctl_bind_ms),
            format!(
                "{:.2} s / {}",
                r.load_seconds,
                r.steerctl_load_seconds.map_or("-".into(), |s| format!("{s:.2} s"))
            ),
            r.steerctl_load_peak_rss_bytes.map_or("-".into(), mib),
            format!("{:.0} B", r.kernel_bytes_per_binding),
            ms(r.steerctl_status_ms),
            r.steerctl_bindings_json_seconds.map_or("-".into(), |s| format!("{s:.2} s")),
        ]);
    }
    println!("\nWrites at scale (medians of {} writes each)", rows.first().map_or(0, |r| r.sample));
    println!("{}", b.build().with(Style::sharp()));
    for r in rows {
        let maps: Vec<String> = r.kernel_bytes_by_map.iter().map(|(m, v)| format!("{m} {}", mib(*v))).collect();
        println!("{} bindings: kernel memory by map: {}", r.bindings, maps.join(", "));
    }
}

/// Pins the process, and so every thread it spawns later, to one CPU.
/// Client and servers ping-pong; left free, the scheduler sometimes puts
/// them on one CPU and sometimes on two, and rates jump by half between
/// runs. On one CPU each op costs its CPU time, steered or not.
fn pin_to_one_cpu() -> Result<usize> {
    use nix::{
        sched::{CpuSet, sched_getaffinity, sched_setaffinity},
        unistd::Pid,
    };
    let allowed = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    // The last allowed CPU: CPU 0 tends to take more interrupts.
    let cpu = (0..CpuSet::count()).rev().find(|&c| allowed.is_set(c).unwrap_or(false)).context("no CPU allowed")?;
    let mut one = CpuSet::new();
    one.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &one).context("sched_setaffinity")?;
    Ok(cpu)
}

/// Another build's object, for `--baseline`.
struct Baseline {
    name: String,
    object: Vec<u8>,
}

/// The baseline's steer_dispatch, loaded on the maps pinned in `layout`:
/// its maps must be ones the state has, of the same shapes.
fn baseline_program(layout: &steer::Layout, baseline: &Baseline) -> Result<(aya::Ebpf, std::os::fd::OwnedFd)> {
    let mut loader = aya::EbpfLoader::new();
    for m in steer::common::MAPS {
        loader.map_pin_path(m.name, layout.map(m.name));
    }
    let mut ebpf = loader.load(&baseline.object).with_context(|| format!("loading {}", baseline.name))?;
    let program: &mut aya::programs::SkLookup =
        ebpf.program_mut(STEER_PROGRAM).context("no steer_dispatch in the baseline object")?.try_into()?;
    program.load().context("loading the baseline steer_dispatch")?;
    let fd = program.fd()?.as_fd().try_clone_to_owned()?;
    Ok((ebpf, fd))
}

/// The object's empty program, loaded on its own as the baseline.
fn empty_program() -> Result<(aya::Ebpf, std::os::fd::OwnedFd)> {
    let mut ebpf = aya::EbpfLoader::new().load(steer::DISPATCH_OBJECT)?;
    let program: &mut aya::programs::SkLookup =
        ebpf.program_mut(PASS_PROGRAM).context("no empty program in the object")?.try_into()?;
    program.load()?;
    let fd = program.fd()?.as_fd().try_clone_to_owned()?;
    Ok((ebpf, fd))
}

fn bench(sandbox: &Sandbox, counts: Counts, args: &Args, cpu: usize, baselines: &[Baseline]) -> Result<Report> {
    let (quick, lookups_only) = (args.quick, args.lookups_only);
    let layout = steer::Layout::new(sandbox.bpffs.join("steer"));
    let (state, _) = steer::ops::lifecycle::load(&layout).context("loading steer's dispatcher")?;
    let mut tcp = TcpWorkload::start(NATIVE_PORT, TARGET_PORT, STEERED_PORT)?;
    let mut udp = UdpWorkload::start(NATIVE_PORT, TARGET_PORT, STEERED_PORT)?;
    let (_empty_object, empty) = empty_program()?;

    // The seed path: a listed port and the seed socket, timed against the
    // Rust seed program alone and the seed's C program.
    steer::ops::seed::add_ports(&state, &[SEED_PORT])?;
    steer::kernel::maps::SocketMap::open(&layout.socket())?.insert(0, tcp.listener().as_fd())?;
    let mut skipped = Vec::new();
    let mut program_cost = Vec::new();
    if !lookups_only {
        let mut programs =
            vec![cost::Program { name: format!("{STEER_PROGRAM} (steerctl's)"), fd: bpf::obj_get(&layout.program())? }];
        for extra in [
            cost::rust_echo(sandbox, SEED_PORT, tcp.listener().as_fd()),
            cost::c_reference(sandbox, SEED_PORT, tcp.listener().as_fd()),
        ] {
            match extra {
                Ok(p) => programs.push(p),
                Err(s) => skipped.push(s),
            }
        }
        let hit = bpf::loopback_v4(Protocol::Tcp, SEED_PORT);
        let miss = bpf::loopback_v4(Protocol::Tcp, NATIVE_PORT);
        program_cost = cost::measure(&programs, &hit, &miss, counts.test_repeat, counts.test_samples)?;
    }
    // The rest runs with the seed list off, as a labels-only host would.
    steer::ops::seed::remove_ports(&state, &[SEED_PORT])?;
    steer::ops::seed::clear_socket(&state)?;
    drop(state);

    let sets = sets::standard(quick);
    let baseline_programs =
        baselines.iter().map(|object| baseline_program(&layout, object)).collect::<Result<Vec<_>>>()?;
    let program_cost_by_set = sets::measure(
        &layout,
        &sets,
        tcp.listener(),
        empty.as_fd(),
        &baseline_programs.iter().map(|(_, fd)| fd.as_fd()).collect::<Vec<_>>(),
        counts.test_repeat,
        counts.test_samples,
    )?;
    drop(baseline_programs);
    // The last set is still loaded, its hit's socket registered.
    let last = sets.last().context("no sets")?;
    let tracing = tracing::measure(&layout, &sets::contexts(last), counts.test_repeat, counts.test_samples)?;
    let spread = |f: fn(&SetRow) -> f64| {
        let v: Vec<f64> = program_cost_by_set.iter().map(f).collect();
        v.iter().cloned().fold(f64::MIN, f64::max) / v.iter().cloned().fold(f64::MAX, f64::min)
    };
    let (hit_spread, miss_spread) = (spread(|r| r.hit_ns), spread(|r| r.miss_ns));
    let mut report = Report {
        quick,
        lookups_only,
        cpu,
        kernel: nix::sys::utsname::uname()?.release().to_string_lossy().into_owned(),
        connection_rate: Vec::new(),
        program_cost,
        program_cost_by_set,
        baselines: baselines.iter().map(|b| b.name.clone()).collect(),
        tracing_set: last.name.clone(),
        tracing,
        hit_spread,
        miss_spread,
        control_plane: Vec::new(),
        following: Default::default(),
        skipped,
    };
    if lookups_only {
        steer::ops::lifecycle::unload(steer::Dispatcher::open_repair(&layout)?)?;
        return Ok(report);
    }

    // Connection rates with the 129-length set loaded, and the steered port
    // bound to the target sockets' label.
    let mut wide = sets.iter().find(|s| s.lengths == 129).context("no 129-length set")?.file.clone();
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        let prefix = Prefix::new(std::net::Ipv4Addr::LOCALHOST.into(), 32)?;
        wide.bindings.push(Binding { label: "steered".into(), protocol, prefix, port: STEERED_PORT });
    }
    {
        let state = Dispatcher::open_write(&layout)?;
        steer::ops::bindings::load_bindings(&state, &wide)?;
        for work in [&tcp as &dyn Workload, &udp] {
            let (_, socket) = work.target();
            steer::ops::register::register(
                &state,
                "steered",
                &steer::ops::register::Source::Socket(socket),
                &Default::default(),
            )?;
        }
    }
    let mut attached = false;
    let mut set_attached = |on: bool| -> Result<()> {
        if on != attached {
            if on {
                steer::ops::lifecycle::attach(&Dispatcher::open_write(&layout)?)?;
            } else {
                steer::ops::lifecycle::detach(&steer::Dispatcher::open_repair(&layout)?)?;
            }
            attached = on;
        }
        Ok(())
    };
    let workloads: [(&mut dyn Workload, usize); 2] = [(&mut tcp, counts.tcp_ops), (&mut udp, counts.udp_ops)];
    for (work, n) in workloads {
        report.connection_rate.push(rate::measure(work, &mut set_attached, counts.rounds, n)?);
    }
    set_attached(false)?;

    // The control plane gets every label id: drop the sockets holding two.
    {
        let state = Dispatcher::open_write(&layout)?;
        steer::ops::register::unregister(&state, "steered", None, None)?;
        steer::ops::register::unregister(&state, sets::HIT_LABEL, None, None)?;
    }
    let bulk = sets.last().context("no sets")?;
    report.control_plane = control::measure(&layout, bulk, counts.labels, counts.bind_sample, &sandbox.dir)?;
    steer::ops::bindings::load_bindings(&Dispatcher::open_write(&layout)?, &BindingsFile::default())?;
    let steerctl = control::steerctl_binary();
    report.following =
        follow::measure(&layout, &sandbox.dir, steerctl.as_deref(), &follow::Counts::new(quick), &mut report.skipped)?;
    steer::ops::lifecycle::unload(steer::Dispatcher::open_repair(&layout)?)?;
    Ok(report)
}

#[derive(Tabled)]
struct RateLine {
    #[tabled(rename = "test")]
    test: String,
    #[tabled(rename = "native ops/s")]
    native: String,
    #[tabled(rename = "unrelated service, 129-length set loaded")]
    unrelated: String,
    #[tabled(rename = "steered ops/s")]
    steered: String,
    #[tabled(rename = "steered/native")]
    ratio: String,
}

#[derive(Tabled)]
struct CostLine {
    #[tabled(rename = "program")]
    program: String,
    #[tabled(rename = "hit ns/lookup")]
    hit: String,
    #[tabled(rename = "miss ns/lookup")]
    miss: String,
}

fn verdict(value: f64, goal: f64, at_least: bool) -> &'static str {
    if (at_least && value >= goal) || (!at_least && value <= goal) { "" } else { " (below goal)" }
}

fn print_tables(report: &Report) {
    println!("Kernel {}, every thread on CPU {}.", report.kernel, report.cpu);
    let rates = report.connection_rate.iter().enumerate().map(|(i, r)| RateLine {
        test: format!("{} (x{}, {} rounds)", r.test, r.ops_per_round, r.rounds),
        native: format!("{:.0}", r.native_ops_per_s),
        unrelated: format!(
            "{:.0} ({:.3}, goal >= {}){}",
            r.unrelated_ops_per_s,
            r.unrelated_over_native,
            GOAL_UNRELATED[i],
            verdict(r.unrelated_over_native, GOAL_UNRELATED[i], true)
        ),
        steered: format!("{:.0}", r.steered_ops_per_s),
        ratio: format!(
            "{:.3} (goal >= {}){}",
            r.steered_over_native,
            GOAL_STEERED[i],
            verdict(r.steered_over_native, GOAL_STEERED[i], true)
        ),
    });
    if !report.lookups_only {
        println!("\nConnection rate (medians; ratios are medians of per-round ratios)");
        println!("{}", Table::new(rates).with(Style::sharp()));
    }

    if let Some(c) = report.program_cost.first() {
        println!("\nSeed port list: program cost (BPF_PROG_TEST_RUN, median of {} x {} runs)", c.samples, c.repeat);
        let costs = report.program_cost.iter().map(|c| CostLine {
            program: c.program.clone(),
            hit: format!("{:.0}", c.hit_ns),
            miss: format!("{:.0}", c.miss_ns),
        });
        println!("{}", Table::new(costs).with(Style::sharp()));
    }

    println!(
        "\nLabelled bindings: ns per lookup (goals: hit and miss <= {GOAL_LOOKUP_NS}, unrelated <= {GOAL_UNRELATED_OVER_EMPTY}x empty)"
    );
    let mut b = tabled::builder::Builder::default();
    b.push_record([
        "binding set",
        "bindings",
        "lengths",
        "hit",
        "miss in bound prefixes",
        "unrelated (x empty)",
        "empty",
        "memory",
    ]);
    for r in &report.program_cost_by_set {
        b.push_record([
            r.set.clone(),
            r.bindings.to_string(),
            r.distinct_lengths.to_string(),
            format!("{:.0}{}", r.hit_ns, verdict(r.hit_ns, GOAL_LOOKUP_NS, false)),
            format!("{:.0}{}", r.miss_ns, verdict(r.miss_ns, GOAL_LOOKUP_NS, false)),
            format!(
                "{:.0} ({:.2}x){}",
                r.unrelated_ns,
                r.unrelated_over_empty,
                verdict(r.unrelated_over_empty, GOAL_UNRELATED_OVER_EMPTY, false)
            ),
            format!("{:.0}", r.empty_ns),
            format!("{:.1} MiB ({:.1} MiB lookup chunks)", mib(r.memory_bytes), mib(r.chunk_bytes)),
        ]);
    }
    println!("{}", b.build().with(Style::sharp()));
    println!(
        "Spread across sets (largest/smallest, goal <= {GOAL_FLAT}): hits {:.2}{}, misses {:.2}{}",
        report.hit_spread,
        verdict(report.hit_spread, GOAL_FLAT, false),
        report.miss_spread,
        verdict(report.miss_spread, GOAL_FLAT, false)
    );

    for (i, object) in report.baselines.iter().enumerate() {
        println!("\nTracing off against the baseline ({object}): ns per lookup, this build / baseline");
        let mut b = tabled::builder::Builder::default();
        b.push_record(["binding set", "hit", "miss in bound prefixes", "unrelated"]);
        let vs = |now: f64, then: f64| format!("{now:.0} / {then:.0} ({:+.1}%)", (now / then - 1.0) * 100.0);
        for r in &report.program_cost_by_set {
            if let Some(base) = r.baselines.get(i) {
                b.push_record([
                    r.set.clone(),
                    vs(r.hit_ns, base.hit_ns),
                    vs(r.miss_ns, base.miss_ns),
                    vs(r.unrelated_ns, base.unrelated_ns),
                ]);
            }
        }
        println!("{}", b.build().with(Style::sharp()));
    }

    println!("\nTracing (steerctl trace) on {}: ns per lookup, one tracer", report.tracing_set);
    let mut b = tabled::builder::Builder::default();
    b.push_record(["tracing", "hit", "miss in bound prefixes", "unrelated", "sent", "lost"]);
    let off = report.tracing.first();
    for r in &report.tracing {
        let cost = |ns: f64, base: Option<f64>| match base {
            Some(base) if r.tracing != "off" => format!("{ns:.0} ({:+.0})", ns - base),
            _ => format!("{ns:.0}"),
        };
        b.push_record([
            r.tracing.clone(),
            cost(r.hit_ns, off.map(|o| o.hit_ns)),
            cost(r.miss_ns, off.map(|o| o.miss_ns)),
            cost(r.unrelated_ns, off.map(|o| o.unrelated_ns)),
            r.sent.to_string(),
            r.lost.to_string(),
        ]);
    }
    println!("{}", b.build().with(Style::sharp()));

    if !report.lookups_only {
        let mut b = tabled::builder::Builder::default();
        b.push_record(["operation", "bindings", "seconds"]);
        for r in &report.control_plane {
            let per = r.per_operation.map_or(String::new(), |p| format!(" ({:.1} ms each)", p * 1000.0));
            b.push_record([r.operation.clone(), r.bindings.to_string(), format!("{:.3}{per}", r.seconds)]);
        }
        println!("\nControl plane");
        println!("{}", b.build().with(Style::sharp()));
        print_following(&report.following);
    }
    for s in &report.skipped {
        println!("{s}");
    }
    if report.quick {
        println!("\n--quick: tiny counts, numbers are noise");
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn print_following(f: &follow::FollowReport) {
    use follow::{Restart, Way};
    let polled_head = format!("watch polling every {} ms", f.poll_interval_ms);
    let heads = ["followed by the kernel", polled_head.as_str()];
    if let Some(first) = f.restarts.first() {
        println!(
            "\nFollowing servers: {} restarts under load, a client connecting in a loop (connect + 1-byte read, 0.1 ms pause after a failure; failed: refused, reset or timed out)",
            first.restarts
        );
        let mut b = tabled::builder::Builder::default();
        b.push_record(["restart", "per restart", heads[0], heads[1]]);
        for (restart, what) in [
            (Restart::Graceful, "graceful: a new SO_REUSEPORT listener listens, then the old one closes"),
            (Restart::Hard, "hard: the old listener closes, then a new one binds and listens"),
        ] {
            let row = |way: Way| f.restarts.iter().find(|r| r.restart == restart && r.way == way);
            let measures = [
                "failed connections (max in one)",
                "failed after the new listen() returned",
                "ms from listen() to steered (median, max)",
            ];
            for (i, measure) in measures.into_iter().enumerate() {
                let cell = |way: Way| row(way).map_or("skipped".to_string(), |r| restart_cell(r, i));
                let what = if i == 0 { what } else { "" };
                b.push_record([what, measure, &cell(Way::Followed), &cell(Way::Polled)]);
            }
            let tried = |way: Way| row(way).map_or("skipped".to_string(), |r| r.connections.to_string());
            b.push_record(["", "connections tried in all", &tried(Way::Followed), &tried(Way::Polled)]);
        }
        println!("{}", b.build().with(Style::sharp()));
    }
    if let Some(first) = f.latency.first() {
        println!(
            "\nFollowing servers: from listen() / bind() returning to the first steered connection ({} servers each)",
            first.samples
        );
        let mut b = tabled::builder::Builder::default();
        b.push_record(["test", heads[0], heads[1]]);
        for (protocol, what) in [
            (Protocol::Tcp, "tcp: connect right after listen(), then every 0.1 ms"),
            (Protocol::Udp, "udp: a datagram right after bind(), then every 0.1 ms (watch running)"),
        ] {
            let cell = |way: Way| {
                let Some(r) = f.latency.iter().find(|r| r.protocol == protocol && r.way == way) else {
                    return "skipped".to_string();
                };
                let times = format!("median {:.2} ms, p99 {:.2} ms, max {:.2} ms", r.median_ms, r.p99_ms, r.max_ms);
                let missed = if r.missed > 0 { format!("; {} never steered", r.missed) } else { String::new() };
                match (protocol, way) {
                    (Protocol::Tcp, Way::Followed) => format!(
                        "{} of {} steered at once (goal all){}; {times}{missed}",
                        r.at_once,
                        r.samples,
                        verdict(r.at_once as f64, r.samples as f64, true)
                    ),
                    (Protocol::Tcp, Way::Polled) => format!("{} of {} at once; {times}{missed}", r.at_once, r.samples),
                    (Protocol::Udp, _) => format!("{times}{missed}"),
                }
            };
            b.push_record([what.to_string(), cell(Way::Followed), cell(Way::Polled)]);
        }
        println!("{}", b.build().with(Style::sharp()));
    }
    if let Some(first) = f.watch_idle.first() {
        println!(
            "\nFollowing servers: steerctl watch's CPU, idle for {:.1} s ({} registrations, {} unrelated TCP listeners; utime+stime from /proc/PID/stat, goal <= {GOAL_IDLE_CPU_PERCENT}% followed)",
            first.window_s, first.registrations, first.unrelated_listeners
        );
        let mut b = tabled::builder::Builder::default();
        b.push_record(["servers listening", heads[0], heads[1]]);
        let mut listening: Vec<usize> = f.watch_idle.iter().map(|r| r.listening).collect();
        listening.dedup();
        for n in listening {
            let cell = |way: Way| {
                let Some(r) = f.watch_idle.iter().find(|r| r.listening == n && r.way == way) else {
                    return "skipped".to_string();
                };
                let on_cpu = r.on_cpu_ms.map_or(String::new(), |ms| format!("; {ms:.1} ms on a CPU"));
                let goal = if way == Way::Followed { verdict(r.cpu_percent, GOAL_IDLE_CPU_PERCENT, false) } else { "" };
                format!("{:.2}% of a core ({} ticks{on_cpu}){goal}", r.cpu_percent, r.ticks)
            };
            let what = if n == first.registrations {
                format!("all {n}")
            } else {
                format!("{n} of {} ({} waiting for their server)", first.registrations, first.registrations - n)
            };
            b.push_record([what, cell(Way::Followed), cell(Way::Polled)]);
        }
        println!("{}", b.build().with(Style::sharp()));
    }
}

/// The `measure`th line of a restart row's cell.
fn restart_cell(r: &follow::RestartRow, measure: usize) -> String {
    match measure {
        0 => format!("{:.2} ({})", r.failed_per_restart, r.max_failed_in_one_restart),
        1 => {
            let n = r.failed_after_listen as f64 / r.restarts.max(1) as f64;
            if r.way == follow::Way::Followed {
                format!("{n:.2} (goal {GOAL_FOLLOWED_FAILED}){}", verdict(n, GOAL_FOLLOWED_FAILED, false))
            } else {
                format!("{n:.2}")
            }
        }
        _ => format!("{:.2}, {:.2}", r.steered_median_ms, r.steered_max_ms),
    }
}
