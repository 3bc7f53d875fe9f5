//! Compiling bindings into a generation: the sorted ranges and directory
//! that steer-common's `lookup` searches (see its module docs for the
//! layout). Pure; the same `lookup` runs over the result here in tests, so
//! what is compiled is checked against the precedence rule directly.

use std::collections::{BTreeMap, BTreeSet};

use steer_common::{
    Answer, CHUNK_ENTRIES, DirEntry, MAX_RANGES, Range,
    lookup::{self, Tables},
    prefix_mask,
};

use crate::error::{Result, fail};

/// The v4-mapped region ::ffff:0:0/96, where IPv4 addresses live.
const V4_START: u128 = 0xffff << 32;
const V4_END: u128 = V4_START | 0xffff_ffff;
const V4_LEN: u8 = 96;

/// A prefix as an inclusive address interval, with its answer.
type Interval = (u128, u128, Answer);
/// A short prefix as the inclusive run of buckets it covers, with its answer.
type BucketRun = (u32, u32, Answer);

/// One binding, as the compiler takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    /// 0 TCP, 1 UDP.
    pub protocol_index: u32,
    /// 0 for every port.
    pub port: u16,
    /// The prefix in the v4-mapped space, host bits clear.
    pub addr: u128,
    pub len: u8,
    pub label: u32,
}

impl Input {
    /// The binding a record key names, routed to `label`.
    pub fn from_key(key: &steer_common::BindingKey, label: u32) -> Self {
        Input {
            protocol_index: u32::from(key.protocol == steer_common::kernel::IPPROTO_UDP as u8),
            port: key.port(),
            addr: u128::from_be_bytes(key.addr),
            len: key.prefixlen,
            label,
        }
    }

    fn end(&self) -> u128 {
        self.addr | !prefix_mask(self.len)
    }
}

/// A compiled generation.
#[derive(Debug, Default, Clone)]
pub struct Generation {
    /// Directory chunks by chunk number (key / CHUNK_ENTRIES), each full.
    pub dir_chunks: BTreeMap<u32, Vec<DirEntry>>,
    pub ranges: Vec<Range>,
}

impl Generation {
    /// Range chunks needed.
    pub fn range_chunks(&self) -> usize {
        self.ranges.len().div_ceil(CHUNK_ENTRIES as usize)
    }

    fn set_dir(&mut self, key: u32, entry: DirEntry) {
        let empty = DirEntry { start: 0, count: 0, default: Answer::none() };
        let chunk = self.dir_chunks.entry(key / CHUNK_ENTRIES).or_insert_with(|| vec![empty; CHUNK_ENTRIES as usize]);
        chunk[(key % CHUNK_ENTRIES) as usize] = entry;
    }

    /// Appends a segment's ranges, returning its directory entry.
    fn add_segment(&mut self, ranges: Vec<Range>, default: Answer) -> DirEntry {
        let entry = DirEntry { start: self.ranges.len() as u32, count: ranges.len() as u32, default };
        self.ranges.extend(ranges);
        entry
    }
}

impl Tables for Generation {
    fn dir(&self, _half: u32, key: u32) -> Option<DirEntry> {
        self.dir_chunks.get(&(key / CHUNK_ENTRIES)).map(|c| c[(key % CHUNK_ENTRIES) as usize])
    }

    fn range(&self, _half: u32, index: u32) -> Option<Range> {
        self.ranges.get(index as usize).copied()
    }
}

/// The label's counter set for traffic of one family and protocol.
pub trait Destinations {
    fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16>;
}

/// Ranges of `span` (inclusive): each starts where the innermost covering
/// prefix changes, `base` where none covers. `prefixes` are (start, end,
/// answer), nested or disjoint (prefixes always are).
fn partition(span: (u128, u128), prefixes: &mut [Interval], base: Answer) -> Vec<(u128, Answer)> {
    fn push(out: &mut Vec<(u128, Answer)>, start: u128, answer: Answer) {
        if out.last().is_some_and(|last| last.0 == start) {
            out.pop();
        }
        if out.last().is_some_and(|last| last.1 == answer) {
            return;
        }
        out.push((start, answer));
    }
    // Containers before what they contain.
    prefixes.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
    let mut out = vec![(span.0, base)];
    let mut open: Vec<(u128, Answer)> = Vec::new();
    for &(start, end, answer) in prefixes.iter() {
        while let Some(&(open_end, _)) = open.last() {
            if open_end >= start {
                break;
            }
            open.pop();
            push(&mut out, open_end + 1, open.last().map_or(base, |o| o.1));
        }
        push(&mut out, start, answer);
        open.push((end, answer));
    }
    while let Some((open_end, _)) = open.pop() {
        if open_end < span.1 {
            push(&mut out, open_end + 1, open.last().map_or(base, |o| o.1));
        }
    }
    out
}

