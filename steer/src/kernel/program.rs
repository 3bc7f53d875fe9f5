//! The dispatcher object: loading its programs with their maps pinned, and
//! linking the sk_lookup program to a network namespace.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SkLookup, links::FdLink},
};
use steer_common::{MAPS, names};

use super::{
    bpffs, caps,
    links::{Link, NetnsLinkInfo},
    netns,
};
use crate::error::{Context, Error, Result, fail};

/// The dispatcher object, built by `cargo xtask build-ebpf` and committed so
/// that a stable toolchain builds the tools without any BPF toolchain.
pub static DISPATCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dispatch-ebpf/dispatch.bpf.o"));

/// FNV-1a of the embedded object: which build a loaded program came from.
pub fn object_hash() -> u64 {
    DISPATCH_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The loaded object, its sk_lookup program in the kernel.
pub struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    /// Loads the object with every map pinned at `pin(name)` (reusing the
    /// pins already there) and `steer_dispatch` into the kernel.
    pub fn load(pin: impl Fn(&str) -> std::path::PathBuf) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for m in MAPS {
            loader.map_pin_path(m.name, pin(m.name));
        }
        let mut ebpf = loader.load(DISPATCH_OBJECT).context("loading the dispatcher object")?;
        let program: &mut SkLookup = ebpf
            .program_mut(names::STEER_PROGRAM)
            .ok_or_else(|| Error::Pin("the dispatcher object has no steer_dispatch program".into()))?
            .try_into()?;
        program.load().context("loading the sk_lookup program into the kernel")?;
        Ok(Self { ebpf })
    }

    pub fn program(&mut self) -> &mut SkLookup {
        self.ebpf.program_mut(names::STEER_PROGRAM).expect("checked by load").try_into().expect("checked by load")
    }
}

/// Links the sk_lookup program pinned at `program_pin` to the calling
/// thread's network namespace and pins the link at `link_pin`. Returns the
/// link id.
pub fn attach(program_pin: &Path, link_pin: &Path) -> Result<u32> {
    caps::require_kernel()?;
    caps::require_bpf()?;
    bpffs::require_pin(program_pin, "sk_lookup program")?;
    if link_pin.exists() {
        fail!(Conflict, "already attached: a link is pinned at {}; detach it first", link_pin.display());
    }
    if let Some(dir) = link_pin.parent() {
        bpffs::require_dir(dir)?;
    }
    let mut program = SkLookup::from_pin(program_pin)
        .with_context(|| format!("opening the pinned program {}", program_pin.display()))?;
    let netns = File::open(netns::CURRENT).context("opening the current network namespace")?;
    let link_id = program.attach(netns).context("creating the sk_lookup link (BPF_LINK_CREATE)")?;
    let link: FdLink = program.take_link(link_id)?.into();
    let id = link.info()?.id();
    link.pin(link_pin).with_context(|| format!("pinning the link at {}", link_pin.display()))?;
    log::debug!("link {id} pinned at {}", link_pin.display());
    Ok(id)
}

/// Detaches the link pinned at `link_pin` and removes the pin. Returns false
/// when nothing was attached.
pub fn detach(link_pin: &Path) -> Result<bool> {
    if !link_pin.exists() {
        return Ok(false);
    }
    // Detach first so normal lookup returns even if someone else holds the link open.
    Link::open(link_pin)?.detach()?;
    std::fs::remove_file(link_pin).with_context(|| format!("unpinning {}", link_pin.display()))?;
    Ok(true)
}

/// The netns link pinned at `link_pin`, if there is one.
pub fn link_info(link_pin: &Path) -> Result<Option<NetnsLinkInfo>> {
    if !link_pin.exists() {
        return Ok(None);
    }
    Ok(Some(Link::open(link_pin)?.netns_info()?))
}
