//! Up-front checks for the kernel and privileges, so failures say what to do
//! instead of surfacing as a bare EPERM or EINVAL halfway through. Each
//! message also says what a container lacks (the podman/docker flag and the
//! Kubernetes field), since that is where these checks fail most often.

use crate::error::{Context, Result, fail};

/// sk_lookup programs and bpf_sk_assign from them arrived in Linux 5.9.
pub const MIN_KERNEL: (u32, u32) = (5, 9);
/// Before 5.11 the kernel charges BPF maps to RLIMIT_MEMLOCK, not to the
/// memory cgroup.
const MEMLOCK_CHARGED_BEFORE: (u32, u32) = (5, 11);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

fn kernel_release() -> Result<String> {
    Ok(nix::sys::utsname::uname()?.release().to_string_lossy().into_owned())
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The kernel can run steer's program; on kernels that charge maps to
/// RLIMIT_MEMLOCK, the limit is raised (or the message says how).
pub fn require_kernel() -> Result<()> {
    let release = kernel_release()?;
    let version = parse_version(&release);
    if version.is_some_and(|v| v < MIN_KERNEL) {
        fail!(Kernel, "this kernel is {release}; sk_lookup needs Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)
    }
    if version.is_some_and(|v| v < MEMLOCK_CHARGED_BEFORE) {
        if let Some(limit) = raise_memlock() {
            fail!(Permission, "{}", memlock_message(&release, limit));
        }
    }
    Ok(())
}

/// Raises RLIMIT_MEMLOCK to infinity (CAP_SYS_RESOURCE), else the soft
/// limit to the hard one. The soft limit left when it is still finite.
fn raise_memlock() -> Option<u64> {
    use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_MEMLOCK).ok()?;
    if soft == RLIM_INFINITY || setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY).is_ok() {
        return None;
    }
    let _ = setrlimit(Resource::RLIMIT_MEMLOCK, hard, hard);
    (hard != RLIM_INFINITY).then_some(hard)
}

fn memlock_message(release: &str, limit: u64) -> String {
    format!(
        "this kernel ({release}) charges BPF maps to RLIMIT_MEMLOCK, which is {} KiB here and cannot be raised \
         without CAP_SYS_RESOURCE: run as root, or raise the limit (`ulimit -l unlimited`, systemd \
         `LimitMEMLOCK=infinity`); in a container, `--ulimit memlock=-1:-1` (podman, docker) or add CAP_SYS_RESOURCE \
         (`--cap-add SYS_RESOURCE`; Kubernetes: `securityContext.capabilities.add: [SYS_RESOURCE]`) so steerctl raises it",
        limit / 1024
    )
}

fn effective_caps() -> Result<u64> {
    let status = procfs::process::Process::myself().and_then(|p| p.status()).context("reading /proc/self/status")?;
    Ok(status.capeff)
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// The capabilities `missing` (CAP_ names) as a container gets them: the
/// podman/docker flags and the Kubernetes field spell them without `CAP_`.
fn container_caps_hint(missing: &[&str]) -> String {
    let short: Vec<&str> = missing.iter().map(|c| c.trim_start_matches("CAP_")).collect();
    let flags: Vec<String> = short.iter().map(|c| format!("--cap-add {c}")).collect();
    format!(
        "in a container, add {}: `{}` (podman, docker) or `securityContext.capabilities.add: [{}]` (Kubernetes), or run it privileged",
        if short.len() == 1 { "it" } else { "them" },
        flags.join(" "),
        short.join(", ")
    )
}

/// What `caps` lacks for steer's BPF work, and how to get it; None when nothing.
fn bpf_caps_message(caps: u64) -> Option<String> {
    let mut missing = Vec::new();
    if !(has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN)) {
        missing.push("CAP_BPF");
    }
    if !has(caps, CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        return None;
    }
    let mut message = format!(
        "missing capabilities: CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN are needed; run as root. This process lacks {}; {}",
        missing.join(" and "),
        container_caps_hint(&missing)
    );
    if !perfmon_capable_in(caps) {
        message.push_str(
            ". Loading or upgrading the program also needs CAP_PERFMON (`--cap-add PERFMON`), unless CAP_SYS_ADMIN is there",
        );
    }
    Some(message)
}

fn perfmon_capable_in(caps: u64) -> bool {
    has(caps, CAP_PERFMON) || has(caps, CAP_SYS_ADMIN)
}

