//! The raw kernel calls aya 0.14 does not offer, private to the kernel
//! layer: each is wrapped by a safe, checked API in a sibling module.
//!
//! * element calls on SOCKMAP/SOCKHASH maps with 8-byte values: aya's
//!   `SockMap`/`SockHash` insist on 4-byte values, but only an 8-byte value
//!   lets a lookup return the socket's cookie;
//! * `BPF_LINK_UPDATE`, `BPF_LINK_DETACH` and a netns link's info (aya keeps
//!   them crate-private), on a link opened with `BPF_OBJ_GET`;
//! * batch updates (`BPF_MAP_UPDATE_BATCH`): one call, and for a map of
//!   maps one RCU grace period instead of one per element;
//! * `SIOCGSKNS`, a socket's network namespace;
//! * walking every BPF link (`BPF_LINK_GET_NEXT_ID`) for the netns ones:
//!   aya's `LinkInfo` hides a link's namespace and attach type;
//! * pinning a link opened from a pin (`BPF_OBJ_PIN`): aya pins only the
//!   links it made.

use std::{
    ffi::CString,
    io,
    mem::size_of,
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
const BPF_LINK_GET_NEXT_ID: libc::c_long = 31;
/// `enum bpf_attach_type`'s BPF_SK_LOOKUP.
pub(super) const BPF_SK_LOOKUP: u32 = 36;
const BPF_LINK_DETACH: libc::c_long = 34;
const BPF_LINK_TYPE_NETNS: u32 = 5;
/// `ioctl` returning a netns fd for a socket (linux/sockios.h).
const SIOCGSKNS: libc::c_ulong = 0x894C;

/// bpf(2) with `attr` as the leading part of `union bpf_attr` for `cmd`.
///
/// # Safety
/// `attr` must have the layout `cmd` expects, and every buffer it points to
/// must be live and as large as the kernel will write.
pub(super) unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // Safety: upheld by the caller.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

#[repr(C)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// # Safety
/// `key` and `value` (unless null) must point to buffers of the map's key
/// and value sizes.
unsafe fn map_elem(
    cmd: libc::c_long,
    map: BorrowedFd<'_>,
    key: *const u8,
    value: *mut u8,
    flags: u64,
) -> io::Result<()> {
    let mut attr = MapElemAttr { map_fd: map.as_raw_fd() as u32, _pad: 0, key: key as u64, value: value as u64, flags };
    // Safety: upheld by the caller.
    unsafe { bpf(cmd, &mut attr) }.map(drop)
}

/// Looks `key` up into `value`; false when absent.
///
/// # Safety
/// `key` and `value` must be exactly the map's key and value sizes: the
/// kernel writes the map's value size into `value`.
pub(super) unsafe fn map_lookup(map: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    // Safety: upheld by the caller.
    match unsafe { map_elem(BPF_MAP_LOOKUP_ELEM, map, key.as_ptr(), value.as_mut_ptr(), 0) } {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// # Safety
/// As [`map_lookup`]: the kernel reads the map's key and value sizes.
pub(super) unsafe fn map_update(map: BorrowedFd<'_>, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
    // Safety: upheld by the caller.
    unsafe { map_elem(BPF_MAP_UPDATE_ELEM, map, key.as_ptr(), value.as_ptr().cast_mut(), flags) }
}

/// Deletes `key`; false when it was absent.
///
/// # Safety
/// `key` must be exactly the map's key size.
pub(super) unsafe fn map_delete(map: BorrowedFd<'_>, key: &[u8]) -> io::Result<bool> {
    // Safety: upheld by the caller.
    match unsafe { map_elem(BPF_MAP_DELETE_ELEM, map, key.as_ptr(), std::ptr::null_mut(), 0) } {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

#[repr(C)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every (key, value) of a hash map, read a few thousand at a time
/// (BPF_MAP_LOOKUP_BATCH) rather than two calls per element.
///
/// # Safety
/// `key_size` and `value_size` must be the map's: the kernel writes that
/// many bytes per element.
pub(super) unsafe fn map_entries_batch(
    map: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    const PER_CALL: usize = 4096;
    let mut out = Vec::new();
    // The position token: a bucket index for hash maps, at least 4 bytes.
    let mut token = vec![0u8; key_size.max(8)];
    let mut next = vec![0u8; key_size.max(8)];
    let mut first = true;
    loop {
        let mut keys = vec![0u8; PER_CALL * key_size];
        let mut values = vec![0u8; PER_CALL * value_size];
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: PER_CALL as u32,
            map_fd: map.as_raw_fd() as u32,
            elem_flags: 0,
            flags: 0,
        };
        // Safety: the buffers hold PER_CALL elements of the map's sizes.
        let done = match unsafe { bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) } {
            Ok(_) => false,
            // ENOENT: the last batch, possibly partial.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => true,
            Err(e) => return Err(e),
        };
        for i in 0..attr.count as usize {
            let key = keys[i * key_size..(i + 1) * key_size].to_vec();
            out.push((key, values[i * value_size..(i + 1) * value_size].to_vec()));
        }
        if done {
            return Ok(out);
        }
        std::mem::swap(&mut token, &mut next);
        first = false;
    }
}

/// Writes `count` elements, keys and values packed back to back, in one
/// call. Errors with EINVAL or ENOTSUPP where the kernel lacks batch
/// updates for this map type.
///
/// # Safety
/// `keys` and `values` must hold `count` elements of the map's key and
/// value sizes.
pub(super) unsafe fn map_update_batch(map: BorrowedFd<'_>, keys: &[u8], values: &[u8], count: u32) -> io::Result<()> {
    let mut attr = BatchAttr {
        in_batch: 0,
        out_batch: 0,
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        elem_flags: 0,
        flags: 0,
    };
    // Safety: keys and values hold `count` elements of the map's sizes (callers' contract).
    unsafe { bpf(BPF_MAP_UPDATE_BATCH, &mut attr) }.map(drop)
}

/// Opens a pinned BPF object of any kind.
pub(super) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjGetAttr { pathname: c_path.as_ptr() as u64, bpf_fd: 0, file_flags: 0 };
    // Safety: attr is BPF_OBJ_GET's part of bpf_attr; c_path outlives the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut attr) }?;
    // Safety: BPF_OBJ_GET returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Pins the BPF object `fd` (a map, program or link) at `path`: one more
/// reference to it, which unlinking the pin drops again.
pub(super) fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path has a NUL byte"))?;
    #[repr(C)]
    struct ObjPinAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let mut attr = ObjPinAttr { pathname: c_path.as_ptr() as u64, bpf_fd: fd.as_raw_fd() as u32, file_flags: 0 };
    // Safety: attr is BPF_OBJ_PIN's part of bpf_attr; c_path outlives the call.
    unsafe { bpf(BPF_OBJ_PIN, &mut attr) }.map(drop)
}

/// The anon-inode kind of a BPF fd ("bpf-map", "bpf-prog", "bpf_link").
pub(super) fn bpf_fd_kind(fd: BorrowedFd<'_>) -> Option<String> {
    let target = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
    target.to_str()?.strip_prefix("anon_inode:").map(str::to_string)
}

/// The parts of `struct bpf_link_info` a netns link fills in.
#[derive(Debug, Clone, Copy)]
pub(super) struct NetnsLinkInfo {
    pub id: u32,
    pub prog_id: u32,
    /// 0 once the link is detached or its namespace is gone.
    pub netns_ino: u32,
}

/// The id of a link of any kind and of the program it runs.
pub(super) fn link_ids(link: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let info = link_info_words(link)?;
    Ok((info[1], info[2]))
}

pub(super) fn netns_link_info(link: BorrowedFd<'_>) -> io::Result<NetnsLinkInfo> {
    let info = link_info_words(link)?;
    if info[0] != BPF_LINK_TYPE_NETNS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace link"));
    }
    Ok(NetnsLinkInfo { id: info[1], prog_id: info[2], netns_ino: info[4] })
}

/// Detaches a link even if other holders keep it open.
pub(super) fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = [link.as_raw_fd() as u32, 0u32];
    // Safety: BPF_LINK_DETACH takes the link fd only.
    unsafe { bpf(BPF_LINK_DETACH, &mut attr) }.map(drop)
}

