//! Address prefixes (ipnet's networks, host bits cleared) and the v4-mapped
//! space lookups compare them in.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    str::FromStr,
};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, fail};

/// An address prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix(IpNet);

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self> {
        match IpNet::new(addr, len) {
            Ok(net) => Ok(Self(net.trunc())),
            Err(_) => {
                fail!(Invalid, "prefix length {len} is longer than {} bits", if addr.is_ipv4() { 32 } else { 128 })
            }
        }
    }

    pub fn addr(&self) -> IpAddr {
        self.0.network()
    }

    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    /// The prefix in the v4-mapped IPv6 space lookups use: IPv4 a.b.c.d/N
    /// is ::ffff:a.b.c.d/(96+N).
    pub fn mapped(&self) -> ([u8; 16], u8) {
        match self.0 {
            IpNet::V4(n) => (n.network().to_ipv6_mapped().octets(), 96 + n.prefix_len()),
            IpNet::V6(n) => (n.network().octets(), n.prefix_len()),
        }
    }

    /// Whether `addr`, in the v4-mapped space, falls inside this prefix:
    /// what a lookup matches (so `::/0` covers IPv4 addresses too).
    pub fn covers(&self, addr: IpAddr) -> bool {
        let (base, len) = self.mapped();
        let bits = steer_common::prefix_mask(len);
        u128::from_be_bytes(base) & bits == u128::from_be_bytes(mapped_addr(addr)) & bits
    }

    /// Whether `addr` of the same family falls inside this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }

    /// The prefix a v4-mapped key names back, in its own family.
    pub fn from_mapped(addr: [u8; 16], len: u8) -> Result<Self> {
        let addr = Ipv6Addr::from(addr);
        match addr.to_ipv4_mapped() {
            Some(v4) if len >= 96 => Prefix::new(IpAddr::V4(v4), len - 96),
            _ => Prefix::new(IpAddr::V6(addr), len),
        }
    }
}

/// An address as lookups see it: IPv4 v4-mapped.
pub fn mapped_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

/// What IpAddr's parser gives, without trying IPv4 first on IPv6 text
/// (only IPv6 has colons): a third faster on a file of IPv6 prefixes.
fn parse_addr(text: &str) -> Option<IpAddr> {
    if text.contains(':') {
        text.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
    } else {
        text.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
    }
}

