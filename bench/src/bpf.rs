//! BPF_PROG_TEST_RUN for sk_lookup programs; the rest comes from steer::sys.

use std::{
    io,
    mem::size_of,
    net::Ipv4Addr,
    os::fd::{AsRawFd, BorrowedFd},
};

const BPF_PROG_TEST_RUN: libc::c_long = 10;

pub const SK_PASS: u32 = 1;

pub use steer::sys::{bpf, obj_get};

/// The kernel's `struct bpf_sk_lookup` (72 bytes): the test-run context.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SkLookupCtx {
    /// `sk` on input (must be zero); the assigned socket's cookie on output.
    pub cookie: u64,
    pub family: u32,
    pub protocol: u32,
    pub remote_ip4: u32,
    pub remote_ip6: [u32; 4],
    /// Network byte order, unlike `local_port`.
    pub remote_port: u16,
    _remote_port_pad: u16,
    pub local_ip4: u32,
    pub local_ip6: [u32; 4],
    pub local_port: u32,
    /// These two must stay zero: the kernel rejects anything set past
    /// `local_port`, and implicit padding could hold garbage.
    ingress_ifindex: u32,
    _tail_pad: u32,
}

const _: () = assert!(size_of::<SkLookupCtx>() == 72);

impl SkLookupCtx {
    /// A 127.0.0.1 -> 127.0.0.1:`port` lookup.
    pub fn loopback_v4(protocol: i32, port: u16) -> Self {
        let lo = u32::from_ne_bytes(Ipv4Addr::LOCALHOST.octets());
        SkLookupCtx {
            family: libc::AF_INET as u32,
            protocol: protocol as u32,
            remote_ip4: lo,
            remote_port: 40000u16.to_be(),
            local_ip4: lo,
            local_port: u32::from(port),
            ..Default::default()
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct TestRun {
    pub retval: u32,
    /// Mean ns per run, as the kernel measured it.
    pub duration_ns: u32,
    /// Cookie of the socket the program assigned, 0 if none.
    pub cookie: u64,
}

/// Runs `prog` `repeat` times on `ctx` in the kernel (BPF_PROG_TEST_RUN).
pub fn test_run(prog: BorrowedFd<'_>, ctx: &SkLookupCtx, repeat: u32) -> io::Result<TestRun> {
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
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }?;
    Ok(TestRun { retval: attr.retval, duration_ns: attr.duration, cookie: out.cookie })
}