fn family_of(addr: u128) -> u32 {
    u32::from(!(V4_START..=V4_END).contains(&addr))
}

/// Turns partition output into ranges, splitting at the edges of the IPv4
/// region so that each range is one family's, and naming each answer's
/// counter set.
fn ranges(
    parts: Vec<(u128, Answer)>,
    span_end: u128,
    protocol_index: u32,
    dests: &mut impl Destinations,
) -> Result<Vec<Range>> {
    let mut split = Vec::with_capacity(parts.len() + 2);
    for (i, &(start, answer)) in parts.iter().enumerate() {
        split.push((start, answer));
        let end = parts.get(i + 1).map_or(span_end, |next| next.0 - 1);
        for edge in [V4_START, V4_END + 1] {
            if start < edge && edge <= end {
                split.push((edge, answer));
            }
        }
    }
    split.sort_by_key(|p| p.0);
    split
        .into_iter()
        .map(|(start, mut answer)| {
            if answer.label != Answer::NONE && answer.label != Answer::DEFAULT {
                answer.dest = dests.dest(answer.label, family_of(start), protocol_index)?;
            }
            Ok(Range { start: [(start >> 64) as u64, start as u64], answer })
        })
        .collect()
}

/// Where a binding lives in a generation (see steer-common's `lookup`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// In the exact-port segment of (protocol, port).
    Exact { protocol_index: u32, port: u16 },
    /// In the segment of a wildcard bucket: /16 or longer in its family.
    Long { protocol_index: u32, family_index: u32, bucket: u32 },
    /// Shorter than a bucket: the default of buckets `first..=last`.
    Short { protocol_index: u32, family_index: u32, first: u32, last: u32 },
}

impl Placement {
    /// The directory key of the segment a placement names (for `Short`,
    /// its first bucket's).
    pub fn dir_key(&self) -> u32 {
        match *self {
            Placement::Exact { protocol_index, port } => lookup::port_key(protocol_index, u32::from(port)),
            Placement::Long { protocol_index, family_index, bucket }
            | Placement::Short { protocol_index, family_index, first: bucket, .. } => {
                lookup::bucket_key(protocol_index, family_index, bucket)
            }
        }
    }
}

/// The span of addresses a segment covers, and what its gaps answer.
fn segment_span(placement: &Placement) -> ((u128, u128), Answer) {
    match *placement {
        Placement::Exact { .. } => ((0, u128::MAX), Answer::none()),
        Placement::Long { family_index: 0, bucket, .. } => {
            let start = V4_START | u128::from(bucket) << 16;
            ((start, start | 0xffff), Answer::new(Answer::DEFAULT, 0, 0))
        }
        Placement::Long { bucket, .. } => {
            let start = u128::from(bucket) << 112;
            ((start, start | !prefix_mask(16)), Answer::new(Answer::DEFAULT, 0, 0))
        }
        Placement::Short { .. } => unreachable!("short prefixes have no segment"),
    }
}

impl Input {
    /// Where this binding lives: one place, or two for a wildcard prefix
    /// that covers the IPv4 region from outside it (the IPv4 buckets'
    /// default, and its IPv6 place).
    pub fn placements(&self) -> Vec<Placement> {
        let protocol_index = self.protocol_index;
        if self.port != 0 {
            return vec![Placement::Exact { protocol_index, port: self.port }];
        }
        let in_v4 = self.len >= V4_LEN && self.addr & prefix_mask(V4_LEN) == V4_START;
        let covers_v4 = self.len <= V4_LEN && V4_START & prefix_mask(self.len) == self.addr;
        if in_v4 {
            let v4_len = self.len - V4_LEN;
            let bucket = ((self.addr >> 16) & 0xffff) as u32;
            return vec![if v4_len >= 16 {
                Placement::Long { protocol_index, family_index: 0, bucket }
            } else {
                Placement::Short { protocol_index, family_index: 0, first: bucket, last: bucket | (0xffff >> v4_len) }
            }];
        }
        let mut out = Vec::with_capacity(2);
        if covers_v4 {
            out.push(Placement::Short { protocol_index, family_index: 0, first: 0, last: 0xffff });
        }
        let bucket = (self.addr >> 112) as u32;
        out.push(if self.len >= 16 {
            Placement::Long { protocol_index, family_index: 1, bucket }
        } else {
            Placement::Short { protocol_index, family_index: 1, first: bucket, last: bucket | (0xffff >> self.len) }
        });
        out
    }

