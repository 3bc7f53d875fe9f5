//! Links a pinned sk_lookup program to the current network namespace.
//! The command line lives here, as a library, so that `cargo xtask dist`
//! can generate the man page and shell completions from it.

use std::path::PathBuf;

use clap::{CommandFactory, Parser};

/// Create a BPF_SK_LOOKUP link for the current network namespace from the
/// program pinned at PROG_PIN, and pin the link at LINK_PIN.
#[derive(Parser)]
#[command(name = "sk-lookup-attach", version)]
pub struct Args {
    /// Pinned sk_lookup program, e.g. /sys/fs/bpf/steer/echo_dispatch.
    pub prog_pin: PathBuf,
    /// Where to pin the new link; removing this pin detaches it.
    pub link_pin: PathBuf,
}

/// The clap definition, for man pages and completions.
pub fn command() -> clap::Command {
    Args::command()
}
