//! sock_diag, as `ss` uses it: a netlink dump (inet_diag, TCP and UDP,
//! IPv4 and IPv6) of the sockets of the calling thread's network namespace
//! with their cookie, inode, state and addresses (setns first to look at
//! another namespace).

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use netlink_packet_core::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla as NlaTrait};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, InetResponse, SocketId, StateFlags, nlas::Nla},
};
use netlink_sys::{Socket, protocols::NETLINK_SOCK_DIAG};
use serde::Serialize;

use crate::{
    error::{Context, Error, Result, fail},
    model::{Family, Protocol, SocketInfo},
};

/// The attribute carrying a socket's cgroup id (linux/inet_diag.h).
const INET_DIAG_CGROUP_ID: u16 = 21;

/// `sk_state` of a TCP socket in the LISTEN state.
pub const TCP_LISTEN: u8 = 10;
/// `sk_state` of a connected UDP socket (and an established TCP one).
pub const TCP_ESTABLISHED: u8 = 1;
/// `sk_state` of an unconnected UDP socket (and a closed TCP one).
pub const TCP_CLOSE: u8 = 7;

/// One socket as sock_diag reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiagSocket {
    pub protocol: Protocol,
    pub family: Family,
    pub local: SocketAddr,
    /// None unless connected.
    pub remote: Option<SocketAddr>,
    /// The kernel's `sk_state`: [`TCP_LISTEN`], [`TCP_CLOSE`], ...
    pub state: u8,
    /// The socket's inode, as in `/proc/PID/fd/N -> socket:[INODE]`; 0 for
    /// sockets no file refers to (TIME_WAIT, request sockets).
    pub inode: u64,
    pub cookie: u64,
    pub uid: u32,
    /// IPV6_V6ONLY of an IPv6 socket (INET_DIAG_SKV6ONLY); None for IPv4.
    pub v6only: Option<bool>,
    /// The cgroup (v2) id the socket was made in (INET_DIAG_CGROUP_ID,
    /// Linux 5.7); None where the kernel does not say.
    pub cgroup_id: Option<u64>,
}

impl DiagSocket {
    /// Whether sk_lookup can hand connections to it: a listening TCP socket
    /// or a bound, unconnected UDP one.
    pub fn steerable(&self) -> bool {
        match self.protocol {
            Protocol::Tcp => self.state == TCP_LISTEN,
            Protocol::Udp => self.remote.is_none() && self.local.port() != 0,
        }
    }

    /// The same facts as [`crate::kernel::socket::inspect`] gives
    /// for an fd; `netns_inode` is the namespace the dump ran in.
    pub fn info(&self, netns_inode: u64) -> SocketInfo {
        SocketInfo {
            family: self.family,
            v6only: self.v6only.unwrap_or(false),
            protocol: self.protocol,
            local: Some(self.local).filter(|a| a.port() != 0),
            listening: self.protocol == Protocol::Tcp && self.state == TCP_LISTEN,
            connected: self.remote.is_some(),
            cookie: self.cookie,
            inode: self.inode,
            netns_inode,
        }
    }
}

/// Every `protocol` socket of this network namespace, IPv4 and IPv6, in
/// any state.
pub fn sockets(protocol: Protocol) -> Result<Vec<DiagSocket>> {
    let mut diag = Diag::open()?;
    let mut out = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        diag.dump(protocol, family, StateFlags::all(), &mut out)?;
    }
    Ok(out)
}

/// The steerable `protocol` sockets that would receive a connection (or
/// datagram) to `addr`:`port`, the way the kernel's own lookup ranks them:
///
/// - sockets bound to `addr` itself if there is any (an IPv6 socket bound
///   to the v4-mapped form of an IPv4 `addr` counts);
/// - otherwise the wildcard binds on `port`: `0.0.0.0` for an IPv4 `addr`,
///   and `::` for either family unless the socket is IPV6_V6ONLY and
///   `addr` is IPv4.
///
/// A v4-mapped IPv6 `addr` is looked up as the IPv4 address. The result is
/// sorted by (family, local address, inode), so the sockets sharing one
/// bind are adjacent: see [`groups`].
pub fn listening(protocol: Protocol, addr: IpAddr, port: u16) -> Result<Vec<DiagSocket>> {
    Ok(best_matches(unconnected(protocol)?, addr.to_canonical(), port))
}

