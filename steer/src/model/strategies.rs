//! proptest generators for the model's values, shared by its property
//! tests. Addresses come from a few regions (so prefixes nest and collide
//! often), at every prefix length, in both families, with the v4-mapped
//! IPv6 region among them (one key space with IPv4).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::{prelude::*, test_runner::Config};
use steer_common::MAX_LABEL_LEN;

use super::{Binding, Prefix, Protocol};

/// `cases` cases, few enough for `cargo test`. The proptest! macro sets
/// PROPTEST_CASES over it when that is set, for a longer run
/// (`PROPTEST_CASES=10000 cargo test -p steer --lib model::`).
pub fn config(cases: u32) -> Config {
    Config::with_cases(cases)
}

pub fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![Just(Protocol::Tcp), Just(Protocol::Udp)]
}

/// Mostly the wildcard port, else one of a few exact ones.
pub fn port() -> impl Strategy<Value = u16> {
    prop_oneof![3 => Just(0u16), 2 => Just(80u16), 1 => Just(443u16), 1 => Just(1u16), 1 => Just(65535u16)]
}

/// Any valid label, of every length the rules allow.
pub fn label() -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9._:-]{{1,{MAX_LABEL_LEN}}}")).expect("a valid regex")
}

/// One of a few labels, so that neighbouring prefixes share or differ.
pub fn few_labels() -> impl Strategy<Value = String> {
    (0..6u8).prop_map(|i| format!("l{i}"))
}

/// An address in one of a few regions: a handful of varying bits over a
/// fixed base, so that random prefixes nest, touch and repeat; sometimes
/// any address at all.
pub fn clustered_addr() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        // 10.{0,1}.{0-3}.x
        (0..2u8, 0..4u8, any::<u8>()).prop_map(|(b, c, d)| IpAddr::from([10, b, c, d])),
        // 127.0.{0,1}.x
        (0..2u8, any::<u8>()).prop_map(|(c, d)| IpAddr::from([127, 0, c, d])),
        // The edges of the IPv4 space.
        (any::<bool>(), 0..4u8).prop_map(|(top, d)| IpAddr::from(if top {
            [255, 255, 255, 255 - d]
        } else {
            [0, 0, 0, d]
        })),
        // 2001:db8::/32 with a few bits set high and low.
        (0..4u128, 0..4u128).prop_map(|(hi, lo)| v6(0x2001_0db8 << 96 | hi << 80 | lo)),
        // The v4-mapped region, written as IPv6: ::ffff:10.0.x.x.
        (0..2u128, any::<u8>()).prop_map(|(c, d)| v6(0xffff_0a00_0000 | c << 8 | u128::from(d))),
        // Near :: and near ffff:...:ffff (the space's edges, and bucket 0).
        (0..4u128, any::<bool>()).prop_map(|(x, top)| v6(if top { u128::MAX - x } else { x })),
        any::<u32>().prop_map(|a| IpAddr::V4(Ipv4Addr::from(a))),
        any::<u128>().prop_map(v6),
    ]
}

pub fn v6(addr: u128) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(addr))
}

/// A prefix length for `addr`, of any length but more often near the ends
/// and near the 16-bit bucket boundary the compiler splits at.
pub fn len_for(addr: IpAddr) -> impl Strategy<Value = u8> {
    let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
    let mut lens = vec![(3, (0..=max).boxed()), (2, (max - 8..=max).boxed()), (2, (0..=17u8).boxed())];
    if addr.is_ipv6() {
        // Around the v4-mapped /96 and IPv4's /16 in it.
        lens.push((1, (94..=113u8).boxed()));
    }
    proptest::strategy::Union::new_weighted(lens)
}

/// A prefix of a clustered address.
pub fn clustered_prefix() -> impl Strategy<Value = Prefix> {
    clustered_addr().prop_flat_map(|addr| len_for(addr).prop_map(move |len| Prefix::new(addr, len).expect("len fits")))
}

/// Any prefix at all, of either family.
pub fn any_prefix() -> impl Strategy<Value = Prefix> {
    prop_oneof![
        (any::<u32>(), 0..=32u8).prop_map(|(a, len)| Prefix::new(IpAddr::V4(a.into()), len).expect("len fits")),
        (any::<u128>(), 0..=128u8).prop_map(|(a, len)| Prefix::new(v6(a), len).expect("len fits")),
    ]
}

/// A binding among few labels, at a clustered prefix.
pub fn clustered_binding() -> impl Strategy<Value = Binding> {
    (few_labels(), protocol(), clustered_prefix(), port()).prop_map(|(label, protocol, prefix, port)| Binding {
        label,
        protocol,
        prefix,
        port,
    })
}

/// A binding of any valid label, prefix and port.
pub fn any_binding() -> impl Strategy<Value = Binding> {
    (label(), protocol(), any_prefix(), any::<u16>()).prop_map(|(label, protocol, prefix, port)| Binding {
        label,
        protocol,
        prefix,
        port,
    })
}

/// Up to `max` clustered bindings, one per key (as a set holds them).
pub fn binding_set(max: usize) -> impl Strategy<Value = Vec<Binding>> {
    proptest::collection::vec(clustered_binding(), 1..=max).prop_map(|mut set| {
        let mut seen = std::collections::BTreeSet::new();
        set.retain(|b| seen.insert(b.key()));
        set
    })
}
