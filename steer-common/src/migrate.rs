//! What `steerctl upgrade` hands its socket-carrying iterators
//! (dispatch-ebpf's migrate.rs): for each socket of the old state, by
//! cookie, the keys of the new state's `sockets` it goes to, and whether it
//! is the seed socket (`echo_socket`, key 0). The plan lives in a map of
//! the migration object's own, never pinned.

use core::mem::size_of;

/// `sockets` keys one plan entry holds; a socket in more slots is carried
/// over several passes.
pub const PLAN_KEYS: usize = 8;
/// Sockets one pass carries.
pub const MAX_PLAN: u32 = 4096;
/// An unused key.
pub const NO_KEY: u32 = u32::MAX;
/// The plan map's name in the migration object.
pub const PLAN_MAP: &str = "migrate_plan";

/// Where one socket goes.
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigratePlan {
    /// `sockets` keys, [`NO_KEY`] unused.
    pub keys: [u32; PLAN_KEYS],
    /// Non-zero: also `echo_socket`'s key 0.
    pub seed: u32,
    pub _pad: u32,
}

impl Default for MigratePlan {
    fn default() -> Self {
        Self { keys: [NO_KEY; PLAN_KEYS], seed: 0, _pad: 0 }
    }
}

const _: () = assert!(size_of::<MigratePlan>() == 40);

#[cfg(feature = "user")]
// Safety: repr(C) plain old data without padding (size checked above).
unsafe impl aya::Pod for MigratePlan {}
