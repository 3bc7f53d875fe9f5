//! `steerctl apply FILE` / `watch FILE`: a declarative config of bindings
//! and registrations by listening address, planned in full before anything
//! changes.
//!
//! ```json
//! {"bindings": [{"label": "web", "protocol": "tcp", "prefix": "192.0.2.0/24", "port": 80}],
//!  "registrations": [{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8080,
//!                     "no_reuseport": false, "pid_file": "/run/nginx.pid", "process": "nginx"}]}
//! ```
//!
//! * `bindings`, when present, is the whole set: it replaces the recorded
//!   bindings atomically (`load_bindings`), and only when it differs from
//!   them. Absent, the bindings are left alone.
//! * Each registration names where its server listens. Its label's slot
//!   for the found socket's family and protocol gets one member of the
//!   socket's group, from the process in `pid_file` / processes named
//!   `process` when given; a slot already holding a member stays as it is.
//!   Registrations the file does not list are left alone (remove them with
//!   `steerctl unregister`): apply never unregisters.
//! * A bad file (syntax, unknown field, bad label, clashing bindings, two
//!   registrations for one slot, a socket the label's bindings cannot use)
//!   fails before anything changes. A server that is not listening (yet) is
//!   not an error: its registration waits, and `watch` makes it when it
//!   listens.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use steer_common::BindingKey;

use crate::{
    Dispatcher, ReadWrite,
    bindings::{self, Binding, BindingsFile},
    dispatcher::Access,
    error::{Context, Result, fail},
    labelled::Slots,
    servers::{self, Choice, Member, OwnerFilter, Target},
    socket::{Family, Protocol, SocketInfo},
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Every binding; absent: the recorded bindings are not managed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bindings: Option<Vec<Binding>>,
    #[serde(default)]
    pub registrations: Vec<Wanted>,
}

/// A registration by listening address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Wanted {
    pub label: String,
    pub protocol: Protocol,
    /// The address the server binds (0.0.0.0 / :: for a wildcard bind,
    /// or an address a wildcard bind covers).
    pub address: IpAddr,
    pub port: u16,
    /// Pin exactly the registered socket rather than its reuseport group.
    #[serde(default)]
    pub no_reuseport: bool,
    /// Take the socket only from the process whose pid this file holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid_file: Option<PathBuf>,
    /// Take the socket only from processes of this name (/proc/PID/comm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

impl Wanted {
    pub fn target(&self) -> Target {
        Target { protocol: self.protocol, address: self.address, port: self.port }
    }
}

impl Config {
    /// Parses and checks a config; `name` is for messages.
    pub fn parse(text: &str, name: &str) -> Result<Self> {
        let config: Config =
            serde_json::from_str(text).with_context(|| format!("{name} is not a valid steer config"))?;
        config.validate().with_context(|| format!("{name} is not a valid steer config"))?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Everything that can be checked without the kernel.
    pub fn validate(&self) -> Result<()> {
        if let Some(list) = &self.bindings {
            let mut seen: BTreeMap<BindingKey, &str> = BTreeMap::new();
            for b in list {
                bindings::label_key(&b.label)?;
                if let Some(other) = seen.insert(b.key(), &b.label) {
                    if other != b.label {
                        fail!(
                            Invalid,
                            "{} {} {} is bound to both {other} and {}",
                            b.protocol,
                            b.prefix,
                            b.port,
                            b.label
                        );
                    }
                }
            }
        }
        let mut slots = BTreeSet::new();
        for w in &self.registrations {
            bindings::label_key(&w.label)?;
            if w.port == 0 {
                fail!(Invalid, "registration {} {}: port 0 is no listening port", w.label, w.target());
            }
            if w.process.as_deref().is_some_and(str::is_empty) {
                fail!(Invalid, "registration {} {}: process is empty", w.label, w.target());
            }
            let family = if w.address.to_canonical().is_ipv4() { Family::Ipv4 } else { Family::Ipv6 };
            if !slots.insert((w.label.as_str(), w.protocol, family)) {
                fail!(
                    Invalid,
                    "two registrations for label {} {} {family}: a label holds one socket per protocol and family",
                    w.label,
                    w.protocol
                );
            }
        }
        Ok(())
    }
}

/// How the bindings would change.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BindingsChange {
    /// False when the config has no `bindings`: they are left alone.
    pub managed: bool,
    pub added: Vec<Binding>,
    pub removed: Vec<Binding>,
}

/// One registration's step.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    #[serde(flatten)]
    pub wanted: Wanted,
    #[serde(flatten)]
    pub choice: Choice,
}

