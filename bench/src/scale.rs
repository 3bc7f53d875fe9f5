//! Writes at scale: one bind and one unbind on top of a large set (median
//! of many, each through its own handle as steerctl would), loading the
//! set whole, steerctl's peak memory doing it, the kernel memory per
//! binding, and how long `status` and `bindings` take.

use std::{os::unix::process::ExitStatusExt, path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use steer::{
    Dispatcher, Layout,
    model::{Binding, BindingsFile, Prefix, Protocol},
    ops::bindings::{bind, load_bindings, unbind},
};

use crate::{rate::median, sets::BindingSet};

#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    pub bindings: usize,
    /// `load-bindings` of the whole set through the library, and through
    /// steerctl with its peak resident memory.
    pub load_seconds: f64,
    pub steerctl_load_seconds: Option<f64>,
    pub steerctl_load_peak_rss_bytes: Option<u64>,
    /// Medians of `sample` single writes on top of the set: a new binding
    /// on a port of its own, the same removed, and one into the set's
    /// largest segment (a port most of its bindings share).
    pub bind_ms: f64,
    pub unbind_ms: f64,
    pub bind_into_largest_segment_ms: f64,
    pub steerctl_bind_ms: Option<f64>,
    pub sample: usize,
    /// Kernel memory of all maps, per binding, and the largest maps.
    pub kernel_bytes_per_binding: f64,
    pub kernel_bytes_by_map: Vec<(String, u64)>,
    pub steerctl_status_ms: Option<f64>,
    pub steerctl_bindings_json_seconds: Option<f64>,
}

fn millis(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}

/// The first argument that makes steer-bench run the rest as a command and
/// print its wall time and peak resident memory ([`measure_child`]).
pub const MEASURE_CHILD: &str = "--measure-child";

/// Runs `cmd`, returning its wall time and peak resident memory, measured
/// by a fresh steer-bench process ([`measure_child`]). Not from here: a
/// child's peak RSS counts the memory of the process that spawned it (at
/// exec the kernel keeps the peak of the memory it leaves, which for a
/// posix_spawn child is its parent's), and this process holds the sets.
fn run_measured(cmd: &mut Command) -> Result<(f64, u64)> {
    let exe = std::env::current_exe().context("finding steer-bench")?;
    let out = Command::new(exe)
        .arg(MEASURE_CHILD)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed");
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (seconds, rss) = text.trim().split_once(' ').with_context(|| format!("measuring {cmd:?}: {text:?}"))?;
    Ok((seconds.parse()?, rss.parse()?))
}

/// Runs `args` (a program and its arguments), printing its wall time in
/// seconds and peak resident memory in bytes; fails when it does. This
/// process is small and new, so the peak is the program's own.
pub fn measure_child(args: &[std::ffi::OsString]) -> Result<()> {
    let (program, args) = args.split_first().context("no command to measure")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let start = Instant::now();
    let child = cmd.stdout(std::process::Stdio::null()).spawn().with_context(|| format!("running {cmd:?}"))?;
    let mut status = 0;
    // Safety: an all-zero rusage is valid; wait4 fills it for this child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // Safety: waits for our own child, writing into the locals above.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let seconds = start.elapsed().as_secs_f64();
    if !std::process::ExitStatus::from_raw(status).success() {
        bail!("{cmd:?} failed");
    }
    println!("{seconds} {}", usage.ru_maxrss as u64 * 1024);
    Ok(())
}

/// Bindings no set holds: UDP hosts in 198.18.0.0/15 on port 5353.
fn extra(i: usize) -> Binding {
    let host = std::net::Ipv4Addr::from(0xc612_0000 | i as u32);
    Binding {
        label: format!("extra{}", i % 4),
        protocol: Protocol::Udp,
        prefix: Prefix::new(host.into(), 32).unwrap(),
        port: 5353,
    }
}

