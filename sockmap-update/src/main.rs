//! Puts a socket owned by another process into a pinned sockmap.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// Duplicate socket FD out of process PID (pidfd_getfd) and insert it into
/// the sockmap pinned at MAP, under KEY.
#[derive(Parser)]
#[command(version, allow_negative_numbers = true)]
struct Args {
    /// Process that owns the socket.
    pid: i32,
    /// The socket's file descriptor number inside that process.
    fd: i32,
    /// Pinned sockmap, e.g. /sys/fs/bpf/steer/<netns inode>/echo_socket.
    map: PathBuf,
    /// Key to store the socket under.
    #[arg(default_value_t = 0)]
    key: u32,
}

fn main() -> ExitCode {
    env_logger::init();
    let args = Args::parse();
    match steer::dispatcher::update_sockmap(&args.map, args.key, args.pid, args.fd) {
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
