//! Which processes hold a socket, found through /proc (the procfs crate)
//! as `ss -p` does: `/proc/PID/fd/N` links to `socket:[INODE]`. No fd is
//! taken here.

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    path::Path,
};

use procfs::process::{FDTarget, Process};

use crate::{
    error::{Context, Result, fail},
    kernel::netns,
    model::{Owner, SocketInfo},
};

/// Which processes' sockets may be taken: all, one pid, or processes of
/// one name (`/proc/PID/comm`, at most 15 bytes: longer names are cut).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnerFilter {
    pub pid: Option<i32>,
    pub process: Option<String>,
}

impl OwnerFilter {
    pub fn pid(pid: i32) -> Self {
        Self { pid: Some(pid), process: None }
    }

    pub fn accepts(&self, owner: &Owner) -> bool {
        self.pid.is_none_or(|p| p == owner.pid)
            && self.process.as_deref().is_none_or(|name| {
                let cut = &name.as_bytes()[..name.len().min(15)];
                owner.command.as_bytes() == cut
            })
    }

    pub fn is_empty(&self) -> bool {
        self.pid.is_none() && self.process.is_none()
    }
}

impl fmt::Display for OwnerFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.pid, &self.process) {
            (Some(pid), Some(name)) => write!(f, "process {pid} ({name})"),
            (Some(pid), None) => write!(f, "process {pid}"),
            (None, Some(name)) => write!(f, "processes named {name}"),
            (None, None) => f.write_str("any process"),
        }
    }
}

/// The pid in a pid file (its first word).
pub fn read_pid_file(path: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading pid file {}", path.display()))?;
    match text.split_whitespace().next().and_then(|w| w.parse::<i32>().ok()) {
        Some(pid) if pid > 0 => Ok(pid),
        _ => fail!(Invalid, "pid file {} does not hold a process id", path.display()),
    }
}

/// A process's name as the kernel keeps it (`comm`, at most 15 bytes).
fn command(process: &Process) -> String {
    process.stat().map(|s| s.comm).unwrap_or_default()
}

/// The socket inodes `process` holds, by fd; None when its fds cannot be
/// read (permissions, or it exited).
fn socket_fds(process: &Process) -> Option<Vec<(i32, u64)>> {
    let fds = process.fd().ok()?;
    // Bounded by the process's open files.
    Some(
        fds.flatten()
            .filter_map(|fd| match fd.target {
                FDTarget::Socket(inode) => Some((fd.fd, inode)),
                _ => None,
            })
            .collect(),
    )
}

/// The processes holding each of `inodes` (sockets' inodes): every
/// (pid, fd, command) with that socket open, sorted by pid and fd. Inodes
/// nobody holds are absent.
///
/// Processes of the calling thread's network namespace are read first; the
/// others only when some inode is still ownerless after that, since a
/// socket's namespace is fixed when it is made and its holder may since
/// live elsewhere (a thread that entered the namespace to make it, or an fd
/// passed over a unix socket). An owner outside the namespace is thus not
/// reported for an inode that also has one inside it. Processes that cannot
/// be read (permissions, exited) are skipped.
pub fn owners(inodes: &[u64]) -> Result<BTreeMap<u64, Vec<Owner>>> {
    let wanted: HashSet<u64> = inodes.iter().copied().filter(|&i| i != 0).collect();
    let mut found: BTreeMap<u64, Vec<Owner>> = BTreeMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let netns = netns::current_inode()?;
    let mut elsewhere = Vec::new();
    let scan = |process: &Process, found: &mut BTreeMap<u64, Vec<Owner>>| {
        let Some(fds) = socket_fds(process) else { return };
        let mut name = None;
        for (fd, inode) in fds.into_iter().filter(|(_, inode)| wanted.contains(inode)) {
            let command = name.get_or_insert_with(|| command(process)).clone();
            found.entry(inode).or_default().push(Owner { pid: process.pid, fd, command });
        }
    };
    // Bounded by the number of processes (pid_max).
    for process in procfs::process::all_processes().context("listing /proc")?.flatten() {
        match process.namespaces().ok().and_then(|ns| ns.0.get(std::ffi::OsStr::new("net")).map(|n| n.identifier)) {
            Some(ns) if ns == netns => scan(&process, &mut found),
            Some(_) => elsewhere.push(process),
            None => {}
        }
    }
    if found.len() < wanted.len() {
        for process in &elsewhere {
            scan(process, &mut found);
        }
    }
    for owners in found.values_mut() {
        owners.sort_by_key(|o| (o.pid, o.fd));
    }
    Ok(found)
}

