//! The dispatcher object: loading its programs with their maps pinned, and
//! linking the sk_lookup program to a network namespace.

use std::{fs::File, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{SkLookup, links::FdLink},
};
use steer_common::{MAPS, migrate::MigratePlan, names};

use super::{
    bpffs, caps,
    links::{Link, NetnsLinkInfo},
    netns,
};
use crate::error::{Context, Error, Result, fail};

/// The dispatcher object, built by `cargo xtask build-ebpf` and committed so
/// that a stable toolchain builds the tools without any BPF toolchain.
pub static DISPATCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dispatch-ebpf/dispatch.bpf.o"));

/// The programs that follow servers (sock_ops, post_bind, iterators), an
/// object of their own, built and committed the same way.
pub static FOLLOW_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dispatch-ebpf/follow.bpf.o"));

/// The programs `upgrade` runs once to carry sockets into a state of a new
/// layout (iterators over the old socket maps), built and committed the
/// same way. Not part of [`object_hash`]: nothing of it stays loaded.
pub static MIGRATE_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("CARGO_MANIFEST_DIR"), "/../dispatch-ebpf/migrate.bpf.o"));

/// FNV-1a of the embedded objects: which build a loaded program came from.
pub fn object_hash() -> u64 {
    DISPATCH_OBJECT
        .iter()
        .chain(FOLLOW_OBJECT)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The loaded object, its sk_lookup program in the kernel.
pub struct Loaded {
    ebpf: Ebpf,
}

impl Loaded {
    /// Loads the object with every map pinned at `pin(name)` (reusing the
    /// pins already there) and `steer_dispatch` into the kernel.
    pub fn load(pin: impl Fn(&str) -> std::path::PathBuf) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for m in MAPS {
            loader.map_pin_path(m.name, pin(m.name));
        }
        let mut ebpf = loader.load(DISPATCH_OBJECT).context("loading the dispatcher object")?;
        let program: &mut SkLookup = ebpf
            .program_mut(names::STEER_PROGRAM)
            .ok_or_else(|| Error::Pin("the dispatcher object has no steer_dispatch program".into()))?
            .try_into()?;
        program.load().context("loading the sk_lookup program into the kernel")?;
        Ok(Self { ebpf })
    }

    pub fn program(&mut self) -> &mut SkLookup {
        self.ebpf.program_mut(names::STEER_PROGRAM).expect("checked by load").try_into().expect("checked by load")
    }
}

/// Links the sk_lookup program pinned at `program_pin` to the calling
/// thread's network namespace and pins the link at `link_pin`. Returns the
/// link id.
pub fn attach(program_pin: &Path, link_pin: &Path) -> Result<u32> {
    caps::require_kernel()?;
    caps::require_bpf()?;
    bpffs::require_pin(program_pin, "sk_lookup program")?;
    if link_pin.exists() {
        fail!(Conflict, "already attached: a link is pinned at {}; detach it first", link_pin.display());
    }
    if let Some(dir) = link_pin.parent() {
        bpffs::require_dir(dir)?;
    }
    let mut program = SkLookup::from_pin(program_pin)
        .with_context(|| format!("opening the pinned program {}", program_pin.display()))?;
    let netns = File::open(netns::CURRENT).context("opening the current network namespace")?;
    let link_id = program.attach(netns).context("creating the sk_lookup link (BPF_LINK_CREATE)")?;
    let link: FdLink = program.take_link(link_id)?.into();
    let id = link.info()?.id();
    link.pin(link_pin).with_context(|| format!("pinning the link at {}", link_pin.display()))?;
    log::debug!("link {id} pinned at {}", link_pin.display());
    Ok(id)
}

/// Detaches the link pinned at `link_pin` and removes the pin. Returns false
/// when nothing was attached.
pub fn detach(link_pin: &Path) -> Result<bool> {
    if !link_pin.exists() {
        return Ok(false);
    }
    // Detach first so normal lookup returns even if someone else holds the link open.
    Link::open(link_pin)?.detach()?;
    std::fs::remove_file(link_pin).with_context(|| format!("unpinning {}", link_pin.display()))?;
    Ok(true)
}

/// The netns link pinned at `link_pin`, if there is one.
pub fn link_info(link_pin: &Path) -> Result<Option<NetnsLinkInfo>> {
    if !link_pin.exists() {
        return Ok(None);
    }
    Ok(Some(Link::open(link_pin)?.netns_info()?))
}

/// Which follow programs a scope has: TCP (sock_ops, inside listen()) and
/// UDP (post_bind for IPv4 and IPv6, reporting binds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowHook {
    Tcp,
    Udp4,
    Udp6,
}

impl FollowHook {
    pub const ALL: [FollowHook; 3] = [FollowHook::Tcp, FollowHook::Udp4, FollowHook::Udp6];

