//! The one way into a state directory: a handle that validated the
//! directory and holds its lock for as long as it lives. Reads take the
//! lock shared, writes exclusive; which methods exist depends on the
//! access, so nothing can change state under a shared lock.

use std::{
    fs::File,
    marker::PhantomData,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    EbpfLoader,
    programs::{ProgramInfo, SkLookup, links::FdLink},
};
use log::{debug, info};
use steer_common::{MAPS, map, map_spec, names};

use crate::{
    Layout, bpffs,
    error::{Context, Error, Result, fail},
    lock::{LockMode, StateLock},
    maps::{PortMap, SocketMap},
    netns, preflight,
    socket::{self, TakenSocket},
    sys,
};

/// The dispatcher object, built by `cargo xtask build-ebpf` and committed so
/// that a stable toolchain builds the tools without any BPF toolchain.
pub static DISPATCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dispatch-ebpf/dispatch.bpf.o"));

mod sealed {
    pub trait Sealed {}
}

/// What a [`Dispatcher`] may do: [`ReadOnly`] or [`ReadWrite`].
pub trait Access: sealed::Sealed {
    const MODE: LockMode;
}

/// Reads under a shared lock.
#[derive(Debug)]
pub struct ReadOnly;
/// Reads and changes under an exclusive lock.
#[derive(Debug)]
pub struct ReadWrite;

impl sealed::Sealed for ReadOnly {}
impl sealed::Sealed for ReadWrite {}
impl Access for ReadOnly {
    const MODE: LockMode = LockMode::Shared;
}
impl Access for ReadWrite {
    const MODE: LockMode = LockMode::Exclusive;
}

/// An open state directory.
#[derive(Debug)]
pub struct Dispatcher<A: Access = ReadOnly> {
    layout: Layout,
    _lock: StateLock,
    _access: PhantomData<A>,
}

impl Dispatcher<ReadOnly> {
    /// Opens the state for reading, waiting while a writer holds it.
    /// Stale state opens (status reports it).
    pub fn open_read(layout: &Layout) -> Result<Self> {
        Self::open(layout)
    }
}

impl Dispatcher<ReadWrite> {
    /// Opens the state for changing it, waiting for other readers and
    /// writers. Refused when the state is stale (its namespace is gone) or
    /// its program is not this build's.
    pub fn open_write(layout: &Layout) -> Result<Self> {
        let state = Self::open(layout)?;
        state.check_usable()?;
        Ok(state)
    }

    /// Opens the state to repair or remove it: as [`Self::open_write`], but
    /// stale state and another build's program are accepted (unload,
    /// detach, upgrade and gc are how one fixes them).
    pub fn open_repair(layout: &Layout) -> Result<Self> {
        Self::open(layout)
    }
}

impl<A: Access> Dispatcher<A> {
    fn open(layout: &Layout) -> Result<Self> {
        // Every pin is root's; say so before any EPERM can.
        preflight::require_bpf_caps()?;
        bpffs::require_dir(&layout.dir)?;
        let dir = bpffs::open_checked_bpffs(&layout.dir, layout.owned)?;
        let inode = rustix::fs::fstat(&dir).map_err(std::io::Error::from)?.st_ino;
        let lock = StateLock::acquire(dir, &layout.dir, A::MODE)?;
        // An unload may have removed the directory while this waited, or a
        // load put another in its place.
        if std::fs::metadata(&layout.dir).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).ok() != Some(inode) {
            fail!(
                Conflict,
                "the state at {} was unloaded while this command waited for it; run it again",
                layout.dir.display()
            );
        }
        Ok(Self { layout: layout.clone(), _lock: lock, _access: PhantomData })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The seed's port list.
    pub fn ports(&self) -> Result<Vec<u16>> {
        PortMap::open(&self.layout.ports())?.list()
    }

