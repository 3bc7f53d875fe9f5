//! Bindings: (protocol, address prefix, port) -> label. Pure: parsing,
//! normalising, the map key encoding, label rules and the precedence rule
//! lookups follow.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};
use steer_common::{BindingKey, LabelName, MAX_LABEL_LEN};

use crate::{
    error::{Error, Result, fail},
    socket::Protocol,
};

/// An address prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            fail!(Invalid, "prefix length {len} is longer than {max} bits");
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                IpAddr::V4(Ipv4Addr::from(u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0)))
            }
            IpAddr::V6(a) => {
                IpAddr::V6(Ipv6Addr::from(u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0)))
            }
        };
        Ok(Self { addr, len })
    }

    /// The prefix in the v4-mapped IPv6 space lookups use: IPv4 a.b.c.d/N
    /// is ::ffff:a.b.c.d/(96+N).
    pub fn mapped(&self) -> ([u8; 16], u8) {
        match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + self.len),
            IpAddr::V6(a) => (a.octets(), self.len),
        }
    }

    /// Whether `addr`, in the v4-mapped space, falls inside this prefix:
    /// what a lookup matches (so `::/0` covers IPv4 addresses too).
    pub fn covers(&self, addr: IpAddr) -> bool {
        let (base, len) = self.mapped();
        let target = mapped_addr(addr);
        let bits = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
        u128::from_be_bytes(base) & bits == u128::from_be_bytes(target) & bits
    }

    /// Whether `addr` of the same family falls inside this prefix.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.addr.is_ipv4() == addr.is_ipv4() && self.covers(addr)
    }
}

/// An address as lookups see it: IPv4 v4-mapped.
pub fn mapped_addr(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        IpAddr::V6(a) => a.octets(),
    }
}

impl FromStr for Prefix {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let shown = bounded(s);
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| Error::Invalid(format!("{shown} is not an IPv4 or IPv6 address or CIDR prefix")))?;
        let len = match len {
            Some(l) => l.parse().map_err(|_| Error::Invalid(format!("{shown} has a bad prefix length")))?,
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl Serialize for Prefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Prefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(|e: Error| serde::de::Error::custom(e))
    }
}

/// Quotes user input for a message, cut short so a huge input cannot flood it.
pub fn bounded(input: &str) -> String {
    const MAX: usize = 64;
    match input.char_indices().nth(MAX) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}... ({} bytes)", &input[..cut], input.len()),
    }
}

/// A message cut short, so that input echoed in it cannot flood the terminal.
pub fn clip(message: &str) -> String {
    const MAX: usize = 300;
    match message.char_indices().nth(MAX) {
        None => message.to_string(),
        Some((cut, _)) => format!("{}... ({} bytes in all)", &message[..cut], message.len()),
    }
}

/// Checks a label against the rules and encodes it as the `labels` key.
pub fn label_key(label: &str) -> Result<LabelName> {
    let ok = !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if !ok {
        fail!(Invalid, "bad label {}: use 1 to {MAX_LABEL_LEN} letters, digits, '-', '_', '.' or ':'", bounded(label));
    }
    let mut key = LabelName([0; LabelName::SIZE]);
    key.0[..label.len()].copy_from_slice(label.as_bytes());
    Ok(key)
}

/// The label a `labels` key names.
pub fn label_from_key(key: &LabelName) -> String {
    String::from_utf8_lossy(key.as_bytes()).into_owned()
}

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
    let addr = Ipv6Addr::from(key.addr);
    let prefix = match addr.to_ipv4_mapped() {
        Some(v4) if key.prefixlen >= 96 => Prefix::new(IpAddr::V4(v4), key.prefixlen - 96)?,
        _ => Prefix::new(IpAddr::V6(addr), key.prefixlen)?,
    };
    Ok((protocol, prefix, key.port()))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn b(label: &str, protocol: Protocol, prefix: &str, port: u16) -> Binding {
        Binding { label: label.into(), protocol, prefix: prefix.parse().unwrap(), port }
    }

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
        assert!("example.com".parse::<Prefix>().unwrap_err().to_string().contains("not an IPv4 or IPv6"));
    }

    #[test]
    fn huge_input_is_quoted_short() {
        let huge = "x".repeat(30 << 20);
        let file = format!(r#"{{"bindings":[{{"label":"a","protocol":"{huge}","prefix":"::1","port":1}}]}}"#);
        let msg = BindingsFile::parse(&file, "f.json").unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.contains("unknown variant"), "{} bytes: {}", msg.len(), &msg[..100]);
        let msg = huge.parse::<Prefix>().unwrap_err().to_string();
        assert!(msg.len() < 200, "{} bytes", msg.len());
        assert!(msg.contains(&format!("({} bytes)", huge.len())), "{msg}");
        assert!(label_key(&huge).unwrap_err().to_string().len() < 250);
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
    fn labels_follow_the_rules() {
        assert_eq!(label_from_key(&label_key("web-1.a_b:c").unwrap()), "web-1.a_b:c");
        assert!(label_key(&"x".repeat(MAX_LABEL_LEN)).is_ok());
        for bad in ["", "has space", "tab\t", "ü", &"x".repeat(MAX_LABEL_LEN + 1)] {
            assert!(label_key(bad).unwrap_err().to_string().starts_with("bad label"), "{bad:?}");
        }
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
