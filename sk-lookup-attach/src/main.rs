//! Links a pinned sk_lookup program to the current network namespace.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// Create a BPF_SK_LOOKUP link for the current network namespace from the
/// program pinned at PROG_PIN, and pin the link at LINK_PIN.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Pinned sk_lookup program, e.g. /sys/fs/bpf/steer/echo_dispatch.
    prog_pin: PathBuf,
    /// Where to pin the new link; removing this pin detaches it.
    link_pin: PathBuf,
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match steer::dispatcher::attach(&args.prog_pin, &args.link_pin) {
        Ok(id) => {
            println!("link {id} pinned at {}", args.link_pin.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sk-lookup-attach: error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
