//! load, unload, attach, detach, upgrade and status.

use anyhow::{Result, bail};
use steer::{
    Dispatcher, Layout,
    common::names,
    kernel::links::SkLookupLink,
    ops::{
        explain::other_links,
        lifecycle::{self, GcEntry},
        status::{self, Status},
        upgrade::{self, Action, Planned},
    },
    state::layouts,
};

use crate::output::{self, View};

pub fn load(layout: &Layout, if_needed: bool) -> Result<()> {
    match lifecycle::load(layout) {
        Ok((_, id)) => {
            println!("loaded {} (program id {id}), pinned under {}", names::STEER_PROGRAM, layout.dir.display());
            Ok(())
        }
        // Only a loaded program counts: leftover maps without one still fail.
        Err(steer::Error::AlreadyLoaded { .. }) if if_needed && layout.program().exists() => {
            println!("already loaded: {} exists", layout.program().display());
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

pub fn unload(layout: &Layout) -> Result<()> {
    for path in lifecycle::unload(Dispatcher::open_repair(layout)?)? {
        println!("removed {}", path.display());
    }
    Ok(())
}

pub fn attach(layout: &Layout, if_needed: bool) -> Result<()> {
    let state = Dispatcher::open_write(layout)?;
    if if_needed && layout.link().exists() {
        println!("already attached: a link is pinned at {}", layout.link().display());
        return Ok(());
    }
    let id = lifecycle::attach(&state)?;
    println!("attached: link {id} pinned at {}", layout.link().display());
    Ok(())
}

pub fn detach(layout: &Layout) -> Result<()> {
    if !lifecycle::detach(&Dispatcher::open_repair(layout)?)? {
        bail!("not attached: no link pinned at {}", layout.link().display());
    }
    println!("detached: removed {}", layout.link().display());
    Ok(())
}

pub fn upgrade(layout: &Layout, if_needed: bool, rebuild: bool, json: bool) -> Result<()> {
    let done = upgrade::upgrade(layout, upgrade::Options { if_needed, rebuild })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&done)?);
        return Ok(());
    }
    for note in &done.notes {
        println!("{note}");
    }
    let dir = done.dir.display();
    let id = |p: Option<u32>| p.map_or("none".into(), |id| id.to_string());
    let to = layouts::describe(done.to_layout);
    match done.action {
        Action::NotLoaded => println!("nothing to upgrade: no state at {dir}"),
        Action::UpToDate => println!("up to date: {dir} runs this build's programs ({to})"),
        Action::Swapped => {
            let follows = match done.follow_links {
                0 => String::new(),
                n => format!("; {n} follow link(s) switched to this build's programs"),
            };
            println!(
                "upgraded: program {} replaced by {}; maps, link and sockets kept{follows}",
                id(done.old_program),
                id(done.new_program)
            );
        }
        Action::Migrated => {
            let from = done.from_layout.map_or("?".into(), layouts::describe);
            let c = done.carried.clone().unwrap_or_default();
            println!(
                "upgraded: migrated {dir} from {from} to {to}; program {} replaced by {} on the live link",
                id(done.old_program),
                id(done.new_program)
            );
            println!(
                "carried: {} labels, {} bindings, {} registered sockets, {} seed ports, {}, {} counter sets, {} follow links",
                c.labels,
                c.bindings,
                c.sockets,
                c.seed_ports,
                if c.seed_socket { "the seed socket" } else { "no seed socket" },
                c.counter_sets,
                c.follow_links
            );
        }
        Action::Finished => {
            println!("upgraded: finished an interrupted upgrade of {dir} (program {} serves)", id(done.new_program))
        }
    }
    Ok(())
}

