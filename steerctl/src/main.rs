//! steerctl: load, attach and drive the sk_lookup dispatcher.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use steer::{Layout, deploy, maps::PortMap, status::Status};
use tabled::{Table, Tabled, builder::Builder, settings::Style};

#[derive(Parser)]
#[command(version, about = "Steer TCP/UDP connections on many ports to one socket with BPF sk_lookup")]
struct Cli {
    /// bpffs directory holding the program, maps and link pins.
    #[arg(long, global = true, default_value = deploy::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Print read commands' output as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the dispatcher and pin it with its maps under --pin-dir.
    Load,
    /// Detach and remove every pin `load` and `attach` made.
    Unload,
    /// Link the dispatcher to this network namespace (pinned, so it outlives steerctl).
    Attach,
    /// Remove the link: lookups in this namespace go back to normal.
    Detach,
    /// Manage the steered ports.
    Ports {
        #[command(subcommand)]
        command: PortsCommand,
    },
    /// Manage the socket that serves the steered ports.
    Socket {
        #[command(subcommand)]
        command: SocketCommand,
    },
    /// Show program, link, network namespace, ports and socket.
    Status,
}

#[derive(Subcommand)]
enum PortsCommand {
    /// Steer these ports to the socket.
    Add {
        #[arg(required = true)]
        ports: Vec<u16>,
    },
    /// Stop steering these ports.
    Del {
        #[arg(required = true)]
        ports: Vec<u16>,
    },
    /// List steered ports.
    List,
}

#[derive(Subcommand)]
enum SocketCommand {
    /// Take a socket out of a running process and steer the ports to it.
    Set {
        /// Process that owns the socket.
        #[arg(long, allow_negative_numbers = true)]
        pid: i32,
        /// Its fd number; without it, the process's one listening TCP or bound UDP socket.
        #[arg(long, allow_negative_numbers = true)]
        fd: Option<i32>,
    },
    /// Remove the socket: steered ports then refuse connections.
    Clear,
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[derive(Tabled)]
struct PortRow {
    #[tabled(rename = "PORT")]
    port: u16,
}

fn print_status(status: &Status) {
    let mut b = Builder::default();
    b.push_record(["pin dir", &status.pin_dir]);
    b.push_record(["netns inode", &status.current_netns_inode.to_string()]);
    match &status.program {
        Some(p) => b.push_record(["program", &format!("{} id {}", p.name, p.id)]),
        None => b.push_record(["program", "not loaded"]),
    }
    match &status.link {
        Some(l) => b.push_record([
            "link".to_string(),
            format!("id {} prog {} netns inode {}", l.id, l.program_id, l.netns_inode),
        ]),
        None => b.push_record(["link", "not attached"]),
    }
    let ports: Vec<String> = status.ports.iter().map(u16::to_string).collect();
    b.push_record(["ports", &if ports.is_empty() { "none".into() } else { ports.join(" ") }]);
    match &status.socket {
        Some(s) => {
            let owners: Vec<String> = s.owners.iter().map(ToString::to_string).collect();
            let owners = if owners.is_empty() { "no process (held by the map only)".into() } else { owners.join(", ") };
            b.push_record(["socket".to_string(), format!("cookie {} owned by {owners}", s.cookie)]);
        }
        None => b.push_record(["socket", "none"]),
    }
    println!("{}", b.build().with(Style::sharp()));
}

fn run(cli: Cli) -> Result<()> {
    let layout = Layout::new(&cli.pin_dir);
    // Every command opens BPF objects; say so before any EPERM can.
    steer::preflight::require_bpf_caps()?;
    if !matches!(cli.command, Command::Load) {
        steer::bpffs::require_dir(&layout.dir)?;
    }
    match cli.command {
        Command::Load => {
            let id = deploy::load(&layout)?;
            println!("loaded {} (program id {id}), pinned under {}", deploy::PROGRAM, layout.dir.display());
        }
        Command::Unload => {
            for path in deploy::unload(&layout)? {
                println!("removed {}", path.display());
            }
        }
        Command::Attach => {
            let id = deploy::attach(&layout.program(), &layout.link())?;
            println!("attached: link {id} pinned at {}", layout.link().display());
        }
        Command::Detach => {
            if deploy::detach(&layout.link())? {
                println!("detached: removed {}", layout.link().display());
            } else {
                bail!("not attached: no link pinned at {}", layout.link().display());
            }
        }
        Command::Ports { command } => {
            let mut ports = PortMap::open(&layout.ports())?;
            match command {
                PortsCommand::Add { ports: list } => {
                    for port in list {
                        ports.add(port)?;
                        println!("port {port} steered");
                    }
                }
                PortsCommand::Del { ports: list } => {
                    for port in list {
                        if !ports.remove(port)? {
                            bail!("port {port} is not steered");
                        }
                        println!("port {port} no longer steered");
                    }
                }
                PortsCommand::List => {
                    let list = ports.list()?;
                    if cli.json {
                        print_json(&list)?;
                    } else {
                        let rows = list.into_iter().map(|port| PortRow { port });
                        println!("{}", Table::new(rows).with(Style::sharp()));
                    }
                }
            }
        }
        Command::Socket { command } => match command {
            SocketCommand::Set { pid, fd } => {
                let taken = steer::set_socket(&layout.socket(), 0, pid, fd)?;
                println!(
                    "socket set: {} (cookie {}) from pid {} fd {}",
                    taken.info, taken.info.cookie, taken.pid, taken.fd
                );
            }
            SocketCommand::Clear => {
                if !steer::maps::SocketMap::open(&layout.socket())?.remove(0)? {
                    bail!("no socket is set");
                }
                println!("socket cleared");
            }
        },
        Command::Status => {
            let status = steer::status::status(&layout)?;
            if cli.json {
                print_json(&status)?;
            } else {
                print_status(&status);
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("steerctl: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
