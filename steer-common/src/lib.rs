//! The kernel/userspace ABI of steer, defined once: every map's name and
//! shape, every key and value layout, the sk_lookup context, the constants
//! both sides compute with, and the lookup algorithm itself ([`lookup`]).
//!
//! `dispatch-ebpf` (the BPF program) declares its maps by expanding
//! [`for_each_map!`]; the `steer` library opens the pins and checks them
//! against [`MAPS`], built from the same list. With the `user` feature the
//! types implement `aya::Pod`, so aya's typed maps carry them.
#![no_std]

pub mod lookup;

use core::mem::{offset_of, size_of};

/// Kernel constants (uapi linux/bpf.h, linux/socket.h, linux/in.h, errno).
pub mod kernel {
    pub const BPF_MAP_TYPE_HASH: u32 = 1;
    pub const BPF_MAP_TYPE_ARRAY: u32 = 2;
    pub const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
    pub const BPF_MAP_TYPE_ARRAY_OF_MAPS: u32 = 12;
    pub const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
    pub const BPF_MAP_TYPE_RINGBUF: u32 = 27;
    pub const BPF_ANY: u64 = 0;
    pub const BPF_NOEXIST: u64 = 1;
    /// `bpf_sock_ops.op` when a socket starts listening (inside listen()).
    pub const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
    pub const BPF_F_NO_PREALLOC: u32 = 1;
    pub const BPF_F_MMAPABLE: u32 = 1 << 10;
    pub const AF_INET: u32 = 2;
    pub const AF_INET6: u32 = 10;
    pub const IPPROTO_TCP: u32 = 6;
    pub const IPPROTO_UDP: u32 = 17;
    pub const SK_DROP: u32 = 0;
    pub const SK_PASS: u32 = 1;
    pub const EEXIST: i64 = 17;
    pub const ENOENT: i64 = 2;
    pub const EPROTOTYPE: i64 = 91;
    pub const ESOCKTNOSUPPORT: i64 = 94;
    pub const EAFNOSUPPORT: i64 = 97;
}

/// Names of the programs in the object and of the link pin.
pub mod names {
    /// What steerctl loads: labelled bindings, then the seed port list.
    pub const STEER_PROGRAM: &str = "steer_dispatch";
    /// The seed's program alone, for `bpftool prog loadall` users.
    pub const ECHO_PROGRAM: &str = "echo_dispatch";
    /// Returns SK_PASS and nothing else: steer-bench's baseline.
    pub const PASS_PROGRAM: &str = "steer_pass";
    /// sock_ops: puts a followed listener in its label's slot inside listen().
    pub const FOLLOW_PROGRAM: &str = "steer_follow";
    /// cgroup post_bind4/6: reports a followed UDP bind.
    pub const FOLLOW_BIND4_PROGRAM: &str = "steer_follow_bind4";
    pub const FOLLOW_BIND6_PROGRAM: &str = "steer_follow_bind6";
    /// Iterators: insert the sockets `backfill` names (by cookie).
    pub const BACKFILL_TCP_PROGRAM: &str = "steer_backfill_tcp";
    pub const BACKFILL_UDP_PROGRAM: &str = "steer_backfill_udp";
    /// Globals the follow programs are loaded with: which scope they are
    /// (the cgroup they are attached to), and the namespace they serve.
    pub const SCOPE_GLOBAL: &str = "STEER_SCOPE";
    pub const NETNS_COOKIE_GLOBAL: &str = "STEER_NETNS_COOKIE";
    pub const LINK: &str = "steer_dispatch_link";
}

/// Distinct labels; ids are 0..MAX_LABELS.
pub const MAX_LABELS: u32 = 4096;
/// Counter sets: one per (label, traffic family, protocol) some binding can reach.
pub const MAX_DESTINATIONS: u32 = 8192;
/// Bindings in one binding set.
pub const MAX_BINDINGS: u32 = 1 << 20;
/// A binding record's slots when made; it is replaced by a larger copy as
/// it fills (past 7/8 of its slots), up to MAX_RECORD_SLOTS.
pub const RECORD_INITIAL_CAPACITY: u32 = 1024;
/// The most slots a record has: room for MAX_BINDINGS at 7/8 full, in
/// whole 1,024s.
pub const MAX_RECORD_SLOTS: u32 = (MAX_BINDINGS as u64 * 8 / 7 / 1024 + 1) as u32 * 1024;
/// Ports the seed's `echo_ports` can list.
pub const MAX_SEED_PORTS: u32 = 1024;
/// Longest label name, in bytes (the key keeps a terminating NUL).
pub const MAX_LABEL_LEN: usize = LabelName::SIZE - 1;

/// Entries in each chunk (inner map) of the directory and of the ranges.
pub const CHUNK_ENTRIES: u32 = 2048;
/// Directory keys: exact-port segments first (protocol, port), then
/// wildcard buckets (protocol, family, top 16 bits).
pub const PORT_KEYS_BASE: u32 = 0;
pub const BUCKET_KEYS_BASE: u32 = 2 << 16;
pub const DIR_KEYS: u32 = BUCKET_KEYS_BASE + (4 << 16);
/// Directory chunks in each half of `steer_dirs`.
pub const DIR_CHUNKS: u32 = DIR_KEYS / CHUNK_ENTRIES;
/// Range chunks in each half of `steer_ranges`.
pub const RANGE_CHUNKS: u32 = 1536;
/// Ranges one generation can hold.
pub const MAX_RANGES: u32 = RANGE_CHUNKS * CHUNK_ENTRIES;
/// Binary-search halvings that always cover a segment (2^22 > MAX_RANGES).
pub const MAX_SEARCH_STEPS: u32 = 22;

