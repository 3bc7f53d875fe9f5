//! sk_lookup dispatchers: what steerctl loads and links to a network
//! namespace.
//!
//! `steer_dispatch` resolves the destination through the compiled bindings
//! (steer-common's `lookup`, over the maps below) and assigns the label's
//! socket; when no binding applies and the seed list is enabled, it falls
//! back to the seed's port list. `echo_dispatch` is the seed program alone
//! (`bpftool prog loadall` loads this object). The programs that follow
//! servers are another object (src/follow.rs).
//!
//! Every map, key and value layout, and the lookup itself, come from
//! `steer-common`, which the userspace side shares.
#![no_std]
#![no_main]
// Program entry points take the kernel's context pointer, valid by contract.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod shared;

use core::{ffi::c_void, ptr};

use shared::*;
use steer_common::{
    Answer, BPF_SK_LOOKUP_F_NO_REUSEPORT, CHUNK_ENTRIES, DataplaneConfig, DestMetrics, DirEntry, ErrorReason, Range,
    SLOT_MEMBERS, SeedMetrics, bpf_sk_lookup, dir_slot,
    kernel::{AF_INET6, EAFNOSUPPORT, ESOCKTNOSUPPORT, SK_DROP, SK_PASS},
    lookup::{self, Address, Tables},
    member_key, range_slot, socket_flag, socket_slot,
};

/// The generation's chunks, read through the maps of maps. Each lookup has
/// its own call site, so the verifier inlines them.
struct Maps;

impl Tables for Maps {
    #[inline(always)]
    fn dir(&self, half: u32, key: u32) -> Option<DirEntry> {
        let chunk: *mut c_void = get(map_ptr(&STEER_DIRS), &dir_slot(half, key));
        if chunk.is_null() {
            return None;
        }
        let entry: *const DirEntry = get(chunk, &(key % CHUNK_ENTRIES));
        // Safety: non-null map values are valid for the program's run.
        if entry.is_null() { None } else { Some(unsafe { *entry }) }
    }

    #[inline(always)]
    fn range(&self, half: u32, index: u32) -> Option<Range> {
        let chunk: *mut c_void = get(map_ptr(&STEER_RANGES), &range_slot(half, index));
        if chunk.is_null() {
            return None;
        }
        let range: *const Range = get(chunk, &(index % CHUNK_ENTRIES));
        // Safety: as above.
        if range.is_null() { None } else { Some(unsafe { *range }) }
    }
}

/// The seed's logic: listed ports go to the one socket in `echo_socket`.
#[inline(always)]
fn seed_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let port = unsafe { (*ctx).local_port } as u16;
    let listed: *const u8 = get(map_ptr(&ECHO_PORTS), &port);
    if listed.is_null() {
        return SK_PASS;
    }
    let metrics: *mut SeedMetrics = get(map_ptr(&SEED_METRICS), &0u32);
    // Per-CPU values: no other CPU writes them. Safety for all the derefs
    // below: non-null map values are valid for the program's run.
    if !metrics.is_null() {
        unsafe { (*metrics).lookups += 1 };
    }
    let sk: *mut c_void = get(map_ptr(&ECHO_SOCKET), &0u32);
    if sk.is_null() {
        // A listed port with no socket is dropped, never handed to
        // whatever else may be bound there.
        if !metrics.is_null() {
            unsafe { (*metrics).misses += 1 };
        }
        return SK_DROP;
    }
    // Safety: sk came from the sockmap lookup above and is released once.
    let err = unsafe { sk_assign(ctx, sk, 0) };
    unsafe { sk_release(sk) };
    if err != 0 {
        if !metrics.is_null() {
            unsafe { (*metrics).errors += 1 };
        }
        return SK_DROP;
    }
    SK_PASS
}

/// Does nothing: the baseline steer-bench measures the others against.
#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn steer_pass(_ctx: *mut bpf_sk_lookup) -> u32 {
    SK_PASS
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn echo_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    seed_dispatch(ctx)
}

/// Reads a context word with a 4-byte load, the width the verifier allows.
#[inline(always)]
fn ctx_word(word: *const u32) -> u32 {
    // Safety: word points into the kernel-provided context.
    u32::from_be(unsafe { ptr::read_volatile(word) })
}

