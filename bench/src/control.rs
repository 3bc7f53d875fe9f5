//! The control plane's cost: loading binding sets, making many labels, and
//! single binds at a given size, through the library and steerctl.

use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use steer::{
    Dispatcher, Layout,
    model::Protocol,
    model::{Binding, BindingsFile, Prefix},
};

use crate::sets::BindingSet;

#[derive(Debug, Clone, Serialize)]
pub struct ControlRow {
    pub operation: String,
    pub bindings: usize,
    pub seconds: f64,
    /// Seconds per operation when the row times one of many.
    pub per_operation: Option<f64>,
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<f64> {
    let start = Instant::now();
    f()?;
    Ok(start.elapsed().as_secs_f64())
}

fn reset(layout: &Layout) -> Result<()> {
    steer::ops::bindings::load_bindings(&Dispatcher::open_write(layout)?, &BindingsFile::default())?;
    Ok(())
}

/// `bulk` loaded through the library and through steerctl, a set with
/// `labels` distinct labels, and `sample` single binds on top of `bulk`.
pub fn measure(
    layout: &Layout,
    bulk: &BindingSet,
    labels: usize,
    sample: usize,
    scratch: &Path,
) -> Result<Vec<ControlRow>> {
    let n = bulk.file.bindings.len();
    let mut rows = Vec::new();
    reset(layout)?;
    let load = |file: &BindingsFile| -> Result<()> {
        steer::ops::bindings::load_bindings(&Dispatcher::open_write(layout)?, file)?;
        Ok(())
    };
    let seconds = timed(|| load(&bulk.file))?;
    rows.push(ControlRow { operation: "load-bindings (library)".into(), bindings: n, seconds, per_operation: None });

    let extra: Vec<Binding> = (0..sample)
        .map(|i| Binding {
            label: format!("extra{i}"),
            protocol: Protocol::Udp,
            prefix: Prefix::new(std::net::Ipv4Addr::new(192, 0, 2, i as u8).into(), 32).unwrap(),
            port: 53,
        })
        .collect();
    let seconds = timed(|| {
        for b in &extra {
            steer::ops::bindings::bind(&Dispatcher::open_write(layout)?, b)?;
        }
        Ok(())
    })?;
    let operation = format!("bind x{sample} on top (library)");
    rows.push(ControlRow { operation, bindings: n, seconds, per_operation: Some(seconds / sample as f64) });

    reset(layout)?;
    let many = BindingsFile {
        bindings: (0..labels)
            .map(|i| Binding {
                label: format!("label{i}"),
                protocol: Protocol::Tcp,
                prefix: Prefix::new(std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128).into(), 128).unwrap(),
                port: 443,
            })
            .collect(),
    };
    let seconds = timed(|| load(&many))?;
    rows.push(ControlRow {
        operation: format!("load-bindings, {labels} labels"),
        bindings: labels,
        seconds,
        per_operation: None,
    });

    if let Some(steerctl) = steerctl_binary() {
        let pin_dir = layout.dir.to_str().context("pin dir is not UTF-8")?;
        reset(layout)?;
        let path = scratch.join("bindings.json");
        std::fs::write(&path, serde_json::to_vec(&bulk.file)?)?;
        let seconds = timed(|| run(Command::new(&steerctl).args(["--pin-dir", pin_dir, "load-bindings"]).arg(&path)))?;
        rows.push(ControlRow { operation: "steerctl load-bindings".into(), bindings: n, seconds, per_operation: None });
        let seconds = timed(|| {
            for b in &extra {
                let (prefix, port) = (b.prefix.to_string(), b.port.to_string());
                run(Command::new(&steerctl).args(["--pin-dir", pin_dir, "bind", &b.label, "udp", &prefix, &port]))?;
            }
            Ok(())
        })?;
        let operation = format!("steerctl bind x{sample} on top");
        rows.push(ControlRow { operation, bindings: n, seconds, per_operation: Some(seconds / sample as f64) });
    }
    reset(layout)?;
    Ok(rows)
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The steerctl built with steer-bench, next to it.
pub fn steerctl_binary() -> Option<std::path::PathBuf> {
    let path = std::env::current_exe().ok()?.parent()?.join("steerctl");
    path.exists().then_some(path)
}
