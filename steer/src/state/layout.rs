//! Where the dispatcher's pins live inside a state directory.

use std::path::{Path, PathBuf};

use steer_common::{MAPS, MAX_SCOPES, map, names};

use crate::kernel::program::{Backfill, FollowHook};

pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// The pins of one state directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    /// How many trailing components of `dir` are steer's own: 2 for
    /// `<bpffs>/steer/<netns inode>` (steer makes both), 1 for a directory
    /// given with --pin-dir.
    pub owned: usize,
}

/// The directory in a state directory that holds its chunk maps' pins.
pub const CHUNKS_DIR: &str = "chunks";

/// The directory under a bpffs that holds the per-namespace state directories.
pub const STATE_ROOT: &str = "steer";

/// Suffix of the directory `upgrade` builds a state of a new layout in,
/// beside the state directory: `<dir>-upgrade`.
pub const UPGRADE_SUFFIX: &str = "-upgrade";
/// Suffix an old state is moved to where the kernel cannot exchange two
/// directories in one rename (before Linux 5.12 on bpffs).
pub const RETIRED_SUFFIX: &str = "-retired";

/// `<dir>-upgrade`, beside `layout`'s directory.
pub fn upgrade_staging(layout: &Layout) -> Option<PathBuf> {
    sibling(layout, UPGRADE_SUFFIX)
}

/// `<dir>-retired`, beside `layout`'s directory.
pub fn upgrade_retired(layout: &Layout) -> Option<PathBuf> {
    sibling(layout, RETIRED_SUFFIX)
}

fn sibling(layout: &Layout, suffix: &str) -> Option<PathBuf> {
    let name = layout.dir.file_name()?.to_str()?;
    Some(layout.dir.with_file_name(format!("{name}{suffix}")))
}

impl Layout {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), owned: 1 }
    }
    /// The state directory of one network namespace: `<bpffs>/steer/<netns inode>`,
    /// so namespaces sharing a bpffs never share state.
    pub fn for_netns(bpffs: &Path, netns_inode: u64) -> Self {
        Self { dir: bpffs.join(STATE_ROOT).join(netns_inode.to_string()), owned: 2 }
    }
    pub fn program(&self) -> PathBuf {
        self.dir.join(names::STEER_PROGRAM)
    }
    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    pub fn ports(&self) -> PathBuf {
        self.map(map::ECHO_PORTS)
    }
    pub fn socket(&self) -> PathBuf {
        self.map(map::ECHO_SOCKET)
    }
    /// The directory the chunk maps of `steer_dirs` and `steer_ranges`
    /// are pinned in, each under its map id.
    pub fn chunks_dir(&self) -> PathBuf {
        self.dir.join(CHUNKS_DIR)
    }
    pub fn link(&self) -> PathBuf {
        self.dir.join(names::LINK)
    }
    /// The pinned link of a follow program of scope `scope`.
    pub fn follow_link(&self, hook: FollowHook, scope: u16) -> PathBuf {
        self.dir.join(hook.pin_name(scope))
    }

    /// The pinned iterator a backfill pass of `kind` reads.
    pub fn backfill_link(&self, kind: Backfill) -> PathBuf {
        self.dir.join(kind.pin_name())
    }

    /// Every link of a follow program (in a cgroup) a state can have.
    pub fn follow_hook_links(&self) -> Vec<PathBuf> {
        (0..MAX_SCOPES as u16).flat_map(|scope| FollowHook::ALL.map(|hook| self.follow_link(hook, scope))).collect()
    }

    /// Every follow and backfill link a state can have.
    pub fn follow_links(&self) -> Vec<PathBuf> {
        let mut pins = self.follow_hook_links();
        pins.extend(Backfill::ALL.map(|kind| self.backfill_link(kind)));
        pins
    }

    /// Every pin steerctl makes, the links first so they go before the rest.
    pub fn pins(&self) -> Vec<PathBuf> {
        let mut pins = vec![self.link()];
        pins.extend(self.follow_links());
        pins.push(self.program());
        pins.extend(MAPS.iter().map(|m| self.map(m.name)));
        pins
    }

    /// Pins a write stages beside their final name before renaming them
    /// into place; one that died half way can leave them behind.
    pub fn staged_pins(&self) -> Vec<PathBuf> {
        let mut pins = vec![self.dir.join(format!("{}_new", names::STEER_PROGRAM))];
        pins.extend([map::BINDINGS_0, map::BINDINGS_1].map(|m| self.dir.join(format!("{m}_next"))));
        pins
    }

    /// Unpins the chunk maps (steer's names only: map ids) and removes
    /// their directory; nothing to do where there is none.
    pub fn remove_chunks(&self) -> std::io::Result<()> {
        let dir = self.chunks_dir();
        let entries = match std::fs::read_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            entries => entries?,
        };
        for entry in entries {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.parse::<u32>().is_ok()) {
                std::fs::remove_file(&path)?;
            }
        }
        std::fs::remove_dir(&dir)
    }
}
