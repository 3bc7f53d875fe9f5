//! Bindings: (protocol, address prefix, port) -> label, and their key
//! encoding in the `bindings_*` hash maps (one entry per protocol, prefix and port).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use std::collections::BTreeSet;

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

/// Key in the `bindings_*` hash maps: protocol, prefix length (in the
/// v4-mapped space), port (big-endian), masked address.
pub const KEY_SIZE: usize = 1 + 1 + 2 + 16;
/// `binding_lengths` entries: a u32 count, then up to 129 lengths (132 with padding).
pub const LENGTHS_SIZE: usize = 4 + 132;

/// The key of (protocol, prefix, port).
pub fn encode_key(protocol: Protocol, prefix: &Prefix, port: u16) -> [u8; KEY_SIZE] {
    let (addr, bits) = prefix.mapped();
    let mut key = [0u8; KEY_SIZE];
    key[0] = protocol.number();
    key[1] = bits as u8;
    key[2..4].copy_from_slice(&port.to_be_bytes());
    key[4..].copy_from_slice(&addr);
    key
}

/// (protocol, prefix, port) back from a key.
pub fn decode_key(key: &[u8]) -> Result<(Protocol, Prefix, u16)> {
    let Some(protocol) = Protocol::from_number(key[0]) else { bail!("binding with unknown protocol {}", key[0]) };
    let bits = key[1];
    let port = u16::from_be_bytes([key[2], key[3]]);
    let addr = Ipv6Addr::from(<[u8; 16]>::try_from(&key[4..])?);
    let prefix = match addr.to_ipv4_mapped() {
        Some(v4) if bits >= 96 => Prefix::new(IpAddr::V4(v4), bits - 96)?,
        _ => Prefix::new(IpAddr::V6(addr), bits)?,
    };
    Ok((protocol, prefix, port))
}

/// The prefix-length list the program probes, longest first.
pub fn encode_lengths(keys: impl IntoIterator<Item = u8>) -> [u8; LENGTHS_SIZE] {
    let lengths: BTreeSet<u8> = keys.into_iter().collect();
    let mut out = [0u8; LENGTHS_SIZE];
    out[0..4].copy_from_slice(&(lengths.len() as u32).to_ne_bytes());
    for (slot, len) in out[4..].iter_mut().zip(lengths.iter().rev()) {
        *slot = *len;
    }
    out
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
            let key = encode_key(proto, &prefix, port);
            assert_eq!(decode_key(&key).unwrap(), (proto, prefix, port));
        }
    }

    #[test]
    fn ipv4_lengths_sit_above_every_ipv6_one_but_128() {
        let v4_any = encode_key(Protocol::Tcp, &"0.0.0.0/0".parse().unwrap(), 80);
        let v4_host = encode_key(Protocol::Tcp, &"10.1.2.3".parse().unwrap(), 80);
        assert_eq!((v4_any[1], v4_host[1]), (96, 128));
        let lengths = encode_lengths([96, 128, 24, 128]);
        assert_eq!(&lengths[..7], &[3, 0, 0, 0, 128, 96, 24]);
    }
}
