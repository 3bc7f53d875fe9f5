//! steer: steer TCP/UDP connections to sockets with the BPF sk_lookup hook.
//!
//! The command-line tools (`steerctl`, `sockmap-update`, `sk-lookup-attach`)
//! are thin front ends over this crate. Every access to a state directory
//! goes through a [`Dispatcher`], which validates it and holds its lock;
//! the kernel/userspace layouts come from `steer-common`.

pub mod bindings;
pub mod bpffs;
pub mod compile;
pub mod config;
pub mod diag;
pub mod dispatcher;
pub mod error;
pub mod explain;
pub mod identity;
pub mod labelled;
pub mod layout;
pub mod lock;
pub mod maps;
pub mod metrics;
pub mod netns;
pub mod plane;
pub mod preflight;
pub mod servers;
pub mod socket;
pub mod status;
pub mod sys;
pub mod test_run;
pub mod watch;

pub use dispatcher::{DISPATCH_OBJECT, Dispatcher, ReadOnly, ReadWrite};
pub use error::{Error, Result};
pub use layout::Layout;
pub use socket::TakenSocket;
pub use steer_common as common;
