//! The kernel/userspace ABI of steer, defined once: every map's name and
//! shape, every key and value layout, the sk_lookup context, and the
//! constants both sides compute with.
//!
//! `dispatch-ebpf` (the BPF program) declares its maps by expanding
//! [`for_each_map!`]; the `steer` library opens the pins and checks them
//! against [`MAPS`], built from the same list. With the `user` feature the
//! types implement `aya::Pod`, so aya's typed maps carry them.
#![no_std]

use core::mem::{offset_of, size_of};

/// Kernel constants (uapi linux/bpf.h, linux/socket.h, linux/in.h).
pub mod kernel {
    pub const BPF_MAP_TYPE_HASH: u32 = 1;
    pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
    pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
    pub const BPF_MAP_TYPE_SOCKHASH: u32 = 18;
    pub const BPF_F_NO_PREALLOC: u32 = 1;
    pub const AF_INET: u32 = 2;
    pub const AF_INET6: u32 = 10;
    pub const IPPROTO_TCP: u32 = 6;
    pub const IPPROTO_UDP: u32 = 17;
    pub const SK_DROP: u32 = 0;
    pub const SK_PASS: u32 = 1;
}

/// Names of the programs in the object and of the link pin.
pub mod names {
    /// What steerctl loads: labelled bindings, then the seed port list.
    pub const STEER_PROGRAM: &str = "steer_dispatch";
    /// The seed's program alone, for `bpftool prog loadall` users.
    pub const ECHO_PROGRAM: &str = "echo_dispatch";
    pub const LINK: &str = "steer_dispatch_link";
}

/// Distinct labels; ids are 0..MAX_LABELS.
pub const MAX_LABELS: u32 = 4096;
/// Bindings in one binding set.
pub const MAX_BINDINGS: u32 = 1 << 20;
/// Prefix lengths a lookup may probe: 0..=128 in the v4-mapped space.
pub const MAX_LENGTHS: usize = 129;
/// A label has at most one socket per (family, protocol).
pub const SOCKETS_PER_LABEL: u32 = 4;
/// Ports the seed's `echo_ports` can list.
pub const MAX_SEED_PORTS: u32 = 1024;
/// Longest label name, in bytes (the key keeps a terminating NUL).
pub const MAX_LABEL_LEN: usize = LabelName::SIZE - 1;

/// The kernel's `struct bpf_sk_lookup`: the program's context, and the
/// context of a `BPF_PROG_TEST_RUN`. The kernel recognises the context
/// type in BTF by this name. Addresses are in network order, `local_port`
/// in host order, `remote_port` in network order.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct bpf_sk_lookup {
    /// `sk` on input (zero for a test run); the assigned socket's cookie on output.
    pub cookie: u64,
    pub family: u32,
    pub protocol: u32,
    pub remote_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub remote_port: u16,
    pub _remote_port_pad: u16,
    pub local_ip4: u32,
    pub local_ip6: [u32; 4],
    pub local_port: u32,
    /// Must stay zero in a test run, like the padding after it.
    pub ingress_ifindex: u32,
    pub _tail_pad: u32,
}

pub type SkLookupCtx = bpf_sk_lookup;

/// Binding key: one hash entry per (protocol, prefix length, port, masked
/// address), IPv4 as v4-mapped IPv6 (its /N is /96+N here).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BindingKey {
    pub protocol: u8,
    /// In the v4-mapped space: 0..=128.
    pub prefixlen: u8,
    /// Big-endian; 0 is every port.
    pub port: [u8; 2],
    /// The address with every bit past `prefixlen` cleared.
    pub addr: [u8; 16],
}

impl BindingKey {
    /// The key for `addr` (v4-mapped or IPv6, network order) at `prefixlen`.
    #[inline(always)]
    pub fn new(protocol: u8, prefixlen: u8, port: u16, addr: [u8; 16]) -> Self {
        let (hi, lo) =
            mask(u64::from_be_bytes(split(&addr, 0)), u64::from_be_bytes(split(&addr, 8)), u32::from(prefixlen));
        let mut masked = [0u8; 16];
        masked[..8].copy_from_slice(&hi.to_be_bytes());
        masked[8..].copy_from_slice(&lo.to_be_bytes());
        Self { protocol, prefixlen, port: port.to_be_bytes(), addr: masked }
    }

    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

#[inline(always)]
fn split(addr: &[u8; 16], at: usize) -> [u8; 8] {
    let mut half = [0u8; 8];
    half.copy_from_slice(&addr[at..at + 8]);
    half
}

/// An address (as two big-endian halves) with all but its first `len` bits cleared.
#[inline(always)]
pub fn mask(hi: u64, lo: u64, len: u32) -> (u64, u64) {
    let hi_mask = if len >= 64 {
        u64::MAX
    } else if len == 0 {
        0
    } else {
        u64::MAX << (64 - len)
    };
    let lo_mask = if len >= 128 {
        u64::MAX
    } else if len <= 64 {
        0
    } else {
        u64::MAX << (128 - len)
    };
    (hi & hi_mask, lo & lo_mask)
}

/// The prefix lengths in use, longest first. A lookup probes only these.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixLengths {
    pub count: u32,
    /// `count` lengths, longest first; the rest is zero (3 bytes of padding).
    pub lengths: [u8; 132],
}

