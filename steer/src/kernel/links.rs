//! BPF links and programs by pin or id: the netns link's info, detach and
//! program swap (BPF_LINK_UPDATE) that aya keeps private, and the other
//! sk_lookup links of a namespace.

use std::{
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::Path,
};

use super::sys;
pub use super::sys::SkLookupLink;
use crate::error::{Context, Result, fail};

/// A pinned BPF link, opened.
#[derive(Debug)]
pub struct Link {
    fd: OwnedFd,
}

/// What a network namespace link says of itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetnsLinkInfo {
    pub id: u32,
    pub program_id: u32,
    /// 0 once the link is detached or its namespace is gone.
    pub netns_inode: u32,
}

impl Link {
    /// Opens the link pinned at `pin`, failing unless it is a link.
    pub fn open(pin: &Path) -> Result<Self> {
        let fd = sys::obj_get(pin).with_context(|| format!("opening the pinned link {}", pin.display()))?;
        if !matches!(sys::bpf_fd_kind(fd.as_fd()).as_deref(), Some("bpf_link" | "bpf-link")) {
            fail!(Pin, "{} is not a BPF link", pin.display());
        }
        Ok(Self { fd })
    }

    /// The link's info, when it is a network namespace link.
    pub fn netns_info(&self) -> Result<NetnsLinkInfo> {
        let info = sys::netns_link_info(self.fd.as_fd()).context("reading the link's info")?;
        Ok(NetnsLinkInfo { id: info.id, program_id: info.prog_id, netns_inode: info.netns_ino })
    }

    /// The link's id and the id of the program it runs (a link of any kind).
    pub fn ids(&self) -> Result<(u32, u32)> {
        sys::link_ids(self.fd.as_fd()).context("reading the link's info")
    }

    /// Pins the link at `path` too: one more reference, which removing
    /// that pin drops again (the link stays attached while one is left).
    pub fn pin(&self, path: &Path) -> Result<()> {
        sys::obj_pin(self.fd.as_fd(), path).with_context(|| format!("pinning the link at {}", path.display()))
    }

    /// Detaches the link even if other holders keep it open.
    pub fn detach(&self) -> Result<()> {
        sys::link_detach(self.fd.as_fd()).context("detaching the link")
    }

    /// Swaps the link's program in one step: lookups run either the old
    /// program or the new one, never neither.
    pub fn update(&self, program: BorrowedFd<'_>) -> Result<()> {
        sys::link_update(self.fd.as_fd(), program).context("switching the link to the new program")
    }
}

/// The id of the program pinned at `pin`.
pub fn program_id(pin: &Path) -> Result<u32> {
    Ok(aya::programs::ProgramInfo::from_pin(pin)
        .with_context(|| format!("opening the pinned program {}", pin.display()))?
        .id())
}

/// Opens the program pinned at `pin`, failing unless it is a program.
pub fn open_program(pin: &Path) -> Result<OwnedFd> {
    let fd = sys::obj_get(pin).with_context(|| format!("opening the pinned program {}", pin.display()))?;
    if sys::bpf_fd_kind(fd.as_fd()).as_deref() != Some("bpf-prog") {
        fail!(Pin, "{} is not a BPF program", pin.display());
    }
    Ok(fd)
}

/// Every sk_lookup link attached to the network namespace with `netns_inode`.
/// Walking links by id needs CAP_SYS_ADMIN: without it, a Permission error.
pub fn sk_lookup_links(netns_inode: u64) -> Result<Vec<SkLookupLink>> {
    sys::sk_lookup_links(netns_inode).map_err(|e| match e.raw_os_error() {
        Some(libc::EPERM) => crate::Error::Permission(
            "listing the namespace's other sk_lookup links needs CAP_SYS_ADMIN (the kernel shows links by id only \
             to it)"
                .into(),
        ),
        _ => crate::Error::Context {
            context: "listing the namespace's sk_lookup links".into(),
            source: Box::new(e.into()),
        },
    })
}
