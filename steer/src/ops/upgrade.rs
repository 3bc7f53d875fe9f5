//! `steerctl upgrade`: this build's programs take over a loaded state
//! without a refused or misdirected connection, whatever layout the state
//! has (from layout 2 on; `state::layouts` lists them).
//!
//! * Same layout: the programs are swapped on the links they run on, the
//!   maps kept: the dispatcher on the netns link and each follow program on
//!   its cgroup link (BPF_LINK_UPDATE), the backfill iterators re-pinned.
//! * An older layout (or `--rebuild`): a state of this layout is built in
//!   `<dir>-upgrade` beside the old one, from it: maps of the same shape in
//!   both layouts are copied element by element, maps new in this layout
//!   start empty, the generation is compiled again from the record, and
//!   the sockets are carried by iterators over the old socket maps (in the
//!   kernel: no fd is taken from any process; see dispatch-ebpf's
//!   migrate.rs). A map whose shape changed needs a converter ([`carry`]):
//!   today `sockets`, whose keys went from slot to slot x 8 + member in
//!   layout 4. Then the live link switches to the new program in one
//!   BPF_LINK_UPDATE (the switch: from here on lookups read the new maps
//!   only), the link is pinned in the new directory too, the two
//!   directories are exchanged in one rename (RENAME_EXCHANGE), and the
//!   old state's pins are removed.
//!
//! Killed at any point, the next `upgrade` finishes or starts over, and in
//! between the state that serves is whole. Before the switch the old state
//! serves and `<dir>-upgrade` is a leftover: removed, and the upgrade made
//! again. After it, the new state serves: the link runs the program pinned
//! in `<dir>-upgrade`, which is how a second run tells (the kernel's own
//! record, nothing to keep in sync), and it finishes the pinning, the
//! exchange and the removal. While `<dir>-upgrade` exists every write is
//! refused, so nothing is written to the state that no longer serves.

use std::{
    collections::BTreeMap,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{maps::MapData, programs::ProgramInfo};
use serde::Serialize;
use steer_common::{
    DataplaneConfig, LAYOUT_VERSION, MAPS, MapSpec, SLOT_MEMBERS, StateMeta,
    kernel::{BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKMAP},
    map,
    migrate::{MigratePlan, NO_KEY},
};

use super::bindings;
use crate::{
    error::{Context, Error, Result, fail},
    kernel::{
        bpffs, caps,
        cgroup::Cgroup,
        links::{self, Link},
        lock::{LockMode, StateLock},
        maps::{RawMap, SocketMap, copy_entries, create_like, open_spec},
        netns,
        program::{self, Backfill, FollowProgram, Loaded},
    },
    model::label::label_from_key,
    state::{
        Dispatcher, Layout, ReadWrite, Repair,
        identity::{self, record_identity},
        layout::{upgrade_retired, upgrade_staging},
        layouts::{self, Found, LayoutVersion, MetaPrefix},
        plane::Plane,
    },
};

/// How `upgrade` was asked to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Options {
    /// Do nothing, successfully, when no state is loaded or it already runs
    /// this build's programs in this layout (for steer.service).
    pub if_needed: bool,
    /// Build a new state even when the layout is current.
    pub rebuild: bool,
}

/// What `upgrade` did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// No state is loaded (with --if-needed).
    NotLoaded,
    /// The state runs this build's programs already (with --if-needed).
    UpToDate,
    /// Same layout: the programs were swapped on their links.
    Swapped,
    /// A state of this layout was built from the old one and took over.
    Migrated,
    /// An interrupted upgrade had switched already; this run finished it.
    Finished,
}

/// What was carried from the old state to the new one.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Carried {
    pub labels: usize,
    pub bindings: usize,
    /// Sockets in labels' slots.
    pub sockets: usize,
    pub seed_ports: usize,
    pub seed_socket: bool,
    /// Counter sets (destinations) whose counters came along.
    pub counter_sets: usize,
    pub follow_links: usize,
    /// Maps copied element by element, by name.
    pub copied: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Upgraded {
    pub dir: PathBuf,
    pub action: Action,
    /// The state's layout before, and now.
    pub from_layout: Option<u32>,
    pub to_layout: u32,
    pub old_program: Option<u32>,
    pub new_program: Option<u32>,
    /// Follow links whose programs were swapped (same layout).
    pub follow_links: usize,
    pub carried: Option<Carried>,
    /// What else was done, said once ("made ... 0700").
    pub notes: Vec<String>,
}

impl Upgraded {
    fn new(layout: &Layout, action: Action) -> Self {
        Self {
            dir: layout.dir.clone(),
            action,
            from_layout: None,
            to_layout: LAYOUT_VERSION,
            old_program: None,
            new_program: None,
            follow_links: 0,
            carried: None,
            notes: Vec::new(),
        }
    }
}

