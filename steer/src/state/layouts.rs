//! Every state layout steer has had, defined once: its number (what
//! `steer_meta.layout_version` holds), a name, one line saying what changed,
//! and the shape of each map it pins. The current layout's maps are
//! steer-common's [`MAPS`]; older ones are frozen here, as their steer made
//! them, so `upgrade` can open an old state's maps checked against the
//! shapes they really have, and tell which maps changed shape (those need a
//! converter, see `ops::upgrade`) from those it copies as they are.
//!
//! A change of a map's shape or meaning is a new layout: add its entry to
//! [`HISTORY`] (the old maps' specs under the old number) and bump
//! `LAYOUT_VERSION`. docs/layouts.md says the same for operators.

use steer_common::{
    InnerSpec, LAYOUT_VERSION, MAPS, MapSpec,
    kernel::{
        BPF_F_MMAPABLE, BPF_F_NO_PREALLOC, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_ARRAY_OF_MAPS, BPF_MAP_TYPE_HASH,
        BPF_MAP_TYPE_PERCPU_ARRAY, BPF_MAP_TYPE_RINGBUF, BPF_MAP_TYPE_SOCKMAP,
    },
    map,
};

use super::Layout;
use crate::{
    error::{Result, fail},
    kernel::maps::{open_any, raw_value},
};

/// One layout version.
#[derive(Debug)]
pub struct LayoutVersion {
    pub version: u32,
    /// A short name for messages and docs.
    pub name: &'static str,
    /// What changed from the layout before, in one line.
    pub summary: &'static str,
    /// The commit that introduced it.
    pub since: &'static str,
    /// Every map it pins, as its steer made them.
    pub maps: &'static [MapSpec],
}

impl LayoutVersion {
    pub fn map(&self, name: &str) -> Option<&'static MapSpec> {
        self.maps.iter().find(|m| m.name == name)
    }

    /// "layout 3 (dir-slots)".
    pub fn describe(&self) -> String {
        format!("layout {} ({})", self.version, self.name)
    }
}

const fn spec(name: &'static str, map_type: u32, key_size: u32, value_size: u32, max_entries: u32) -> MapSpec {
    MapSpec { name, map_type, key_size, value_size, max_entries, flags: 0, inner: None }
}

const fn with_flags(spec: MapSpec, flags: u32) -> MapSpec {
    MapSpec { flags, ..spec }
}

const fn chunks(spec: MapSpec, value_size: u32) -> MapSpec {
    let inner = InnerSpec { map_type: BPF_MAP_TYPE_ARRAY, value_size, max_entries: 2048, flags: BPF_F_MMAPABLE };
    MapSpec { inner: Some(inner), ..spec }
}

/// The maps of layouts 2 and 3 but `steer_meta` (whose value grew), in
/// their steer's order. Layout 2 states made before b5a017f have no
/// `socket_flags`, and before 2a5b8a7 their records were made with room for
/// 1,048,576 bindings rather than grown from 1,024: neither changes a shape
/// `upgrade` checks (a missing map starts empty; a record keeps its size).
macro_rules! layout_2_3_maps {
    ($meta_size:expr) => {
        &[
            spec(map::ECHO_PORTS, BPF_MAP_TYPE_HASH, 2, 1, 1024),
            spec(map::ECHO_SOCKET, BPF_MAP_TYPE_SOCKMAP, 4, 8, 1),
            spec(map::STEER_CONFIG, BPF_MAP_TYPE_ARRAY, 4, 8, 1),
            chunks(spec(map::STEER_DIRS, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2 * 192), 16),
            chunks(spec(map::STEER_RANGES, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2 * 1536), 24),
            // One socket per slot: key = label x 4 + family x 2 + protocol.
            spec(map::SOCKETS, BPF_MAP_TYPE_SOCKMAP, 4, 8, 16384),
            spec(map::SOCKET_FLAGS, BPF_MAP_TYPE_ARRAY, 4, 4, 16384),
            spec(map::METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 48, 8192),
            spec(map::SEED_METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 24, 1),
            with_flags(spec(map::BINDINGS_0, BPF_MAP_TYPE_HASH, 20, 4, 1024), BPF_F_NO_PREALLOC),
            with_flags(spec(map::BINDINGS_1, BPF_MAP_TYPE_HASH, 20, 4, 1024), BPF_F_NO_PREALLOC),
            spec(map::LABELS, BPF_MAP_TYPE_HASH, 64, 4, 4096),
            spec(map::DESTINATIONS, BPF_MAP_TYPE_HASH, 8, 4, 8192),
            spec(map::STEER_META, BPF_MAP_TYPE_ARRAY, 4, $meta_size, 1),
        ]
    };
}

