//! Registering sockets under a label: one entry point ([`register`]) for
//! every way a socket is named (the address it listens on, a process, or
//! systemd socket activation), honouring the same options everywhere, and
//! the choice of which member of a SO_REUSEPORT group to take.
//!
//! Registering one member of a reuseport group with flags 0 serves the
//! whole group: `bpf_sk_assign` hands the kernel that member, and the
//! kernel then picks among the member's group for each connection, as it
//! would for a connection to the group's own address. With
//! `no_reuseport` (BPF_SK_LOOKUP_F_NO_REUSEPORT) connections go to exactly
//! the registered socket.
//!
//! When the registered member closes, the kernel removes it from the
//! socket map; [`crate::ops::watch`] registers another member (or a
//! restarted server's new socket) as soon as one listens.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd, BorrowedFd},
};

use serde::Serialize;
use steer_common::socket_flag;

use super::bindings::collect_labels;
use crate::{
    discovery::{
        Member, OwnerFilter, diag,
        groups::{self, groups},
        owners,
    },
    error::{Result, fail},
    kernel::{
        caps, netns,
        socket::{self, TakenSocket},
    },
    model::{Family, Owner, Protocol, SocketInfo, Target, binding::unserved, label::label_key, slot::Slot},
    state::{Dispatcher, Read, ReadWrite},
};

/// How the socket to register is named.
#[derive(Debug)]
pub enum Source<'a> {
    /// The socket listening (TCP) or bound (UDP) at this address, found
    /// with sock_diag and taken from a process `filter` accepts.
    Address { target: Target, filter: OwnerFilter },
    /// Every steerable socket of a process: at most one per family and
    /// protocol.
    Process { pid: i32 },
    /// The sockets systemd passed this process (LISTEN_FDS), taken with
    /// [`socket::passed_fds`] before anything else was opened.
    Passed(Vec<(i32, std::os::fd::OwnedFd)>),
    /// A socket this process holds (a library user's own).
    Socket(BorrowedFd<'a>),
}

pub use crate::model::config::RegisterOptions as Options;

/// A socket registered under a label.
#[derive(Debug, Clone, Serialize)]
pub struct Registration {
    pub label: String,
    pub info: SocketInfo,
    /// Who it was taken from; none for a socket this process holds.
    pub owner: Option<Owner>,
    /// The fd systemd passed it as (LISTEN_FDS), if it was.
    pub passed_fd: Option<i32>,
    /// Sockets in its group (1: no reuseport group).
    pub group: usize,
    pub no_reuseport: bool,
    /// It was registered already: nothing changed.
    pub kept: bool,
}

impl Registration {
    /// "registered tcp 127.0.0.1:80 (nginx pid 7 fd 6, cookie 42) as web, one of a reuseport group of 2 ..."
    pub fn describe(&self) -> String {
        let verb = if self.kept { "already registered" } else { "registered" };
        let from = match (&self.owner, self.passed_fd) {
            (Some(o), _) if o.command.is_empty() => format!("pid {} fd {}, ", o.pid, o.fd),
            (Some(o), _) => format!("{} pid {} fd {}, ", o.command, o.pid, o.fd),
            (None, Some(fd)) => format!("fd {fd}, "),
            (None, None) => String::new(),
        };
        let mut text = format!("{verb} {} ({from}cookie {}) as {}", self.info, self.info.cookie, self.label);
        if self.group > 1 {
            if self.no_reuseport {
                text += &format!(
                    "; one of a reuseport group of {}, pinned: only this socket takes the connections",
                    self.group
                );
            } else {
                text +=
                    &format!("; one of a reuseport group of {}: the kernel balances over the whole group", self.group);
            }
        }
        text
    }
}