/// What the verifier requires of whoever loads steer's program besides
/// CAP_BPF: it does pointer arithmetic on map values, which the kernel
/// allows only to a process with CAP_PERFMON (or CAP_SYS_ADMIN). Some
/// message when the caller lacks it.
pub(crate) fn verifier_refusal_hint() -> Option<String> {
    let caps = effective_caps().ok()?;
    (!perfmon_capable_in(caps)).then(|| {
        format!(
            "the kernel's verifier refused steer's program because this process lacks CAP_PERFMON: with CAP_BPF, loading \
             it also needs CAP_PERFMON (or CAP_SYS_ADMIN); run as root; {}",
            container_caps_hint(&["CAP_PERFMON"])
        )
    })
}

/// The uid map of a process in a user namespace other than the host's
/// initial one (a rootless container, `podman --userns`/`--uidmap`).
fn user_namespace_map(uid_map: &str) -> Option<String> {
    let fields: Vec<&str> = uid_map.split_whitespace().collect();
    (fields != ["0", "0", "4294967295"]).then(|| fields.join(" "))
}

fn user_namespace_message(map: &str) -> String {
    format!(
        "this process runs in a user namespace (uid map `{map}`): capabilities there do not reach bpf(), which needs them \
         in the host's initial user namespace; run steerctl as the host's root: in a container, a rootful one without a \
         user namespace (not rootless podman or docker, no `--userns`/`--uidmap`; Kubernetes: `hostUsers: true`, the default)"
    )
}

/// bpf() with a command no kernel has: the kernel answers EINVAL. A seccomp
/// filter or a security module that forbids bpf() answers first (EPERM, or
/// ENOSYS). The errno when refused.
fn bpf_refused() -> Option<i32> {
    // Safety: bpf(2) with a NULL attribute of size 0 reads and writes no memory.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, i32::MAX, std::ptr::null::<u8>(), 0u32) };
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    (ret < 0 && matches!(errno, libc::EPERM | libc::EACCES | libc::ENOSYS)).then_some(errno)
}

fn bpf_refused_message(errno: i32, seccomp_mode: Option<&str>) -> String {
    let error = match errno {
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENOSYS => "ENOSYS",
        _ => "an error",
    };
    if seccomp_mode == Some("2") {
        format!(
            "bpf() is refused with {error} although this process has CAP_BPF or CAP_SYS_ADMIN: a seccomp filter blocks \
             it (Seccomp: 2 in /proc/self/status; a container runtime's default profile may allow bpf() only with \
             CAP_SYS_ADMIN, as podman's does); run the container with `--security-opt seccomp=unconfined` (podman, \
             docker) or `securityContext.seccompProfile.type: Unconfined` (Kubernetes), or a profile that allows bpf"
        )
    } else {
        format!(
            "bpf() is refused with {error} although this process has CAP_BPF or CAP_SYS_ADMIN and no seccomp filter: \
             a security module (SELinux, a BPF LSM) forbids it here; allow bpf for steerctl in its policy"
        )
    }
}

fn seccomp_mode() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("Seccomp:")).map(|v| v.trim().to_string())
}

/// Loading, attaching and map updates need BPF rights and, for the netns
/// link, CAP_NET_ADMIN, held in the initial user namespace and not taken
/// away by a seccomp filter.
pub fn require_bpf_caps() -> Result<()> {
    if let Some(map) = std::fs::read_to_string("/proc/self/uid_map").ok().as_deref().and_then(user_namespace_map) {
        fail!(Permission, "{}", user_namespace_message(&map));
    }
    if let Some(message) = bpf_caps_message(effective_caps()?) {
        fail!(Permission, "{message}");
    }
    if let Some(errno) = bpf_refused() {
        fail!(Permission, "{}", bpf_refused_message(errno, seccomp_mode().as_deref()));
    }
    // Writes make maps too (a growing binding set): raise the limit where
    // maps count against it; only load insists (require_kernel).
    if kernel_release().ok().and_then(|r| parse_version(&r)).is_some_and(|v| v < MEMLOCK_CHARGED_BEFORE) {
        let _ = raise_memlock();
    }
    Ok(())
}

