//! Real servers without a human: a socket found by the address it listens
//! on (sock_diag, then its holders through /proc, as `ss -p` does), the
//! SO_REUSEPORT group it belongs to, and registering one member of it.
//!
//! Registering one member of a reuseport group with flags 0 serves the
//! whole group: `bpf_sk_assign` hands the kernel that member, and the
//! kernel then picks among the member's group for each connection, as it
//! would for a connection to the group's own address. With
//! `no_reuseport` (BPF_SK_LOOKUP_F_NO_REUSEPORT) connections go to exactly
//! the registered socket.
//!
//! When the registered member closes, the kernel removes it from the
//! socket map; [`crate::watch`] registers another member (or a restarted
//! server's new socket) as soon as one listens.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
    path::Path,
};

use serde::Serialize;

use crate::{
    diag::{self, DiagSocket},
    dispatcher::{Access, Dispatcher, ReadWrite},
    error::{Context, Error, Result, fail},
    labelled::{Slots, family_index},
    socket::{self, Family, Owner, Protocol, SocketInfo},
};

/// Where a server listens: what `register LABEL tcp|udp ADDR PORT` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Target {
    pub protocol: Protocol,
    pub address: IpAddr,
    pub port: u16,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.protocol, SocketAddr::new(self.address, self.port))
    }
}

/// Which processes' sockets may be taken: all, one pid, or processes of
/// one name (`/proc/PID/comm`, at most 15 bytes: longer names are cut).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerFilter {
    pub pid: Option<i32>,
    pub process: Option<String>,
}

impl OwnerFilter {
    pub fn pid(pid: i32) -> Self {
        Self { pid: Some(pid), process: None }
    }

    pub fn accepts(&self, owner: &Owner) -> bool {
        self.pid.is_none_or(|p| p == owner.pid)
            && self.process.as_deref().is_none_or(|name| {
                let cut = &name.as_bytes()[..name.len().min(15)];
                owner.command.as_bytes() == cut
            })
    }

    pub fn is_empty(&self) -> bool {
        self.pid.is_none() && self.process.is_none()
    }
}

impl fmt::Display for OwnerFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.process) {
            (Some(pid), Some(name)) => write!(f, "process {pid} ({name})"),
            (Some(pid), None) => write!(f, "process {pid}"),
            (None, Some(name)) => write!(f, "processes named {name}"),
            (None, None) => f.write_str("any process"),
        }
    }
}

/// The pid in a pid file (its first word).
pub fn read_pid_file(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading pid file {}", path.display()))?;
    match text.split_whitespace().next().and_then(|w| w.parse::<i32>().ok()) {
        Some(pid) if pid > 0 => Ok(pid),
        _ => fail!(Invalid, "pid file {} does not hold a process id", path.display()),
    }
}

/// One socket of a group, with the processes holding it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub cookie: u64,
    pub inode: u64,
    pub family: Family,
    pub local: SocketAddr,
    pub owners: Vec<Owner>,
    /// IPV6_V6ONLY (an IPv6 socket that takes no IPv4).
    #[serde(skip)]
    pub v6only: bool,
}

impl Member {
    fn new(s: &DiagSocket, owners: &BTreeMap<u64, Vec<Owner>>) -> Self {
        Member {
            cookie: s.cookie,
            inode: s.inode,
            family: s.family,
            local: s.local,
            owners: owners.get(&s.inode).cloned().unwrap_or_default(),
            v6only: s.v6only.unwrap_or(false),
        }
    }
}

/// The sockets that would take `target`'s connections, as the kernel
/// ranks binds ([`diag::listening`]), split into groups of one bind
/// each (a SO_REUSEPORT group, or a single socket), IPv4 binds first.
/// Owners are looked up only when `with_owners`.
pub fn groups(target: &Target, with_owners: bool) -> Result<Vec<Vec<Member>>> {
    let found = diag::listening(target.protocol, target.address, target.port)?;
    let owners =
        if with_owners { diag::owners(&found.iter().map(|s| s.inode).collect::<Vec<_>>())? } else { BTreeMap::new() };
    Ok(diag::groups(&found).map(|g| g.iter().map(|s| Member::new(s, &owners)).collect()).collect())
}

