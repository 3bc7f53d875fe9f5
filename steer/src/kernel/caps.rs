//! Up-front checks for the kernel and privileges, so failures say what to do
//! instead of surfacing as a bare EPERM or EINVAL halfway through.

use caps::{CapSet, Capability};

use crate::error::{Context, Result, fail};

/// sk_lookup programs and bpf_sk_assign from them arrived in Linux 5.9.
pub const MIN_KERNEL: (u32, u32) = (5, 9);

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> Result<String> {
    Ok(nix::sys::utsname::uname()?.release().to_string_lossy().into_owned())
}

/// (major, minor) of a release string such as "6.1.0-18-amd64".
pub fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// The running kernel's (major, minor), or (0, 0) when unreadable.
pub fn kernel_version() -> (u32, u32) {
    kernel_release().ok().and_then(|r| parse_version(&r)).unwrap_or((0, 0))
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

fn has(cap: Capability) -> Result<bool> {
    caps::has_cap(None, CapSet::Effective, cap)
        .map_err(|e| crate::Error::Permission(format!("reading this process's capabilities: {e}")))
        .context("checking capabilities")
}

/// Loading, attaching and map updates need BPF rights and, for the netns
/// link, CAP_NET_ADMIN.
pub fn require_bpf() -> Result<()> {
    // CAP_BPF is 39: kernels before 5.8 and old libcap know only CAP_SYS_ADMIN.
    let bpf = has(Capability::CAP_BPF).unwrap_or(false) || has(Capability::CAP_SYS_ADMIN)?;
    if !bpf || !has(Capability::CAP_NET_ADMIN)? {
        fail!(Permission, "missing capabilities: CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN are needed; run as root");
    }
    Ok(())
}

/// Taking an fd out of another process needs ptrace rights over it.
pub fn require_fd_taking() -> Result<()> {
    require_bpf()?;
    if !has(Capability::CAP_SYS_PTRACE)? {
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
        assert_eq!(parse_version("garbage"), None);
    }
}
