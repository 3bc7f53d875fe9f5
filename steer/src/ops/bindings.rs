//! bind, unbind and load-bindings: changing the record of bindings and
//! publishing it (the version protocol is in [`crate::state::record`]).
//!
//! Every write first finishes one that died between recording and
//! publishing, then forgets labels an interrupted write left without
//! bindings or sockets, and checks everything it can before its first
//! write: a refused command changes nothing.

use std::collections::{BTreeMap, BTreeSet};

use steer_common::{BindingKey, MAX_BINDINGS, MAX_LABELS, StateMeta};

use crate::{
    error::{Context, Result, fail},
    kernel::netns,
    model::{
        Binding, BindingsFile,
        binding::KeyedBindings,
        compile::{self, Edit, Input},
        label::label_key,
        text::grouped,
    },
    state::{
        Dispatcher, PlaneStats, ReadWrite,
        record::{Inserted, Record},
    },
};

/// Runs `f`, logging how long `what` took, in all and on this thread's
/// CPU, and the process's peak memory after (RUST_LOG=debug).
pub fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    if !log::log_enabled!(log::Level::Debug) {
        return f();
    }
    let cpu = || {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
    };
    let (start, start_cpu) = (std::time::Instant::now(), cpu());
    let out = f();
    let peak = std::fs::read_to_string("/proc/self/status").ok().and_then(|status| {
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok()
    });
    log::debug!(
        "{what}: {:.3} s ({:.3} s CPU), peak RSS {} MiB",
        start.elapsed().as_secs_f64(),
        cpu() - start_cpu,
        peak.map_or("?".into(), |kib| (kib / 1024).to_string())
    );
    out
}

/// Compiles `entries` (the whole record, each key once) and makes them the
/// generation lookups use, every chunk anew; marks the record published.
pub(crate) fn publish(state: &Dispatcher<ReadWrite>, entries: &[(BindingKey, u32)]) -> Result<PlaneStats> {
    publish_sorting(state, &mut entries.to_vec())
}

/// [`publish`], sorting `entries` in place for compiling rather than a copy.
fn publish_sorting(state: &Dispatcher<ReadWrite>, entries: &mut [(BindingKey, u32)]) -> Result<PlaneStats> {
    let maps = state.maps()?;
    let mut plan = timed("planning counter sets", || maps.counters.plan(entries))?;
    let generation = timed("compiling", || compile::compile(entries, &mut plan))?;
    maps.counters.add_new(&plan)?;
    let stats = timed("publishing the generation", || maps.plane.publish(&generation))?;
    drop(generation);
    let meta = maps.plane.meta()?;
    maps.plane.set_meta(&StateMeta { plane_version: meta.record_version, bindings: entries.len() as u32, ..meta })?;
    maps.counters.drop_unused(&plan)?;
    Ok(stats)
}

/// Publishes every recorded binding anew.
fn publish_record(state: &Dispatcher<ReadWrite>) -> Result<PlaneStats> {
    let maps = state.maps()?;
    publish_sorting(state, &mut maps.record.entries(&maps.plane.meta()?)?)
}

/// Publishes changes of bindings, already recorded (the added ones
/// counted in their counter sets): in place where the plane allows (one
/// binding with no switch, several with one), else the whole record anew.
/// True when in place.
fn publish_changes(state: &Dispatcher<ReadWrite>, changes: &[(Input, Edit)], added: i64, removed: i64) -> Result<bool> {
    let maps = state.maps()?;
    let written = maps.plane.begin_write()?.map(|mut write| {
        let mut dests = maps.counters.lookup();
        for (binding, edit) in changes {
            write.add(binding, *edit, &mut dests)?;
        }
        write.commit()
    });
    let in_place = match written {
        Some(Ok(in_place)) => in_place,
        // A chunk without its pin, and no CAP_SYS_ADMIN to open it by id:
        // nothing lookups read has changed, and a full publish pins anew.
        Some(Err(e)) if matches!(e.root(), crate::error::Error::Permission(_)) => {
            log::warn!("{e:#}");
            false
        }
        Some(Err(e)) => return Err(e),
        None => false,
    };
    if !in_place {
        log::debug!("publishing every binding anew (the range arena is full, or a write died half way)");
        publish_record(state)?;
        return Ok(false);
    }
    let meta = maps.plane.meta()?;
    let bindings = (i64::from(meta.bindings) + added) as u32;
    let record_removed = (i64::from(meta.record_removed) + removed).max(0) as u32;
    maps.plane.set_meta(&StateMeta { plane_version: meta.record_version, bindings, record_removed, ..meta })?;
    Ok(true)
}

