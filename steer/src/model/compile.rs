//! Compiling bindings into a generation: the sorted ranges and directory
//! that steer-common's `lookup` searches (see its module docs for the
//! layout). Pure; the same `lookup` runs over the result here in tests, so
//! what is compiled is checked against the precedence rule directly.

use std::collections::{BTreeMap, BTreeSet};

use steer_common::{
    Answer, BindingKey, CHUNK_ENTRIES, DirEntry, MAX_RANGES, Range,
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
/// Buckets with a segment, each with the run of sorted bindings holding
/// its prefixes (among others).
type Segments = Vec<(u32, std::ops::Range<usize>)>;

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

    /// Its record key and label: what [`compile`] takes.
    pub fn entry(&self) -> (BindingKey, u32) {
        let protocol =
            [steer_common::kernel::IPPROTO_TCP, steer_common::kernel::IPPROTO_UDP][self.protocol_index as usize];
        (BindingKey::new(protocol as u8, self.len, self.port, self.addr.to_be_bytes()), self.label)
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
        let empty = DirEntry::NONE;
        let chunk = self.dir_chunks.entry(key / CHUNK_ENTRIES).or_insert_with(|| vec![empty; CHUNK_ENTRIES as usize]);
        chunk[(key % CHUNK_ENTRIES) as usize] = entry;
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

/// The address a range starts at.
fn range_start(range: &Range) -> u128 {
    u128::from(range.start[0]) << 64 | u128::from(range.start[1])
}

/// Appends the ranges of segment `span` (inclusive) to `out`: each starts
/// where the innermost covering prefix changes, `base` where none covers;
/// split at the edges of the IPv4 region so that each range is one
/// family's; each answer naming its counter set. `prefixes` are (start,
/// end, answer), nested or disjoint (prefixes always are), each once,
/// containers before what they contain: by start, then end descending.
fn segment_into(
    span: (u128, u128),
    prefixes: impl IntoIterator<Item = Interval>,
    base: Answer,
    protocol_index: u32,
    dests: &mut impl Destinations,
    out: &mut Vec<Range>,
) -> Result<()> {
    let first = out.len();
    // Appends a range of this segment, replacing the last one where that
    // starts at the same address, merged into it where it answers the same.
    let push = |out: &mut Vec<Range>, start: u128, answer: Answer| {
        if out.len() > first && out.last().is_some_and(|last| range_start(last) == start) {
            out.pop();
        }
        if out.len() > first && out.last().is_some_and(|last| last.answer == answer) {
            return;
        }
        out.push(Range { start: [(start >> 64) as u64, start as u64], answer });
    };
    push(out, span.0, base);
    // The prefixes holding the current one: (end, answer), innermost last.
    let mut open: Vec<(u128, Answer)> = Vec::new();
    for (start, end, answer) in prefixes {
        debug_assert!(out.len() == first + 1 || range_start(&out[out.len() - 1]) <= start, "prefixes out of order");
        while let Some(&(open_end, _)) = open.last() {
            if open_end >= start {
                break;
            }
            open.pop();
            push(out, open_end + 1, open.last().map_or(base, |o| o.1));
        }
        push(out, start, answer);
        open.push((end, answer));
    }
    while let Some((open_end, _)) = open.pop() {
        if open_end < span.1 {
            push(out, open_end + 1, open.last().map_or(base, |o| o.1));
        }
    }
    for edge in [V4_START, V4_END + 1] {
        if span.0 < edge && edge <= span.1 {
            let at = first + out[first..].partition_point(|r| range_start(r) <= edge);
            let holder = out[at - 1];
            if range_start(&holder) != edge {
                out.insert(at, Range { start: [(edge >> 64) as u64, edge as u64], answer: holder.answer });
            }
        }
    }
    for range in &mut out[first..] {
        let (label, family) = (range.answer.label, family_of(range_start(range)));
        if label != Answer::NONE && label != Answer::DEFAULT {
            range.answer.dest = dests.dest(label, family, protocol_index)?;
        }
    }
    Ok(())
}

fn family_of(addr: u128) -> u32 {
    u32::from(!(V4_START..=V4_END).contains(&addr))
}

/// Turns a segment's partition (as [`parts_of`] gives it) into its
/// ranges, splitting at the edges of the IPv4 region so that each range is
/// one family's, and naming each answer's counter set.
fn ranges(
    parts: &[(u128, Answer)],
    span_end: u128,
    protocol_index: u32,
    dests: &mut impl Destinations,
) -> Result<Vec<Range>> {
    let mut out = Vec::with_capacity(parts.len() + 2);
    let mut push = |start: u128, mut answer: Answer| -> Result<()> {
        if answer.label != Answer::NONE && answer.label != Answer::DEFAULT {
            answer.dest = dests.dest(answer.label, family_of(start), protocol_index)?;
        }
        out.push(Range { start: [(start >> 64) as u64, start as u64], answer });
        Ok(())
    };
    for (i, &(start, answer)) in parts.iter().enumerate() {
        push(start, answer)?;
        let end = parts.get(i + 1).map_or(span_end, |next| next.0 - 1);
        // In order: past `start`, and before the next part's.
        for edge in [V4_START, V4_END + 1] {
            if start < edge && edge <= end {
                push(edge, answer)?;
            }
        }
    }
    Ok(out)
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
    /// Whether the prefix lies in the IPv4 region.
    fn in_v4(&self) -> bool {
        self.len >= V4_LEN && self.addr & prefix_mask(V4_LEN) == V4_START
    }

    /// Whether the prefix holds the whole IPv4 region.
    fn covers_v4(&self) -> bool {
        self.len <= V4_LEN && V4_START & prefix_mask(self.len) == self.addr
    }

    /// Where this binding lives in its own family (for a wildcard prefix
    /// that covers the IPv4 region from outside it, its IPv6 place).
    pub fn placement(&self) -> Placement {
        let protocol_index = self.protocol_index;
        if self.port != 0 {
            return Placement::Exact { protocol_index, port: self.port };
        }
        if self.in_v4() {
            let v4_len = self.len - V4_LEN;
            let bucket = ((self.addr >> 16) & 0xffff) as u32;
            return if v4_len >= 16 {
                Placement::Long { protocol_index, family_index: 0, bucket }
            } else {
                Placement::Short { protocol_index, family_index: 0, first: bucket, last: bucket | (0xffff >> v4_len) }
            };
        }
        let bucket = (self.addr >> 112) as u32;
        if self.len >= 16 {
            Placement::Long { protocol_index, family_index: 1, bucket }
        } else {
            Placement::Short { protocol_index, family_index: 1, first: bucket, last: bucket | (0xffff >> self.len) }
        }
    }

    /// Where this binding lives: one place, or two for a wildcard prefix
    /// that covers the IPv4 region from outside it (the IPv4 buckets'
    /// default, and its IPv6 place).
    pub fn placements(&self) -> impl Iterator<Item = Placement> {
        let v4_default = (self.port == 0 && !self.in_v4() && self.covers_v4()).then_some(Placement::Short {
            protocol_index: self.protocol_index,
            family_index: 0,
            first: 0,
            last: 0xffff,
        });
        v4_default.into_iter().chain([self.placement()])
    }

    /// The traffic families (0 IPv4, 1 IPv6) whose addresses the prefix
    /// holds: the counter sets a binding may count in.
    pub fn families(&self) -> [bool; 2] {
        let in_v4 = self.in_v4();
        [in_v4 || self.covers_v4(), !in_v4]
    }

    /// Whether this binding answers where `placement` decides: in the same
    /// segment, or among the same family's bucket defaults (a parent found
    /// for an unbind may be short where the binding is long).
    fn shares(&self, placement: &Placement) -> bool {
        self.placements().any(|mine| match (mine, *placement) {
            (
                Placement::Short { protocol_index: p, family_index: f, .. },
                Placement::Short { protocol_index, family_index, .. },
            ) => (p, f) == (protocol_index, family_index),
            _ => mine == *placement,
        })
    }
}

/// Where a binding sorts in the order [`compile`] walks: by protocol and
/// port, then by address, containers before what they contain. Equal keys
/// sort together, and only they.
fn sort_key(key: &BindingKey) -> (u32, u128, u8) {
    (u32::from(key.protocol) << 16 | u32::from(key.port()), u128::from_be_bytes(key.addr), key.prefixlen)
}

/// Sorts bindings in the order [`compile`] walks them: compiling a set
/// sorted so costs no second sort.
pub fn order(bindings: &mut [(BindingKey, u32)]) {
    bindings.sort_unstable_by_key(|(key, _)| sort_key(key));
}

/// The interval and answer of a binding in its segment.
fn interval(b: &Input) -> Interval {
    (b.addr, b.end(), Answer::new(b.label, 0, b.len))
}

/// Compiles bindings (each key once, as a record holds them) into a
/// generation, sorting them in [`order`] first. `dests` names each (label,
/// family, protocol) the bindings can reach.
///
/// One pass over the sorted bindings: each exact port's are one run, a
/// segment, partitioned as it is reached; each protocol's wildcard ones
/// are one run too, in address order, noted by bucket (and short prefixes
/// as bucket defaults) and partitioned after, bucket by bucket. Nothing is
/// copied per binding but the ranges themselves.
pub fn compile(bindings: &mut [(BindingKey, u32)], dests: &mut impl Destinations) -> Result<Generation> {
    order(bindings);
    let bindings: &[(BindingKey, u32)] = bindings;
    let input = |i: usize| Input::from_key(&bindings[i].0, bindings[i].1);
    let mut generation = Generation::default();
    // Wildcard prefixes by (protocol, family): for each bucket whose
    // segment some lie in (/16 and longer in their family), the run of
    // bindings that holds them (among others of the protocol's wildcard
    // ones: the IPv4 region lies inside IPv6 bucket 0); short ones as
    // bucket defaults.
    let mut long: BTreeMap<(u32, u32), Segments> = BTreeMap::new();
    let mut short: BTreeMap<(u32, u32), Vec<BucketRun>> = BTreeMap::new();
    let mut i = 0;
    while i < bindings.len() {
        let (protocol, port) = (bindings[i].0.protocol, bindings[i].0.port);
        let end = i + bindings[i..].partition_point(|(k, _)| (k.protocol, k.port) == (protocol, port));
        let first = input(i);
        if first.port != 0 {
            // An exact port's segment, over the whole address space.
            let start = generation.ranges.len();
            let prefixes = (i..end).map(|j| interval(&input(j)));
            let p = first.protocol_index;
            segment_into((0, u128::MAX), prefixes, Answer::none(), p, dests, &mut generation.ranges)?;
            let entry = DirEntry {
                start: start as u32,
                count: (generation.ranges.len() - start) as u32,
                default: Answer::none(),
            };
            generation.set_dir(lookup::port_key(p, u32::from(first.port)), entry);
        } else {
            for j in i..end {
                let b = input(j);
                for placement in b.placements() {
                    match placement {
                        Placement::Long { protocol_index, family_index, bucket } => {
                            // In address order, each family's buckets ascend.
                            let runs = long.entry((protocol_index, family_index)).or_default();
                            match runs.last_mut() {
                                Some((last, run)) if *last == bucket => run.end = j + 1,
                                _ => runs.push((bucket, j..j + 1)),
                            }
                        }
                        Placement::Short { protocol_index, family_index, first, last } => short
                            .entry((protocol_index, family_index))
                            .or_default()
                            .push((first, last, Answer::new(b.label, 0, b.len))),
                        Placement::Exact { .. } => unreachable!("a wildcard binding"),
                    }
                }
            }
        }
        i = end;
    }

    // Wildcard buckets, per (protocol, family): each bucket's default is the
    // longest short prefix covering it; its segment, its long prefixes.
    let families: BTreeSet<(u32, u32)> = short.keys().chain(long.keys()).copied().collect();
    for (protocol_index, family_index) in families {
        let mut defaults = vec![Answer::none(); 1 << 16];
        let mut covered = vec![false; 1 << 16];
        let mut covers = short.remove(&(protocol_index, family_index)).unwrap_or_default();
        covers.sort_by_key(|c| c.2.len);
        for &(first, last, answer) in &covers {
            defaults[first as usize..=last as usize].fill(answer);
            covered[first as usize..=last as usize].fill(true);
        }
        let mut runs = long.remove(&(protocol_index, family_index)).unwrap_or_default().into_iter().peekable();
        for bucket in 0..1u32 << 16 {
            let run = runs.next_if(|(b, _)| *b == bucket).map(|(_, run)| run);
            if run.is_none() && !covered[bucket as usize] {
                continue;
            }
            let mut default = defaults[bucket as usize];
            if default.label != Answer::NONE {
                default.dest = dests.dest(default.label, family_index, protocol_index)?;
            }
            let start = generation.ranges.len();
            if let Some(run) = run {
                let placement = Placement::Long { protocol_index, family_index, bucket };
                let prefixes = run.map(input).filter(|b| b.placement() == placement).map(|b| interval(&b));
                let (span, base) = segment_span(&placement);
                segment_into(span, prefixes, base, protocol_index, dests, &mut generation.ranges)?;
            }
            let count = (generation.ranges.len() - start) as u32;
            generation.set_dir(
                lookup::bucket_key(protocol_index, family_index, bucket),
                DirEntry { start: start as u32, count, default },
            );
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
        let entry = tables.dir(half, key).unwrap_or(DirEntry::NONE);
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
            if parts == [(span.0, base)] { Vec::new() } else { ranges(&parts, span.1, protocol_index, dests)? };
        out.segments.push((key, segment));
    }
    Ok(out)
}

impl Generation {
    /// Applies `delta` as the plane does: rewritten segments appended to
    /// the ranges (their old ranges left where they are), entries
    /// replaced.
    pub fn apply(&mut self, delta: &Delta) {
        let empty = DirEntry::NONE;
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

    fn entries(inputs: &[Input]) -> Vec<(BindingKey, u32)> {
        inputs.iter().map(Input::entry).collect()
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
        let generation = compile(&mut entries(&inputs), &mut dests).map_err(|e| TestCaseError::fail(e.to_string()))?;
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
        let partition = |span, prefixes: &[Interval]| {
            let mut prefixes = prefixes.to_vec();
            prefixes.sort_by_key(|&(start, end, _)| (start, std::cmp::Reverse(end)));
            let mut out = vec![Range { start: [7, 7], answer: a(9) }];
            segment_into(span, prefixes, Answer::none(), 0, &mut Fixed, &mut out).unwrap();
            assert_eq!(out[0].start, [7, 7], "the ranges before are left alone");
            out[1..].iter().map(|r| (range_start(r), r.answer.label)).collect::<Vec<_>>()
        };
        let p = [(10, 19, a(1)), (0, 99, a(0)), (12, 13, a(2)), (50, 50, a(3)), (90, 99, a(4))];
        assert_eq!(partition((0, 99), &p), [(0, 0), (10, 1), (12, 2), (14, 1), (20, 0), (50, 3), (51, 0), (90, 4)]);
        // The IPv4 region's edges split the range that crosses them.
        assert_eq!(partition((0, u128::MAX), &[(0, u128::MAX, a(7))]), [(0, 7), (V4_START, 7), (V4_END + 1, 7)]);
        assert_eq!(partition((5, 9), &[]), [(5, Answer::NONE)]);
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
        let compiled = |inputs: &[Input]| {
            compile(&mut entries(inputs), &mut Fixed).map_err(|e| TestCaseError::fail(e.to_string()))
        };
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
        let generation = compile(&mut entries(&set), &mut Numbered::default()).unwrap();
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
        let err = compile(&mut entries(&set), &mut Numbered::default()).unwrap_err();
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
