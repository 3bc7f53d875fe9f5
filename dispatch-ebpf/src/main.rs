//! sk_lookup dispatchers.
//!
//! `steer_dispatch` (what steerctl loads) looks the destination up in the
//! labelled bindings (protocol, port, address prefix) and assigns the
//! label's socket; when no binding matches it falls back to the seed's
//! port list. `echo_dispatch` is the seed program alone.
//!
//! The seed maps keep the seed C program's names, types and layouts
//! (`echo_ports`: HASH u16 -> u8, `echo_socket`: SOCKMAP u32 -> u64), so
//! `bpftool map update pinned .../echo_ports key 0x07 0x00 value 0x00`
//! keeps working beside steerctl.
#![no_std]
#![no_main]
// Program entry points take the kernel's context pointer, valid by contract.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use core::{ffi::c_void, ptr};

// Only aya-ebpf's ABI constants are used: its context and helper types
// carry bindgen bitfield names into BTF that the kernel rejects, and libbpf
// then drops the object's BTF.
use aya_ebpf::bindings::{
    bpf_func_id::{BPF_FUNC_map_lookup_elem, BPF_FUNC_sk_assign, BPF_FUNC_sk_release},
    bpf_map_type::{
        BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_PERCPU_ARRAY,
        BPF_MAP_TYPE_SOCKHASH, BPF_MAP_TYPE_SOCKMAP,
    },
    sk_action::{SK_DROP, SK_PASS},
};

/// The kernel's `struct bpf_sk_lookup`, declared without bitfield helper
/// types; the kernel recognises the context by this struct name.
#[allow(non_camel_case_types)]
#[repr(C)]
pub struct bpf_sk_lookup {
    sk_or_cookie: u64,
    family: u32,
    protocol: u32,
    remote_ip4: u32,
    remote_ip6: [u32; 4],
    remote_port: u16,
    _remote_port_pad: u16,
    local_ip4: u32,
    local_ip6: [u32; 4],
    local_port: u32,
    ingress_ifindex: u32,
}

// Helpers called by number, typed with plain pointers for the BTF reason above.
#[inline(always)]
unsafe fn map_lookup_elem(map: *mut c_void, key: *const c_void) -> *mut c_void {
    let f: unsafe extern "C" fn(*mut c_void, *const c_void) -> *mut c_void =
        unsafe { core::mem::transmute(BPF_FUNC_map_lookup_elem as usize) };
    unsafe { f(map, key) }
}

#[inline(always)]
unsafe fn sk_assign(ctx: *mut bpf_sk_lookup, sk: *mut c_void, flags: u64) -> i64 {
    let f: unsafe extern "C" fn(*mut bpf_sk_lookup, *mut c_void, u64) -> i64 =
        unsafe { core::mem::transmute(BPF_FUNC_sk_assign as usize) };
    unsafe { f(ctx, sk, flags) }
}

#[inline(always)]
unsafe fn sk_release(sk: *mut c_void) -> i64 {
    let f: unsafe extern "C" fn(*mut c_void) -> i64 = unsafe { core::mem::transmute(BPF_FUNC_sk_release as usize) };
    unsafe { f(sk) }
}

/// Declares a BTF map definition (libbpf's `.maps` layout) under a plain
/// struct name: the kernel rejects BTF type names with generics in them,
/// which aya-ebpf's own `btf_maps` types produce.
macro_rules! btf_map {
    ($def:ident, $static:ident, $name:literal, $type:ident, $key:ty, $value:ty, $max:literal) => {
        btf_map!($def, $static, $name, $type, $key, $value, $max, 0);
    };
    ($def:ident, $static:ident, $name:literal, $type:ident, $key:ty, $value:ty, $max:literal, $flags:expr) => {
        #[repr(C)]
        pub struct $def {
            r#type: *const [i32; $type as usize],
            key: *const $key,
            value: *const $value,
            max_entries: *const [i32; $max],
            map_flags: *const [i32; $flags],
        }
        // Safety: the fields are placeholders the loader reads from BTF;
        // nothing dereferences them.
        unsafe impl Sync for $def {}

        #[unsafe(link_section = ".maps")]
        #[unsafe(export_name = $name)]
        static $static: $def = $def {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        };
    };
}

// Ports to steer: key is the destination port in host order, value unused.
btf_map!(EchoPorts, ECHO_PORTS, "echo_ports", BPF_MAP_TYPE_HASH, u16, u8, 1024);
// The one socket serving every listed port, at key 0. A u64 value lets
// userspace read back the socket cookie.
btf_map!(EchoSocket, ECHO_SOCKET, "echo_socket", BPF_MAP_TYPE_SOCKMAP, u32, u64, 1);

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const BPF_F_NO_PREALLOC: usize = 1;

