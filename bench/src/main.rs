//! steer-bench: steered vs native connection rates and per-lookup program
//! cost, measured in a network namespace the benchmark creates for itself.

mod bpf;
mod cost;
mod rate;
mod sandbox;
mod scale;

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Serialize;
use steer::{Dispatcher, common::names::STEER_PROGRAM, socket::Protocol};
use tabled::{Table, Tabled, settings::Style};

use crate::{
    cost::{CostRow, Skipped},
    rate::{RateRow, TcpWorkload, UdpWorkload, Workload},
    sandbox::Sandbox,
};

/// The steered/native connection-rate ratio to aim for; reported, not enforced.
const GOAL: f64 = 0.95;

const NATIVE_PORT: u16 = 7001;
/// Where the steered-to sockets are bound; clients never address it.
const TARGET_PORT: u16 = 7002;
/// Listed in `echo_ports`, nothing bound: only sk_lookup can deliver here.
const STEERED_PORT: u16 = 7777;
/// Bound through a labelled binding in the binding-count runs.
const SCALE_HIT_PORT: u16 = 8080;

#[derive(Parser)]
#[command(version, about = "Benchmark steered vs native sockets (run as root; uses its own network namespace)")]
struct Args {
    /// Print a JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// Tiny counts, for smoke tests: finishes in seconds, numbers are noisy.
    #[arg(long)]
    quick: bool,
}

struct Counts {
    bindings: Vec<usize>,
    control_bindings: usize,
    cli_sample: usize,
    rounds: usize,
    tcp_ops: usize,
    udp_ops: usize,
    test_repeat: u32,
    test_samples: usize,
}

impl Counts {
    fn new(quick: bool) -> Self {
        if quick {
            Counts {
                bindings: vec![1, 100],
                control_bindings: 100,
                cli_sample: 5,
                rounds: 3,
                tcp_ops: 200,
                udp_ops: 1000,
                test_repeat: 1000,
                test_samples: 3,
            }
        } else {
            Counts {
                bindings: vec![1, 100, 10_000, 100_000],
                control_bindings: 10_000,
                cli_sample: 200,
                rounds: 11,
                tcp_ops: 4000,
                udp_ops: 20000,
                test_repeat: 1_000_000,
                test_samples: 9,
            }
        }
    }
}

