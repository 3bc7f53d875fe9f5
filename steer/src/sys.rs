//! Raw syscalls that aya and nix do not wrap in the shape needed here.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_DETACH: libc::c_long = 34;

/// `ioctl` returning a netns fd for a socket (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// bpf(2) with `attr` as the leading part of `union bpf_attr` for `cmd`.
///
/// # Safety
/// `attr` must have the layout `cmd` expects, and every buffer it points to
/// must be live and as large as the kernel will write.
pub unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // Safety: upheld by the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn map_elem(cmd: libc::c_long, map: BorrowedFd<'_>, key: &[u8], value: *mut u8, flags: u64) -> io::Result<()> {
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: key.as_ptr() as u64,
        value: value as u64,
        flags,
    };
    unsafe { bpf(cmd, &mut attr) }.map(drop)
}

// The map helpers below trust `key` and `value` to be the map's key and value
// sizes: callers size them from map info they have checked.

/// Looks `key` up; `Ok(None)` when absent.
pub fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<Option<()>> {
    match map_elem(BPF_MAP_LOOKUP_ELEM, map, key, value.as_mut_ptr(), 0) {
        Ok(()) => Ok(Some(())),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

pub fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8]) -> io::Result<()> {
    map_elem(BPF_MAP_UPDATE_ELEM, map, key, value.as_ptr().cast_mut(), 0)
}

/// Deletes `key`; `Ok(false)` when it was absent.
pub fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    match map_elem(BPF_MAP_DELETE_ELEM, map, key, std::ptr::null_mut(), 0) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The parts of `struct bpf_link_info` a netns link fills in.
#[derive(Debug, Clone, Copy)]
pub struct NetnsLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    pub netns_ino: u32,
}

pub fn netns_link_info(link: BorrowedFd<'_>) -> io::Result<NetnsLinkInfo> {
    // type, id, prog_id, pad, then the union (netns_ino, attach_type).
    let mut info = [0u32; 32];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<[u32; 32]>() as u32,
        info: info.as_mut_ptr() as u64,
    };
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    const BPF_LINK_TYPE_NETNS: u32 = 5;
    if info[0] != BPF_LINK_TYPE_NETNS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace link"));
    }
    Ok(NetnsLinkInfo { id: info[1], prog_id: info[2], netns_ino: info[4] })
}

/// Detaches a link even if other holders keep it open.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [link.as_raw_fd() as u32, 0u32];
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

pub fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // Safety: plain syscall; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> io::Result<OwnedFd> {
    // Safety: plain syscall; the returned fd is owned by us.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn getsockopt_int(fd: BorrowedFd<'_>, level: i32, name: i32) -> io::Result<i32> {
    let mut value: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // Safety: value and len point at live stack slots of the declared size.
    let ret = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut value).cast(), &mut len) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
}

pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // Safety: as in getsockopt_int.
    let ret = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_COOKIE, (&raw mut value).cast(), &mut len)
    };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(value) }
}

/// The network namespace a socket belongs to, as an fd.
pub fn socket_netns(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // Safety: SIOCGSKNS takes no argument and returns a new fd.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(ns) })
}

const BPF_OBJ_GET: libc::c_long = 7;

/// Opens a pinned BPF object.
pub fn obj_get(path: &std::path::Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // Safety: BPF_OBJ_GET returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The anon-inode kind of a BPF fd ("bpf-map", "bpf-prog", "bpf_link").
pub fn bpf_fd_kind(fd: BorrowedFd<'_>) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    target.to_str()?.strip_prefix("anon_inode:").map(str::to_string)
}

const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Every key of a map, read with BPF_MAP_GET_NEXT_KEY.
pub fn map_keys(map: BorrowedFd<'_>, key_size: usize) -> io::Result<Vec<Vec<u8>>> {
    let mut keys: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut next = vec![0u8; key_size];
        let mut attr = MapElemAttr {
            map_fd: map.as_raw_fd() as u32,
            _pad: 0,
            // A null key asks for the first one.
            key: keys.last().map_or(0, |k| k.as_ptr() as u64),
            value: next.as_mut_ptr() as u64,
            flags: 0,
        };
        match unsafe { bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) } {
            Ok(_) => keys.push(next),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
            Err(e) => return Err(e),
        }
    }
}

/// Swaps the program behind a link in one step (BPF_LINK_UPDATE): lookups
/// run either the old program or the new one, never neither.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = LinkUpdateAttr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: new_prog.as_raw_fd() as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}
