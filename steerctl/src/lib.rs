//! steerctl: load, attach and drive the sk_lookup dispatcher. Each command
//! group lives in its own module; the `steer` library does the work. The
//! command line is defined here, as a library, so that `cargo xtask dist`
//! can generate man pages and shell completions from it.

mod bindings;
mod lifecycle;
mod metrics;
mod output;
mod seed;
mod serve;
mod servers;
mod sockets;
mod trace;

use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use steer::{Layout, state::layout::DEFAULT_BPFFS};
use steer::{discovery::OwnerFilter, ops::register::Source};

/// steerctl's command line.
#[derive(Parser)]
#[command(
    name = "steerctl",
    version,
    about = "Steer TCP/UDP connections on many ports to one socket with BPF sk_lookup"
)]
pub struct Cli {
    /// Network namespace to act on (e.g. /run/netns/NAME); default: the current one.
    #[arg(long, global = true)]
    netns: Option<PathBuf>,
    /// Mounted bpffs to keep state in; the state directory is BPFFS/steer/<netns inode>.
    #[arg(long, global = true, default_value = DEFAULT_BPFFS)]
    bpffs: PathBuf,
    /// Use this state directory instead of BPFFS/steer/<netns inode>.
    #[arg(long, global = true)]
    pin_dir: Option<PathBuf>,
    /// Print read commands' output as JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for another steerctl holding the state's lock before giving up.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 30.0)]
    wait: f64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the dispatcher and pin it with its maps under --pin-dir.
    Load {
        /// Succeed without changing anything when the dispatcher is already loaded
        /// (for boot scripts: pins outlive restarts).
        #[arg(long)]
        if_needed: bool,
    },
    /// Detach and remove every pin `load` and `attach` made.
    Unload,
    /// Link the dispatcher to this network namespace (pinned, so it outlives steerctl).
    Attach {
        /// Succeed without changing anything when a link is already pinned.
        #[arg(long)]
        if_needed: bool,
    },
    /// Remove the link: lookups in this namespace go back to normal.
    Detach,
    /// Manage the steered ports.
    Ports {
        #[command(subcommand)]
        command: seed::PortsCommand,
    },
    /// Manage the socket that serves the steered ports.
    #[command(alias = "sockets")]
    Socket {
        #[command(subcommand)]
        command: seed::SocketCommand,
    },
    /// Show program, link, network namespace, ports and socket.
    Status,
    /// Route PROTOCOL traffic to PREFIX:PORT (PORT 0: every port) to LABEL's socket.
    Bind(bindings::BindingArgs),
    /// Remove a binding.
    Unbind(bindings::BindingArgs),
    /// List bindings (`--json` prints the format load-bindings reads).
    Bindings,
    /// Replace all bindings with a JSON file's, atomically.
    LoadBindings { file: PathBuf },
    /// Register a socket of process PID under LABEL: the one at tcp|udp
    /// ADDR PORT, or without them each of its sockets (one per family and
    /// protocol).
    RegisterPid {
        label: String,
        #[arg(allow_negative_numbers = true)]
        pid: i32,
        /// Pick the socket by protocol, address and port: tcp|udp ADDR PORT
        /// (one member of a reuseport group).
        #[arg(num_args = 3, value_names = ["PROTOCOL", "ADDR", "PORT"])]
        socket: Option<Vec<String>>,
        #[command(flatten)]
        options: sockets::RegisterArgs,
    },
    /// Register the socket listening at tcp|udp ADDR PORT (found with
    /// sock_diag, taken from its owner) under LABEL; without them, the
    /// sockets systemd passed (LISTEN_FDS).
    Register {
        label: String,
        #[arg(num_args = 3, value_names = ["PROTOCOL", "ADDR", "PORT"])]
        socket: Option<Vec<String>>,
        #[command(flatten)]
        options: sockets::RegisterArgs,
        /// Take the socket only from processes of this name (with tcp|udp
        /// ADDR PORT; systemd's sockets are this process's own).
        #[arg(long, value_name = "NAME", requires = "socket")]
        process: Option<String>,
        #[command(flatten)]
        follow: sockets::FollowArgs,
    },
    /// Remove LABEL's sockets, or only those of a protocol and/or family.
    Unregister {
        label: String,
        /// tcp|udp and/or ipv4|ipv6.
        #[arg(num_args = 0..=2, value_names = ["tcp|udp", "ipv4|ipv6"])]
        which: Vec<String>,
    },
    /// Apply a declarative config (bindings and registrations); idempotent.
    Apply {
        file: PathBuf,
        /// Print what would change, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Keep a config applied in the foreground: re-register restarted servers'
    /// sockets; SIGHUP or a change of FILE reloads it, SIGTERM/SIGINT stop.
    Watch {
        file: PathBuf,
        /// How often registered sockets are checked, in milliseconds.
        #[arg(long, default_value_t = 10, value_name = "MS")]
        interval_ms: u64,
    },
    /// What steer does with one connection: runs the pinned program on it.
    Explain {
        protocol: steer::model::Protocol,
        addr: std::net::IpAddr,
        port: u16,
        /// The client's address and port (default 127.0.0.1 / ::1, port 40000).
        #[arg(long, num_args = 2, value_names = ["ADDR", "PORT"])]
        from: Option<Vec<String>>,
    },
    /// Print each steering decision as it happens, as tcpdump prints
    /// packets: the connection, the binding that matched, and the socket
    /// assigned, the miss, the kernel's refusal or the normal lookup.
    /// Ctrl-C ends it with a summary line.
    Trace(trace::TraceArgs),
    /// List registered sockets: label, cookie, owner, protocol, address.
    List,
    /// Per-label lookups, misses and errors.
    Metrics {
        /// Serve them in the Prometheus text format at http://ADDR/metrics (e.g. 127.0.0.1:9966)
        /// until SIGTERM or SIGINT.
        #[arg(long, value_name = "ADDR")]
        serve: Option<std::net::SocketAddr>,
        /// With --serve: seconds a client has to send its request and read the answer.
        #[arg(long, value_name = "SECONDS", default_value_t = 5.0, requires = "serve")]
        timeout: f64,
    },
    /// Make the loaded state this build's without a refused connection: the same
    /// layout gets this build's programs on its live links (maps, link and
    /// sockets kept); an older layout is migrated in place (see docs/layouts.md).
    Upgrade {
        /// Succeed without changing anything when nothing is loaded or the state
        /// runs this build's programs already (for steer.service).
        #[arg(long)]
        if_needed: bool,
        /// Build a new state and switch to it even when the layout is current
        /// (the path an older layout takes).
        #[arg(long, hide = true)]
        rebuild: bool,
    },
    /// Remove state left by network namespaces that no longer exist (and by
    /// killed loads) under BPFFS/steer.
    Gc {
        /// List what would be removed; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    // Sockets systemd passed are taken before anything else is opened.
    let mut passed = match &cli.command {
        Command::Register { socket: None, .. } => Some(steer::kernel::socket::passed_fds()?),
        _ => None,
    };
    if let Some(netns) = &cli.netns {
        // Still single-threaded here, so the whole process moves.
        steer::kernel::netns::enter(netns)?;
    }
    if !(cli.wait >= 0.0 && cli.wait.is_finite()) {
        anyhow::bail!("--wait takes a number of seconds, not {}", cli.wait);
    }
    steer::kernel::lock::set_wait(std::time::Duration::from_secs_f64(cli.wait));
    let layout = match &cli.pin_dir {
        Some(dir) => Layout::new(dir),
        None => Layout::for_netns(&cli.bpffs, steer::kernel::netns::current_inode()?),
    };
    let (layout, json) = (&layout, cli.json);
    match cli.command {
        Command::Load { if_needed } => lifecycle::load(layout, if_needed),
        Command::Unload => lifecycle::unload(layout),
        Command::Attach { if_needed } => lifecycle::attach(layout, if_needed),
        Command::Detach => lifecycle::detach(layout),
        Command::Upgrade { if_needed, rebuild } => lifecycle::upgrade(layout, if_needed, rebuild, json),
        Command::Gc { dry_run } => lifecycle::gc(&cli.bpffs, dry_run, json),
        Command::Status => lifecycle::status(layout, json),
        Command::Ports { command } => seed::ports(layout, command, json),
        Command::Socket { command } => seed::socket(layout, command),
        Command::Bind(args) => bindings::bind(layout, args),
        Command::Unbind(args) => bindings::unbind(layout, args),
        Command::Bindings => bindings::list(layout, json),
        Command::LoadBindings { file } => bindings::load(layout, &file),
        Command::RegisterPid { label, pid, socket, options } => {
            let source = match socket {
                Some(socket) => Source::Address { target: sockets::target(&socket)?, filter: OwnerFilter::pid(pid) },
                None => Source::Process { pid },
            };
            sockets::register(layout, &label, &source, &options.into())
        }
        Command::Register { label, socket: Some(socket), options, follow, .. } if follow.follow => {
            sockets::follow(layout, &label, sockets::target(&socket)?, &options.into(), follow.cgroup)
        }
        Command::Register { label, socket, options, process, .. } => {
            let source = match socket {
                Some(socket) => {
                    Source::Address { target: sockets::target(&socket)?, filter: OwnerFilter { pid: None, process } }
                }
                None => Source::Passed(passed.take().unwrap_or_default()),
            };
            sockets::register(layout, &label, &source, &options.into())
        }
        Command::Unregister { label, which } => sockets::unregister(layout, &label, &which),
        Command::Apply { file, dry_run } => servers::apply(layout, &file, dry_run, json),
        Command::Watch { file, interval_ms } => {
            servers::watch(layout, &file, std::time::Duration::from_millis(interval_ms.max(1)))
        }
        Command::Explain { protocol, addr, port, from } => {
            servers::explain(layout, protocol, addr, port, from.as_deref(), json)
        }
        Command::Trace(args) => trace::run(layout, args, json),
        Command::List => sockets::list(layout, json),
        Command::Metrics { serve, timeout } => metrics::run(layout, serve, timeout, json),
    }
}

impl Cli {
    /// env_logger's level unless RUST_LOG says otherwise: `watch` runs as a
    /// service and its log is its output.
    pub fn default_log_level(&self) -> &'static str {
        if matches!(self.command, Command::Watch { .. }) { "info" } else { "warn" }
    }
}

/// The clap definition, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}