/// Socket slots: four per label, one per (socket family, protocol).
pub const SOCKET_SLOTS: u32 = MAX_LABELS * 4;
/// Sockets one slot holds: members of a SO_REUSEPORT group (or a restarted
/// server's old and new sockets), tried in order, so one closing leaves the
/// others serving.
pub const SLOT_MEMBERS: u32 = 8;
/// Entries of `sockets`: SLOT_MEMBERS per slot.
pub const SOCKET_MEMBERS: u32 = SOCKET_SLOTS * SLOT_MEMBERS;

/// Listening addresses the kernel follows (`follows` keys).
pub const MAX_FOLLOWS: u32 = 4096;
/// Registrations one listening address can serve (a wildcard listener
/// covers several addresses' registrations).
pub const FOLLOW_ENTRIES: usize = 4;
/// cgroups the follow programs can be attached to, the root included.
pub const MAX_SCOPES: u32 = 64;
/// Sockets one backfill pass can insert.
pub const MAX_BACKFILL: u32 = 1024;
/// Bytes of the follow event ring buffer (a power of two, pages).
pub const FOLLOW_EVENT_BYTES: u32 = 1 << 16;

/// Tracers (`steerctl trace`) that can run at once: slots of the `trace_*` maps.
pub const MAX_TRACERS: u32 = 8;
/// Bytes of each tracer's ring buffer (a power of two, pages): 3,640
/// events of [`TraceEvent`] (64 bytes) with their 8-byte headers.
pub const TRACE_RING_BYTES: u32 = 1 << 18;
/// Labels one tracer's kernel-side filter can name.
pub const TRACE_FILTER_LABELS: usize = 4;

/// `socket_flags` bits, per socket slot.
pub mod socket_flag {
    /// Assign exactly the registered socket, not the SO_REUSEPORT group it
    /// belongs to (BPF_SK_LOOKUP_F_NO_REUSEPORT).
    pub const NO_REUSEPORT: u32 = 1;
}

/// `bpf_sk_assign` flags the program uses.
pub const BPF_SK_LOOKUP_F_NO_REUSEPORT: u64 = 1 << 1;

/// The `sockets` slot of a label's socket of one family and protocol.
#[inline(always)]
pub fn socket_slot(label: u32, family_index: u32, protocol_index: u32) -> u32 {
    label * 4 + family_index * 2 + protocol_index
}

/// The `sockets` key of member `member` of socket slot `slot`.
#[inline(always)]
pub fn member_key(slot: u32, member: u32) -> u32 {
    slot * SLOT_MEMBERS + member
}

/// The `steer_dirs` slot holding directory key `key` of half `half`.
#[inline(always)]
pub fn dir_slot(half: u32, key: u32) -> u32 {
    half * DIR_CHUNKS + key / CHUNK_ENTRIES
}

/// The `steer_ranges` slot holding range `index` of half `half`.
#[inline(always)]
pub fn range_slot(half: u32, index: u32) -> u32 {
    half * RANGE_CHUNKS + index / CHUNK_ENTRIES
}

/// The kernel's `struct bpf_sk_lookup`: the program's context, and the
/// context of a `BPF_PROG_TEST_RUN`. The kernel recognises the context
/// type in BTF by this name. Addresses are in network order, `local_port`
/// in host order, `remote_port` in network order.
#[allow(non_camel_case_types)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
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

/// The leading fields of the kernel's `struct bpf_sock_ops`, a sock_ops
/// program's context (only these are read). Addresses in network order,
/// `local_port` in host order.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct bpf_sock_ops {
    pub op: u32,
    pub args: [u32; 4],
    pub family: u32,
    pub remote_ip4: u32,
    pub local_ip4: u32,
    pub remote_ip6: [u32; 4],
    pub local_ip6: [u32; 4],
    pub remote_port: u32,
    pub local_port: u32,
}

/// The leading fields of the kernel's `struct bpf_sock`, a cgroup sock
/// (post_bind) program's context. `src_port` in host order.
#[allow(non_camel_case_types)]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct bpf_sock {
    pub bound_dev_if: u32,
    pub family: u32,
    pub r#type: u32,
    pub protocol: u32,
    pub mark: u32,
    pub priority: u32,
    pub src_ip4: u32,
    pub src_ip6: [u32; 4],
    pub src_port: u32,
}

/// What a lookup resolves to: the label whose socket takes the connection,
/// the counter set it is counted in, and the prefix length (in the v4-mapped
/// space) of the binding that matched.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Answer {
    pub label: u32,
    pub dest: u16,
    pub len: u8,
    pub _pad: u8,
}

impl Answer {
    /// No binding covers the range.
    pub const NONE: u32 = u32::MAX;
    /// A bucket range no long prefix covers: the bucket's default applies.
    pub const DEFAULT: u32 = u32::MAX - 1;

    pub const fn none() -> Self {
        Self { label: Self::NONE, dest: 0, len: 0, _pad: 0 }
    }

    pub const fn new(label: u32, dest: u16, len: u8) -> Self {
        Self { label, dest, len, _pad: 0 }
    }
}

impl Default for Answer {
    fn default() -> Self {
        Self::none()
    }
}

/// One range of a segment: from `start` (big-endian halves of the v4-mapped
/// address) up to the next range's start.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Range {
    pub start: [u64; 2],
    pub answer: Answer,
}

/// A directory entry: the segment `start..start + count` of the ranges,
/// and for buckets the answer where no range of the segment decides.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirEntry {
    pub start: u32,
    pub count: u32,
    pub default: Answer,
}

impl DirEntry {
    /// No segment, no default: what an empty slot reads as.
    pub const NONE: DirEntry = DirEntry { start: 0, count: 0, default: Answer::none() };

