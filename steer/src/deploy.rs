//! Loading, pinning, attaching and removing the dispatcher.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    programs::{SkLookup, links::FdLink},
};
use log::{debug, info};

use crate::{bpffs, preflight};

/// The dispatcher object, built by `cargo xtask build-ebpf` and committed so
/// that a stable toolchain builds the tools without any BPF toolchain.
pub static DISPATCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dispatch-ebpf/dispatch.bpf.o"));

pub const PROGRAM: &str = "echo_dispatch";
pub const PORT_MAP: &str = "echo_ports";
pub const SOCKET_MAP: &str = "echo_socket";
pub const LINK: &str = "echo_dispatch_link";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/steer";

/// Where steerctl pins things inside its bpffs directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    pub fn program(&self) -> PathBuf {
        self.dir.join(PROGRAM)
    }
    pub fn ports(&self) -> PathBuf {
        self.dir.join(PORT_MAP)
    }
    pub fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_MAP)
    }
    pub fn link(&self) -> PathBuf {
        self.dir.join(LINK)
    }
    /// Every pin steerctl makes, the link first so it goes before the rest.
    pub fn pins(&self) -> [PathBuf; 4] {
        [self.link(), self.program(), self.ports(), self.socket()]
    }
}

/// Removes already-made pins when a multi-step operation fails half way,
/// so a failed command changes nothing.
struct Rollback {
    paths: Vec<PathBuf>,
    dir: Option<PathBuf>,
}

impl Rollback {
    fn disarm(mut self) {
        self.paths.clear();
        self.dir = None;
    }
}

impl Drop for Rollback {
    fn drop(&mut self) {
        for path in self.paths.iter().rev() {
            let _ = std::fs::remove_file(path);
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Loads the dispatcher and pins it with its maps under `layout.dir`.
pub fn load(layout: &Layout) -> Result<u32> {
    preflight::require_kernel()?;
    preflight::require_bpf_caps()?;
    bpffs::require_creatable_dir(&layout.dir)?;
    if let Some(existing) = layout.pins().iter().find(|p| p.exists()) {
        bail!(
            "already loaded: {} exists; run `steerctl --pin-dir {} unload` first",
            existing.display(),
            layout.dir.display()
        );
    }
    let mut rollback = Rollback { paths: Vec::new(), dir: None };
    if !layout.dir.exists() {
        std::fs::create_dir(&layout.dir).with_context(|| format!("creating {}", layout.dir.display()))?;
        rollback.dir = Some(layout.dir.clone());
    }

    let mut ebpf = EbpfLoader::new().load(DISPATCH_OBJECT).context("loading the dispatcher object")?;
    let program: &mut SkLookup = ebpf
        .program_mut(PROGRAM)
        .context("the dispatcher object has no echo_dispatch program")?
        .try_into()?;
    program.load().context("loading the sk_lookup program into the kernel")?;
    let id = program.info()?.id();
    program.pin(layout.program()).with_context(|| format!("pinning the program at {}", layout.program().display()))?;
    rollback.paths.push(layout.program());
    for (name, path) in [(PORT_MAP, layout.ports()), (SOCKET_MAP, layout.socket())] {
        let map = ebpf.map(name).with_context(|| format!("the dispatcher object has no {name} map"))?;
        map.pin(&path).with_context(|| format!("pinning map {name} at {}", path.display()))?;
        rollback.paths.push(path);
    }
    rollback.disarm();
    info!("loaded program id {id} under {}", layout.dir.display());
    Ok(id)
}

/// Links the pinned sk_lookup program at `program_pin` to the caller's
/// network namespace and pins the link at `link_pin`. Returns the link id.
pub fn attach(program_pin: &Path, link_pin: &Path) -> Result<u32> {
    preflight::require_kernel()?;
    preflight::require_bpf_caps()?;
    bpffs::require_pin(program_pin, "sk_lookup program")?;
    if link_pin.exists() {
        bail!("already attached: a link is pinned at {}; detach it first", link_pin.display());
    }
    if let Some(dir) = link_pin.parent() {
        bpffs::require_dir(dir)?;
    }
    let mut program = SkLookup::from_pin(program_pin)
        .with_context(|| format!("opening the pinned program {}", program_pin.display()))?;
    let netns = File::open(crate::netns::CURRENT).context("opening the current network namespace")?;
    let link_id = program.attach(netns).context("creating the sk_lookup link (BPF_LINK_CREATE)")?;
    let link: FdLink = program.take_link(link_id)?.into();
    let id = link.info()?.id();
    link.pin(link_pin).with_context(|| format!("pinning the link at {}", link_pin.display()))?;
    debug!("link {id} pinned at {}", link_pin.display());
    Ok(id)
}

/// Detaches the link pinned at `link_pin` and removes the pin. Returns false
/// when nothing was attached.
pub fn detach(link_pin: &Path) -> Result<bool> {
    if !link_pin.exists() {
        return Ok(false);
    }
    preflight::require_bpf_caps()?;
    let link = crate::sys::obj_get(link_pin).with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
    // Detach first so normal lookup returns even if someone else holds the link open.
    use std::os::fd::AsFd;
    crate::sys::link_detach(link.as_fd()).context("detaching the link")?;
    std::fs::remove_file(link_pin).with_context(|| format!("unpinning {}", link_pin.display()))?;
    Ok(true)
}

/// Detaches and removes every pin steerctl made, then the directory if empty.
pub fn unload(layout: &Layout) -> Result<Vec<PathBuf>> {
    bpffs::require_dir(&layout.dir)?;
    preflight::require_bpf_caps()?;
    let mut removed = Vec::new();
    if detach(&layout.link())? {
        removed.push(layout.link());
    }
    for path in &layout.pins()[1..] {
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
            removed.push(path.clone());
        }
    }
    // Only an empty directory goes: others' pins there stay put.
    let _ = std::fs::remove_dir(&layout.dir);
    Ok(removed)
}