/// Upgrades the state at `layout` to this build: see the module.
pub fn upgrade(layout: &Layout, options: Options) -> Result<Upgraded> {
    caps::require_bpf()?;
    match bpffs::require_dir(&layout.dir) {
        Err(Error::NotLoaded { .. }) if recover_missing(layout)? => {}
        Err(Error::NotLoaded { .. }) if options.if_needed => return Ok(Upgraded::new(layout, Action::NotLoaded)),
        other => other?,
    }
    let notes = close_modes(layout)?;
    caps::require_load()?;
    let state = Dispatcher::open_repair(layout)?;
    let mut out = run(&state, options)?;
    out.notes.splice(0..0, notes);
    Ok(out)
}

fn run(state: &Dispatcher<Repair>, options: Options) -> Result<Upgraded> {
    let layout = state.layout();
    let staging = Staging::of(layout)?;
    if staging.dir.exists() {
        let lock = staging.lock()?;
        if staging.is_live(layout)? {
            let mut out = Upgraded::new(layout, Action::Finished);
            out.new_program = Some(links::program_id(&staging.layout().program())?);
            finish(state, &staging, lock)?;
            log::info!("finished an interrupted upgrade of {}", layout.dir.display());
            return Ok(out);
        }
        log::info!("removing {}, left by an upgrade that did not switch", staging.dir.display());
        remove_retired(&staging.dir, staging.owned)?;
        drop(lock);
    }
    if staging.retired.exists() {
        remove_retired(&staging.retired, staging.owned)?;
    }
    let meta = match layouts::detect(layout)? {
        Found::Tagged(meta) => meta,
        Found::Untagged => fail!(
            Conflict,
            "{} was made by a steer from before layout versions (before 2f7d437, no steer_meta): upgrade migrates \
             layouts {} to {LAYOUT_VERSION} only. List its bindings and registrations with the steerctl that made \
             it, then `steerctl unload` and load again (connections are refused in between)",
            layout.dir.display(),
            layouts::OLDEST
        ),
        Found::Empty => {
            fail!(Conflict, "{} holds nothing steer made: `steerctl unload` and load again", layout.dir.display())
        }
    };
    let Some(from) = layouts::find(meta.layout_version) else {
        fail!(
            Conflict,
            "{} records layout {}, which this steerctl does not know (it knows {} to {LAYOUT_VERSION}): a half-made \
             state; `steerctl unload` and load again",
            layout.dir.display(),
            meta.layout_version,
            layouts::OLDEST
        );
    };
    if let Some(stale) = identity::staleness(state)? {
        fail!(Conflict, "{stale}; nothing to upgrade: remove it with `steerctl gc`");
    }
    if from.version == LAYOUT_VERSION && !options.rebuild {
        if options.if_needed && up_to_date(layout, &meta)? {
            let mut out = Upgraded::new(layout, Action::UpToDate);
            out.from_layout = Some(from.version);
            return Ok(out);
        }
        return swap(state, &meta);
    }
    migrate(state, from, &meta, staging)
}

/// Whether the state runs this build's programs: the pinned dispatcher is
/// the one recorded, from this build's objects, and the link runs it.
fn up_to_date(layout: &Layout, meta: &MetaPrefix) -> Result<bool> {
    if !layout.program().exists() || meta.object_hash != program::object_hash() {
        return Ok(false);
    }
    let pinned = ProgramInfo::from_pin(layout.program())?;
    if pinned.tag() != meta.program_tag {
        return Ok(false);
    }
    match program::link_info(&layout.link())? {
        Some(link) => Ok(link.program_id == pinned.id()),
        None => Ok(true),
    }
}

/// Closes steer's own directories (the state directory, and `<bpffs>/steer`
/// for the default layout) that an older steer made 0755: root's, not a
/// symlink, not writable by others (so nobody else can have changed
/// anything in it), they are made 0700. Anything else is left for the
/// path check to refuse with its own message. Says what it changed.
fn close_modes(layout: &Layout) -> Result<Vec<String>> {
    use nix::sys::stat::{Mode, fchmod, fstat};
    let mut notes = Vec::new();
    let mut dirs: Vec<&Path> = layout.dir.ancestors().take(layout.owned).collect();
    dirs.reverse();
    for dir in dirs {
        match std::fs::symlink_metadata(dir) {
            Ok(m) if m.file_type().is_dir() => {}
            _ => continue,
        }
        // Every component above checked as a state's path is; this one
        // opened without following a symlink.
        let Ok(fd) = bpffs::open_checked_bpffs(dir, 0) else { continue };
        let stat = fstat(&fd).map_err(std::io::Error::from)?;
        let mode = stat.st_mode & 0o7777;
        if stat.st_uid != 0 || rustix::process::geteuid().as_raw() != 0 || mode & 0o077 == 0 || mode & 0o022 != 0 {
            continue;
        }
        fchmod(&fd, Mode::S_IRWXU).with_context(|| format!("making {} 0700", dir.display()))?;
        notes.push(format!(
            "made {} 0700 (it was {mode:04o}, as steer releases before b2bce37 made it; steer's directories are \
             closed to other users)",
            dir.display()
        ));
    }
    Ok(notes)
}