/// Every listening TCP or unconnected UDP socket of this namespace (one
/// dump per family; the kernel filters by state, so established
/// connections are not dumped).
pub fn unconnected(protocol: Protocol) -> Result<Vec<DiagSocket>> {
    // Unconnected UDP sockets are in TCP_CLOSE.
    let states = match protocol {
        Protocol::Tcp => StateFlags::LISTEN,
        Protocol::Udp => StateFlags::CLOSE,
    };
    let mut diag = Diag::open()?;
    let mut all = Vec::new();
    for family in [Family::Ipv4, Family::Ipv6] {
        diag.dump(protocol, family, states.clone(), &mut all)?;
    }
    Ok(all)
}

/// The sockets of `sockets` (as [`listening`] sorts them) bound to one
/// address and port, group by group. Several TCP listeners on one address
/// are a SO_REUSEPORT group; several UDP sockets are SO_REUSEPORT or
/// SO_REUSEADDR binds (sock_diag does not say which). sk_lookup assigning
/// any member of a reuseport group still lets the kernel pick among the
/// group (unless the program passes BPF_SK_LOOKUP_F_NO_REUSEPORT).
pub fn groups(sockets: &[DiagSocket]) -> impl Iterator<Item = &[DiagSocket]> {
    sockets.chunk_by(|a, b| (a.family, a.local) == (b.family, b.local))
}

/// The socket with `cookie` in this network namespace, TCP or UDP.
pub fn by_cookie(cookie: u64) -> Result<Option<DiagSocket>> {
    Ok(by_cookies(&[cookie])?.remove(&cookie))
}

/// The sockets of this network namespace with any of `cookies`, from one
/// dump per protocol and family.
pub fn by_cookies(cookies: &[u64]) -> Result<BTreeMap<u64, DiagSocket>> {
    let wanted: HashSet<u64> = cookies.iter().copied().collect();
    let mut out = BTreeMap::new();
    if wanted.is_empty() {
        return Ok(out);
    }
    for protocol in [Protocol::Tcp, Protocol::Udp] {
        out.extend(sockets(protocol)?.into_iter().filter(|s| wanted.contains(&s.cookie)).map(|s| (s.cookie, s)));
    }
    Ok(out)
}

/// How a socket's bind covers an address: ranked as the kernel ranks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cover {
    Exact,
    Wildcard,
}

/// How `s` (its family, local address and v6only) covers `addr`:`port`,
/// `addr` being canonical (IPv4 rather than v4-mapped).
fn cover(s: &DiagSocket, addr: IpAddr, port: u16) -> Option<Cover> {
    if s.local.port() != port {
        return None;
    }
    let wild = |unspecified: bool| unspecified.then_some(Cover::Wildcard);
    match (addr, s.local.ip()) {
        (IpAddr::V4(a), IpAddr::V4(l)) if l == a => Some(Cover::Exact),
        (IpAddr::V4(_), IpAddr::V4(l)) => wild(l.is_unspecified()),
        (IpAddr::V4(_), IpAddr::V6(_)) if s.v6only == Some(true) => None,
        (IpAddr::V4(a), IpAddr::V6(l)) if l.to_ipv4_mapped() == Some(a) => Some(Cover::Exact),
        (IpAddr::V4(_), IpAddr::V6(l)) => wild(l.is_unspecified()),
        (IpAddr::V6(a), IpAddr::V6(l)) if l == a => Some(Cover::Exact),
        (IpAddr::V6(_), IpAddr::V6(l)) => wild(l.is_unspecified()),
        (IpAddr::V6(_), IpAddr::V4(_)) => None,
    }
}

