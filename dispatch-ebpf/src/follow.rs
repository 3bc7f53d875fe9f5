//! The programs that follow servers for steer, in their own object so the
//! dispatcher's stays one bpftool can load whole.
//!
//! `steer_follow` (sock_ops) puts a listening socket whose address is in
//! `follows` into its registrations' slots inside listen();
//! `steer_follow_bind4/6` (cgroup post_bind) report a followed UDP bind
//! over a ring buffer; `steer_backfill_tcp/udp` (iterators) insert the
//! sockets userspace names in `backfill`. The maps are the dispatcher's,
//! reused from their pins.
#![no_std]
#![no_main]
// Program entry points take the kernel's context pointer, valid by contract.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[path = "shared.rs"]
mod shared;

use core::{ffi::c_void, ptr};

use shared::*;
use steer_common::{
    BackfillValue, FOLLOW_ENTRIES, FollowEntry, FollowEvent, FollowKey, FollowMetrics, FollowValue, SLOT_MEMBERS,
    bpf_sock, bpf_sock_ops, follow_flag,
    kernel::{AF_INET, AF_INET6, BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_TCP_LISTEN_CB, EEXIST, IPPROTO_TCP, IPPROTO_UDP},
    member_key, socket_slot,
};

/// The scope these follow programs are (set when they are loaded): the
/// cgroup they are attached to. A registration names the scope whose
/// programs may insert its sockets.
#[unsafe(no_mangle)]
static STEER_SCOPE: u32 = 0;

/// The network namespace (its cookie) the state serves, set when loaded:
/// the cgroup hooks see every namespace's sockets.
#[unsafe(no_mangle)]
static STEER_NETNS_COOKIE: u64 = 0;

#[inline(always)]
fn scope() -> u16 {
    // Safety: a global the loader set; volatile so it is read, not folded.
    unsafe { ptr::read_volatile(&raw const STEER_SCOPE) as u16 }
}

#[inline(always)]
fn state_netns() -> u64 {
    // Safety: as above.
    unsafe { ptr::read_volatile(&raw const STEER_NETNS_COOKIE) }
}

/// Counts into `follow_metrics`.
#[inline(always)]
fn follow_count(f: impl FnOnce(&mut FollowMetrics)) {
    let m: *mut FollowMetrics = get(map_ptr(&FOLLOW_METRICS), &0u32);
    if !m.is_null() {
        // Safety: a per-CPU value, valid for the program's run.
        f(unsafe { &mut *m });
    }
}

