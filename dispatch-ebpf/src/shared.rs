//! What both BPF objects share: the helpers, called by number and typed
//! with plain pointers (aya-ebpf's context and helper types carry bindgen
//! bitfield names into BTF that the kernel rejects, and libbpf then drops
//! the object's BTF), and steer-common's maps as BTF map definitions.

// Each object uses a part of what is here.
#![allow(dead_code)]

use core::{ffi::c_void, ptr};

use aya_ebpf::bindings::bpf_func_id::{
    BPF_FUNC_get_netns_cookie, BPF_FUNC_get_prandom_u32, BPF_FUNC_get_socket_cookie, BPF_FUNC_ktime_get_ns,
    BPF_FUNC_map_lookup_elem, BPF_FUNC_map_update_elem, BPF_FUNC_ringbuf_output, BPF_FUNC_sk_assign,
    BPF_FUNC_sk_release, BPF_FUNC_sock_map_update,
};
use steer_common::{bpf_sk_lookup, bpf_sock_ops};

#[inline(always)]
pub unsafe fn map_lookup_elem(map: *mut c_void, key: *const c_void) -> *mut c_void {
    let f: unsafe extern "C" fn(*mut c_void, *const c_void) -> *mut c_void =
        unsafe { core::mem::transmute(BPF_FUNC_map_lookup_elem as usize) };
    unsafe { f(map, key) }
}

#[inline(always)]
pub unsafe fn sk_assign(ctx: *mut bpf_sk_lookup, sk: *mut c_void, flags: u64) -> i64 {
    let f: unsafe extern "C" fn(*mut bpf_sk_lookup, *mut c_void, u64) -> i64 =
        unsafe { core::mem::transmute(BPF_FUNC_sk_assign as usize) };
    unsafe { f(ctx, sk, flags) }
}

#[inline(always)]
pub unsafe fn sk_release(sk: *mut c_void) -> i64 {
    let f: unsafe extern "C" fn(*mut c_void) -> i64 = unsafe { core::mem::transmute(BPF_FUNC_sk_release as usize) };
    unsafe { f(sk) }
}

#[inline(always)]
pub unsafe fn map_update_elem(map: *mut c_void, key: *const c_void, value: *const c_void, flags: u64) -> i64 {
    let f: unsafe extern "C" fn(*mut c_void, *const c_void, *const c_void, u64) -> i64 =
        unsafe { core::mem::transmute(BPF_FUNC_map_update_elem as usize) };
    unsafe { f(map, key, value, flags) }
}

#[inline(always)]
pub unsafe fn sock_map_update(ctx: *mut bpf_sock_ops, map: *mut c_void, key: *const c_void, flags: u64) -> i64 {
    let f: unsafe extern "C" fn(*mut bpf_sock_ops, *mut c_void, *const c_void, u64) -> i64 =
        unsafe { core::mem::transmute(BPF_FUNC_sock_map_update as usize) };
    unsafe { f(ctx, map, key, flags) }
}

/// A socket's cookie: the context of a sock_ops or cgroup sock program, or
/// a socket pointer in an iterator.
#[inline(always)]
pub unsafe fn socket_cookie(ctx: *mut c_void) -> u64 {
    let f: unsafe extern "C" fn(*mut c_void) -> u64 =
        unsafe { core::mem::transmute(BPF_FUNC_get_socket_cookie as usize) };
    unsafe { f(ctx) }
}

#[inline(always)]
pub unsafe fn netns_cookie(ctx: *mut c_void) -> u64 {
    let f: unsafe extern "C" fn(*mut c_void) -> u64 =
        unsafe { core::mem::transmute(BPF_FUNC_get_netns_cookie as usize) };
    unsafe { f(ctx) }
}

#[inline(always)]
pub unsafe fn ringbuf_output(map: *mut c_void, data: *const c_void, size: u64, flags: u64) -> i64 {
    let f: unsafe extern "C" fn(*mut c_void, *const c_void, u64, u64) -> i64 =
        unsafe { core::mem::transmute(BPF_FUNC_ringbuf_output as usize) };
    unsafe { f(map, data, size, flags) }
}

#[inline(always)]
pub fn ktime_get_ns() -> u64 {
    // Safety: takes nothing, returns a number.
    let f: unsafe extern "C" fn() -> u64 = unsafe { core::mem::transmute(BPF_FUNC_ktime_get_ns as usize) };
    unsafe { f() }
}

#[inline(always)]
pub fn prandom_u32() -> u32 {
    // Safety: as above.
    let f: unsafe extern "C" fn() -> u32 = unsafe { core::mem::transmute(BPF_FUNC_get_prandom_u32 as usize) };
    unsafe { f() }
}