/// The steerable sockets of `all` in the best [`Cover`] rank for
/// `addr`:`port`, sorted by (family, local, inode).
fn best_matches(all: Vec<DiagSocket>, addr: IpAddr, port: u16) -> Vec<DiagSocket> {
    let ranked: Vec<(Cover, DiagSocket)> =
        all.into_iter().filter(DiagSocket::steerable).filter_map(|s| Some((cover(&s, addr, port)?, s))).collect();
    let Some(best) = ranked.iter().map(|(c, _)| *c).min() else { return Vec::new() };
    let mut out: Vec<DiagSocket> = ranked.into_iter().filter(|(c, _)| *c == best).map(|(_, s)| s).collect();
    out.sort_by_key(|s| (s.family, s.local, s.inode));
    out
}

/// The kernel writes the cookie as two host-order u32s, low half first.
fn cookie(raw: [u8; 8]) -> u64 {
    let half = |b: &[u8]| u64::from(u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    half(&raw[4..]) << 32 | half(&raw[..4])
}

pub fn decode(response: &InetResponse, protocol: Protocol) -> Option<DiagSocket> {
    let header = &response.header;
    let id = &header.socket_id;
    let remote = SocketAddr::new(id.destination_address, id.destination_port);
    Some(DiagSocket {
        protocol,
        family: Family::from_af(header.family)?,
        local: SocketAddr::new(id.source_address, id.source_port),
        remote: (remote.port() != 0 || !remote.ip().is_unspecified()).then_some(remote),
        state: header.state,
        inode: header.inode.into(),
        cookie: cookie(id.cookie),
        uid: header.uid,
        v6only: response.nlas.iter().find_map(|n| match n {
            Nla::SkV6Only(v) => Some(*v),
            _ => None,
        }),
        cgroup_id: response.nlas.iter().find_map(|n| match n {
            Nla::Other(attr) if NlaTrait::kind(attr) == INET_DIAG_CGROUP_ID && NlaTrait::value_len(attr) == 8 => {
                let mut value = [0u8; 8];
                NlaTrait::emit_value(attr, &mut value);
                Some(u64::from_ne_bytes(value))
            }
            _ => None,
        }),
    })
}

/// How long one read of a dump may wait before the kernel is deemed stuck.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for one read: the kernel fills at most 32 KiB per dump message batch.
const RECV_BUFFER: usize = 64 * 1024;
/// Reads per dump before giving up (at least one socket per read).
const MAX_READS: usize = 1 << 20;

/// A NETLINK_SOCK_DIAG socket, made in the calling thread's namespace.
struct Diag {
    socket: Socket,
    sequence: u32,
    buffer: Vec<u8>,
}

impl Diag {
    fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_SOCK_DIAG).context("opening a NETLINK_SOCK_DIAG socket")?;
        socket.bind_auto().context("binding the sock_diag socket")?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0)).context("connecting the sock_diag socket")?;
        rustix::net::sockopt::set_socket_timeout(&socket, rustix::net::sockopt::Timeout::Recv, Some(RECV_TIMEOUT))
            .map_err(std::io::Error::from)
            .context("setting the sock_diag socket's receive timeout")?;
        Ok(Diag { socket, sequence: 0, buffer: Vec::with_capacity(RECV_BUFFER) })
    }

    /// Appends the dump of `protocol` sockets of `family` in `states` to `out`.
    fn dump(
        &mut self,
        protocol: Protocol,
        family: Family,
        states: StateFlags,
        out: &mut Vec<DiagSocket>,
    ) -> Result<()> {
        let what = || format!("dumping {protocol} {family} sockets with sock_diag");
        self.sequence += 1;
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.sequence;
        let request = InetRequest {
            family: family.af(),
            protocol: protocol.number(),
            extensions: ExtensionFlags::empty(),
            states,
            socket_id: match family {
                Family::Ipv4 => SocketId::new_v4(),
                Family::Ipv6 => SocketId::new_v6(),
            },
        };
        let mut message = NetlinkMessage::new(header, SockDiagMessage::InetRequest(request).into());
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        self.socket.send(&bytes, 0).with_context(what)?;
        for _ in 0..MAX_READS {
            self.buffer.clear();
            let len = match self.socket.recv(&mut self.buffer, libc::MSG_TRUNC) {
                Ok(len) => len,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    fail!(Kernel, "{}: no reply within {RECV_TIMEOUT:?}", what())
                }
                Err(e) => return Err(e).with_context(what),
            };
            if len > self.buffer.len() {
                fail!(Kernel, "{}: a {len}-byte read exceeds the {RECV_BUFFER}-byte buffer", what());
            }
            if self.parse(len, protocol, out).with_context(what)? {
                return Ok(());
            }
        }
        fail!(Kernel, "{}: no end of dump after {MAX_READS} reads", what())
    }

    /// Decodes the messages of one read; true at the end of the dump.
    fn parse(&self, len: usize, protocol: Protocol, out: &mut Vec<DiagSocket>) -> Result<bool> {
        let mut offset = 0;
        // Bounded: each message moves `offset` on by at least its header.
        while offset < len {
            let message = NetlinkMessage::<SockDiagMessage>::deserialize(&self.buffer[offset..len])
                .map_err(|e| Error::Kernel(format!("undecodable sock_diag reply: {e}")))?;
            let size = message.header.length as usize;
            if size < 16 {
                fail!(Kernel, "sock_diag reply with a {size}-byte message");
            }
            offset += size.next_multiple_of(4);
            if message.header.sequence_number != self.sequence {
                continue;
            }
            match message.payload {
                NetlinkPayload::Done(_) => return Ok(true),
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    let err = e.to_io();
                    if err.raw_os_error() == Some(libc::ENOENT) {
                        fail!(
                            Kernel,
                            "this kernel has no sock_diag for {protocol} sockets: `modprobe {protocol}_diag` \
                             (CONFIG_INET_{}_DIAG)",
                            protocol.to_string().to_uppercase()
                        );
                    }
                    return Err(err.into());
                }
                NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                    out.extend(decode(&response, protocol));
                }
                _ => {}
            }
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::Parseable;

    use super::*;

    fn sock(protocol: Protocol, local: &str, v6only: Option<bool>) -> DiagSocket {
        let local: SocketAddr = local.parse().unwrap();
        DiagSocket {
            protocol,
            family: if local.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 },
            local,
            remote: None,
            state: if protocol == Protocol::Tcp { TCP_LISTEN } else { TCP_CLOSE },
            inode: 1,
            cookie: 1,
            uid: 0,
            v6only,
            cgroup_id: None,
        }
    }

    fn tcp(local: &str) -> DiagSocket {
        sock(Protocol::Tcp, local, if local.starts_with('[') { Some(false) } else { None })
    }

    #[test]
    fn cover_ranks_exact_before_wildcard_and_honours_v6only() {
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(cover(&tcp("192.0.2.1:80"), v4, 80), Some(Cover::Exact));
        assert_eq!(cover(&tcp("192.0.2.1:80"), v4, 81), None);
        assert_eq!(cover(&tcp("192.0.2.2:80"), v4, 80), None);
        assert_eq!(cover(&tcp("0.0.0.0:80"), v4, 80), Some(Cover::Wildcard));
        assert_eq!(cover(&tcp("[::ffff:192.0.2.1]:80"), v4, 80), Some(Cover::Exact));
        assert_eq!(cover(&tcp("[::]:80"), v4, 80), Some(Cover::Wildcard));
        assert_eq!(cover(&sock(Protocol::Tcp, "[::]:80", Some(true)), v4, 80), None);
        assert_eq!(cover(&tcp("[2001:db8::1]:80"), v4, 80), None);
        assert_eq!(cover(&tcp("[2001:db8::1]:80"), v6, 80), Some(Cover::Exact));
        assert_eq!(cover(&sock(Protocol::Tcp, "[::]:80", Some(true)), v6, 80), Some(Cover::Wildcard));
        assert_eq!(cover(&tcp("0.0.0.0:80"), v6, 80), None);
        assert_eq!(cover(&tcp("[::ffff:192.0.2.1]:80"), v6, 80), None);
        // The unspecified address asks for the wildcard binds themselves.
        assert_eq!(cover(&tcp("0.0.0.0:80"), IpAddr::V4(Ipv4Addr::UNSPECIFIED), 80), Some(Cover::Exact));
        assert_eq!(cover(&tcp("[::]:80"), IpAddr::V6(Ipv6Addr::UNSPECIFIED), 80), Some(Cover::Exact));
    }

    #[test]
    fn best_matches_keep_one_rank_and_only_steerable_sockets() {
        let mut connected = sock(Protocol::Udp, "127.0.0.1:53", None);
        connected.remote = Some("127.0.0.1:4000".parse().unwrap());
        let mut not_listening = tcp("127.0.0.1:80");
        not_listening.state = TCP_CLOSE;
        let mut second = tcp("0.0.0.0:80");
        second.inode = 0;
        let all = vec![tcp("[::]:80"), tcp("0.0.0.0:80"), second.clone(), not_listening.clone()];
        let addr: IpAddr = "127.0.0.1".parse().unwrap();
        let found = best_matches(all, addr, 80);
        assert_eq!(found, vec![second, tcp("0.0.0.0:80"), tcp("[::]:80")]);
        assert_eq!(groups(&found).map(<[_]>::len).collect::<Vec<_>>(), [2, 1]);
        let exact = best_matches(vec![tcp("0.0.0.0:80"), tcp("127.0.0.1:80")], addr, 80);
        assert_eq!(exact, vec![tcp("127.0.0.1:80")]);
        let udp = vec![connected, sock(Protocol::Udp, "127.0.0.1:53", None)];
        assert_eq!(best_matches(udp, addr, 53), vec![sock(Protocol::Udp, "127.0.0.1:53", None)]);
    }

    /// An inet_diag_msg as the kernel writes it, with one INET_DIAG_SKV6ONLY.
    fn kernel_message(cookie: u64) -> Vec<u8> {
        let mut m = vec![libc::AF_INET6 as u8, TCP_LISTEN, 0, 0];
        m.extend(8080u16.to_be_bytes()); // sport
        m.extend(0u16.to_be_bytes()); // dport
        m.extend("2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        m.extend([0; 16]); // dst
        m.extend(0u32.to_ne_bytes()); // interface
        m.extend((cookie as u32).to_ne_bytes());
        m.extend(((cookie >> 32) as u32).to_ne_bytes());
        for field in [0u32, 0, 0, 1000, 424242] {
            // expires, rqueue, wqueue, uid, inode
            m.extend(field.to_ne_bytes());
        }
        m.extend(5u16.to_ne_bytes()); // nla_len
        m.extend(11u16.to_ne_bytes()); // INET_DIAG_SKV6ONLY
        m.extend([1, 0, 0, 0]);
        m
    }

    #[test]
    fn decode_reads_a_kernel_message() {
        let bytes = kernel_message(0x0123_4567_89ab_cdef);
        let response = InetResponse::parse(&bytes[..]).unwrap();
        let s = decode(&response, Protocol::Tcp).unwrap();
        assert_eq!(s.family, Family::Ipv6);
        assert_eq!(s.local, "[2001:db8::7]:8080".parse().unwrap());
        assert_eq!(s.remote, None);
        assert_eq!((s.state, s.uid, s.inode), (TCP_LISTEN, 1000, 424242));
        assert_eq!(s.cookie, 0x0123_4567_89ab_cdef);
        assert_eq!(s.v6only, Some(true));
        assert!(s.steerable());
        let info = s.info(99);
        assert!(info.listening && info.v6only && !info.connected);
        assert_eq!((info.netns_inode, info.local), (99, Some(s.local)));
    }
}