impl Default for PrefixLengths {
    fn default() -> Self {
        Self { count: 0, lengths: [0; 132] }
    }
}

impl PrefixLengths {
    /// The lengths in use, longest first (`count` capped at [`MAX_LENGTHS`]).
    pub fn as_slice(&self) -> &[u8] {
        &self.lengths[..(self.count as usize).min(MAX_LENGTHS)]
    }
}

/// `active_bindings`' single value: bit 0 is the binding set in use, bit 1
/// the version of its length list. Both live in one word so one write
/// switches both.
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActiveBindings(pub u32);

impl ActiveBindings {
    pub fn new(set: u32, version: u32) -> Self {
        Self((set & 1) | (version & 1) << 1)
    }
    #[inline(always)]
    pub fn set(self) -> u32 {
        self.0 & 1
    }
    #[inline(always)]
    pub fn version(self) -> u32 {
        (self.0 >> 1) & 1
    }
    /// The `binding_lengths` slot of the list lookups probe now.
    #[inline(always)]
    pub fn lengths_slot(self) -> u32 {
        lengths_slot(self.set(), self.version())
    }
}

/// Where in `binding_lengths` the list of binding set `set`, copy
/// `version`, lives: two copies per set, so a new list is written to the
/// idle copy and switched in, never rewritten under a running lookup.
#[inline(always)]
pub fn lengths_slot(set: u32, version: u32) -> u32 {
    set * 2 + version
}

/// A label's socket for one address family and transport.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SocketKey {
    pub label_id: u32,
    /// AF_INET or AF_INET6.
    pub family: u8,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    pub _pad: [u8; 2],
}

impl SocketKey {
    #[inline(always)]
    pub fn new(label_id: u32, family: u8, protocol: u8) -> Self {
        Self { label_id, family, protocol, _pad: [0; 2] }
    }
}

/// Per-label counters, one copy per CPU.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LabelMetrics {
    /// Connections matched to a binding of the label.
    pub lookups: u64,
    /// Matched, but the label has no socket.
    pub misses: u64,
    /// bpf_sk_assign refused the label's socket.
    pub errors: u64,
}

/// A label name as the `labels` map stores it: NUL padded.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelName(pub [u8; LabelName::SIZE]);

impl LabelName {
    pub const SIZE: usize = 64;

    /// The stored name, up to its first NUL.
    pub fn as_bytes(&self) -> &[u8] {
        let end = self.0.iter().position(|&b| b == 0).unwrap_or(Self::SIZE);
        &self.0[..end]
    }
}

// Sizes and offsets the kernel (context) or the pinned maps (keys and
// values) fix; a change here is a change of the on-disk state format.
const _: () = {
    assert!(size_of::<bpf_sk_lookup>() == 72);
    assert!(offset_of!(bpf_sk_lookup, remote_port) == 36);
    assert!(offset_of!(bpf_sk_lookup, local_ip4) == 40);
    assert!(offset_of!(bpf_sk_lookup, local_port) == 60);
    assert!(offset_of!(bpf_sk_lookup, ingress_ifindex) == 64);
    assert!(size_of::<BindingKey>() == 20);
    assert!(offset_of!(BindingKey, port) == 2);
    assert!(offset_of!(BindingKey, addr) == 4);
    assert!(size_of::<PrefixLengths>() == 136);
    assert!(size_of::<ActiveBindings>() == 4);
    assert!(size_of::<SocketKey>() == 8);
    assert!(offset_of!(SocketKey, family) == 4);
    assert!(size_of::<LabelMetrics>() == 24);
    assert!(size_of::<LabelName>() == 64);
    assert!(MAX_LENGTHS <= 132);
};

