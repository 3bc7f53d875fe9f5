//! `cargo xtask build-ebpf`: builds the BPF object from dispatch-ebpf
//! without bpf-linker. `cargo xtask dist`: man pages and shell completions
//! for the Debian package, generated from the tools' clap definitions.
//!
//! Nightly rustc with build-std emits one LLVM bitcode module (LTO, one
//! codegen unit), and the same toolchain's own `llc` (llvm-tools) lowers it
//! to a BPF ELF with BTF: no second tool whose LLVM must match the nightly's.
//! Paths (the clone, cargo's registry, the toolchain's sysroot) are remapped
//! so the object is byte-identical wherever the repository is cloned and
//! rustup lives, which lets CI check the committed copy is current.
//! The nightly is the one pinned in dispatch-ebpf/rust-toolchain.toml: every
//! command runs in that directory, where rustup picks it up.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The objects built, each from the dispatch-ebpf binary of its name.
const OBJECTS: [(&str, &str); 3] = [
    ("dispatch", "dispatch-ebpf/dispatch.bpf.o"),
    ("follow", "dispatch-ebpf/follow.bpf.o"),
    ("migrate", "dispatch-ebpf/migrate.bpf.o"),
];

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Rebuild dispatch-ebpf/dispatch.bpf.o, follow.bpf.o and migrate.bpf.o from source.
    BuildEbpf {
        /// Do not write: fail if the committed object differs from a fresh build.
        #[arg(long)]
        check: bool,
        /// Write only the dispatcher built without tracing to OUT, for
        /// `steer-bench --baseline OUT` to time tracing off against.
        #[arg(long, value_name = "OUT", conflicts_with = "check")]
        untraced: Option<PathBuf>,
    },
    /// Write man pages and bash/zsh/fish completions for steerctl, sockmap-update
    /// and sk-lookup-attach under OUT (cargo-deb takes them from packaging/dist).
    Dist {
        #[arg(long, default_value = "packaging/dist")]
        out: PathBuf,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask sits in the workspace").to_path_buf()
}

fn crate_dir() -> PathBuf {
    workspace_root().join("dispatch-ebpf")
}

