//! bind, unbind, bindings and load-bindings.

use std::path::Path;

use anyhow::{Context, Result};
use steer::{
    Dispatcher, Layout,
    model::{Binding, BindingsFile, Prefix, Protocol},
    ops::bindings,
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
    if bindings::bind(&Dispatcher::open_write(layout)?, &binding)? {
        println!("bound {binding}");
    } else {
        println!("already bound: {binding}");
    }
    Ok(())
}

pub fn unbind(layout: &Layout, args: BindingArgs) -> Result<()> {
    let binding = Binding::from(args);
    bindings::unbind(&Dispatcher::open_write(layout)?, &binding)?;
    println!("unbound {binding}");
    Ok(())
}

pub fn list(layout: &Layout, json: bool) -> Result<()> {
    let state = Dispatcher::open_read(layout)?;
    if let Some(stale) = state.staleness()? {
        eprintln!("steerctl: warning: {stale}; these bindings steer nothing here (remove it with `steerctl gc`)");
    }
    output::show(&BindingsFile { bindings: state.bindings()? }, json)
}

pub fn load(layout: &Layout, file: &Path) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let parsed = BindingsFile::parse(&text, &file.display().to_string())?;
    bindings::load_bindings(&Dispatcher::open_write(layout)?, &parsed)?;
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
