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

/// The program steerctl loads: labelled bindings, then the seed port list.
pub const PROGRAM: &str = "steer_dispatch";
pub const PORT_MAP: &str = "echo_ports";
pub const SOCKET_MAP: &str = "echo_socket";
pub const LINK: &str = "steer_dispatch_link";
/// Every map of the object; all are pinned by name in the state directory.
pub const MAPS: [&str; 9] = [
    PORT_MAP,
    SOCKET_MAP,
    "bindings_0",
    "bindings_1",
    "binding_lengths",
    "active_bindings",
    "sockets",
    "metrics",
    "labels",
];
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Where steerctl pins things inside its bpffs directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// The state directory of one network namespace: `<bpffs>/steer/<netns inode>`,
    /// so namespaces sharing a bpffs never share state.
    pub fn for_netns(bpffs: &Path, netns_inode: u64) -> Self {
        Self::new(bpffs.join("steer").join(netns_inode.to_string()))
    }
    pub fn program(&self) -> PathBuf {
        self.dir.join(PROGRAM)
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn ports(&self) -> PathBuf {
        self.map(PORT_MAP)
    }
    pub fn socket(&self) -> PathBuf {
        self.map(SOCKET_MAP)
    }
    pub fn link(&self) -> PathBuf {
        self.dir.join(LINK)
    }
    /// Every pin steerctl makes, the link first so it goes before the rest.
    pub fn pins(&self) -> Vec<PathBuf> {
        let mut pins = vec![self.link(), self.program()];
        pins.extend(MAPS.iter().map(|m| self.map(m)));
        pins
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

/// Loads the object with every map pinned under `layout.dir` (reusing the
/// pins already there) and loads `steer_dispatch` into the kernel.
fn load_object(layout: &Layout) -> Result<aya::Ebpf> {
    let mut loader = EbpfLoader::new();
    for name in MAPS {
        loader.map_pin_path(name, layout.map(name));
    }
    let mut ebpf = loader.load(DISPATCH_OBJECT).context("loading the dispatcher object")?;
    let program: &mut SkLookup = ebpf
        .program_mut(PROGRAM)
        .context("the dispatcher object has no steer_dispatch program")?
        .try_into()?;
    program.load().context("loading the sk_lookup program into the kernel")?;
    Ok(ebpf)
}

fn program(ebpf: &mut aya::Ebpf) -> &mut SkLookup {
    ebpf.program_mut(PROGRAM).expect("checked by load_object").try_into().expect("checked by load_object")
}

/// Takes the state directory's lock: exclusive for changes, shared for
/// reads, so concurrent steerctl runs never lose an update or read one half
/// done. Released when the File drops.
pub fn lock(layout: &Layout) -> Result<File> {
    lock_as(layout, libc::LOCK_EX)
}

pub fn lock_shared(layout: &Layout) -> Result<File> {
    lock_as(layout, libc::LOCK_SH)
}

fn lock_as(layout: &Layout, how: libc::c_int) -> Result<File> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    loop {
        bpffs::require_dir(&layout.dir)?;
        let dir = File::open(&layout.dir).with_context(|| format!("opening {}", layout.dir.display()))?;
        // Safety: flock on an fd we own.
        if unsafe { libc::flock(dir.as_raw_fd(), how) } != 0 {
            return Err(std::io::Error::last_os_error()).context("locking the state directory");
        }
        // An unload may have removed the directory while we waited: then
        // the lock is on a dead inode and the path names another, or none.
        match std::fs::metadata(&layout.dir) {
            Ok(now) if now.ino() == dir.metadata()?.ino() => return Ok(dir),
            _ => continue,
        }
    }
}

/// Loads the dispatcher and pins it with its maps under `layout.dir`.
pub fn load(layout: &Layout) -> Result<u32> {
    preflight::require_kernel()?;
    preflight::require_bpf_caps()?;
    bpffs::require_creatable_dir(&layout.dir)?;
    let created_dir = !layout.dir.exists();
    if created_dir {
        std::fs::create_dir_all(&layout.dir).with_context(|| format!("creating {}", layout.dir.display()))?;
    }
    // Under the lock, a concurrent load either finds our pins or we find its.
    let _lock = lock(layout)?;
    if let Some(existing) = layout.pins().iter().find(|p| p.exists()) {
        bail!(
            "already loaded: {} exists; run `steerctl --pin-dir {} unload` first",
            existing.display(),
            layout.dir.display()
        );
    }
    let rollback = Rollback { paths: layout.pins(), dir: created_dir.then(|| layout.dir.clone()) };
    let mut ebpf = load_object(layout)?;
    let program = program(&mut ebpf);
    let id = program.info()?.id();
    program.pin(layout.program()).with_context(|| format!("pinning the program at {}", layout.program().display()))?;
    rollback.disarm();
    info!("loaded program id {id} under {}", layout.dir.display());
    Ok(id)
}

/// Replaces the pinned program with this build's, keeping maps, link and
/// sockets. The link switches programs atomically, so no lookup in between
/// misses. Returns the old and new program ids.
pub fn upgrade(layout: &Layout) -> Result<(u32, u32)> {
    preflight::require_bpf_caps()?;
    bpffs::require_pin(&layout.program(), "steer program")?;
    if let Some(missing) = MAPS.iter().map(|m| layout.map(m)).find(|p| !p.exists()) {
        bail!("{} is missing: this state predates the current maps; unload and load again", missing.display());
    }
    // The new program reuses the pinned maps as they are: they must be the
    // shapes it was built for.
    crate::control::State::open(layout)?;
    let old_id = aya::programs::ProgramInfo::from_pin(layout.program())?.id();
    let mut ebpf = load_object(layout)?;
    let program = program(&mut ebpf);
    let new_id = program.info()?.id();
    // Pin beside the old one first (bpffs names take no dots), so a failure
    // before the switch leaves everything as it was.
    let staged = layout.dir.join(format!("{PROGRAM}_new"));
    let _ = std::fs::remove_file(&staged);
    program.pin(&staged).context("pinning the new program")?;
    let staged_guard = Rollback { paths: vec![staged.clone()], dir: None };
    if layout.link().exists() {
        let link = crate::sys::obj_get(&layout.link()).context("opening the pinned link")?;
        use std::os::fd::AsFd;
        let prog_fd = program.fd()?.as_fd();
        crate::sys::link_update(link.as_fd(), prog_fd).context("switching the link to the new program")?;
    }
    std::fs::rename(&staged, layout.program()).context("replacing the program pin")?;
    staged_guard.disarm();
    info!("upgraded program {old_id} -> {new_id}");
    Ok((old_id, new_id))
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
    // Only empty directories go: others' pins there stay put.
    let _ = std::fs::remove_dir(&layout.dir);
    if let Some(parent) = layout.dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "steer")) {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(removed)
}