/// Publishes the record when a write died between changing it and
/// publishing it (or half way through publishing), so the command run
/// again finds the plane current whatever it then decides (a repeated bind
/// has nothing to add, a repeated unbind nothing to remove); then forgets
/// the labels such a write left without bindings or sockets.
fn finish_interrupted(state: &Dispatcher<ReadWrite>) -> Result<()> {
    let maps = state.maps()?;
    let meta = maps.plane.meta()?;
    if Record::interrupted(&meta) || meta.halves_differ != 0 {
        log::info!("publishing the bindings an interrupted write recorded");
        publish_record(state)?;
        collect_labels(state)?;
    }
    Ok(())
}

/// The longest recorded binding of `key`'s protocol and port whose prefix
/// holds `key`'s: at most one record lookup per shorter length.
fn parent(record: &Record, meta: &StateMeta, key: &BindingKey) -> Result<Option<Input>> {
    for len in (0..key.prefixlen).rev() {
        let shorter = BindingKey::new(key.protocol, len, key.port(), key.addr);
        if let Some(label) = record.get(meta, &shorter)? {
            return Ok(Some(Input::from_key(&shorter, label)));
        }
    }
    Ok(None)
}

/// Label ids that hold a socket, or that the kernel follows servers for.
fn with_sockets(state: &Dispatcher<ReadWrite>, ids: impl IntoIterator<Item = u32>) -> Result<BTreeSet<u32>> {
    let maps = state.maps()?;
    let mut held: BTreeSet<u32> = maps.slots.held(ids)?.into_iter().map(|(slot, _, _)| slot.label).collect();
    for value in maps.follows.all()?.values() {
        held.extend(value.entries.iter().map(|e| e.label).filter(|l| *l != steer_common::FollowEntry::NONE));
    }
    Ok(held)
}

/// Forgets labels that have no socket and that `keep` does not keep.
fn forget_labels(state: &Dispatcher<ReadWrite>, keep: impl Fn(&str, u32) -> bool) -> Result<usize> {
    let maps = state.maps()?;
    let labels = maps.labels.all()?;
    let held = with_sockets(state, labels.values().copied())?;
    let mut forgotten = 0;
    for (label, id) in labels {
        if !held.contains(&id) && !keep(&label, id) {
            maps.labels.remove(&label)?;
            forgotten += 1;
        }
    }
    Ok(forgotten)
}

/// Forgets labels with neither bindings nor sockets: ones an interrupted
/// write or a replaced set left behind.
pub(crate) fn collect_labels(state: &Dispatcher<ReadWrite>) -> Result<()> {
    let maps = state.maps()?;
    let bound = maps.counters.bound_labels(maps.labels.all()?.into_values())?;
    let forgotten = forget_labels(state, |_, id| bound.contains(&id))?;
    if forgotten > 0 {
        log::debug!("forgot {forgotten} label(s) with neither bindings nor sockets");
    }
    Ok(())
}