impl Step {
    /// The (family, cookie) the label's slot holds once this step is done.
    pub fn outcome(&self) -> Option<(Family, u64)> {
        match &self.choice {
            Choice::Keep { family, cookie, .. } => Some((*family, *cookie)),
            Choice::Register { member, .. } => Some((member.family, member.cookie)),
            Choice::Wait { .. } => None,
        }
    }

    pub fn describe(&self, dry_run: bool) -> String {
        let w = &self.wanted;
        let head = format!("{} {}", w.label, w.target());
        match &self.choice {
            Choice::Keep { cookie, group, .. } => {
                format!("{head}: unchanged (cookie {cookie}{})", group_note(*group, w.no_reuseport))
            }
            Choice::Register { member, owner, group, replacing, .. } => {
                let verb = if dry_run { "would register" } else { "registered" };
                let replacing = replacing.map(|c| format!(", replacing cookie {c}")).unwrap_or_default();
                format!(
                    "{head}: {verb} {} {} (cookie {}) from {owner}{replacing}{}",
                    w.protocol,
                    member.local,
                    member.cookie,
                    group_note(*group, w.no_reuseport)
                )
            }
            Choice::Wait { reason, .. } => format!("{head}: waiting: {reason}"),
        }
    }
}

fn group_note(group: usize, no_reuseport: bool) -> String {
    match (group, no_reuseport) {
        (1, _) => String::new(),
        (n, false) => format!("; reuseport group of {n}, all serve"),
        (n, true) => format!("; reuseport group of {n}, only this one serves (no_reuseport)"),
    }
}

/// What applying a config does.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub bindings: BindingsChange,
    pub registrations: Vec<Step>,
}

impl Plan {
    /// Whether applying it changes anything.
    pub fn changes(&self) -> bool {
        !self.bindings.added.is_empty()
            || !self.bindings.removed.is_empty()
            || self.registrations.iter().any(|s| matches!(s.choice, Choice::Register { .. }))
    }

    pub fn describe(&self, dry_run: bool) -> Vec<String> {
        let mut out = Vec::new();
        let (add, remove) = if dry_run { ("would bind", "would unbind") } else { ("bound", "unbound") };
        out.extend(self.bindings.added.iter().map(|b| format!("{add} {b}")));
        out.extend(self.bindings.removed.iter().map(|b| format!("{remove} {b}")));
        out.extend(self.registrations.iter().map(|s| s.describe(dry_run)));
        if !self.changes() {
            out.push("no changes".into());
        }
        out
    }
}

/// Plans `config` against the state and the sockets of this namespace;
/// fails (changing nothing) when the config cannot be applied.
pub fn plan<A: Access>(state: &Dispatcher<A>, config: &Config) -> Result<Plan> {
    config.validate()?;
    let recorded = state.bindings()?;
    let bindings = match &config.bindings {
        None => BindingsChange::default(),
        Some(wanted) => {
            let keyed = |list: &[Binding]| -> BTreeMap<(BindingKey, String), Binding> {
                list.iter().map(|b| ((b.key(), b.label.clone()), b.clone())).collect()
            };
            let (old, new) = (keyed(&recorded), keyed(wanted));
            BindingsChange {
                managed: true,
                added: new.iter().filter(|(k, _)| !old.contains_key(k)).map(|(_, b)| b.clone()).collect(),
                removed: old.iter().filter(|(k, _)| !new.contains_key(k)).map(|(_, b)| b.clone()).collect(),
            }
        }
    };
    // The bindings the registrations must fit: the config's, or the recorded.
    let effective: &[Binding] = config.bindings.as_deref().unwrap_or(&recorded);
    let mut steps = Vec::new();
    for w in &config.registrations {
        let choice = plan_one(state, w)?;
        if let Choice::Register { member, .. } = &choice {
            check_fits(w, member, effective)?;
        }
        steps.push(Step { wanted: w.clone(), choice });
    }
    Ok(Plan { bindings, registrations: steps })
}