/// Taking an fd out of another process needs ptrace rights over it.
pub fn require_fd_taking_caps() -> Result<()> {
    require_bpf_caps()?;
    if !has(effective_caps()?, CAP_SYS_PTRACE) {
        fail!(
            Permission,
            "missing capability CAP_SYS_PTRACE, needed to take a socket from another process; run as root; {}, and share \
             the PID namespace of the servers' processes (`--pid host`; Kubernetes: `hostPID: true`)",
            container_caps_hint(&["CAP_SYS_PTRACE"])
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_releases() {
        assert_eq!(parse_version("6.18.44-fc-v782"), Some((6, 18)));
        assert_eq!(parse_version("5.4.0-150-generic"), Some((5, 4)));
        assert!(parse_version("5.4.0").unwrap() < MIN_KERNEL);
        assert!(parse_version("5.10.1").unwrap() > MIN_KERNEL);
        assert!(parse_version("5.10.1").unwrap() < MEMLOCK_CHARGED_BEFORE);
        assert!(parse_version("5.11.0").unwrap() >= MEMLOCK_CHARGED_BEFORE);
    }

    fn caps(list: &[u32]) -> u64 {
        list.iter().fold(0, |all, cap| all | 1 << cap)
    }

    #[test]
    fn capability_messages_name_what_is_missing_and_the_container_flags() {
        let none = bpf_caps_message(0).unwrap();
        // The first sentence is the one the tests and users already know.
        assert!(
            none.starts_with(
                "missing capabilities: CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN are needed; run as root"
            )
        );
        assert!(none.contains("lacks CAP_BPF and CAP_NET_ADMIN"), "{none}");
        assert!(none.contains("`--cap-add BPF --cap-add NET_ADMIN` (podman, docker)"), "{none}");
        assert!(none.contains("`securityContext.capabilities.add: [BPF, NET_ADMIN]` (Kubernetes)"), "{none}");
        assert!(none.contains("`--cap-add PERFMON`"), "{none}");

        let no_net_admin = bpf_caps_message(caps(&[CAP_BPF, CAP_PERFMON])).unwrap();
        assert!(
            no_net_admin.contains("lacks CAP_NET_ADMIN; in a container, add it: `--cap-add NET_ADMIN`"),
            "{no_net_admin}"
        );
        assert!(!no_net_admin.contains("--cap-add BPF") && !no_net_admin.contains("PERFMON`"), "{no_net_admin}");

        let no_bpf = bpf_caps_message(caps(&[CAP_NET_ADMIN])).unwrap();
        assert!(no_bpf.contains("lacks CAP_BPF; in a container, add it: `--cap-add BPF`"), "{no_bpf}");

        assert_eq!(bpf_caps_message(caps(&[CAP_BPF, CAP_NET_ADMIN])), None);
        assert_eq!(bpf_caps_message(caps(&[CAP_SYS_ADMIN, CAP_NET_ADMIN])), None);
        assert!(perfmon_capable_in(caps(&[CAP_SYS_ADMIN])) && perfmon_capable_in(caps(&[CAP_PERFMON])));
        assert!(!perfmon_capable_in(caps(&[CAP_BPF, CAP_NET_ADMIN])));
    }

    #[test]
    fn user_namespaces_are_told_apart_from_the_initial_one() {
        assert_eq!(user_namespace_map("         0          0 4294967295\n"), None);
        let map = user_namespace_map("         0     200000      65536\n").unwrap();
        assert_eq!(map, "0 200000 65536");
        let message = user_namespace_message(&map);
        assert!(message.contains("uid map `0 200000 65536`") && message.contains("--uidmap"), "{message}");
        assert!(user_namespace_map("0 1000 1\n").is_some());
    }

    #[test]
    fn a_refused_bpf_names_seccomp_when_a_filter_is_on() {
        let seccomp = bpf_refused_message(libc::EPERM, Some("2"));
        assert!(seccomp.contains("refused with EPERM") && seccomp.contains("seccomp=unconfined"), "{seccomp}");
        assert!(seccomp.contains("seccompProfile.type: Unconfined"), "{seccomp}");
        let lsm = bpf_refused_message(libc::EPERM, Some("0"));
        assert!(lsm.contains("security module") && !lsm.contains("seccomp=unconfined"), "{lsm}");
    }

    #[test]
    fn memlock_message_says_how_much_and_how_to_raise_it() {
        let message = memlock_message("5.10.0-30-amd64", 64 * 1024);
        assert!(message.contains("5.10.0-30-amd64") && message.contains("64 KiB"), "{message}");
        assert!(message.contains("--ulimit memlock=-1:-1") && message.contains("--cap-add SYS_RESOURCE"), "{message}");
    }

    #[test]
    fn this_process_may_call_bpf() {
        // The tests run as root on a host (or as a user without a filter):
        // the probe must not report a refusal where there is none.
        if effective_caps().is_ok_and(|c| has(c, CAP_BPF) || has(c, CAP_SYS_ADMIN))
            && seccomp_mode().as_deref() == Some("0")
        {
            assert_eq!(bpf_refused(), None);
        }
    }
}
