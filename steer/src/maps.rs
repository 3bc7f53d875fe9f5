//! Opening pinned maps as aya's typed maps, checked against their spec in
//! steer-common, and the one map kind aya cannot carry: socket maps with
//! 8-byte (cookie) values.

use std::{
    marker::PhantomData,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    path::Path,
};

use aya::{
    Pod,
    maps::{HashMap, Map, MapData, MapError, MapInfo, MapType},
};
use steer_common::MapSpec;

use crate::{
    bpffs,
    error::{Context, Result, fail},
    sys,
};

fn type_name(info: &MapInfo) -> String {
    match info.map_type() {
        Ok(t) => format!("{t:?}"),
        Err(_) => "unknown".into(),
    }
}

/// Opens the pin at `path`, failing unless it is a BPF map.
fn open_pinned(path: &Path, what: &str) -> Result<(MapData, MapInfo)> {
    bpffs::require_pin(path, what)?;
    let data = MapData::from_pin(path).with_context(|| format!("opening pinned map {}", path.display()))?;
    // BPF_OBJ_GET opens any pinned object; only the fd's kind says it is a map.
    let kind = sys::bpf_fd_kind(data.fd().as_fd());
    if kind.as_deref() != Some("bpf-map") {
        let what = match kind.as_deref() {
            Some("bpf-prog") => "a BPF program",
            Some("bpf_link") | Some("bpf-link") => "a BPF link",
            _ => "not a BPF map",
        };
        fail!(Pin, "opening pinned map {}: it is {what}, not a map", path.display());
    }
    let info = data.info().with_context(|| format!("reading map info of {}", path.display()))?;
    Ok((data, info))
}

/// Opens one of the dispatcher's maps, checked against its spec: a pin of
/// another shape (an older steer's state, or a foreign object) is refused
/// before anything reads or writes it.
pub fn open_spec(path: &Path, spec: &MapSpec) -> Result<MapData> {
    let stale = "is this state from another steerctl version? `steerctl unload` and load again";
    let (data, info) = open_pinned(path, &format!("{} map ({stale})", spec.name))?;
    let map_type = info.map_type().ok().map(|t| t as u32);
    if map_type != Some(spec.map_type) || info.key_size() != spec.key_size || info.value_size() != spec.value_size {
        fail!(Pin, "{} is not the {} map this steerctl expects ({stale})", path.display(), spec.name);
    }
    Ok(data)
}

/// [`open_spec`], as an aya typed map.
pub fn open_typed<M: TryFrom<Map, Error = MapError>>(path: &Path, spec: &MapSpec) -> Result<M> {
    Ok(M::try_from(Map::from_map_data(open_spec(path, spec)?)?)?)
}

/// The set of steered ports (the seed's `echo_ports`: HASH u16 -> u8).
/// Opened by shape, not spec: the seed tools accept any such map.
pub struct PortMap {
    map: HashMap<MapData, u16, u8>,
}

impl PortMap {
    pub fn open(path: &Path) -> Result<Self> {
        let (data, info) = open_pinned(path, "port map")?;
        if !matches!(info.map_type(), Ok(MapType::Hash)) || info.key_size() != 2 {
            fail!(
                Pin,
                "{} is a {} map with {}-byte keys; a port map is a hash map keyed by a 2-byte port",
                path.display(),
                type_name(&info),
                info.key_size()
            );
        }
        Ok(Self { map: HashMap::try_from(Map::from_map_data(data)?)? })
    }

    pub fn add(&mut self, port: u16) -> Result<()> {
        self.map.insert(port, 0, 0).with_context(|| format!("adding port {port}"))
    }