fn plan_one<A: Access>(state: &Dispatcher<A>, w: &Wanted) -> Result<Choice> {
    let pid = match &w.pid_file {
        Some(path) => match servers::read_pid_file(path) {
            Ok(pid) => Some(pid),
            Err(e) => return Ok(Choice::Wait { reason: e.chain(), listening: false }),
        },
        None => None,
    };
    let filter = OwnerFilter { pid, process: w.process.clone() };
    let target = w.target();
    // Cheap first: a healthy registration needs no /proc scan.
    let bare = servers::groups(&target, false)?;
    let current = servers::current(&Slots::open(state)?, &w.label, w.protocol, w.no_reuseport)?;
    if bare.is_empty() {
        return Ok(servers::choose(&bare, &filter, &current));
    }
    if filter.is_empty() {
        let choice = servers::choose(&bare, &filter, &current);
        if matches!(choice, Choice::Keep { .. }) {
            return Ok(choice);
        }
    }
    let mut groups = servers::groups(&target, true)?;
    if let Some(pid) = filter.pid {
        servers::add_pid_owners(&mut groups, pid);
    }
    Ok(servers::choose(&groups, &filter, &current))
}

/// Fails unless `member` can serve `w.label`'s bindings in `bindings`
/// (the label's protocol and family), as `register` would check.
fn check_fits(w: &Wanted, member: &Member, bindings: &[Binding]) -> Result<()> {
    let served: Vec<&Binding> = bindings.iter().filter(|b| b.label == w.label).collect();
    let info = SocketInfo {
        family: member.family,
        v6only: member.v6only,
        protocol: w.protocol,
        local: Some(member.local),
        listening: true,
        connected: false,
        cookie: member.cookie,
        inode: member.inode,
        netns_inode: 0,
    };
    if let Some(kinds) = crate::labelled::unserved(&info, &served) {
        fail!(
            Invalid,
            "registration {} {}: label {} is bound to {kinds} but the socket there is a {} {}{} socket",
            w.label,
            w.target(),
            w.label,
            w.protocol,
            member.family,
            if member.v6only { " IPv6-only" } else { "" }
        );
    }
    Ok(())
}

/// What [`apply`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub plan: Plan,
    /// Registrations that failed while applying (the socket closed
    /// meanwhile...), with the error; the others were applied.
    pub failed: Vec<(String, String)>,
}

/// Plans and applies `config` under the write lock: the bindings first
/// (one atomic switch), then each registration.
pub fn apply(state: &Dispatcher<ReadWrite>, config: &Config) -> Result<Applied> {
    let plan = plan(state, config)?;
    if plan.bindings.managed && (!plan.bindings.added.is_empty() || !plan.bindings.removed.is_empty()) {
        let file = BindingsFile { bindings: config.bindings.clone().unwrap_or_default() };
        state.load_bindings(&file).context("replacing the bindings")?;
    }
    let mut failed = Vec::new();
    for step in &plan.registrations {
        if let Choice::Register { member, owner, group, .. } = &step.choice {
            let w = &step.wanted;
            if let Err(e) = servers::take_and_register(state, &w.label, member, owner, *group, w.no_reuseport) {
                failed.push((format!("{} {}", w.label, w.target()), e.chain()));
            }
        }
    }
    Ok(Applied { plan, failed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_and_bad_ones_say_why() {
        let good = r#"{"bindings": [{"label": "web", "protocol": "tcp", "prefix": "127.0.0.0/8", "port": 80}],
            "registrations": [{"label": "web", "protocol": "tcp", "address": "127.0.0.1", "port": 8080,
                               "process": "nginx"}]}"#;
        let c = Config::parse(good, "good").unwrap();
        assert_eq!(c.registrations[0].process.as_deref(), Some("nginx"));
        assert!(!c.registrations[0].no_reuseport);
        assert_eq!(Config::parse("{}", "empty").unwrap(), Config { bindings: None, registrations: vec![] });
        for (text, message) in [
            (
                r#"{"registrations": [{"label": "x", "protocol": "tcp", "address": "::1", "port": 1, "pid": 3}]}"#,
                "unknown field",
            ),
            (
                r#"{"registrations": [{"label": "bad label", "protocol": "tcp", "address": "::1", "port": 1}]}"#,
                "bad label",
            ),
            (r#"{"registrations": [{"label": "x", "protocol": "tcp", "address": "::1", "port": 0}]}"#, "port 0"),
            (
                r#"{"registrations": [{"label": "x", "protocol": "tcp", "address": "::1", "port": 1},
                                      {"label": "x", "protocol": "tcp", "address": "::2", "port": 2}]}"#,
                "two registrations for label x tcp ipv6",
            ),
            (r#"{"bindings": [], "extra": 1}"#, "unknown field"),
        ] {
            let err = Config::parse(text, "f").unwrap_err();
            let chain: Vec<String> = std::iter::successors(Some(&err as &dyn std::error::Error), |e| e.source())
                .map(ToString::to_string)
                .collect();
            assert!(chain.join(": ").contains(message), "{text}: {}", chain.join(": "));
        }
    }
}