const LAYOUT_2_MAPS: &[MapSpec] = layout_2_3_maps!(64);
const LAYOUT_3_MAPS: &[MapSpec] = layout_2_3_maps!(112);

/// Layout 4's maps, as 62813e6's steer (and every one up to the trace
/// flag's) made them: each slot's eight members, and the follow maps.
const LAYOUT_4_MAPS: &[MapSpec] = &[
    spec(map::ECHO_PORTS, BPF_MAP_TYPE_HASH, 2, 1, 1024),
    spec(map::ECHO_SOCKET, BPF_MAP_TYPE_SOCKMAP, 4, 8, 1),
    spec(map::STEER_CONFIG, BPF_MAP_TYPE_ARRAY, 4, 8, 1),
    chunks(spec(map::STEER_DIRS, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2 * 192), 16),
    chunks(spec(map::STEER_RANGES, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2 * 1536), 24),
    // Eight members per slot: key = slot x 8 + member.
    spec(map::SOCKETS, BPF_MAP_TYPE_SOCKMAP, 4, 8, 16384 * 8),
    spec(map::SOCKET_FLAGS, BPF_MAP_TYPE_ARRAY, 4, 4, 16384),
    spec(map::METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 48, 8192),
    spec(map::SEED_METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 24, 1),
    with_flags(spec(map::BINDINGS_0, BPF_MAP_TYPE_HASH, 20, 4, 1024), BPF_F_NO_PREALLOC),
    with_flags(spec(map::BINDINGS_1, BPF_MAP_TYPE_HASH, 20, 4, 1024), BPF_F_NO_PREALLOC),
    spec(map::LABELS, BPF_MAP_TYPE_HASH, 64, 4, 4096),
    spec(map::DESTINATIONS, BPF_MAP_TYPE_HASH, 8, 4, 8192),
    spec(map::STEER_META, BPF_MAP_TYPE_ARRAY, 4, 112, 1),
    spec(map::FOLLOWS, BPF_MAP_TYPE_HASH, 20, 32, 4096),
    spec(map::BACKFILL, BPF_MAP_TYPE_HASH, 8, 16, 1024),
    spec(map::FOLLOW_METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 48, 1),
    spec(map::FOLLOW_EVENTS, BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16),
    spec(map::FOLLOW_SCOPES, BPF_MAP_TYPE_ARRAY, 4, 128, 64),
];

/// Layout 5's maps, as 23c922e's steer (and every one up to incremental
/// writes) made them: layout 4's and the tracer maps.
const LAYOUT_5_MAPS: &[MapSpec] = &[
    spec(map::ECHO_PORTS, BPF_MAP_TYPE_HASH, 2, 1, 1024),
    spec(map::ECHO_SOCKET, BPF_MAP_TYPE_SOCKMAP, 4, 8, 1),
    spec(map::STEER_CONFIG, BPF_MAP_TYPE_ARRAY, 4, 8, 1),
    chunks(spec(map::STEER_DIRS, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2 * 192), 16),
    chunks(spec(map::STEER_RANGES, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 2 * 1536), 24),
    spec(map::SOCKETS, BPF_MAP_TYPE_SOCKMAP, 4, 8, 16384 * 8),
    spec(map::SOCKET_FLAGS, BPF_MAP_TYPE_ARRAY, 4, 4, 16384),
    spec(map::METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 48, 8192),
    spec(map::SEED_METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 24, 1),
    with_flags(spec(map::BINDINGS_0, BPF_MAP_TYPE_HASH, 20, 4, 1024), BPF_F_NO_PREALLOC),
    with_flags(spec(map::BINDINGS_1, BPF_MAP_TYPE_HASH, 20, 4, 1024), BPF_F_NO_PREALLOC),
    spec(map::LABELS, BPF_MAP_TYPE_HASH, 64, 4, 4096),
    spec(map::DESTINATIONS, BPF_MAP_TYPE_HASH, 8, 4, 8192),
    spec(map::STEER_META, BPF_MAP_TYPE_ARRAY, 4, 112, 1),
    spec(map::FOLLOWS, BPF_MAP_TYPE_HASH, 20, 32, 4096),
    spec(map::BACKFILL, BPF_MAP_TYPE_HASH, 8, 16, 1024),
    spec(map::FOLLOW_METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 48, 1),
    spec(map::FOLLOW_EVENTS, BPF_MAP_TYPE_RINGBUF, 0, 0, 1 << 16),
    spec(map::FOLLOW_SCOPES, BPF_MAP_TYPE_ARRAY, 4, 128, 64),
    spec(map::TRACE_TRACERS, BPF_MAP_TYPE_SOCKMAP, 4, 8, 8),
    spec(map::TRACE_FILTERS, BPF_MAP_TYPE_ARRAY, 4, 96, 8),
    MapSpec {
        inner: Some(InnerSpec { map_type: BPF_MAP_TYPE_RINGBUF, value_size: 0, max_entries: 1 << 18, flags: 0 }),
        ..spec(map::TRACE_RINGS, BPF_MAP_TYPE_ARRAY_OF_MAPS, 4, 4, 8)
    },
    spec(map::TRACE_METRICS, BPF_MAP_TYPE_PERCPU_ARRAY, 4, 32, 9),
];

