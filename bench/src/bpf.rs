//! Test-run contexts for the benchmark; running them is the library's.

use std::net::{Ipv4Addr, SocketAddr};

use steer::socket::Protocol;
pub use steer::{
    common::{SkLookupCtx, kernel::SK_PASS},
    test_run::{TestRun, run as test_run},
};

/// A 127.0.0.1:40000 -> 127.0.0.1:`port` lookup.
pub fn loopback_v4(protocol: Protocol, port: u16) -> SkLookupCtx {
    steer::test_run::lookup_ctx(
        protocol,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)),
    )
}

/// Opens a pinned object (program) by path.
pub fn obj_get(path: &std::path::Path) -> std::io::Result<std::os::fd::OwnedFd> {
    steer::sys::obj_get(path)
}
