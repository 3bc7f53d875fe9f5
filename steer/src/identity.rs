//! Whose state this is: the namespace it was made for (its cookie, which
//! the kernel never reuses, beside its inode number, which it does), the
//! layout version, and the program it runs. Stale state (its namespace
//! gone, its link dead) and another build's program are refused by
//! writes; `gc` removes state whose namespace no longer exists.

use std::{
    collections::BTreeSet,
    os::{fd::AsFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use aya::programs::ProgramInfo;
use serde::Serialize;
use steer_common::{LAYOUT_VERSION, StateMeta};

use crate::{
    DISPATCH_OBJECT, Layout,
    dispatcher::{Access, Dispatcher, ReadWrite, remove_state},
    error::{Context, Error, Result, fail},
    netns,
    plane::Plane,
    sys,
};

/// FNV-1a of the embedded object: which build a loaded program came from.
pub fn object_hash() -> u64 {
    DISPATCH_OBJECT.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl<A: Access> Dispatcher<A> {
    /// Records the namespace and the program (just loaded or upgraded to)
    /// in `steer_meta`.
    pub(crate) fn record_identity(&self, program: &ProgramInfo) -> Result<()> {
        let mut plane = Plane::open(self)?;
        let meta = plane.meta()?;
        plane.set_meta(StateMeta {
            layout_version: LAYOUT_VERSION,
            netns_cookie: netns::cookie()?.unwrap_or(0),
            netns_inode: netns::current_inode()?,
            program_tag: program.tag(),
            object_hash: object_hash(),
            ..meta
        })
    }

    /// Why this state is stale, if it is: its namespace is gone (its cookie
    /// is not this namespace's) or its link died with its namespace.
    pub fn staleness(&self) -> Result<Option<String>> {
        let dir = self.layout().dir.display();
        let meta = Plane::open(self)?.meta()?;
        if meta.netns_cookie != 0 {
            if let Some(now) = netns::cookie()? {
                if now != meta.netns_cookie {
                    return Ok(Some(format!(
                        "{dir} is stale: it belongs to network namespace {} (cookie {}), which is not this one (cookie {now}); \
                         the kernel reused the inode number of a deleted namespace",
                        meta.netns_inode, meta.netns_cookie
                    )));
                }
            }
        } else if meta.netns_inode != 0 && meta.netns_inode != netns::current_inode()? {
            return Ok(Some(format!(
                "{dir} is stale: it was made in network namespace {}, not this one ({})",
                meta.netns_inode,
                netns::current_inode()?
            )));
        }
        let link = self.layout().link();
        if link.exists() {
            let info = sys::netns_link_info(sys::obj_get(&link)?.as_fd())?;
            if info.netns_ino == 0 {
                return Ok(Some(format!("{dir} is stale: its link {} is dead (its namespace is gone)", info.id)));
            }
        }
        Ok(None)
    }

    /// Fails unless this build may change the state: not stale, this
    /// layout, and the loaded program this build's own.
    pub(crate) fn check_usable(&self) -> Result<()> {
        if let Some(stale) = self.staleness()? {
            fail!(Conflict, "{stale}; writes are refused: remove it with `steerctl gc`");
        }
        let meta = Plane::open(self)?.meta()?;
        if meta.layout_version != LAYOUT_VERSION {
            fail!(
                Conflict,
                "{} has layout version {} but this steerctl uses {LAYOUT_VERSION}: `steerctl unload` and load again",
                self.layout().dir.display(),
                meta.layout_version
            );
        }
        let pinned = ProgramInfo::from_pin(self.layout().program())
            .with_context(|| format!("opening {}", self.layout().program().display()))?;
        if pinned.tag() != meta.program_tag {
            fail!(
                Conflict,
                "the program pinned at {} (tag {:016x}) is not the one steer loaded (tag {:016x}); run `steerctl upgrade`",
                self.layout().program().display(),
                pinned.tag(),
                meta.program_tag
            );
        }
        if meta.object_hash != object_hash() {
            fail!(
                Conflict,
                "the loaded program (tag {:016x}) comes from another steer build; run `steerctl upgrade` to load this one's",
                pinned.tag()
            );
        }
        Ok(())
    }
}

/// A state directory `gc` looked at.
#[derive(Debug, Clone, Serialize)]
pub struct GcEntry {
    pub dir: PathBuf,
    /// Why it goes, or None when it stays.
    pub stale: Option<String>,
    pub removed: bool,
}

/// Inodes of every network namespace a process (or a thread) is in, or
/// that is mounted under /run/netns.
fn live_namespaces() -> BTreeSet<u64> {
    let mut inodes = BTreeSet::new();
    let mut add = |path: &Path| {
        if let Ok(m) = std::fs::metadata(path) {
            inodes.insert(m.ino());
        }
    };
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.path();
        add(&pid.join("ns/net"));
        for task in std::fs::read_dir(pid.join("task")).into_iter().flatten().flatten() {
            add(&task.path().join("ns/net"));
        }
    }
    for entry in std::fs::read_dir("/run/netns").into_iter().flatten().flatten() {
        add(&entry.path());
    }
    inodes
}

/// Why the state in `dir` is stale as seen from outside its namespace:
/// its link is dead, or no namespace with its inode (and cookie) exists.
fn stale_from_outside(state: &Dispatcher<ReadWrite>, live: &BTreeSet<u64>) -> Result<Option<String>> {
    let link = state.layout().link();
    if link.exists() {
        let info = sys::netns_link_info(sys::obj_get(&link)?.as_fd())?;
        return Ok((info.netns_ino == 0).then(|| format!("its link {} is dead", info.id)));
    }
    let meta = Plane::open(state)?.meta()?;
    // `live` was listed before this lock was taken: a namespace made since
    // (its state loaded, not yet attached) is looked for again.
    if !live.contains(&meta.netns_inode) && !live_namespaces().contains(&meta.netns_inode) {
        return Ok(Some(format!("no network namespace {} exists", meta.netns_inode)));
    }
    if meta.netns_cookie == 0 {
        return Ok(None);
    }
    // A namespace with that inode lives: the state's own, or a later one
    // that reuses the number. Its cookie tells.
    let Some(ns) = live_namespace_path(meta.netns_inode) else { return Ok(None) };
    let cookie = std::thread::scope(|s| {
        s.spawn(|| -> Result<Option<u64>> {
            netns::enter(&ns)?;
            netns::cookie()
        })
        .join()
        .map_err(|_| Error::Invalid("reading a namespace cookie panicked".into()))?
    })?;
    Ok(cookie.filter(|c| *c != meta.netns_cookie).map(|c| {
        format!(
            "namespace {} now has cookie {c}, not {}: a new namespace reuses its number",
            meta.netns_inode, meta.netns_cookie
        )
    }))
}

fn live_namespace_path(inode: u64) -> Option<PathBuf> {
    let candidates = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain(std::fs::read_dir("/proc").into_iter().flatten().flatten().map(|e| e.path().join("ns/net")));
    candidates.into_iter().find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == inode))
}