/// Registers the socket(s) `source` names under `label`. Everything is
/// checked (the sockets, and that the label's bindings can use them)
/// before anything is inserted, so a refusal changes nothing.
pub fn register(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    source: &Source<'_>,
    options: &Options,
) -> Result<Vec<Registration>> {
    label_key(label)?;
    match source {
        Source::Address { target, filter } => Ok(vec![register_address(state, label, target, filter, options)?]),
        Source::Process { pid } => {
            caps::require_fd_taking()?;
            let taken = process_sockets(*pid)?;
            insert(state, label, &ready(&taken), options)?;
            Ok(taken.into_iter().map(|t| registration(label, t, 1, options)).collect())
        }
        Source::Passed(fds) => {
            let infos = socket::passed_sockets(fds)?;
            let ready: Vec<_> = infos.iter().zip(fds).map(|((_, info), (_, socket))| (info, socket.as_fd())).collect();
            insert(state, label, &ready, options)?;
            Ok(infos
                .into_iter()
                .map(|(fd, info)| Registration {
                    label: label.into(),
                    info,
                    owner: None,
                    passed_fd: Some(fd),
                    group: 1,
                    no_reuseport: options.no_reuseport,
                    kept: false,
                })
                .collect())
        }
        Source::Socket(fd) => {
            let info = socket::inspect(*fd)?;
            info.check_steerable(netns::current_inode()?)?;
            insert(state, label, &[(&info, *fd)], options)?;
            Ok(vec![Registration {
                label: label.into(),
                info,
                owner: None,
                passed_fd: None,
                group: 1,
                no_reuseport: options.no_reuseport,
                kept: false,
            }])
        }
    }
}

fn ready(taken: &[TakenSocket]) -> Vec<(&SocketInfo, BorrowedFd<'_>)> {
    taken.iter().map(|t| (&t.info, t.socket.as_fd())).collect()
}

/// A socket taken from a process named by pid: the pid says who.
fn registration(label: &str, t: TakenSocket, group: usize, options: &Options) -> Registration {
    Registration {
        label: label.into(),
        info: t.info,
        owner: Some(Owner { pid: t.pid, fd: t.fd, command: String::new() }),
        passed_fd: None,
        group,
        no_reuseport: options.no_reuseport,
        kept: false,
    }
}

/// Every steerable socket of `pid`, at most one per family and protocol;
/// only those are taken.
fn process_sockets(pid: i32) -> Result<Vec<TakenSocket>> {
    let found = owners::candidates(pid)?;
    if found.is_empty() {
        fail!(Invalid, "process {pid} has no listening TCP or bound UDP socket in this network namespace");
    }
    let kinds: BTreeSet<(Family, Protocol)> = found.iter().map(|c| (c.info.family, c.info.protocol)).collect();
    if kinds.len() != found.len() {
        fail!(
            Invalid,
            "process {pid} has several sockets of one family and protocol, name one with `tcp|udp ADDR PORT`: {}",
            owners::describe(&found)
        );
    }
    found.iter().map(|c| socket::take_steerable(pid, c.fd)).collect()
}