    /// The entry as two 8-byte words: (start, count) and the default, each
    /// written and read with one access (a write of one binding changes one
    /// of them in place while lookups run).
    #[inline(always)]
    pub fn from_words(words: [u64; 2]) -> Self {
        // Safety: 16 bytes of plain integers either way (size asserted below).
        unsafe { core::mem::transmute::<[u64; 2], DirEntry>(words) }
    }

    #[inline(always)]
    pub fn words(self) -> [u64; 2] {
        // Safety: as above.
        unsafe { core::mem::transmute::<DirEntry, [u64; 2]>(self) }
    }
}

/// `steer_config`'s single value, read by every lookup. Each field is one
/// byte, so a write that changes one of them is seen whole or not at all.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// The half of `steer_dirs`/`steer_ranges` lookups use.
    pub active_half: u8,
    /// Non-zero: consult the seed's `echo_ports` when no binding applies.
    pub seed_enabled: u8,
    /// Non-zero: a tracer may be live; the program looks at the `trace_*`
    /// maps after each decision, and clears this when it finds no live
    /// tracer there (layout 5; a spare byte before).
    pub trace: u8,
    pub _pad: [u8; 5],
}

/// Why `bpf_sk_assign` refused a label's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorReason {
    /// The socket can no longer take connections (ESOCKTNOSUPPORT: not
    /// listening, or a connected UDP socket).
    BadSocket = 0,
    /// Another sk_lookup program already picked a socket (EEXIST).
    AlreadyAssigned = 1,
    /// The socket's protocol does not match (EPROTOTYPE).
    Protocol = 2,
    Other = 3,
}

impl ErrorReason {
    pub const ALL: [ErrorReason; 4] =
        [ErrorReason::BadSocket, ErrorReason::AlreadyAssigned, ErrorReason::Protocol, ErrorReason::Other];

    /// The reason for `bpf_sk_assign`'s return value `err` (negative errno).
    #[inline(always)]
    pub fn from_errno(err: i64) -> Self {
        match -err {
            kernel::ESOCKTNOSUPPORT => ErrorReason::BadSocket,
            kernel::EEXIST => ErrorReason::AlreadyAssigned,
            kernel::EPROTOTYPE => ErrorReason::Protocol,
            _ => ErrorReason::Other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ErrorReason::BadSocket => "bad_socket",
            ErrorReason::AlreadyAssigned => "already_assigned",
            ErrorReason::Protocol => "protocol",
            ErrorReason::Other => "other",
        }
    }
}

/// Counters of one destination (label, traffic family, protocol), one copy
/// per CPU.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DestMetrics {
    /// Connections matched to a binding of the label.
    pub lookups: u64,
    /// Matched, but the label has no socket for this family and protocol.
    pub misses: u64,
    /// bpf_sk_assign refused the socket, by [`ErrorReason`].
    pub errors: [u64; 4],
}

/// Counters of the seed's port list.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeedMetrics {
    /// Connections to a listed port.
    pub lookups: u64,
    /// Listed port, but no socket in `echo_socket`: dropped.
    pub misses: u64,
    /// bpf_sk_assign refused the socket: dropped.
    pub errors: u64,
}

/// What the program decided for one lookup, as a tracer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum TraceOutcome {
    /// A binding matched and the label's socket was assigned.
    Assigned = 0,
    /// A binding matched but the label has no socket for the connection's
    /// family and protocol: dropped.
    Miss = 1,
    /// A binding matched but the kernel refused the label's socket
    /// (bpf_sk_assign's errno): dropped.
    Error = 2,
    /// No binding; the port is on the seed list and the seed socket was assigned.
    Seed = 3,
    /// No binding; the port is on the seed list but there is no seed socket: dropped.
    SeedMiss = 4,
    /// No binding; the port is on the seed list but the kernel refused the seed socket: dropped.
    SeedError = 5,
    /// No binding (and no seed port): the kernel's normal lookup decides.
    Normal = 6,
}

impl TraceOutcome {
    pub const ALL: [TraceOutcome; 7] = [
        TraceOutcome::Assigned,
        TraceOutcome::Miss,
        TraceOutcome::Error,
        TraceOutcome::Seed,
        TraceOutcome::SeedMiss,
        TraceOutcome::SeedError,
        TraceOutcome::Normal,
    ];

    pub fn from_u8(value: u8) -> Option<Self> {
        Self::ALL.get(usize::from(value)).copied()
    }

    /// Its bit in [`TraceFilter::outcomes`].
    #[inline(always)]
    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    pub fn name(self) -> &'static str {
        match self {
            TraceOutcome::Assigned => "assigned",
            TraceOutcome::Miss => "miss",
            TraceOutcome::Error => "error",
            TraceOutcome::Seed => "seed",
            TraceOutcome::SeedMiss => "seed-miss",
            TraceOutcome::SeedError => "seed-error",
            TraceOutcome::Normal => "normal",
        }
    }
}

/// An address prefix a tracer's filter selects, in the v4-mapped space as
/// [`lookup::Address`] has it (big-endian halves): an address matches when
/// its bits under `mask` are `addr`'s. A zero mask matches every address.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixMatch {
    pub addr: [u64; 2],
    pub mask: [u64; 2],
}

impl PrefixMatch {
    /// The prefix of `len` bits of `addr` (v4-mapped, network order).
    pub fn new(addr: [u8; 16], len: u8) -> Self {
        let mask = prefix_mask(len);
        let value = u128::from_be_bytes(addr) & mask;
        Self { addr: [(value >> 64) as u64, value as u64], mask: [(mask >> 64) as u64, mask as u64] }
    }

    #[inline(always)]
    pub fn matches(&self, addr: lookup::Address) -> bool {
        (addr.hi ^ self.addr[0]) & self.mask[0] == 0 && (addr.lo ^ self.addr[1]) & self.mask[1] == 0
    }
}

