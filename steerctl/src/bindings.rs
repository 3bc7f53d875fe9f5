//! bind, unbind, bindings and load-bindings.

use std::{io::Read, path::Path};

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

/// Files up to this size are read whole and parsed in memory: serde_json
/// parses text about 1.5 times as fast as it parses a reader (a million
/// bindings: 83 MB of JSON, 0.5 s). Larger ones, and pipes, are parsed as
/// they are read, so that memory stays bounded whatever the file's size
/// and layout (at most about 150 MiB at a million bindings either way).
const READ_WHOLE: u64 = 96 << 20;

/// Replaces the bindings with FILE's, parsed straight into keyed form.
pub fn load(layout: &Layout, file: &Path) -> Result<()> {
    let name = file.display().to_string();
    let set = bindings::timed("reading the file", || -> Result<_> {
        let mut reader = std::fs::File::open(file).with_context(|| format!("reading {name}"))?;
        let meta = reader.metadata().with_context(|| format!("reading {name}"))?;
        if meta.is_file() && meta.len() <= READ_WHOLE {
            let mut text = Vec::with_capacity(meta.len() as usize);
            reader.read_to_end(&mut text).with_context(|| format!("reading {name}"))?;
            return Ok(BindingsFile::parse_keyed(&text, &name)?);
        }
        Ok(BindingsFile::read_keyed(std::io::BufReader::with_capacity(1 << 16, reader), &name)?)
    })?;
    let count = set.len();
    bindings::load_keyed(&Dispatcher::open_write(layout)?, set)?;
    println!("loaded {count} bindings from {name}");
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
