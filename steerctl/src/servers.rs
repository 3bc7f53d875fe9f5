//! Real servers: apply, watch and explain.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use steer::{
    Dispatcher, Layout,
    discovery::Member,
    model::{Protocol, config::Config},
    ops::{
        apply,
        explain::{self, Explanation, Verdict},
        watch,
    },
};

use crate::output::{self, View};

pub fn apply(layout: &Layout, file: &Path, dry_run: bool, json: bool) -> Result<()> {
    // A bad file fails here, before the state is even opened.
    let config = Config::load(file)?;
    if dry_run {
        let plan = apply::plan(&Dispatcher::open_read(layout)?, &config)?;
        return output::show(&PlanView { plan, dry_run, failed: Vec::new() }, json);
    }
    let applied = apply::apply(&Dispatcher::open_write(layout)?, &config)?;
    let failed = applied.failed.clone();
    output::show(&PlanView { plan: applied.plan, dry_run, failed: applied.failed }, json)?;
    if !failed.is_empty() {
        bail!("{} registration(s) failed", failed.len());
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct PlanView {
    #[serde(flatten)]
    plan: apply::Plan,
    dry_run: bool,
    failed: Vec<(String, String)>,
}

impl View for PlanView {
    fn table(&self) -> String {
        let mut lines = self.plan.describe(self.dry_run);
        lines.extend(self.failed.iter().map(|(what, err)| format!("{what}: failed: {err}")));
        lines.join("\n")
    }
}

/// `watch FILE`: in the foreground until SIGTERM or SIGINT (exit 0);
/// SIGHUP reloads.
pub fn watch(layout: &Layout, file: &Path, interval: Duration) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let reload = Arc::new(AtomicBool::new(false));
    // Each signal sets its flag, then writes to the pipe watch waits on.
    let (wake, wake_writer) = std::os::unix::net::UnixStream::pair().context("making the wake-up pipe")?;
    wake.set_nonblocking(true)?;
    wake_writer.set_nonblocking(true)?;
    for signal in [SIGTERM, SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    signal_hook::flag::register(SIGHUP, reload.clone()).context("installing signal handlers")?;
    for signal in [SIGTERM, SIGINT, SIGHUP] {
        signal_hook::low_level::pipe::register(signal, wake_writer.try_clone()?)
            .context("installing signal handlers")?;
    }
    let options = watch::Options { interval, ..Default::default() };
    watch::run(layout, file, &options, std::os::fd::AsFd::as_fd(&wake), || {
        // Stop wins over a pending reload.
        if stop.load(Ordering::SeqCst) {
            Some(watch::Event::Stop)
        } else if reload.swap(false, Ordering::SeqCst) {
            Some(watch::Event::Reload)
        } else {
            None
        }
    })?;
    Ok(())
}

pub fn explain(
    layout: &Layout,
    protocol: Protocol,
    addr: IpAddr,
    port: u16,
    from: Option<&[String]>,
    json: bool,
) -> Result<()> {
    let remote = match from {
        Some([addr, port]) => Some(SocketAddr::new(
            addr.parse().with_context(|| format!("{addr:?} is not an IP address"))?,
            port.parse().with_context(|| format!("{port:?} is not a port"))?,
        )),
        _ => None,
    };
    let state = Dispatcher::open_read(layout)?;
    let explanation = explain::explain(&state, protocol, SocketAddr::new(addr, port), remote)?;
    output::show(&ExplainView(explanation), json)
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct ExplainView(Explanation);

impl View for ExplainView {
    fn table(&self) -> String {
        let e = &self.0;
        let verdict = match e.verdict {
            Verdict::Assigned => "assigned a socket",
            Verdict::Dropped => "drop",
            Verdict::NormalLookup => "normal lookup",
        };
        let mut rows = vec![
            ("lookup", format!("{} {} -> {}", e.protocol, e.remote, e.local)),
            ("verdict", format!("{verdict} (program returned {})", if e.retval == 1 { "SK_PASS" } else { "SK_DROP" })),
            ("why", e.reason.clone()),
        ];
        if let Some(label) = &e.label {
            rows.push(("label", label.clone()));
        }
        if let Some(binding) = &e.binding {
            rows.push(("binding", binding.to_string()));
        }
        if let Some(cookie) = e.cookie {
            let socket = e.socket.clone().unwrap_or_else(|| "?".into());
            let slot = e.slot.as_ref().map(|s| format!(", slot {s}")).unwrap_or_default();
            rows.push(("socket", format!("cookie {cookie} {socket}{slot}")));
            rows.push(("owner", output::joined(e.owners.iter().map(ToString::to_string), ", ", "none")));
        }
        for f in &e.followed {
            let scope = if f.cgroup.is_empty() { "any cgroup".to_string() } else { format!("cgroup {}", f.cgroup) };
            rows.push(("followed", format!("by the kernel: sockets listening on {} ({scope})", f.target)));
        }
        if e.group.len() > 1 {
            rows.push(("reuseport group", members(&e.group)));
        }
        if !e.normal_lookup.is_empty() {
            rows.push(("normal lookup finds", members(&e.normal_lookup)));
        }
        for w in &e.warnings {
            rows.push(("warning", w.clone()));
        }
        output::record(rows)
    }
}

/// "cookie 5 127.0.0.1:80 nginx (pid 7, fd 6); cookie 6 ..."
pub fn members(group: &[Member]) -> String {
    let each = group.iter().map(|m| {
        format!(
            "cookie {} {} {}",
            m.cookie,
            m.local,
            output::joined(m.owners.iter().map(ToString::to_string), ", ", "-")
        )
    });
    output::joined(each, "; ", "-")
}
