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
        if b.port != 0 {
            exact.entry((b.protocol_index, b.port)).or_default().push((b.addr, b.end(), answer));
            continue;
        }
        let in_v4 = b.len >= V4_LEN && b.addr & prefix_mask(V4_LEN) == V4_START;
        let covers_v4 = b.len <= V4_LEN && V4_START & prefix_mask(b.len) == b.addr;
        if in_v4 {
            let v4_len = b.len - V4_LEN;
            let bucket = ((b.addr >> 16) & 0xffff) as u32;
            if v4_len >= 16 {
                long.entry((b.protocol_index, 0, bucket)).or_default().push((b.addr, b.end(), answer));
            } else {
                short.entry((b.protocol_index, 0)).or_default().push((bucket, bucket | (0xffff >> v4_len), answer));
            }
            continue;
        }
        if covers_v4 {
            short.entry((b.protocol_index, 0)).or_default().push((0, 0xffff, answer));
        }
        let bucket = (b.addr >> 112) as u32;
        if b.len >= 16 {
            long.entry((b.protocol_index, 1, bucket)).or_default().push((b.addr, b.end(), answer));
        } else {
            short.entry((b.protocol_index, 1)).or_default().push((bucket, bucket | (0xffff >> b.len), answer));
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
                    let span = if family_index == 0 {
                        let start = V4_START | u128::from(bucket) << 16;
                        (start, start | 0xffff)
                    } else {
                        let start = u128::from(bucket) << 112;
                        (start, start | !prefix_mask(16))
                    };
                    let parts = partition(span, prefixes, Answer::new(Answer::DEFAULT, 0, 0));
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

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use steer_common::lookup::Address;

    use super::*;
    use crate::model::{Binding, Prefix, Protocol, binding::resolve, prefix::mapped_addr};

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
    /// counter set belongs to that label, family and protocol.
    fn check(set: &[Binding], queries: impl IntoIterator<Item = (Protocol, IpAddr, u16)>) -> Generation {
        let mut labels: Vec<String> = set.iter().map(|b| b.label.clone()).collect();
        labels.sort();
        labels.dedup();
        let inputs: Vec<Input> = set.iter().map(|b| input(b, &labels)).collect();
        let mut dests = Numbered::default();
        let generation = compile(&inputs, &mut dests).unwrap();
        for (protocol, addr, port) in queries {
            let p = u32::from(protocol == Protocol::Udp);
            let found = lookup::lookup(&generation, 0, p, u32::from(port), address(addr));
            let want = resolve(set, protocol, addr, port);
            let shown = |b: &Binding| (b.label.clone(), b.prefix.mapped().1);
            assert_eq!(
                found.map(|a| (labels[a.label as usize].clone(), a.len)),
                want.map(shown),
                "{protocol} {addr} port {port}"
            );
            if let Some(a) = found {
                let family = u32::from(addr.is_ipv6() && address(addr).family_index() == 1);
                assert_eq!(dests.0[&(a.label, family, p)], a.dest, "{protocol} {addr} port {port}: counter set");
            }
        }
        generation
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
        check(&set, queries);
    }

    #[test]
    fn unrelated_traffic_reads_absent_chunks() {
        let generation = check(&[b("x", Protocol::Tcp, "10.0.0.0/8", 443)], []);
        // One exact segment, no bucket: a wildcard lookup anywhere finds no chunk.
        assert_eq!(generation.dir(0, lookup::bucket_key(0, 0, 0x7f00)), None);
        assert_eq!(generation.dir_chunks.len(), 1);
    }

    fn v6(addr: u128) -> IpAddr {
        IpAddr::V6(addr.into())
    }

    /// Addresses drawn from a few nearby regions so prefixes nest often.
    fn random_addr(rng: &mut fastrand::Rng) -> IpAddr {
        let noise = rng.u64(..);
        match rng.u8(..4) {
            0 => IpAddr::from([10, (noise & 1) as u8, (noise >> 8) as u8 & 3, (noise >> 16) as u8]),
            1 => IpAddr::from([127, 0, (noise & 1) as u8, (noise >> 8) as u8]),
            2 => v6(0x2001_0db8_0000_0000_0000_0000_0000_0000u128 | u128::from(noise & 0xff00_0000_0003)),
            _ => v6(u128::from(noise) << 64 | u128::from(rng.u8(..4))),
        }
    }

    #[test]
    fn random_sets_agree_with_the_model() {
        // Seeded, so a failing round reproduces.
        let mut rng = fastrand::Rng::with_seed(0x5eed_1234_abcd_0001);
        for round in 0..300 {
            let mut set: Vec<Binding> = Vec::new();
            for _ in 0..rng.usize(1..=40) {
                let addr = random_addr(&mut rng);
                let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
                let len = match rng.u8(..3) {
                    0 => rng.u8(..=max),
                    1 => max - rng.u8(..9),
                    _ => rng.u8(..17),
                };
                let binding = Binding {
                    label: format!("l{}", rng.u8(..6)),
                    protocol: if rng.u8(..3) == 0 { Protocol::Udp } else { Protocol::Tcp },
                    prefix: Prefix::new(addr, len).unwrap(),
                    port: [0, 0, 80, 443, 1][rng.usize(..5)],
                };
                if !set.iter().any(|o| o.key() == binding.key()) {
                    set.push(binding);
                }
            }
            let queries: Vec<_> = (0..200)
                .map(|_| {
                    let protocol = if rng.u8(..3) == 0 { Protocol::Udp } else { Protocol::Tcp };
                    (protocol, random_addr(&mut rng), [80, 443, 1, 2][rng.usize(..4)])
                })
                .collect();
            // Say which round failed, for reproduction.
            let result = std::panic::catch_unwind(|| check(&set, queries.clone()));
            assert!(result.is_ok(), "round {round}: {set:#?}");
        }
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
        let generation = check(&set, queries.chain([(Protocol::Tcp, target, 8443)]));
        assert!(generation.ranges.len() <= 2 * 129 + 3, "{} ranges", generation.ranges.len());
    }
}
