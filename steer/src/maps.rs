//! The pinned maps: the port set and the socket map.

use std::{
    os::fd::{AsFd, BorrowedFd},
    path::Path,
};

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, Map, MapData, MapType};

use crate::{bpffs, sys};

fn open_pinned(path: &Path, what: &str) -> Result<(MapData, aya::maps::MapInfo)> {
    bpffs::require_pin(path, what)?;
    let data = MapData::from_pin(path).with_context(|| format!("opening pinned map {}", path.display()))?;
    // BPF_OBJ_GET opens any pinned object; only the fd's kind says it is a map.
    let kind = crate::sys::bpf_fd_kind(data.fd().as_fd());
    if kind.as_deref() != Some("bpf-map") {
        let what = match kind.as_deref() {
            Some("bpf-prog") => "a BPF program",
            Some("bpf_link") | Some("bpf-link") => "a BPF link",
            _ => "not a BPF map",
        };
        bail!("opening pinned map {}: it is {what}, not a map", path.display());
    }
    let info = data.info().with_context(|| format!("reading map info of {}", path.display()))?;
    Ok((data, info))
}

fn type_name(info: &aya::maps::MapInfo) -> String {
    match info.map_type() {
        Ok(t) => format!("{t:?}"),
        Err(_) => "unknown".into(),
    }
}

/// The set of steered ports (the seed's `echo_ports`: HASH u16 -> u8).
pub struct PortMap {
    map: HashMap<MapData, u16, u8>,
}

impl PortMap {
    pub fn open(path: &Path) -> Result<Self> {
        let (data, info) = open_pinned(path, "port map")?;
        if !matches!(info.map_type(), Ok(MapType::Hash)) || info.key_size() != 2 {
            bail!(
                "{} is a {} map with {}-byte keys; a port map is a hash map keyed by a 2-byte port",
                path.display(),
                type_name(&info),
                info.key_size()
            );
        }
        let map = HashMap::try_from(Map::from_map_data(data)?)?;
        Ok(Self { map })
    }

    pub fn add(&mut self, port: u16) -> Result<()> {
        self.map.insert(port, 0, 0).with_context(|| format!("adding port {port}"))
    }

    /// Removes `port`; false when it was not listed.
    pub fn remove(&mut self, port: u16) -> Result<bool> {
        match self.map.remove(&port) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(e).with_context(|| format!("removing port {port}")),
        }
    }

    pub fn list(&self) -> Result<Vec<u16>> {
        let mut ports = self.map.keys().collect::<Result<Vec<_>, _>>()?;
        ports.sort_unstable();
        Ok(ports)
    }
}

/// A SOCKMAP or SOCKHASH keyed by u32 (the seed's `echo_socket`).
pub struct SocketMap {
    data: MapData,
    value_size: u32,
    is_sockmap: bool,
}

impl SocketMap {
    pub fn open(path: &Path) -> Result<Self> {
        let (data, info) = open_pinned(path, "socket map")?;
        if !matches!(info.map_type(), Ok(MapType::SockMap | MapType::SockHash)) {
            bail!(
                "{} is a {} map, not a socket map; pass a BPF_MAP_TYPE_SOCKMAP or SOCKHASH pin (such as .../echo_socket)",
                path.display(),
                type_name(&info)
            );
        }
        if info.key_size() != 4 {
            bail!("{} has {}-byte keys; only u32 keys are supported", path.display(), info.key_size());
        }
        Ok(Self { data, value_size: info.value_size(), is_sockmap: matches!(info.map_type(), Ok(MapType::SockMap)) })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.data.fd().as_fd()
    }

    /// Puts `socket` at `key`, replacing whatever was there.
    pub fn insert(&self, key: u32, socket: BorrowedFd<'_>) -> Result<()> {
        use std::os::fd::AsRawFd;
        let fd = socket.as_raw_fd();
        // The kernel reads a u32 or u64 fd depending on the map's value size.
        let value = if self.value_size == 8 { (fd as u64).to_ne_bytes().to_vec() } else { (fd as u32).to_ne_bytes().to_vec() };
        sys::map_update(self.fd(), &key.to_ne_bytes(), &value).map_err(|e| match e.raw_os_error() {
            Some(libc::E2BIG) => anyhow::anyhow!("key {key} is out of the socket map's range"),
            Some(libc::EOPNOTSUPP) => anyhow::anyhow!("the kernel refused the socket for a socket map (it must be a listening TCP or a bound UDP socket)"),
            _ => anyhow::Error::new(e).context(format!("inserting into the socket map at key {key}")),
        })
    }

    /// Cookie of the socket at `key`, if any (needs 8-byte values).
    pub fn cookie(&self, key: u32) -> Result<Option<u64>> {
        if self.value_size != 8 {
            return Ok(None);
        }
        let mut value = [0u8; 8];
        Ok(sys::map_lookup(self.fd(), &key.to_ne_bytes(), &mut value)
            .context("looking up the socket map")?
            .map(|()| u64::from_ne_bytes(value)))
    }

    /// Removes the socket at `key`; false when there was none.
    pub fn remove(&self, key: u32) -> Result<bool> {
        match sys::map_delete(self.fd(), &key.to_ne_bytes()) {
            // A SOCKMAP answers EINVAL, not ENOENT, for an empty slot.
            Err(e) if self.is_sockmap && e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
            other => other.context("removing from the socket map"),
        }
    }
}
