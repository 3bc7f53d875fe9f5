//! Tracing steering decisions (`steerctl trace`): which decisions a tracer
//! selects, read from tcpdump-like words or flags, how it samples them, and
//! the kernel-side filter ([`TraceFilter`]) that selects them in the
//! program, so a busy host sends a tracer only what it asked for.

use std::{collections::BTreeSet, fmt};

use steer_common::{PrefixMatch, TRACE_FILTER_LABELS, TraceFilter, TraceOutcome};

use super::{label::label_key, net::Protocol, prefix::Prefix, text::bounded};
use crate::error::{Error, Result, fail};

/// The outcomes a tracer can select, by the names filters and output use;
/// `drop` is every outcome that drops the connection.
pub fn parse_outcomes(list: &str) -> Result<BTreeSet<TraceOutcome>> {
    let mut out = BTreeSet::new();
    for word in list.split(',') {
        match word {
            "drop" => {
                out.extend([TraceOutcome::Miss, TraceOutcome::Error, TraceOutcome::SeedMiss, TraceOutcome::SeedError])
            }
            _ => match TraceOutcome::ALL.into_iter().find(|o| o.name() == word) {
                Some(o) => {
                    out.insert(o);
                }
                None => fail!(
                    Invalid,
                    "unknown outcome {}: outcomes are {} and drop",
                    bounded(word),
                    TraceOutcome::ALL.map(TraceOutcome::name).join(", ")
                ),
            },
        }
    }
    Ok(out)
}

/// Whether an outcome drops the connection.
pub fn drops(outcome: TraceOutcome) -> bool {
    matches!(outcome, TraceOutcome::Miss | TraceOutcome::Error | TraceOutcome::SeedMiss | TraceOutcome::SeedError)
}

/// `--sample 1/N` (or `N`): one decision in N.
pub fn parse_sample(text: &str) -> Result<u32> {
    let n = text.strip_prefix("1/").unwrap_or(text);
    // Digits only: u32's parser takes a leading '+'.
    match n.parse::<u32>() {
        Ok(n) if n >= 1 && text.bytes().all(|b| b.is_ascii_digit() || b == b'/') => Ok(n),
        _ => fail!(Invalid, "--sample takes 1/N (one decision in N, N >= 1), not {}", bounded(text)),
    }
}

/// What a tracer selects. Each part left empty selects everything; a
/// decision is traced when every part selects it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub protocols: BTreeSet<Protocol>,
    pub outcomes: BTreeSet<TraceOutcome>,
    /// The matched binding's label is one of these (decisions without a
    /// binding have none, so naming a label leaves them out).
    pub labels: BTreeSet<String>,
    /// The connection's local (destination) address and port.
    pub local: Option<Prefix>,
    pub port: Option<u16>,
    /// The connection's remote (source) address.
    pub remote: Option<Prefix>,
}

fn once<T: PartialEq + fmt::Display>(slot: &mut Option<T>, value: T, what: &str) -> Result<()> {
    match slot {
        Some(old) if *old != value => fail!(Invalid, "the filter names two {what}s: {old} and {value}"),
        _ => *slot = Some(value),
    }
    Ok(())
}

impl Filter {
    pub fn add_protocols(&mut self, list: &str) -> Result<()> {
        for word in list.split(',') {
            self.protocols.insert(word.parse()?);
        }
        Ok(())
    }

    pub fn add_outcomes(&mut self, list: &str) -> Result<()> {
        self.outcomes.extend(parse_outcomes(list)?);
        Ok(())
    }

    pub fn add_labels(&mut self, list: &str) -> Result<()> {
        for name in list.split(',') {
            label_key(name)?;
            self.labels.insert(name.to_string());
        }
        if self.labels.len() > TRACE_FILTER_LABELS {
            fail!(Invalid, "a trace filter names at most {TRACE_FILTER_LABELS} labels, not {}", self.labels.len());
        }
        Ok(())
    }

    pub fn set_local(&mut self, prefix: &str) -> Result<()> {
        once(&mut self.local, prefix.parse()?, "local prefixe")
    }

    pub fn set_remote(&mut self, prefix: &str) -> Result<()> {
        once(&mut self.remote, prefix.parse()?, "remote prefixe")
    }

    pub fn set_port(&mut self, port: &str) -> Result<()> {
        let Ok(port) = port.parse::<u16>() else { fail!(Invalid, "{} is not a port", bounded(port)) };
        if port == 0 {
            fail!(Invalid, "port 0 is no connection's port: leave the port out to trace every port");
        }
        once(&mut self.port, port, "port")
    }

    /// Adds a tcpdump-like expression: `tcp`, `udp`, `port N`, `local
    /// PREFIX` (or `dst`), `remote PREFIX` (or `src`), `label NAME[,NAME]`,
    /// `outcome NAME[,NAME]`, optionally joined with `and`.
    pub fn add_words(&mut self, words: &[String]) -> Result<()> {
        let mut words = words.iter().map(String::as_str);
        while let Some(word) = words.next() {
            let mut value = |what: &str| {
                words.next().ok_or_else(|| Error::Invalid(format!("trace filter: `{word}` needs {what} after it")))
            };
            match word {
                "and" => {}
                "tcp" | "udp" => self.add_protocols(word)?,
                "port" => self.set_port(value("a port")?)?,
                "local" | "dst" => self.set_local(value("an address or prefix")?)?,
                "remote" | "src" => self.set_remote(value("an address or prefix")?)?,
                "label" => self.add_labels(value("a label")?)?,
                "outcome" => self.add_outcomes(value("an outcome")?)?,
                _ => fail!(
                    Invalid,
                    "trace filter: {} is not a filter word (tcp, udp, port N, local PREFIX, remote PREFIX, \
                     label NAME, outcome NAME; `and` between them)",
                    bounded(word)
                ),
            }
        }
        Ok(())
    }