/// Swaps the program behind a link in one step (BPF_LINK_UPDATE): lookups
/// run either the old program or the new one, never neither.
pub(super) fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
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
    // Safety: attr is BPF_LINK_UPDATE's part of bpf_attr.
    unsafe { bpf(BPF_LINK_UPDATE, &mut attr) }.map(drop)
}

/// The network namespace a socket belongs to, as an fd.
pub(super) fn socket_netns(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    // Safety: SIOCGSKNS takes no argument and returns a new fd.
    let ns = unsafe { libc::ioctl(fd.as_raw_fd(), SIOCGSKNS as _) };
    if ns < 0 {
        return Err(io::Error::last_os_error());
    }
    // Safety: the ioctl returned a new fd we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(ns) })
}

/// One sk_lookup link of some network namespace.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SkLookupLink {
    pub link_id: u32,
    pub program_id: u32,
    /// The program's name as the kernel keeps it (at most 15 bytes).
    pub program_name: String,
    pub netns_inode: u32,
}

/// Every BPF_SK_LOOKUP link attached to the network namespace with inode
/// `netns_ino`: BPF_LINK_GET_NEXT_ID over all links, each opened by id
/// and read with BPF_OBJ_GET_INFO_BY_FD. Links that vanish meanwhile are
/// skipped.
pub(super) fn sk_lookup_links(netns_ino: u64) -> io::Result<Vec<SkLookupLink>> {
    let mut out = Vec::new();
    let mut id = 0u32;
    // Bounded by the number of links (ids only grow, at most u32::MAX).
    for _ in 0..1_000_000 {
        let mut attr = [id, 0u32, 0u32, 0u32];
        // Safety: BPF_LINK_GET_NEXT_ID takes start_id and writes next_id.
        match unsafe { bpf(BPF_LINK_GET_NEXT_ID, &mut attr) } {
            Ok(_) => id = attr[1],
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        let mut attr = [id, 0u32, 0u32];
        // Safety: BPF_LINK_GET_FD_BY_ID takes the id and returns a new fd.
        let fd = match unsafe { bpf(BPF_LINK_GET_FD_BY_ID, &mut attr) } {
            // Safety: a new fd we now own.
            Ok(fd) => unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(e),
        };
        let Ok(info) = link_info_words(fd.as_fd()) else { continue };
        // type, id, prog_id, pad, then netns_ino, attach_type.
        if info[0] != BPF_LINK_TYPE_NETNS || info[5] != BPF_SK_LOOKUP || u64::from(info[4]) != netns_ino {
            continue;
        }
        out.push(SkLookupLink {
            link_id: info[1],
            program_id: info[2],
            program_name: program_name(info[2]).unwrap_or_default(),
            netns_inode: info[4],
        });
    }
    Ok(out)
}

/// `bpf_link_info` as words: type, id, prog_id, pad, then the union (for a
/// netns link: netns_ino, attach_type).
fn link_info_words(link: BorrowedFd<'_>) -> io::Result<[u32; 32]> {
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u32; 32];
    let mut attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: size_of::<[u32; 32]>() as u32,
        info: info.as_mut_ptr() as u64,
    };
    // Safety: info is as large as info_len says.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    Ok(info)
}

