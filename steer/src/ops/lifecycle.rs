//! A state's life: load (made beside and renamed into place), attach and
//! detach, unload, and gc of state whose namespace is gone. `upgrade` has
//! a module of its own ([`super::upgrade`]).

use std::{
    collections::BTreeSet,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Serialize;

use crate::{
    error::{Context, Error, Result},
    kernel::{
        bpffs, caps,
        links::Link,
        lock::StateLock,
        netns,
        program::{self, Loaded},
    },
    state::{
        Dispatcher, Layout, ReadWrite, Repair, identity,
        layout::{RETIRED_SUFFIX, UPGRADE_SUFFIX, upgrade_retired, upgrade_staging},
        plane::Plane,
    },
};

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
            let _ = Layout::new(dir).remove_chunks();
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Removes a state directory's pins (steer's names only) and the directory:
/// for leftovers nothing refers to. Fails with what could not be removed.
fn remove_state(dir: &Path) -> Result<()> {
    let layout = Layout::new(dir);
    if layout.link().exists() {
        Link::open(&layout.link())?.detach()?;
    }
    for pin in layout.pins().iter().chain(&layout.staged_pins()) {
        match std::fs::remove_file(pin) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("removing {}", pin.display()));
            }
            _ => {}
        }
    }
    layout.remove_chunks().with_context(|| format!("removing {}", layout.chunks_dir().display()))?;
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| {
            format!("removing {} (it holds pins steer did not make; look inside and remove them)", dir.display())
        }),
        _ => Ok(()),
    }
}

/// Loads the dispatcher and pins it with its maps under `layout.dir`.
/// Returns the open state and the program id.
///
/// Everything is made in a new 0700 directory beside it, then renamed
/// into place (RENAME_NOREPLACE): a load killed half way leaves no
/// half-built state, and of concurrent loads exactly one wins.
pub fn load(layout: &Layout) -> Result<(Dispatcher<ReadWrite>, u32)> {
    // Capabilities first: without CAP_SYS_RESOURCE the memlock check would
    // fail too, with a message about limits rather than privileges.
    caps::require_load()?;
    caps::require_kernel()?;
    let (parent, name) = bpffs::split(&layout.dir)?;
    if layout.owned >= 2 {
        // `<bpffs>/steer`: made here, 0700, the first time.
        let (bpffs_root, root_name) = bpffs::split(parent)?;
        bpffs::require_dir(bpffs_root).map_err(|e| match e {
            Error::NotLoaded { dir } => Error::Invalid(format!(
                "{} does not exist: mount a bpf filesystem there (`mount -t bpf bpf {}`) or pass --bpffs",
                dir.display(),
                dir.display()
            )),
            e => e,
        })?;
        bpffs::make_private_dir(&bpffs::open_checked_bpffs(bpffs_root, 0)?, root_name)?;
    }
    bpffs::require_dir(parent).map_err(|e| match e {
        Error::NotLoaded { dir } => {
            Error::Invalid(format!("{} does not exist: make it on a bpf filesystem first", dir.display()))
        }
        e => e,
    })?;
    let parent_fd = bpffs::open_checked_bpffs(parent, layout.owned - 1)?;
    for _attempt in 0..3 {
        if layout.dir.exists() {
            return Err(loaded_already(layout));
        }
        let staged_name = format!("{}-tmp-{}", name.to_string_lossy(), std::process::id());
        let staged = Layout { dir: parent.join(&staged_name), owned: layout.owned };
        if staged.dir.exists() {
            remove_state(&staged.dir).context("removing what an earlier load of this process left")?;
        }
        bpffs::make_private_dir(&parent_fd, staged_name.as_ref())?;
        let rollback = Rollback { paths: staged.pins(), dir: Some(staged.dir.clone()) };
        let lock = StateLock::fresh(bpffs::open_checked_bpffs(&staged.dir, layout.owned)?)?;
        let state = Dispatcher::made(staged.clone(), lock);
        let mut loaded = Loaded::load(|name| staged.map(name))?;
        let program = loaded.program();
        let id = program.info()?.id();
        program.pin(staged.program()).context("pinning the program")?;
        identity::record_identity(&state, &program.info()?)?;
        match crate::kernel::rename_in(&parent_fd, staged_name.as_str(), name, libc::RENAME_NOREPLACE) {
            Ok(()) => {
                rollback.disarm();
                log::info!("loaded program id {id} under {}", layout.dir.display());
                let lock = state.into_lock();
                return Ok((Dispatcher::made(layout.clone(), lock), id));
            }
            // Another load won; or an unload is emptying the old state: try again once it is gone.
            Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => {
                drop((state, loaded, rollback));
                let _ = Dispatcher::<Repair>::open_repair(layout);
            }
            Err(e) => return Err(std::io::Error::from(e)).context("moving the new state into place"),
        }
    }
    Err(loaded_already(layout))
}

fn loaded_already(layout: &Layout) -> Error {
    // A newer steer's state is not "loaded already" to `load --if-needed`.
    if let Err(e) = crate::state::layouts::refuse_newer(layout) {
        return e;
    }
    if let Ok(state) = Dispatcher::open_read(layout) {
        if let Ok(Some(stale)) = state.staleness() {
            return Error::Conflict(format!("{stale}; remove it with `steerctl gc`, then load again"));
        }
    }
    let pin = layout.pins().into_iter().find(|p| p.exists()).unwrap_or_else(|| layout.dir.clone());
    Error::AlreadyLoaded { pin, dir: layout.dir.clone() }
}

