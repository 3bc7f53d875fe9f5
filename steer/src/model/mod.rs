//! The model: what steer's words mean, with no system call behind them.
//! Protocols and families, prefixes, labels, bindings and their precedence,
//! socket slots, config files, and the compiler that turns bindings into
//! the tables the BPF program searches. Everything here is pure, so it is
//! tested (and fuzzed) without a kernel.

pub mod binding;
pub mod compile;
pub mod config;
pub mod follow;
pub mod label;
pub mod net;
pub mod prefix;
pub mod slot;
#[cfg(test)]
pub(crate) mod strategies;
pub mod text;
pub mod trace;

pub use binding::{Binding, BindingsFile, KeyedBindings};
pub use net::{Family, Owner, Protocol, SocketInfo, Target};
pub use prefix::Prefix;