    /// The traffic families (0 IPv4, 1 IPv6) whose addresses the prefix
    /// holds: the counter sets a binding may count in.
    pub fn families(&self) -> [bool; 2] {
        let in_v4 = self.len >= V4_LEN && self.addr & prefix_mask(V4_LEN) == V4_START;
        let covers_v4 = self.len <= V4_LEN && V4_START & prefix_mask(self.len) == self.addr;
        [in_v4 || covers_v4, !in_v4]
    }

    /// Whether this binding answers where `placement` decides: in the same
    /// segment, or among the same family's bucket defaults (a parent found
    /// for an unbind may be short where the binding is long).
    fn shares(&self, placement: &Placement) -> bool {
        self.placements().iter().any(|mine| match (mine, placement) {
            (
                Placement::Short { protocol_index: p, family_index: f, .. },
                Placement::Short { protocol_index, family_index, .. },
            ) => (p, f) == (protocol_index, family_index),
            _ => mine == placement,
        })
    }
}

/// Compiles bindings into a generation. `dests` names each (label, family,
/// protocol) the bindings can reach.
pub fn compile(bindings: &[Input], dests: &mut impl Destinations) -> Result<Generation> {
    let mut generation = Generation::default();
    // Exact-port segments, over the whole address space.
    let mut exact: BTreeMap<(u32, u16), Vec<Interval>> = BTreeMap::new();
    // Wildcard prefixes by (protocol, family): long ones (/16 and longer in
    // their family) by bucket, short ones as bucket defaults.
    let mut long: BTreeMap<(u32, u32, u32), Vec<Interval>> = BTreeMap::new();
    let mut short: BTreeMap<(u32, u32), Vec<BucketRun>> = BTreeMap::new();
    for b in bindings {
        let answer = Answer::new(b.label, 0, b.len);
        for placement in b.placements() {
            match placement {
                Placement::Exact { protocol_index, port } => {
                    exact.entry((protocol_index, port)).or_default().push((b.addr, b.end(), answer))
                }
                Placement::Long { protocol_index, family_index, bucket } => {
                    long.entry((protocol_index, family_index, bucket)).or_default().push((b.addr, b.end(), answer))
                }
                Placement::Short { protocol_index, family_index, first, last } => {
                    short.entry((protocol_index, family_index)).or_default().push((first, last, answer))
                }
            }
        }
    }

    for ((protocol_index, port), mut prefixes) in exact {
        let parts = partition((0, u128::MAX), &mut prefixes, Answer::none());
        let segment = ranges(parts, u128::MAX, protocol_index, dests)?;
        let entry = generation.add_segment(segment, Answer::none());
        generation.set_dir(lookup::port_key(protocol_index, u32::from(port)), entry);
    }

    // Wildcard buckets, per (protocol, family): each bucket's default is the
    // longest short prefix covering it; its segment, its long prefixes.
    let families: BTreeSet<(u32, u32)> = short.keys().copied().chain(long.keys().map(|&(p, f, _)| (p, f))).collect();
    for (protocol_index, family_index) in families {
        let mut defaults = vec![Answer::none(); 1 << 16];
        let mut covers = short.remove(&(protocol_index, family_index)).unwrap_or_default();
        covers.sort_by_key(|c| c.2.len);
        for &(first, last, answer) in &covers {
            defaults[first as usize..=last as usize].fill(answer);
        }
        let mut buckets: BTreeSet<u32> = long
            .range((protocol_index, family_index, 0)..=(protocol_index, family_index, u32::MAX))
            .map(|(k, _)| k.2)
            .collect();
        for &(first, last, _) in &covers {
            buckets.extend(first..=last);
        }
        for bucket in buckets {
            let mut default = defaults[bucket as usize];
            if default.label != Answer::NONE {
                default.dest = dests.dest(default.label, family_index, protocol_index)?;
            }
            let segment = match long.get_mut(&(protocol_index, family_index, bucket)) {
                None => Vec::new(),
                Some(prefixes) => {
                    let (span, base) = segment_span(&Placement::Long { protocol_index, family_index, bucket });
                    let parts = partition(span, prefixes, base);
                    ranges(parts, span.1, protocol_index, dests)?
                }
            };
            let entry = generation.add_segment(segment, default);
            generation.set_dir(lookup::bucket_key(protocol_index, family_index, bucket), entry);
        }
    }
    if generation.ranges.len() > MAX_RANGES as usize {
        fail!(
            Full,
            "these bindings compile to {} address ranges; a generation holds {MAX_RANGES}",
            generation.ranges.len()
        );
    }
    Ok(generation)
}

/// Tables a delta reads whole segments from: range by range unless the
/// tables can copy runs of them (mapped chunks can).
pub trait SegmentTables: Tables {
    /// The ranges of the segment `entry` names; None past the published ones.
    fn segment(&self, half: u32, entry: &DirEntry) -> Option<Vec<Range>> {
        (entry.start..entry.start + entry.count).map(|i| self.range(half, i)).collect()
    }
}