/// Where the kernel cannot exchange two directories in one rename, an
/// upgrade moves the old state to `<dir>-retired` and then the new one into
/// place: killed in between, the state directory is missing. Puts the new
/// one in place; true when it did.
fn recover_missing(layout: &Layout) -> Result<bool> {
    let (Some(staging), Some(retired)) = (upgrade_staging(layout), upgrade_retired(layout)) else {
        return Ok(false);
    };
    if !staging.exists() || !retired.exists() {
        return Ok(false);
    }
    let (parent, name) = bpffs::split(&layout.dir)?;
    let parent_fd = bpffs::open_checked_bpffs(parent, layout.owned - 1)?;
    let staged = staging.file_name().expect("a sibling has a name");
    match crate::kernel::rename_in(&parent_fd, staged, name, libc::RENAME_NOREPLACE) {
        Ok(()) => {
            log::info!("moved {} into place (an interrupted upgrade)", staging.display());
            Ok(true)
        }
        Err(nix::errno::Errno::EEXIST | nix::errno::Errno::ENOTEMPTY) => Ok(false),
        Err(e) => Err(std::io::Error::from(e)).context("moving an upgraded state into place"),
    }
}

/// The directory a new state is built in, beside the state directory.
struct Staging {
    dir: PathBuf,
    retired: PathBuf,
    owned: usize,
}

impl Staging {
    fn of(layout: &Layout) -> Result<Self> {
        match (upgrade_staging(layout), upgrade_retired(layout)) {
            (Some(dir), Some(retired)) => Ok(Self { dir, retired, owned: layout.owned }),
            _ => fail!(Invalid, "{} is not a directory steer can upgrade state in", layout.dir.display()),
        }
    }

    fn layout(&self) -> Layout {
        Layout { dir: self.dir.clone(), owned: self.owned }
    }

    /// Locks an existing staging directory (the state's lock, held by this
    /// process, keeps other upgrades out; gc may look at it).
    fn lock(&self) -> Result<StateLock> {
        let fd = bpffs::open_checked_bpffs(&self.dir, self.owned)?;
        StateLock::acquire(fd, &self.dir, LockMode::Exclusive)
    }

    /// Whether the live link runs the program pinned here: the switch was
    /// made, and this directory holds the state that serves.
    fn is_live(&self, layout: &Layout) -> Result<bool> {
        let program = self.layout().program();
        if !program.exists() {
            return Ok(false);
        }
        let id = links::program_id(&program)?;
        for pin in [layout.link(), self.layout().link()] {
            if pin.exists() {
                return Ok(Link::open(&pin)?.ids()?.1 == id);
            }
        }
        Ok(false)
    }
}

/// Removes a state that does not serve: its follow links detached from
/// their cgroups (the serving state has its own on the same cgroups: the
/// old state's after a switch, the new one's before it), every other pin
/// unpinned, never detached (its dispatcher link, if pinned here too, is
/// the live one), then the directory. Detached, not only unpinned: the
/// kernel frees an unpinned link later, and until then its program runs.
fn remove_retired(dir: &Path, owned: usize) -> Result<()> {
    let layout = Layout { dir: dir.to_path_buf(), owned };
    for pin in layout.follow_hook_links() {
        program::detach(&pin)?;
    }
    layout.remove_chunks().with_context(|| format!("removing {}", layout.chunks_dir().display()))?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
    }
    std::fs::remove_dir(dir).with_context(|| format!("removing {}", dir.display()))
}

/// The switch is made: the link (pinned in the old directory) runs the
/// program pinned in `staging` (or there is no link: nothing to switch).
/// Pins the link there too, puts the new state in place of the old one,
/// and removes the old.
fn finish(state: &Dispatcher<Repair>, staging: &Staging, lock: StateLock) -> Result<()> {
    let layout = state.layout();
    let new = staging.layout();
    if layout.link().exists() && !new.link().exists() {
        Link::open(&layout.link())?.pin(&new.link())?;
    }
    let (parent, name) = bpffs::split(&layout.dir)?;
    let parent_fd = bpffs::open_checked_bpffs(parent, layout.owned - 1)?;
    let staged = staging.dir.file_name().expect("a sibling has a name");
    match crate::kernel::rename_in(&parent_fd, staged, name, libc::RENAME_EXCHANGE) {
        Ok(()) => remove_retired(&staging.dir, staging.owned)?,
        // bpffs exchanges directories since Linux 5.12: before, two renames.
        Err(nix::errno::Errno::EINVAL) => {
            let retired = staging.retired.file_name().expect("a sibling has a name");
            crate::kernel::rename_in(&parent_fd, name, retired, libc::RENAME_NOREPLACE)
                .map_err(std::io::Error::from)
                .context("moving the old state aside")?;
            crate::kernel::rename_in(&parent_fd, staged, name, libc::RENAME_NOREPLACE)
                .map_err(std::io::Error::from)
                .context("moving the upgraded state into place")?;
            remove_retired(&staging.retired, staging.owned)?;
        }
        Err(e) => return Err(std::io::Error::from(e)).context("putting the upgraded state in place"),
    }
    drop(lock);
    Ok(())
}

