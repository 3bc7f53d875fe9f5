//! Per-lookup program cost via BPF_PROG_TEST_RUN, for steer's programs and
//! the C reference.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
    process::Command,
};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use steer::common::{map, names};

use crate::{
    bpf::{self, SK_PASS, SkLookupCtx},
    rate::median,
    sandbox::{self, Sandbox},
};

const REFERENCE_SOURCE: &str = include_str!("../../reference/echo_dispatch.bpf.c");

/// A loaded sk_lookup program to time.
pub struct Program {
    pub name: String,
    pub fd: OwnedFd,
}

#[derive(Debug, Clone, Serialize)]
pub struct CostRow {
    pub program: String,
    /// Median of the kernel's mean ns per run: listed port, socket assigned.
    pub hit_ns: f64,
    /// Same for an unlisted port.
    pub miss_ns: f64,
    pub repeat: u32,
    pub samples: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub program: String,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.program.contains("reference") { "reference" } else { &self.program };
        write!(f, "{what}: skipped ({})", self.reason)
    }
}

/// Times every program on a hit and a miss lookup, interleaving programs
/// so that drift hits all of them alike. Each program's maps must list
/// `hit.local_port` and hold a socket matching `hit.protocol`.
pub fn measure(
    programs: &[Program],
    hit: &SkLookupCtx,
    miss: &SkLookupCtx,
    repeat: u32,
    samples: usize,
) -> Result<Vec<CostRow>> {
    for p in programs {
        check(p, hit, miss)?;
    }
    let mut times = vec![(Vec::new(), Vec::new()); programs.len()];
    for _ in 0..samples {
        for (p, (hits, misses)) in programs.iter().zip(&mut times) {
            hits.push(f64::from(run(p.fd.as_fd(), hit, repeat, &p.name)?.duration_ns));
            misses.push(f64::from(run(p.fd.as_fd(), miss, repeat, &p.name)?.duration_ns));
        }
    }
    Ok(programs
        .iter()
        .zip(times)
        .map(|(p, (hits, misses))| CostRow {
            program: p.name.clone(),
            hit_ns: median(hits),
            miss_ns: median(misses),
            repeat,
            samples,
        })
        .collect())
}

fn run(fd: BorrowedFd<'_>, ctx: &SkLookupCtx, repeat: u32, name: &str) -> Result<bpf::TestRun> {
    bpf::test_run(fd, ctx, repeat).with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))
}

/// A hit must really assign a socket and a miss must not, or the timings
/// would be of some other path.
fn check(p: &Program, hit: &SkLookupCtx, miss: &SkLookupCtx) -> Result<()> {
    let h = run(p.fd.as_fd(), hit, 1, &p.name)?;
    if h.retval != SK_PASS || h.cookie == 0 {
        bail!(
            "{}: a listed port returned {} with socket cookie {}, expected SK_PASS and a socket",
            p.name,
            h.retval,
            h.cookie
        );
    }
    let m = run(p.fd.as_fd(), miss, 1, &p.name)?;
    if m.retval != SK_PASS || m.cookie != 0 {
        bail!(
            "{}: an unlisted port returned {} with socket cookie {}, expected SK_PASS and no socket",
            p.name,
            m.retval,
            m.cookie
        );
    }
    Ok(())
}

/// steer's programs' maps, or the reference's, set up like the live ones:
/// `port` listed and `socket` at key 0.
fn fill_maps(maps: &Path, port: u16, socket: BorrowedFd<'_>) -> Result<()> {
    steer::kernel::maps::PortMap::open(&maps.join(map::ECHO_PORTS))?.add(port)?;
    Ok(steer::kernel::maps::SocketMap::open(&maps.join(map::ECHO_SOCKET))?.insert(0, socket)?)
}

/// Loads every program of `object` with bpftool, maps pinned under
/// `<bpffs>/<tag>/maps`, programs under `<bpffs>/<tag>/progs`, and opens `wanted`.
fn bpftool_load(
    sandbox: &Sandbox,
    tag: &str,
    object: &Path,
    wanted: &str,
    port: u16,
    socket: BorrowedFd<'_>,
) -> Result<OwnedFd> {
    let base = sandbox.bpffs.join(tag);
    let (progs, maps) = (base.join("progs"), base.join("maps"));
    std::fs::create_dir_all(&maps)?;
    sandbox::run(
        Command::new("bpftool")
            .arg("prog")
            .arg("loadall")
            .arg(object)
            .arg(&progs)
            .args(["type", "sk_lookup", "pinmaps"])
            .arg(&maps),
    )?;
    fill_maps(&maps, port, socket)?;
    let pin = progs.join(wanted);
    bpf::obj_get(&pin).with_context(|| format!("opening {}", pin.display()))
}

/// The Rust seed program (`echo_dispatch` of steer's own object), loaded
/// apart from steer so it can be timed like for like with the C reference.
pub fn rust_echo(sandbox: &Sandbox, port: u16, socket: BorrowedFd<'_>) -> Result<Program, Skipped> {
    let name = "echo_dispatch (rust)";
    let skip = |reason: String| Skipped { program: name.into(), reason };
    if !sandbox::have("bpftool") {
        return Err(skip("bpftool not found".into()));
    }
    let load = || -> Result<OwnedFd> {
        let object = sandbox.path("dispatch.bpf.o");
        std::fs::write(&object, steer::DISPATCH_OBJECT)?;
        bpftool_load(sandbox, "rust", &object, names::ECHO_PROGRAM, port, socket)
    };
    load().map(|fd| Program { name: name.into(), fd }).map_err(|e| skip(format!("{e:#}")))
}

/// The C reference, built with clang-19 and loaded with bpftool.
pub fn c_reference(sandbox: &Sandbox, port: u16, socket: BorrowedFd<'_>) -> Result<Program, Skipped> {
    let name = "echo_dispatch (C reference)";
    let skip = |reason: String| Skipped { program: name.into(), reason };
    for tool in ["clang-19", "bpftool"] {
        if !sandbox::have(tool) {
            return Err(skip(format!("{tool} not found")));
        }
    }
    let load = || -> Result<OwnedFd> {
        let source = sandbox.path("echo_dispatch.bpf.c");
        let object = sandbox.path("echo_dispatch.bpf.o");
        std::fs::write(&source, REFERENCE_SOURCE)?;
        let mut clang = Command::new("clang-19");
        clang.args(["-O2", "-g", "-target", "bpf"]);
        // <linux/bpf.h> needs <asm/types.h>, which Debian keeps under the
        // multiarch include dir that the bpf target does not search.
        let multiarch = format!("/usr/include/{}-linux-gnu", std::env::consts::ARCH);
        if Path::new(&multiarch).is_dir() {
            clang.arg(format!("-I{multiarch}"));
        }
        sandbox::run(clang.arg("-c").arg(&source).arg("-o").arg(&object))
            .context("building the C reference (is libbpf-dev installed?)")?;
        bpftool_load(sandbox, "ref", &object, "echo_dispatch", port, socket)
    };
    load().map(|fd| Program { name: name.into(), fd }).map_err(|e| skip(format!("{e:#}")))
}
