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
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::text::clip;
use super::{
    binding::{self, Binding},
    label::label_key,
    net::{Family, Protocol, Target},
};
use crate::error::{Context, Error, Result, fail};

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
    /// Follow the server in the kernel (Linux 5.15): its sockets go in at
    /// listen(). Unset: followed where the kernel can, unless `pid_file`
    /// or `process` ask for sockets taken from processes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow: Option<bool>,
    /// Only sockets made in this cgroup v2 (or below it) may take the
    /// label: its path under the cgroup2 mount, such as
    /// `system.slice/nginx.service`. Followed registrations only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

impl Wanted {
    pub fn target(&self) -> Target {
        Target { protocol: self.protocol, address: self.address, port: self.port }
    }

    /// The registration options it asks for.
    pub fn options(&self) -> RegisterOptions {
        RegisterOptions { no_reuseport: self.no_reuseport }
    }

    /// Whether the kernel follows it, given why the kernel cannot (if it
    /// cannot). Fails when it asks to be followed where that is impossible.
    pub fn followed(&self, unsupported: Option<&str>) -> Result<bool> {
        let filtered = self.pid_file.is_some() || self.process.is_some();
        match (self.follow, unsupported) {
            (Some(false), _) => Ok(false),
            (Some(true), Some(why)) => {
                fail!(Kernel, "registration {} {} asks to be followed, but {why}", self.label, self.target())
            }
            (None, Some(why)) if self.cgroup.is_some() => fail!(
                Kernel,
                "registration {} {} names a cgroup, which only followed registrations take, but {why}",
                self.label,
                self.target()
            ),
            (None, Some(_)) => Ok(false),
            (_, None) => Ok(self.follow == Some(true) || !filtered),
        }
    }

    /// It, as the kernel follows it.
    pub fn as_follow(&self) -> super::follow::Follow {
        super::follow::Follow {
            label: self.label.clone(),
            target: self.target(),
            cgroup: self.cgroup.clone().unwrap_or_default(),
            no_reuseport: self.no_reuseport,
        }
    }
}

/// What every registration path honours, however the socket is named.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegisterOptions {
    /// Steer to exactly the registered socket, not its SO_REUSEPORT group.
    pub no_reuseport: bool,
}

impl RegisterOptions {
    /// The `socket_flag` bits the slot gets.
    pub fn flags(&self) -> u32 {
        if self.no_reuseport { steer_common::socket_flag::NO_REUSEPORT } else { 0 }
    }
}

impl Config {
    /// Parses and checks a config; `name` is for messages.
    pub fn parse(text: &str, name: &str) -> Result<Self> {
        // serde's messages quote the input: clipped, so a huge one cannot flood the terminal.
        let config: Config = serde_json::from_str(text)
            .map_err(|e| Error::Invalid(clip(&e.to_string())))
            .with_context(|| format!("{name} is not a valid steer config"))?;
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
            binding::KeyedBindings::from_bindings(list)?;
        }
        let mut slots = BTreeSet::new();
        for w in &self.registrations {
            label_key(&w.label)?;
            if w.port == 0 {
                fail!(Invalid, "registration {} {}: port 0 is no listening port", w.label, w.target());
            }
            if w.process.as_deref().is_some_and(str::is_empty) {
                fail!(Invalid, "registration {} {}: process is empty", w.label, w.target());
            }
            if w.follow == Some(true) && (w.pid_file.is_some() || w.process.is_some()) {
                fail!(
                    Invalid,
                    "registration {} {}: pid_file and process pick the process a socket is taken from; a followed \
                     registration takes sockets in the kernel, scoped by cgroup instead",
                    w.label,
                    w.target()
                );
            }
            if w.cgroup.is_some() && w.follow == Some(false) {
                fail!(
                    Invalid,
                    "registration {} {}: cgroup scopes followed registrations, and this one has follow: false",
                    w.label,
                    w.target()
                );
            }
            if w.cgroup.as_deref().is_some_and(|c| c.contains("..")) {
                fail!(Invalid, "registration {} {}: cgroup must not contain `..`", w.label, w.target());
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::strategies;

    fn wanted() -> impl Strategy<Value = Wanted> {
        (
            strategies::label(),
            strategies::protocol(),
            prop_oneof![strategies::clustered_addr(), any::<IpAddr>()],
            1..=u16::MAX,
            any::<bool>(),
            proptest::option::of(any::<String>().prop_map(PathBuf::from)),
            proptest::option::of(".+"),
            proptest::option::of(any::<bool>()),
            proptest::option::of("[a-z0-9_./@-]{1,40}".prop_filter("no ..", |c: &String| !c.contains(".."))),
        )
            .prop_map(|(label, protocol, address, port, no_reuseport, pid_file, process, follow, cgroup)| {
                // What validate() accepts: a followed registration names no
                // process, and only a followed one names a cgroup.
                let followed = follow == Some(true);
                Wanted {
                    label,
                    protocol,
                    address,
                    port,
                    no_reuseport,
                    pid_file: pid_file.filter(|_| !followed),
                    process: process.filter(|_| !followed),
                    follow,
                    cgroup: cgroup.filter(|_| follow != Some(false)),
                }
            })
    }

    /// A valid config: bindings one per key, registrations one per slot.
    fn valid_config() -> impl Strategy<Value = Config> {
        (
            proptest::option::of(proptest::collection::vec(
                prop_oneof![strategies::clustered_binding(), strategies::any_binding()],
                0..16,
            )),
            proptest::collection::vec(wanted(), 0..8),
        )
            .prop_map(|(mut bindings, mut registrations)| {
                if let Some(list) = &mut bindings {
                    let mut keys = BTreeSet::new();
                    list.retain(|b| keys.insert(b.key()));
                }
                let mut slots = BTreeSet::new();
                registrations.retain(|w| slots.insert((w.label.clone(), w.protocol, w.target().family())));
                Config { bindings, registrations }
            })
    }

    #[test]
    fn huge_input_is_quoted_short() {
        let huge = "x".repeat(1 << 20);
        for text in [
            format!("{huge:?}"),
            format!(r#"{{"registrations": [{{"label": "x", "protocol": "{huge}", "address": "::1", "port": 1}}]}}"#),
            format!(r#"{{"{huge}": 1}}"#),
        ] {
            let err = Config::parse(&text, "c.json").unwrap_err();
            assert!(matches!(err.root(), Error::Invalid(_)), "{err:?}");
            let msg = err.chain();
            assert!(msg.len() < 400 && msg.starts_with("c.json is not a valid steer config: "), "{}", &msg[..100]);
        }
    }

    proptest! {
        #![proptest_config(strategies::config(256))]

        /// A valid config prints as JSON (compact or pretty) that parses,
        /// and passes the checks, back to the same config.
        #[test]
        fn valid_configs_round_trip_as_json(config in valid_config()) {
            config.validate().unwrap();
            let text = serde_json::to_string(&config).unwrap();
            prop_assert_eq!(&Config::parse(&text, "c").unwrap(), &config);
            let pretty = serde_json::to_string_pretty(&config).unwrap();
            prop_assert_eq!(Config::parse(&pretty, "c").unwrap(), config);
        }
    }

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