/// Same layout: this build's dispatcher on the live link, its follow
/// programs on their cgroup links, its backfill iterators pinned; the maps
/// stay. Each link switches programs in one step.
fn swap(state: &Dispatcher<Repair>, meta: &MetaPrefix) -> Result<Upgraded> {
    let layout = state.layout();
    bpffs::require_pin(&layout.program(), "steer program")?;
    if let Some(missing) = MAPS.iter().map(|m| layout.map(m.name)).find(|p| !p.exists()) {
        fail!(Pin, "{} is missing: the state is incomplete; `steerctl unload` and load again", missing.display());
    }
    // The new programs reuse the pinned maps as they are: they must be the
    // shapes they were built for.
    for m in MAPS {
        open_spec(&layout.map(m.name), m)?;
    }
    let old_id = ProgramInfo::from_pin(layout.program())?.id();
    let mut loaded = Loaded::load(|name| layout.map(name))?;
    let program = loaded.program();
    let new_id = program.info()?.id();
    // Pinned beside the old one first (bpffs names take no dots), so a
    // failure before the switch leaves everything as it was.
    let staged = layout.staged_pins().remove(0);
    let _ = std::fs::remove_file(&staged);
    program.pin(&staged).context("pinning the new program")?;
    if layout.link().exists() {
        if let Err(e) = Link::open(&layout.link()).and_then(|link| link.update(program.fd()?.as_fd())) {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
    }
    std::fs::rename(&staged, layout.program()).context("replacing the program pin")?;
    let mut follow_links = 0;
    for pin in layout.follow_links() {
        let Some((hook, scope)) = pin.file_name().and_then(|n| n.to_str()).and_then(program::parse_follow_pin) else {
            continue;
        };
        if !pin.exists() {
            continue;
        }
        let follow = FollowProgram::load(|name| layout.map(name), hook, scope, meta.netns_cookie)?;
        Link::open(&pin)?.update(follow.fd()?)?;
        follow_links += 1;
    }
    for kind in Backfill::ALL {
        let pin = layout.backfill_link(kind);
        if pin.exists() {
            let staged = pin.with_file_name(format!("{}_new", kind.pin_name()));
            let _ = std::fs::remove_file(&staged);
            program::pin_backfill(|name| layout.map(name), kind, &staged)?;
            std::fs::rename(&staged, &pin).context("replacing a backfill iterator")?;
        }
    }
    record_identity(state, &program.info()?)?;
    log::info!("upgraded program {old_id} -> {new_id} and {follow_links} follow link(s)");
    let mut out = Upgraded::new(layout, Action::Swapped);
    out.from_layout = Some(LAYOUT_VERSION);
    out.old_program = Some(old_id);
    out.new_program = Some(new_id);
    out.follow_links = follow_links;
    Ok(out)
}

/// How a map of this layout gets its content from a state of layout `from`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// Copied element by element: same name and shape in both layouts.
    Copy,
    /// Labels' sockets, carried in the kernel: old key x stride.
    Sockets { stride: u32 },
    /// The seed socket, carried in the kernel (key 0).
    SeedSocket,
    /// Made again from what is carried (the generation, its half byte).
    Derived,
    /// `steer_meta`: carried field by field.
    Meta,
    /// A record of bindings: its bindings carried into this layout's
    /// table, whatever the old one's (hash maps up to layout 5).
    Record,
    /// Starts empty: new in this layout, or only ever transient.
    Empty,
}

/// Whether the maps `old` and `new` hold the same elements: type, key,
/// value, flags and inner maps alike. Sizes may differ for hash maps (a
/// record grown past its spec keeps its size).
fn same_shape(old: &MapSpec, new: &MapSpec) -> bool {
    (old.map_type, old.key_size, old.value_size, old.flags, old.inner)
        == (new.map_type, new.key_size, new.value_size, new.flags, new.inner)
        && (old.max_entries == new.max_entries || new.map_type == BPF_MAP_TYPE_HASH)
}