/// `pid`'s own fds holding any of `inodes`: a process named on purpose,
/// which [`owners`] may skip when a process inside the namespace also
/// holds the socket (an inherited fd).
pub fn owners_in(pid: i32, inodes: &[u64]) -> BTreeMap<u64, Vec<Owner>> {
    let mut found: BTreeMap<u64, Vec<Owner>> = BTreeMap::new();
    let Ok(process) = Process::new(pid) else { return found };
    let Some(fds) = socket_fds(&process) else { return found };
    let name = command(&process);
    for (fd, inode) in fds.into_iter().filter(|(_, inode)| inodes.contains(inode)) {
        found.entry(inode).or_default().push(Owner { pid, fd, command: name.clone() });
    }
    found
}

/// The sockets of this namespace with any of `cookies` (one sock_diag dump
/// per protocol and family) and their holders (one /proc scan). A cookie
/// no socket has any more is absent.
pub fn sockets_and_owners(cookies: &[u64]) -> Result<BTreeMap<u64, (SocketInfo, Vec<Owner>)>> {
    let sockets = super::diag::by_cookies(cookies).context("looking for the sockets with sock_diag")?;
    let inodes: Vec<u64> = sockets.values().map(|s| s.inode).collect();
    let mut holders = owners(&inodes).context("looking for the sockets' holders in /proc")?;
    let netns = netns::current_inode()?;
    Ok(sockets
        .into_iter()
        .map(|(cookie, s)| (cookie, (s.info(netns), holders.remove(&s.inode).unwrap_or_default())))
        .collect())
}

/// A socket of a process that sk_lookup could steer to, as sock_diag
/// describes it: no fd taken yet.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub fd: i32,
    pub info: SocketInfo,
}

/// Every socket of `pid` that sk_lookup could steer to in this network
/// namespace: its socket fds matched with a sock_diag dump by inode.
pub fn candidates(pid: i32) -> Result<Vec<Candidate>> {
    let process = Process::new(pid).map_err(|_| crate::Error::Invalid(format!("no process with PID {pid}")))?;
    let fds = socket_fds(&process)
        .ok_or_else(|| crate::Error::Permission(format!("cannot read the fds of process {pid} (/proc/{pid}/fd)")))?;
    let mut by_inode = BTreeMap::new();
    for (fd, inode) in fds {
        by_inode.entry(inode).or_insert(fd);
    }
    let netns = netns::current_inode()?;
    let mut found = Vec::new();
    for protocol in crate::model::Protocol::ALL {
        for socket in super::diag::unconnected(protocol)?.into_iter().filter(super::diag::DiagSocket::steerable) {
            if let Some(&fd) = by_inode.get(&socket.inode) {
                found.push(Candidate { fd, info: socket.info(netns) });
            }
        }
    }
    found.sort_by_key(|c| c.fd);
    Ok(found)
}

/// "fd 3 (tcp 127.0.0.1:80), ..." for error messages.
pub fn describe(sockets: &[Candidate]) -> String {
    sockets.iter().map(|c| format!("fd {} ({})", c.fd, c.info)).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_names_compare_as_the_kernel_cuts_them() {
        let owner = Owner { pid: 1, fd: 3, command: "a-very-long-ser".into() };
        assert!(OwnerFilter { pid: None, process: Some("a-very-long-server-name".into()) }.accepts(&owner));
        assert!(!OwnerFilter { pid: None, process: Some("a-very".into()) }.accepts(&owner));
        assert!(OwnerFilter { pid: Some(1), process: None }.accepts(&owner));
        assert!(!OwnerFilter { pid: Some(2), process: None }.accepts(&owner));
    }

    #[test]
    fn this_process_holds_its_own_socket() {
        use std::os::unix::fs::MetadataExt;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = {
            use std::os::fd::AsRawFd;
            std::fs::metadata(format!("/proc/self/fd/{}", listener.as_raw_fd())).unwrap().ino()
        };
        let me = std::process::id() as i32;
        let found = owners_in(me, &[inode]);
        assert_eq!(found[&inode][0].pid, me);
        assert_eq!(owners(&[inode]).unwrap()[&inode][0].pid, me);
        assert!(owners(&[]).unwrap().is_empty());
    }
}