/// Binding key: one hash entry per (protocol, prefix length, port,
/// masked address), IPv4 as v4-mapped IPv6 (its /N is /96+N here).
#[repr(C)]
pub struct BindingKey {
    protocol: u8,
    prefixlen: u8,
    port: [u8; 2],
    addr: [u8; 16],
}

/// The prefix lengths in use, longest first. A lookup probes only these, so
/// its cost follows the number of distinct lengths, never of bindings.
#[repr(C)]
pub struct PrefixLengths {
    count: u32,
    lengths: [u8; 132],
}

const MAX_LENGTHS: usize = 129;

/// A label's socket for one address family and transport.
#[repr(C)]
pub struct DestKey {
    label_id: u32,
    family: u8,
    protocol: u8,
    _pad: [u8; 2],
}

#[repr(C)]
pub struct LabelMetrics {
    lookups: u64,
    /// Binding matched but the label has no socket.
    misses: u64,
    /// bpf_sk_assign refused the label's socket.
    errors: u64,
}

pub const MAX_LABELS: usize = 4096;

// Two binding sets so `load-bindings` can fill the idle one and switch with
// a single write to `active_bindings`: lookups see the old set or the new,
// never a mix. Values are label ids.
btf_map!(Bindings0, BINDINGS_0, "bindings_0", BPF_MAP_TYPE_HASH, BindingKey, u32, 1048576, BPF_F_NO_PREALLOC);
btf_map!(Bindings1, BINDINGS_1, "bindings_1", BPF_MAP_TYPE_HASH, BindingKey, u32, 1048576, BPF_F_NO_PREALLOC);
// Two length lists per set (index set * 2 + version), so a change to the
// list is written to the idle copy and switched in, never rewritten under a
// running lookup.
btf_map!(BindingLengths, BINDING_LENGTHS, "binding_lengths", BPF_MAP_TYPE_ARRAY, u32, PrefixLengths, 4);
// Bit 0: the binding set in use; bit 1: the version of its length list.
btf_map!(ActiveBindings, ACTIVE_BINDINGS, "active_bindings", BPF_MAP_TYPE_ARRAY, u32, u32, 1);
// Up to four (family, protocol) sockets for each of the 4096 labels.
btf_map!(Sockets, SOCKETS, "sockets", BPF_MAP_TYPE_SOCKHASH, DestKey, u64, 16384);
btf_map!(Metrics, METRICS, "metrics", BPF_MAP_TYPE_PERCPU_ARRAY, u32, LabelMetrics, 4096);
// Label name (NUL padded) -> id; only userspace reads it, it lives here so
// that it is pinned beside the rest of the state.
btf_map!(Labels, LABELS, "labels", BPF_MAP_TYPE_HASH, [u8; 64], u32, 4096);

#[inline(always)]
fn map_ptr<T>(map: &T) -> *mut c_void {
    ptr::from_ref(map).cast_mut().cast()
}

/// The seed's logic: listed ports go to the one socket in `echo_socket`.
#[inline(always)]
fn seed_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let port = unsafe { (*ctx).local_port } as u16;
    // Safety: map and key pointers are valid for the duration of the call.
    let listed = unsafe { map_lookup_elem(map_ptr(&ECHO_PORTS), ptr::from_ref(&port).cast()) };
    if listed.is_null() {
        return SK_PASS;
    }
    let zero: u32 = 0;
    // Safety: as above; a sockmap lookup returns a referenced socket.
    let sk = unsafe { map_lookup_elem(map_ptr(&ECHO_SOCKET), ptr::from_ref(&zero).cast()) };
    if sk.is_null() {
        // A listed port with no socket is dropped, never handed to
        // whatever else may be bound there.
        return SK_DROP;
    }
    // Safety: sk came from the sockmap lookup above and is released once.
    let err = unsafe { sk_assign(ctx, sk, 0) };
    unsafe { sk_release(sk) };
    if err == 0 { SK_PASS } else { SK_DROP }
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn echo_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    seed_dispatch(ctx)
}

/// The address (as two big-endian halves) with all but its first `len`
/// bits cleared.
#[inline(always)]
fn masked(hi: u64, lo: u64, len: u32) -> (u64, u64) {
    let hi_mask = if len >= 64 { u64::MAX } else if len == 0 { 0 } else { u64::MAX << (64 - len) };
    let lo_mask = if len >= 128 { u64::MAX } else if len <= 64 { 0 } else { u64::MAX << (128 - len) };
    (hi & hi_mask, lo & lo_mask)
}