impl FromStr for Prefix {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let shown = || super::text::bounded(s);
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr = parse_addr(addr)
            .ok_or_else(|| Error::Invalid(format!("{} is not an IPv4 or IPv6 address or CIDR prefix", shown())))?;
        let len = match len {
            // Digits only: u8's parser takes a leading '+'.
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => {
                l.parse().map_err(|_| Error::Invalid(format!("{} has a bad prefix length", shown())))?
            }
            Some(_) => fail!(Invalid, "{} has a bad prefix length", shown()),
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr(), self.prefix_len())
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// Parses the text where the deserializer holds it: no String.
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Prefix;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Prefix, E> {
                v.parse().map_err(|e: Error| E::custom(e))
            }
        }
        d.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::strategies;

    #[test]
    fn prefixes_parse_and_clear_host_bits() {
        assert_eq!("10.1.2.3/8".parse::<Prefix>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("127.0.0.1".parse::<Prefix>().unwrap().to_string(), "127.0.0.1/32");
        assert_eq!("2001:db8::1/32".parse::<Prefix>().unwrap().to_string(), "2001:db8::/32");
        assert_eq!("::/0".parse::<Prefix>().unwrap().to_string(), "::/0");
        assert_eq!("0.0.0.0/0".parse::<Prefix>().unwrap().to_string(), "0.0.0.0/0");
        assert!("10.0.0.0/33".parse::<Prefix>().unwrap_err().to_string().contains("longer than 32 bits"));
        assert!("::/129".parse::<Prefix>().is_err());
        assert!("10.0.0.0/x".parse::<Prefix>().unwrap_err().to_string().contains("bad prefix length"));
        assert!("10.0.0.0/+8".parse::<Prefix>().unwrap_err().to_string().contains("bad prefix length"));
        assert!("10.0.0.0/".parse::<Prefix>().unwrap_err().to_string().contains("bad prefix length"));
        assert!("example.com".parse::<Prefix>().unwrap_err().to_string().contains("not an IPv4 or IPv6"));
        let huge = "x".repeat(30 << 20);
        let msg = huge.parse::<Prefix>().unwrap_err().to_string();
        assert!(msg.len() < 200 && msg.contains(&format!("({} bytes)", huge.len())), "{}", &msg[..100]);
    }

    /// Text that looks like a prefix more often than random text does:
    /// digits, hex, separators, signs and spaces in any order.
    fn prefixish() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::string::string_regex("[0-9a-fA-F.:/+% -]{0,48}").expect("a valid regex"),
            // A real prefix with a few bytes changed, dropped or added.
            (strategies::any_prefix(), any::<usize>(), "[0-9a-z.:/+ ]{0,3}", 0..3usize).prop_map(
                |(p, at, with, cut)| {
                    let mut s = p.to_string();
                    let at = at % (s.len() + 1);
                    s.replace_range(at..(at + cut).min(s.len()), &with);
                    s
                }
            ),
            // Any characters, control ones and escapes included.
            proptest::collection::vec(any::<char>(), 0..100).prop_map(String::from_iter),
        ]
    }

    proptest! {
        #![proptest_config(strategies::config(1024))]

        /// Every prefix prints as text that parses back to it, as JSON too,
        /// and the address and length it was made of parse to it as well
        /// (host bits and all), as does the bare address for a host prefix.
        #[test]
        fn prefixes_round_trip_through_text_and_json(prefix in strategies::any_prefix(), host in any::<u128>()) {
            let text = prefix.to_string();
            prop_assert_eq!(text.parse::<Prefix>().unwrap(), prefix);
            let json = serde_json::to_string(&prefix).unwrap();
            prop_assert_eq!(&json, &format!("{text:?}"));
            prop_assert_eq!(serde_json::from_str::<Prefix>(&json).unwrap(), prefix);
            // The same prefix written with host bits set.
            let max = if prefix.is_ipv4() { 32 } else { 128 };
            let host_bits = !steer_common::prefix_mask(128 - max + prefix.prefix_len());
            let dirty = match prefix.addr() {
                IpAddr::V4(a) => IpAddr::V4((u32::from(a) | (host as u32 & host_bits as u32)).into()),
                IpAddr::V6(a) => IpAddr::V6((u128::from(a) | (host & host_bits)).into()),
            };
            prop_assert_eq!(format!("{dirty}/{}", prefix.prefix_len()).parse::<Prefix>().unwrap(), prefix);
            prop_assert_eq!(Prefix::new(dirty, prefix.prefix_len()).unwrap(), prefix);
            if prefix.prefix_len() == max {
                prop_assert_eq!(prefix.addr().to_string().parse::<Prefix>().unwrap(), prefix);
            }
            let (mapped, len) = prefix.mapped();
            let back = Prefix::from_mapped(mapped, len).unwrap();
            prop_assert!(back == prefix || (!prefix.is_ipv4() && back.is_ipv4() && back.mapped() == (mapped, len)));
        }

        /// Any text either fails to parse, with a short message, or parses
        /// to a prefix whose own text parses back to it.
        #[test]
        fn any_text_parses_or_fails_cleanly(text in prefixish()) {
            match text.parse::<Prefix>() {
                Ok(prefix) => {
                    let again = prefix.to_string();
                    prop_assert_eq!(again.parse::<Prefix>().unwrap(), prefix);
                    prop_assert_eq!(again.parse::<Prefix>().unwrap().to_string(), again);
                }
                // Bounded whatever the input (64 characters of it, escaped).
                Err(e) => prop_assert!(e.to_string().chars().count() < 1024, "{}", e),
            }
            let addr = text.split_once('/').map_or(text.as_str(), |(addr, _)| addr);
            prop_assert_eq!(parse_addr(addr), addr.parse::<IpAddr>().ok());
            // serde takes the same text, and fails the same way.
            let json = serde_json::to_string(&text).unwrap();
            prop_assert_eq!(serde_json::from_str::<Prefix>(&json).ok(), text.parse::<Prefix>().ok());
        }
    }

    #[test]
    fn ipv6_prefixes_cover_ipv4_as_v4_mapped() {
        let any6: Prefix = "::/0".parse().unwrap();
        assert!(any6.covers("10.0.0.1".parse().unwrap()));
        assert!(!any6.contains("10.0.0.1".parse().unwrap()));
        let v4: Prefix = "10.0.0.0/8".parse().unwrap();
        assert!(v4.covers("10.9.9.9".parse().unwrap()) && !v4.covers("11.0.0.1".parse().unwrap()));
        assert!(!v4.covers("2001:db8::1".parse().unwrap()));
        let (addr, len) = v4.mapped();
        assert_eq!(Prefix::from_mapped(addr, len).unwrap(), v4);
    }
}
