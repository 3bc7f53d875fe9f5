//! sk_lookup dispatchers.
//!
//! `steer_dispatch` (what steerctl loads) looks the destination up in the
//! labelled bindings (protocol, port, address prefix) and assigns the
//! label's socket; when no binding matches it falls back to the seed's
//! port list. `echo_dispatch` is the seed program alone.
//!
//! Every map, key and value layout comes from `steer-common`, which the
//! userspace side shares.
#![no_std]
#![no_main]
// Program entry points take the kernel's context pointer, valid by contract.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use core::{ffi::c_void, ptr};

// Only aya-ebpf's helper numbers are used: its context and helper types
// carry bindgen bitfield names into BTF that the kernel rejects, and libbpf
// then drops the object's BTF.
use aya_ebpf::bindings::bpf_func_id::{BPF_FUNC_map_lookup_elem, BPF_FUNC_sk_assign, BPF_FUNC_sk_release};
use steer_common::{
    ActiveBindings, BindingKey, LabelMetrics, MAX_LENGTHS, PrefixLengths, SocketKey, bpf_sk_lookup,
    kernel::{AF_INET, AF_INET6, SK_DROP, SK_PASS},
};

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

/// Declares steer-common's maps as BTF map definitions (libbpf's `.maps`
/// layout) under plain struct names: the kernel rejects BTF type names with
/// generics in them, which aya-ebpf's own `btf_maps` types produce.
macro_rules! btf_maps {
    ($($ident:ident, $name:literal, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr;)*) => {
        /// The BTF map definition structs, one per map.
        // Named after the maps' statics, so BTF shows which is which.
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        mod defs {
            $(
                #[repr(C)]
                pub struct $ident {
                    pub r#type: *const [i32; steer_common::kernel::$type as usize],
                    pub key: *const $key,
                    pub value: *const $value,
                    pub max_entries: *const [i32; ($max) as usize],
                    pub map_flags: *const [i32; ($flags) as usize],
                }
                // Safety: the fields are placeholders the loader reads from
                // BTF; nothing dereferences them.
                unsafe impl Sync for $ident {}
            )*
        }
        $(
            #[unsafe(link_section = ".maps")]
            #[unsafe(export_name = $name)]
            static $ident: defs::$ident = defs::$ident {
                r#type: ptr::null(),
                key: ptr::null(),
                value: ptr::null(),
                max_entries: ptr::null(),
                map_flags: ptr::null(),
            };
        )*
    };
}

steer_common::for_each_map!(btf_maps);

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
    let active =
        unsafe { map_lookup_elem(map_ptr(&ACTIVE_BINDINGS), ptr::from_ref(&zero).cast()) } as *const ActiveBindings;
    let state = if active.is_null() { ActiveBindings::default() } else { unsafe { *active } };
    let lengths_slot = state.lengths_slot();
    let lengths = unsafe { map_lookup_elem(map_ptr(&BINDING_LENGTHS), ptr::from_ref(&lengths_slot).cast()) }
        as *const PrefixLengths;
    if lengths.is_null() {
        return seed_dispatch(ctx);
    }
    let bindings = if state.set() == 1 { map_ptr(&BINDINGS_1) } else { map_ptr(&BINDINGS_0) };
    let count = unsafe { (*lengths).count } as usize;
    let mut key = BindingKey { protocol: protocol as u8, prefixlen: 0, port: [0; 2], addr: [0; 16] };
    let mut found: *const u32 = ptr::null();
    // Longest prefix first; at each length the exact port before the wildcard.
    for i in 0..MAX_LENGTHS {
        if i >= count {
            break;
        }
        let len = u32::from(unsafe { (*lengths).lengths[i] });
        let (hi, lo) = steer_common::mask(addr_hi, addr_lo, len);
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
    let mut dest = SocketKey::new(label_id, family as u8, protocol as u8);
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