/// Reads a context word with a 4-byte load, the width the verifier allows.
#[inline(always)]
fn ctx_word(word: *const u32) -> [u8; 4] {
    // Safety: word points into the kernel-provided context.
    unsafe { ptr::read_volatile(word) }.to_ne_bytes()
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn steer_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
    // Safety: the kernel hands every sk_lookup program a valid context.
    let (family, protocol, port) = unsafe { ((*ctx).family, (*ctx).protocol, (*ctx).local_port) };
    // Addresses are in network order in the context; copying the words'
    // bytes keeps that order. All five words are read up front, each at a
    // constant offset: the verifier rejects a ctx pointer the compiler
    // would otherwise compute from the family.
    let ip4 = ctx_word(unsafe { &raw const (*ctx).local_ip4 });
    let ip6 = [
        ctx_word(unsafe { &raw const (*ctx).local_ip6[0] }),
        ctx_word(unsafe { &raw const (*ctx).local_ip6[1] }),
        ctx_word(unsafe { &raw const (*ctx).local_ip6[2] }),
        ctx_word(unsafe { &raw const (*ctx).local_ip6[3] }),
    ];
    let (addr_hi, addr_lo) = if family == AF_INET {
        (0, 0x0000_ffff_0000_0000 | u64::from(u32::from_be_bytes(ip4)))
    } else {
        (
            u64::from(u32::from_be_bytes(ip6[0])) << 32 | u64::from(u32::from_be_bytes(ip6[1])),
            u64::from(u32::from_be_bytes(ip6[2])) << 32 | u64::from(u32::from_be_bytes(ip6[3])),
        )
    };

    let zero: u32 = 0;
    // Safety: map and key pointers are valid for the duration of each call.
    let active = unsafe { map_lookup_elem(map_ptr(&ACTIVE_BINDINGS), ptr::from_ref(&zero).cast()) } as *const u32;
    let state: u32 = if active.is_null() { 0 } else { unsafe { *active } };
    let set = state & 1;
    let lengths_slot = set * 2 + ((state >> 1) & 1);
    let lengths = unsafe { map_lookup_elem(map_ptr(&BINDING_LENGTHS), ptr::from_ref(&lengths_slot).cast()) } as *const PrefixLengths;
    if lengths.is_null() {
        return seed_dispatch(ctx);
    }
    let bindings = if set == 1 { map_ptr(&BINDINGS_1) } else { map_ptr(&BINDINGS_0) };
    let count = unsafe { (*lengths).count } as usize;
    let mut key = BindingKey { protocol: protocol as u8, prefixlen: 0, port: [0; 2], addr: [0; 16] };
    let mut found: *const u32 = ptr::null();
    // Longest prefix first; at each length the exact port before the wildcard.
    for i in 0..MAX_LENGTHS {
        if i >= count {
            break;
        }
        let len = u32::from(unsafe { (*lengths).lengths[i] });
        let (hi, lo) = masked(addr_hi, addr_lo, len);
        key.prefixlen = len as u8;
        key.addr[..8].copy_from_slice(&hi.to_be_bytes());
        key.addr[8..].copy_from_slice(&lo.to_be_bytes());
        key.port = (port as u16).to_be_bytes();
        found = unsafe { map_lookup_elem(bindings, ptr::from_ref(&key).cast()) }.cast_const().cast();
        if !found.is_null() {
            break;
        }
        key.port = [0, 0];
        found = unsafe { map_lookup_elem(bindings, ptr::from_ref(&key).cast()) }.cast_const().cast();
        if !found.is_null() {
            break;
        }
    }
    if found.is_null() {
        return seed_dispatch(ctx);
    }
    let label_id = unsafe { *found };

    let metrics = unsafe { map_lookup_elem(map_ptr(&METRICS), ptr::from_ref(&label_id).cast()) } as *mut LabelMetrics;
    if !metrics.is_null() {
        // Per-CPU slot: no other CPU writes it.
        unsafe { (*metrics).lookups += 1 };
    }
    let mut dest = DestKey { label_id, family: family as u8, protocol: protocol as u8, _pad: [0; 2] };
    let mut sk = unsafe { map_lookup_elem(map_ptr(&SOCKETS), ptr::from_ref(&dest).cast()) };
    if sk.is_null() && family == AF_INET {
        // A dual-stack IPv6 socket serves IPv4 too.
        dest.family = AF_INET6 as u8;
        sk = unsafe { map_lookup_elem(map_ptr(&SOCKETS), ptr::from_ref(&dest).cast()) };
    }
    if sk.is_null() {
        // Drop rather than let another socket on this address take it.
        if !metrics.is_null() {
            unsafe { (*metrics).misses += 1 };
        }
        return SK_DROP;
    }
    // Safety: sk came from the sockhash lookup above and is released once.
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