pub fn status(layout: &Layout, json: bool) -> Result<()> {
    let mut status = status::status(&Dispatcher::open_read(layout)?)?;
    let other_sk_lookup = match other_links(&layout.link()) {
        Ok(links) => links,
        Err(e @ steer::Error::Permission(_)) => {
            status.warnings.push(format!("other sk_lookup programs unknown: {e}"));
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    output::show(&StatusView { status, other_sk_lookup }, json)
}

#[derive(serde::Serialize)]
struct StatusView {
    #[serde(flatten)]
    status: Status,
    /// sk_lookup links of this namespace other than steer's.
    other_sk_lookup: Vec<SkLookupLink>,
}

impl View for StatusView {
    fn table(&self) -> String {
        let s = &self.status;
        let program = s.program.as_ref().map_or("not loaded".into(), |p| format!("{} id {}", p.name, p.id));
        let link = s.link.as_ref().map_or("not attached".into(), |l| {
            format!("id {} prog {} netns inode {}", l.id, l.program_id, l.netns_inode)
        });
        let socket = s.socket.as_ref().map_or("none".into(), |sock| {
            let owners =
                output::joined(sock.owners.iter().map(ToString::to_string), ", ", "no process (held by the map only)");
            format!("cookie {} owned by {owners}", sock.cookie)
        });
        let mut rows = vec![("pin dir", s.pin_dir.clone())];
        // The layout, and what `upgrade` would do when it has something to do.
        if let Some(l) = &s.layout {
            let name = match (l.version, l.name) {
                (Some(v), Some(name)) => format!("{v} ({name})"),
                (Some(v), None) => v.to_string(),
                (None, _) => "none (from before layout versions)".into(),
            };
            let note = if l.upgrade == Planned::Nothing { "this steerctl's".to_string() } else { l.note.clone() };
            rows.push(("layout", format!("{name}: {note}")));
        }
        rows.extend([
            ("netns inode", s.current_netns_inode.to_string()),
            ("program", program),
            ("link", link),
            ("ports", output::joined(s.ports.iter().map(u16::to_string), " ", "none")),
            ("socket", socket),
            (
                "labels",
                format!(
                    "{} ({} bindings, {} sockets; see `steerctl bindings` and `steerctl list`)",
                    s.labels, s.bindings, s.registered_sockets
                ),
            ),
        ]);
        if !s.followed.is_empty() {
            let each = s.followed.iter().map(|f| {
                let scope = if f.follow.cgroup.is_empty() { String::new() } else { format!(" in {}", f.follow.cgroup) };
                format!("{} {}{scope}: {} held", f.follow.label, f.follow.target, f.held)
            });
            rows.push(("followed", format!("in the kernel: {}", each.collect::<Vec<_>>().join("; "))));
        }
        if let Some(why) = &s.follow_unsupported {
            rows.push(("following", format!("{why}; `steerctl watch` follows servers by polling instead")));
        }
        let live: Vec<String> = s.tracers.iter().filter(|t| !t.exited).map(|t| format!("pid {}", t.pid)).collect();
        match (s.plane.as_ref().is_some_and(|p| p.tracing), live.is_empty()) {
            (_, false) => rows.push(("tracing", format!("{} tracer(s): {}", live.len(), live.join(", ")))),
            (true, true) => rows.push(("tracing", "on until the next lookup finds no tracer live".into())),
            (false, true) => {}
        }
        if let Some(stale) = &s.stale {
            rows.push(("stale", format!("{stale}; remove it with `steerctl gc`")));
        }
        if s.plane.as_ref().is_some_and(|p| !p.up_to_date) {
            let note = "a write was interrupted: lookups use the previous bindings until the next bind, unbind or load-bindings";
            rows.push(("warning", note.into()));
        }
        for warning in &s.warnings {
            rows.push(("warning", warning.clone()));
        }
        if !self.other_sk_lookup.is_empty() {
            let links = self
                .other_sk_lookup
                .iter()
                .map(|l| format!("link {} (prog {} name {})", l.link_id, l.program_id, l.program_name));
            rows.push((
                "other sk_lookup programs",
                format!(
                    "{} — their redirects override steer's drops, and their drops can hide steer's answers",
                    links.collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        output::record(rows)
    }
}

pub fn gc(bpffs: &std::path::Path, dry_run: bool, json: bool) -> Result<()> {
    let collected = Collected(lifecycle::gc(bpffs, dry_run)?);
    output::show(&collected, json)?;
    if collected.0.iter().any(|e| e.error.is_some()) {
        bail!("some state directories could not be looked at or removed (see above)");
    }
    Ok(())
}

#[derive(serde::Serialize)]
#[serde(transparent)]
struct Collected(Vec<GcEntry>);

impl View for Collected {
    fn table(&self) -> String {
        let rows = self.0.iter().map(|e| {
            let verdict = match (&e.stale, e.removed, &e.error) {
                (_, _, Some(error)) => format!("kept: {error}"),
                (None, _, None) => "kept: its namespace lives".to_string(),
                (Some(why), true, None) => format!("removed: {why}"),
                (Some(why), false, None) => format!("would remove: {why}"),
            };
            [e.dir.display().to_string(), verdict]
        });
        output::table(["STATE", "VERDICT"], rows)
    }
}
