//! Running a loaded sk_lookup program on a made-up lookup
//! (`BPF_PROG_TEST_RUN`): what the program would answer, and how long it takes.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd, BorrowedFd},
};

use steer_common::{
    SkLookupCtx,
    kernel::{AF_INET, AF_INET6},
};

use super::sys;
use crate::model::Protocol;

const BPF_PROG_TEST_RUN: libc::c_long = 10;

/// The context of a lookup from `remote` to `local`. Both must be of one
/// family.
pub fn lookup_ctx(protocol: Protocol, local: SocketAddr, remote: SocketAddr) -> SkLookupCtx {
    let words = |addr: IpAddr| -> (u32, [u32; 4]) {
        match addr {
            IpAddr::V4(a) => (u32::from_ne_bytes(a.octets()), [0; 4]),
            IpAddr::V6(a) => {
                let o = a.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                (0, [word(0), word(4), word(8), word(12)])
            }
        }
    };
    let ((local_ip4, local_ip6), (remote_ip4, remote_ip6)) = (words(local.ip()), words(remote.ip()));
    SkLookupCtx {
        family: if local.is_ipv4() { AF_INET } else { AF_INET6 },
        protocol: u32::from(protocol.number()),
        remote_ip4,
        remote_ip6,
        remote_port: remote.port().to_be(),
        local_ip4,
        local_ip6,
        local_port: u32::from(local.port()),
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TestRun {
    /// SK_PASS or SK_DROP.
    pub retval: u32,
    /// Mean ns per run, as the kernel measured it.
    pub duration_ns: u32,
    /// Cookie of the socket the program assigned, 0 if none.
    pub cookie: u64,
}

/// Runs `prog` `repeat` times on `ctx` in the kernel.
pub fn run(prog: BorrowedFd<'_>, ctx: &SkLookupCtx, repeat: u32) -> io::Result<TestRun> {
    #[repr(C)]
    #[derive(Default)]
    struct TestAttr {
        prog_fd: u32,
        retval: u32,
        data_size_in: u32,
        data_size_out: u32,
        data_in: u64,
        data_out: u64,
        repeat: u32,
        duration: u32,
        ctx_size_in: u32,
        ctx_size_out: u32,
        ctx_in: u64,
        ctx_out: u64,
        flags: u32,
        cpu: u32,
        batch_size: u32,
        _pad: u32,
    }
    let mut out = SkLookupCtx::default();
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        repeat,
        ctx_size_in: size_of::<SkLookupCtx>() as u32,
        ctx_size_out: size_of::<SkLookupCtx>() as u32,
        ctx_in: std::ptr::from_ref(ctx) as u64,
        ctx_out: (&raw mut out) as u64,
        ..Default::default()
    };
    // Safety: attr is the test-run part of bpf_attr; ctx_out is as large as ctx_size_out says.
    unsafe { sys::bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(TestRun { retval: attr.retval, duration_ns: attr.duration, cookie: out.cookie })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contexts_carry_addresses_in_network_order_and_the_local_port_in_host_order() {
        let ctx = lookup_ctx(Protocol::Udp, "10.1.2.3:53".parse().unwrap(), "192.0.2.9:40000".parse().unwrap());
        assert_eq!((ctx.family, ctx.protocol, ctx.local_port), (AF_INET, 17, 53));
        assert_eq!(ctx.local_ip4.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(u16::from_be(ctx.remote_port), 40000);
        let v6 = lookup_ctx(Protocol::Tcp, "[2001:db8::1]:443".parse().unwrap(), "[::1]:1".parse().unwrap());
        assert_eq!(v6.local_ip6[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
        assert_eq!(v6.local_ip6[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!((v6.local_ip4, v6.ingress_ifindex, v6._tail_pad), (0, 0, 0));
    }
}
