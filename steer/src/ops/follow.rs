//! Servers followed by the kernel. A followed registration is written into
//! `follows`; the sock_ops program attached to its scope's cgroup puts any
//! socket that starts listening there into the label's slot inside
//! listen(), so a restarted server is steered from its first listen() and
//! nothing polls. Every member of a reuseport group listens, so each is
//! held (up to SLOT_MEMBERS per slot): one leaving refuses nothing. UDP has
//! no such hook: post_bind reports the bind over a ring buffer and `watch`
//! inserts the socket with a backfill pass. Sockets that listen already
//! when a registration is made are inserted the same way: userspace names
//! them in `backfill` (found with sock_diag, their cgroup checked against
//! the scope), and an iterator puts them in the kernel. No fd is taken.
//!
//! Scopes: the programs of each scope are attached to one cgroup v2 and
//! see only sockets made in it or below; a registration names the cgroup
//! whose sockets may take its label (the root by default: any process).
//! The programs of a state check that a socket is of the state's network
//! namespace (its netns cookie; Linux 5.15).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use steer_common::{BackfillValue, FollowEntry, FollowMetrics, MAX_BACKFILL, MAX_SCOPES, SLOT_MEMBERS, member_key};

use crate::{
    discovery::diag::{self, DiagSocket},
    error::{Context, Result, fail},
    kernel::{
        cgroup::Cgroup,
        links::Link,
        netns,
        program::{self, Backfill, FollowHook},
    },
    model::{
        Family, Protocol, Target,
        follow::{self, Follow},
        label::label_key,
        slot::Slot,
    },
    state::{Dispatcher, Read, ReadWrite},
};

/// Why servers cannot be followed here, if they cannot: the kernel, or no
/// cgroup v2 hierarchy to attach to (a container may show none and may
/// not mount one). Registrations that do not ask to be followed then fall
/// back to polling.
pub fn unsupported() -> Option<String> {
    program::follow_unsupported().or_else(|| Cgroup::root().err().map(|e| e.to_string()))
}

/// What a change of the followed registrations did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Followed {
    /// Sockets a backfill pass put in slots (ones listening already).
    pub backfilled: usize,
    /// Sockets that listen but found no free member in their slot.
    pub full: usize,
}

