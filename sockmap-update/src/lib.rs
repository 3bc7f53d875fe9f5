//! Puts a socket owned by another process into a pinned sockmap.
//! The command line lives here, as a library, so that `cargo xtask dist`
//! can generate the man page and shell completions from it.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

/// Duplicate socket FD out of process PID (pidfd_getfd) and insert it into
/// the sockmap pinned at MAP, under KEY.
#[derive(Parser)]
#[command(name = "sockmap-update", version, allow_negative_numbers = true)]
pub struct Args {
    /// Process that owns the socket.
    pub pid: i32,
    /// The socket's file descriptor number inside that process.
    pub fd: i32,
    /// Pinned sockmap, e.g. /sys/fs/bpf/steer/<netns inode>/echo_socket.
    pub map: PathBuf,
    /// Key to store the socket under.
    #[arg(default_value_t = 0)]
    pub key: u32,
}

/// The clap definition, for man pages and completions.
pub fn command() -> clap::Command {
    Args::command()
}