/// Calls `$callback!` with every map of the dispatcher, one
/// `IDENT, "name", TYPE, Key, Value, max_entries, flags;` line each: the one
/// list both the BPF program's map definitions and userspace's checks are
/// made from. Every map is pinned by name in the state directory.
#[macro_export]
macro_rules! for_each_map {
    ($callback:ident) => {
        $callback! {
            // The seed's maps, names and layouts as the seed C program has
            // them (bpftool-compatible): ports to steer (host order) -> unused,
            // and the one socket serving them at key 0 (a u64 value lets
            // userspace read the socket cookie back).
            ECHO_PORTS, "echo_ports", BPF_MAP_TYPE_HASH, u16, u8, $crate::MAX_SEED_PORTS, 0;
            ECHO_SOCKET, "echo_socket", BPF_MAP_TYPE_SOCKMAP, u32, u64, 1, 0;
            // Two binding sets so `load-bindings` fills the idle one and
            // switches with one write to `active_bindings`. Values are label ids.
            BINDINGS_0, "bindings_0", BPF_MAP_TYPE_HASH, $crate::BindingKey, u32, $crate::MAX_BINDINGS, $crate::kernel::BPF_F_NO_PREALLOC;
            BINDINGS_1, "bindings_1", BPF_MAP_TYPE_HASH, $crate::BindingKey, u32, $crate::MAX_BINDINGS, $crate::kernel::BPF_F_NO_PREALLOC;
            // Two length lists per set, at `lengths_slot(set, version)`.
            BINDING_LENGTHS, "binding_lengths", BPF_MAP_TYPE_ARRAY, u32, $crate::PrefixLengths, 4, 0;
            ACTIVE_BINDINGS, "active_bindings", BPF_MAP_TYPE_ARRAY, u32, $crate::ActiveBindings, 1, 0;
            SOCKETS, "sockets", BPF_MAP_TYPE_SOCKHASH, $crate::SocketKey, u64, $crate::MAX_LABELS * $crate::SOCKETS_PER_LABEL, 0;
            METRICS, "metrics", BPF_MAP_TYPE_PERCPU_ARRAY, u32, $crate::LabelMetrics, $crate::MAX_LABELS, 0;
            // Label name -> id. Only userspace reads it; it lives here so it
            // is pinned beside the rest of the state.
            LABELS, "labels", BPF_MAP_TYPE_HASH, $crate::LabelName, u32, $crate::MAX_LABELS, 0;
        }
    };
}

/// The shape of one pinned map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSpec {
    pub name: &'static str,
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

macro_rules! map_specs {
    ($($ident:ident, $name:literal, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr;)*) => {
        /// Every map of the dispatcher, in the object's order.
        pub const MAPS: &[MapSpec] = &[$(MapSpec {
            name: $name,
            map_type: kernel::$type,
            key_size: size_of::<$key>() as u32,
            value_size: size_of::<$value>() as u32,
            max_entries: $max,
            flags: $flags,
        }),*];

        /// Map names, for userspace.
        pub mod map {
            $(pub const $ident: &str = $name;)*
        }
    };
}

for_each_map!(map_specs);

/// The spec of the map called `name`.
pub fn map_spec(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name.as_bytes() == name.as_bytes())
}

#[cfg(feature = "user")]
mod pod {
    // Safety: each is repr(C) plain old data with no implicit padding
    // (checked by the size assertions above), so every byte is initialised
    // and every bit pattern is a valid value.
    unsafe impl aya::Pod for super::BindingKey {}
    unsafe impl aya::Pod for super::PrefixLengths {}
    unsafe impl aya::Pod for super::ActiveBindings {}
    unsafe impl aya::Pod for super::SocketKey {}
    unsafe impl aya::Pod for super::LabelMetrics {}
    unsafe impl aya::Pod for super::LabelName {}
    unsafe impl aya::Pod for super::bpf_sk_lookup {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_mask_host_bits() {
        let addr = [0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let key = BindingKey::new(6, 32, 443, addr);
        assert_eq!(key.addr, [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!((key.port, key.port()), ([1, 187], 443));
        assert_eq!(BindingKey::new(6, 128, 0, addr).addr, addr);
        assert_eq!(BindingKey::new(6, 0, 0, addr).addr, [0; 16]);
        // Lengths past 64 keep the whole high half.
        assert_eq!(
            BindingKey::new(6, 65, 0, [0xff; 16]).addr[..9],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x80]
        );
    }

    #[test]
    fn active_state_round_trips_and_names_its_slot() {
        for (set, version) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let state = ActiveBindings::new(set, version);
            assert_eq!((state.set(), state.version()), (set, version));
            assert_eq!(state.lengths_slot(), set * 2 + version);
        }
        let slots = MAPS.iter().find(|m| m.name == map::BINDING_LENGTHS).unwrap().max_entries;
        assert_eq!(lengths_slot(1, 1), slots - 1);
    }

    #[test]
    fn specs_name_every_map_once() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(MAPS[i + 1..].iter().all(|n| n.name != m.name), "{} twice", m.name);
            assert!(m.name.len() < 16, "{}: kernel map names hold 15 bytes", m.name);
        }
        assert_eq!(map_spec("sockets").unwrap().key_size, 8);
        assert!(map_spec("nope").is_none());
        // The seed's layouts, which bpftool users rely on.
        let ports = map_spec(map::ECHO_PORTS).unwrap();
        assert_eq!((ports.map_type, ports.key_size, ports.value_size), (kernel::BPF_MAP_TYPE_HASH, 2, 1));
        let socket = map_spec(map::ECHO_SOCKET).unwrap();
        assert_eq!((socket.map_type, socket.key_size, socket.value_size), (kernel::BPF_MAP_TYPE_SOCKMAP, 4, 8));
    }

    #[test]
    fn label_names_stop_at_the_first_nul() {
        let mut name = LabelName([0; LabelName::SIZE]);
        name.0[..3].copy_from_slice(b"web");
        assert_eq!(name.as_bytes(), b"web");
        assert_eq!(LabelName([b'x'; LabelName::SIZE]).as_bytes().len(), 64);
    }
}
