//! Protocols, address families and what the kernel says about a socket.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::{Deserialize, Serialize};
use steer_common::kernel::{AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

use crate::error::{Error, Result, fail};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Tcp, Protocol::Udp];

    /// The IPPROTO_* number the kernel and the maps use.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => IPPROTO_TCP as u8,
            Protocol::Udp => IPPROTO_UDP as u8,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match u32::from(number) {
            IPPROTO_TCP => Some(Protocol::Tcp),
            IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// Its index in socket slots and counter sets: TCP 0, UDP 1.
    pub fn index(self) -> u32 {
        u32::from(self == Protocol::Udp)
    }

    pub fn from_index(index: u32) -> Self {
        if index & 1 == 0 { Protocol::Tcp } else { Protocol::Udp }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

impl std::str::FromStr for Protocol {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "tcp" => Ok(Protocol::Tcp),
            "udp" => Ok(Protocol::Udp),
            _ => fail!(Invalid, "protocol must be tcp or udp, not {}", super::text::bounded(s)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::Ipv4, Family::Ipv6];

    /// The AF_* number the kernel and the maps use.
    pub fn af(self) -> u8 {
        match self {
            Family::Ipv4 => AF_INET as u8,
            Family::Ipv6 => AF_INET6 as u8,
        }
    }

    pub fn from_af(af: u8) -> Option<Self> {
        match u32::from(af) {
            AF_INET => Some(Family::Ipv4),
            AF_INET6 => Some(Family::Ipv6),
            _ => None,
        }
    }

    /// Its index in socket slots and counter sets: IPv4 0, IPv6 1.
    pub fn index(self) -> u32 {
        u32::from(self == Family::Ipv6)
    }

    pub fn from_index(index: u32) -> Self {
        if index & 1 == 0 { Family::Ipv4 } else { Family::Ipv6 }
    }

    /// The family of an address (a v4-mapped IPv6 address is IPv6).
    pub fn of(addr: std::net::IpAddr) -> Self {
        if addr.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

impl std::str::FromStr for Family {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "ipv4" => Ok(Family::Ipv4),
            "ipv6" => Ok(Family::Ipv6),
            _ => fail!(Invalid, "family must be ipv4 or ipv6, not {}", super::text::bounded(s)),
        }
    }
}

/// What the kernel says about a socket, from its fd or from sock_diag.
#[derive(Debug, Clone, Serialize)]
pub struct SocketInfo {
    pub family: Family,
    /// An IPv6 socket that refuses IPv4 (IPV6_V6ONLY).
    pub v6only: bool,
    pub protocol: Protocol,
    pub local: Option<SocketAddr>,
    pub listening: bool,
    pub connected: bool,
    pub cookie: u64,
    pub inode: u64,
    pub netns_inode: u64,
}

impl fmt::Display for SocketInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.local {
            Some(addr) => write!(f, "{} {addr}", self.protocol),
            None => write!(f, "{} (unbound)", self.protocol),
        }
    }
}

impl SocketInfo {
    /// Fails unless sk_lookup can assign connections to this socket from
    /// the network namespace with inode `netns_inode`.
    pub fn check_steerable(&self, netns_inode: u64) -> Result<()> {
        match self.protocol {
            Protocol::Tcp if !self.listening => fail!(
                Invalid,
                "it is a TCP socket that is not listening ({}); only a listening TCP socket can take new connections",
                match (self.local, self.connected) {
                    (_, true) => "connected",
                    (Some(_), false) => "bound",
                    (None, false) => "unbound",
                }
            ),
            Protocol::Udp if self.local.is_none() => {
                fail!(Invalid, "it is an unbound UDP socket; bind it to an address and port first")
            }
            Protocol::Udp if self.connected => {
                fail!(
                    Invalid,
                    "it is a connected UDP socket; it only receives from its one peer, use an unconnected one"
                )
            }
            _ => {}
        }
        if self.netns_inode != netns_inode {
            fail!(
                Invalid,
                "it lives in network namespace {} but this command runs in {netns_inode}; run it inside the socket's namespace (ip netns exec NAME ...)",
                self.netns_inode
            );
        }
        Ok(())
    }
}

/// Where a server listens: what `register LABEL tcp|udp ADDR PORT` names
/// (0.0.0.0 / :: for a wildcard bind, or an address a wildcard bind covers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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

impl Target {
    /// From the command line's `tcp|udp ADDR PORT`.
    pub fn parse(protocol: &str, address: &str, port: &str) -> Result<Self> {
        Ok(Self {
            protocol: protocol.parse()?,
            address: address
                .parse()
                .map_err(|_| Error::Invalid(format!("{} is not an IP address", super::text::bounded(address))))?,
            port: port.parse().map_err(|_| Error::Invalid(format!("{} is not a port", super::text::bounded(port))))?,
        })
    }

    /// The family of the socket a wildcard or exact bind of this address has.
    pub fn family(&self) -> Family {
        Family::of(self.address.to_canonical())
    }
}

/// A process holding a socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Owner {
    pub pid: i32,
    pub fd: i32,
    pub command: String,
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {}, fd {})", self.command, self.pid, self.fd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_round_trip() {
        for p in Protocol::ALL {
            assert_eq!(Protocol::from_index(p.index()), p);
            assert_eq!(Protocol::from_number(p.number()), Some(p));
            assert_eq!(p.to_string().parse::<Protocol>().unwrap(), p);
        }
        for f in Family::ALL {
            assert_eq!(Family::from_index(f.index()), f);
            assert_eq!(Family::from_af(f.af()), Some(f));
            assert_eq!(f.to_string().parse::<Family>().unwrap(), f);
        }
        assert!("sctp".parse::<Protocol>().unwrap_err().to_string().contains("tcp or udp"));
    }
}
