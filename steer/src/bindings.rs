//! Bindings: (protocol, address prefix, port) -> label, and their key
//! encoding in the `bindings_*` LPM tries.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::socket::Protocol;

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
            bail!("prefix length {len} is longer than {max} bits");
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0))),
        };
        Ok(Self { addr, len })
    }

    /// The address as the key stores it: IPv4 v4-mapped into IPv6.
    fn mapped(&self) -> ([u8; 16], u32) {
        match self.addr {
            IpAddr::V4(a) => (a.to_ipv6_mapped().octets(), 96 + u32::from(self.len)),
            IpAddr::V6(a) => (a.octets(), u32::from(self.len)),
        }
    }

    pub fn contains(&self, addr: IpAddr) -> bool {
        match (self.addr, addr) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                Prefix::new(addr, self.len).is_ok_and(|p| p.addr == self.addr)
            }
            _ => false,
        }
    }
}

impl FromStr for Prefix {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().with_context(|| format!("{s:?} is not an IPv4 or IPv6 address or CIDR prefix"))?;
        let len = match len {
            Some(l) => l.parse().with_context(|| format!("{s:?} has a bad prefix length"))?,
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
        String::deserialize(d)?.parse().map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
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

/// What `bindings --json` prints and `load-bindings` reads.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BindingsFile {
    pub bindings: Vec<Binding>,
}

pub const KEY_SIZE: usize = 4 + 1 + 2 + 16;
pub const VALUE_SIZE: usize = 8;
/// Bits after the key's prefixlen field that always match: protocol, port.
const FIXED_BITS: u32 = 24;

fn protocol_number(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => libc::IPPROTO_TCP as u8,
        Protocol::Udp => libc::IPPROTO_UDP as u8,
    }
}

/// The LPM key of (protocol, prefix, port) and its prefixlen.
pub fn encode_key(protocol: Protocol, prefix: &Prefix, port: u16) -> ([u8; KEY_SIZE], u32) {
    let (addr, addr_bits) = prefix.mapped();
    let prefixlen = FIXED_BITS + addr_bits;
    let mut key = [0u8; KEY_SIZE];
    key[0..4].copy_from_slice(&prefixlen.to_ne_bytes());
    key[4] = protocol_number(protocol);
    key[5..7].copy_from_slice(&port.to_be_bytes());
    key[7..].copy_from_slice(&addr);
    (key, prefixlen)
}

pub fn encode_value(label_id: u32, prefixlen: u32) -> [u8; VALUE_SIZE] {
    let mut v = [0u8; VALUE_SIZE];
    v[0..4].copy_from_slice(&label_id.to_ne_bytes());
    v[4..8].copy_from_slice(&prefixlen.to_ne_bytes());
    v
}

/// (protocol, prefix, port) back from a key.
pub fn decode_key(key: &[u8]) -> Result<(Protocol, Prefix, u16)> {
    let prefixlen = u32::from_ne_bytes(key[0..4].try_into()?);
    let protocol = match i32::from(key[4]) {
        libc::IPPROTO_TCP => Protocol::Tcp,
        libc::IPPROTO_UDP => Protocol::Udp,
        other => bail!("binding with unknown protocol {other}"),
    };
    let port = u16::from_be_bytes([key[5], key[6]]);
    let addr = Ipv6Addr::from(<[u8; 16]>::try_from(&key[7..])?);
    let bits = prefixlen.saturating_sub(FIXED_BITS);
    let prefix = match addr.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => Prefix::new(IpAddr::V4(v4), (bits - 96) as u8)?,
        _ => Prefix::new(IpAddr::V6(addr), bits as u8)?,
    };
    Ok((protocol, prefix, port))
}

pub fn decode_label_id(value: &[u8]) -> u32 {
    u32::from_ne_bytes(value[0..4].try_into().expect("4 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_clear_host_bits() {
        assert_eq!("10.1.2.3/8".parse::<Prefix>().unwrap().to_string(), "10.0.0.0/8");
        assert_eq!("127.0.0.1".parse::<Prefix>().unwrap().to_string(), "127.0.0.1/32");
        assert_eq!("2001:db8::1/32".parse::<Prefix>().unwrap().to_string(), "2001:db8::/32");
        assert_eq!("::/0".parse::<Prefix>().unwrap().to_string(), "::/0");
        assert!("10.0.0.0/33".parse::<Prefix>().is_err());
        assert!("example.com".parse::<Prefix>().is_err());
    }

    #[test]
    fn keys_round_trip() {
        for (proto, prefix, port) in
            [(Protocol::Tcp, "127.0.0.0/8", 80), (Protocol::Udp, "::1/128", 0), (Protocol::Tcp, "0.0.0.0/0", 53), (Protocol::Udp, "::/0", 9)]
        {
            let prefix: Prefix = prefix.parse().unwrap();
            let (key, _) = encode_key(proto, &prefix, port);
            assert_eq!(decode_key(&key).unwrap(), (proto, prefix, port));
        }
    }

    #[test]
    fn ipv4_keys_are_longer_than_any_ipv6_catch_all() {
        let (_, v4_any) = encode_key(Protocol::Tcp, &"0.0.0.0/0".parse().unwrap(), 80);
        let (_, v6_any) = encode_key(Protocol::Tcp, &"::/0".parse().unwrap(), 80);
        assert!(v4_any > v6_any);
    }
}