impl SegmentTables for Generation {}

/// A change of one binding, for [`delta`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edit {
    Add,
    /// Removing it: `parent` is the longest recorded binding of the same
    /// protocol and port whose prefix holds this one's, whose answer the
    /// addresses it leaves get back.
    Remove {
        parent: Option<Input>,
    },
}

/// What adding or removing one binding changes in a generation: the
/// segments it rewrites and the bucket defaults it changes, keyed by
/// directory key. Applied, the generation answers as [`compile`] of the
/// changed set would (tests: `deltas_agree_with_compiling_anew`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Delta {
    /// Each rewritten segment's ranges (none: the segment is gone).
    pub segments: Vec<(u32, Vec<Range>)>,
    /// New bucket defaults.
    pub defaults: Vec<(u32, Answer)>,
}

impl Delta {
    pub fn ranges(&self) -> usize {
        self.segments.iter().map(|(_, r)| r.len()).sum()
    }

    /// The directory entries after the change, each from its current one
    /// (`current`; absent reads as empty): a rewritten segment's at
    /// `place(count)`, which says where its ranges will lie.
    pub fn entries(
        &self,
        mut current: impl FnMut(u32) -> DirEntry,
        mut place: impl FnMut(u32) -> u32,
    ) -> BTreeMap<u32, DirEntry> {
        let mut out: BTreeMap<u32, DirEntry> = BTreeMap::new();
        for (key, ranges) in &self.segments {
            let entry = out.entry(*key).or_insert_with(|| current(*key));
            let count = ranges.len() as u32;
            entry.start = if count == 0 { 0 } else { place(count) };
            entry.count = count;
        }
        for &(key, default) in &self.defaults {
            out.entry(key).or_insert_with(|| current(key)).default = default;
        }
        out
    }
}

/// The answers of a segment's ranges with their counter sets taken off and
/// equal neighbours merged: the partition it was compiled from.
fn parts_of(ranges: &[Range]) -> Vec<(u128, Answer)> {
    let mut out: Vec<(u128, Answer)> = Vec::with_capacity(ranges.len());
    for r in ranges {
        let answer = Answer { dest: 0, ..r.answer };
        if out.last().is_none_or(|last| last.1 != answer) {
            out.push((u128::from(r.start[0]) << 64 | u128::from(r.start[1]), answer));
        }
    }
    out
}

/// `parts` with the answers of `start..=end` passed through `change`
/// (the rest unchanged), equal neighbours merged.
fn patch(
    parts: &[(u128, Answer)],
    span_end: u128,
    start: u128,
    end: u128,
    change: impl Fn(Answer) -> Answer,
) -> Vec<(u128, Answer)> {
    let at = |addr: u128| parts[parts.partition_point(|p| p.0 <= addr) - 1].1;
    let mut out: Vec<(u128, Answer)> = Vec::with_capacity(parts.len() + 2);
    let mut push = |at: u128, answer: Answer| {
        if out.last().is_none_or(|last| last.1 != answer) {
            out.push((at, answer));
        }
    };
    for &(from, answer) in parts.iter().take_while(|p| p.0 < start) {
        push(from, answer);
    }
    push(start, change(at(start)));
    for &(from, answer) in parts.iter().filter(|p| p.0 > start && p.0 <= end) {
        push(from, change(answer));
    }
    if end < span_end {
        push(end + 1, at(end + 1));
        for &(from, answer) in parts.iter().filter(|p| p.0 > end + 1) {
            push(from, answer);
        }
    }
    out
}