/// Puts checked sockets in `label`'s slots, each replacing the label's
/// socket of its family and protocol. All are checked against the label's
/// bindings before any is inserted.
fn insert(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    sockets: &[(&SocketInfo, BorrowedFd<'_>)],
    options: &Options,
) -> Result<()> {
    let served: Vec<_> = state.bindings()?.into_iter().filter(|b| b.label == label).collect();
    for (info, _) in sockets {
        if let Some(kinds) = unserved(info, &served) {
            fail!(
                Invalid,
                "label {label} is bound to {kinds} but this is a {} {} socket ({info}); register a matching socket",
                info.protocol,
                info.family
            );
        }
    }
    collect_labels(state)?;
    let maps = state.maps()?;
    let id = maps.labels.ensure([label])?[label];
    for (info, socket) in sockets {
        let slot = Slot::new(id, info.family, info.protocol);
        if let Err(e) = maps.slots.insert(slot, *socket, options.flags()) {
            // A label made for nothing goes again.
            let _ = collect_labels(state);
            return Err(e);
        }
        log::info!("registered {info} (cookie {}) as {label}", info.cookie);
    }
    Ok(())
}

/// What `label`'s two slots of `protocol` hold, by family, for [`choose`].
/// A slot whose `no_reuseport` flag differs from the one wanted counts as
/// empty: registering again sets the flag.
pub fn current<A: Read>(state: &Dispatcher<A>, label: &str, protocol: Protocol, options: &Options) -> Result<Current> {
    let mut out = Current::default();
    for family in Family::ALL {
        let flagged = state.slot_flags(label, family, protocol)? & socket_flag::NO_REUSEPORT != 0;
        let held = state.slot_cookie(label, family, protocol)?;
        out.held[family.index() as usize] = held;
        out.matching[family.index() as usize] = held.filter(|_| flagged == options.no_reuseport);
    }
    Ok(out)
}

/// A label's sockets of one protocol, by family (IPv4, IPv6).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Current {
    /// What each slot holds.
    pub held: [Option<u64>; 2],
    /// The same, but only where the slot's flags are the ones wanted.
    pub matching: [Option<u64>; 2],
}

/// What to do about one wanted registration.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Choice {
    /// The label's slot already holds a member of the group.
    Keep { cookie: u64, family: Family, group: usize },
    /// Register `member`, taken from `owner`.
    Register { member: Member, owner: Owner, group: usize, replacing: Option<u64> },
    /// Nothing (that the filter accepts) listens there yet.
    Wait {
        reason: String,
        /// Something listens there, but no process the filter accepts
        /// holds it: finding out again costs a scan of /proc.
        #[serde(skip)]
        listening: bool,
    },
    /// The kernel follows it: sockets go in at listen() (TCP) or when
    /// `watch` sees the bind (UDP). `held` are the ones its slots hold.
    Follow { cgroup: String, held: Vec<u64> },
}

/// Picks the member of `groups` (the first group with a member the filter
/// accepts) to register, or keeps the one in its family's slot (`current`,
/// with matching flags) if it is one of them.
pub fn choose(groups: &[Vec<Member>], filter: &OwnerFilter, current: &Current) -> Choice {
    for group in groups {
        let accepted: Vec<&Member> =
            group.iter().filter(|m| filter.is_empty() || m.owners.iter().any(|o| filter.accepts(o))).collect();
        if let Some(m) = accepted.iter().find(|m| Some(m.cookie) == current.matching[m.family.index() as usize]) {
            return Choice::Keep { cookie: m.cookie, family: m.family, group: group.len() };
        }
        // A member someone holds (its fd can be taken), the filter's owner first.
        for m in &accepted {
            let owner = m.owners.iter().find(|o| filter.accepts(o)).or_else(|| m.owners.first());
            if let Some(owner) = owner {
                return Choice::Register {
                    member: (*m).clone(),
                    owner: owner.clone(),
                    group: group.len(),
                    replacing: current.held[m.family.index() as usize].filter(|c| *c != m.cookie),
                };
            }
        }
    }
    let reason = if groups.is_empty() {
        "nothing listens there".to_string()
    } else if filter.is_empty() {
        "the sockets there are held by no process (cannot take an fd)".to_string()
    } else {
        format!("no socket there is held by {filter}")
    };
    Choice::Wait { reason, listening: !groups.is_empty() }
}

/// Registers the socket listening at `target` (one member of its group,
/// taken from a process `filter` accepts) under `label`; keeps the one
/// registered already if it is a member. Fails when nothing suitable
/// listens there.
fn register_address(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    target: &Target,
    filter: &OwnerFilter,
    options: &Options,
) -> Result<Registration> {
    caps::require_fd_taking()?;
    let groups = groups(target, true, filter.pid)?;
    let current = current(state, label, target.protocol, options)?;
    match choose(&groups, filter, &current) {
        Choice::Keep { cookie, group, .. } => {
            let member = groups.iter().flatten().find(|m| m.cookie == cookie).expect("kept from the groups");
            let owner = member.owners.iter().find(|o| filter.accepts(o)).or_else(|| member.owners.first()).cloned();
            let info = diag_info(target, member)?;
            Ok(Registration {
                label: label.into(),
                info,
                owner,
                passed_fd: None,
                group,
                no_reuseport: options.no_reuseport,
                kept: true,
            })
        }
        Choice::Register { member, owner, group, .. } => {
            take_and_register(state, label, &member, &owner, group, options)
        }
        Choice::Follow { .. } => unreachable!("choose() never follows"),
        Choice::Wait { reason, .. } => match filter.pid {
            Some(pid) if filter.process.is_none() => {
                fail!(Invalid, "process {pid} has no listening/bound {target} socket ({reason})")
            }
            _ => fail!(Invalid, "no listening/bound {target} socket to register: {reason}"),
        },
    }
}