/// The name of the loaded program with `id` (BPF_PROG_GET_FD_BY_ID, then
/// `bpf_prog_info.name`, 16 bytes at offset 64).
pub(super) fn program_name(id: u32) -> io::Result<String> {
    let mut attr = [id, 0u32, 0u32];
    // Safety: BPF_PROG_GET_FD_BY_ID takes the id and returns a new fd.
    let fd = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }?;
    // Safety: a new fd we now own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u8; 80];
    let mut attr = InfoAttr { bpf_fd: fd.as_raw_fd() as u32, info_len: 80, info: info.as_mut_ptr() as u64 };
    // Safety: info is as large as info_len says.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let name = &info[64..80];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

/// renameat2(2) of `old` to `new` inside the directory `dir`, with
/// `flags` (libc::RENAME_NOREPLACE, libc::RENAME_EXCHANGE). nix offers it
/// on glibc only, and the container image is built against musl.
pub fn rename_in<P1, P2>(dir: impl AsFd, old: &P1, new: &P2, flags: libc::c_uint) -> nix::Result<()>
where
    P1: ?Sized + nix::NixPath,
    P2: ?Sized + nix::NixPath,
{
    let dirfd = dir.as_fd().as_raw_fd();
    let res = old.with_nix_path(|old| {
        new.with_nix_path(|new| {
            // Safety: both paths are NUL-terminated and live for the call.
            unsafe { libc::syscall(libc::SYS_renameat2, dirfd, old.as_ptr(), dirfd, new.as_ptr(), flags) }
        })
    })??;
    nix::errno::Errno::result(res).map(drop)
}
