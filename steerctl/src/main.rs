//! steerctl: load, attach and drive the sk_lookup dispatcher.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match steerctl::run(steerctl::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steerctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