/// The follow key of a socket: IPv4 in the first four address bytes.
#[inline(always)]
fn follow_key(family: u32, protocol: u8, port: u32, ip4: u32, ip6: [u32; 4]) -> Option<FollowKey> {
    let mut key = FollowKey { family: family as u8, protocol, port: port as u16, addr: [0; 16] };
    if family == AF_INET {
        key.addr[..4].copy_from_slice(&ip4.to_ne_bytes());
    } else if family == AF_INET6 {
        for (i, word) in ip6.iter().enumerate() {
            key.addr[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
    } else {
        return None;
    }
    Some(key)
}

/// Puts the listening socket of `ctx` in `entry`'s slot: the first free
/// member from the front, or from the back for a wildcard listener that
/// covers the registered address, so sockets bound to the address itself
/// come first.
#[inline(always)]
fn follow_insert(ctx: *mut bpf_sock_ops, entry: &FollowEntry, family_index: u32) {
    let slot = socket_slot(entry.label, family_index, 0);
    let cover = entry.flags & follow_flag::COVER != 0;
    for i in 0..SLOT_MEMBERS {
        let member = if cover { SLOT_MEMBERS - 1 - i } else { i };
        let key = member_key(slot, member);
        // Safety: ctx is the program's context; key lives for the call.
        let err = unsafe { sock_map_update(ctx, map_ptr(&SOCKETS), ptr::from_ref(&key).cast(), BPF_NOEXIST) };
        if err == 0 {
            follow_count(|m| m.inserted += 1);
            return;
        }
        if err != -EEXIST {
            follow_count(|m| m.errors += 1);
            return;
        }
    }
    follow_count(|m| m.full += 1);
}

/// sock_ops: a socket that starts listening on a followed address goes
/// into its registrations' slots before listen() returns.
#[unsafe(no_mangle)]
#[unsafe(link_section = "sockops")]
pub extern "C" fn steer_follow(ctx: *mut bpf_sock_ops) -> u32 {
    // Every field is read up front, at a constant offset (the verifier
    // rejects a ctx pointer computed from the family).
    // Safety: the kernel hands every sock_ops program a valid context.
    let (op, family, port) = unsafe { ((*ctx).op, (*ctx).family, (*ctx).local_port) };
    if op != BPF_SOCK_OPS_TCP_LISTEN_CB {
        return 1;
    }
    let ip4 = unsafe { ptr::read_volatile(&raw const (*ctx).local_ip4) };
    let ip6 = [
        unsafe { ptr::read_volatile(&raw const (*ctx).local_ip6[0]) },
        unsafe { ptr::read_volatile(&raw const (*ctx).local_ip6[1]) },
        unsafe { ptr::read_volatile(&raw const (*ctx).local_ip6[2]) },
        unsafe { ptr::read_volatile(&raw const (*ctx).local_ip6[3]) },
    ];
    // Safety: ctx is the program's context.
    if unsafe { netns_cookie(ctx.cast()) } != state_netns() {
        return 1;
    }
    let Some(key) = follow_key(family, IPPROTO_TCP as u8, port, ip4, ip6) else { return 1 };
    let value: *const FollowValue = get(map_ptr(&FOLLOWS), &key);
    if value.is_null() {
        return 1;
    }
    let family_index = u32::from(family == AF_INET6);
    for i in 0..FOLLOW_ENTRIES {
        // Safety: non-null map values are valid for the program's run.
        let entry = unsafe { (*value).entries[i] };
        if entry.label != FollowEntry::NONE && entry.scope == scope() {
            follow_insert(ctx, &entry, family_index);
        }
    }
    1
}

/// post_bind: a followed UDP bind is reported to userspace, which inserts
/// the socket with a backfill pass. The bind always goes ahead. Each of the
/// two programs reads only its own family's address (the kernel refuses
/// the other's).
#[inline(always)]
fn follow_bind(ctx: *mut bpf_sock, ip4: u32, ip6: [u32; 4]) -> u32 {
    // Safety: the kernel hands every cgroup sock program a valid context.
    let (family, protocol, port) = unsafe { ((*ctx).family, (*ctx).protocol, (*ctx).src_port) };
    if protocol != IPPROTO_UDP {
        return 1;
    }
    // Safety: ctx is the program's context.
    if unsafe { netns_cookie(ctx.cast()) } != state_netns() {
        return 1;
    }
    let Some(key) = follow_key(family, IPPROTO_UDP as u8, port, ip4, ip6) else { return 1 };
    let value: *const FollowValue = get(map_ptr(&FOLLOWS), &key);
    if value.is_null() {
        return 1;
    }
    let mut ours = false;
    for i in 0..FOLLOW_ENTRIES {
        // Safety: non-null map values are valid for the program's run.
        let entry = unsafe { (*value).entries[i] };
        ours |= entry.label != FollowEntry::NONE && entry.scope == scope();
    }
    if !ours {
        return 1;
    }
    // Safety: ctx is the program's context.
    let event = FollowEvent { cookie: unsafe { socket_cookie(ctx.cast()) }, key, _pad: 0 };
    // Safety: event lives for the call; its size is given.
    let err = unsafe {
        ringbuf_output(map_ptr(&FOLLOW_EVENTS), ptr::from_ref(&event).cast(), size_of::<FollowEvent>() as u64, 0)
    };
    if err == 0 {
        follow_count(|m| m.events += 1);
    } else {
        follow_count(|m| m.lost_events += 1);
    }
    1
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/post_bind4")]
pub extern "C" fn steer_follow_bind4(ctx: *mut bpf_sock) -> u32 {
    // Safety: the kernel hands every cgroup sock program a valid context.
    let ip4 = unsafe { ptr::read_volatile(&raw const (*ctx).src_ip4) };
    follow_bind(ctx, ip4, [0; 4])
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "cgroup/post_bind6")]
pub extern "C" fn steer_follow_bind6(ctx: *mut bpf_sock) -> u32 {
    // Safety: as above; each word at a constant offset.
    let ip6 = unsafe {
        [
            ptr::read_volatile(&raw const (*ctx).src_ip6[0]),
            ptr::read_volatile(&raw const (*ctx).src_ip6[1]),
            ptr::read_volatile(&raw const (*ctx).src_ip6[2]),
            ptr::read_volatile(&raw const (*ctx).src_ip6[3]),
        ]
    };
    follow_bind(ctx, 0, ip6)
}

/// An iterator's context: its metadata, then the socket (the kernel's BTF
/// types them; only the pointer is used here).
#[repr(C)]
pub struct IterCtx {
    pub meta: *mut c_void,
    pub sk: *mut c_void,
}

/// Puts the iterated socket where `backfill` says, if it names its cookie.
#[inline(always)]
fn backfill(ctx: *mut IterCtx) -> i32 {
    // Safety: the kernel hands every iterator program a valid context.
    let sk = unsafe { (*ctx).sk };
    if sk.is_null() {
        return 0;
    }
    // Safety: sk is a socket the iterator holds for this call.
    let cookie = unsafe { socket_cookie(sk) };
    let wanted: *const BackfillValue = get(map_ptr(&BACKFILL), &cookie);
    if wanted.is_null() {
        return 0;
    }
    for i in 0..FOLLOW_ENTRIES {
        // Safety: non-null map values are valid for the program's run.
        let key = unsafe { (*wanted).keys[i] };
        if key == FollowEntry::NONE {
            continue;
        }
        // Safety: key and sk live for the call.
        let err = unsafe { map_update_elem(map_ptr(&SOCKETS), ptr::from_ref(&key).cast(), sk.cast_const(), BPF_ANY) };
        if err == 0 {
            follow_count(|m| m.backfilled += 1);
        } else {
            follow_count(|m| m.errors += 1);
        }
    }
    0
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn steer_backfill_tcp(ctx: *mut IterCtx) -> i32 {
    backfill(ctx)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub extern "C" fn steer_backfill_udp(ctx: *mut IterCtx) -> i32 {
    backfill(ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
