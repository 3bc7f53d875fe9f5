//! bind, unbind, bindings and load-bindings.

use std::path::Path;

use anyhow::{Context, Result};
use steer::{
    Dispatcher, Layout,
    bindings::{Binding, BindingsFile, Prefix},
    socket::Protocol,
};

use crate::output::{self, View};

#[derive(clap::Args)]
pub struct BindingArgs {
    label: String,
    protocol: Protocol,
    /// IPv4 or IPv6 address or CIDR prefix.
    prefix: Prefix,
    /// Port, or 0 for every port.
    port: u16,
}

impl From<BindingArgs> for Binding {
    fn from(a: BindingArgs) -> Self {
        Binding { label: a.label, protocol: a.protocol, prefix: a.prefix, port: a.port }
    }
}

pub fn bind(layout: &Layout, args: BindingArgs) -> Result<()> {
    let binding = Binding::from(args);
    if Dispatcher::open_write(layout)?.bind(&binding)? {
        println!("bound {binding}");
    } else {
        println!("already bound: {binding}");
    }
    Ok(())
}

pub fn unbind(layout: &Layout, args: BindingArgs) -> Result<()> {
    let binding = Binding::from(args);
    Dispatcher::open_write(layout)?.unbind(&binding)?;
    println!("unbound {binding}");
    Ok(())
}

pub fn list(layout: &Layout, json: bool) -> Result<()> {
    output::show(&BindingsFile { bindings: Dispatcher::open_read(layout)?.bindings()? }, json)
}

pub fn load(layout: &Layout, file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed = BindingsFile::parse(&text, &file.display().to_string())?;
    Dispatcher::open_write(layout)?.load_bindings(&parsed)?;
    println!("loaded {} bindings from {}", parsed.bindings.len(), file.display());
    Ok(())
}

impl View for BindingsFile {
    fn table(&self) -> String {
        let rows = self.bindings.iter().map(|b| {
            let port = if b.port == 0 { "*".into() } else { b.port.to_string() };
            [b.label.clone(), b.protocol.to_string(), b.prefix.to_string(), port]
        });
        output::table(["LABEL", "PROTOCOL", "PREFIX", "PORT"], rows)
    }
}