/// Detaches and removes every pin steerctl made, then the directory if
/// empty. Works on partial state too. `<bpffs>/steer` stays: root's and
/// 0700, it keeps other users from claiming the name.
pub fn unload(state: Dispatcher<Repair>) -> Result<Vec<PathBuf>> {
    let layout = state.layout().clone();
    let mut removed = Vec::new();
    // Detached, not only unpinned: the kernel frees an unpinned link later,
    // from a workqueue, and another holder of it would keep it running.
    for link in std::iter::once(layout.link()).chain(layout.follow_hook_links()) {
        if program::detach(&link)? {
            removed.push(link);
        }
    }
    for path in layout.pins()[1..].iter().chain(&layout.staged_pins()) {
        if path.exists() {
            std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
            removed.push(path.clone());
        }
    }
    if layout.chunks_dir().exists() {
        layout.remove_chunks().with_context(|| format!("removing {}", layout.chunks_dir().display()))?;
        removed.push(layout.chunks_dir());
    }
    // Only empty directories go: others' pins there stay put.
    if let Err(e) = std::fs::remove_dir(&layout.dir) {
        log::warn!("{} stays: {e} (it holds pins steer did not make)", layout.dir.display());
    }
    // What an interrupted upgrade left beside it goes too: steering is
    // being removed, including a state an upgrade had switched to.
    for leftover in [upgrade_staging(&layout), upgrade_retired(&layout)].into_iter().flatten() {
        if leftover.exists() {
            remove_state(&leftover).with_context(|| format!("removing {}", leftover.display()))?;
            removed.push(leftover);
        }
    }
    Ok(removed)
}

/// Links the pinned program to the caller's network namespace. Returns the link id.
pub fn attach(state: &Dispatcher<ReadWrite>) -> Result<u32> {
    program::attach(&state.layout().program(), &state.layout().link())
}

/// Removes the link; false when nothing was attached.
pub fn detach(state: &Dispatcher<Repair>) -> Result<bool> {
    program::detach(&state.layout().link())
}

/// A state directory `gc` looked at.
#[derive(Debug, Clone, Serialize)]
pub struct GcEntry {
    pub dir: PathBuf,
    /// Why it goes, or None when it stays.
    pub stale: Option<String>,
    pub removed: bool,
    /// Why it could not be looked at or removed.
    pub error: Option<String>,
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

fn live_namespace_path(inode: u64) -> Option<PathBuf> {
    let candidates = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .chain(std::fs::read_dir("/proc").into_iter().flatten().flatten().map(|e| e.path().join("ns/net")));
    candidates.into_iter().find(|p| std::fs::metadata(p).is_ok_and(|m| m.ino() == inode))
}

/// Why the state is stale as seen from outside its namespace: its link is
/// dead, or no namespace with its inode (and cookie) exists.
fn stale_from_outside(state: &Dispatcher<Repair>, live: &BTreeSet<u64>) -> Result<Option<String>> {
    if let Some(info) = program::link_info(&state.layout().link())? {
        return Ok((info.netns_inode == 0).then(|| format!("its link {} is dead", info.id)));
    }
    let meta = Plane::open(state.layout())?.meta()?;
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

/// Removes the state directories under `<bpffs>/steer` whose namespace no
/// longer exists, and directories a killed `load` left; lists only with
/// `dry_run`. A directory that cannot be looked at or removed is listed
/// with the error, and touched no further.
pub fn gc(bpffs: &Path, dry_run: bool) -> Result<Vec<GcEntry>> {
    caps::require_bpf()?;
    let root = bpffs.join(crate::state::layout::STATE_ROOT);
    match bpffs::require_dir(&root) {
        // No state was ever made here: nothing to collect.
        Err(Error::NotLoaded { .. }) => return Ok(Vec::new()),
        other => other?,
    }
    bpffs::open_checked_bpffs(&root, 1)?;
    let live = live_namespaces();
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&root)?.flatten().map(|e| e.path()).collect();
    names.sort();
    for dir in names {
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // An interrupted upgrade's directories: the next `upgrade` of the
        // state beside them finishes or removes them; gc leaves them while
        // that state exists.
        let main = [UPGRADE_SUFFIX, RETIRED_SUFFIX].iter().find_map(|s| name.strip_suffix(s));
        if main.is_some_and(|main| root.join(main).exists()) {
            out.push(GcEntry { dir, stale: None, removed: false, error: None });
            continue;
        }
        let loading = name.rsplit_once("-tmp-").map(|(_, pid)| pid.to_string());
        // A load's staging directory: stale once its process is gone.
        if let Some(pid) = &loading {
            if pid.parse::<i32>().is_ok_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
                out.push(GcEntry { dir, stale: None, removed: false, error: None });
                continue;
            }
        }
        // Held from the check through the removal: nothing changes between.
        let state = match Dispatcher::open_repair(&Layout::new(&dir)) {
            Ok(state) => state,
            // Not steer's, unreadable or just unloaded: say so, touch nothing.
            Err(e) => {
                out.push(GcEntry { dir, stale: None, removed: false, error: Some(e.chain()) });
                continue;
            }
        };
        let stale = match loading {
            Some(pid) => Ok(Some(format!("left by a load (pid {pid}) that did not finish"))),
            None => stale_from_outside(&state, &live),
        };
        let entry = match stale {
            Err(e) => GcEntry { dir, stale: None, removed: false, error: Some(e.chain()) },
            Ok(None) => GcEntry { dir, stale: None, removed: false, error: None },
            Ok(Some(why)) if dry_run => GcEntry { dir, stale: Some(why), removed: false, error: None },
            Ok(Some(why)) => match remove_state(&dir) {
                Ok(()) => GcEntry { dir, stale: Some(why), removed: true, error: None },
                Err(e) => GcEntry { dir, stale: Some(why), removed: false, error: Some(e.chain()) },
            },
        };
        drop(state);
        out.push(entry);
    }
    Ok(out)
}