/// Fails when `b`'s label has sockets and none can take its traffic: the
/// check `register` makes, for a binding added after the sockets. A check
/// that cannot be made refuses the bind.
fn check_sockets_serve(state: &Dispatcher<ReadWrite>, b: &Binding) -> Result<()> {
    let maps = state.maps()?;
    let Some(id) = maps.labels.id(&b.label)? else { return Ok(()) };
    let cookies: Vec<u64> = maps.slots.held([id])?.into_iter().map(|(_, _, cookie)| cookie).collect();
    if cookies.is_empty() {
        return Ok(());
    }
    let netns = netns::current_inode()?;
    let found = crate::discovery::diag::by_cookies(&cookies).with_context(|| {
        format!("checking that label {}'s registered sockets can take {} traffic", b.label, b.protocol)
    })?;
    let infos: Vec<_> = found.values().map(|s| s.info(netns)).collect();
    if !infos.is_empty() && !infos.iter().any(|info| b.served_by(info)) {
        let kinds: BTreeSet<String> = infos
            .iter()
            .map(|i| format!("{} {}{}", i.protocol, i.family, if i.v6only { " (IPv6-only)" } else { "" }))
            .collect();
        fail!(
            Invalid,
            "label {} has {} socket(s), none of which can take {} {} traffic; register a matching socket first",
            b.label,
            kinds.into_iter().collect::<Vec<_>>().join(", "),
            b.protocol,
            b.family()
        );
    }
    Ok(())
}

/// Adds a binding; false when it was already there. Reads and writes only
/// what the binding touches (see [`crate::state::plane`]).
pub fn bind(state: &Dispatcher<ReadWrite>, b: &Binding) -> Result<bool> {
    label_key(&b.label)?;
    finish_interrupted(state)?;
    let maps = state.maps()?;
    let meta = maps.plane.meta()?;
    let key = b.key();
    if let Some(id) = maps.record.get(&meta, &key)? {
        let owner = maps.labels.names()?.get(&id).cloned().unwrap_or_else(|| format!("#{id}"));
        if owner != b.label {
            fail!(
                Conflict,
                "{} {} {} is already bound to label {owner}; unbind it first",
                b.protocol,
                b.prefix,
                b.port
            );
        }
        return Ok(false);
    }
    if meta.bindings >= MAX_BINDINGS {
        fail!(Full, "{} bindings are recorded, the most a set holds; unbind some first", grouped(meta.bindings.into()));
    }
    check_sockets_serve(state, b)?;
    let (id, new_label) = match maps.labels.id(&b.label)? {
        Some(id) => (id, false),
        None => (maps.labels.plan([b.label.as_str()])?[&b.label].0, true),
    };
    maps.counters.check_room([&Input::from_key(&key, id)])?;
    // Marked as changing before the label is made: a bind killed from here
    // on is finished by the next write, which forgets an unused label.
    let meta = Record::begin_change(&maps.plane, &meta)?;
    if new_label {
        maps.labels.ensure([b.label.as_str()])?;
    }
    let reused = match maps.record.insert(&meta, key, id)? {
        Inserted::Slot { reused } => reused,
        Inserted::Remade(mut every) => {
            // The record was read whole to make it anew, so published whole.
            let meta = maps.plane.meta()?;
            maps.plane.set_meta(&StateMeta { record_removed: 0, ..meta })?;
            publish_sorting(state, &mut every)?;
            return Ok(true);
        }
    };
    let input = Input::from_key(&key, id);
    maps.counters.add_binding(&input)?;
    publish_changes(state, &[(input, Edit::Add)], 1, -i64::from(reused))?;
    Ok(true)
}

/// Removes a binding, and its label when nothing else holds it.
pub fn unbind(state: &Dispatcher<ReadWrite>, b: &Binding) -> Result<()> {
    finish_interrupted(state)?;
    let maps = state.maps()?;
    let meta = maps.plane.meta()?;
    let key = b.key();
    let id = match (maps.record.get(&meta, &key)?, maps.labels.id(&b.label)?) {
        (Some(bound), Some(id)) if bound == id => id,
        _ => fail!(Conflict, "no binding {} {} {} {}", b.label, b.protocol, b.prefix, b.port),
    };
    let meta = Record::begin_change(&maps.plane, &meta)?;
    maps.record.remove(&meta, &key)?;
    let input = Input::from_key(&key, id);
    let parent = parent(&maps.record, &meta, &key)?;
    // A full publish counts the record anew, this binding no longer in it.
    if publish_changes(state, &[(input, Edit::Remove { parent })], -1, 1)? {
        maps.counters.remove_binding(&input)?;
    }
    if maps.counters.bound_labels([id])?.is_empty() && with_sockets(state, [id])?.is_empty() {
        maps.labels.remove(&b.label)?;
    }
    Ok(())
}

