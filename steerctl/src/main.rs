//! steerctl: load, attach and drive the sk_lookup dispatcher.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = steerctl::Cli::parse();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(cli.default_log_level())).init();
    match steerctl::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steerctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