/// The rule for map `new` of this layout, from layout `from`: the one place
/// that knows what each layout change means for the content. A map added
/// to a layout needs nothing here (it starts empty); a map whose shape
/// changes fails here until it gets a converter.
fn carry(from: &LayoutVersion, new: &MapSpec) -> Result<Carry> {
    let old = from.map(new.name);
    Ok(match new.name {
        map::STEER_META => Carry::Meta,
        map::STEER_CONFIG | map::STEER_DIRS | map::STEER_RANGES => Carry::Derived,
        map::BINDINGS_0 | map::BINDINGS_1 => Carry::Record,
        // Transient: sockets named for one backfill pass, unread events;
        // live tracers' sockets, filters and ring buffers (a tracer keeps
        // its slot across a swap, not across a migration: it ends, and
        // runs again on the new state).
        map::BACKFILL | map::FOLLOW_EVENTS | map::TRACE_TRACERS | map::TRACE_FILTERS | map::TRACE_RINGS => Carry::Empty,
        // Layout 4 made each slot SLOT_MEMBERS keys wide: a layout 3 slot's
        // one socket becomes its first member.
        map::SOCKETS => Carry::Sockets { stride: if from.version < 4 { SLOT_MEMBERS } else { 1 } },
        map::ECHO_SOCKET => Carry::SeedSocket,
        _ => match old {
            None => Carry::Empty,
            Some(old) if same_shape(old, new) => Carry::Copy,
            Some(_) => fail!(
                Invalid,
                "map {} changed shape from {} to {} and upgrade has no converter for it (ops/upgrade.rs: carry)",
                new.name,
                from.describe(),
                layouts::current().describe()
            ),
        },
    })
}

/// An old state's map `name`, opened and checked against `from`'s spec;
/// None when it is not pinned (layout 2 states from before b5a017f lack
/// socket_flags).
fn old_map(old: &Layout, from: &LayoutVersion, name: &str) -> Result<Option<MapData>> {
    let (Some(spec), path) = (from.map(name), old.map(name)) else { return Ok(None) };
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(open_spec(&path, spec)?))
}

/// Builds a state of this layout from the one at `state` (layout `from`)
/// and makes it the one that serves: see the module.
fn migrate(
    state: &Dispatcher<Repair>,
    from: &'static LayoutVersion,
    meta: &MetaPrefix,
    staging: Staging,
) -> Result<Upgraded> {
    let old = state.layout();
    // Layout 2 states from before b5a017f have no socket_flags.
    for m in from.maps.iter().filter(|m| m.name != map::SOCKET_FLAGS) {
        if !old.map(m.name).exists() {
            fail!(
                Pin,
                "{} is missing: the state is incomplete; `steerctl unload` and load again",
                old.map(m.name).display()
            );
        }
    }
    let rules = MAPS.iter().map(|m| Ok((m.name, carry(from, m)?))).collect::<Result<BTreeMap<_, _>>>()?;
    let (carried, new_id, old_id) = match build_and_switch(old, from, meta, &staging, &rules) {
        Ok(done) => done,
        Err(e) => {
            // Not switched (the switch is the last step that can fail): the
            // old state serves; what was built goes, its follow links too.
            if staging.dir.exists() && !staging.is_live(old).unwrap_or(true) {
                if let Err(cleanup) = remove_retired(&staging.dir, staging.owned) {
                    log::warn!("removing {}: {}; the next upgrade removes it", staging.dir.display(), cleanup.chain());
                }
            }
            return Err(e);
        }
    };
    finish(state, &staging, staging.lock()?)?;
    log::info!("migrated {} from {} to {}", old.dir.display(), from.describe(), layouts::current().describe());
    let mut out = Upgraded::new(old, Action::Migrated);
    out.from_layout = Some(from.version);
    out.old_program = old_id;
    out.new_program = Some(new_id);
    out.carried = Some(carried);
    Ok(out)
}

