//! Bindings: (protocol, address prefix, port) -> label. Parsing, the map
//! key encoding, and the precedence rule lookups follow.

use std::{
    collections::BTreeSet,
    fmt,
    net::{IpAddr, Ipv4Addr},
};

use serde::{Deserialize, Serialize};
use steer_common::BindingKey;

use super::{
    net::{Family, Protocol, SocketInfo},
    prefix::Prefix,
    text::clip,
};
use crate::error::{Error, Result, fail};

/// One binding; `port` 0 means every port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Binding {
    pub label: String,
    pub protocol: Protocol,
    pub prefix: Prefix,
    pub port: u16,
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.label, self.protocol, self.prefix, self.port)
    }
}

impl Binding {
    /// Its key in a binding set.
    pub fn key(&self) -> BindingKey {
        encode_key(self.protocol, &self.prefix, self.port)
    }

    /// Which of two bindings that match a lookup wins: the longer prefix
    /// (in the v4-mapped space), then the exact port over the wildcard.
    pub fn precedence(&self) -> (u8, bool) {
        (self.prefix.mapped().1, self.port != 0)
    }

    /// Whether a lookup of `protocol` to `addr`:`port` matches this binding.
    pub fn matches(&self, protocol: Protocol, addr: IpAddr, port: u16) -> bool {
        self.protocol == protocol && (self.port == 0 || self.port == port) && self.prefix.covers(addr)
    }

    /// The family of its prefix ("domain" in the metrics).
    pub fn family(&self) -> Family {
        if self.prefix.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 }
    }

    /// Whether `info`'s socket can take connections this binding matches.
    pub fn served_by(&self, info: &SocketInfo) -> bool {
        info.protocol == self.protocol
            && match (info.family, self.family()) {
                (Family::Ipv4, Family::Ipv4) | (Family::Ipv6, Family::Ipv6) => true,
                (Family::Ipv6, Family::Ipv4) => !info.v6only,
                // Such as ::/0: IPv4 lookups match it as v4-mapped addresses.
                (Family::Ipv4, Family::Ipv6) => {
                    self.prefix.prefix_len() <= 96 && self.prefix.covers(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
                }
            }
    }
}

/// When `served` (a label's bindings) is not empty and none of them can use
/// `info`'s socket, the kinds they are ("tcp ipv4, udp ipv6"), for an error.
pub fn unserved<B: std::borrow::Borrow<Binding>>(info: &SocketInfo, served: &[B]) -> Option<String> {
    if served.is_empty() || served.iter().any(|b| b.borrow().served_by(info)) {
        return None;
    }
    let kinds: BTreeSet<String> =
        served.iter().map(|b| format!("{} {}", b.borrow().protocol, b.borrow().family())).collect();
    Some(kinds.into_iter().collect::<Vec<_>>().join(", "))
}

/// The bindings of a whole set by key, each label checked; fails when one
/// key is bound to two labels (10.0.0.0/8 and ::ffff:10.0.0.0/104 are one key).
pub fn by_key<'a>(
    bindings: impl IntoIterator<Item = &'a Binding>,
) -> Result<std::collections::BTreeMap<BindingKey, &'a Binding>> {
    let mut seen: std::collections::BTreeMap<BindingKey, &Binding> = std::collections::BTreeMap::new();
    for b in bindings {
        super::label::label_key(&b.label)?;
        if let Some(other) = seen.insert(b.key(), b) {
            if other.label != b.label {
                fail!(
                    Invalid,
                    "{} {} {} is bound to both {} and {}",
                    b.protocol,
                    b.prefix,
                    b.port,
                    other.label,
                    b.label
                );
            }
        }
    }
    Ok(seen)
}

/// The binding a lookup resolves to: what the BPF program must answer.
pub fn resolve(bindings: &[Binding], protocol: Protocol, addr: IpAddr, port: u16) -> Option<&Binding> {
    bindings.iter().filter(|b| b.matches(protocol, addr, port)).max_by_key(|b| b.precedence())
}

/// What `bindings --json` prints and `load-bindings` reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingsFile {
    pub bindings: Vec<Binding>,
}

impl BindingsFile {
    /// Parses a bindings file; `name` is what messages call it.
    pub fn parse(text: &str, name: &str) -> Result<Self> {
        serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("{name} is not a valid bindings file: {}", clip(&e.to_string()))))
    }
}

/// The key of (protocol, prefix, port).
pub fn encode_key(protocol: Protocol, prefix: &Prefix, port: u16) -> BindingKey {
    let (addr, len) = prefix.mapped();
    BindingKey::new(protocol.number(), len, port, addr)
}

/// (protocol, prefix, port) back from a key.
pub fn decode_key(key: &BindingKey) -> Result<(Protocol, Prefix, u16)> {
    let Some(protocol) = Protocol::from_number(key.protocol) else {
        fail!(Invalid, "binding with unknown protocol {}", key.protocol)
    };
    Ok((protocol, Prefix::from_mapped(key.addr, key.prefixlen)?, key.port()))
}