/// A tracer's kernel-side filter and sampling, in its slot of
/// `trace_filters`. A decision is traced when every part matches.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceFilter {
    /// Non-zero while a tracer holds the slot. The program clears it when
    /// the tracer's socket has left `trace_tracers` (the tracer exited).
    pub active: u8,
    /// A bit per protocol index (1 TCP, 2 UDP).
    pub protocols: u8,
    /// A bit per [`TraceOutcome`].
    pub outcomes: u8,
    /// How many of `labels` apply; 0: any label, and decisions without one.
    pub labels_len: u8,
    /// Trace one in `sample` matching decisions, at random; 0 and 1: all.
    pub sample: u32,
    /// The tracer's process id, for `steerctl status`.
    pub pid: u32,
    /// The connection's local port; 0: any.
    pub local_port: u16,
    pub _pad: u16,
    /// Label ids: the matched binding's label must be one of them.
    pub labels: [u32; TRACE_FILTER_LABELS],
    /// The connection's local (destination) and remote (source) address.
    pub local: PrefixMatch,
    pub remote: PrefixMatch,
}

/// One traced decision, as the program writes it to a tracer's ring buffer.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceEvent {
    /// bpf_ktime_get_ns(): CLOCK_MONOTONIC.
    pub time_ns: u64,
    /// The local and remote addresses in the v4-mapped space, as
    /// [`lookup::Address`] has them (hi, lo).
    pub local: [u64; 2],
    pub remote: [u64; 2],
    /// Host order.
    pub local_port: u16,
    pub remote_port: u16,
    /// The context's AF_INET or AF_INET6.
    pub family: u8,
    /// IPPROTO_TCP or IPPROTO_UDP.
    pub protocol: u8,
    /// A [`TraceOutcome`].
    pub outcome: u8,
    /// The matched binding's prefix length (v4-mapped space).
    pub len: u8,
    /// The matched binding's label; [`Answer::NONE`] when none matched.
    pub label: u32,
    /// The `sockets` key of the socket assigned or refused (`echo_socket`'s
    /// key for the seed); [`TraceEvent::NO_MEMBER`] when there was none.
    pub member: u32,
    /// bpf_sk_assign's refusal as a positive errno; 0.
    pub errno: u32,
    /// The counter set (destination) the decision counted in.
    pub dest: u16,
    pub _pad: u16,
}

impl TraceEvent {
    pub const NO_MEMBER: u32 = u32::MAX;
}

/// What one tracer's slot saw, per CPU; the last entry of `trace_metrics`
/// sums every tracer's since the state was loaded.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TraceMetrics {
    /// Decisions the tracer's filter selected.
    pub matched: u64,
    /// Of those, left out by sampling.
    pub sampled_out: u64,
    /// Written to the tracer's ring buffer.
    pub events: u64,
    /// Not written: the ring buffer was full (bpf_ringbuf_output failed).
    pub lost: u64,
}

/// Binding key, as the record of bindings stores it: (protocol, prefix
/// length, port, masked address), IPv4 as v4-mapped IPv6 (its /N is /96+N).
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
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
    pub fn new(protocol: u8, prefixlen: u8, port: u16, addr: [u8; 16]) -> Self {
        let value = u128::from_be_bytes(addr) & prefix_mask(prefixlen);
        Self { protocol, prefixlen, port: port.to_be_bytes(), addr: value.to_be_bytes() }
    }

    pub fn port(&self) -> u16 {
        u16::from_be_bytes(self.port)
    }
}

/// One slot of a record of bindings (`bindings_0`/`bindings_1`, layout 6:
/// open-addressed tables in mmapable arrays that only userspace reads; see
/// steer's `state::record` for the hashing and probing, part of the layout).
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordSlot {
    pub key: BindingKey,
    /// [`RecordSlot::EMPTY`] (a fresh array's zero), [`RecordSlot::REMOVED`],
    /// or the label id plus one.
    pub label: u32,
}

impl RecordSlot {
    pub const EMPTY: u32 = 0;
    pub const REMOVED: u32 = u32::MAX;
}

/// The mask of a prefix of `len` bits of a 128-bit address.
pub const fn prefix_mask(len: u8) -> u128 {
    if len == 0 { 0 } else { u128::MAX << (128 - len as u32) }
}

/// A label's destination: its traffic of one family and protocol.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestKey {
    pub label: u32,
    /// 0 IPv4, 1 IPv6 (of the traffic).
    pub family_index: u8,
    /// 0 TCP, 1 UDP.
    pub protocol_index: u8,
    pub _pad: [u8; 2],
}

/// A label name as the `labels` map stores it: NUL padded.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
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

/// A listening address the kernel follows: the socket's family (AF_INET,
/// AF_INET6), protocol, port (host order) and bound address (network
/// order; IPv4 in the first four bytes).
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FollowKey {
    pub family: u8,
    pub protocol: u8,
    pub port: u16,
    pub addr: [u8; 16],
}

/// `follow_flag` bits of a follow entry.
pub mod follow_flag {
    /// The listener's address covers the registered one (a wildcard bind):
    /// its sockets go after the ones bound to the address itself.
    pub const COVER: u8 = 1;
}

/// One registration a listening address serves.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FollowEntry {
    /// The label whose slot takes the socket; [`FollowEntry::NONE`] unused.
    pub label: u32,
    /// Which scope's programs may insert (the cgroup they are attached to).
    pub scope: u16,
    pub flags: u8,
    pub _pad: u8,
}

impl FollowEntry {
    pub const NONE: u32 = u32::MAX;

    pub const fn none() -> Self {
        Self { label: Self::NONE, scope: 0, flags: 0, _pad: 0 }
    }
}

impl Default for FollowEntry {
    fn default() -> Self {
        Self::none()
    }
}

/// The registrations a listening address serves.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowValue {
    pub entries: [FollowEntry; FOLLOW_ENTRIES],
}

