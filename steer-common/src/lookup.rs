//! The lookup algorithm, written once: the BPF program runs it over its
//! maps, userspace runs it over in-memory tables to check what it compiles.
//!
//! A binding generation is a set of sorted, non-overlapping address ranges
//! (v4-mapped 128-bit space), each carrying the answer of the longest
//! prefix that covers it, in two kinds of segments:
//! * one per (protocol, port) with exact-port bindings, over the whole
//!   address space;
//! * one per (protocol, family, top 16 address bits) "bucket" with
//!   wildcard-port bindings of /16 or longer; wildcard prefixes shorter than
//!   a bucket become the bucket's default answer, which the segment's gaps
//!   fall back to.
//!
//! A directory entry per port and per bucket names its segment. A lookup
//! reads at most two directory entries (absent chunks answer "nothing
//! here" at once, so unrelated traffic costs two array lookups), then
//! binary-searches at most two segments. The exact answer wins unless the
//! wildcard one has a strictly longer prefix.

use crate::{Answer, DirEntry, MAX_SEARCH_STEPS, Range};

/// Where a lookup reads a generation from.
pub trait Tables {
    /// The directory entry under `key` in half `half`; None when its chunk
    /// is absent (nothing bound in that span of keys).
    fn dir(&self, half: u32, key: u32) -> Option<DirEntry>;
    /// Range `index` of half `half`.
    fn range(&self, half: u32, index: u32) -> Option<Range>;
}

/// 0 for TCP, 1 for UDP; None for anything else.
#[inline(always)]
pub fn protocol_index(protocol: u32) -> Option<u32> {
    match protocol {
        crate::kernel::IPPROTO_TCP => Some(0),
        crate::kernel::IPPROTO_UDP => Some(1),
        _ => None,
    }
}

/// An address in the v4-mapped space as two big-endian halves, and whether
/// it is IPv4 (family index 0) or IPv6 (1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Address {
    pub hi: u64,
    pub lo: u64,
}

impl Address {
    #[inline(always)]
    pub fn v4(addr: u32) -> Self {
        Self { hi: 0, lo: 0x0000_ffff_0000_0000 | u64::from(addr) }
    }

    /// IPv6, or IPv4 when it is v4-mapped (a v4-mapped IPv6 destination is
    /// looked up as the IPv4 address it names).
    #[inline(always)]
    pub fn v6(hi: u64, lo: u64) -> Self {
        Self { hi, lo }
    }

    #[inline(always)]
    pub fn family_index(self) -> u32 {
        if self.hi == 0 && self.lo >> 32 == 0xffff { 0 } else { 1 }
    }

    /// The top 16 bits of the address in its own family.
    #[inline(always)]
    pub fn bucket(self) -> u32 {
        if self.family_index() == 0 { ((self.lo >> 16) & 0xffff) as u32 } else { (self.hi >> 48) as u32 }
    }

    #[inline(always)]
    fn at_or_after(self, start: [u64; 2]) -> bool {
        self.hi > start[0] || (self.hi == start[0] && self.lo >= start[1])
    }
}

/// Directory key of the exact-port segment of (protocol, port).
#[inline(always)]
pub fn port_key(protocol_index: u32, port: u32) -> u32 {
    crate::PORT_KEYS_BASE + (protocol_index << 16 | (port & 0xffff))
}

/// Directory key of the wildcard segment of (protocol, family, bucket).
#[inline(always)]
pub fn bucket_key(protocol_index: u32, family_index: u32, bucket: u32) -> u32 {
    crate::BUCKET_KEYS_BASE + ((protocol_index * 2 + family_index) << 16 | (bucket & 0xffff))
}

/// The answer of the last range of segment `entry` that starts at or
/// before `addr`.
#[inline(always)]
fn search(tables: &impl Tables, half: u32, entry: &DirEntry, addr: Address) -> Option<Answer> {
    let (mut lo, mut hi) = (entry.start, entry.start.saturating_add(entry.count));
    // Segments hold at most 2^MAX_SEARCH_STEPS ranges, so this many halvings
    // always finish; the bound lets the verifier accept the loop.
    for _ in 0..MAX_SEARCH_STEPS {
        if lo >= hi {
            break;
        }
        let mid = lo + (hi - lo) / 2;
        let range = tables.range(half, mid)?;
        if addr.at_or_after(range.start) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    // Every segment's first range starts at its span's first address, so
    // lo > entry.start here for any address in the span.
    if lo == entry.start {
        return None;
    }
    tables.range(half, lo - 1).map(|r| r.answer)
}

/// The binding answer for a lookup of `protocol_index` to `addr`:`port`,
/// or None when no binding applies.
#[inline(always)]
pub fn lookup(tables: &impl Tables, half: u32, protocol_index: u32, port: u32, addr: Address) -> Option<Answer> {
    let mut best: Option<Answer> = None;
    if let Some(entry) = tables.dir(half, port_key(protocol_index, port)) {
        if entry.count > 0 {
            best = search(tables, half, &entry, addr).filter(|a| a.label != Answer::NONE);
        }
    }
    if let Some(entry) = tables.dir(half, bucket_key(protocol_index, addr.family_index(), addr.bucket())) {
        let mut wild = entry.default;
        if entry.count > 0 {
            if let Some(found) = search(tables, half, &entry, addr) {
                if found.label != Answer::DEFAULT {
                    wild = found;
                }
            }
        }
        if wild.label != Answer::NONE && best.is_none_or(|exact| wild.len > exact.len) {
            best = Some(wild);
        }
    }
    best
}