/// The followed registrations, read back from `follows`.
pub fn list<A: Read>(state: &Dispatcher<A>) -> Result<Vec<Follow>> {
    let maps = state.maps()?;
    let names = maps.labels.names()?;
    let scopes: BTreeMap<u16, String> =
        maps.follows.scopes()?.into_iter().map(|(id, scope)| (id, scope.path)).collect();
    let mut out = Vec::new();
    for (key, entry, label, cgroup) in follow::registrations(&maps.follows.all()?, &names, &scopes) {
        let Some(protocol) = Protocol::from_number(key.protocol) else { continue };
        let target = Target { protocol, address: follow::key_addr(&key), port: key.port };
        let slot = Slot::new(entry.label, target.family(), protocol);
        let no_reuseport = maps.slots.flags(slot)? & steer_common::socket_flag::NO_REUSEPORT != 0;
        out.push(Follow {
            label: label.unwrap_or_else(|| format!("#{}", entry.label)),
            target,
            cgroup: cgroup.unwrap_or_default(),
            no_reuseport,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The follow programs' counters.
pub fn metrics<A: Read>(state: &Dispatcher<A>) -> Result<FollowMetrics> {
    state.maps()?.follows.metrics()
}

/// Makes the kernel follow exactly `wanted`: the programs of each scope
/// attached (and those of scopes no longer named detached), `follows`
/// rewritten, the slots' flags set, and the sockets listening already
/// inserted. Checked before anything changes: the kernel's support, every
/// label and cgroup, the number of registrations per listener.
pub fn set(state: &Dispatcher<ReadWrite>, wanted: &[Follow]) -> Result<Followed> {
    let current = list(state)?;
    if wanted.is_empty() && current.is_empty() {
        return Ok(Followed::default());
    }
    if let Some(why) = unsupported() {
        fail!(Kernel, "{why}; keep `steerctl watch` running to follow servers instead");
    }
    for f in wanted {
        label_key(&f.label)?;
        if f.target.port == 0 {
            fail!(Invalid, "registration {} {}: port 0 is no listening port", f.label, f.target);
        }
    }
    let maps = state.maps()?;
    // Every cgroup checked, and each given a scope id: kept where it has
    // one, else the lowest free.
    let cgroups: BTreeMap<String, Cgroup> = wanted
        .iter()
        .map(|f| f.cgroup.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .map(|path| Ok((path.clone(), if path.is_empty() { Cgroup::root()? } else { Cgroup::named(&path)? })))
        .collect::<Result<_>>()?;
    let existing = maps.follows.scopes()?;
    let mut ids: BTreeMap<String, u16> = BTreeMap::new();
    let mut taken: BTreeSet<u16> = BTreeSet::new();
    for (path, cgroup) in &cgroups {
        if let Some(scope) = existing.values().find(|s| s.cgroup_id == cgroup.id) {
            ids.insert(path.clone(), scope.id);
            taken.insert(scope.id);
        }
    }
    for path in cgroups.keys().filter(|p| !ids.contains_key(*p)).cloned().collect::<Vec<_>>() {
        let Some(id) = (0..MAX_SCOPES as u16).find(|id| !taken.contains(id) && !existing.contains_key(id)) else {
            fail!(Full, "all {MAX_SCOPES} scopes (cgroups followed servers may listen in) are in use");
        };
        taken.insert(id);
        ids.insert(path, id);
    }
    let labels = maps.labels.plan(wanted.iter().map(|f| f.label.as_str()))?;
    let label_ids: BTreeMap<String, u32> = labels.iter().map(|(name, (id, _))| (name.clone(), *id)).collect();
    let entries = follow::entries(wanted, &label_ids, &ids)?;
    if entries.len() > steer_common::MAX_FOLLOWS as usize {
        fail!(Full, "{} followed listener addresses; at most {} fit", entries.len(), steer_common::MAX_FOLLOWS);
    }
    // Checked: now the changes, the programs first so that no listen()
    // after the map write goes unseen.
    maps.labels.ensure(wanted.iter().map(|f| f.label.as_str()))?;
    let Some(netns_cookie) = netns::cookie()? else {
        fail!(Kernel, "this kernel does not tell a namespace's cookie (SO_NETNS_COOKIE, Linux 5.14)");
    };
    let layout = state.layout();
    for (path, cgroup) in &cgroups {
        let scope = ids[path];
        let protocols: BTreeSet<Protocol> =
            wanted.iter().filter(|f| f.cgroup == *path).map(|f| f.target.protocol).collect();
        let hooks = protocols.iter().flat_map(|p| match p {
            Protocol::Tcp => vec![FollowHook::Tcp],
            Protocol::Udp => vec![FollowHook::Udp4, FollowHook::Udp6],
        });
        for hook in hooks {
            let pin = layout.follow_link(hook, scope);
            if !pin.exists() {
                program::attach_follow(|m| layout.map(m), hook, scope, netns_cookie, cgroup.fd(), &pin)
                    .with_context(|| format!("attaching the follow program to {}", cgroup.describe()))?;
            }
        }
        maps.follows.set_scope(scope, cgroup.id, path)?;
    }
    for kind in Backfill::ALL {
        let pin = layout.backfill_link(kind);
        if !pin.exists() {
            program::pin_backfill(|m| layout.map(m), kind, &pin)?;
        }
    }
    for f in wanted {
        let flags = crate::model::config::RegisterOptions { no_reuseport: f.no_reuseport }.flags();
        for family in Family::ALL {
            maps.slots.set_flags(Slot::new(label_ids[&f.label], family, f.target.protocol), flags)?;
        }
    }
    maps.follows.replace(&entries)?;
    // Scopes and hooks no longer needed go last.
    for scope in maps.follows.scopes()?.values() {
        let used = ids.values().any(|id| *id == scope.id);
        for hook in FollowHook::ALL {
            let wanted_hook = used
                && wanted.iter().any(|f| {
                    ids[&f.cgroup] == scope.id
                        && match hook {
                            FollowHook::Tcp => f.target.protocol == Protocol::Tcp,
                            _ => f.target.protocol == Protocol::Udp,
                        }
                });
            let pin = layout.follow_link(hook, scope.id);
            if !wanted_hook && pin.exists() {
                Link::open(&pin)?.detach()?;
                std::fs::remove_file(&pin).with_context(|| format!("unpinning {}", pin.display()))?;
            }
        }
        if !used {
            maps.follows.clear_scope(scope.id)?;
        }
    }
    backfill(state, wanted)
}

/// A listening socket that should serve a registration, ranked: sockets
/// bound to the registered address first, wildcards after.
struct Candidate {
    slot: Slot,
    cover: bool,
    cookie: u64,
}

/// The sockets listening now that `f` (its label's id `label`) wants in
/// its slots: bound to an address that serves it, made in its cgroup (or
/// below; `subtree` caches each cgroup's). `dumps` are this namespace's
/// sockets by protocol, as sock_diag lists them.
fn candidates(
    f: &Follow,
    label: u32,
    dumps: &BTreeMap<Protocol, Vec<DiagSocket>>,
    subtree: &mut BTreeMap<String, BTreeSet<u64>>,
) -> Result<Vec<Candidate>> {
    if !subtree.contains_key(&f.cgroup) {
        let cgroup = if f.cgroup.is_empty() { Cgroup::root()? } else { Cgroup::named(&f.cgroup)? };
        subtree.insert(f.cgroup.clone(), cgroup.subtree_ids()?.into_iter().collect());
    }
    let inside = &subtree[&f.cgroup];
    let mut out = Vec::new();
    for (addr, cover) in follow::listeners(&f.target) {
        for s in dumps.get(&f.target.protocol).into_iter().flatten() {
            if !s.steerable() || s.local.ip() != addr || s.local.port() != f.target.port {
                continue;
            }
            // Outside the root scope, a socket whose cgroup is unknown is not taken.
            if !f.cgroup.is_empty() && !s.cgroup_id.is_some_and(|id| inside.contains(&id)) {
                continue;
            }
            out.push(Candidate { slot: Slot::new(label, s.family, f.target.protocol), cover, cookie: s.cookie });
        }
    }
    Ok(out)
}

/// Inserts the sockets listening now that `follows` want and their slots
/// do not hold yet: named in `backfill`, put in by the iterators.
pub fn backfill(state: &Dispatcher<ReadWrite>, follows: &[Follow]) -> Result<Followed> {
    if follows.is_empty() {
        return Ok(Followed::default());
    }
    let maps = state.maps()?;
    let protocols: BTreeSet<Protocol> = follows.iter().map(|f| f.target.protocol).collect();
    let mut dumps = BTreeMap::new();
    for protocol in &protocols {
        dumps.insert(*protocol, diag::unconnected(*protocol).context("looking for listening sockets to follow")?);
    }
    let labels = maps.labels.all()?;
    let mut subtree = BTreeMap::new();
    let mut wanted: Vec<Candidate> = Vec::new();
    for f in follows {
        let Some(&id) = labels.get(&f.label) else { continue };
        wanted.extend(candidates(f, id, &dumps, &mut subtree)?);
    }
    // Exact sockets take members from the front, covering ones from the
    // back, as the sock_ops program places them.
    wanted.sort_by_key(|c| (c.slot, c.cover));
    let mut members: BTreeMap<Slot, Vec<(u32, u64)>> = BTreeMap::new();
    let mut plan: BTreeMap<u64, BackfillValue> = BTreeMap::new();
    let mut report = Followed::default();
    for c in &wanted {
        if let std::collections::btree_map::Entry::Vacant(e) = members.entry(c.slot) {
            e.insert(maps.slots.members(c.slot)?);
        }
        let held = members.get_mut(&c.slot).expect("just inserted");
        if held.iter().any(|&(_, cookie)| cookie == c.cookie) {
            continue;
        }
        let free = |m: &u32| !held.iter().any(|(member, _)| member == m);
        let member = if c.cover { (0..SLOT_MEMBERS).rev().find(free) } else { (0..SLOT_MEMBERS).find(free) };
        let Some(member) = member else {
            report.full += 1;
            continue;
        };
        held.push((member, c.cookie));
        let value = plan.entry(c.cookie).or_default();
        if let Some(key) = value.keys.iter_mut().find(|k| **k == FollowEntry::NONE) {
            *key = member_key(c.slot.index(), member);
        }
    }
    if plan.is_empty() {
        return Ok(report);
    }
    if plan.len() > MAX_BACKFILL as usize {
        fail!(Full, "{} sockets to insert at once; a backfill pass takes at most {MAX_BACKFILL}", plan.len());
    }
    maps.follows.set_backfill(&plan)?;
    let layout = state.layout();
    let run = || -> Result<()> {
        for protocol in &protocols {
            let kind = if *protocol == Protocol::Tcp { Backfill::Tcp } else { Backfill::Udp };
            program::run_iterator(&layout.backfill_link(kind))?;
        }
        Ok(())
    };
    let ran = run();
    maps.follows.clear_backfill()?;
    ran?;
    report.backfilled = plan.values().map(|v| v.keys.iter().filter(|k| **k != FollowEntry::NONE).count()).sum();
    Ok(report)
}

/// Adds `f` to the followed registrations, replacing one of its label,
/// protocol and family.
pub fn add(state: &Dispatcher<ReadWrite>, f: Follow) -> Result<Followed> {
    let mut all: Vec<Follow> = list(state)?
        .into_iter()
        .filter(|o| {
            (o.label.as_str(), o.target.protocol, o.target.family())
                != (f.label.as_str(), f.target.protocol, f.target.family())
        })
        .collect();
    all.push(f);
    all.sort();
    set(state, &all)
}

/// Stops following `label`'s registrations (of `protocol` and `family`
/// when given); returns how many. Their sockets stay in the slots.
pub fn remove(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    protocol: Option<Protocol>,
    family: Option<Family>,
) -> Result<usize> {
    let all = list(state)?;
    let gone = |f: &Follow| {
        f.label == label
            && protocol.is_none_or(|p| p == f.target.protocol)
            && family.is_none_or(|fam| fam == f.target.family())
    };
    let removed = all.iter().filter(|f| gone(f)).count();
    if removed > 0 {
        let kept: Vec<Follow> = all.into_iter().filter(|f| !gone(f)).collect();
        set(state, &kept)?;
    }
    Ok(removed)
}