/// Where a backfill pass puts one socket: `sockets` keys, unused ones
/// [`FollowEntry::NONE`].
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackfillValue {
    pub keys: [u32; FOLLOW_ENTRIES],
}

impl Default for BackfillValue {
    fn default() -> Self {
        Self { keys: [FollowEntry::NONE; FOLLOW_ENTRIES] }
    }
}

/// What the follow programs did, per CPU.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[cfg_attr(feature = "user", derive(serde::Serialize))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowMetrics {
    /// Listening sockets put in a slot inside listen().
    pub inserted: u64,
    /// Listening sockets a full slot (SLOT_MEMBERS held) had no room for.
    pub full: u64,
    /// Inserts the kernel refused.
    pub errors: u64,
    /// Binds reported to userspace (UDP).
    pub events: u64,
    /// Binds not reported: the ring buffer was full.
    pub lost_events: u64,
    /// Sockets a backfill pass inserted.
    pub backfilled: u64,
}

/// A scope: the cgroup the follow programs of one scope id are attached
/// to (only userspace reads it).
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScopeInfo {
    /// The cgroup's id (its directory's inode); 0: the scope is unused.
    pub cgroup_id: u64,
    /// Its path under the cgroup2 mount, NUL padded ("" for the root).
    pub path: [u8; 120],
}

impl Default for ScopeInfo {
    fn default() -> Self {
        Self { cgroup_id: 0, path: [0; 120] }
    }
}

/// A followed bind reported to userspace (UDP, from post_bind).
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowEvent {
    pub cookie: u64,
    pub key: FollowKey,
    pub _pad: u32,
}

/// The state directory's identity and bookkeeping, in `steer_meta` (only
/// userspace reads it).
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateMeta {
    /// [`LAYOUT_VERSION`] of the steer that made the state.
    pub layout_version: u32,
    /// The record set (`bindings_0`/`bindings_1`) that holds the bindings.
    pub active_record: u32,
    /// Bumped by every change of the recorded bindings.
    pub record_version: u64,
    /// The `record_version` the published generation was compiled from.
    pub plane_version: u64,
    /// The namespace's SO_NETNS_COOKIE (0 where the kernel lacks it).
    pub netns_cookie: u64,
    pub netns_inode: u64,
    /// The loaded program's tag, and the hash of the object it came from.
    pub program_tag: u64,
    pub object_hash: u64,
    /// Non-zero while the idle half may still hold a generation that
    /// lookups started before the last switch could be reading.
    pub idle_dirty: u32,
    /// Range slots each half of `steer_ranges` holds chunks in (the rest
    /// are empty), so a write knows what to empty without scanning.
    pub range_slots: [u16; 2],
    /// Directory slots each half of `steer_dirs` holds chunks in, a bit
    /// per chunk number (the rest are empty), so a write changes only
    /// those: where the kernel has no batch updates for maps of maps (5.10
    /// and 6.1 among the tested), each slot changed costs a grace period.
    /// Layout 6: each half's chunks are its own, written in place while
    /// the half is idle.
    pub dir_slots: [DirSlots; 2],
    /// Layout 6: bindings in the record in use, so nothing counts them.
    pub bindings: u32,
    /// Layout 6: ranges in use in `steer_ranges`' chunks, which both halves
    /// share (an arena: a segment a write changes is written anew past
    /// `arena_top`, its old ranges left until the next full publish).
    pub arena_top: u32,
    /// Of those, the ranges directory entries refer to.
    pub arena_live: u32,
    /// Non-zero from a write's first change of the idle half's directory
    /// until it made the other half the same: a write killed in between
    /// leaves the halves different, and the next write publishes anew.
    pub halves_differ: u32,
    /// Removed slots in the record in use (they lengthen probes until the
    /// record is made anew); a hint, checked against the slots themselves.
    pub record_removed: u32,
    pub _pad: u32,
}

/// A bit per directory chunk number (`DIR_CHUNKS` of them).
pub type DirSlots = [u64; DIR_SLOT_WORDS];
pub const DIR_SLOT_WORDS: usize = (DIR_CHUNKS as usize).div_ceil(64);

/// The state layout this build reads and writes. 4: slot members and the
/// follow maps; 5: `steer_config.trace` and the `trace_*` maps (see
/// [`for_each_map!`]); 6: incremental writes (`steer_meta`'s arena and
/// counts, range chunks shared by both halves, `dest_bindings`).
pub const LAYOUT_VERSION: u32 = 6;

