//! sk_lookup dispatchers: what steerctl loads and links to a network
//! namespace.
//!
//! `steer_dispatch` resolves the destination through the compiled bindings
//! (steer-common's `lookup`, over the maps below) and assigns the label's
//! socket; when no binding applies and the seed list is enabled, it falls
//! back to the seed's port list. While a tracer may be live
//! (`steer_config.trace`), it then hands the decision to the tracers whose
//! filter selects it. `echo_dispatch` is the seed program alone
//! (`bpftool prog loadall` loads this object). The programs that follow
//! servers are another object (src/follow.rs).
//!
//! Every map, key and value layout, and the lookup itself, come from
//! `steer-common`, which the userspace side shares.
#![no_std]
#![no_main]
#![feature(linkage)]
// Program entry points take the kernel's context pointer, valid by contract.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

mod shared;

use core::{ffi::c_void, ptr};

use shared::*;
use steer_common::{
    Answer, BPF_SK_LOOKUP_F_NO_REUSEPORT, CHUNK_ENTRIES, DataplaneConfig, DestMetrics, DirEntry, ErrorReason,
    MAX_TRACERS, Range, SLOT_MEMBERS, SeedMetrics, TRACE_FILTER_LABELS, TraceEvent, TraceFilter, TraceMetrics,
    TraceOutcome, bpf_sk_lookup, dir_slot,
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
        if entry.is_null() {
            return None;
        }
        // Two 8-byte loads, (start, count) and the default: a write of one
        // binding changes either in place with one 8-byte store, so a
        // lookup sees it whole, old or new. Safety: non-null map values are
        // valid for the program's run, and 8-byte aligned.
        let words = entry.cast::<u64>();
        Some(unsafe { DirEntry::from_words([core::ptr::read_volatile(words), core::ptr::read_volatile(words.add(1))]) })
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

/// What the program decided for one lookup: the verdict it returns, and
/// what a tracer is told. In declaration order, as BTF (the kernel checks
/// it) wants the members of the trace function's argument.
#[repr(C)]
struct Decision {
    verdict: u32,
    outcome: TraceOutcome,
    /// The binding's answer; `Answer::none()` when none matched.
    answer: Answer,
    /// The `sockets` (or `echo_socket`) key of the socket assigned or refused.
    member: u32,
    /// bpf_sk_assign's refusal (a negative errno), 0.
    err: i64,
}

impl Decision {
    /// No binding, no seed port: the kernel's normal lookup decides.
    #[inline(always)]
    fn normal() -> Self {
        Self::seed(SK_PASS, TraceOutcome::Normal, TraceEvent::NO_MEMBER, 0)
    }

    #[inline(always)]
    fn seed(verdict: u32, outcome: TraceOutcome, member: u32, err: i64) -> Self {
        Self { verdict, outcome, answer: Answer::none(), member, err }
    }
}

/// The seed's logic: listed ports go to the one socket in `echo_socket`.
#[inline(always)]
fn seed_dispatch(ctx: *mut bpf_sk_lookup) -> Decision {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let port = unsafe { (*ctx).local_port } as u16;
    let listed: *const u8 = get(map_ptr(&ECHO_PORTS), &port);
    if listed.is_null() {
        return Decision::normal();
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
        return Decision::seed(SK_DROP, TraceOutcome::SeedMiss, TraceEvent::NO_MEMBER, 0);
    }
    // Safety: sk came from the sockmap lookup above and is released once.
    let err = unsafe { sk_assign(ctx, sk, 0) };
    unsafe { sk_release(sk) };
    if err != 0 {
        if !metrics.is_null() {
            unsafe { (*metrics).errors += 1 };
        }
        return Decision::seed(SK_DROP, TraceOutcome::SeedError, 0, err);
    }
    Decision::seed(SK_PASS, TraceOutcome::Seed, 0, 0)
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
    seed_dispatch(ctx).verdict
}

/// Reads a context word with a 4-byte load, the width the verifier allows.
#[inline(always)]
fn ctx_word(word: *const u32) -> u32 {
    // Safety: word points into the kernel-provided context.
    u32::from_be(unsafe { ptr::read_volatile(word) })
}

/// Tries the members of socket slot `slot` in order; the first the kernel
/// takes wins. A member that no longer listens (shut down, not yet closed)
/// is passed over. Returns 0, or the last refusal (-EAFNOSUPPORT: no
/// member), and the key of the last member tried.
#[inline(always)]
fn assign_slot(ctx: *mut bpf_sk_lookup, slot: u32) -> (i64, u32) {
    let flags: *const u32 = get(map_ptr(&SOCKET_FLAGS), &slot);
    // Safety: non-null map values are valid for the program's run.
    let no_reuseport = !flags.is_null() && unsafe { *flags } & socket_flag::NO_REUSEPORT != 0;
    let assign_flags = if no_reuseport { BPF_SK_LOOKUP_F_NO_REUSEPORT } else { 0 };
    let (mut err, mut tried) = (-EAFNOSUPPORT, TraceEvent::NO_MEMBER);
    for member in 0..SLOT_MEMBERS {
        let key = member_key(slot, member);
        let sk: *mut c_void = get(map_ptr(&SOCKETS), &key);
        if sk.is_null() {
            continue;
        }
        // Safety: sk came from the sockmap lookup above and is released once.
        err = unsafe { sk_assign(ctx, sk, assign_flags) };
        unsafe { sk_release(sk) };
        tried = key;
        if err != -ESOCKTNOSUPPORT {
            break;
        }
    }
    (err, tried)
}

/// Hands the connection to the answer's label's socket for this family
/// and protocol (for IPv4, a dual-stack IPv6 socket will do), counting it.
#[inline(always)]
fn assign(ctx: *mut bpf_sk_lookup, answer: Answer, family_index: u32, protocol_index: u32) -> Decision {
    let metrics: *mut DestMetrics = get(map_ptr(&METRICS), &u32::from(answer.dest));
    // Per-CPU values: no other CPU writes them. Safety for all the derefs
    // below: non-null map values are valid for the program's run.
    if !metrics.is_null() {
        unsafe { (*metrics).lookups += 1 };
    }
    let (mut err, mut member) = assign_slot(ctx, socket_slot(answer.label, family_index, protocol_index));
    if err == -EAFNOSUPPORT && family_index == 0 {
        (err, member) = assign_slot(ctx, socket_slot(answer.label, 1, protocol_index));
    }
    if err == 0 {
        return Decision { verdict: SK_PASS, outcome: TraceOutcome::Assigned, answer, member, err };
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
    let outcome = if err == -EAFNOSUPPORT { TraceOutcome::Miss } else { TraceOutcome::Error };
    Decision { verdict: SK_DROP, outcome, answer, member, err }
}

/// Whether `filter` selects a decision of `outcome` for `label` (the
/// matched binding's, or `Answer::NONE`) on a lookup of `protocol_index`
/// from `remote` to `local`:`port`.
#[inline(always)]
fn selects(
    filter: &TraceFilter,
    outcome: TraceOutcome,
    label: u32,
    protocol_index: u32,
    port: u32,
    local: Address,
    remote: Address,
) -> bool {
    if filter.protocols & (1 << protocol_index) == 0 || filter.outcomes & outcome.bit() == 0 {
        return false;
    }
    if filter.local_port != 0 && u32::from(filter.local_port) != port {
        return false;
    }
    if filter.labels_len != 0 {
        let mut named = false;
        for i in 0..TRACE_FILTER_LABELS {
            named |= i < usize::from(filter.labels_len) && filter.labels[i] == label;
        }
        if !named {
            return false;
        }
    }
    filter.local.matches(local) && filter.remote.matches(remote)
}

/// Counts into a tracer's slot of `trace_metrics` (or the totals, at MAX_TRACERS).
#[inline(always)]
fn trace_count(slot: u32, f: impl FnOnce(&mut TraceMetrics)) {
    let m: *mut TraceMetrics = get(map_ptr(&TRACE_METRICS), &slot);
    if !m.is_null() {
        // Safety: a per-CPU value, valid for the program's run.
        f(unsafe { &mut *m });
    }
}

/// Hands `decision` to every live tracer whose filter selects it. A slot
/// counts while its tracer's socket is in `trace_tracers`, where the
/// kernel takes it out when the tracer exits, however it exits: a slot
/// found without one is turned off, and with no live slot left, so is
/// `steer_config.trace`. A subprogram (a BPF-to-BPF call) with one call
/// site: inlined, it cost the lookups that never trace. Named by hand,
/// internal: a mangled name carries the crate hash, which depends on the
/// clone's path, and the committed object must build byte-identical
/// anywhere; xtask makes it static in BTF too, for Linux 5.10's verifier.
#[inline(never)]
#[unsafe(no_mangle)]
#[linkage = "internal"]
fn steer_trace(ctx: *mut bpf_sk_lookup, decision: &Decision) -> u32 {
    // Safety: the kernel hands every sk_lookup program a valid context;
    // every word is read at a constant offset, as in steer_dispatch.
    let (family, protocol, port) = unsafe { ((*ctx).family, (*ctx).protocol, (*ctx).local_port) };
    let Some(protocol_index) = lookup::protocol_index(protocol) else { return 0 };
    let (local, _) = local_address(ctx);
    let remote = if family == AF_INET6 {
        let w = [
            ctx_word(unsafe { &raw const (*ctx).remote_ip6[0] }),
            ctx_word(unsafe { &raw const (*ctx).remote_ip6[1] }),
            ctx_word(unsafe { &raw const (*ctx).remote_ip6[2] }),
            ctx_word(unsafe { &raw const (*ctx).remote_ip6[3] }),
        ];
        Address::v6(u64::from(w[0]) << 32 | u64::from(w[1]), u64::from(w[2]) << 32 | u64::from(w[3]))
    } else {
        Address::v4(ctx_word(unsafe { &raw const (*ctx).remote_ip4 }))
    };
    // Four bytes: the port (network order, first) and its padding, the
    // width every kernel accepts (the field was a u32 before Linux 5.18).
    let remote_port = u16::from_be(unsafe { ptr::read_volatile((&raw const (*ctx).remote_port).cast::<u32>()) } as u16);
    let answer = decision.answer;
    let mut event = TraceEvent {
        time_ns: 0,
        local: [local.hi, local.lo],
        remote: [remote.hi, remote.lo],
        local_port: port as u16,
        remote_port,
        family: family as u8,
        protocol: protocol as u8,
        outcome: decision.outcome as u8,
        len: answer.len,
        label: answer.label,
        member: decision.member,
        errno: (-decision.err) as u32,
        dest: answer.dest,
        _pad: 0,
    };
    let mut live = 0u32;
    for slot in 0..MAX_TRACERS {
        let filter: *mut TraceFilter = get(map_ptr(&TRACE_FILTERS), &slot);
        // Safety: non-null map values are valid for the program's run.
        if filter.is_null() || unsafe { (*filter).active } == 0 {
            continue;
        }
        let sk: *mut c_void = get(map_ptr(&TRACE_TRACERS), &slot);
        if sk.is_null() {
            // The tracer is gone.
            unsafe { (*filter).active = 0 };
            continue;
        }
        // Safety: sk came from the sockmap lookup above and is released once.
        unsafe { sk_release(sk) };
        live += 1;
        let f = unsafe { &*filter };
        if !selects(f, decision.outcome, answer.label, protocol_index, port, local, remote) {
            continue;
        }
        trace_count(slot, |m| m.matched += 1);
        // One in `sample`, at random (0 and 1: every one).
        if f.sample > 1 && prandom_u32().checked_rem(f.sample).is_some_and(|r| r != 0) {
            trace_count(slot, |m| m.sampled_out += 1);
            continue;
        }
        let ring: *mut c_void = get(map_ptr(&TRACE_RINGS), &slot);
        if ring.is_null() {
            continue;
        }
        if event.time_ns == 0 {
            event.time_ns = ktime_get_ns();
        }
        // Safety: event lives for the call; its size is given.
        let err = unsafe { ringbuf_output(ring, ptr::from_ref(&event).cast(), size_of::<TraceEvent>() as u64, 0) };
        let lost = u64::from(err != 0);
        for counted in [slot, MAX_TRACERS] {
            trace_count(counted, |m| {
                m.events += 1 - lost;
                m.lost += lost;
            });
        }
    }
    if live == 0 {
        let config: *mut DataplaneConfig = get(map_ptr(&STEER_CONFIG), &0u32);
        if !config.is_null() {
            // Safety: as above; one byte, which only this and tracers write.
            unsafe { (*config).trace = 0 };
        }
    }
    0
}

/// The lookup's local address (v4-mapped) and family index (1: IPv6).
#[inline(always)]
fn local_address(ctx: *mut bpf_sk_lookup) -> (Address, u32) {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let family = unsafe { (*ctx).family };
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
    (addr, family_index)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn steer_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let (protocol, port) = unsafe { ((*ctx).protocol, (*ctx).local_port) };
    let Some(protocol_index) = lookup::protocol_index(protocol) else { return SK_PASS };
    let (addr, family_index) = local_address(ctx);
    let config: *const DataplaneConfig = get(map_ptr(&STEER_CONFIG), &0u32);
    // Safety: non-null map values are valid for the program's run.
    let config = if config.is_null() { DataplaneConfig::default() } else { unsafe { *config } };
    let tracing = config.trace != 0;
    let decision = match lookup::lookup(&Maps, u32::from(config.active_half & 1), protocol_index, port, addr) {
        Some(answer) => assign(ctx, answer, family_index, protocol_index),
        None if config.seed_enabled != 0 => seed_dispatch(ctx),
        None => Decision::normal(),
    };
    // One call site: the decision's details go to memory only when traced.
    if tracing && cfg!(not(feature = "untraced")) {
        steer_trace(ctx, &decision);
    }
    decision.verdict
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