/// Removes `removed` (recorded bindings) and adds `added` (new ones) as
/// one change: lookups see the set before it or after it, never between.
/// Writes in place what they touch (one switch of halves), so it costs in
/// proportion to them, not to the set. Everything is checked first: a
/// refused change changes nothing.
pub fn change_bindings(state: &Dispatcher<ReadWrite>, added: &[Binding], removed: &[Binding]) -> Result<()> {
    finish_interrupted(state)?;
    let maps = state.maps()?;
    let meta = maps.plane.meta()?;
    let mut gone = Vec::new();
    for b in removed {
        let key = b.key();
        match (maps.record.get(&meta, &key)?, maps.labels.id(&b.label)?) {
            (Some(bound), Some(id)) if bound == id => gone.push((key, id)),
            _ => fail!(Conflict, "no binding {} {} {} {}", b.label, b.protocol, b.prefix, b.port),
        }
    }
    let leaving: BTreeSet<BindingKey> = gone.iter().map(|(key, _)| *key).collect();
    let (labels, keyed) = KeyedBindings::from_bindings(added)?.into_parts();
    for (key, _) in &keyed {
        if !leaving.contains(key) && maps.record.get(&meta, key)?.is_some() {
            let (protocol, prefix, port) = crate::model::binding::decode_key(key)?;
            fail!(Conflict, "{protocol} {prefix} {port} is already bound; unbind it first");
        }
    }
    let count = i64::from(meta.bindings) + keyed.len() as i64 - gone.len() as i64;
    if count > i64::from(MAX_BINDINGS) {
        fail!(
            Full,
            "{} bindings after this change; a set holds at most {}",
            grouped(count as u64),
            grouped(MAX_BINDINGS.into())
        );
    }
    for b in added {
        check_sockets_serve(state, b)?;
    }
    let ids = maps.labels.plan(labels.iter().map(String::as_str))?;
    let arriving: Vec<Input> =
        keyed.iter().map(|(key, number)| Input::from_key(key, ids[&labels[*number as usize]].0)).collect();
    maps.counters.check_room(&arriving)?;
    let mut meta = Record::begin_change(&maps.plane, &meta)?;
    maps.labels.ensure(labels.iter().map(String::as_str))?;
    let mut changes = Vec::new();
    let mut removed_slots = 0i64;
    for (key, id) in &gone {
        maps.record.remove(&meta, key)?;
        meta.bindings -= 1;
        meta.record_removed += 1;
        removed_slots += 1;
        let parent = parent(&maps.record, &meta, key)?;
        changes.push((Input::from_key(key, *id), Edit::Remove { parent }));
    }
    for ((key, _), input) in keyed.iter().zip(&arriving) {
        match maps.record.insert(&meta, *key, input.label)? {
            Inserted::Slot { reused } => {
                meta.bindings += 1;
                if reused {
                    meta.record_removed -= 1;
                    removed_slots -= 1;
                }
                maps.counters.add_binding(input)?;
                changes.push((*input, Edit::Add));
            }
            Inserted::Remade(_) => {
                // The record was made anew: every change goes into it one
                // by one, then the whole set is published.
                meta.bindings += 1;
                meta.record_removed = 0;
                removed_slots = 0;
                changes.clear();
            }
        }
    }
    if changes.len() < gone.len() + arriving.len() {
        let meta = maps.plane.meta()?;
        maps.plane.set_meta(&StateMeta { record_removed: 0, ..meta })?;
        publish_record(state)?;
    } else if publish_changes(state, &changes, arriving.len() as i64 - gone.len() as i64, removed_slots)? {
        for (key, id) in &gone {
            maps.counters.remove_binding(&Input::from_key(key, *id))?;
        }
    }
    for b in removed {
        if let Some(id) = maps.labels.id(&b.label)? {
            if maps.counters.bound_labels([id])?.is_empty() && with_sockets(state, [id])?.is_empty() {
                maps.labels.remove(&b.label)?;
            }
        }
    }
    Ok(())
}