// Sizes and offsets the kernel (context) or the pinned maps (keys and
// values) fix; a change here is a change of the state format.
const _: () = {
    assert!(size_of::<bpf_sk_lookup>() == 72);
    assert!(offset_of!(bpf_sk_lookup, remote_port) == 36);
    assert!(offset_of!(bpf_sk_lookup, local_ip4) == 40);
    assert!(offset_of!(bpf_sk_lookup, local_port) == 60);
    assert!(offset_of!(bpf_sk_lookup, ingress_ifindex) == 64);
    assert!(offset_of!(bpf_sock_ops, family) == 20);
    assert!(offset_of!(bpf_sock_ops, local_ip4) == 28);
    assert!(offset_of!(bpf_sock_ops, local_ip6) == 48);
    assert!(offset_of!(bpf_sock_ops, local_port) == 68);
    assert!(offset_of!(bpf_sock, protocol) == 12);
    assert!(offset_of!(bpf_sock, src_ip4) == 24);
    assert!(offset_of!(bpf_sock, src_ip6) == 28);
    assert!(offset_of!(bpf_sock, src_port) == 44);
    assert!(size_of::<Answer>() == 8);
    assert!(size_of::<Range>() == 24);
    assert!(offset_of!(Range, answer) == 16);
    assert!(size_of::<DirEntry>() == 16);
    assert!(offset_of!(DirEntry, default) == 8);
    assert!(size_of::<DataplaneConfig>() == 8);
    assert!(size_of::<DestMetrics>() == 48);
    assert!(size_of::<SeedMetrics>() == 24);
    assert!(size_of::<BindingKey>() == 20);
    assert!(offset_of!(BindingKey, port) == 2);
    assert!(offset_of!(BindingKey, addr) == 4);
    assert!(size_of::<DestKey>() == 8);
    assert!(size_of::<LabelName>() == 64);
    assert!(size_of::<StateMeta>() == 64 + 2 * 8 * DIR_SLOT_WORDS + 24);
    assert!(size_of::<RecordSlot>() == 24);
    assert!(DIR_KEYS.is_multiple_of(CHUNK_ENTRIES));
    assert!(1u64 << MAX_SEARCH_STEPS > MAX_RANGES as u64);
    assert!(MAX_DESTINATIONS <= u16::MAX as u32 + 1);
    assert!(size_of::<FollowKey>() == 20);
    assert!(size_of::<FollowEntry>() == 8);
    assert!(size_of::<FollowValue>() == 32);
    assert!(size_of::<BackfillValue>() == 16);
    assert!(size_of::<FollowMetrics>() == 48);
    assert!(size_of::<FollowEvent>() == 32);
    assert!(size_of::<ScopeInfo>() == 128);
    assert!(MAX_SCOPES <= u16::MAX as u32);
    assert!(offset_of!(DataplaneConfig, trace) == 2);
    assert!(size_of::<PrefixMatch>() == 32);
    assert!(size_of::<TraceFilter>() == 96);
    assert!(offset_of!(TraceFilter, labels) == 16);
    assert!(offset_of!(TraceFilter, local) == 32);
    assert!(size_of::<TraceEvent>() == 64);
    assert!(offset_of!(TraceEvent, local_port) == 40);
    assert!(offset_of!(TraceEvent, label) == 48);
    assert!(size_of::<TraceMetrics>() == 32);
    assert!(TraceOutcome::ALL.len() <= 8);
    assert!(MAX_TRACERS <= 8);
};

