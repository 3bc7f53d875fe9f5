//! Puts a socket owned by another process into a pinned sockmap.

use std::process::ExitCode;

use clap::Parser;
use sockmap_update::Args;

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match steer::ops::seed::update_sockmap(&args.map, args.key, args.pid, args.fd) {
        Ok(taken) => {
            println!(
                "socket {} (cookie {}) of pid {} fd {} stored at key {} of {}",
                taken.info,
                taken.info.cookie,
                args.pid,
                args.fd,
                args.key,
                args.map.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sockmap-update: error: {:#}", anyhow::Error::from(e));
            ExitCode::FAILURE
        }
    }
}
