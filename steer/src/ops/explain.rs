//! `steerctl explain`: what steer does with one connection, answered by the
//! real program. The pinned `steer_dispatch` runs once on a made-up
//! lookup (BPF_PROG_TEST_RUN) with the live maps; its verdict and the
//! socket it assigned are then described with what userspace knows: the
//! binding that matched (the program's own search over the published
//! generation), the label slot holding that socket, its owners and
//! reuseport group, and for a drop, which counter the run moved.
//!
//! A test run is a lookup like any other: it counts once in `metrics`
//! (a lookup, and a miss or error for a drop).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsFd,
};

use serde::Serialize;
use steer_common::kernel::{SK_DROP, SK_PASS};

use crate::{
    discovery::{
        Member,
        groups::{groups, groups_of},
        owners,
    },
    error::{Context, Result, fail},
    kernel::{
        bpffs,
        links::{self, SkLookupLink},
        netns, program, test_run,
    },
    model::{Binding, Family, Owner, Protocol, Target, follow::Follow},
    state::{DestStats, Dispatcher},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// The program assigned a socket.
    Assigned,
    /// The program dropped the connection (TCP: refused).
    Dropped,
    /// The program passed without a socket: the kernel's own lookup decides.
    NormalLookup,
}

#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    pub protocol: Protocol,
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub verdict: Verdict,
    /// The program's return value: 1 SK_PASS, 0 SK_DROP.
    pub retval: u32,
    /// The assigned socket's cookie.
    pub cookie: Option<u64>,
    /// The label whose binding matched.
    pub label: Option<String>,
    pub binding: Option<Binding>,
    /// The label slot ("ipv6 tcp") holding the assigned socket.
    pub slot: Option<String>,
    /// The assigned socket's local address.
    pub socket: Option<String>,
    pub owners: Vec<Owner>,
    /// The assigned socket's reuseport group (itself alone if none).
    pub group: Vec<Member>,
    pub no_reuseport: bool,
    /// The seed's port list answered.
    pub seed: bool,
    /// Registrations the kernel follows into the matched label's slot for
    /// this protocol and family: what will fill it when a server listens.
    pub followed: Vec<Follow>,
    /// Why, in a sentence.
    pub reason: String,
    /// For a normal lookup: the sockets the kernel's own lookup finds.
    pub normal_lookup: Vec<Member>,
    /// sk_lookup programs other than steer's linked to this namespace.
    pub other_sk_lookup: Vec<SkLookupLink>,
    pub warnings: Vec<String>,
}

/// The default client of a lookup to `local`: 127.0.0.1:40000 or [::1]:40000.
pub fn default_remote(local: &SocketAddr) -> SocketAddr {
    let ip = if local.is_ipv4() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { IpAddr::V6(Ipv6Addr::LOCALHOST) };
    SocketAddr::new(ip, 40000)
}

/// sk_lookup links of this namespace other than the one pinned at `own`.
pub fn other_links(own: &std::path::Path) -> Result<Vec<SkLookupLink>> {
    let own_id = program::link_info(own)?.map(|info| info.id);
    let all = links::sk_lookup_links(netns::current_inode()?)?;
    Ok(all.into_iter().filter(|l| Some(l.link_id) != own_id).collect())
}

/// What the other links mean, for a warning.
pub fn other_links_note(links: &[SkLookupLink]) -> String {
    let names: Vec<String> =
        links.iter().map(|l| format!("link {} (prog {} name {})", l.link_id, l.program_id, l.program_name)).collect();
    format!(
        "other sk_lookup programs are attached to this namespace: {}; the kernel runs them all, so their \
         redirects override steer's drops and their drops can hide steer's answers",
        names.join(", ")
    )
}

fn counters(stats: &[DestStats], label: &str, domain: Family, protocol: Protocol) -> Option<DestStats> {
    stats.iter().find(|s| s.label == label && s.domain == domain && s.protocol == protocol).cloned()
}

