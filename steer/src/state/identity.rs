//! Whose state this is: the namespace it was made for (its cookie, which
//! the kernel never reuses, beside its inode number, which it does), the
//! layout version, and the program it runs. Stale state (its namespace
//! gone, its link dead) and another build's program are refused by
//! writes; `gc` removes state whose namespace no longer exists.

use aya::programs::ProgramInfo;
use steer_common::{LAYOUT_VERSION, StateMeta};

use super::{Access, Dispatcher, ReadWrite, layouts, plane::Plane};
use crate::{
    error::{Context, Result, fail},
    kernel::{netns, program},
};

/// Records the namespace and the program (just loaded or upgraded to) in
/// `steer_meta`.
pub(crate) fn record_identity<A: Access>(state: &Dispatcher<A>, program: &ProgramInfo) -> Result<()> {
    let plane = Plane::open(state.layout())?;
    let meta = plane.meta()?;
    plane.set_meta(&StateMeta {
        layout_version: LAYOUT_VERSION,
        netns_cookie: netns::cookie()?.unwrap_or(0),
        netns_inode: netns::current_inode()?,
        program_tag: program.tag(),
        object_hash: program::object_hash(),
        ..meta
    })
}

/// Why this state is stale, if it is: its namespace is gone (its cookie is
/// not this namespace's) or its link died with its namespace. Nothing when
/// it has no `steer_meta` to tell (a half-made state).
pub(crate) fn staleness<A: Access>(state: &Dispatcher<A>) -> Result<Option<String>> {
    let layout = state.layout();
    // Read by the prefix every layout's steer_meta shares: an older
    // layout's state can be stale too.
    let layouts::Found::Tagged(meta) = layouts::detect(layout)? else { return Ok(None) };
    let dir = layout.dir.display();
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
    if let Some(info) = program::link_info(&layout.link())? {
        if info.netns_inode == 0 {
            return Ok(Some(format!("{dir} is stale: its link {} is dead (its namespace is gone)", info.id)));
        }
    }
    Ok(None)
}

/// Fails unless this build may change the state: not stale, this layout,
/// and the loaded program this build's own.
pub(crate) fn check_usable(state: &Dispatcher<ReadWrite>) -> Result<()> {
    if let Some(stale) = staleness(state)? {
        fail!(Conflict, "{stale}; writes are refused: remove it with `steerctl gc`");
    }
    if let Some(staging) = super::layout::upgrade_staging(state.layout()).filter(|s| s.exists()) {
        fail!(
            Conflict,
            "an upgrade of {} was interrupted ({} is left): run `steerctl upgrade` to finish it; writes are refused \
             until then",
            state.layout().dir.display(),
            staging.display()
        );
    }
    match state.layout_version() {
        Some(LAYOUT_VERSION) => {}
        Some(version) => fail!(
            Conflict,
            "{} has {}, an older steer's; this steerctl writes {}: run `steerctl upgrade` to migrate it in place \
             (steering goes on meanwhile)",
            state.layout().dir.display(),
            layouts::describe(version),
            layouts::current().describe()
        ),
        None => fail!(
            Conflict,
            "{} has no steer_meta: it is a state from before layout versions, or half made; `steerctl unload` and \
             load again",
            state.layout().dir.display()
        ),
    }
    let meta = state.maps()?.plane.meta()?;
    let pinned = ProgramInfo::from_pin(state.layout().program())
        .with_context(|| format!("opening {}", state.layout().program().display()))?;
    if pinned.tag() != meta.program_tag {
        fail!(
            Conflict,
            "the program pinned at {} (tag {:016x}) is not the one steer loaded (tag {:016x}); run `steerctl upgrade`",
            state.layout().program().display(),
            pinned.tag(),
            meta.program_tag
        );
    }
    if meta.object_hash != program::object_hash() {
        fail!(
            Conflict,
            "the loaded program (tag {:016x}) comes from another steer build; run `steerctl upgrade` to load this one's",
            pinned.tag()
        );
    }
    Ok(())
}