    fn program(self) -> &'static str {
        match self {
            FollowHook::Tcp => names::FOLLOW_PROGRAM,
            FollowHook::Udp4 => names::FOLLOW_BIND4_PROGRAM,
            FollowHook::Udp6 => names::FOLLOW_BIND6_PROGRAM,
        }
    }

    /// The link's pin name for scope `scope`.
    pub fn pin_name(self, scope: u16) -> String {
        let kind = match self {
            FollowHook::Tcp => "tcp",
            FollowHook::Udp4 => "udp4",
            FollowHook::Udp6 => "udp6",
        };
        format!("follow_{kind}_{scope}")
    }
}

/// Why the follow programs cannot run on this kernel, if they cannot.
pub fn follow_unsupported() -> Option<String> {
    let (major, minor) = caps::kernel_version();
    ((major, minor) < (5, 15)).then(|| {
        format!(
            "this kernel is {major}.{minor}; following servers in the kernel needs Linux 5.15 \
             (bpf_get_netns_cookie in sock_ops programs)"
        )
    })
}

/// The object loaded for one scope's follow programs.
fn load_follow_object(pin: &impl Fn(&str) -> std::path::PathBuf, scope: u16, netns_cookie: u64) -> Result<Ebpf> {
    let mut loader = EbpfLoader::new();
    for m in MAPS {
        loader.map_pin_path(m.name, pin(m.name));
    }
    let scope = u32::from(scope);
    loader.override_global(names::SCOPE_GLOBAL, &scope, true);
    loader.override_global(names::NETNS_COOKIE_GLOBAL, &netns_cookie, true);
    loader.load(FOLLOW_OBJECT).context("loading the follow object")
}

/// `hook`'s program for `scope` (serving the namespace with
/// `netns_cookie`), loaded into the kernel with the maps pinned at
/// `pin(name)`; the object it lives in comes with it.
pub struct FollowProgram {
    ebpf: Ebpf,
    hook: FollowHook,
}

impl FollowProgram {
    pub fn load(
        pin: impl Fn(&str) -> std::path::PathBuf,
        hook: FollowHook,
        scope: u16,
        netns_cookie: u64,
    ) -> Result<Self> {
        use aya::programs::{CgroupSock, SockOps};
        if let Some(why) = follow_unsupported() {
            fail!(Kernel, "{why}");
        }
        let mut ebpf = load_follow_object(&pin, scope, netns_cookie)?;
        let program = ebpf
            .program_mut(hook.program())
            .ok_or_else(|| Error::Pin(format!("the follow object has no {} program", hook.program())))?;
        let what = || format!("loading {} into the kernel", hook.program());
        match hook {
            FollowHook::Tcp => <&mut SockOps>::try_from(program)?.load().with_context(what)?,
            FollowHook::Udp4 | FollowHook::Udp6 => <&mut CgroupSock>::try_from(program)?.load().with_context(what)?,
        }
        Ok(Self { ebpf, hook })
    }

    /// The loaded program's fd.
    pub fn fd(&self) -> Result<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        let program = self.ebpf.program(self.hook.program()).expect("checked by load");
        Ok(program.fd()?.as_fd())
    }

    /// Attaches the program to `cgroup` and pins the link at `link_pin`.
    /// Returns the link id.
    pub fn attach(mut self, cgroup: &std::os::fd::OwnedFd, link_pin: &Path) -> Result<u32> {
        use aya::programs::{CgroupAttachMode, CgroupSock, SockOps};
        let program = self.ebpf.program_mut(self.hook.program()).expect("checked by load");
        // A cgroup link takes no attach flags: links always run beside others.
        let link: FdLink = match self.hook {
            FollowHook::Tcp => {
                let p: &mut SockOps = program.try_into()?;
                let id = p.attach(cgroup, CgroupAttachMode::Single).context("attaching to the cgroup")?;
                p.take_link(id)?.try_into()?
            }
            FollowHook::Udp4 | FollowHook::Udp6 => {
                let p: &mut CgroupSock = program.try_into()?;
                let id = p.attach(cgroup, CgroupAttachMode::Single).context("attaching to the cgroup")?;
                p.take_link(id)?.try_into()?
            }
        };
        let id = link.info()?.id();
        link.pin(link_pin).with_context(|| format!("pinning the link at {}", link_pin.display()))?;
        Ok(id)
    }
}

/// Loads `hook`'s program for `scope` (which serves the namespace with
/// `netns_cookie`), attaches it to `cgroup` and pins the link at
/// `link_pin`. The maps are the ones pinned at `pin(name)`.
pub fn attach_follow(
    pin: impl Fn(&str) -> std::path::PathBuf,
    hook: FollowHook,
    scope: u16,
    netns_cookie: u64,
    cgroup: &std::os::fd::OwnedFd,
    link_pin: &Path,
) -> Result<u32> {
    FollowProgram::load(pin, hook, scope, netns_cookie)?.attach(cgroup, link_pin)
}

/// The follow hook and scope a link pin's name (`follow_tcp_3`) stands for.
pub fn parse_follow_pin(name: &str) -> Option<(FollowHook, u16)> {
    FollowHook::ALL.into_iter().find_map(|hook| {
        let prefix = hook.pin_name(0);
        let scope = name.strip_prefix(prefix.strip_suffix('0')?)?;
        Some((hook, scope.parse().ok()?))
    })
}

