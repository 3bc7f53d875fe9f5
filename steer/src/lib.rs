//! steer: steer TCP/UDP connections to sockets with the BPF sk_lookup hook.
//!
//! The command-line tools (`steerctl`, `sockmap-update`, `sk-lookup-attach`)
//! are thin front ends over this crate.

pub mod bindings;
pub mod bpffs;
pub mod control;
pub mod deploy;
pub mod maps;
pub mod netns;
pub mod preflight;
pub mod socket;
pub mod status;
pub mod sys;

use std::{os::fd::AsFd, path::Path};

use anyhow::Result;

pub use deploy::Layout;
pub use socket::TakenSocket;

/// Duplicates `fd` out of `pid`, checks that sk_lookup can steer to it, and
/// puts it into the socket map pinned at `map_pin` under `key`. Every check
/// runs before the map is touched, so a failure changes nothing.
pub fn set_socket(map_pin: &Path, key: u32, pid: i32, fd: Option<i32>) -> Result<TakenSocket> {
    preflight::require_fd_taking_caps()?;
    let map = maps::SocketMap::open(map_pin)?;
    let taken = match fd {
        Some(fd) => socket::take_steerable(pid, fd)?,
        None => socket::find_steerable(pid)?,
    };
    map.insert(key, taken.socket.as_fd())?;
    Ok(taken)
}
