//! The seed's port list and its one socket.

use anyhow::{Result, bail};
use clap::Subcommand;
use steer::{Dispatcher, Layout, ops::seed};

use crate::output::{self, View};

#[derive(Subcommand)]
pub enum PortsCommand {
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
pub enum SocketCommand {
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

pub fn ports(layout: &Layout, command: PortsCommand, json: bool) -> Result<()> {
    match command {
        PortsCommand::Add { ports } => {
            seed::add_ports(&Dispatcher::open_write(layout)?, &ports)?;
            ports.iter().for_each(|port| println!("port {port} steered"));
        }
        PortsCommand::Del { ports } => {
            seed::remove_ports(&Dispatcher::open_write(layout)?, &ports)?;
            ports.iter().for_each(|port| println!("port {port} no longer steered"));
        }
        PortsCommand::List => output::show(&PortList(Dispatcher::open_read(layout)?.ports()?), json)?,
    }
    Ok(())
}

pub fn socket(layout: &Layout, command: SocketCommand) -> Result<()> {
    match command {
        SocketCommand::Set { pid, fd } => {
            let taken = seed::set_socket(&Dispatcher::open_write(layout)?, pid, fd)?;
            println!(
                "socket set: {} (cookie {}) from pid {} fd {}",
                taken.info, taken.info.cookie, taken.pid, taken.fd
            );
        }
        SocketCommand::Clear => {
            if !seed::clear_socket(&Dispatcher::open_write(layout)?)? {
                bail!("no socket is set");
            }
            println!("socket cleared");
        }
    }
    Ok(())
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct PortList(Vec<u16>);

impl View for PortList {
    fn table(&self) -> String {
        output::table(["PORT"], self.0.iter().map(|p| [p.to_string()]))
    }
}
