//! Servers followed by the kernel, as a model: which listening addresses
//! serve which registrations. A registration names the address its server
//! binds (or one a wildcard bind covers); a listener serves it when bound
//! to that very address (first) or to the wildcard that covers it (after
//! those, as the kernel's own lookup ranks them). [`entries`] turns a set
//! of registrations into the `follows` map the programs read inside
//! listen() and bind().

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use serde::Serialize;
use steer_common::{FOLLOW_ENTRIES, FollowEntry, FollowKey, FollowValue, follow_flag};

use super::net::{Family, Protocol, Target};
use crate::error::{Result, fail};

/// A registration the kernel follows.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Follow {
    pub label: String,
    pub target: Target,
    /// The cgroup whose sockets may take it (its path under the cgroup2
    /// mount; "" for the root: any process).
    pub cgroup: String,
    pub no_reuseport: bool,
}

/// The key of a listener of `protocol` bound to `addr`:`port`.
pub fn key(protocol: Protocol, addr: IpAddr, port: u16) -> FollowKey {
    let mut key = FollowKey { family: Family::of(addr).af(), protocol: protocol.number(), port, addr: [0; 16] };
    match addr {
        IpAddr::V4(a) => key.addr[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => key.addr = a.octets(),
    }
    key
}

/// The listener address a key names.
pub fn key_addr(key: &FollowKey) -> IpAddr {
    if Family::from_af(key.family) == Some(Family::Ipv4) {
        IpAddr::V4(Ipv4Addr::new(key.addr[0], key.addr[1], key.addr[2], key.addr[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(key.addr))
    }
}

/// The listener addresses that serve `target`, each with whether it only
/// covers it (a wildcard bind): the address itself, its v4-mapped IPv6
/// form for IPv4, and the wildcards of the families that can take it.
pub fn listeners(target: &Target) -> Vec<(IpAddr, bool)> {
    let addr = target.address.to_canonical();
    let any4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let any6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
    let mut out = vec![(addr, false)];
    match addr {
        IpAddr::V4(a) => {
            out.push((IpAddr::V6(a.to_ipv6_mapped()), false));
            if !a.is_unspecified() {
                out.push((any4, true));
            }
            // A dual-stack IPv6 wildcard takes IPv4 too.
            out.push((any6, true));
        }
        IpAddr::V6(a) if !a.is_unspecified() => out.push((any6, true)),
        IpAddr::V6(_) => {}
    }
    out
}

/// The `follows` map for `follows`, whose labels have the ids in `labels`
/// and whose cgroups the scope ids in `scopes`. Fails when more
/// registrations than a key holds share one listener address.
pub fn entries(
    follows: &[Follow],
    labels: &BTreeMap<String, u32>,
    scopes: &BTreeMap<String, u16>,
) -> Result<BTreeMap<FollowKey, FollowValue>> {
    let mut out: BTreeMap<FollowKey, FollowValue> = BTreeMap::new();
    for f in follows {
        let label = labels[&f.label];
        let scope = scopes[&f.cgroup];
        for (addr, cover) in listeners(&f.target) {
            let entry = FollowEntry { label, scope, flags: if cover { follow_flag::COVER } else { 0 }, _pad: 0 };
            let value = out.entry(key(f.target.protocol, addr, f.target.port)).or_default();
            if value.entries.contains(&entry) {
                continue;
            }
            let Some(free) = value.entries.iter_mut().find(|e| e.label == FollowEntry::NONE) else {
                fail!(
                    Invalid,
                    "more than {FOLLOW_ENTRIES} followed registrations share listeners on {} {}: {} is one too many",
                    f.target.protocol,
                    std::net::SocketAddr::new(addr, f.target.port),
                    f.label
                );
            };
            *free = entry;
        }
    }
    Ok(out)
}

/// The registrations a `follows` map holds back (the entries for the
/// address each names, not the covers derived from them). `labels` and
/// `scopes` map ids back to names.
pub fn registrations(
    map: &BTreeMap<FollowKey, FollowValue>,
    labels: &BTreeMap<u32, String>,
    scopes: &BTreeMap<u16, String>,
) -> Vec<(FollowKey, FollowEntry, Option<String>, Option<String>)> {
    let mut out = Vec::new();
    for (key, value) in map {
        for e in value.entries.iter().filter(|e| e.label != FollowEntry::NONE && e.flags & follow_flag::COVER == 0) {
            // A v4-mapped key is derived from the IPv4 registration.
            if let IpAddr::V6(a) = key_addr(key) {
                if a.to_ipv4_mapped().is_some() {
                    continue;
                }
            }
            out.push((*key, *e, labels.get(&e.label).cloned(), scopes.get(&e.scope).cloned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(label: &str, addr: &str, port: u16) -> Follow {
        Follow {
            label: label.into(),
            target: Target { protocol: Protocol::Tcp, address: addr.parse().unwrap(), port },
            cgroup: String::new(),
            no_reuseport: false,
        }
    }

    #[test]
    fn a_specific_address_is_served_by_itself_then_by_the_wildcards() {
        let labels = BTreeMap::from([("web".to_string(), 3)]);
        let scopes = BTreeMap::from([(String::new(), 0)]);
        let map = entries(&[f("web", "127.0.0.1", 80)], &labels, &scopes).unwrap();
        let k = |a: &str| key(Protocol::Tcp, a.parse().unwrap(), 80);
        assert_eq!(map[&k("127.0.0.1")].entries[0].flags, 0);
        assert_eq!(map[&k("::ffff:127.0.0.1")].entries[0].flags, 0);
        assert_eq!(map[&k("0.0.0.0")].entries[0].flags, follow_flag::COVER);
        assert_eq!(map[&k("::")].entries[0].flags, follow_flag::COVER);
        assert_eq!(map.len(), 4);
        // A wildcard registration is its own exact key.
        let map = entries(&[f("web", "0.0.0.0", 80)], &labels, &scopes).unwrap();
        assert_eq!(map[&k("0.0.0.0")].entries[0].flags, 0);
        let map = entries(&[f("web", "::", 80)], &labels, &scopes).unwrap();
        assert_eq!(map.len(), 1);
    }

    #[test]
    fn one_wildcard_serves_several_registrations_up_to_the_limit() {
        let labels: BTreeMap<String, u32> = (0..6).map(|i| (format!("l{i}"), i)).collect();
        let scopes = BTreeMap::from([(String::new(), 0)]);
        let four: Vec<Follow> = (0..4).map(|i| f(&format!("l{i}"), &format!("127.0.0.{}", i + 1), 80)).collect();
        let map = entries(&four, &labels, &scopes).unwrap();
        let any = &map[&key(Protocol::Tcp, "0.0.0.0".parse().unwrap(), 80)];
        assert!(any.entries.iter().all(|e| e.label != FollowEntry::NONE));
        let five: Vec<Follow> = (0..5).map(|i| f(&format!("l{i}"), &format!("127.0.0.{}", i + 1), 80)).collect();
        assert!(entries(&five, &labels, &scopes).unwrap_err().to_string().contains("l4 is one too many"));
    }

    #[test]
    fn registrations_come_back_without_the_derived_keys() {
        let labels = BTreeMap::from([("web".to_string(), 3)]);
        let scopes = BTreeMap::from([(String::new(), 0)]);
        let map = entries(&[f("web", "127.0.0.1", 80)], &labels, &scopes).unwrap();
        let names = BTreeMap::from([(3, "web".to_string())]);
        let back = registrations(&map, &names, &BTreeMap::from([(0, String::new())]));
        assert_eq!(back.len(), 1);
        assert_eq!(key_addr(&back[0].0), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(back[0].2.as_deref(), Some("web"));
    }
}