/// Tries the members of socket slot `slot` in order; the first the kernel
/// takes wins. A member that no longer listens (shut down, not yet closed)
/// is passed over. Returns 0, or the last refusal (-EAFNOSUPPORT: no member).
#[inline(always)]
fn assign_slot(ctx: *mut bpf_sk_lookup, slot: u32) -> i64 {
    let flags: *const u32 = get(map_ptr(&SOCKET_FLAGS), &slot);
    // Safety: non-null map values are valid for the program's run.
    let no_reuseport = !flags.is_null() && unsafe { *flags } & socket_flag::NO_REUSEPORT != 0;
    let assign_flags = if no_reuseport { BPF_SK_LOOKUP_F_NO_REUSEPORT } else { 0 };
    let mut err = -EAFNOSUPPORT;
    for member in 0..SLOT_MEMBERS {
        let sk: *mut c_void = get(map_ptr(&SOCKETS), &member_key(slot, member));
        if sk.is_null() {
            continue;
        }
        // Safety: sk came from the sockmap lookup above and is released once.
        err = unsafe { sk_assign(ctx, sk, assign_flags) };
        unsafe { sk_release(sk) };
        if err != -ESOCKTNOSUPPORT {
            break;
        }
    }
    err
}

/// Hands the connection to the answer's label's socket for this family
/// and protocol (for IPv4, a dual-stack IPv6 socket will do), counting it.
#[inline(always)]
fn assign(ctx: *mut bpf_sk_lookup, answer: Answer, family_index: u32, protocol_index: u32) -> u32 {
    let metrics: *mut DestMetrics = get(map_ptr(&METRICS), &u32::from(answer.dest));
    // Per-CPU values: no other CPU writes them. Safety for all the derefs
    // below: non-null map values are valid for the program's run.
    if !metrics.is_null() {
        unsafe { (*metrics).lookups += 1 };
    }
    let mut err = assign_slot(ctx, socket_slot(answer.label, family_index, protocol_index));
    if err == -EAFNOSUPPORT && family_index == 0 {
        err = assign_slot(ctx, socket_slot(answer.label, 1, protocol_index));
    }
    if err == 0 {
        return SK_PASS;
    }
    if !metrics.is_null() {
        let m = unsafe { &mut *metrics };
        // No socket of this family (none at all, or an IPv6-only one for
        // IPv4) is a miss; anything else the kernel refused is an error.
        match (err == -EAFNOSUPPORT, ErrorReason::from_errno(err)) {
            (true, _) => m.misses += 1,
            (false, ErrorReason::BadSocket) => m.errors[0] += 1,
            (false, ErrorReason::AlreadyAssigned) => m.errors[1] += 1,
            (false, ErrorReason::Protocol) => m.errors[2] += 1,
            (false, ErrorReason::Other) => m.errors[3] += 1,
        }
    }
    // Drop rather than let another socket on this address take it.
    SK_DROP
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn steer_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let (family, protocol, port) = unsafe { ((*ctx).family, (*ctx).protocol, (*ctx).local_port) };
    let Some(protocol_index) = lookup::protocol_index(protocol) else { return SK_PASS };
    // All five address words are read up front, each at a constant offset:
    // the verifier rejects a ctx pointer the compiler would otherwise
    // compute from the family.
    let ip4 = ctx_word(unsafe { &raw const (*ctx).local_ip4 });
    let ip6 = [
        ctx_word(unsafe { &raw const (*ctx).local_ip6[0] }),
        ctx_word(unsafe { &raw const (*ctx).local_ip6[1] }),
        ctx_word(unsafe { &raw const (*ctx).local_ip6[2] }),
        ctx_word(unsafe { &raw const (*ctx).local_ip6[3] }),
    ];
    let family_index = u32::from(family == AF_INET6);
    let addr = if family_index == 0 {
        Address::v4(ip4)
    } else {
        Address::v6(u64::from(ip6[0]) << 32 | u64::from(ip6[1]), u64::from(ip6[2]) << 32 | u64::from(ip6[3]))
    };
    let config: *const DataplaneConfig = get(map_ptr(&STEER_CONFIG), &0u32);
    // Safety: non-null map values are valid for the program's run.
    let config = if config.is_null() { DataplaneConfig::default() } else { unsafe { *config } };
    match lookup::lookup(&Maps, u32::from(config.active_half & 1), protocol_index, port, addr) {
        Some(answer) => assign(ctx, answer, family_index, protocol_index),
        None if config.seed_enabled != 0 => seed_dispatch(ctx),
        None => SK_PASS,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