    /// One of the dispatcher's maps as an aya typed map, checked against its spec.
    pub(crate) fn typed_map<M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(&self, name: &str) -> Result<M> {
        crate::maps::open_typed(&self.layout.map(name), spec(name))
    }

    /// The seed socket map (`echo_socket`).
    pub(crate) fn seed_socket_map(&self) -> Result<SocketMap<u32>> {
        SocketMap::open_spec(&self.layout.socket(), spec(map::ECHO_SOCKET))
    }
}

/// The spec of one of the object's maps.
pub(crate) fn spec(name: &str) -> &'static steer_common::MapSpec {
    map_spec(name).expect("steer-common lists every map the library opens")
}

/// Removes a state directory's pins (steer's names only) and the directory
/// if that empties it: for leftovers nothing refers to.
pub(crate) fn remove_state(dir: &Path) {
    let layout = Layout::new(dir);
    if let Ok(link) = sys::obj_get(&layout.link()) {
        let _ = sys::link_detach(link.as_fd());
    }
    for pin in layout.pins().iter().chain(&layout.staged_pins()) {
        let _ = std::fs::remove_file(pin);
    }
    let _ = std::fs::remove_dir(dir);
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
    for m in MAPS {
        loader.map_pin_path(m.name, layout.map(m.name));
    }
    let mut ebpf = loader.load(DISPATCH_OBJECT).context("loading the dispatcher object")?;
    let program: &mut SkLookup = ebpf
        .program_mut(names::STEER_PROGRAM)
        .ok_or_else(|| Error::Pin("the dispatcher object has no steer_dispatch program".into()))?
        .try_into()?;
    program.load().context("loading the sk_lookup program into the kernel")?;
    Ok(ebpf)
}

fn program(ebpf: &mut aya::Ebpf) -> &mut SkLookup {
    ebpf.program_mut(names::STEER_PROGRAM).expect("checked by load_object").try_into().expect("checked by load_object")
}