/// Runs the pinned program on a lookup of `protocol` from `remote` to
/// `local` and explains its answer.
pub fn explain(
    state: &Dispatcher,
    protocol: Protocol,
    local: SocketAddr,
    remote: Option<SocketAddr>,
) -> Result<Explanation> {
    // A v4-mapped destination arrives as IPv4.
    let local = SocketAddr::new(local.ip().to_canonical(), local.port());
    let mut remote = remote.unwrap_or_else(|| default_remote(&local));
    remote = SocketAddr::new(remote.ip().to_canonical(), remote.port());
    if remote.is_ipv4() != local.is_ipv4() {
        fail!(Invalid, "--from {remote} and {local} are of different families");
    }
    let layout = state.layout();
    bpffs::require_pin(&layout.program(), "steer program")?;
    let program = links::open_program(&layout.program())?;
    let mut warnings = Vec::new();
    if !layout.link().exists() {
        warnings.push("steer's program is not attached (`steerctl attach`): real connections do not run it".into());
    }
    let other_sk_lookup = match other_links(&layout.link()) {
        Ok(links) => links,
        Err(e @ crate::Error::Permission(_)) => {
            warnings.push(format!("{e}: other programs may change what happens here"));
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    if !other_sk_lookup.is_empty() {
        warnings.push(other_links_note(&other_sk_lookup));
    }
    let domain = if local.is_ipv4() { Family::Ipv4 } else { Family::Ipv6 };
    let resolved = state.resolve(protocol, local.ip(), local.port())?;
    let before = state.metrics()?;
    let (run, inferred) = match test_run::run(program.as_fd(), &test_run::lookup_ctx(protocol, local, remote), 1) {
        Ok(run) => (run, false),
        // The program assigned a SO_REUSEPORT socket without NO_REUSEPORT:
        // a test run cannot pick the group member, so the kernel refuses to
        // report one. The socket is the matched label's, from its slot.
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            let cookie = match &resolved {
                Some(r) => match state.slot_cookie(&r.label, domain, protocol)? {
                    Some(c) => Some(c),
                    None if domain == Family::Ipv4 => state.slot_cookie(&r.label, Family::Ipv6, protocol)?,
                    None => None,
                },
                None => state.seed_cookie()?,
            };
            let Some(cookie) = cookie else {
                return Err(e).context("running the program on the lookup (BPF_PROG_TEST_RUN)");
            };
            (test_run::TestRun { retval: SK_PASS, duration_ns: 0, cookie }, true)
        }
        Err(e) => return Err(e).context("running the program on the lookup (BPF_PROG_TEST_RUN)"),
    };
    let after = state.metrics()?;
    let mut out = Explanation {
        protocol,
        local,
        remote,
        verdict: Verdict::NormalLookup,
        retval: run.retval,
        cookie: (run.cookie != 0).then_some(run.cookie),
        label: resolved.as_ref().map(|r| r.label.clone()),
        binding: resolved.as_ref().map(|r| r.binding.clone()),
        slot: None,
        socket: None,
        owners: Vec::new(),
        group: Vec::new(),
        no_reuseport: false,
        seed: false,
        followed: Vec::new(),
        reason: String::new(),
        normal_lookup: Vec::new(),
        other_sk_lookup,
        warnings,
    };
    if inferred {
        out.warnings.push(
            "the program assigned a SO_REUSEPORT socket, which a test run does not report (the kernel picks a \
             group member per connection): the cookie shown is the one in the label's slot"
                .into(),
        );
    }
    let matched = match &resolved {
        Some(r) => format!("binding {} matched", r.binding),
        None => "no binding matched".to_string(),
    };
    match (run.retval, run.cookie) {
        (SK_PASS, 0) => {
            out.verdict = Verdict::NormalLookup;
            let target = Target { protocol, address: local.ip(), port: local.port() };
            out.normal_lookup = groups(&target, true, None)?.into_iter().flatten().collect();
            out.reason = match out.normal_lookup.first() {
                Some(m) => format!(
                    "{matched}: normal lookup; the kernel's own lookup finds {} {} ({})",
                    protocol,
                    m.local,
                    if out.normal_lookup.len() > 1 {
                        format!("a group of {}", out.normal_lookup.len())
                    } else {
                        owners_text(&m.owners)
                    }
                ),
                None => format!(
                    "{matched}: normal lookup; nothing listens on {local} ({})",
                    if protocol == Protocol::Tcp { "connection refused" } else { "port unreachable" }
                ),
            };
            if resolved.is_some() {
                out.warnings.push("a binding matched but the program passed without a socket".into());
            }
        }
        (SK_PASS, cookie) => {
            out.verdict = Verdict::Assigned;
            let registered = state.registered()?;
            if let Some(r) = registered.iter().find(|r| r.cookie == cookie) {
                let (info, holders) = owners::sockets_and_owners(&[cookie])?.remove(&cookie).unzip();
                out.slot = Some(format!("{} {}", r.family, r.protocol));
                out.socket = info.and_then(|i| i.local).map(|a| a.to_string());
                out.owners = holders.unwrap_or_default();
                out.no_reuseport = r.no_reuseport;
                out.group = groups_of(&[(protocol, cookie)])?.remove(&cookie).unwrap_or_default();
                match &resolved {
                    Some(res) if res.label != r.label => out.warnings.push(format!(
                        "MISMATCH: binding {} names label {} but the program assigned label {}'s socket",
                        res.binding, res.label, r.label
                    )),
                    None => out
                        .warnings
                        .push(format!("the program assigned label {}'s socket but no binding resolves here", r.label)),
                    _ => {}
                }
                let how = match (out.group.len(), out.no_reuseport) {
                    (0 | 1, _) => String::new(),
                    (n, false) => format!("; the kernel picks one of its reuseport group of {n} per connection"),
                    (n, true) => format!("; exactly this socket, not its reuseport group of {n} (no_reuseport)"),
                };
                out.reason = format!(
                    "{matched}: label {}'s {} socket {} (cookie {cookie}, {}){how}",
                    r.label,
                    out.slot.as_deref().unwrap_or("?"),
                    out.socket.as_deref().unwrap_or("?"),
                    owners_text(&out.owners)
                );
                out.label = Some(r.label.clone()).filter(|_| resolved.is_none()).or(out.label);
            } else {
                match state.seed_cookie()?.filter(|c| *c == cookie) {
                    Some(_) => {
                        out.seed = true;
                        out.owners =
                            owners::sockets_and_owners(&[cookie])?.remove(&cookie).map(|(_, o)| o).unwrap_or_default();
                        out.reason = format!(
                            "{matched}: port {} is in the seed port list: the seed socket (cookie {cookie}, {})",
                            local.port(),
                            owners_text(&out.owners)
                        );
                    }
                    None => {
                        out.reason = format!("{matched}: socket cookie {cookie}, which no label or seed slot holds")
                    }
                }
            }
        }
        (SK_DROP, _) => {
            out.verdict = Verdict::Dropped;
            let drop = if protocol == Protocol::Tcp { "dropped (TCP: refused)" } else { "dropped" };
            match &resolved {
                Some(r) => {
                    let zero = DestStats {
                        label: r.label.clone(),
                        domain,
                        protocol,
                        lookups: 0,
                        misses: 0,
                        errors: 0,
                        errors_by_reason: Default::default(),
                    };
                    let b = counters(&before, &r.label, domain, protocol).unwrap_or_else(|| zero.clone());
                    let a = counters(&after, &r.label, domain, protocol).unwrap_or(zero);
                    let own = state.slot_cookie(&r.label, domain, protocol)?;
                    let v6 = state.slot_cookie(&r.label, Family::Ipv6, protocol)?;
                    out.reason = if a.misses > b.misses {
                        let why = match (domain, own, v6) {
                            (Family::Ipv4, None, Some(_)) => "its only socket for it is IPv6-only".to_string(),
                            _ => format!("none is registered for {domain} {protocol}"),
                        };
                        format!("{matched}: {drop}, a miss: label {} has no socket for this traffic ({why})", r.label)
                    } else if a.errors > b.errors {
                        let reasons: Vec<String> = a
                            .errors_by_reason
                            .iter()
                            .filter(|(k, n)| **n > b.errors_by_reason.get(*k).copied().unwrap_or(0))
                            .map(|(k, _)| (*k).to_string())
                            .collect();
                        format!(
                            "{matched}: {drop}: the kernel refused label {}'s socket ({})",
                            r.label,
                            reasons.join(", ")
                        )
                    } else {
                        format!("{matched}: {drop} by label {} for a reason the counters do not show", r.label)
                    };
                }
                None => {
                    let listed = state.ports()?.contains(&local.port());
                    out.seed = listed;
                    out.reason = if listed {
                        format!(
                            "{matched}: port {} is in the seed port list but the seed socket is missing or refused: {drop}",
                            local.port()
                        )
                    } else {
                        format!("{matched}: {drop}")
                    };
                }
            }
        }
        (other, _) => {
            out.verdict = Verdict::Dropped;
            out.reason = format!("the program returned {other}, which the kernel treats as a drop");
        }
    }
    if let Some(label) = &out.label {
        out.followed = super::follow::list(state)?
            .into_iter()
            .filter(|f| &f.label == label && f.target.protocol == protocol && f.target.family() == domain)
            .collect();
        if out.verdict == Verdict::Dropped && !out.followed.is_empty() {
            let at: Vec<String> = out.followed.iter().map(|f| f.target.to_string()).collect();
            out.reason.push_str(&format!(
                "; the kernel follows it: the next socket to listen on {} takes the slot",
                at.join(" or ")
            ));
        }
    }
    Ok(out)
}

fn owners_text(owners: &[Owner]) -> String {
    match owners {
        [] => "held by no process".into(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} and {} more", rest.len()),
    }
}