#[cfg(test)]
pub(crate) mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::strategies;

    fn b(label: &str, protocol: Protocol, prefix: &str, port: u16) -> Binding {
        Binding { label: label.into(), protocol, prefix: prefix.parse().unwrap(), port }
    }

    #[test]
    fn huge_input_is_quoted_short() {
        let huge = "x".repeat(30 << 20);
        let file = format!(r#"{{"bindings":[{{"label":"a","protocol":"{huge}","prefix":"::1","port":1}}]}}"#);
        let msg = BindingsFile::parse(&file, "f.json").unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.contains("unknown variant"), "{} bytes: {}", msg.len(), &msg[..100]);
    }

    #[test]
    fn keys_round_trip() {
        for (proto, prefix, port) in [
            (Protocol::Tcp, "127.0.0.0/8", 80),
            (Protocol::Udp, "::1/128", 0),
            (Protocol::Tcp, "0.0.0.0/0", 53),
            (Protocol::Udp, "::/0", 9),
            (Protocol::Tcp, "::ffff:0:0/96", 1),
            (Protocol::Udp, "2001:db8:ffff::/47", 65535),
        ] {
            let prefix: Prefix = prefix.parse().unwrap();
            let key = encode_key(proto, &prefix, port);
            let back = decode_key(&key).unwrap();
            // ::ffff:0:0/96 and 0.0.0.0/0 are one key; the IPv4 form comes back.
            assert_eq!(encode_key(back.0, &back.1, back.2), key);
            assert_eq!((back.0, back.2), (proto, port));
        }
        assert_eq!(
            decode_key(&encode_key(Protocol::Tcp, &"10.1.0.0/16".parse().unwrap(), 8)).unwrap().1.to_string(),
            "10.1.0.0/16"
        );
    }

    /// The prefix a key gives back for `prefix`: itself, but an IPv6
    /// prefix inside the v4-mapped region (::ffff:0:0/96 and longer) comes
    /// back as the IPv4 prefix it is the same key as.
    fn canonical(prefix: Prefix) -> Prefix {
        match prefix.addr() {
            IpAddr::V6(a) if prefix.prefix_len() >= 96 => match a.to_ipv4_mapped() {
                Some(v4) => Prefix::new(IpAddr::V4(v4), prefix.prefix_len() - 96).unwrap(),
                None => prefix,
            },
            _ => prefix,
        }
    }

    proptest! {
        #![proptest_config(strategies::config(1024))]

        /// encode_key then decode_key gives the binding back (up to the
        /// IPv4 / v4-mapped identity), and its key again.
        #[test]
        fn keys_round_trip_up_to_v4_mapping(
            protocol in strategies::protocol(),
            prefix in prop_oneof![strategies::any_prefix(), strategies::clustered_prefix()],
            port in any::<u16>(),
        ) {
            let key = encode_key(protocol, &prefix, port);
            let (p, back, q) = decode_key(&key).unwrap();
            prop_assert_eq!((p, back, q), (protocol, canonical(prefix), port));
            prop_assert_eq!(encode_key(p, &back, q), key);
            prop_assert_eq!(back.mapped(), prefix.mapped());
        }

        /// Any key decodes or fails without panicking; one that decodes is
        /// the key of what it decodes to, host bits cleared.
        #[test]
        fn any_key_decodes_or_fails_cleanly(
            protocol in prop_oneof![Just(6u8), Just(17u8), any::<u8>()],
            prefixlen in prop_oneof![0..=128u8, any::<u8>()],
            port in any::<u16>(),
            addr in any::<[u8; 16]>(),
        ) {
            let key = BindingKey { protocol, prefixlen, port: port.to_be_bytes(), addr };
            match decode_key(&key) {
                Ok((p, prefix, q)) => {
                    prop_assert_eq!(encode_key(p, &prefix, q), BindingKey::new(protocol, prefixlen, port, addr));
                }
                Err(e) => prop_assert!(Protocol::from_number(protocol).is_none() || prefixlen > 128, "{}", e),
            }
        }

    }

    proptest! {
        #![proptest_config(strategies::config(256))]

        /// A bindings file prints as JSON that parses back to it, whatever
        /// its labels hold (parsing checks the syntax, not the label rules).
        #[test]
        fn bindings_files_round_trip_as_json(
            bindings in proptest::collection::vec(
                prop_oneof![
                    strategies::any_binding(),
                    (any::<String>(), strategies::clustered_binding())
                        .prop_map(|(label, b)| Binding { label, ..b }),
                ],
                0..20,
            ),
        ) {
            let file = BindingsFile { bindings };
            let text = serde_json::to_string(&file).unwrap();
            prop_assert_eq!(&BindingsFile::parse(&text, "f").unwrap(), &file);
            let pretty = serde_json::to_string_pretty(&file).unwrap();
            prop_assert_eq!(BindingsFile::parse(&pretty, "f").unwrap(), file);
        }
    }

    #[test]
    fn ipv4_lengths_sit_above_every_ipv6_one_but_128() {
        let v4_any = encode_key(Protocol::Tcp, &"0.0.0.0/0".parse().unwrap(), 80);
        let v4_host = encode_key(Protocol::Tcp, &"10.1.2.3".parse().unwrap(), 80);
        assert_eq!((v4_any.prefixlen, v4_host.prefixlen), (96, 128));
        assert_eq!(v4_host.addr, "10.1.2.3".parse::<Ipv4Addr>().unwrap().to_ipv6_mapped().octets());
    }

    /// Overlapping bindings: same prefix on two ports, nested prefixes,
    /// a host route, and an IPv6 /0 that covers IPv4 too.
    pub(crate) fn precedence_examples() -> Vec<Binding> {
        use Protocol::Tcp;
        vec![
            b("a", Tcp, "127.0.0.0/8", 0),
            b("b", Tcp, "127.0.0.0/8", 80),
            b("c", Tcp, "127.0.0.0/24", 0),
            b("d", Tcp, "127.0.0.5/32", 80),
            b("v6", Tcp, "::/0", 443),
        ]
    }

    #[test]
    fn precedence_is_longest_prefix_then_exact_port() {
        use Protocol::Tcp;
        let set = precedence_examples();
        let who = |addr: &str, port| resolve(&set, Tcp, addr.parse().unwrap(), port).map(|b| b.label.as_str());
        assert_eq!(who("127.1.0.1", 80), Some("b"));
        assert_eq!(who("127.1.0.1", 81), Some("a"));
        assert_eq!(who("127.0.0.9", 80), Some("c"));
        assert_eq!(who("127.0.0.5", 80), Some("d"));
        assert_eq!(who("127.0.0.5", 81), Some("c"));
        // ::/0 covers IPv4 as v4-mapped, but any IPv4 /0 or longer beats it.
        assert_eq!(who("10.0.0.1", 443), Some("v6"));
        assert_eq!(who("127.0.0.1", 443), Some("c"));
        assert_eq!(who("2001:db8::1", 443), Some("v6"));
        assert_eq!(who("10.0.0.1", 80), None);
        assert_eq!(resolve(&set, Protocol::Udp, "127.0.0.1".parse().unwrap(), 80), None);
    }

    #[test]
    fn sockets_serve_the_bindings_their_family_can_take() {
        let info = |family, v6only, protocol| SocketInfo {
            family,
            v6only,
            protocol,
            local: None,
            listening: true,
            connected: false,
            cookie: 1,
            inode: 1,
            netns_inode: 1,
        };
        let bind = |prefix: &str| b("x", Protocol::Tcp, prefix, 0);
        let v4 = info(Family::Ipv4, false, Protocol::Tcp);
        let dual = info(Family::Ipv6, false, Protocol::Tcp);
        let v6only = info(Family::Ipv6, true, Protocol::Tcp);
        assert!(bind("10.0.0.0/8").served_by(&v4));
        assert!(bind("10.0.0.0/8").served_by(&dual));
        assert!(!bind("10.0.0.0/8").served_by(&v6only));
        assert!(bind("::/0").served_by(&v4), "::/0 matches IPv4 as v4-mapped");
        assert!(!bind("2001:db8::/32").served_by(&v4));
        assert!(!bind("10.0.0.0/8").served_by(&info(Family::Ipv4, false, Protocol::Udp)));
        assert_eq!(unserved(&v6only, &[bind("10.0.0.0/8")]).as_deref(), Some("tcp ipv4"));
        assert_eq!(unserved::<Binding>(&v6only, &[]), None);
    }

    #[test]
    fn one_key_two_labels_is_refused() {
        let set = [b("a", Protocol::Tcp, "10.0.0.0/8", 80), b("b", Protocol::Tcp, "::ffff:10.0.0.0/104", 80)];
        assert!(by_key(&set).unwrap_err().to_string().contains("bound to both a and b"));
        let same = [b("a", Protocol::Tcp, "10.0.0.0/8", 80), b("a", Protocol::Tcp, "10.1.0.0/8", 80)];
        assert_eq!(by_key(&same).unwrap().len(), 1);
        assert!(by_key(&[b("bad label", Protocol::Tcp, "::/0", 1)]).is_err());
    }

    #[test]
    fn bindings_files_round_trip_and_reject_unknown_fields() {
        let file = BindingsFile {
            bindings: vec![b("web", Protocol::Tcp, "127.0.0.0/8", 80), b("dns", Protocol::Udp, "2001:db8::/64", 0)],
        };
        let text = serde_json::to_string(&file).unwrap();
        assert_eq!(BindingsFile::parse(&text, "f").unwrap(), file);
        assert!(text.contains(r#""prefix":"127.0.0.0/8""#), "{text}");
        let extra = r#"{"bindings":[],"more":1}"#;
        assert!(
            BindingsFile::parse(extra, "f.json")
                .unwrap_err()
                .to_string()
                .contains("f.json is not a valid bindings file")
        );
        let sctp = r#"{"bindings":[{"label":"x","protocol":"sctp","prefix":"::1","port":1}]}"#;
        let err = BindingsFile::parse(sctp, "f").unwrap_err();
        assert!(err.to_string().contains("unknown variant `sctp`"), "{err}");
    }
}