/// Declares steer-common's maps as BTF map definitions (libbpf's `.maps`
/// layout) under plain struct names: the kernel rejects BTF type names with
/// generics in them, which aya-ebpf's own `btf_maps` types produce. A map
/// of maps describes its inner maps in a `values` member, as libbpf's
/// `__array(values, ...)` does.
macro_rules! btf_maps {
    ($($ident:ident, $name:literal, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr
        $(, inner $inner:ty, $inner_max:expr, $inner_flags:expr)? $(, inner_ringbuf $inner_ring:expr)?
        $(, ringbuf $ring:tt)?;)*) => {
        /// The BTF map definition structs, one per map, named after the
        /// maps' statics so BTF shows which is which; inner map definitions
        /// of maps of maps under the same names in their own module.
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        pub mod defs {
            $(btf_maps!(@def $ident, $type, $key, $value, $max, $flags $(, $inner)? $(, inner_ringbuf $inner_ring)?
                $(, ringbuf $ring)?);)*
        }
        #[allow(non_camel_case_types, clippy::upper_case_acronyms)]
        pub mod inner_defs {
            $($(btf_maps!(@inner $ident, $inner, $inner_max, $inner_flags);)?)*
            $($(btf_maps!(@inner_ringbuf $ident, $inner_ring);)?)*
        }
        $(
            #[unsafe(link_section = ".maps")]
            #[unsafe(export_name = $name)]
            pub static $ident: defs::$ident =
                btf_maps!(@init $ident $(, $inner)? $(, inner_ringbuf $inner_ring)? $(, ringbuf $ring)?);
        )*
    };
    (@def $ident:ident, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr) => {
        #[repr(C)]
        pub struct $ident {
            pub r#type: *const [i32; steer_common::kernel::$type as usize],
            pub key: *const $key,
            pub value: *const $value,
            pub max_entries: *const [i32; ($max) as usize],
            pub map_flags: *const [i32; ($flags) as usize],
        }
        // Safety: the fields are placeholders the loader reads from BTF;
        // nothing dereferences them.
        unsafe impl Sync for $ident {}
    };
    // A ring buffer: type and size only.
    (@def $ident:ident, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr, ringbuf $ring:tt) => {
        #[repr(C)]
        pub struct $ident {
            pub r#type: *const [i32; steer_common::kernel::$type as usize],
            pub max_entries: *const [i32; ($max) as usize],
        }
        // Safety: as above.
        unsafe impl Sync for $ident {}
    };
    // A map of ring buffers: its inner map is described like an array's.
    (@def $ident:ident, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr, inner_ringbuf $bytes:expr) => {
        btf_maps!(@def $ident, $type, $key, $value, $max, $flags, ());
    };
    (@def $ident:ident, $type:ident, $key:ty, $value:ty, $max:expr, $flags:expr, $inner:ty) => {
        #[repr(C)]
        pub struct $ident {
            pub r#type: *const [i32; steer_common::kernel::$type as usize],
            pub key: *const $key,
            pub max_entries: *const [i32; ($max) as usize],
            pub map_flags: *const [i32; ($flags) as usize],
            pub values: [*const super::inner_defs::$ident; 0],
        }
        // Safety: as above.
        unsafe impl Sync for $ident {}
    };
    // Inner maps give their key and value by size, not by BTF type: userspace
    // makes the chunk maps without BTF, and kernels up to about 6.1 (which
    // compare the BTF-derived field offsets of template and chunk) refuse a
    // chunk unlike a template made with BTF types.
    (@inner $ident:ident, $inner:ty, $inner_max:expr, $inner_flags:expr) => {
        #[repr(C)]
        pub struct $ident {
            pub r#type: *const [i32; steer_common::kernel::BPF_MAP_TYPE_ARRAY as usize],
            pub key_size: *const [i32; size_of::<u32>()],
            pub value_size: *const [i32; size_of::<$inner>()],
            pub max_entries: *const [i32; ($inner_max) as usize],
            pub map_flags: *const [i32; ($inner_flags) as usize],
        }
    };
    // A ring buffer inner map: type and size only.
    (@inner_ringbuf $ident:ident, $bytes:expr) => {
        #[repr(C)]
        pub struct $ident {
            pub r#type: *const [i32; steer_common::kernel::BPF_MAP_TYPE_RINGBUF as usize],
            pub max_entries: *const [i32; ($bytes) as usize],
        }
    };
    (@init $ident:ident) => {
        defs::$ident { r#type: ptr::null(), key: ptr::null(), value: ptr::null(), max_entries: ptr::null(), map_flags: ptr::null() }
    };
    (@init $ident:ident, ringbuf $ring:tt) => {
        defs::$ident { r#type: ptr::null(), max_entries: ptr::null() }
    };
    (@init $ident:ident, inner_ringbuf $bytes:expr) => {
        btf_maps!(@init $ident, ())
    };
    (@init $ident:ident, $inner:ty) => {
        defs::$ident { r#type: ptr::null(), key: ptr::null(), max_entries: ptr::null(), map_flags: ptr::null(), values: [] }
    };
}

steer_common::for_each_map!(btf_maps);

#[inline(always)]
pub fn map_ptr<T>(map: &T) -> *mut c_void {
    ptr::from_ref(map).cast_mut().cast()
}

/// `map[key]` as a pointer to its value; null when absent.
#[inline(always)]
pub fn get<T, K>(map: *mut c_void, key: &K) -> *mut T {
    // Safety: map is a map (or inner map) pointer and key lives for the call.
    unsafe { map_lookup_elem(map, ptr::from_ref(key).cast()) }.cast()
}
