//! A server started by systemd socket activation (`LISTEN_PID`/`LISTEN_FDS`,
//! sd_listen_fds(3)): answers every connection on its passed listening
//! socket, fd 3, with NAME and closes it. For tests/servers.rs.

use std::{io::Write, net::TcpListener, os::fd::FromRawFd, process::ExitCode};

fn main() -> ExitCode {
    let name = std::env::args().nth(1).unwrap_or_else(|| "listen-fds".into());
    let pid_ok = std::env::var("LISTEN_PID").ok().and_then(|p| p.parse::<u32>().ok()) == Some(std::process::id());
    let fds = std::env::var("LISTEN_FDS").ok().and_then(|n| n.parse::<i32>().ok()).unwrap_or(0);
    if !pid_ok || fds < 1 {
        eprintln!("listen-fds-server: no sockets passed (LISTEN_PID/LISTEN_FDS)");
        return ExitCode::FAILURE;
    }
    // Safety: systemd passes the listening socket as fd 3, ours for good.
    let listener = unsafe { TcpListener::from_raw_fd(3) };
    for mut conn in listener.incoming().flatten() {
        let _ = conn.write_all(format!("{name}\n").as_bytes());
    }
    ExitCode::SUCCESS
}
