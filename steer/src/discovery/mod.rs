//! Discovery: finding sockets and the processes that hold them without
//! taking anyone's file descriptors, as `ss -p` does (sock_diag and /proc).
//! Every function acts on the network namespace of the calling thread.

pub mod diag;
pub mod groups;
pub mod owners;

pub use groups::Member;
pub use owners::OwnerFilter;