/// Builds the new state in `staging` from the old one and switches the
/// live link to its program: the module's steps up to the switch. Returns
/// what was carried, and the new and old programs' ids.
fn build_and_switch(
    old: &Layout,
    from: &'static LayoutVersion,
    meta: &MetaPrefix,
    staging: &Staging,
    rules: &BTreeMap<&str, Carry>,
) -> Result<(Carried, u32, Option<u32>)> {
    let new = staging.layout();
    // The new directory, made and locked like a load's.
    let (parent, _) = bpffs::split(&old.dir)?;
    let parent_fd = bpffs::open_checked_bpffs(parent, old.owned - 1)?;
    let staged_name = staging.dir.file_name().expect("a sibling has a name");
    bpffs::make_private_dir(&parent_fd, staged_name)?;
    let lock = StateLock::fresh(bpffs::open_checked_bpffs(&new.dir, new.owned)?)?;
    // Hash maps that grew past their spec (records) keep their size: made
    // before the object is loaded, which then reuses them.
    for m in MAPS.iter().filter(|m| rules[m.name] == Carry::Copy && m.map_type == BPF_MAP_TYPE_HASH) {
        if let Some(data) = old_map(old, from, m.name)? {
            let size = data.info()?.max_entries();
            if size > m.max_entries {
                create_like(m, size)?.pin(new.map(m.name)).with_context(|| format!("pinning {}", m.name))?;
            }
        }
    }
    let mut loaded = Loaded::load(|name| new.map(name))?;
    let program = loaded.program();
    program.pin(new.program()).context("pinning the program")?;
    let mut carried = Carried::default();
    for m in MAPS.iter().filter(|m| rules[m.name] == Carry::Copy) {
        if let Some(data) = old_map(old, from, m.name)? {
            let target = open_spec(&new.map(m.name), m)?;
            copy_entries(&data, &target).with_context(|| format!("copying {}", m.name))?;
            carried.copied.push(m.name.to_string());
        }
    }
    // The records: only the set in use holds anything the new state needs.
    let in_use = if meta.active_record & 1 == 0 { map::BINDINGS_0 } else { map::BINDINGS_1 };
    let carried_record = match old_map(old, from, in_use)? {
        Some(data) => record_entries(data, from.map(in_use).expect("old_map found it"))?,
        None => Vec::new(),
    };
    // steer_meta: the record set in use and its version; this namespace,
    // this program. The generation is compiled below, so the plane is
    // current whatever the old one was.
    let plane = Plane::open(&new)?;
    plane.set_meta(&StateMeta {
        layout_version: LAYOUT_VERSION,
        active_record: meta.active_record & 1,
        record_version: meta.record_version,
        plane_version: meta.record_version,
        netns_cookie: netns::cookie()?.unwrap_or(0),
        netns_inode: netns::current_inode()?,
        ..Default::default()
    })?;
    let new_state = Dispatcher::<ReadWrite>::made(new.clone(), lock);
    record_identity(&new_state, &program.info()?)?;
    let maps = new_state.maps()?;
    maps.record.replace(
        (meta.active_record & 1) as usize,
        crate::state::record::capacity_for(carried_record.len()),
        &carried_record,
    )?;
    carried.copied.push(in_use.to_string());
    let entries = maps.record.entries(&maps.plane.meta()?)?;
    bindings::publish(&new_state, &entries)?;
    let config: Option<DataplaneConfig> = match old_map(old, from, map::STEER_CONFIG)? {
        Some(data) => RawMap::<u32, DataplaneConfig>::new(data)?.get(&0)?,
        None => None,
    };
    maps.plane.set_seed(config.is_some_and(|c| c.seed_enabled != 0))?;
    // The servers the old state followed, followed by this one's programs
    // too before the sockets are carried: a socket that starts listening
    // from here on goes into both states' maps.
    if from.map(map::FOLLOWS).is_some() {
        carried.follow_links = follow_like(old, &new, &new_state)?;
    }
    let (carried_sockets, seed_socket) = carry_sockets(old, from, &new, rules)?;
    carried.sockets = carried_sockets;
    carried.seed_socket = seed_socket;
    carried.labels = maps.labels.all()?.len();
    carried.bindings = entries.len();
    carried.seed_ports = maps.seed.ports()?.len();
    carried.counter_sets = new_state.metrics()?.len();
    let new_id = program.info()?.id();
    let old_id = links::program_id(&old.program()).ok();
    // The switch: from here on lookups read the new maps only.
    if old.link().exists() {
        Link::open(&old.link())?.update(program.fd()?.as_fd())?;
    }
    Ok((carried, new_id, old_id))
}

/// The bindings of an old record set: a hash map of key -> label id (up to
/// layout 5), or this layout's table.
fn record_entries(data: MapData, spec: &MapSpec) -> Result<Vec<(steer_common::BindingKey, u32)>> {
    if spec.map_type == BPF_MAP_TYPE_HASH {
        return RawMap::<steer_common::BindingKey, u32>::new(data)?.entries().context("reading the old record");
    }
    let slots = data.info()?.max_entries();
    let table = crate::kernel::maps::MappedArray::<steer_common::RecordSlot>::new(data, slots)?;
    Ok(table
        .as_slice()
        .iter()
        .filter(|s| s.label != steer_common::RecordSlot::EMPTY && s.label != steer_common::RecordSlot::REMOVED)
        .map(|s| (s.key, s.label - 1))
        .collect())
}

fn state_spec(name: &str) -> &'static MapSpec {
    steer_common::map_spec(name).expect("steer-common lists every map")
}