    /// The kernel-side filter, with the labels' ids (in `labels`' order),
    /// sampling one in `sample`, for the tracer `pid`.
    pub fn kernel(&self, label_ids: &[u32], sample: u32, pid: u32) -> TraceFilter {
        let bits = |all: bool, bit: u8| if all { bit } else { 0 };
        let protocols = Protocol::ALL
            .iter()
            .map(|p| bits(self.protocols.is_empty() || self.protocols.contains(p), 1 << p.index()))
            .fold(0, |a, b| a | b);
        let outcomes = TraceOutcome::ALL
            .iter()
            .map(|o| bits(self.outcomes.is_empty() || self.outcomes.contains(o), o.bit()))
            .fold(0, |a, b| a | b);
        let prefix = |p: &Option<Prefix>| p.map(|p| PrefixMatch::new(p.mapped().0, p.mapped().1)).unwrap_or_default();
        let mut labels = [0; TRACE_FILTER_LABELS];
        for (slot, id) in labels.iter_mut().zip(label_ids) {
            *slot = *id;
        }
        TraceFilter {
            active: 1,
            protocols,
            outcomes,
            labels_len: label_ids.len().min(TRACE_FILTER_LABELS) as u8,
            sample,
            pid,
            local_port: self.port.unwrap_or(0),
            _pad: 0,
            labels,
            local: prefix(&self.local),
            remote: prefix(&self.remote),
        }
    }
}

impl fmt::Display for Filter {
    /// The filter as words `add_words` reads back; "every decision" when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self.protocols.iter().map(ToString::to_string).collect();
        if let Some(p) = &self.local {
            parts.push(format!("local {p}"));
        }
        if let Some(port) = self.port {
            parts.push(format!("port {port}"));
        }
        if let Some(p) = &self.remote {
            parts.push(format!("remote {p}"));
        }
        if !self.labels.is_empty() {
            parts.push(format!("label {}", self.labels.iter().cloned().collect::<Vec<_>>().join(",")));
        }
        if !self.outcomes.is_empty() {
            parts.push(format!("outcome {}", self.outcomes.iter().map(|o| o.name()).collect::<Vec<_>>().join(",")));
        }
        if parts.is_empty() { f.write_str("every decision") } else { f.write_str(&parts.join(" ")) }
    }
}

#[cfg(test)]
mod tests {
    use steer_common::lookup::Address;

    use super::*;

    fn words(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_string).collect()
    }

    fn parsed(text: &str) -> Result<Filter> {
        let mut f = Filter::default();
        f.add_words(&words(text))?;
        Ok(f)
    }

    #[test]
    fn words_read_like_tcpdump_and_print_back() {
        let f = parsed("tcp and port 443 and dst 192.0.2.0/24 src 10.0.0.0/8 label web,api outcome drop").unwrap();
        assert_eq!(f.protocols, [Protocol::Tcp].into());
        assert_eq!(f.port, Some(443));
        assert_eq!(f.local.unwrap().to_string(), "192.0.2.0/24");
        assert_eq!(f.remote.unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(f.labels.len(), 2);
        assert_eq!(f.outcomes.len(), 4);
        assert_eq!(parsed(&f.to_string()).unwrap(), f);
        assert_eq!(Filter::default().to_string(), "every decision");
    }

    #[test]
    fn bad_words_say_what_is_wrong() {
        let err = |text: &str| parsed(text).unwrap_err().to_string();
        assert!(err("port").contains("`port` needs a port"), "{}", err("port"));
        assert!(err("port http").contains("\"http\" is not a port"));
        assert!(err("port 0").contains("port 0"));
        assert!(err("sctp").contains("not a filter word"));
        assert!(err("outcome lost").contains("unknown outcome \"lost\""));
        assert!(err("local 10.0.0.0/33").contains("longer than 32 bits"));
        assert!(err("local 10.0.0.0/8 local 11.0.0.0/8").contains("two local prefixes"));
        assert!(err("label a,b,c,d,e").contains("at most 4 labels"));
        assert!(err("label we/b").contains("bad label"));
        assert!(parsed("local 10.0.0.0/8 dst 10.0.0.0/8").is_ok());
    }

    #[test]
    fn samples_are_one_in_n() {
        assert_eq!(parse_sample("1/100").unwrap(), 100);
        assert_eq!(parse_sample("7").unwrap(), 7);
        assert_eq!(parse_sample("1/1").unwrap(), 1);
        for bad in ["0", "1/0", "2/3", "-1", "1/x", ""] {
            assert!(parse_sample(bad).unwrap_err().to_string().contains("1/N"), "{bad}");
        }
    }

    #[test]
    fn the_kernel_filter_selects_what_the_words_say() {
        let f = parsed("udp local 10.1.0.0/16 label web outcome miss,normal").unwrap();
        let k = f.kernel(&[7], 10, 42);
        assert_eq!((k.active, k.protocols, k.labels_len, k.labels[0], k.sample, k.pid), (1, 2, 1, 7, 10, 42));
        assert_eq!(k.outcomes, TraceOutcome::Miss.bit() | TraceOutcome::Normal.bit());
        assert!(k.local.matches(Address::v4(0x0a01_0203)) && !k.local.matches(Address::v4(0x0a02_0203)));
        assert!(k.remote.matches(Address::v6(1, 2)));
        let all = Filter::default().kernel(&[], 0, 1);
        assert_eq!((all.protocols, all.outcomes, all.labels_len, all.local_port), (3, 0x7f, 0, 0));
    }
}
