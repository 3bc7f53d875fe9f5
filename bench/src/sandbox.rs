//! The benchmark's own network and mount namespaces. Nothing is named or
//! bind-mounted on the host, so both vanish with the process, however it ends.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use nix::{
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, unshare},
};

pub struct Sandbox {
    /// Scratch space on a private tmpfs: build outputs and the bpffs mount point.
    pub dir: PathBuf,
    pub bpffs: PathBuf,
}

impl Sandbox {
    /// Moves the whole process into fresh namespaces. Must run before any
    /// thread is spawned: unshare(CLONE_NEWNS) fails in a threaded process.
    pub fn enter() -> Result<Self> {
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
            .context("unshare(CLONE_NEWNET | CLONE_NEWNS): steer-bench must run as root")?;
        // Our mounts must not propagate back to the host's namespace.
        mount(None::<&str>, "/", None::<&str>, MsFlags::MS_REC | MsFlags::MS_PRIVATE, None::<&str>)
            .context("making / private")?;
        // A private tmpfs over the temp dir: no scratch file or mount point is
        // left on the host, even if the process is killed.
        let tmp = std::env::temp_dir();
        mount(Some("tmpfs"), &tmp, Some("tmpfs"), MsFlags::MS_NOSUID | MsFlags::MS_NODEV, Some("mode=0700"))
            .with_context(|| format!("mounting a private tmpfs on {}", tmp.display()))?;
        let dir = tmp.join("steer-bench");
        let bpffs = dir.join("bpffs");
        std::fs::create_dir_all(&bpffs).context("creating the bpffs mount point")?;
        mount(Some("bpf"), &bpffs, Some("bpf"), MsFlags::empty(), None::<&str>).context("mounting bpffs")?;
        let sandbox = Sandbox { dir, bpffs };

        run(Command::new("ip").args(["link", "set", "lo", "up"]))?;
        // Headroom for tens of thousands of loopback connects whose client
        // ends sit in TIME_WAIT; this namespace's setting only.
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")
            .context("widening ip_local_port_range in the benchmark namespace")?;
        // Except the ports servers bind again and again (the followed rows'
        // restarts): a client's TIME_WAIT on one would make that bind fail.
        std::fs::write("/proc/sys/net/ipv4/ip_local_reserved_ports", "8000-8999,31000-31999")
            .context("reserving the servers' ports in the benchmark namespace")?;
        Ok(sandbox)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // The namespace teardown would do this too; be explicit anyway.
        let _ = umount2(&self.bpffs, MntFlags::MNT_DETACH);
        let _ = umount2(&std::env::temp_dir(), MntFlags::MNT_DETACH);
    }
}

/// Runs a command, failing with its stderr.
pub fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Whether `program` can be found on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(program))))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
