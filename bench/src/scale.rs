//! Lookup cost against the number of bindings, and the control plane's
//! cost of adding many bindings.

use std::{
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd,
    path::Path,
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use steer::{
    Dispatcher, Layout,
    bindings::{Binding, BindingsFile, Prefix},
    common::names::STEER_PROGRAM,
    socket::Protocol,
};

use crate::cost::{self, CostRow, Program};

/// The label every synthetic binding set routes the hit lookup to.
const LABEL: &str = "bench";
/// Hit and miss addresses sit inside the densely bound 10.0.0.0/8, so both
/// lookups walk the trie as deep as the bindings make it.
const HIT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 123, 45, 67);
const MISS_ADDR: Ipv4Addr = Ipv4Addr::new(10, 123, 45, 68);
/// Spread of the synthetic labels (ids are allocated per label).
const LABELS: usize = 16;

/// `n` bindings: one that `hit_port` on HIT_ADDR matches, the rest
/// distinct /32s, /28s and /24s across 10.0.0.0/8 on exact and wildcard
/// ports (none covering MISS_ADDR), so the trie grows deep and wide as n does.
pub fn synthetic(n: usize, hit_port: u16) -> BindingsFile {
    let mut bindings = vec![Binding {
        label: LABEL.into(),
        protocol: Protocol::Tcp,
        prefix: Prefix::new(IpAddr::V4(HIT_ADDR), 32).unwrap(),
        port: hit_port,
    }];
    for i in 1..n {
        let i = i as u32;
        let addr = Ipv4Addr::from(0x0a00_0000 | (i.wrapping_mul(2_654_435_761) & 0x00ff_ffff));
        let (len, port) = match i % 4 {
            0 => (24, 0),
            1 => (32, 443),
            2 => (32, 0),
            _ => (28, 80),
        };
        bindings.push(Binding {
            label: format!("l{}", i as usize % LABELS),
            protocol: if i.is_multiple_of(5) { Protocol::Udp } else { Protocol::Tcp },
            prefix: Prefix::new(IpAddr::V4(addr), len).unwrap(),
            port,
        });
    }
    // Hashing can land two on one key with different labels: keep the first.
    let mut seen = std::collections::HashSet::new();
    bindings.retain(|b| seen.insert((b.protocol, b.prefix, b.port)));
    bindings.retain(|b| !b.prefix.contains(IpAddr::V4(MISS_ADDR)));
    BindingsFile { bindings }
}

/// Program cost of steer's program at each binding count. The hit goes
/// through a binding to `socket`, registered under the bench label; the
/// miss matches no binding and no seed port.
pub fn program_cost_at_scale(
    layout: &Layout,
    socket: &std::net::TcpListener,
    counts: &[usize],
    hit_port: u16,
    repeat: u32,
    samples: usize,
) -> Result<Vec<CostRow>> {
    let mut hit = crate::bpf::loopback_v4(Protocol::Tcp, hit_port);
    hit.local_ip4 = u32::from_ne_bytes(HIT_ADDR.octets());
    let mut miss = hit;
    miss.local_ip4 = u32::from_ne_bytes(MISS_ADDR.octets());
    let info = steer::socket::inspect(socket.as_fd())?;
    let mut rows = Vec::new();
    for &n in counts {
        let file = synthetic(n, hit_port);
        let state = Dispatcher::open_write(layout)?;
        state.load_bindings(&file)?;
        state.register(LABEL, &[(&info, socket.as_fd())])?;
        drop(state);
        let lengths: std::collections::BTreeSet<u8> = file.bindings.iter().map(|b| b.prefix.len).collect();
        let program = Program {
            name: format!("{STEER_PROGRAM} with {n} bindings ({} prefix lengths)", lengths.len()),
            fd: crate::bpf::obj_get(&layout.program())?,
        };
        rows.extend(cost::measure(std::slice::from_ref(&program), &hit, &miss, repeat, samples)?);
    }
    Dispatcher::open_write(layout)?.load_bindings(&BindingsFile::default())?;
    Ok(rows)
}

#[derive(Debug, Clone, Serialize)]
pub struct ControlRow {
    pub operation: String,
    pub bindings: usize,
    pub seconds: f64,
    /// True when timed on a sample and scaled up to `bindings`.
    pub extrapolated: bool,
}

/// Time to add `n` bindings: one `load-bindings`, and `n` single binds,
/// both through the library (as steerctl runs them) and, when the steerctl
/// binary sits beside this one, through the command line.
pub fn control_plane(layout: &Layout, n: usize, cli_sample: usize, scratch: &Path) -> Result<Vec<ControlRow>> {
    let file = synthetic(n, 1);
    let n = file.bindings.len();
    let mut rows = Vec::new();
    let reset = || -> Result<()> {
        Dispatcher::open_write(layout)?.load_bindings(&BindingsFile::default())?;
        Ok(())
    };

    reset()?;
    let start = Instant::now();
    Dispatcher::open_write(layout)?.load_bindings(&file)?;
    rows.push(ControlRow {
        operation: "load-bindings (library)".into(),
        bindings: n,
        seconds: start.elapsed().as_secs_f64(),
        extrapolated: false,
    });

    reset()?;
    let start = Instant::now();
    for b in &file.bindings {
        Dispatcher::open_write(layout)?.bind(b)?;
    }
    rows.push(ControlRow {
        operation: "repeated bind (library)".into(),
        bindings: n,
        seconds: start.elapsed().as_secs_f64(),
        extrapolated: false,
    });

    if let Some(steerctl) = steerctl_binary() {
        let pin_dir = layout.dir.to_str().context("pin dir is not UTF-8")?;
        reset()?;
        let path = scratch.join("bindings.json");
        std::fs::write(&path, serde_json::to_vec(&file)?)?;
        let start = Instant::now();
        run(Command::new(&steerctl).args(["--pin-dir", pin_dir, "load-bindings"]).arg(&path))?;
        rows.push(ControlRow {
            operation: "steerctl load-bindings".into(),
            bindings: n,
            seconds: start.elapsed().as_secs_f64(),
            extrapolated: false,
        });

        reset()?;
        let sample = cli_sample.min(n);
        let start = Instant::now();
        for b in &file.bindings[..sample] {
            let (prefix, port) = (b.prefix.to_string(), b.port.to_string());
            run(Command::new(&steerctl).args([
                "--pin-dir",
                pin_dir,
                "bind",
                &b.label,
                &b.protocol.to_string(),
                &prefix,
                &port,
            ]))?;
        }
        let per_call = start.elapsed().as_secs_f64() / sample as f64;
        rows.push(ControlRow {
            operation: format!("steerctl bind x{n} (from {sample})"),
            bindings: n,
            seconds: per_call * n as f64,
            extrapolated: true,
        });
    }
    reset()?;
    Ok(rows)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn steerctl_binary() -> Option<std::path::PathBuf> {
    let path = std::env::current_exe().ok()?.parent()?.join("steerctl");
    path.exists().then_some(path)
}
