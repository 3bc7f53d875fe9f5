//! The seed's port list and socket, and the seed tools: `sockmap-update`
//! (put a process's socket into a pinned socket map) and
//! `sk-lookup-attach` (link a pinned sk_lookup program).

use std::{os::fd::AsFd, path::Path};

use steer_common::map;

use crate::{
    error::{Result, fail},
    kernel::{
        caps,
        maps::SocketMap,
        program,
        socket::{self, TakenSocket},
    },
    state::{Dispatcher, Layout, ReadWrite},
};

/// Turns the seed list on while it has ports or a socket, off otherwise:
/// lookups that no binding answers then skip it.
fn refresh(state: &Dispatcher<ReadWrite>) -> Result<()> {
    let maps = state.maps()?;
    let enabled = !maps.seed.ports()?.is_empty() || maps.seed.cookie()?.is_some();
    maps.plane.set_seed(enabled)
}

/// Adds ports to the seed's port list.
pub fn add_ports(state: &Dispatcher<ReadWrite>, ports: &[u16]) -> Result<()> {
    state.maps()?.seed.add(ports)?;
    refresh(state)
}

/// Removes ports from the seed's port list: all or none.
pub fn remove_ports(state: &Dispatcher<ReadWrite>, ports: &[u16]) -> Result<()> {
    state.maps()?.seed.remove(ports)?;
    refresh(state)
}

/// `pid`'s socket `fd`, or its one steerable socket, taken and checked.
fn take(pid: i32, fd: Option<i32>) -> Result<TakenSocket> {
    caps::require_fd_taking()?;
    match fd {
        Some(fd) => socket::take_steerable(pid, fd),
        None => {
            let found = crate::discovery::owners::candidates(pid)?;
            match found.as_slice() {
                [one] => socket::take_steerable(pid, one.fd),
                [] => {
                    fail!(Invalid, "process {pid} has no listening TCP or bound UDP socket in this network namespace")
                }
                _ => fail!(
                    Invalid,
                    "process {pid} has several sockets, pick one with --fd: {}",
                    crate::discovery::owners::describe(&found)
                ),
            }
        }
    }
}

/// Takes `pid`'s socket (`fd`, or its one steerable socket) as the seed socket.
pub fn set_socket(state: &Dispatcher<ReadWrite>, pid: i32, fd: Option<i32>) -> Result<TakenSocket> {
    let taken = take(pid, fd)?;
    state.maps()?.seed.set_socket(taken.socket.as_fd())?;
    refresh(state)?;
    Ok(taken)
}

/// Removes the seed socket; false when none was set.
pub fn clear_socket(state: &Dispatcher<ReadWrite>) -> Result<bool> {
    let removed = state.maps()?.seed.clear_socket()?;
    refresh(state)?;
    Ok(removed)
}

/// The state directory a pin sits in, if steer manages it (its program
/// or label map is pinned there).
fn managed_dir(pin: &Path) -> Option<Layout> {
    let layout = Layout::new(pin.parent()?);
    (layout.program().exists() || layout.map(map::LABELS).exists()).then_some(layout)
}

/// `sockmap-update`: puts `pid`'s `fd` into the socket map pinned at
/// `map_pin` under `key`. In a steer state directory only the seed's
/// `echo_socket` (key 0) is accepted, through its lock; any other pinned
/// socket map is used as it is.
pub fn update_sockmap(map_pin: &Path, key: u32, pid: i32, fd: i32) -> Result<TakenSocket> {
    caps::require_fd_taking()?;
    let map = SocketMap::open(map_pin)?;
    let state = match managed_dir(map_pin) {
        Some(layout) => {
            // steer's labelled `sockets` is a socket map too, but its slots
            // belong to labels: `register` writes them.
            if map_pin.file_name() != Some(map::ECHO_SOCKET.as_ref()) {
                fail!(
                    Invalid,
                    "{} is steer's labelled socket map, not the seed's: use {} (key 0), or `steerctl register` for a label",
                    map_pin.display(),
                    layout.socket().display()
                );
            }
            Some(Dispatcher::open_write(&layout)?)
        }
        None => None,
    };
    let taken = socket::take_steerable(pid, fd)?;
    map.insert(key, taken.socket.as_fd())?;
    if let Some(state) = state {
        refresh(&state)?;
    }
    Ok(taken)
}

/// `sk-lookup-attach`: links the sk_lookup program pinned at `program_pin`
/// to the caller's network namespace and pins the link at `link_pin`,
/// under the state directory's lock when steer manages it.
pub fn attach_pinned(program_pin: &Path, link_pin: &Path) -> Result<u32> {
    caps::require_bpf()?;
    let _state = managed_dir(link_pin).map(|layout| Dispatcher::open_write(&layout)).transpose()?;
    program::attach(program_pin, link_pin)
}