/// The set's most shared exact port, and a host binding on it no set holds.
fn into_largest(set: &BindingSet, i: usize) -> Binding {
    let mut ports = std::collections::BTreeMap::<(Protocol, u16), usize>::new();
    for b in set.file.bindings.iter().filter(|b| b.port != 0) {
        *ports.entry((b.protocol, b.port)).or_default() += 1;
    }
    let (&(protocol, port), _) = ports.iter().max_by_key(|(_, n)| **n).expect("the set has exact ports");
    let host = std::net::Ipv6Addr::from(0x2001_0db8_ffff_u128 << 80 | i as u128);
    Binding { label: "largest".into(), protocol, prefix: Prefix::new(host.into(), 128).unwrap(), port }
}

pub fn measure(
    layout: &Layout,
    set: &BindingSet,
    sample: usize,
    steerctl: Option<&Path>,
    scratch: &Path,
) -> Result<ScaleRow> {
    let n = set.file.bindings.len();
    let write = || Dispatcher::open_write(layout);
    let load_seconds = millis(|| Ok(load_bindings(&write()?, &set.file).map(|_| ())?))? / 1e3;
    let mut binds = Vec::new();
    let mut unbinds = Vec::new();
    let mut largest = Vec::new();
    for i in 0..sample {
        let b = extra(i);
        binds.push(millis(|| Ok(bind(&write()?, &b).map(|_| ())?))?);
        unbinds.push(millis(|| Ok(unbind(&write()?, &b)?))?);
        let b = into_largest(set, i);
        largest.push(millis(|| Ok(bind(&write()?, &b).map(|_| ())?))?);
    }
    for i in 0..sample {
        unbind(&write()?, &into_largest(set, i))?;
    }
    let memory = steer::state::plane::memory(layout)?;
    let total: u64 = memory.values().sum();
    let mut by_map: Vec<(String, u64)> = memory.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    by_map.sort_by_key(|(_, v)| std::cmp::Reverse(*v));
    by_map.truncate(4);
    let mut row = ScaleRow {
        bindings: n,
        load_seconds,
        steerctl_load_seconds: None,
        steerctl_load_peak_rss_bytes: None,
        bind_ms: median(binds.clone()),
        unbind_ms: median(unbinds),
        bind_into_largest_segment_ms: median(largest),
        steerctl_bind_ms: None,
        sample,
        kernel_bytes_per_binding: total as f64 / n as f64,
        kernel_bytes_by_map: by_map,
        steerctl_status_ms: None,
        steerctl_bindings_json_seconds: None,
    };
    if let Some(steerctl) = steerctl {
        let pin_dir = layout.dir.to_str().context("pin dir is not UTF-8")?;
        let ctl = || {
            let mut c = Command::new(steerctl);
            c.args(["--pin-dir", pin_dir]);
            c
        };
        let mut status = Vec::new();
        for _ in 0..sample.max(1) {
            status.push(run_measured(ctl().args(["--json", "status"]))?.0 * 1e3);
        }
        row.steerctl_status_ms = Some(median(status));
        row.steerctl_bindings_json_seconds = Some(run_measured(ctl().args(["--json", "bindings"]))?.0);
        let mut binds = Vec::new();
        for i in 0..sample {
            let b = extra(i);
            let (prefix, port) = (b.prefix.to_string(), b.port.to_string());
            binds.push(run_measured(ctl().args(["bind", &b.label, "udp", &prefix, &port]))?.0 * 1e3);
            run_measured(ctl().args(["unbind", &b.label, "udp", &prefix, &port]))?;
        }
        row.steerctl_bind_ms = Some(median(binds));
        load_bindings(&write()?, &BindingsFile::default())?;
        let path = scratch.join("scale.json");
        std::fs::write(&path, serde_json::to_vec(&set.file)?)?;
        let (seconds, rss) = run_measured(ctl().arg("load-bindings").arg(&path))?;
        std::fs::remove_file(&path)?;
        row.steerctl_load_seconds = Some(seconds);
        row.steerctl_load_peak_rss_bytes = Some(rss);
    }
    load_bindings(&write()?, &BindingsFile::default())?;
    Ok(row)
}
