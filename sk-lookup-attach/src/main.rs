//! Links a pinned sk_lookup program to the current network namespace.

use std::process::ExitCode;

use clap::Parser;
use sk_lookup_attach::Args;

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match steer::ops::seed::attach_pinned(&args.prog_pin, &args.link_pin) {
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