/// A command in dispatch-ebpf/ with the outer cargo's toolchain choices
/// removed, so rustup runs the toolchain pinned there.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(crate_dir());
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO",
    ] {
        cmd.env_remove(var);
    }
    cmd
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// What the pinned nightly's rustc prints for `args`.
fn rustc_output(args: &[&str]) -> Result<String> {
    let out = clean_command("rustc").args(args).output().context("running rustc in dispatch-ebpf")?;
    if !out.status.success() {
        bail!(
            "the pinned nightly is missing: run `rustup toolchain install` in dispatch-ebpf/ (it reads rust-toolchain.toml): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

fn nightly_tool(tool: &str) -> Result<PathBuf> {
    let sysroot = PathBuf::from(rustc_output(&["--print", "sysroot"])?);
    let version = rustc_output(&["-vV"])?;
    let host = version.lines().find_map(|l| l.strip_prefix("host: ")).context("rustc -vV has no host line")?;
    let path = sysroot.join("lib/rustlib").join(host).join("bin").join(tool);
    if !path.exists() {
        bail!(
            "{} is missing: run `rustup toolchain install` in dispatch-ebpf/ (it adds llvm-tools and rust-src)",
            path.display()
        );
    }
    Ok(path)
}

fn build(bin: &str, out: &Path, features: &[&str]) -> Result<()> {
    let root = workspace_root();
    let target_dir = crate_dir().join("target");
    let bitcode = target_dir.join(format!("{bin}.bc"));
    let cargo_home =
        env::var("CARGO_HOME").unwrap_or_else(|_| format!("{}/.cargo", env::var("HOME").unwrap_or_default()));
    // core's sources, built by build-std, sit under the sysroot, whose path
    // names the rustup home and the toolchain directory.
    let sysroot = rustc_output(&["--print", "sysroot"])?;
    let remap = format!(
        "--remap-path-prefix={}=/steer --remap-path-prefix={cargo_home}=/cargo --remap-path-prefix={sysroot}=/sysroot",
        root.display()
    );
    run(clean_command("cargo")
        .env("RUSTFLAGS", remap)
        .args(["rustc", "--release", "--bin", bin, "--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(features.iter().flat_map(|f| ["--features", f]))
        .arg("--target-dir")
        .arg(&target_dir)
        .arg("--")
        .arg(format!("--emit=obj={}", bitcode.display()))
        // The bitcode above is all we want; skip the bpf-linker link step.
        .args(["-C", "linker=/bin/true"]))?;
    let bitcode = with_static_subprograms(&bitcode)?;
    run(Command::new(nightly_tool("llc")?)
        .args(["-march=bpfel", "-mcpu=v3", "-O2", "-filetype=obj", "-o"])
        .arg(out)
        .arg(&bitcode))?;
    // DWARF is only for debuggers; BTF and BTF.ext stay.
    run(Command::new(nightly_tool("llvm-strip")?).arg("--strip-debug").arg(out))?;
    Ok(())
}

/// `bitcode` with every internal function the source names with
/// `#[unsafe(no_mangle)] #[linkage = "internal"]` (so its name does not
/// carry the crate hash, which depends on the clone's path) marked local
/// to its unit in the debug info, from which llc writes BTF's linkage:
/// rustc marks a `no_mangle` function exported there whatever its
/// linkage, and the kernel verifies a BTF-global function on its own,
/// with the argument types Linux 5.10 refuses. Static, it is a
/// BPF-to-BPF call verified in its caller's context, on every kernel.
fn with_static_subprograms(bitcode: &Path) -> Result<PathBuf> {
    let text = bitcode.with_extension("ll");
    run(Command::new(nightly_tool("llvm-dis")?).arg(bitcode).arg("-o").arg(&text))?;
    let ir = std::fs::read_to_string(&text).with_context(|| format!("reading {}", text.display()))?;
    let mut subprograms = Vec::new();
    for line in ir.lines().filter(|l| l.starts_with("define internal ")) {
        let Some((_, rest)) = line.split_once(" @") else { continue };
        let name = rest.split('(').next().unwrap_or_default();
        // Names rustc mangles (the crate hash) are not made by hand.
        if name.starts_with("_R") || name.starts_with("_ZN") {
            continue;
        }
        let node = line.rsplit_once("!dbg ").map(|(_, n)| n.trim_end_matches(" {").to_string());
        subprograms.push((name.to_string(), node.with_context(|| format!("{name} has no debug info"))?));
    }
    let mut lines: Vec<String> = ir.lines().map(str::to_string).collect();
    for (name, node) in &subprograms {
        let prefix = format!("{node} = distinct !DISubprogram(name: \"{name}\"");
        let line = lines
            .iter_mut()
            .find(|l| l.starts_with(&prefix))
            .with_context(|| format!("no DISubprogram {node} for {name}"))?;
        *line = line.replacen("spFlags: DISPFlagDefinition", "spFlags: DISPFlagLocalToUnit | DISPFlagDefinition", 1);
    }
    std::fs::write(&text, lines.join("\n") + "\n")?;
    let patched = bitcode.with_extension("static.bc");
    run(Command::new(nightly_tool("llvm-as")?).arg(&text).arg("-o").arg(&patched))?;
    Ok(patched)
}

/// The installed tools' command lines.
fn tools() -> [clap::Command; 3] {
    [steerctl::command(), sockmap_update::command(), sk_lookup_attach::command()]
}

/// Man pages (section 1; one per steerctl subcommand too) and completions,
/// laid out as the package installs them.
fn dist(out: &Path) -> Result<()> {
    use clap_complete::Shell;

    let out = if out.is_absolute() { out.to_path_buf() } else { workspace_root().join(out) };
    let man = out.join("man");
    // Only what this writes is replaced: `--out` may name a directory holding more.
    for ours in ["man", "completions"] {
        let _ = std::fs::remove_dir_all(out.join(ours));
    }
    std::fs::create_dir_all(&man).with_context(|| format!("creating {}", man.display()))?;
    fn man_pages(cmd: clap::Command, dir: &Path) -> Result<()> {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            man_pages(sub.clone(), dir)?;
        }
        let page = clap_mangen::Man::new(cmd).manual("steer").source(concat!("steer ", env!("CARGO_PKG_VERSION")));
        page.generate_to(dir).with_context(|| format!("writing {}", page.get_filename()))?;
        Ok(())
    }
    for cmd in tools() {
        let mut cmd = cmd.disable_help_subcommand(true);
        cmd.build();
        man_pages(cmd, &man)?;
    }
    for (shell, dir, file) in
        [(Shell::Bash, "bash", "{}"), (Shell::Zsh, "zsh", "_{}"), (Shell::Fish, "fish", "{}.fish")]
    {
        let dir = out.join("completions").join(dir);
        std::fs::create_dir_all(&dir)?;
        for mut cmd in tools() {
            let name = cmd.get_name().to_string();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut script);
            std::fs::write(dir.join(file.replace("{}", &name)), script)?;
        }
    }
    println!("wrote man pages and completions under {}", out.display());
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Dist { out } => dist(&out)?,
        Cmd::BuildEbpf { untraced: Some(out), .. } => {
            build("dispatch", &out, &["untraced"])?;
            println!("wrote {} (the dispatcher without tracing)", out.display());
        }
        Cmd::BuildEbpf { check, untraced: None } => {
            for (bin, object) in OBJECTS {
                let committed = workspace_root().join(object);
                if check {
                    let fresh = workspace_root().join(format!("dispatch-ebpf/target/{bin}.check.o"));
                    build(bin, &fresh, &[])?;
                    let want = std::fs::read(&fresh)?;
                    let have = std::fs::read(&committed).with_context(|| format!("reading {}", committed.display()))?;
                    if want != have {
                        bail!(
                            "{object} is stale: it differs from a build of dispatch-ebpf/src; run `cargo xtask build-ebpf` and commit the result"
                        );
                    }
                    println!("{object} matches its source");
                } else {
                    build(bin, &committed, &[])?;
                    println!("wrote {object}");
                }
            }
        }
    }
    Ok(())
}
