//! Operations: what the commands do, on an open state and the namespace's
//! sockets. Each module is one group of commands.

pub mod apply;
pub mod bindings;
pub mod explain;
pub mod follow;
pub mod lifecycle;
pub mod metrics;
pub mod register;
pub mod seed;
pub mod status;
pub mod trace;
pub mod upgrade;
pub mod watch;