/// Removes the state directories under `<bpffs>/steer` whose namespace no
/// longer exists, and directories a killed `load` left; lists only with
/// `dry_run`.
pub fn gc(bpffs: &Path, dry_run: bool) -> Result<Vec<GcEntry>> {
    crate::preflight::require_bpf_caps()?;
    let root = bpffs.join(crate::layout::STATE_ROOT);
    match crate::bpffs::require_dir(&root) {
        // No state was ever made here: nothing to collect.
        Err(Error::NotLoaded { .. }) => return Ok(Vec::new()),
        other => other?,
    }
    crate::bpffs::open_checked_bpffs(&root, 1)?;
    let live = live_namespaces();
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&root)?.flatten().map(|e| e.path()).collect();
    names.sort();
    for dir in names {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let loading = name.rsplit_once("-tmp-").map(|(_, pid)| pid.to_string());
        // A load's staging directory: stale once its process is gone.
        if let Some(pid) = &loading {
            if pid.parse::<i32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                out.push(GcEntry { dir, stale: None, removed: false });
                continue;
            }
        }
        // Held from the check through the removal: nothing changes between.
        let state = match Dispatcher::<ReadWrite>::open_repair(&Layout::new(&dir)) {
            Ok(state) => state,
            // Not steer's, unreadable or just unloaded: say so, touch nothing.
            Err(e) => {
                log::warn!("{}: {e}", dir.display());
                out.push(GcEntry { dir, stale: None, removed: false });
                continue;
            }
        };
        let stale = match loading {
            Some(pid) => Some(format!("left by a load (pid {pid}) that did not finish")),
            None => match stale_from_outside(&state, &live) {
                Ok(stale) => stale,
                Err(e) => {
                    log::warn!("{}: {e}", dir.display());
                    None
                }
            },
        };
        let removed = stale.is_some() && !dry_run;
        if removed {
            remove_state(&dir);
        }
        drop(state);
        out.push(GcEntry { dir, stale, removed });
    }
    Ok(out)
}