/// Carries the old state's sockets into the new one's maps, in the kernel
/// (see `program::carry_sockets`): the old socket maps' cookies read, each
/// planned at its new key, then checked to have arrived (or to have closed
/// meanwhile, gone from the old map too). Returns how many labels' sockets
/// were carried, and whether the seed socket was.
fn carry_sockets(
    old: &Layout,
    from: &LayoutVersion,
    new: &Layout,
    rules: &BTreeMap<&str, Carry>,
) -> Result<(usize, bool)> {
    // (map, old key, new key, cookie) of every socket to carry.
    let mut wanted: Vec<(&str, u32, u32, u64)> = Vec::new();
    for (&name, rule) in rules {
        let stride = match rule {
            Carry::Sockets { stride } => *stride,
            Carry::SeedSocket => 1,
            _ => continue,
        };
        let Some(spec) = from.map(name) else { continue };
        for (key, cookie) in SocketMap::open_spec(&old.map(name), spec)?.cookies()? {
            wanted.push((name, key, key * stride, cookie));
        }
    }
    // A socket in more slots than a plan entry holds goes in later rounds.
    let mut rounds: Vec<BTreeMap<u64, MigratePlan>> = Vec::new();
    for &(name, _, key, cookie) in &wanted {
        let round = rounds
            .iter()
            .position(|r| r.get(&cookie).is_none_or(|p| name == map::ECHO_SOCKET || p.keys.contains(&NO_KEY)));
        let round = match round {
            Some(r) => r,
            None => {
                rounds.push(BTreeMap::new());
                rounds.len() - 1
            }
        };
        let entry = rounds[round].entry(cookie).or_default();
        if name == map::ECHO_SOCKET {
            entry.seed = 1;
        } else if let Some(free) = entry.keys.iter_mut().find(|k| **k == NO_KEY) {
            *free = key;
        }
    }
    for plan in &rounds {
        program::carry_sockets(|n| new.map(n), plan)?;
    }
    let (mut sockets, mut seed) = (0, false);
    for (name, old_key, key, cookie) in wanted {
        let here = SocketMap::open_spec(&new.map(name), state_spec(name))?.cookie(key)?;
        if here == Some(cookie) {
            if name == map::ECHO_SOCKET {
                seed = true;
            } else {
                sockets += 1;
            }
            continue;
        }
        let spec = from.map(name).expect("read from it above");
        if SocketMap::open_spec(&old.map(name), spec)?.cookie(old_key)? == Some(cookie) {
            fail!(
                Kernel,
                "the socket with cookie {cookie} ({name} key {old_key}) could not be carried to the new state: it is \
                 not among this namespace's TCP and UDP sockets; nothing was switched, the old state still serves"
            );
        }
    }
    Ok((sockets, seed))
}

/// Attaches, for the new state, a follow program to each cgroup link the
/// old state has (same hook and scope; the scope's cgroup as the old
/// state recorded it, in `follow_scopes`, copied already), and pins the
/// backfill iterators it had. Returns how many follow links.
fn follow_like(old: &Layout, new: &Layout, new_state: &Dispatcher<ReadWrite>) -> Result<usize> {
    let scopes = new_state.maps()?.follows.scopes()?;
    let cookie = new_state.meta()?.netns_cookie;
    let mut count = 0;
    for pin in old.follow_links() {
        let name = pin.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        if !pin.exists() {
            continue;
        }
        if let Some((hook, scope)) = program::parse_follow_pin(&name) {
            let Some(recorded) = scopes.get(&scope) else { continue };
            let cgroup = if recorded.path.is_empty() { Cgroup::root()? } else { Cgroup::named(&recorded.path)? };
            if cgroup.id != recorded.cgroup_id {
                log::warn!("scope {scope}'s cgroup {} is another one now; its servers are not followed", recorded.path);
                continue;
            }
            program::attach_follow(|n| new.map(n), hook, scope, cookie, cgroup.fd(), &new.follow_link(hook, scope))
                .with_context(|| format!("attaching the follow program to {}", cgroup.describe()))?;
            count += 1;
        }
    }
    for kind in Backfill::ALL {
        if old.backfill_link(kind).exists() {
            program::pin_backfill(|n| new.map(n), kind, &new.backfill_link(kind))?;
        }
    }
    Ok(count)
}

/// What `upgrade` would do with a state, for `status`.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Planned {
    /// It runs this build's programs in this layout.
    Nothing,
    /// Same layout, another build's programs: swapped on their links.
    Swap,
    /// An older layout: migrated in place.
    Migrate,
    /// An interrupted upgrade switched already: the next run finishes it.
    Finish,
    /// Not a state upgrade can take (from before layout versions).
    Refuse,
}

/// What `upgrade` would do with the state at `layout`, and the sentence
/// saying so.
pub fn plan(layout: &Layout) -> Result<(Planned, String)> {
    let current = layouts::current().describe();
    if let Ok(staging) = Staging::of(layout) {
        if staging.dir.exists() {
            return Ok(if staging.is_live(layout)? {
                (
                    Planned::Finish,
                    format!(
                        "an upgrade switched to {} and was interrupted: `steerctl upgrade` finishes it",
                        staging.dir.display()
                    ),
                )
            } else {
                (
                    Planned::Migrate,
                    format!(
                        "an upgrade was interrupted before it switched ({} is left): `steerctl upgrade` starts it again",
                        staging.dir.display()
                    ),
                )
            });
        }
    }
    Ok(match layouts::detect(layout)? {
        Found::Tagged(meta) if meta.layout_version == LAYOUT_VERSION => {
            if up_to_date(layout, &meta)? {
                (Planned::Nothing, "current; `steerctl upgrade` has nothing to do".into())
            } else {
                (
                    Planned::Swap,
                    "current; another build's programs: `steerctl upgrade` swaps them on the live links".into(),
                )
            }
        }
        Found::Tagged(meta) if layouts::find(meta.layout_version).is_some() => {
            (Planned::Migrate, format!("`steerctl upgrade` migrates it to {current} in place, steering all along"))
        }
        Found::Tagged(_) | Found::Untagged | Found::Empty => (
            Planned::Refuse,
            format!("`steerctl upgrade` cannot migrate it to {current}: `steerctl unload` and load again"),
        ),
    })
}