/// Adds `pid`'s own fds to the members' owners. diag's owner scan
/// reports the holders inside the namespace first and stops there, so a
/// process outside it (a pid named on purpose) may be missing when a
/// process inside also holds the socket (an inherited fd).
pub fn add_pid_owners(groups: &mut [Vec<Member>], pid: i32) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return };
    let command = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim_end().to_string();
    // Bounded by the process's open files.
    for entry in dir.flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else { continue };
        let Some(inode) =
            target.to_str().and_then(|t| t.strip_prefix("socket:[")?.strip_suffix(']')?.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        for m in groups.iter_mut().flatten().filter(|m| m.inode == inode) {
            if !m.owners.iter().any(|o| o.pid == pid && o.fd == fd) {
                m.owners.push(Owner { pid, fd, command: command.clone() });
            }
        }
    }
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
}

/// Picks the member of `groups` (the first group with a member the filter
/// accepts) to register, or keeps the one in its family's slot (`current`,
/// with matching flags) if it is one of them.
pub fn choose(groups: &[Vec<Member>], filter: &OwnerFilter, current: &Current) -> Choice {
    for group in groups {
        let accepted: Vec<&Member> =
            group.iter().filter(|m| filter.is_empty() || m.owners.iter().any(|o| filter.accepts(o))).collect();
        if let Some(m) = accepted.iter().find(|m| Some(m.cookie) == current.matching[family_index(m.family) as usize]) {
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
                    replacing: current.held[family_index(m.family) as usize].filter(|c| *c != m.cookie),
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

/// The cookie of the socket in `label`'s slot for (`family`, `protocol`).
pub fn slot_cookie<A: Access>(
    state: &Dispatcher<A>,
    label: &str,
    family: Family,
    protocol: Protocol,
) -> Result<Option<u64>> {
    Slots::open(state)?.cookie(label, family, protocol)
}

/// What `label`'s two slots of `protocol` hold, by family, for [`choose`].
/// A slot whose `no_reuseport` flag differs from the one wanted counts as
/// empty: registering again sets the flag.
pub fn current(slots: &Slots, label: &str, protocol: Protocol, no_reuseport: bool) -> Result<Current> {
    let mut out = Current::default();
    for family in [Family::Ipv4, Family::Ipv6] {
        let flagged = slots.flags(label, family, protocol)? & steer_common::socket_flag::NO_REUSEPORT != 0;
        let held = slots.cookie(label, family, protocol)?;
        out.held[family_index(family) as usize] = held;
        out.matching[family_index(family) as usize] = held.filter(|_| flagged == no_reuseport);
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

/// A socket registered by address.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    pub label: String,
    pub info: SocketInfo,
    pub owner: Owner,
    /// Sockets in its group (1: no reuseport group).
    pub group: usize,
    pub no_reuseport: bool,
    /// It was registered already: nothing changed.
    pub kept: bool,
}

impl Registered {
    /// "registered tcp 127.0.0.1:80 (nginx pid 7 fd 6, cookie 42) as web, one of a reuseport group of 2 ..."
    pub fn describe(&self) -> String {
        let verb = if self.kept { "already registered" } else { "registered" };
        let o = &self.owner;
        let mut text = format!(
            "{verb} {} ({} pid {} fd {}, cookie {}) as {}",
            self.info, o.command, o.pid, o.fd, self.info.cookie, self.label
        );
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

/// Registers the socket listening at `target` (one member of its group,
/// taken from a process `filter` accepts) under `label`; keeps the one
/// registered already if it is a member. Fails when nothing suitable
/// listens there.
pub fn register_by_address(
    state: &Dispatcher<ReadWrite>,
    label: &str,
    target: &Target,
    filter: &OwnerFilter,
    no_reuseport: bool,
) -> Result<Registered> {
    crate::preflight::require_fd_taking_caps()?;
    crate::bindings::label_key(label)?;
    let mut groups = groups(target, true)?;
    if let Some(pid) = filter.pid {
        add_pid_owners(&mut groups, pid);
    }
    let current = current(&Slots::open(state)?, label, target.protocol, no_reuseport)?;
    match choose(&groups, filter, &current) {
        Choice::Keep { cookie, group, .. } => {
            let member = groups.iter().flatten().find(|m| m.cookie == cookie).expect("kept from the groups");
            let owner = member.owners.iter().find(|o| filter.accepts(o)).or_else(|| member.owners.first()).cloned();
            let owner = owner.ok_or_else(|| Error::Invalid(format!("{target}: its socket is held by no process")))?;
            let info = diag_info(target, member)?;
            Ok(Registered { label: label.into(), info, owner, group, no_reuseport, kept: true })
        }
        Choice::Register { member, owner, group, .. } => {
            take_and_register(state, label, &member, &owner, group, no_reuseport)
        }
        Choice::Wait { reason, .. } => match filter.pid {
            Some(pid) if filter.process.is_none() => {
                fail!(Invalid, "process {pid} has no listening/bound {target} socket ({reason})")
            }
            _ => fail!(Invalid, "no listening/bound {target} socket to register: {reason}"),
        },
    }
}

fn diag_info(target: &Target, member: &Member) -> Result<SocketInfo> {
    let netns = crate::netns::current_inode()?;
    let found = diag::listening(target.protocol, member.local.ip(), member.local.port())?;
    let socket = found
        .iter()
        .find(|s| s.cookie == member.cookie)
        .ok_or_else(|| Error::Invalid(format!("{target}: the socket closed meanwhile")))?;
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
    no_reuseport: bool,
) -> Result<Registered> {
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
    state.register_with(label, &[(&taken.info, taken.socket.as_fd())], no_reuseport)?;
    log::info!("registered {} (cookie {}) from {owner} as {label}", taken.info, taken.info.cookie);
    Ok(Registered { label: label.into(), info: taken.info, owner: owner.clone(), group, no_reuseport, kept: false })
}

/// The reuseport group of each registered socket (by cookie): every
/// steerable socket of its protocol bound to the same address and port,
/// with owners. A socket that is no longer found has no entry. One dump
/// per protocol and family, whatever the number of sockets.
pub fn groups_of(registered: &[(Protocol, u64)]) -> Result<BTreeMap<u64, Vec<Member>>> {
    let mut dumps: BTreeMap<Protocol, Vec<DiagSocket>> = BTreeMap::new();
    let protocols: std::collections::BTreeSet<Protocol> = registered.iter().map(|&(p, _)| p).collect();
    for protocol in protocols {
        dumps.insert(protocol, diag::unconnected(protocol)?.into_iter().filter(DiagSocket::steerable).collect());
    }
    let mut sockets: Vec<(u64, Vec<&DiagSocket>)> = Vec::new();
    for (protocol, cookie) in registered {
        let all = &dumps[protocol];
        let Some(s) = all.iter().find(|s| s.cookie == *cookie) else { continue };
        let mut group: Vec<&DiagSocket> = all.iter().filter(|m| (m.family, m.local) == (s.family, s.local)).collect();
        group.sort_by_key(|m| m.inode);
        sockets.push((*cookie, group));
    }
    let inodes: Vec<u64> = sockets.iter().flat_map(|(_, g)| g.iter().map(|s| s.inode)).collect();
    let owners = diag::owners(&inodes)?;
    Ok(sockets
        .into_iter()
        .map(|(cookie, group)| (cookie, group.iter().map(|s| Member::new(s, &owners)).collect()))
        .collect())
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

    #[test]
    fn process_names_compare_as_the_kernel_cuts_them() {
        let owner = Owner { pid: 1, fd: 3, command: "a-very-long-ser".into() };
        assert!(OwnerFilter { pid: None, process: Some("a-very-long-server-name".into()) }.accepts(&owner));
        assert!(!OwnerFilter { pid: None, process: Some("a-very".into()) }.accepts(&owner));
        assert!(OwnerFilter { pid: Some(1), process: None }.accepts(&owner));
        assert!(!OwnerFilter { pid: Some(2), process: None }.accepts(&owner));
    }
}