/// The layouts `upgrade` knows, oldest first; the last is this build's.
pub static HISTORY: &[LayoutVersion] = &[
    LayoutVersion {
        version: 2,
        name: "ranges",
        summary: "bindings recorded in bindings_0/1 and compiled into address ranges that lookups read through \
                  two halves of chunk maps; labels, counter sets and steer_meta (the first layout it names)",
        since: "2f7d437",
        maps: LAYOUT_2_MAPS,
    },
    LayoutVersion {
        version: 3,
        name: "dir-slots",
        summary: "steer_meta records which directory chunk slots each half fills (it grew from 64 to 112 bytes), \
                  so a write touches only those",
        since: "f599083",
        maps: LAYOUT_3_MAPS,
    },
    LayoutVersion {
        version: 4,
        name: "slot-members",
        summary: "sockets holds 8 members per slot (key slot x 8 + member); the maps of servers the kernel \
                  follows (follows, backfill, follow_metrics, follow_events, follow_scopes) and their links",
        since: "62813e6",
        maps: LAYOUT_4_MAPS,
    },
    LayoutVersion {
        version: 5,
        name: "trace",
        summary: "steer_config's trace byte (lookups look for tracers), and the maps of live tracers: \
                  trace_tracers, trace_filters, trace_rings, trace_metrics",
        since: "23c922e",
        maps: LAYOUT_5_MAPS,
    },
    LayoutVersion {
        version: 6,
        name: "incremental",
        summary: "writes change only what a binding touches: steer_meta counts bindings and keeps the range \
                  arena's top (it grew to 136 bytes), both halves share the range chunks and write their own \
                  directory chunks in place, dest_bindings counts each counter set's bindings, and each record \
                  set is an open-addressed table in an mmapable array (hash maps before)",
        since: "9e25b27",
        maps: MAPS,
    },
];

/// The oldest layout `upgrade` migrates.
pub const OLDEST: u32 = 2;

const _: () = assert!(HISTORY[HISTORY.len() - 1].version == LAYOUT_VERSION);

/// The layout numbered `version`, if this build knows it.
pub fn find(version: u32) -> Option<&'static LayoutVersion> {
    HISTORY.iter().find(|l| l.version == version)
}

/// This build's layout.
pub fn current() -> &'static LayoutVersion {
    &HISTORY[HISTORY.len() - 1]
}

/// "layout 3 (dir-slots)", or "layout 9" for one this build does not know.
pub fn describe(version: u32) -> String {
    find(version).map_or_else(|| format!("layout {version}"), LayoutVersion::describe)
}

/// The fields every layout's `steer_meta` starts with, at the same offsets
/// (layout 2's value is 64 bytes, later ones longer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetaPrefix {
    pub layout_version: u32,
    pub active_record: u32,
    pub record_version: u64,
    pub plane_version: u64,
    pub netns_cookie: u64,
    pub netns_inode: u64,
    pub program_tag: u64,
    pub object_hash: u64,
}

impl MetaPrefix {
    fn parse(bytes: &[u8]) -> Option<Self> {
        let u32_at = |at: usize| Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?));
        let u64_at = |at: usize| Some(u64::from_ne_bytes(bytes.get(at..at + 8)?.try_into().ok()?));
        Some(Self {
            layout_version: u32_at(0)?,
            active_record: u32_at(4)?,
            record_version: u64_at(8)?,
            plane_version: u64_at(16)?,
            netns_cookie: u64_at(24)?,
            netns_inode: u64_at(32)?,
            program_tag: u64_at(40)?,
            object_hash: u64_at(48)?,
        })
    }
}

/// What a state directory holds, by its `steer_meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// A state that names its layout.
    Tagged(MetaPrefix),
    /// A state from before layouts were named (before 2f7d437): pins, but
    /// no `steer_meta`.
    Untagged,
    /// Nothing steer made (an empty directory).
    Empty,
}