impl Dispatcher<ReadWrite> {
    /// Loads the dispatcher and pins it with its maps under `layout.dir`.
    /// Returns the open state and the program id.
    ///
    /// Everything is made in a new 0700 directory beside it, then renamed
    /// into place (RENAME_NOREPLACE): a load killed half way leaves no
    /// half-built state, and of concurrent loads exactly one wins.
    pub fn load(layout: &Layout) -> Result<(Self, u32)> {
        preflight::require_kernel()?;
        preflight::require_bpf_caps()?;
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
                return Err(Self::loaded_already(layout));
            }
            let staged_name = format!("{}-tmp-{}", name.to_string_lossy(), std::process::id());
            let staged = Layout { dir: parent.join(&staged_name), owned: layout.owned };
            remove_state(&staged.dir);
            bpffs::make_private_dir(&parent_fd, staged_name.as_ref())?;
            let rollback = Rollback { paths: staged.pins(), dir: Some(staged.dir.clone()) };
            let lock = StateLock::fresh(bpffs::open_checked_bpffs(&staged.dir, layout.owned)?)?;
            let state = Self { layout: staged.clone(), _lock: lock, _access: PhantomData };
            let mut ebpf = load_object(&staged)?;
            let program = program(&mut ebpf);
            let id = program.info()?.id();
            program.pin(staged.program()).context("pinning the program")?;
            state.record_identity(&program.info()?)?;
            match rustix::fs::renameat_with(
                &parent_fd,
                staged_name.as_str(),
                &parent_fd,
                name,
                rustix::fs::RenameFlags::NOREPLACE,
            ) {
                Ok(()) => {
                    rollback.disarm();
                    info!("loaded program id {id} under {}", layout.dir.display());
                    return Ok((Self { layout: layout.clone(), _lock: state._lock, _access: PhantomData }, id));
                }
                // Another load won; or an unload is emptying the old state: try again once it is gone.
                Err(rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY) => {
                    drop((state, ebpf, rollback));
                    let _ = Dispatcher::<ReadWrite>::open_repair(layout);
                }
                Err(e) => return Err(std::io::Error::from(e)).context("moving the new state into place"),
            }
        }
        Err(Self::loaded_already(layout))
    }

    fn loaded_already(layout: &Layout) -> Error {
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
    pub fn unload(self) -> Result<Vec<PathBuf>> {
        let layout = &self.layout;
        let mut removed = Vec::new();
        if self.detach()? {
            removed.push(layout.link());
        }
        for path in layout.pins()[1..].iter().chain(&layout.staged_pins()) {
            if path.exists() {
                std::fs::remove_file(path).with_context(|| format!("unpinning {}", path.display()))?;
                removed.push(path.clone());
            }
        }
        // Only empty directories go: others' pins there stay put.
        let _ = std::fs::remove_dir(&layout.dir);
        Ok(removed)
    }

    /// Links the pinned program to the caller's network namespace. Returns the link id.
    pub fn attach(&self) -> Result<u32> {
        attach_pinned(&self.layout.program(), &self.layout.link())
    }

    /// Removes the link; false when nothing was attached.
    pub fn detach(&self) -> Result<bool> {
        detach_pinned(&self.layout.link())
    }

    /// Replaces the pinned program with this build's, keeping maps, link and
    /// sockets. The link switches programs atomically, so no lookup in
    /// between misses. Returns the old and new program ids.
    pub fn upgrade(&self) -> Result<(u32, u32)> {
        let layout = &self.layout;
        bpffs::require_pin(&layout.program(), "steer program")?;
        if let Some(missing) = MAPS.iter().map(|m| layout.map(m.name)).find(|p| !p.exists()) {
            fail!(Pin, "{} is missing: this state predates the current maps; unload and load again", missing.display());
        }
        // The new program reuses the pinned maps as they are: they must be
        // the shapes it was built for.
        for m in MAPS {
            crate::maps::open_spec(&layout.map(m.name), m)?;
        }
        let old_id = ProgramInfo::from_pin(layout.program())?.id();
        let mut ebpf = load_object(layout)?;
        let program = program(&mut ebpf);
        let new_id = program.info()?.id();
        // Pin beside the old one first (bpffs names take no dots), so a failure
        // before the switch leaves everything as it was.
        let staged = layout.staged_pins().remove(0);
        let _ = std::fs::remove_file(&staged);
        program.pin(&staged).context("pinning the new program")?;
        let staged_guard = Rollback { paths: vec![staged.clone()], dir: None };
        if layout.link().exists() {
            let link = sys::obj_get(&layout.link()).context("opening the pinned link")?;
            let prog_fd = program.fd()?.as_fd();
            sys::link_update(link.as_fd(), prog_fd).context("switching the link to the new program")?;
        }
        std::fs::rename(&staged, layout.program()).context("replacing the program pin")?;
        staged_guard.disarm();
        self.record_identity(&program.info()?)?;
        info!("upgraded program {old_id} -> {new_id}");
        Ok((old_id, new_id))
    }

    /// Turns the seed list on while it has ports or a socket, off
    /// otherwise: lookups that no binding answers then skip it.
    fn refresh_seed(&self) -> Result<()> {
        let enabled = !self.ports()?.is_empty() || self.seed_socket_map()?.cookie(&0)?.is_some();
        crate::plane::Plane::open(self)?.set_seed(enabled)
    }

    /// Adds ports to the seed's port list.
    pub fn add_ports(&self, ports: &[u16]) -> Result<()> {
        let mut map = PortMap::open(&self.layout.ports())?;
        ports.iter().try_for_each(|&port| map.add(port))?;
        self.refresh_seed()
    }

    /// Removes ports from the seed's port list: all or none, an unlisted
    /// port fails before any goes.
    pub fn remove_ports(&self, ports: &[u16]) -> Result<()> {
        let mut map = PortMap::open(&self.layout.ports())?;
        let steered = map.list()?;
        if let Some(port) = ports.iter().find(|p| !steered.contains(p)) {
            fail!(Conflict, "port {port} is not steered");
        }
        ports.iter().try_for_each(|&port| map.remove(port).map(drop))?;
        self.refresh_seed()
    }

    /// Takes `pid`'s socket (`fd`, or its one steerable socket) as the seed socket.
    pub fn set_seed_socket(&self, pid: i32, fd: Option<i32>) -> Result<TakenSocket> {
        let map = self.seed_socket_map()?;
        let taken = insert_taken(&map, 0, pid, fd)?;
        self.refresh_seed()?;
        Ok(taken)
    }

    /// Removes the seed socket; false when none was set.
    pub fn clear_seed_socket(&self) -> Result<bool> {
        let removed = self.seed_socket_map()?.remove(&0)?;
        self.refresh_seed()?;
        Ok(removed)
    }
}

