//! `steerctl apply FILE`: a declarative config (see [`crate::model::config`])
//! planned in full against the state and the sockets of the namespace
//! before anything changes, then applied: the bindings in one switch, then
//! each registration.

use std::collections::BTreeMap;

use serde::Serialize;
use steer_common::BindingKey;

use super::{
    follow::{self, Followed},
    register::{self, Choice},
};
use crate::{
    discovery::{Member, OwnerFilter, groups::groups, owners::read_pid_file},
    error::{Context, Result, fail},
    model::{
        Binding, BindingsFile, Family, SocketInfo,
        binding::unserved,
        config::{Config, Wanted},
        follow::Follow,
    },
    state::{Dispatcher, Read, ReadWrite},
};

/// How the bindings would change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BindingsChange {
    /// False when the config has no `bindings`: they are left alone.
    pub managed: bool,
    pub added: Vec<Binding>,
    pub removed: Vec<Binding>,
}

/// One registration's step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub wanted: Wanted,
    #[serde(flatten)]
    pub choice: Choice,
}

impl Step {
    /// The (family, cookie) the label's slot holds once this step is done.
    pub fn outcome(&self) -> Option<(Family, u64)> {
        match &self.choice {
            Choice::Keep { family, cookie, .. } => Some((*family, *cookie)),
            Choice::Register { member, .. } => Some((member.family, member.cookie)),
            Choice::Wait { .. } | Choice::Follow { .. } => None,
        }
    }

    pub fn describe(&self, dry_run: bool) -> String {
        let w = &self.wanted;
        let head = format!("{} {}", w.label, w.target());
        match &self.choice {
            Choice::Keep { cookie, group, .. } => {
                format!("{head}: unchanged (cookie {cookie}{})", group_note(*group, w.no_reuseport))
            }
            Choice::Register { member, owner, group, replacing, .. } => {
                let verb = if dry_run { "would register" } else { "registered" };
                let replacing = replacing.map(|c| format!(", replacing cookie {c}")).unwrap_or_default();
                format!(
                    "{head}: {verb} {} {} (cookie {}) from {owner}{replacing}{}",
                    w.protocol,
                    member.local,
                    member.cookie,
                    group_note(*group, w.no_reuseport)
                )
            }
            Choice::Wait { reason, .. } => format!("{head}: waiting: {reason}"),
            Choice::Follow { cgroup, held } => {
                let scope = if cgroup.is_empty() { "any cgroup".to_string() } else { format!("cgroup {cgroup}") };
                let held = match held.len() {
                    0 => "nothing listens there yet".to_string(),
                    1 => format!("holds cookie {}", held[0]),
                    n => format!("holds {n} sockets"),
                };
                let verb = if dry_run { "would be followed" } else { "followed" };
                format!("{head}: {verb} in the kernel (sockets of {scope}); {held}")
            }
        }
    }
}

fn group_note(group: usize, no_reuseport: bool) -> String {
    match (group, no_reuseport) {
        (1, _) => String::new(),
        (n, false) => format!("; reuseport group of {n}, all serve"),
        (n, true) => format!("; reuseport group of {n}, only this one serves (no_reuseport)"),
    }
}

/// What applying a config does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub bindings: BindingsChange,
    pub registrations: Vec<Step>,
    /// The registrations the kernel is to follow: all of them, replacing
    /// the ones it follows now.
    pub follows: Vec<Follow>,
    /// Whether that differs from what it follows now.
    pub follows_change: bool,
    /// Why the kernel follows none here, if it cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub follow_unsupported: Option<String>,
}

impl Plan {
    /// Whether applying it changes anything.
    pub fn changes(&self) -> bool {
        !self.bindings.added.is_empty()
            || !self.bindings.removed.is_empty()
            || self.follows_change
            || self.registrations.iter().any(|s| matches!(s.choice, Choice::Register { .. }))
    }

