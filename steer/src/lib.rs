//! steer: steer TCP/UDP connections to sockets with the BPF sk_lookup hook.
//!
//! The command-line tools (`steerctl`, `sockmap-update`, `sk-lookup-attach`)
//! are thin front ends over this crate. Its layers, each using only the
//! ones above it in this list:
//!
//! * [`model`]: what steer's words mean, pure (protocols, prefixes, labels,
//!   bindings, slots, config files, the compiler);
//! * [`kernel`]: the system calls, all of steer's `unsafe` code, behind
//!   safe, checked calls;
//! * [`state`]: one namespace's pinned state, opened through a
//!   [`Dispatcher`] handle;
//! * [`discovery`]: finding sockets and their holders (sock_diag, /proc);
//! * [`ops`]: what the commands do.
//!
//! The kernel/userspace layouts come from `steer-common`.

pub mod discovery;
pub mod error;
pub mod kernel;
pub mod model;
pub mod ops;
pub mod state;

pub use error::{Error, Result};
pub use kernel::program::DISPATCH_OBJECT;
pub use state::{Dispatcher, Layout, ReadOnly, ReadWrite, Repair};
pub use steer_common as common;
