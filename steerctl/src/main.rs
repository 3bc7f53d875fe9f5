//! steerctl: load, attach and drive the sk_lookup dispatcher.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;
use steer::{
    Layout,
    bindings::{Binding, BindingsFile, Prefix},
    control::{self, State},
    deploy,
    maps::PortMap,
    socket::Protocol,
    status::Status,
};
use tabled::{Table, Tabled, builder::Builder, settings::Style};

#[derive(Parser)]
#[command(version, about = "Steer TCP/UDP connections on many ports to one socket with BPF sk_lookup")]
struct Cli {
    /// Network namespace to act on (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, global = true)]
    netns: Option<PathBuf>,
    /// Mounted bpffs to keep state in; the state directory is BPFFS/steer/<netns inode>.
    #[arg(long, global = true, default_value = deploy::DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Use this state directory instead of BPFFS/steer/<netns inode>.
    #[arg(long, global = true)]
    pin_dir: Option<PathBuf>,
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
    #[command(alias = "sockets")]
    Socket {
        #[command(subcommand)]
        command: SocketCommand,
    },
    /// Show program, link, network namespace, ports and socket.
    Status,
    /// Route PROTOCOL traffic to PREFIX:PORT (PORT 0: every port) to LABEL's socket.
    Bind(BindingArgs),
    /// Remove a binding.
    Unbind(BindingArgs),
    /// List bindings (`--json` prints the format load-bindings reads).
    Bindings,
    /// Replace all bindings with a JSON file's, atomically.
    LoadBindings { file: PathBuf },
    /// Register a socket of process PID under LABEL.
    RegisterPid {
        label: String,
        #[arg(allow_negative_numbers = true)]
        pid: i32,
        /// Pick the socket by protocol, address and port: tcp|udp ADDR PORT.
        #[arg(num_args = 3, value_names = ["PROTOCOL", "ADDR", "PORT"])]
        socket: Option<Vec<String>>,
    },
    /// Register sockets passed by systemd socket activation (LISTEN_FDS) under LABEL.
    Register { label: String },
    /// Remove LABEL's sockets.
    Unregister { label: String },
    /// List registered sockets: label, cookie, owner, protocol, address.
    List,
    /// Per-label lookups, misses and errors.
    Metrics {
        /// Serve them in the Prometheus text format on ADDR (e.g. 127.0.0.1:9100) until killed.
        #[arg(long, value_name = "ADDR")]
        serve: Option<std::net::SocketAddr>,
    },
    /// Replace the BPF program with this build's, keeping maps, link and sockets.
    Upgrade,
}

impl Command {
    fn changes_state(&self) -> bool {
        match self {
            Command::Ports { command } => !matches!(command, PortsCommand::List),
            Command::Status | Command::Bindings | Command::List | Command::Metrics { .. } => false,
            _ => true,
        }
    }
}

#[derive(clap::Args)]
struct BindingArgs {
    label: String,
    protocol: Protocol,
    /// IPv4 or IPv6 address or CIDR prefix.
    prefix: Prefix,
    /// Port, or 0 for every port.
    port: u16,
}

impl BindingArgs {
    fn binding(self) -> Binding {
        Binding { label: self.label, protocol: self.protocol, prefix: self.prefix, port: self.port }
    }
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
    b.push_record([
        "labels".to_string(),
        format!("{} ({} bindings, {} sockets; see `steerctl bindings` and `steerctl list`)", status.labels, status.bindings, status.registered_sockets),
    ]);
    println!("{}", b.build().with(Style::sharp()));
}

#[derive(Tabled)]
struct BindingRow {
    #[tabled(rename = "LABEL")]
    label: String,
    #[tabled(rename = "PROTOCOL")]
    protocol: Protocol,
    #[tabled(rename = "PREFIX")]
    prefix: Prefix,
    #[tabled(rename = "PORT")]
    port: String,
}