    pub fn describe(&self, dry_run: bool) -> Vec<String> {
        let mut out = Vec::new();
        let (add, remove) = if dry_run { ("would bind", "would unbind") } else { ("bound", "unbound") };
        out.extend(self.bindings.added.iter().map(|b| format!("{add} {b}")));
        out.extend(self.bindings.removed.iter().map(|b| format!("{remove} {b}")));
        out.extend(self.registrations.iter().map(|s| s.describe(dry_run)));
        if let Some(why) = &self.follow_unsupported {
            if !self.registrations.is_empty() {
                out.push(format!(
                    "not followed in the kernel: {why}; keep `steerctl watch` running to re-register restarted servers"
                ));
            }
        }
        if !self.changes() {
            out.push("no changes".into());
        }
        out
    }
}

/// Plans `config` against the state and the sockets of this namespace;
/// fails (changing nothing) when the config cannot be applied.
pub fn plan<A: Read>(state: &Dispatcher<A>, config: &Config) -> Result<Plan> {
    config.validate()?;
    let recorded = state.bindings()?;
    let bindings = match &config.bindings {
        None => BindingsChange::default(),
        Some(wanted) => {
            let keyed = |list: &[Binding]| -> BTreeMap<(BindingKey, String), Binding> {
                list.iter().map(|b| ((b.key(), b.label.clone()), b.clone())).collect()
            };
            let (old, new) = (keyed(&recorded), keyed(wanted));
            BindingsChange {
                managed: true,
                added: new.iter().filter(|(k, _)| !old.contains_key(k)).map(|(_, b)| b.clone()).collect(),
                removed: old.iter().filter(|(k, _)| !new.contains_key(k)).map(|(_, b)| b.clone()).collect(),
            }
        }
    };
    // The bindings the registrations must fit: the config's, or the recorded.
    let effective: &[Binding] = config.bindings.as_deref().unwrap_or(&recorded);
    let unsupported = follow::unsupported();
    let mut steps = Vec::new();
    let mut follows = Vec::new();
    for w in &config.registrations {
        if w.followed(unsupported.as_deref())? {
            // The sockets listening now must fit the label's bindings, as a
            // registration's would; later ones are the server's business.
            let listening: Vec<Member> = groups(&w.target(), false, None)?.into_iter().flatten().collect();
            if let Some(first) = listening.first() {
                if listening.iter().all(|m| check_fits(w, m, effective).is_err()) {
                    check_fits(w, first, effective)?;
                }
            }
            let held = (Family::ALL.iter())
                .map(|f| state.slot_members(&w.label, *f, w.protocol))
                .collect::<Result<Vec<_>>>()?
                .concat();
            follows.push(w.as_follow());
            steps.push(Step {
                wanted: w.clone(),
                choice: Choice::Follow { cgroup: w.cgroup.clone().unwrap_or_default(), held },
            });
            continue;
        }
        let choice = plan_one(state, w)?;
        if let Choice::Register { member, .. } = &choice {
            check_fits(w, member, effective)?;
        }
        steps.push(Step { wanted: w.clone(), choice });
    }
    follows.sort();
    let follows_change = match &unsupported {
        Some(_) => false,
        None => follow::list(state)? != follows,
    };
    Ok(Plan { bindings, registrations: steps, follows, follows_change, follow_unsupported: unsupported })
}

fn plan_one<A: Read>(state: &Dispatcher<A>, w: &Wanted) -> Result<Choice> {
    let pid = match &w.pid_file {
        Some(path) => match read_pid_file(path) {
            Ok(pid) => Some(pid),
            Err(e) => return Ok(Choice::Wait { reason: e.chain(), listening: false }),
        },
        None => None,
    };
    let filter = OwnerFilter { pid, process: w.process.clone() };
    let target = w.target();
    // Cheap first: a healthy registration needs no /proc scan.
    let bare = groups(&target, false, None)?;
    let current = register::current(state, &w.label, w.protocol, &w.options())?;
    if bare.is_empty() {
        return Ok(register::choose(&bare, &filter, &current));
    }
    if filter.is_empty() {
        let choice = register::choose(&bare, &filter, &current);
        if matches!(choice, Choice::Keep { .. }) {
            return Ok(choice);
        }
    }
    let groups = groups(&target, true, filter.pid)?;
    Ok(register::choose(&groups, &filter, &current))
}