/// What `edit` of binding `b` changes in the generation `tables` holds in
/// half `half`. Reads only the segments and bucket entries `b` lies in;
/// `dests` must already name `b`'s counter sets (and the parent's).
pub fn delta(
    tables: &impl SegmentTables,
    half: u32,
    b: &Input,
    edit: Edit,
    dests: &mut impl Destinations,
) -> Result<Delta> {
    let mine = Answer::new(b.label, 0, b.len);
    // What the addresses `b` holds answer after the edit, given what they
    // answered before; `base` is what a segment answers where nothing covers.
    let change = |answer: Answer, base: Answer, placement: &Placement| match edit {
        Edit::Add if answer.label == Answer::NONE || answer.label == Answer::DEFAULT || answer.len < b.len => mine,
        Edit::Remove { parent } if answer == mine => match parent {
            Some(p) if p.shares(placement) => Answer::new(p.label, 0, p.len),
            _ => base,
        },
        _ => answer,
    };
    let mut out = Delta::default();
    for placement in b.placements() {
        let key = placement.dir_key();
        let entry = tables.dir(half, key).unwrap_or(DirEntry { start: 0, count: 0, default: Answer::none() });
        if let Placement::Short { protocol_index, family_index, first, last } = placement {
            for bucket in first..=last {
                let key = lookup::bucket_key(protocol_index, family_index, bucket);
                let old = tables.dir(half, key).map_or(Answer::none(), |e| e.default);
                let mut new = change(Answer { dest: 0, ..old }, Answer::none(), &placement);
                if new.label != Answer::NONE {
                    new.dest = dests.dest(new.label, family_index, protocol_index)?;
                }
                if new != old {
                    out.defaults.push((key, new));
                }
            }
            continue;
        }
        let (span, base) = segment_span(&placement);
        let current = tables
            .segment(half, &entry)
            .ok_or_else(|| crate::error::Error::Pin(format!("segment {key} reads past the published ranges")))?;
        let parts = if current.is_empty() { vec![(span.0, base)] } else { parts_of(&current) };
        let parts = patch(&parts, span.1, b.addr, b.end(), |a| change(a, base, &placement));
        let protocol_index = match placement {
            Placement::Exact { protocol_index, .. } | Placement::Long { protocol_index, .. } => protocol_index,
            Placement::Short { .. } => unreachable!(),
        };
        let segment =
            if parts == [(span.0, base)] { Vec::new() } else { ranges(parts, span.1, protocol_index, dests)? };
        out.segments.push((key, segment));
    }
    Ok(out)
}

