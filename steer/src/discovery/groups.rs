//! Who would take a connection to an address: the listening (or bound)
//! sockets the kernel's own lookup would pick, in groups of one bind each
//! (a SO_REUSEPORT group, or a single socket), with their holders.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{
    diag::{self, DiagSocket},
    owners,
};
use crate::{
    error::Result,
    model::{Family, Owner, Protocol, Target},
};

/// One socket of a group, with the processes holding it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub cookie: u64,
    pub inode: u64,
    pub family: Family,
    pub local: std::net::SocketAddr,
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
/// each, IPv4 binds first. Owners are looked up only when `with_owners`;
/// `pid`'s own fds are added to them (a process named on purpose).
pub fn groups(target: &Target, with_owners: bool, pid: Option<i32>) -> Result<Vec<Vec<Member>>> {
    let found = diag::listening(target.protocol, target.address, target.port)?;
    let inodes: Vec<u64> = found.iter().map(|s| s.inode).collect();
    let mut owners = if with_owners { owners::owners(&inodes)? } else { BTreeMap::new() };
    if let Some(pid) = pid {
        for (inode, theirs) in owners::owners_in(pid, &inodes) {
            let known = owners.entry(inode).or_default();
            for o in theirs {
                if !known.contains(&o) {
                    known.push(o);
                }
            }
        }
    }
    Ok(diag::groups(&found).map(|g| g.iter().map(|s| Member::new(s, &owners)).collect()).collect())
}

/// The reuseport group of each registered socket (by cookie): every
/// steerable socket of its protocol bound to the same address and port,
/// with owners. A socket that is no longer found has no entry. One dump
/// per protocol and family, whatever the number of sockets.
pub fn groups_of(registered: &[(Protocol, u64)]) -> Result<BTreeMap<u64, Vec<Member>>> {
    let mut dumps: BTreeMap<Protocol, Vec<DiagSocket>> = BTreeMap::new();
    let protocols: BTreeSet<Protocol> = registered.iter().map(|&(p, _)| p).collect();
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
    let owners = owners::owners(&inodes)?;
    Ok(sockets
        .into_iter()
        .map(|(cookie, group)| (cookie, group.iter().map(|s| Member::new(s, &owners)).collect()))
        .collect())
}