/// Fails unless `member` can serve `w.label`'s bindings in `bindings`
/// (the label's protocol and family), as `register` would check.
fn check_fits(w: &Wanted, member: &Member, bindings: &[Binding]) -> Result<()> {
    let served: Vec<&Binding> = bindings.iter().filter(|b| b.label == w.label).collect();
    let info = SocketInfo {
        family: member.family,
        v6only: member.v6only,
        protocol: w.protocol,
        local: Some(member.local),
        listening: true,
        connected: false,
        cookie: member.cookie,
        inode: member.inode,
        netns_inode: 0,
    };
    if let Some(kinds) = unserved(&info, &served) {
        fail!(
            Invalid,
            "registration {} {}: label {} is bound to {kinds} but the socket there is a {} {}{} socket",
            w.label,
            w.target(),
            w.label,
            w.protocol,
            member.family,
            if member.v6only { " IPv6-only" } else { "" }
        );
    }
    Ok(())
}

/// Up to this many bindings added or removed, `apply` changes them in
/// place (in proportion to what they touch); more, it loads the file's set
/// whole (in proportion to the set).
const APPLY_IN_PLACE: usize = 4096;

/// What [`apply`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub plan: Plan,
    /// Sockets listening already that went into followed registrations' slots.
    pub followed: Followed,
    /// Registrations that failed while applying (the socket closed
    /// meanwhile...), with the error; the others were applied.
    pub failed: Vec<(String, String)>,
}

/// Plans and applies `config` under the write lock: the bindings first
/// (one atomic switch), then each registration.
pub fn apply(state: &Dispatcher<ReadWrite>, config: &Config) -> Result<Applied> {
    let plan = plan(state, config)?;
    // Sockets to take from processes: the rights are checked before the
    // bindings change, so a refusal changes nothing.
    if plan.registrations.iter().any(|s| matches!(s.choice, Choice::Register { .. })) {
        crate::kernel::caps::require_fd_taking()?;
    }
    let changes = plan.bindings.added.len() + plan.bindings.removed.len();
    if plan.bindings.managed && changes > 0 {
        if changes <= APPLY_IN_PLACE {
            super::bindings::change_bindings(state, &plan.bindings.added, &plan.bindings.removed)
                .context("changing the bindings")?;
        } else {
            let file = BindingsFile { bindings: config.bindings.clone().unwrap_or_default() };
            super::bindings::load_bindings(state, &file).context("replacing the bindings")?;
        }
    }
    let mut plan = plan;
    let followed = if plan.follow_unsupported.is_none() {
        let done = follow::set(state, &plan.follows).context("following the registrations in the kernel")?;
        for step in &mut plan.registrations {
            if let Choice::Follow { held, .. } = &mut step.choice {
                let w = &step.wanted;
                *held = (Family::ALL.iter())
                    .map(|f| state.slot_members(&w.label, *f, w.protocol))
                    .collect::<Result<Vec<_>>>()?
                    .concat();
            }
        }
        done
    } else {
        Followed::default()
    };
    let mut failed = Vec::new();
    for step in &plan.registrations {
        if let Choice::Register { member, owner, group, .. } = &step.choice {
            let w = &step.wanted;
            if let Err(e) = register::take_and_register(state, &w.label, member, owner, *group, &w.options()) {
                failed.push((format!("{} {}", w.label, w.target()), e.chain()));
            }
        }
    }
    Ok(Applied { plan, followed, failed })
}
