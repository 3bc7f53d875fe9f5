//! Connection and request rates: native port vs steered port, on loopback.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

const TIMEOUT: Duration = Duration::from_secs(5);

/// How the client reaches a server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// Server bound to the port, no sk_lookup program attached.
    Native,
    /// Same, with the program attached and bindings loaded that do not
    /// apply to it: an unrelated service on the host.
    Unrelated,
    /// Nothing bound to the port; the program assigns the server's socket.
    Steered,
}

impl Variant {
    const ALL: [Variant; 3] = [Variant::Native, Variant::Unrelated, Variant::Steered];

    pub fn attached(self) -> bool {
        self != Variant::Native
    }
}

/// One kind of request, with a server for each way of reaching it.
pub trait Workload {
    fn name(&self) -> &'static str;
    /// Runs `n` requests against `variant`'s address.
    fn run(&mut self, variant: Variant, n: usize) -> Result<()>;
    /// This workload's protocol and the socket steered connections go to.
    fn target(&self) -> (steer::model::Protocol, std::os::fd::BorrowedFd<'_>);
}

#[derive(Debug, Clone, Serialize)]
pub struct RateRow {
    pub test: String,
    pub native_ops_per_s: f64,
    pub unrelated_ops_per_s: f64,
    pub steered_ops_per_s: f64,
    /// Median of per-round steered/native ratios (rounds pair adjacent runs).
    pub steered_over_native: f64,
    pub unrelated_over_native: f64,
    pub rounds: usize,
    pub ops_per_round: usize,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Runs `rounds` rounds of every variant, rotating their order each round so
/// that none always runs first or last, and reports the medians.
pub fn measure(
    work: &mut dyn Workload,
    set_attached: &mut dyn FnMut(bool) -> Result<()>,
    rounds: usize,
    n: usize,
) -> Result<RateRow> {
    // Warm caches, the accept path and the JIT before anything counts.
    for variant in Variant::ALL {
        set_attached(variant.attached())?;
        work.run(variant, (n / 4).max(1)).with_context(|| format!("{} {variant:?} warm-up", work.name()))?;
    }
    let mut rates: [Vec<f64>; 3] = Default::default();
    for round in 0..rounds {
        for i in 0..3 {
            let idx = (i + round) % 3;
            let variant = Variant::ALL[idx];
            set_attached(variant.attached())?;
            let start = Instant::now();
            work.run(variant, n).with_context(|| format!("{} {variant:?} round {round}", work.name()))?;
            rates[idx].push(n as f64 / start.elapsed().as_secs_f64());
        }
    }
    let ratio = |idx: usize| median(rates[idx].iter().zip(&rates[0]).map(|(v, native)| v / native).collect());
    Ok(RateRow {
        test: work.name().to_string(),
        native_ops_per_s: median(rates[0].clone()),
        unrelated_ops_per_s: median(rates[1].clone()),
        steered_ops_per_s: median(rates[2].clone()),
        steered_over_native: ratio(2),
        unrelated_over_native: ratio(1),
        rounds,
        ops_per_round: n,
    })
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// TCP: connect, 1-byte echo, close; one connection at a time.
pub struct TcpWorkload {
    native: SocketAddr,
    steered: SocketAddr,
    target: TcpListener,
}

impl TcpWorkload {
    /// Listeners on `native_port` and `target_port`; `steered_port` stays unbound.
    pub fn start(native_port: u16, target_port: u16, steered_port: u16) -> Result<Self> {
        let native = TcpListener::bind(loopback(native_port)).context("binding the native TCP listener")?;
        let target = TcpListener::bind(loopback(target_port)).context("binding the steered-to TCP listener")?;
        for listener in [native, target.try_clone()?] {
            std::thread::spawn(move || tcp_server(listener));
        }
        Ok(Self { native: loopback(native_port), steered: loopback(steered_port), target })
    }

    /// The steered-to listener.
    pub fn listener(&self) -> &TcpListener {
        &self.target
    }
}

fn tcp_server(listener: TcpListener) {
    while let Ok((mut conn, _)) = listener.accept() {
        let _ = conn.set_read_timeout(Some(TIMEOUT));
        let mut byte = [0u8; 1];
        if conn.read_exact(&mut byte).is_ok() && conn.write_all(&byte).is_ok() {
            // Wait for the client's FIN: the client closes first, so
            // TIME_WAIT stays on its side, where connect() reuses it cleanly.
            let _ = conn.read(&mut byte);
        }
    }
}

impl Workload for TcpWorkload {
    fn name(&self) -> &'static str {
        "tcp connect+echo+close"
    }

    fn run(&mut self, variant: Variant, n: usize) -> Result<()> {
        let addr = if variant == Variant::Steered { self.steered } else { self.native };
        for _ in 0..n {
            let mut conn = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
            conn.set_read_timeout(Some(TIMEOUT))?;
            conn.write_all(b"x")?;
            let mut byte = [0u8; 1];
            conn.read_exact(&mut byte).with_context(|| format!("reading the echo from {addr}"))?;
        }
        Ok(())
    }

    fn target(&self) -> (steer::model::Protocol, std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsFd;
        (steer::model::Protocol::Tcp, self.target.as_fd())
    }
}

/// UDP: one datagram out, one back, one outstanding at a time.
///
/// The client socket is unconnected and takes the reply from any source: a
/// steered server replies from its own bound port (IP_PKTINFO could fix the
/// source address, not the port). Both variants use the same client code.
pub struct UdpWorkload {
    native: SocketAddr,
    steered: SocketAddr,
    target: UdpSocket,
    client: UdpSocket,
}

impl UdpWorkload {
    pub fn start(native_port: u16, target_port: u16, steered_port: u16) -> Result<Self> {
        let native = UdpSocket::bind(loopback(native_port)).context("binding the native UDP socket")?;
        let target = UdpSocket::bind(loopback(target_port)).context("binding the steered-to UDP socket")?;
        for socket in [native, target.try_clone()?] {
            std::thread::spawn(move || udp_server(socket));
        }
        let client = UdpSocket::bind(loopback(0))?;
        client.set_read_timeout(Some(TIMEOUT))?;
        Ok(Self { native: loopback(native_port), steered: loopback(steered_port), target, client })
    }
}

fn udp_server(socket: UdpSocket) {
    let mut buf = [0u8; 64];
    while let Ok((len, peer)) = socket.recv_from(&mut buf) {
        let _ = socket.send_to(&buf[..len], peer);
    }
}

impl Workload for UdpWorkload {
    fn name(&self) -> &'static str {
        "udp request/reply"
    }

    fn run(&mut self, variant: Variant, n: usize) -> Result<()> {
        let addr = if variant == Variant::Steered { self.steered } else { self.native };
        let mut buf = [0u8; 64];
        for i in 0..n {
            let tag = (i as u32).to_ne_bytes();
            self.client.send_to(&tag, addr).with_context(|| format!("sending to {addr}"))?;
            let len = self.client.recv(&mut buf).with_context(|| format!("waiting for the reply from {addr}"))?;
            if buf[..len] != tag {
                bail!("reply from {addr} does not match the request");
            }
        }
        Ok(())
    }

    fn target(&self) -> (steer::model::Protocol, std::os::fd::BorrowedFd<'_>) {
        use std::os::fd::AsFd;
        (steer::model::Protocol::Udp, self.target.as_fd())
    }
}