/// Reads which layout the state at `layout` has, whatever it is.
pub fn detect(layout: &Layout) -> Result<Found> {
    let meta = layout.map(map::STEER_META);
    if !meta.exists() {
        let any = std::fs::read_dir(&layout.dir)?.flatten().next().is_some();
        return Ok(if any { Found::Untagged } else { Found::Empty });
    }
    let (data, _) = open_any(&meta, "steer_meta map")?;
    let value = raw_value(&data, 0)?.unwrap_or_default();
    match MetaPrefix::parse(&value) {
        Some(prefix) => Ok(Found::Tagged(prefix)),
        None => fail!(Pin, "{} holds {} bytes, too few for any layout's steer_meta", meta.display(), value.len()),
    }
}

/// Fails, naming both versions, when the state was made by a newer steer
/// than this one (a downgrade): nothing of it may be read or changed.
pub fn refuse_newer(layout: &Layout) -> Result<()> {
    if let Ok(Found::Tagged(meta)) = detect(layout) {
        if meta.layout_version > LAYOUT_VERSION {
            fail!(
                Conflict,
                "{} has layout {}, made by a newer steer than this steerctl, which knows layouts {OLDEST} to {}: use \
                 the newer steerctl (a downgrade cannot read or change it; nothing was changed), or `steerctl \
                 unload` with that one and load with this one",
                layout.dir.display(),
                meta.layout_version,
                current().describe()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_numbered_in_order_with_distinct_names() {
        for pair in HISTORY.windows(2) {
            assert_eq!(pair[0].version + 1, pair[1].version);
            assert_ne!(pair[0].name, pair[1].name);
        }
        assert_eq!(HISTORY[0].version, OLDEST);
        // The newest frozen list is what this build's steer-common makes.
        assert_eq!(current().maps, MAPS);
    }

    #[test]
    fn old_layouts_differ_where_the_history_says() {
        let (l3, l4) = (find(3).unwrap(), find(4).unwrap());
        // Layout 4: eight members per slot, and the follow maps.
        assert_eq!(l3.map(map::SOCKETS).unwrap().max_entries * 8, l4.map(map::SOCKETS).unwrap().max_entries);
        for m in l3.maps.iter().filter(|m| m.name != map::SOCKETS) {
            assert_eq!(Some(m), l4.map(m.name), "{} changed shape from layout 3 to 4", m.name);
        }
        assert!(l3.map(map::FOLLOWS).is_none());
        // Layout 5: the tracer maps, nothing else changed shape.
        let l5 = find(5).unwrap();
        for m in l4.maps {
            assert_eq!(Some(m), l5.map(m.name), "{} changed shape from layout 4 to 5", m.name);
        }
        assert!(l4.map(map::TRACE_RINGS).is_none() && l5.map(map::TRACE_RINGS).is_some());
        // Layout 6: steer_meta grew, the records became tables and
        // dest_bindings came; the rest kept its shape.
        let l6 = find(6).unwrap();
        let changed = [map::STEER_META, map::BINDINGS_0, map::BINDINGS_1];
        for m in l5.maps.iter().filter(|m| !changed.contains(&m.name)) {
            assert_eq!(Some(m), l6.map(m.name), "{} changed shape from layout 5 to 6", m.name);
        }
        assert!(l5.map(map::DEST_BINDINGS).is_none() && l6.map(map::DEST_BINDINGS).is_some());
        // Layout 3: steer_meta grew.
        let meta = |l: &LayoutVersion| l.map(map::STEER_META).unwrap().value_size;
        assert_eq!((meta(find(2).unwrap()), meta(l3), meta(l5)), (64, 112, 112));
        assert_eq!(meta(l6), size_of::<steer_common::StateMeta>() as u32);
    }

    #[test]
    fn the_meta_prefix_is_read_from_any_layouts_value() {
        let meta = steer_common::StateMeta {
            layout_version: 3,
            active_record: 1,
            record_version: 7,
            plane_version: 6,
            netns_cookie: 11,
            netns_inode: 12,
            program_tag: 13,
            object_hash: 14,
            ..Default::default()
        };
        let bytes = bytemuck::bytes_of(&meta);
        let prefix = MetaPrefix::parse(&bytes[..64]).unwrap();
        assert_eq!((prefix.layout_version, prefix.active_record, prefix.record_version), (3, 1, 7));
        assert_eq!((prefix.netns_cookie, prefix.netns_inode, prefix.object_hash), (11, 12, 14));
        assert_eq!(MetaPrefix::parse(bytes), Some(prefix));
        assert!(MetaPrefix::parse(&bytes[..40]).is_none());
    }
}