/// What an older layout's state holds, read with its own specs: what
/// `status` shows for it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OldState {
    pub labels: usize,
    pub bindings: usize,
    pub registered_sockets: usize,
    pub ports: Vec<u16>,
    pub seed_cookie: Option<u64>,
}

/// Reads an older layout's state (see [`OldState`]); label names too.
pub fn read_old(layout: &Layout, version: u32) -> Result<(OldState, Vec<String>)> {
    let Some(from) = layouts::find(version) else {
        fail!(Conflict, "{} is not a layout this steerctl knows", layouts::describe(version));
    };
    let Found::Tagged(meta) = layouts::detect(layout)? else {
        fail!(Pin, "{} has no steer_meta", layout.dir.display());
    };
    let mut out = OldState::default();
    let mut names = Vec::new();
    if let Some(data) = old_map(layout, from, map::LABELS)? {
        let labels: RawMap<steer_common::LabelName, u32> = RawMap::new(data)?;
        names = labels.entries()?.iter().map(|(name, _)| label_from_key(name)).collect();
        out.labels = names.len();
    }
    let record = if meta.active_record & 1 == 0 { map::BINDINGS_0 } else { map::BINDINGS_1 };
    if let Some(data) = old_map(layout, from, record)? {
        out.bindings = RawMap::<steer_common::BindingKey, u32>::new(data)?.entries()?.len();
    }
    if let Some(spec) = from.map(map::SOCKETS).filter(|s| s.map_type == BPF_MAP_TYPE_SOCKMAP) {
        out.registered_sockets = SocketMap::open_spec(&layout.map(map::SOCKETS), spec)?.cookies()?.len();
    }
    if layout.ports().exists() {
        out.ports = crate::kernel::maps::PortMap::open(&layout.ports())?.list()?;
    }
    if let Some(spec) = from.map(map::ECHO_SOCKET) {
        out.seed_cookie = SocketMap::open_spec(&layout.socket(), spec)?.cookie(0)?;
    }
    names.sort();
    Ok((out, names))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_of_this_layout_has_a_rule_from_every_older_one() {
        for from in layouts::HISTORY {
            for m in MAPS {
                let rule = carry(from, m).unwrap_or_else(|e| panic!("{} from {}: {e}", m.name, from.describe()));
                if from.map(m.name).is_none() {
                    assert!(matches!(rule, Carry::Empty | Carry::Derived | Carry::Meta));
                }
            }
        }
    }

    #[test]
    fn layout_3_sockets_become_first_members_and_the_rest_is_copied() {
        let l3 = layouts::find(3).unwrap();
        assert_eq!(carry(l3, state_spec(map::SOCKETS)).unwrap(), Carry::Sockets { stride: SLOT_MEMBERS });
        assert_eq!(carry(l3, state_spec(map::ECHO_SOCKET)).unwrap(), Carry::SeedSocket);
        assert_eq!(carry(l3, state_spec(map::BINDINGS_0)).unwrap(), Carry::Record);
        for name in [map::LABELS, map::DESTINATIONS, map::METRICS, map::ECHO_PORTS, map::SOCKET_FLAGS] {
            assert_eq!(carry(l3, state_spec(name)).unwrap(), Carry::Copy, "{name}");
        }
        assert_eq!(carry(l3, state_spec(map::FOLLOWS)).unwrap(), Carry::Empty);
        let current = layouts::current();
        assert_eq!(carry(current, state_spec(map::SOCKETS)).unwrap(), Carry::Sockets { stride: 1 });
        assert_eq!(carry(current, state_spec(map::FOLLOWS)).unwrap(), Carry::Copy);
        // Tracers are not carried; their counters are.
        let l4 = layouts::find(4).unwrap();
        assert_eq!(carry(l4, state_spec(map::TRACE_RINGS)).unwrap(), Carry::Empty);
        assert_eq!(carry(current, state_spec(map::TRACE_TRACERS)).unwrap(), Carry::Empty);
        assert_eq!(carry(current, state_spec(map::TRACE_METRICS)).unwrap(), Carry::Copy);
    }

    #[test]
    fn a_changed_shape_without_a_converter_is_refused() {
        static CHANGED: [MapSpec; 1] = [MapSpec {
            name: "labels",
            map_type: BPF_MAP_TYPE_HASH,
            key_size: 32,
            value_size: 4,
            max_entries: 4096,
            flags: 0,
            inner: None,
        }];
        let from = LayoutVersion { version: 1, name: "test", summary: "", since: "", maps: &CHANGED };
        let err = carry(&from, state_spec(map::LABELS)).unwrap_err().to_string();
        assert!(err.contains("changed shape") && err.contains("no converter"), "{err}");
        // A hash map that grew keeps its size: not a change of shape.
        let mut grown = *state_spec(map::LABELS);
        grown.max_entries *= 64;
        assert!(same_shape(&grown, state_spec(map::LABELS)));
    }
}