/// Calls `$callback!` with every map of the dispatcher, one
/// `IDENT, "name", TYPE, Key, Value, max_entries, flags;` line each; a map
/// of maps gives its inner map's `Value, max_entries, flags` as a fourth
/// group after the word `inner` (an array), or its size in bytes after
/// `inner_ringbuf` (a ring buffer); a ring buffer ends with `ringbuf()`.
/// The one list both the BPF program's map definitions and userspace's
/// checks are made from. Every map is pinned by name in the state
/// directory. A map added or changed here is a new [`LAYOUT_VERSION`];
/// the comments say which layout brought which maps.
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
            // Which generation half lookups use, and whether the seed list is on.
            STEER_CONFIG, "steer_config", BPF_MAP_TYPE_ARRAY, u32, $crate::DataplaneConfig, 1, 0;
            // The compiled bindings: two halves of directory and range chunks
            // (from layout 6 both halves' range slots hold the same chunks).
            STEER_DIRS, "steer_dirs", BPF_MAP_TYPE_ARRAY_OF_MAPS, u32, u32, 2 * $crate::DIR_CHUNKS, 0,
                inner $crate::DirEntry, $crate::CHUNK_ENTRIES, $crate::kernel::BPF_F_MMAPABLE;
            STEER_RANGES, "steer_ranges", BPF_MAP_TYPE_ARRAY_OF_MAPS, u32, u32, 2 * $crate::RANGE_CHUNKS, 0,
                inner $crate::Range, $crate::CHUNK_ENTRIES, $crate::kernel::BPF_F_MMAPABLE;
            // Labels' sockets, at member_key(socket_slot(label, family, protocol), member).
            SOCKETS, "sockets", BPF_MAP_TYPE_SOCKMAP, u32, u64, $crate::SOCKET_MEMBERS, 0;
            // socket_flag bits for each socket slot.
            SOCKET_FLAGS, "socket_flags", BPF_MAP_TYPE_ARRAY, u32, u32, $crate::SOCKET_SLOTS, 0;
            METRICS, "metrics", BPF_MAP_TYPE_PERCPU_ARRAY, u32, $crate::DestMetrics, $crate::MAX_DESTINATIONS, 0;
            SEED_METRICS, "seed_metrics", BPF_MAP_TYPE_PERCPU_ARRAY, u32, $crate::SeedMetrics, 1, 0;
            // Only userspace reads these; they live here so that they are
            // pinned beside the rest of the state. The record of bindings
            // (two sets, so `load-bindings` fills the idle one and switches)
            // holding label ids; label names; destination ids; bookkeeping.
            // Layout 6: each record set an open-addressed table of RecordSlot
            // in an mmapable array, made anew larger as it fills (hash maps before).
            BINDINGS_0, "bindings_0", BPF_MAP_TYPE_ARRAY, u32, $crate::RecordSlot, $crate::RECORD_INITIAL_CAPACITY, $crate::kernel::BPF_F_MMAPABLE;
            BINDINGS_1, "bindings_1", BPF_MAP_TYPE_ARRAY, u32, $crate::RecordSlot, $crate::RECORD_INITIAL_CAPACITY, $crate::kernel::BPF_F_MMAPABLE;
            LABELS, "labels", BPF_MAP_TYPE_HASH, $crate::LabelName, u32, $crate::MAX_LABELS, 0;
            DESTINATIONS, "destinations", BPF_MAP_TYPE_HASH, $crate::DestKey, u32, $crate::MAX_DESTINATIONS, 0;
            STEER_META, "steer_meta", BPF_MAP_TYPE_ARRAY, u32, $crate::StateMeta, 1, 0;
            // Layout 4: servers followed by the kernel: listening addresses -> the
            // registrations they serve (read inside listen() and bind()),
            // the sockets a backfill pass inserts (by cookie), what the
            // follow programs did, and the binds they report (UDP).
            FOLLOWS, "follows", BPF_MAP_TYPE_HASH, $crate::FollowKey, $crate::FollowValue, $crate::MAX_FOLLOWS, 0;
            BACKFILL, "backfill", BPF_MAP_TYPE_HASH, u64, $crate::BackfillValue, $crate::MAX_BACKFILL, 0;
            FOLLOW_METRICS, "follow_metrics", BPF_MAP_TYPE_PERCPU_ARRAY, u32, $crate::FollowMetrics, 1, 0;
            FOLLOW_EVENTS, "follow_events", BPF_MAP_TYPE_RINGBUF, u32, u32, $crate::FOLLOW_EVENT_BYTES, 0, ringbuf();
            FOLLOW_SCOPES, "follow_scopes", BPF_MAP_TYPE_ARRAY, u32, $crate::ScopeInfo, $crate::MAX_SCOPES, 0;
            // Layout 5: live tracing (`steerctl trace`), a slot per tracer: its socket
            // (the kernel takes it out when the tracer exits, however it
            // exits: the slot's liveness), its filter, its own ring buffer,
            // and its counters; trace_metrics' last entry sums all tracers'.
            TRACE_TRACERS, "trace_tracers", BPF_MAP_TYPE_SOCKMAP, u32, u64, $crate::MAX_TRACERS, 0;
            TRACE_FILTERS, "trace_filters", BPF_MAP_TYPE_ARRAY, u32, $crate::TraceFilter, $crate::MAX_TRACERS, 0;
            TRACE_RINGS, "trace_rings", BPF_MAP_TYPE_ARRAY_OF_MAPS, u32, u32, $crate::MAX_TRACERS, 0,
                inner_ringbuf $crate::TRACE_RING_BYTES;
            TRACE_METRICS, "trace_metrics", BPF_MAP_TYPE_PERCPU_ARRAY, u32, $crate::TraceMetrics, $crate::MAX_TRACERS + 1, 0;
            // Layout 6 (only userspace reads it): how many bindings reach
            // each counter set (by destination id), so a write that removes
            // the last one drops it without reading the record.
            DEST_BINDINGS, "dest_bindings", BPF_MAP_TYPE_ARRAY, u32, u32, $crate::MAX_DESTINATIONS, $crate::kernel::BPF_F_MMAPABLE;
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
    /// For a map of maps: the inner maps' (value size, max entries, flags).
    pub inner: Option<InnerSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerSpec {
    pub map_type: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

macro_rules! map_specs {
    ($($ident:ident, $name:literal, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr
        $(, inner $inner:ty, $inner_max:expr, $inner_flags:expr)? $(, inner_ringbuf $inner_ring:expr)?
        $(, ringbuf $ring:tt)?;)*) => {
        /// Every map of the dispatcher, in the object's order.
        pub const MAPS: &[MapSpec] = &[$(MapSpec {
            name: $name,
            map_type: kernel::$type,
            key_size: map_specs!(@size $key $(, ringbuf $ring)?),
            value_size: map_specs!(@size $value $(, ringbuf $ring)?),
            max_entries: $max,
            flags: $flags,
            inner: map_specs!(@inner $($inner, $inner_max, $inner_flags)? $(ringbuf $inner_ring)?),
        }),*];

        /// Map names, for userspace.
        pub mod map {
            $(pub const $ident: &str = $name;)*
        }
    };
    (@size $t:ty) => { size_of::<$t>() as u32 };
    // A ring buffer has neither keys nor values.
    (@size $t:ty, ringbuf $ring:tt) => { 0 };
    (@inner) => { None };
    (@inner $inner:ty, $inner_max:expr, $inner_flags:expr) => {
        Some(InnerSpec {
            map_type: kernel::BPF_MAP_TYPE_ARRAY,
            value_size: size_of::<$inner>() as u32,
            max_entries: $inner_max,
            flags: $inner_flags,
        })
    };
    (@inner ringbuf $bytes:expr) => {
        Some(InnerSpec { map_type: kernel::BPF_MAP_TYPE_RINGBUF, value_size: 0, max_entries: $bytes, flags: 0 })
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
    unsafe impl aya::Pod for super::Answer {}
    unsafe impl aya::Pod for super::Range {}
    unsafe impl aya::Pod for super::DirEntry {}
    unsafe impl aya::Pod for super::DataplaneConfig {}
    unsafe impl aya::Pod for super::DestMetrics {}
    unsafe impl aya::Pod for super::SeedMetrics {}
    unsafe impl aya::Pod for super::BindingKey {}
    unsafe impl aya::Pod for super::RecordSlot {}
    unsafe impl aya::Pod for super::DestKey {}
    unsafe impl aya::Pod for super::LabelName {}
    unsafe impl aya::Pod for super::StateMeta {}
    unsafe impl aya::Pod for super::bpf_sk_lookup {}
    unsafe impl aya::Pod for super::FollowKey {}
    unsafe impl aya::Pod for super::FollowValue {}
    unsafe impl aya::Pod for super::BackfillValue {}
    unsafe impl aya::Pod for super::FollowMetrics {}
    unsafe impl aya::Pod for super::FollowEvent {}
    unsafe impl aya::Pod for super::ScopeInfo {}
    unsafe impl aya::Pod for super::TraceFilter {}
    unsafe impl aya::Pod for super::TraceEvent {}
    unsafe impl aya::Pod for super::TraceMetrics {}
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
        assert_eq!(
            BindingKey::new(6, 65, 0, [0xff; 16]).addr[..9],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x80]
        );
    }

    #[test]
    fn slots_and_keys_stay_in_their_maps() {
        let dirs = map_spec(map::STEER_DIRS).unwrap();
        assert_eq!(dir_slot(1, DIR_KEYS - 1), dirs.max_entries - 1);
        assert_eq!(dir_slot(0, lookup::port_key(1, 65535)), BUCKET_KEYS_BASE / CHUNK_ENTRIES - 1);
        assert_eq!(lookup::bucket_key(1, 1, 0xffff), DIR_KEYS - 1);
        let ranges = map_spec(map::STEER_RANGES).unwrap();
        assert_eq!(range_slot(1, MAX_RANGES - 1), ranges.max_entries - 1);
        assert_eq!(socket_slot(MAX_LABELS - 1, 1, 1), SOCKET_SLOTS - 1);
        let sockets = map_spec(map::SOCKETS).unwrap();
        assert_eq!(member_key(SOCKET_SLOTS - 1, SLOT_MEMBERS - 1), sockets.max_entries - 1);
        let ring = map_spec(map::FOLLOW_EVENTS).unwrap();
        assert_eq!((ring.key_size, ring.value_size), (0, 0));
        assert!(ring.max_entries.is_power_of_two() && ring.max_entries >= 4096);
        let rings = map_spec(map::TRACE_RINGS).unwrap().inner.unwrap();
        assert_eq!((rings.map_type, rings.value_size), (kernel::BPF_MAP_TYPE_RINGBUF, 0));
        assert!(rings.max_entries.is_power_of_two() && rings.max_entries >= 4096);
        assert_eq!(map_spec(map::TRACE_METRICS).unwrap().max_entries, MAX_TRACERS + 1);
        for name in [map::TRACE_TRACERS, map::TRACE_FILTERS, map::TRACE_RINGS] {
            assert_eq!(map_spec(name).unwrap().max_entries, MAX_TRACERS, "{name}");
        }
    }

    #[test]
    fn prefix_matches_select_their_addresses() {
        let v4 = |a: [u8; 4]| lookup::Address::v4(u32::from_be_bytes(a));
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[10, 1, 2, 3]);
        let p = PrefixMatch::new(mapped, 96 + 16);
        assert!(p.matches(v4([10, 1, 200, 7])));
        assert!(!p.matches(v4([10, 2, 0, 1])));
        assert!(!p.matches(lookup::Address::v6(0x2001_0db8 << 32, 1)));
        assert!(PrefixMatch::default().matches(lookup::Address::v6(u64::MAX, 7)));
        let host = PrefixMatch::new(mapped, 128);
        assert!(host.matches(v4([10, 1, 2, 3])) && !host.matches(v4([10, 1, 2, 4])));
    }

    #[test]
    fn trace_outcomes_round_trip_and_fit_their_mask() {
        for (i, o) in TraceOutcome::ALL.iter().enumerate() {
            assert_eq!(TraceOutcome::from_u8(i as u8), Some(*o));
            assert_eq!(o.bit(), 1 << i);
        }
        assert_eq!(TraceOutcome::from_u8(7), None);
    }

    #[test]
    fn specs_name_every_map_once() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(MAPS[i + 1..].iter().all(|n| n.name != m.name), "{} twice", m.name);
            assert!(m.name.len() < 16, "{}: kernel map names hold 15 bytes", m.name);
            assert_eq!(m.inner.is_some(), m.map_type == kernel::BPF_MAP_TYPE_ARRAY_OF_MAPS, "{}", m.name);
        }
        assert!(map_spec("nope").is_none());
        // The seed's layouts, which bpftool users rely on.
        let ports = map_spec(map::ECHO_PORTS).unwrap();
        assert_eq!((ports.map_type, ports.key_size, ports.value_size), (kernel::BPF_MAP_TYPE_HASH, 2, 1));
        let socket = map_spec(map::ECHO_SOCKET).unwrap();
        assert_eq!((socket.map_type, socket.key_size, socket.value_size), (kernel::BPF_MAP_TYPE_SOCKMAP, 4, 8));
        assert_eq!(map_spec(map::STEER_RANGES).unwrap().inner.unwrap().value_size, 24);
    }

    #[test]
    fn addresses_know_their_family_and_bucket() {
        let v4 = lookup::Address::v4(0x0a7b_2d43);
        assert_eq!((v4.family_index(), v4.bucket()), (0, 0x0a7b));
        let v6 = lookup::Address::v6(0x2001_0db8_0000_0000, 1);
        assert_eq!((v6.family_index(), v6.bucket()), (1, 0x2001));
        // A v4-mapped IPv6 destination is an IPv4 one.
        assert_eq!(lookup::Address::v6(0, 0x0000_ffff_0a00_0001), lookup::Address::v4(0x0a00_0001));
        assert_eq!(lookup::Address::v6(0, 1).family_index(), 1);
    }

    #[test]
    fn assign_errors_map_to_reasons() {
        assert_eq!(ErrorReason::from_errno(-94), ErrorReason::BadSocket);
        assert_eq!(ErrorReason::from_errno(-17), ErrorReason::AlreadyAssigned);
        assert_eq!(ErrorReason::from_errno(-91), ErrorReason::Protocol);
        assert_eq!(ErrorReason::from_errno(-22), ErrorReason::Other);
        for (i, r) in ErrorReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn label_names_stop_at_the_first_nul() {
        let mut name = LabelName([0; LabelName::SIZE]);
        name.0[..3].copy_from_slice(b"web");
        assert_eq!(name.as_bytes(), b"web");
        assert_eq!(LabelName([b'x'; LabelName::SIZE]).as_bytes().len(), 64);
    }
}

// Declared last, so the lines above (whose numbers the committed objects'
// BTF line info records) stay where they are.
pub mod migrate;