fn diag_info(target: &Target, member: &Member) -> Result<SocketInfo> {
    let netns = netns::current_inode()?;
    let found = diag::listening(target.protocol, member.local.ip(), member.local.port())?;
    let socket = found
        .iter()
        .find(|s| s.cookie == member.cookie)
        .ok_or_else(|| crate::Error::Invalid(format!("{target}: the socket closed meanwhile")))?;
    Ok(socket.info(netns))
}

/// Takes `owner`'s fd of `member`, checks it is that very socket and can
/// be steered to, and registers it.
pub(crate) fn take_and_register(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    member: &Member,
    owner: &Owner,
    group: usize,
    options: &Options,
) -> Result<Registration> {
    caps::require_fd_taking()?;
    let taken = socket::take_steerable(owner.pid, owner.fd)?;
    // The fd number may have been closed and reused since the /proc scan.
    if taken.info.cookie != member.cookie {
        fail!(
            Conflict,
            "fd {} of process {} is no longer socket {} (it closed meanwhile); try again",
            owner.fd,
            owner.pid,
            member.cookie
        );
    }
    insert(state, label, &[(&taken.info, taken.socket.as_fd())], options)?;
    Ok(Registration {
        label: label.into(),
        info: taken.info,
        owner: Some(owner.clone()),
        passed_fd: None,
        group,
        no_reuseport: options.no_reuseport,
        kept: false,
    })
}

/// Removes the label's sockets, or only those of `protocol` and/or
/// `family`; returns how many.
pub fn unregister(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    protocol: Option<Protocol>,
    family: Option<Family>,
) -> Result<usize> {
    let maps = state.maps()?;
    let unfollowed = super::follow::remove(state, label, protocol, family)?;
    let Some(id) = maps.labels.id(label)? else { fail!(Conflict, "no label {label}") };
    let wanted = |slot: &Slot| protocol.is_none_or(|p| slot.protocol == p) && family.is_none_or(|f| slot.family == f);
    let mut slots: Vec<Slot> = maps.slots.held([id])?.into_iter().map(|(slot, _, _)| slot).filter(wanted).collect();
    slots.dedup();
    if slots.is_empty() && unfollowed == 0 {
        let which: Vec<String> =
            [protocol.map(|p| p.to_string()), family.map(|f| f.to_string())].into_iter().flatten().collect();
        let which = if which.is_empty() { String::new() } else { format!(" {}", which.join(" ")) };
        fail!(Conflict, "label {label} has no registered{which} socket");
    }
    let mut removed = 0;
    for slot in &slots {
        removed += maps.slots.members(*slot)?.len();
        maps.slots.clear(*slot)?;
    }
    collect_labels(state)?;
    Ok(removed)
}

/// A registered socket with what is known of it: its address, holders
/// and SO_REUSEPORT group (every socket bound to the same address and
/// port, itself included).
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub label: String,
    pub family: Family,
    pub protocol: Protocol,
    pub cookie: u64,
    pub address: Option<String>,
    pub owners: Vec<Owner>,
    pub no_reuseport: bool,
    pub group: Vec<Member>,
    /// The kernel follows its label's registration of this protocol: the
    /// socket went in at listen() (or a backfill), not taken from a process.
    pub followed: bool,
}

/// What `list` shows, and what could not be found out.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub sockets: Vec<Listed>,
    /// Why owners or groups are missing (sock_diag or /proc failed).
    pub warnings: Vec<String>,
}

