//! sk_lookup dispatcher: steers new connections on listed ports to one socket.
//!
//! Map names, types and layouts match the seed C program (`echo_ports`:
//! HASH u16 -> u8, `echo_socket`: SOCKMAP u32 -> u64), so
//! `bpftool map update pinned .../echo_ports key 0x07 0x00 value 0x00`
//! keeps working beside steerctl.
#![no_std]
#![no_main]

use core::{ffi::c_void, ptr};

// Only aya-ebpf's ABI constants are used: its context and helper types
// carry bindgen bitfield names into BTF that the kernel rejects, and libbpf
// then drops the object's BTF.
use aya_ebpf::bindings::{
    bpf_func_id::{BPF_FUNC_map_lookup_elem, BPF_FUNC_sk_assign, BPF_FUNC_sk_release},
    bpf_map_type::{BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_SOCKMAP},
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
        #[repr(C)]
        pub struct $def {
            r#type: *const [i32; $type as usize],
            key: *const $key,
            value: *const $value,
            max_entries: *const [i32; $max],
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
        };
    };
}

// Ports to steer: key is the destination port in host order, value unused.
btf_map!(EchoPorts, ECHO_PORTS, "echo_ports", BPF_MAP_TYPE_HASH, u16, u8, 1024);
// The one socket serving every listed port, at key 0. A u64 value lets
// userspace read back the socket cookie.
btf_map!(EchoSocket, ECHO_SOCKET, "echo_socket", BPF_MAP_TYPE_SOCKMAP, u32, u64, 1);

#[inline(always)]
fn map_ptr<T>(map: &T) -> *mut c_void {
    ptr::from_ref(map).cast_mut().cast()
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "sk_lookup")]
pub extern "C" fn echo_dispatch(ctx: *mut bpf_sk_lookup) -> u32 {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