/// Replaces every binding with `file`'s: see [`load_keyed`].
pub fn load_bindings(state: &Dispatcher<ReadWrite>, file: &BindingsFile) -> Result<PlaneStats> {
    load_keyed(state, timed("keying the bindings", || KeyedBindings::from_bindings(&file.bindings))?)
}

/// Replaces every binding with `set`'s: recorded in the idle record set,
/// switched to with one write, then published as one generation.
pub fn load_keyed(state: &Dispatcher<ReadWrite>, set: KeyedBindings) -> Result<PlaneStats> {
    let (labels, mut entries) = set.into_parts();
    if entries.len() > MAX_BINDINGS as usize {
        fail!(
            Full,
            "the file has {} bindings; a set holds at most {}",
            grouped(entries.len() as u64),
            grouped(MAX_BINDINGS.into())
        );
    }
    // Every label of the set names some binding of it.
    let staying: BTreeSet<&str> = labels.iter().map(String::as_str).collect();
    collect_labels(state)?;
    let maps = state.maps()?;
    let existing = maps.labels.all()?;
    // Labels that hold sockets stay whatever the file says.
    let held: BTreeSet<&str> = {
        let ids = with_sockets(state, existing.values().copied())?;
        existing.iter().filter(|(_, id)| ids.contains(id)).map(|(name, _)| name.as_str()).collect()
    };
    let needed = staying.union(&held).count();
    if needed > MAX_LABELS as usize {
        fail!(
            Full,
            "the file names {} labels and {} more hold registered sockets: {needed} in all, but at most {MAX_LABELS} labels fit",
            staying.len(),
            needed - staying.len()
        );
    }
    let arriving = staying.iter().filter(|label| !existing.contains_key(**label)).count();
    // Marked as changing before any label is made or forgotten: a write
    // killed from here on is finished by the next one, which also forgets
    // the labels it left without bindings (a bind reads no label it does
    // not touch otherwise).
    let meta = Record::begin_change(&maps.plane, &maps.plane.meta()?)?;
    if existing.len() + arriving > MAX_LABELS as usize {
        // Only when the ids are needed (a set replacing another of about
        // as many labels): labels leaving without a socket give theirs up
        // before the switch. Otherwise they are collected after it, so a
        // write killed in between leaves no published binding whose label
        // is gone (and whose id a later label could take).
        forget_labels(state, |label, _| staying.contains(label))?;
    }
    let ids: BTreeMap<String, u32> = maps.labels.ensure(staying.iter().copied())?;
    // Each entry's label number becomes its label's id.
    let by_number: Vec<u32> = labels.iter().map(|label| ids[label]).collect();
    for entry in &mut entries {
        entry.1 = by_number[entry.1 as usize];
    }
    let idle = 1 - (meta.active_record & 1) as usize;
    // The idle set held the set before last; only this writer reads it.
    let capacity = crate::state::record::capacity_for(entries.len());
    timed("recording the bindings", || maps.record.replace(idle, capacity, &entries))?;
    Record::begin_change(&maps.plane, &StateMeta { active_record: idle as u32, record_removed: 0, ..meta })?;
    let stats = publish_sorting(state, &mut entries)?;
    collect_labels(state)?;
    // The set replaced is read no more: made small again, its memory freed.
    maps.record.replace(1 - idle, crate::state::record::capacity_for(0), &[])?;
    Ok(stats)
}
