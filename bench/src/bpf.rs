//! Test-run contexts for the benchmark; running them is the library's.

use std::net::{Ipv4Addr, SocketAddr};

use steer::model::Protocol;
pub use steer::{
    common::{SkLookupCtx, kernel::SK_PASS},
    kernel::test_run::{TestRun, run as test_run},
};

/// A 127.0.0.1:40000 -> 127.0.0.1:`port` lookup.
pub fn loopback_v4(protocol: Protocol, port: u16) -> SkLookupCtx {
    steer::kernel::test_run::lookup_ctx(
        protocol,
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 40000)),
    )
}

/// Opens a pinned program by path.
pub fn obj_get(path: &std::path::Path) -> steer::Result<std::os::fd::OwnedFd> {
    steer::kernel::links::open_program(path)
}