/// The iterator kinds a backfill pass walks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backfill {
    Tcp,
    Udp,
}

impl Backfill {
    pub const ALL: [Backfill; 2] = [Backfill::Tcp, Backfill::Udp];

    pub fn pin_name(self) -> &'static str {
        match self {
            Backfill::Tcp => "backfill_tcp",
            Backfill::Udp => "backfill_udp",
        }
    }
}

/// Loads the backfill iterator for `kind` and pins its link at `link_pin`.
pub fn pin_backfill(pin: impl Fn(&str) -> std::path::PathBuf, kind: Backfill, link_pin: &Path) -> Result<()> {
    use aya::programs::Iter;
    if let Some(why) = follow_unsupported() {
        fail!(Kernel, "{why}");
    }
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| Error::Kernel(format!("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {e}")))?;
    let mut ebpf = load_follow_object(&pin, 0, 0)?;
    let (name, target) = match kind {
        Backfill::Tcp => (names::BACKFILL_TCP_PROGRAM, "tcp"),
        Backfill::Udp => (names::BACKFILL_UDP_PROGRAM, "udp"),
    };
    let p: &mut Iter = ebpf
        .program_mut(name)
        .ok_or_else(|| Error::Pin(format!("the dispatcher object has no {name} program")))?
        .try_into()?;
    p.load(target, &btf).with_context(|| format!("loading {name} into the kernel"))?;
    let id = p.attach()?;
    let link: FdLink = p.take_link(id)?.try_into()?;
    link.pin(link_pin).with_context(|| format!("pinning the link at {}", link_pin.display()))?;
    Ok(())
}

/// Puts sockets of this namespace into the new state whose maps are
/// pinned at `pin(name)`, by cookie: `plan` says, for each, the `sockets`
/// keys it goes to and whether it is the seed socket (`echo_socket`). The
/// migration object's iterators over TCP and UDP sockets do it in the
/// kernel; no process's file descriptor is taken. Sockets not found (closed
/// meanwhile) are passed over: the caller checks what arrived.
pub fn carry_sockets(
    pin: impl Fn(&str) -> std::path::PathBuf,
    plan: &std::collections::BTreeMap<u64, MigratePlan>,
) -> Result<()> {
    use std::io::Read;

    use aya::{maps::HashMap, programs::Iter};
    if plan.is_empty() {
        return Ok(());
    }
    if let Some(why) = follow_unsupported() {
        fail!(Kernel, "{why}; upgrade carries sockets with the same iterators");
    }
    let btf = aya::Btf::from_sys_fs()
        .map_err(|e| Error::Kernel(format!("reading the kernel's BTF (/sys/kernel/btf/vmlinux): {e}")))?;
    let mut loader = EbpfLoader::new();
    for m in MAPS {
        loader.map_pin_path(m.name, pin(m.name));
    }
    let mut ebpf = loader.load(MIGRATE_OBJECT).context("loading the migration object")?;
    const PROGRAMS: [(&str, &str); 2] = [("steer_migrate_tcp", "tcp"), ("steer_migrate_udp", "udp")];
    for (name, target) in PROGRAMS {
        let p: &mut Iter = ebpf
            .program_mut(name)
            .ok_or_else(|| Error::Pin(format!("the migration object has no {name} program")))?
            .try_into()?;
        p.load(target, &btf).with_context(|| format!("loading {name} into the kernel"))?;
    }
    let entries: Vec<(&u64, &MigratePlan)> = plan.iter().collect();
    for pass in entries.chunks(steer_common::migrate::MAX_PLAN as usize) {
        let mut map: HashMap<_, u64, MigratePlan> = HashMap::try_from(
            ebpf.map_mut(steer_common::migrate::PLAN_MAP)
                .ok_or_else(|| Error::Pin("the migration object has no plan map".into()))?,
        )?;
        for key in map.keys().collect::<Result<Vec<_>, _>>()? {
            map.remove(&key)?;
        }
        for (cookie, entry) in pass {
            map.insert(**cookie, **entry, 0).context("writing the migration plan")?;
        }
        for (name, _) in PROGRAMS {
            let p: &mut Iter = ebpf.program_mut(name).expect("loaded above").try_into()?;
            let id = p.attach().with_context(|| format!("linking {name}"))?;
            let mut file = p.take_link(id)?.into_file()?;
            let mut sink = Vec::new();
            file.read_to_end(&mut sink).with_context(|| format!("running {name}"))?;
        }
    }
    Ok(())
}

/// Runs the iterator pinned at `link_pin` once, over the sockets of the
/// calling thread's network namespace.
pub fn run_iterator(link_pin: &Path) -> Result<()> {
    use std::io::Read;
    let mut file = File::open(link_pin).with_context(|| format!("opening iterator {}", link_pin.display()))?;
    let mut sink = Vec::new();
    file.read_to_end(&mut sink).with_context(|| format!("running iterator {}", link_pin.display()))?;
    Ok(())
}
