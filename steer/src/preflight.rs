//! Up-front checks for the kernel and privileges, so failures say what to do
//! instead of surfacing as a bare EPERM or EINVAL halfway through.

use crate::error::{Context, Result, fail};

/// sk_lookup programs and bpf_sk_assign from them arrived in Linux 5.9.
pub const MIN_KERNEL: (u32, u32) = (5, 9);

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_BPF: u32 = 39;

fn kernel_release() -> Result<String> {
    Ok(nix::sys::utsname::uname()?.release().to_string_lossy().into_owned())
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

pub fn require_kernel() -> Result<()> {
    let release = kernel_release()?;
    match parse_version(&release) {
        Some(v) if v < MIN_KERNEL => {
            fail!(Kernel, "this kernel is {release}; sk_lookup needs Linux {}.{} or later", MIN_KERNEL.0, MIN_KERNEL.1)
        }
        _ => Ok(()),
    }
}

fn effective_caps() -> Result<u64> {
    let status = procfs::process::Process::myself().and_then(|p| p.status()).context("reading /proc/self/status")?;
    Ok(status.capeff)
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1 << cap) != 0
}

/// Loading, attaching and map updates need BPF rights and, for the netns
/// link, CAP_NET_ADMIN.
pub fn require_bpf_caps() -> Result<()> {
    let caps = effective_caps()?;
    if !(has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN)) || !has(caps, CAP_NET_ADMIN) {
        fail!(Permission, "missing capabilities: CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN are needed; run as root");
    }
    Ok(())
}

/// Taking an fd out of another process needs ptrace rights over it.
pub fn require_fd_taking_caps() -> Result<()> {
    require_bpf_caps()?;
    if !has(effective_caps()?, CAP_SYS_PTRACE) {
        fail!(
            Permission,
            "missing capability CAP_SYS_PTRACE, needed to take a socket from another process; run as root"
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
    }
}