fn run(cli: Cli) -> Result<()> {
    if let Some(netns) = &cli.netns {
        // Still single-threaded here, so the whole process moves.
        steer::netns::enter(netns)?;
    }
    let layout = match &cli.pin_dir {
        Some(dir) => Layout::new(dir),
        None => Layout::for_netns(&cli.bpffs, steer::netns::current_inode()?),
    };
    // Every command opens BPF objects; say so before any EPERM can.
    steer::preflight::require_bpf_caps()?;
    // Every command that changes state holds the state directory's lock
    // throughout, so concurrent runs are serialised and none loses an update.
    // (`load` takes it itself once the directory exists.)
    let _lock = match &cli.command {
        Command::Load => None,
        command if command.changes_state() => Some(deploy::lock(&layout)?),
        // `metrics --serve` runs until killed: it must not hold off writers.
        Command::Metrics { serve: Some(_) } => {
            steer::bpffs::require_dir(&layout.dir)?;
            None
        }
        _ => Some(deploy::lock_shared(&layout)?),
    };
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
                    // All or nothing: an unlisted port fails before any goes.
                    let steered = ports.list()?;
                    if let Some(port) = list.iter().find(|p| !steered.contains(p)) {
                        bail!("port {port} is not steered");
                    }
                    for port in list {
                        ports.remove(port)?;
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
        Command::Bind(args) => {
            let binding = args.binding();
            if State::open(&layout)?.bind(&binding)? {
                println!("bound {binding}");
            } else {
                println!("already bound: {binding}");
            }
        }
        Command::Unbind(args) => {
            let binding = args.binding();
            State::open(&layout)?.unbind(&binding)?;
            println!("unbound {binding}");
        }
        Command::Bindings => {
            let bindings = State::open(&layout)?.bindings()?;
            if cli.json {
                print_json(&BindingsFile { bindings })?;
            } else {
                let rows = bindings.into_iter().map(|b| BindingRow {
                    label: b.label,
                    protocol: b.protocol,
                    prefix: b.prefix,
                    port: if b.port == 0 { "*".into() } else { b.port.to_string() },
                });
                println!("{}", Table::new(rows).with(Style::sharp()));
            }
        }
        Command::LoadBindings { file } => {
            use anyhow::Context;
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let parsed: BindingsFile =
                serde_json::from_str(&text).with_context(|| format!("{} is not a valid bindings file", file.display()))?;
            State::open(&layout)?.load_bindings(&parsed)?;
            println!("loaded {} bindings from {}", parsed.bindings.len(), file.display());
        }
        Command::RegisterPid { label, pid, socket } => {
            let filter = match socket.as_deref() {
                Some([protocol, address, port]) => {
                    use anyhow::Context;
                    Some(control::SocketFilter {
                        protocol: protocol.parse()?,
                        address: address.parse().with_context(|| format!("{address:?} is not an IP address"))?,
                        port: port.parse().with_context(|| format!("{port:?} is not a port"))?,
                    })
                }
                _ => None,
            };
            steer::preflight::require_fd_taking_caps()?;
            let mut state = State::open(&layout)?;
            let taken = control::sockets_of(pid, filter.as_ref())?;
            use std::os::fd::AsFd;
            let sockets: Vec<_> = taken.iter().map(|t| (&t.info, t.socket.as_fd())).collect();
            state.register(&label, &sockets)?;
            for t in &taken {
                println!("registered {} (pid {pid} fd {}, cookie {}) as {label}", t.info, t.fd, t.info.cookie);
            }
        }
        Command::Register { label } => {
            let activated = control::activated_sockets()?;
            // Safety: activated_sockets checked each fd is open, for the process's life.
            let sockets: Vec<_> =
                activated.iter().map(|(fd, info)| (info, unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) })).collect();
            State::open(&layout)?.register(&label, &sockets)?;
            for (fd, info) in &activated {
                println!("registered {info} (fd {fd}, cookie {}) as {label}", info.cookie);
            }
        }
        Command::Unregister { label } => {
            let removed = State::open(&layout)?.unregister(&label)?;
            println!("unregistered {removed} socket(s) of {label}");
        }
        Command::List => {
            let registrations = State::open(&layout)?.registrations()?;
            if cli.json {
                print_json(&registrations)?;
            } else {
                let mut b = Builder::default();
                b.push_record(["LABEL", "PROTOCOL", "FAMILY", "ADDRESS", "COOKIE", "OWNER"]);
                for r in registrations {
                    let owners: Vec<String> = r.owners.iter().map(ToString::to_string).collect();
                    b.push_record([
                        r.label,
                        r.protocol.to_string(),
                        r.family.to_string(),
                        r.address.unwrap_or_else(|| "?".into()),
                        r.cookie.to_string(),
                        if owners.is_empty() { "-".into() } else { owners.join(", ") },
                    ]);
                }
                println!("{}", b.build().with(Style::sharp()));
            }
        }
        Command::Metrics { serve } => {
            if let Some(addr) = serve {
                State::open(&layout)?;
                eprintln!("serving metrics on http://{addr}/metrics");
                control::serve_metrics(&layout, addr)?;
            }
            let stats = State::open(&layout)?.metrics()?;
            if cli.json {
                print_json(&stats)?;
            } else {
                let mut b = Builder::default();
                b.push_record(["LABEL", "LOOKUPS", "MISSES", "ERRORS"]);
                for s in stats {
                    b.push_record([s.label, s.metrics.lookups.to_string(), s.metrics.misses.to_string(), s.metrics.errors.to_string()]);
                }
                println!("{}", b.build().with(Style::sharp()));
            }
        }
        Command::Upgrade => {
            let (old, new) = deploy::upgrade(&layout)?;
            println!("upgraded: program {old} replaced by {new}; maps, link and sockets kept");
        }
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