    /// Removes `port`; false when it was not listed.
    pub fn remove(&mut self, port: u16) -> Result<bool> {
        match self.map.remove(&port) {
            Ok(()) => Ok(true),
            Err(MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing port {port}")),
        }
    }

    pub fn list(&self) -> Result<Vec<u16>> {
        let mut ports = self.map.keys().collect::<Result<Vec<_>, _>>()?;
        ports.sort_unstable();
        Ok(ports)
    }
}

/// A SOCKMAP or SOCKHASH keyed by `K`. Values are written as socket fds and
/// read back as socket cookies, which needs 8-byte values: aya's typed
/// socket maps fix them at 4 bytes, so this drives the map directly. Maps
/// with 4-byte values (the seed tools accept them) insert, but have no
/// cookie to read.
pub struct SocketMap<K> {
    data: MapData,
    value_size: u32,
    is_sockmap: bool,
    _key: PhantomData<K>,
}

impl<K: Pod + std::fmt::Debug> SocketMap<K> {
    /// Any socket map keyed by `K`: what the seed tools (`sockmap-update`) take.
    pub fn open(path: &Path) -> Result<Self> {
        let (data, info) = open_pinned(path, "socket map")?;
        if !matches!(info.map_type(), Ok(MapType::SockMap | MapType::SockHash)) {
            fail!(
                Pin,
                "{} is a {} map, not a socket map; pass a BPF_MAP_TYPE_SOCKMAP or SOCKHASH pin (such as .../echo_socket)",
                path.display(),
                type_name(&info)
            );
        }
        if info.key_size() as usize != size_of::<K>() {
            fail!(
                Pin,
                "{} has {}-byte keys; only {}-byte keys are supported",
                path.display(),
                info.key_size(),
                size_of::<K>()
            );
        }
        Self::from_data(data, &info)
    }

    /// One of the dispatcher's socket maps, checked against its spec.
    pub fn open_spec(path: &Path, spec: &MapSpec) -> Result<Self> {
        let data = open_spec(path, spec)?;
        let info = data.info()?;
        Self::from_data(data, &info)
    }

    fn from_data(data: MapData, info: &MapInfo) -> Result<Self> {
        Ok(Self {
            data,
            value_size: info.value_size(),
            is_sockmap: matches!(info.map_type(), Ok(MapType::SockMap)),
            _key: PhantomData,
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    fn key_bytes(key: &K) -> &[u8] {
        // Safety: K is Pod: plain bytes, no padding.
        unsafe { std::slice::from_raw_parts(std::ptr::from_ref(key).cast::<u8>(), size_of::<K>()) }
    }

    /// Puts `socket` at `key`, replacing whatever was there.
    pub fn insert(&self, key: &K, socket: BorrowedFd<'_>) -> Result<()> {
        let fd = socket.as_raw_fd();
        // The kernel reads a u32 or u64 fd depending on the map's value size.
        let value =
            if self.value_size == 8 { (fd as u64).to_ne_bytes().to_vec() } else { (fd as u32).to_ne_bytes().to_vec() };
        match sys::map_update(self.fd(), Self::key_bytes(key), &value) {
            Err(e) if e.raw_os_error() == Some(libc::E2BIG) => {
                fail!(Invalid, "key {key:?} is out of the socket map's range")
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => fail!(
                Invalid,
                "the kernel refused the socket for a socket map (it must be a listening TCP or a bound UDP socket)"
            ),
            other => other.with_context(|| format!("inserting into the socket map at key {key:?}")),
        }
    }

    /// Cookie of the socket at `key`, if any (needs 8-byte values).
    pub fn cookie(&self, key: &K) -> Result<Option<u64>> {
        if self.value_size != 8 {
            return Ok(None);
        }
        let mut value = [0u8; 8];
        let found =
            sys::map_lookup(self.fd(), Self::key_bytes(key), &mut value).context("looking up the socket map")?;
        Ok(found.then(|| u64::from_ne_bytes(value)))
    }

    /// Removes the socket at `key`; false when there was none.
    pub fn remove(&self, key: &K) -> Result<bool> {
        match sys::map_delete(self.fd(), Self::key_bytes(key)) {
            // A SOCKMAP answers EINVAL, not ENOENT, for an empty slot.
            Err(e) if self.is_sockmap && e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            other => other.context("removing from the socket map"),
        }
    }
}