impl Generation {
    /// Applies `delta` as the plane does: rewritten segments appended to
    /// the ranges (their old ranges left where they are), entries
    /// replaced.
    pub fn apply(&mut self, delta: &Delta) {
        let empty = DirEntry { start: 0, count: 0, default: Answer::none() };
        let mut top = self.ranges.len() as u32;
        let entries = delta.entries(
            |key| self.dir(0, key).unwrap_or(empty),
            |count| {
                top += count;
                top - count
            },
        );
        for (_, ranges) in &delta.segments {
            self.ranges.extend_from_slice(ranges);
        }
        for (key, entry) in entries {
            self.set_dir(key, entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr};

    use proptest::{prelude::*, test_runner::TestCaseError};
    use steer_common::{BUCKET_KEYS_BASE, MAX_BINDINGS, lookup::Address};

    use super::*;
    use crate::{
        error::Error,
        model::{Binding, Prefix, Protocol, binding::resolve, prefix::mapped_addr, strategies},
    };

    /// Counter sets numbered by (label, family, protocol) in order of asking.
    #[derive(Default)]
    struct Numbered(BTreeMap<(u32, u32, u32), u16>);

    impl Destinations for Numbered {
        fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16> {
            let next = self.0.len() as u16;
            Ok(*self.0.entry((label, family_index, protocol_index)).or_insert(next))
        }
    }

    fn input(b: &Binding, labels: &[String]) -> Input {
        Input::from_key(&b.key(), labels.iter().position(|l| *l == b.label).unwrap() as u32)
    }

    fn address(addr: IpAddr) -> Address {
        let m = u128::from_be_bytes(mapped_addr(addr));
        Address::v6((m >> 64) as u64, m as u64)
    }

    /// Compiles `set` and checks every query against the precedence model:
    /// the label and prefix length the shared lookup finds, and that the
    /// counter set belongs to that label, family and protocol. Also that
    /// the generation stays within its size bound (see
    /// `full_is_out_of_reach_of_a_full_record`).
    fn check(
        set: &[Binding],
        queries: impl IntoIterator<Item = (Protocol, IpAddr, u16)>,
    ) -> Result<Generation, TestCaseError> {
        let mut labels: Vec<String> = set.iter().map(|b| b.label.clone()).collect();
        labels.sort();
        labels.dedup();
        let inputs: Vec<Input> = set.iter().map(|b| input(b, &labels)).collect();
        let mut dests = Numbered::default();
        let generation = compile(&inputs, &mut dests).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (protocol, addr, port) in queries {
            let p = u32::from(protocol == Protocol::Udp);
            let found = lookup::lookup(&generation, 0, p, u32::from(port), address(addr));
            let want = resolve(set, protocol, addr, port);
            let shown = |b: &Binding| (b.label.clone(), b.prefix.mapped().1);
            prop_assert_eq!(
                found.map(|a| (labels[a.label as usize].clone(), a.len)),
                want.map(shown),
                "{} {} port {}",
                protocol,
                addr,
                port
            );
            if let Some(a) = found {
                let family = u32::from(addr.is_ipv6() && address(addr).family_index() == 1);
                prop_assert_eq!(
                    dests.0.get(&(a.label, family, p)),
                    Some(&a.dest),
                    "{} {} port {}: counter set",
                    protocol,
                    addr,
                    port
                );
            }
        }
        let (exact, wildcard) = segments(&generation);
        prop_assert!(
            generation.ranges.len() <= range_bound(set.len(), exact, wildcard),
            "{} ranges from {} bindings in {exact} exact and {wildcard} wildcard segments",
            generation.ranges.len(),
            set.len()
        );
        Ok(generation)
    }

    /// The most ranges `bindings` bindings compile to, in `exact` port
    /// segments and `wildcard` bucket segments: each binding lies in one
    /// segment and starts at most two ranges there (where it begins, and
    /// where what it covers ends); each segment adds its first range, an
    /// exact one also two where it crosses into and out of the IPv4
    /// region, and wildcard bucket 0 of IPv6 (one per protocol) those two too.
    fn range_bound(bindings: usize, exact: usize, wildcard: usize) -> usize {
        2 * bindings + 3 * exact + wildcard + 2 * 2
    }

    /// The (exact port, wildcard bucket) segments that hold ranges.
    fn segments(generation: &Generation) -> (usize, usize) {
        let mut counts = (0, 0);
        for (chunk, entries) in &generation.dir_chunks {
            for (i, entry) in entries.iter().enumerate() {
                if entry.count > 0 {
                    if chunk * CHUNK_ENTRIES + (i as u32) < BUCKET_KEYS_BASE {
                        counts.0 += 1;
                    } else {
                        counts.1 += 1;
                    }
                }
            }
        }
        counts
    }

    fn b(label: &str, protocol: Protocol, prefix: &str, port: u16) -> Binding {
        Binding { label: label.into(), protocol, prefix: prefix.parse().unwrap(), port }
    }

    #[test]
    fn partitions_nested_prefixes() {
        let a = |l| Answer::new(l, 0, 0);
        let mut p = vec![(10, 19, a(1)), (0, 99, a(0)), (12, 13, a(2)), (50, 50, a(3)), (90, 99, a(4))];
        let parts = partition((0, 99), &mut p, Answer::none());
        let starts: Vec<(u128, u32)> = parts.iter().map(|(s, a)| (*s, a.label)).collect();
        assert_eq!(starts, [(0, 0), (10, 1), (12, 2), (14, 1), (20, 0), (50, 3), (51, 0), (90, 4)]);
        let parts = partition((0, u128::MAX), &mut [(0, u128::MAX, a(7))], Answer::none());
        assert_eq!(parts, [(0, a(7))]);
        assert_eq!(partition((5, 9), &mut [], Answer::none()), [(5, Answer::none())]);
    }

    #[test]
    fn the_precedence_examples_compile_right() {
        use Protocol::{Tcp, Udp};
        let mut set = crate::model::binding::tests::precedence_examples();
        set.extend([b("all", Udp, "::/0", 0), b("v4all", Udp, "0.0.0.0/0", 53), b("w", Udp, "2001:db8::/32", 0)]);
        let mut queries = Vec::new();
        for addr in ["127.1.0.1", "127.0.0.9", "127.0.0.5", "10.0.0.1", "2001:db8::1", "::1", "255.255.255.255", "::"] {
            for port in [80, 81, 443, 53, 1] {
                for protocol in [Tcp, Udp] {
                    queries.push((protocol, addr.parse().unwrap(), port));
                }
            }
        }
        check(&set, queries).unwrap();
    }

    #[test]
    fn unrelated_traffic_reads_absent_chunks() {
        let generation = check(&[b("x", Protocol::Tcp, "10.0.0.0/8", 443)], []).unwrap();
        // One exact segment, no bucket: a wildcard lookup anywhere finds no chunk.
        assert_eq!(generation.dir(0, lookup::bucket_key(0, 0, 0x7f00)), None);
        assert_eq!(generation.dir_chunks.len(), 1);
    }

    fn v6(addr: u128) -> IpAddr {
        IpAddr::V6(addr.into())
    }

    /// An address of the v4-mapped space as a lookup may be given it: IPv4
    /// in the IPv4 region unless `as_v6` (a dual-stack socket's view).
    fn unmapped(addr: u128, as_v6: bool) -> IpAddr {
        match Ipv6Addr::from(addr).to_ipv4_mapped() {
            Some(v4) if !as_v6 => IpAddr::V4(v4),
            _ => v6(addr),
        }
    }

    /// Lookups at the edges of each binding's prefix, inside and just
    /// outside, on its own port and protocol and on `ports` of both.
    fn edge_queries(set: &[Binding], ports: &[u16]) -> Vec<(Protocol, IpAddr, u16)> {
        let mut queries = Vec::new();
        for b in set {
            let (addr, len) = b.prefix.mapped();
            let first = u128::from_be_bytes(addr);
            let last = first | !prefix_mask(len);
            let mut addrs = vec![first, last];
            addrs.extend(first.checked_sub(1));
            addrs.extend(last.checked_add(1));
            for a in addrs {
                for as_v6 in [false, true] {
                    let addr = unmapped(a, as_v6);
                    queries.push((b.protocol, addr, b.port.max(1)));
                    for &port in ports {
                        for protocol in Protocol::ALL {
                            queries.push((protocol, addr, port));
                        }
                    }
                }
            }
        }
        queries
    }

    fn query() -> impl Strategy<Value = (Protocol, IpAddr, u16)> {
        (strategies::protocol(), strategies::clustered_addr(), prop_oneof![Just(80u16), Just(443), Just(1), Just(2)])
    }

    proptest! {
        #![proptest_config(strategies::config(128))]

        /// Random sets of nested, touching and repeated prefixes of both
        /// families and every length, wildcard and exact ports, both
        /// protocols: the compiled tables answer every lookup at the edges
        /// of each prefix, and at random addresses, as the precedence rule
        /// does. A failure shrinks to a minimal set.
        #[test]
        fn compile_and_lookup_agree_with_the_model(
            set in strategies::binding_set(40),
            random in proptest::collection::vec(query(), 0..100),
        ) {
            let mut queries = edge_queries(&set, &[80, 443, 2]);
            queries.extend(random);
            check(&set, queries)?;
        }
    }

    /// Counter sets numbered by what they are, so that every way of
    /// compiling names them alike.
    struct Fixed;

    impl Destinations for Fixed {
        fn dest(&mut self, label: u32, family_index: u32, protocol_index: u32) -> Result<u16> {
            Ok((label * 4 + family_index * 2 + protocol_index) as u16)
        }
    }

    /// Every non-empty directory entry with its segment's ranges, wherever
    /// they lie.
    fn by_key(generation: &Generation) -> BTreeMap<u32, (u32, Answer, Vec<Range>)> {
        let mut out = BTreeMap::new();
        for (chunk, entries) in &generation.dir_chunks {
            for (i, e) in entries.iter().enumerate() {
                if e.count > 0 || e.default.label != Answer::NONE {
                    let ranges = generation.ranges[e.start as usize..(e.start + e.count) as usize].to_vec();
                    out.insert(chunk * CHUNK_ENTRIES + i as u32, (e.count, e.default, ranges));
                }
            }
        }
        out
    }

    /// Fails naming the first entries that differ.
    fn same(got: &Generation, want: &Generation, what: &str) -> Result<(), TestCaseError> {
        let (got, want) = (by_key(got), by_key(want));
        for key in got.keys().chain(want.keys()) {
            prop_assert_eq!(got.get(key), want.get(key), "{}: directory key {}", what, key);
        }
        Ok(())
    }

    /// The longest of `set` holding `b`'s prefix on its protocol and port.
    fn parent_in(set: &[Input], b: &Input) -> Option<Input> {
        set.iter()
            .filter(|p| {
                (p.protocol_index, p.port) == (b.protocol_index, b.port)
                    && p.len < b.len
                    && b.addr & prefix_mask(p.len) == p.addr
            })
            .max_by_key(|p| p.len)
            .copied()
    }

    /// Adds the `pick`th binding of `set` to the rest, then removes it
    /// again, one delta each: both generations match compiling anew, entry
    /// for entry and range for range.
    fn check_deltas(set: &[Binding], pick: usize) -> Result<(), TestCaseError> {
        let mut labels: Vec<String> = set.iter().map(|b| b.label.clone()).collect();
        labels.sort();
        labels.dedup();
        let all: Vec<Input> = set.iter().map(|b| input(b, &labels)).collect();
        let b = all[pick % all.len()];
        let rest: Vec<Input> = all.iter().filter(|i| **i != b).copied().collect();
        let compiled = |inputs: &[Input]| compile(inputs, &mut Fixed).map_err(|e| TestCaseError::fail(e.to_string()));
        let mut generation = compiled(&rest)?;
        let added = delta(&generation, 0, &b, Edit::Add, &mut Fixed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        generation.apply(&added);
        same(&generation, &compiled(&all)?, &format!("adding {b:?}"))?;
        let edit = Edit::Remove { parent: parent_in(&rest, &b) };
        let removed = delta(&generation, 0, &b, edit, &mut Fixed).map_err(|e| TestCaseError::fail(e.to_string()))?;
        generation.apply(&removed);
        same(&generation, &compiled(&rest)?, &format!("removing {b:?}"))?;
        Ok(())
    }

    #[test]
    fn deltas_of_the_precedence_examples() {
        let set = crate::model::binding::tests::precedence_examples();
        for pick in 0..set.len() {
            check_deltas(&set, pick).unwrap();
        }
        use Protocol::{Tcp, Udp};
        let covers = [b("all", Udp, "::/0", 0), b("v4", Udp, "10.0.0.0/8", 0), b("in", Udp, "10.1.0.0/16", 0)];
        let covers = [&covers[..], &[b("mapped", Udp, "::ffff:0:0/96", 0), b("h", Tcp, "::/0", 443)]].concat();
        for pick in 0..covers.len() {
            check_deltas(&covers, pick).unwrap();
        }
    }

    proptest! {
        #![proptest_config(strategies::config(4))]

        /// The same for large sets: many segments and long ones, many
        /// labels and counter sets. A case costs about 0.4 s (a hundred
        /// of the others).
        /// One binding added to or removed from a random set, as a delta,
        /// gives what compiling the changed set anew gives.
        #[test]
        fn deltas_agree_with_compiling_anew(set in strategies::binding_set(60), pick in 0usize..1000) {
            prop_assume!(!set.is_empty());
            check_deltas(&set, pick)?;
        }

        #[test]
        fn large_sets_agree_with_the_model(
            set in strategies::binding_set(1500),
            random in proptest::collection::vec(query(), 0..500),
        ) {
            let mut queries = edge_queries(&set, &[]);
            queries.extend(random);
            check(&set, queries)?;
        }
    }

    /// A generation holds MAX_RANGES ranges; past that compile fails with
    /// `Full` rather than truncating. The cheapest way there: hosts two
    /// addresses apart on one exact port, two ranges each (the host and
    /// the gap after it), in one segment that also starts a range where
    /// it enters the IPv4 region and one where it leaves it. Exactly full
    /// compiles, and its one huge segment is searched right at its ends
    /// and middle (the search's step bound); one host more is refused.
    #[test]
    fn a_set_past_max_ranges_is_full_not_truncated() {
        let host = |i: u32| Input { protocol_index: 0, port: 80, addr: u128::from(i) * 2, len: 128, label: i % 3 };
        let fits = (MAX_RANGES - 2) / 2;
        let mut set: Vec<Input> = (0..fits).map(host).collect();
        let generation = compile(&set, &mut Numbered::default()).unwrap();
        assert_eq!(generation.ranges.len(), MAX_RANGES as usize);
        for i in [0, 1, fits / 2, fits - 2, fits - 1] {
            let at = |addr: u128| {
                lookup::lookup(&generation, 0, 0, 80, Address::v6((addr >> 64) as u64, addr as u64))
                    .map(|a| (a.label, a.len))
            };
            assert_eq!(at(u128::from(i) * 2), Some((i % 3, 128)), "host {i}");
            assert_eq!(at(u128::from(i) * 2 + 1), None, "after host {i}");
        }
        set.push(host(fits));
        let err = compile(&set, &mut Numbered::default()).unwrap_err();
        assert!(matches!(err, Error::Full(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!("these bindings compile to {} address ranges; a generation holds {MAX_RANGES}", MAX_RANGES + 2)
        );
    }

    /// With the bound `check` holds every generation to, a record filled
    /// to MAX_BINDINGS compiles to fewer than MAX_RANGES ranges even with
    /// every port and bucket segment in use: `Full` is a guard that the
    /// record's own limit keeps out of reach.
    #[test]
    fn full_is_out_of_reach_of_a_full_record() {
        let ports = 2 * 65535;
        let buckets = 2 * 2 * 65536;
        let most = range_bound(MAX_BINDINGS as usize, ports, buckets);
        assert!(most <= MAX_RANGES as usize, "{most} > {MAX_RANGES}");
    }

    #[test]
    fn a_hot_port_with_every_length_compiles_to_a_short_segment() {
        let target: IpAddr = "2001:db8::1".parse().unwrap();
        let set: Vec<Binding> = (0..=128)
            .map(|len| Binding {
                label: format!("l{}", len % 5),
                protocol: Protocol::Tcp,
                prefix: Prefix::new(target, len).unwrap(),
                port: 8443,
            })
            .collect();
        let queries = (0..=128u32).map(|bit| {
            let flipped = u128::from_be_bytes(mapped_addr(target)) ^ (1u128 << (127 - bit.min(127)));
            (Protocol::Tcp, v6(flipped), 8443)
        });
        let generation = check(&set, queries.chain([(Protocol::Tcp, target, 8443)])).unwrap();
        assert!(generation.ranges.len() <= 2 * 129 + 3, "{} ranges", generation.ranges.len());
    }
}