/// Duplicates `pid`'s socket, checks that sk_lookup can steer to it, and
/// puts it at `key`. Every check runs before the map is touched, so a
/// failure changes nothing.
fn insert_taken(map: &SocketMap<u32>, key: u32, pid: i32, fd: Option<i32>) -> Result<TakenSocket> {
    preflight::require_fd_taking_caps()?;
    let taken = match fd {
        Some(fd) => socket::take_steerable(pid, fd)?,
        None => socket::find_steerable(pid)?,
    };
    map.insert(&key, taken.socket.as_fd())?;
    Ok(taken)
}

/// The state directory a pin sits in, if steer manages it (its program
/// or label map is pinned there).
fn managed_dir(pin: &Path) -> Option<Layout> {
    let layout = Layout::new(pin.parent()?);
    (layout.program().exists() || layout.map(map::LABELS).exists()).then_some(layout)
}

/// `sockmap-update`: puts `pid`'s `fd` into the socket map pinned at
/// `map_pin` under `key`. In a steer state directory this goes through its
/// lock; any other pinned socket map is used as it is.
pub fn update_sockmap(map_pin: &Path, key: u32, pid: i32, fd: i32) -> Result<TakenSocket> {
    preflight::require_fd_taking_caps()?;
    let state = managed_dir(map_pin).map(|layout| Dispatcher::open_write(&layout)).transpose()?;
    let taken = insert_taken(&SocketMap::open(map_pin)?, key, pid, Some(fd))?;
    if let Some(state) = state {
        state.refresh_seed()?;
    }
    Ok(taken)
}

/// `sk-lookup-attach`: links the sk_lookup program pinned at `program_pin`
/// to the caller's network namespace and pins the link at `link_pin`,
/// under the state directory's lock when steer manages it.
pub fn attach(program_pin: &Path, link_pin: &Path) -> Result<u32> {
    preflight::require_bpf_caps()?;
    let _state = managed_dir(link_pin).map(|layout| Dispatcher::open_write(&layout)).transpose()?;
    attach_pinned(program_pin, link_pin)
}

fn attach_pinned(program_pin: &Path, link_pin: &Path) -> Result<u32> {
    preflight::require_kernel()?;
    preflight::require_bpf_caps()?;
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
    debug!("link {id} pinned at {}", link_pin.display());
    Ok(id)
}

/// Detaches the link pinned at `link_pin` and removes the pin. Returns false
/// when nothing was attached.
fn detach_pinned(link_pin: &Path) -> Result<bool> {
    if !link_pin.exists() {
        return Ok(false);
    }
    let link = sys::obj_get(link_pin).with_context(|| format!("opening the pinned link {}", link_pin.display()))?;
    // Detach first so normal lookup returns even if someone else holds the link open.
    sys::link_detach(link.as_fd()).context("detaching the link")?;
    std::fs::remove_file(link_pin).with_context(|| format!("unpinning {}", link_pin.display()))?;
    Ok(true)
}