/// Every registered socket with its owners and group. A lookup of owners
/// or groups that fails leaves them empty and says why in `warnings`.
pub fn list<A: Read>(state: &Dispatcher<A>) -> Result<Listing> {
    let registered = state.registered()?;
    let follows = super::follow::list(state)?;
    let cookies: Vec<u64> = registered.iter().map(|r| r.cookie).collect();
    let mut warnings = Vec::new();
    let mut found = owners::sockets_and_owners(&cookies).unwrap_or_else(|e| {
        warnings.push(format!("owners unknown: {}", e.chain()));
        Default::default()
    });
    let keys: Vec<(Protocol, u64)> = registered.iter().map(|r| (r.protocol, r.cookie)).collect();
    let mut groups = groups::groups_of(&keys).unwrap_or_else(|e| {
        warnings.push(format!("reuseport groups unknown: {}", e.chain()));
        Default::default()
    });
    let sockets = registered
        .into_iter()
        .map(|r| {
            let (info, owners) = match found.remove(&r.cookie) {
                Some((info, owners)) => (Some(info), owners),
                None => (None, Vec::new()),
            };
            let followed = follows.iter().any(|f| f.label == r.label && f.target.protocol == r.protocol);
            Listed {
                followed,
                address: info.and_then(|i| i.local).map(|a| a.to_string()),
                owners,
                group: groups.remove(&r.cookie).unwrap_or_default(),
                label: r.label,
                family: r.family,
                protocol: r.protocol,
                cookie: r.cookie,
                no_reuseport: r.no_reuseport,
            }
        })
        .collect();
    Ok(Listing { sockets, warnings })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(cookie: u64, owners: &[(i32, &str)]) -> Member {
        Member {
            cookie,
            inode: cookie,
            family: Family::Ipv4,
            local: "127.0.0.1:80".parse().unwrap(),
            owners: owners.iter().map(|&(pid, c)| Owner { pid, fd: 3, command: c.into() }).collect(),
            v6only: false,
        }
    }

    #[test]
    fn choose_keeps_a_registered_member_and_otherwise_takes_one_someone_holds() {
        let group = vec![member(1, &[]), member(2, &[(10, "nginx")]), member(3, &[(11, "other")])];
        let groups = [group];
        let any = OwnerFilter::default();
        let v4 = |cookie: Option<u64>| Current { held: [cookie, None], matching: [cookie, None] };
        let none = Current::default();
        assert!(matches!(choose(&groups, &any, &v4(Some(3))), Choice::Keep { cookie: 3, group: 3, .. }));
        match choose(&groups, &any, &v4(Some(99))) {
            Choice::Register { member, owner, replacing, .. } => {
                assert_eq!((member.cookie, owner.pid, replacing), (2, 10, Some(99)));
            }
            other => panic!("{other:?}"),
        }
        let other = OwnerFilter { pid: None, process: Some("other".into()) };
        assert!(matches!(choose(&groups, &other, &none), Choice::Register { member: Member { cookie: 3, .. }, .. }));
        // A member the filter rejects is not kept.
        assert!(matches!(choose(&groups, &other, &v4(Some(2))), Choice::Register { .. }));
        assert!(matches!(choose(&groups, &OwnerFilter::pid(77), &none), Choice::Wait { .. }));
        assert!(matches!(choose(&[], &any, &none), Choice::Wait { .. }));
        // The slot of the member's own family decides: an IPv6 slot holding
        // the IPv4 member's cookie is not "registered".
        let v6 = Current { held: [None, Some(2)], matching: [None, Some(2)] };
        assert!(matches!(
            choose(&groups, &any, &v6),
            Choice::Register { member: Member { cookie: 2, .. }, replacing: None, .. }
        ));
        // Other flags: the same socket registered again (it replaces no other).
        let flagged = Current { held: [Some(2), None], matching: [None, None] };
        assert!(matches!(
            choose(&groups, &any, &flagged),
            Choice::Register { member: Member { cookie: 2, .. }, replacing: None, .. }
        ));
    }
}