#[derive(Serialize)]
struct Report {
    quick: bool,
    /// The one CPU every benchmark thread runs on.
    cpu: usize,
    goal_steered_over_native: f64,
    connection_rate: Vec<RateRow>,
    program_cost: Vec<CostRow>,
    /// steer_dispatch against the number of bindings.
    program_cost_by_bindings: Vec<CostRow>,
    /// The largest count's hit cost over the single binding's; goal <= 1.2.
    largest_over_single_hit: f64,
    /// The same for misses.
    largest_over_single_miss: f64,
    control_plane: Vec<scale::ControlRow>,
    skipped: Vec<Skipped>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // First, while the process is still single-threaded.
    let sandbox = Sandbox::enter()?;
    let cpu = pin_to_one_cpu()?;
    let report = bench(&sandbox, Counts::new(args.quick), args.quick, cpu)?;
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

fn bench(sandbox: &Sandbox, counts: Counts, quick: bool, cpu: usize) -> Result<Report> {
    let layout = steer::Layout::new(sandbox.bpffs.join("steer"));
    Dispatcher::load(&layout).context("loading steer's dispatcher")?.0.add_ports(&[STEERED_PORT])?;
    // The benchmark swaps the seed socket between workloads; it owns the
    // sandbox, so it writes the map directly rather than under the lock.
    let sockets = steer::maps::SocketMap::<u32>::open(&layout.socket())?;

    let mut tcp = TcpWorkload::start(NATIVE_PORT, TARGET_PORT, STEERED_PORT)?;
    let mut udp = UdpWorkload::start(NATIVE_PORT, TARGET_PORT, STEERED_PORT)?;
    tcp.steer_to(&sockets)?;

    // Program cost first, while every socket map holds the TCP listener.
    let mut programs = vec![cost::Program {
        name: format!("{} (rust, steerctl's)", STEER_PROGRAM),
        fd: bpf::obj_get(&layout.program()).context("opening steer's pinned program")?,
    }];
    let mut skipped = Vec::new();
    let listener = tcp.listener();
    for extra in [
        cost::rust_echo(sandbox, STEERED_PORT, listener.as_fd()),
        cost::c_reference(sandbox, STEERED_PORT, listener.as_fd()),
    ] {
        match extra {
            Ok(p) => programs.push(p),
            Err(s) => skipped.push(s),
        }
    }
    let hit = bpf::loopback_v4(Protocol::Tcp, STEERED_PORT);
    let miss = bpf::loopback_v4(Protocol::Tcp, NATIVE_PORT);
    // Further rows (other programs, binding-count scaling) append here.
    let program_cost = cost::measure(&programs, &hit, &miss, counts.test_repeat, counts.test_samples)?;
    drop(programs);
    let program_cost_by_bindings = scale::program_cost_at_scale(
        &layout,
        tcp.listener(),
        &counts.bindings,
        SCALE_HIT_PORT,
        counts.test_repeat,
        counts.test_samples,
    )?;
    let (largest_over_single_hit, largest_over_single_miss) =
        match (program_cost_by_bindings.first(), program_cost_by_bindings.last()) {
            (Some(first), Some(last)) => (last.hit_ns / first.hit_ns, last.miss_ns / first.miss_ns),
            _ => (f64::NAN, f64::NAN),
        };
    let control_plane =
        scale::control_plane(&layout, counts.control_bindings, counts.cli_sample, &std::env::temp_dir())?;

    let mut attached = false;
    let mut set_attached = |on: bool| -> Result<()> {
        if on != attached {
            if on {
                Dispatcher::open_write(&layout)?.attach()?;
            } else {
                Dispatcher::open_write(&layout)?.detach()?;
            }
            attached = on;
        }
        Ok(())
    };
    let mut connection_rate = Vec::new();
    let workloads: [(&mut dyn Workload, usize); 2] = [(&mut tcp, counts.tcp_ops), (&mut udp, counts.udp_ops)];
    for (work, n) in workloads {
        work.steer_to(&sockets)?;
        connection_rate.push(rate::measure(work, &mut set_attached, counts.rounds, n)?);
    }
    Dispatcher::open_write(&layout)?.unload()?;

    Ok(Report {
        quick,
        cpu,
        goal_steered_over_native: GOAL,
        connection_rate,
        program_cost,
        program_cost_by_bindings,
        largest_over_single_hit,
        largest_over_single_miss,
        control_plane,
        skipped,
    })
}

#[derive(Tabled)]
struct RateLine {
    #[tabled(rename = "test")]
    test: String,
    #[tabled(rename = "native ops/s")]
    native: String,
    #[tabled(rename = "unlisted port, prog attached")]
    unlisted: String,
    #[tabled(rename = "steered ops/s")]
    steered: String,
    #[tabled(rename = "steered/native")]
    ratio: String,
    #[tabled(rename = "goal")]
    goal: String,
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

fn print_tables(report: &Report) {
    let rates = report.connection_rate.iter().map(|r| RateLine {
        test: format!("{} (x{}, {} rounds)", r.test, r.ops_per_round, r.rounds),
        native: format!("{:.0}", r.native_ops_per_s),
        unlisted: format!("{:.0} ({:.3})", r.unlisted_ops_per_s, r.unlisted_over_native),
        steered: format!("{:.0}", r.steered_ops_per_s),
        ratio: format!("{:.3}", r.steered_over_native),
        goal: if r.steered_over_native >= report.goal_steered_over_native {
            "met".into()
        } else {
            format!("below {}", report.goal_steered_over_native)
        },
    });
    println!("Connection rate on CPU {} (medians; ratios are medians of per-round ratios)", report.cpu);
    println!("{}", Table::new(rates).with(Style::sharp()));
    let costs = report.program_cost.iter().map(|c| CostLine {
        program: c.program.clone(),
        hit: format!("{:.0}", c.hit_ns),
        miss: format!("{:.0}", c.miss_ns),
    });
    if let Some(c) = report.program_cost.first() {
        println!("\nProgram cost (BPF_PROG_TEST_RUN, median of {} x {} runs)", c.samples, c.repeat);
    }
    println!("{}", Table::new(costs).with(Style::sharp()));
    let scaled = report.program_cost_by_bindings.iter().map(|c| CostLine {
        program: c.program.clone(),
        hit: format!("{:.0}", c.hit_ns),
        miss: format!("{:.0}", c.miss_ns),
    });
    println!(
        "\nProgram cost by number of bindings (largest / single: hits {:.2}, misses {:.2}; goal <= 1.2)",
        report.largest_over_single_hit, report.largest_over_single_miss
    );
    println!("{}", Table::new(scaled).with(Style::sharp()));
    let mut b = tabled::builder::Builder::default();
    b.push_record(["operation", "bindings", "seconds"]);
    for r in &report.control_plane {
        b.push_record([
            r.operation.clone(),
            r.bindings.to_string(),
            format!("{:.3}{}", r.seconds, if r.extrapolated { " (extrapolated)" } else { "" }),
        ]);
    }
    println!("\nControl plane: time to add bindings");
    println!("{}", b.build().with(Style::sharp()));
    for s in &report.skipped {
        println!("{s}");
    }
    if report.quick {
        println!("\n--quick: tiny counts, numbers are noise");
    }
}
