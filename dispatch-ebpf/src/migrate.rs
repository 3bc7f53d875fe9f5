//! The programs `steerctl upgrade` runs once when it moves a state to a new
//! layout, in an object of their own so the dispatcher's and the follow
//! programs' stay as they are.
//!
//! Userspace cannot read a socket out of a SOCKMAP (a lookup returns its
//! cookie), so the old state's sockets are carried in the kernel: userspace
//! reads the cookies of the old maps and writes a plan (cookie -> the new
//! `sockets` keys, and whether it is the seed socket) into this object's
//! own `migrate_plan`; the iterators over the namespace's TCP and UDP
//! sockets then put each planned socket into the new state's maps. No file
//! descriptor is taken from any process. (An iterator over the old socket
//! map itself, `iter/sockmap`, would need no plan, but kernels in lockdown
//! refuse map element iterators with EPERM.)
#![no_std]
#![no_main]
// Program entry points take the kernel's context pointer, valid by contract.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

#[path = "shared.rs"]
mod shared;

use core::{ffi::c_void, ptr};

use shared::*;
use steer_common::{
    kernel::{BPF_ANY, BPF_MAP_TYPE_HASH},
    migrate::{MAX_PLAN, MigratePlan, NO_KEY, PLAN_KEYS},
};

/// The plan map's BTF definition (libbpf's `.maps` layout): cookie -> plan.
#[repr(C)]
pub struct PlanDef {
    pub r#type: *const [i32; BPF_MAP_TYPE_HASH as usize],
    pub key: *const u64,
    pub value: *const MigratePlan,
    pub max_entries: *const [i32; MAX_PLAN as usize],
    pub map_flags: *const [i32; 0],
}

// Safety: placeholders the loader reads from BTF; nothing dereferences them.
unsafe impl Sync for PlanDef {}

#[unsafe(link_section = ".maps")]
#[unsafe(export_name = "migrate_plan")]
pub static MIGRATE_PLAN: PlanDef = PlanDef {
    r#type: ptr::null(),
    key: ptr::null(),
    value: ptr::null(),
    max_entries: ptr::null(),
    map_flags: ptr::null(),
};

/// An iterator's context: its metadata, then the socket (only the pointer
/// is used here).
#[repr(C)]
pub struct IterCtx {
    pub meta: *mut c_void,
    pub sk: *mut c_void,
}

/// Puts the iterated socket where the plan says, if it names its cookie.
/// Userspace checks afterwards that every planned socket arrived.
#[inline(always)]
fn carry(ctx: *mut IterCtx) -> i32 {
    // Safety: the kernel hands every iterator program a valid context.
    let sk = unsafe { (*ctx).sk };
    if sk.is_null() {
        return 0;
    }
    // Safety: sk is a socket the iterator holds for this call.
    let cookie = unsafe { socket_cookie(sk) };
    let plan: *const MigratePlan = get(map_ptr(&MIGRATE_PLAN), &cookie);
    if plan.is_null() {
        return 0;
    }
    for i in 0..PLAN_KEYS {
        // Safety: non-null map values are valid for the program's run.
        let key = unsafe { (*plan).keys[i] };
        if key != NO_KEY {
            // Safety: key and sk live for the call.
            unsafe { map_update_elem(map_ptr(&SOCKETS), ptr::from_ref(&key).cast(), sk.cast_const(), BPF_ANY) };
        }
    }
    // Safety: as above.
    if unsafe { (*plan).seed } != 0 {
        let key = 0u32;
        // Safety: key and sk live for the call.
        unsafe { map_update_elem(map_ptr(&ECHO_SOCKET), ptr::from_ref(&key).cast(), sk.cast_const(), BPF_ANY) };
    }
    0
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub extern "C" fn steer_migrate_tcp(ctx: *mut IterCtx) -> i32 {
    carry(ctx)
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub extern "C" fn steer_migrate_udp(ctx: *mut IterCtx) -> i32 {
    carry(ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
