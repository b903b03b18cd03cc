//! Helpers shared by the integration tests: running a scenario once per engine inside a fresh
//! network namespace, guest configurations, guest-side send/receive loops with deadlines,
//! host-side sockets (UDP with a large receive buffer, UDP_SEGMENT, an AF_PACKET injector with
//! a vnet header) and counter waits.
//!
//! Every wait has a deadline and every assertion names the engine (and the configuration) it
//! failed for. Nothing here asserts on timing.

#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod peer;
pub mod raw;
pub mod vhost;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

pub use tapir_datapath::{Counters, EngineKind};
pub use tapir_simguest::features as feat;
pub use tapir_simguest::{GuestConfig, RxDriver, RxPacket, TxDriver, VirtioNetHdr};
pub use tapir_testkit::frames::{self, FlowSpec, VnetHdr};
pub use tapir_testkit::netns;
pub use tapir_testkit::{Rig, RigConfig, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};

/// Both engines, in the order every scenario runs them.
pub const ENGINES: [EngineKind; 2] = [EngineKind::Uring, EngineKind::Classic];

/// Generous deadline for anything that should happen "soon".
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Checksum offloads both ways (what the simulated guest acks by default besides
/// MRG_RXBUF and EVENT_IDX).
pub const CSUM: u64 = feat::VIRTIO_NET_F_CSUM | feat::VIRTIO_NET_F_GUEST_CSUM;
/// MRG_RXBUF.
pub const MRG: u64 = feat::VIRTIO_NET_F_MRG_RXBUF;
/// EVENT_IDX.
pub const EVIDX: u64 = feat::VIRTIO_RING_F_EVENT_IDX;

/// The four combinations of MRG_RXBUF and EVENT_IDX on top of the checksum offloads, named.
pub fn ring_feature_matrix() -> Vec<(&'static str, u64)> {
    vec![
        ("mrg+evidx", CSUM | MRG | EVIDX),
        ("mrg", CSUM | MRG),
        ("evidx", CSUM | EVIDX),
        ("plain", CSUM),
    ]
}

/// A guest with `pairs` queue pairs and exactly `features` (plus VERSION_1), other settings
/// default.
pub fn guest(pairs: u16, features: u64) -> GuestConfig {
    GuestConfig {
        queue_pairs: pairs,
        features: features | feat::VIRTIO_F_VERSION_1,
        ..GuestConfig::default()
    }
}

/// A rig configuration for `engine` and this guest.
pub fn rig_config(engine: EngineKind, guest: GuestConfig) -> RigConfig {
    let mut cfg = RigConfig::new(engine, guest.queue_pairs);
    cfg.guest = guest;
    cfg
}

/// Starts a rig (inside the current namespace), panicking with context on failure.
pub fn start(engine: EngineKind, guest: GuestConfig, ctx: &str) -> Rig {
    Rig::start(&rig_config(engine, guest)).unwrap_or_else(|e| panic!("{ctx}: Rig::start: {e}"))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic".to_owned()
    }
}

/// Runs `f` on a new thread inside a fresh network namespace; a panic is re-raised here with
/// `label` in front, so every failure names its engine and configuration.
pub fn in_netns<T: Send>(label: &str, f: impl FnOnce() -> T + Send) -> T {
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| netns::run_in_new_netns_scoped(f)));
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("[{label}] could not create a network namespace: {e}"),
        Err(p) => panic!("[{label}] {}", panic_message(p.as_ref())),
    }
}

/// The engines to run: both, unless `TAPIR_TEST_ENGINE` names one (for debugging a failure).
pub fn engines() -> Vec<EngineKind> {
    match std::env::var("TAPIR_TEST_ENGINE") {
        Ok(e) if !e.is_empty() => vec![e.parse().expect("TAPIR_TEST_ENGINE: uring or classic")],
        _ => ENGINES.to_vec(),
    }
}

/// Runs `f(engine)` once per engine, each in its own namespace.
pub fn for_each_engine(mut f: impl FnMut(EngineKind) + Send) {
    for engine in engines() {
        in_netns(&format!("engine {engine}"), || f(engine));
    }
}

/// Runs `f(engine, name, config)` for every engine and every named configuration, each in its
/// own namespace (a rig's TAP name is fixed, so one rig per namespace).
pub fn for_each_engine_and<C: Clone + Send + Sync>(
    configs: &[(&str, C)],
    mut f: impl FnMut(EngineKind, &str, C) + Send,
) {
    for engine in engines() {
        for (name, c) in configs {
            let label = format!("engine {engine}, {name}");
            in_netns(&label, || f(engine, name, c.clone()));
        }
    }
}

/// Polls `cond` every millisecond until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits until the device's counters of pair `pair` satisfy `cond`; returns the last snapshot
/// and whether the condition held.
pub fn wait_counters(
    rig: &Rig,
    pair: usize,
    timeout: Duration,
    mut cond: impl FnMut(&Counters) -> bool,
) -> (Counters, bool) {
    let mut last = Counters::default();
    let ok = wait_until(timeout, || {
        last = rig.device().counters()[pair];
        cond(&last)
    });
    (last, ok)
}

/// Sum of the counters of every pair.
pub fn total_counters(rig: &Rig) -> Counters {
    let mut t = Counters::default();
    for c in rig.device().counters() {
        t.add(&c);
    }
    t
}

// ---- guest side -------------------------------------------------------------------------

/// Pushes one frame, reclaiming (and flushing what is pending) while the TX ring is full.
/// Does not flush the frame itself.
pub fn tx_push(tx: &mut TxDriver, hdr: &VirtioNetHdr, frame: &[u8], ctx: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if tx
            .push(hdr, frame)
            .unwrap_or_else(|e| panic!("{ctx}: TX push: {e}"))
        {
            return;
        }
        tx.flush();
        if tx.reclaim() == 0 {
            assert!(
                Instant::now() < deadline,
                "{ctx}: TX ring stayed full for {TIMEOUT:?} (device not completing TX chains; \
                 {} in flight)",
                tx.in_flight()
            );
            tx.wait(Duration::from_millis(5))
                .unwrap_or_else(|e| panic!("{ctx}: TX wait: {e}"));
        }
    }
}

/// Pushes and flushes one frame (kicking if the device asks).
pub fn tx_send(tx: &mut TxDriver, hdr: &VirtioNetHdr, frame: &[u8], ctx: &str) {
    tx_push(tx, hdr, frame, ctx);
    tx.flush();
}

/// Flushes and waits until every TX chain the driver has in flight is completed.
pub fn tx_drain(tx: &mut TxDriver, ctx: &str) {
    tx.flush();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        tx.reclaim();
        if tx.in_flight() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: {} TX chains not completed after {TIMEOUT:?}",
            tx.in_flight()
        );
        tx.wait(Duration::from_millis(5))
            .unwrap_or_else(|e| panic!("{ctx}: TX wait: {e}"));
    }
}

/// Refills and polls one RX queue until a packet arrives or `timeout` passes.
pub fn rx_recv(rx: &mut RxDriver, timeout: Duration, ctx: &str) -> Option<RxPacket> {
    let deadline = Instant::now() + timeout;
    loop {
        rx.refill();
        if let Some(p) = rx
            .poll()
            .unwrap_or_else(|e| panic!("{ctx}: RX poll reported a device bug: {e}"))
        {
            return Some(p);
        }
        if Instant::now() >= deadline {
            return None;
        }
        rx.wait(Duration::from_millis(5))
            .unwrap_or_else(|e| panic!("{ctx}: RX wait: {e}"));
    }
}

/// Refills and polls all RX queues, handing every packet to `f(pair, packet)`, until `f`
/// returns true (done) or `timeout` passes. Returns whether `f` said done.
pub fn rx_poll_all(
    rxs: &mut [RxDriver],
    timeout: Duration,
    ctx: &str,
    mut f: impl FnMut(usize, RxPacket) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let mut got = 0;
        for (i, rx) in rxs.iter_mut().enumerate() {
            rx.refill();
            while let Some(p) = rx
                .poll()
                .unwrap_or_else(|e| panic!("{ctx}: RX poll on pair {i}: device bug: {e}"))
            {
                got += 1;
                if f(i, p) {
                    rx.refill();
                    return true;
                }
                rx.refill();
            }
        }
        if Instant::now() >= deadline {
            return false;
        }
        if got == 0 {
            if rxs.len() == 1 {
                rxs[0]
                    .wait(Duration::from_millis(5))
                    .unwrap_or_else(|e| panic!("{ctx}: RX wait: {e}"));
            } else {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

/// Packets that arrive on the queues within `quiet`, e.g. to assert that nothing arrives.
pub fn rx_drain_for(rxs: &mut [RxDriver], quiet: Duration, ctx: &str) -> Vec<(usize, RxPacket)> {
    let mut got = Vec::new();
    rx_poll_all(rxs, quiet, ctx, |i, p| {
        got.push((i, p));
        false
    });
    got
}

// ---- frames -----------------------------------------------------------------------------

/// A UDP flow from the guest to the host.
pub fn g2h(rig: &Rig, src_port: u16, dst_port: u16) -> FlowSpec {
    rig.guest_to_host(src_port, dst_port)
}

/// Builds a guest-to-host UDP frame of `len` bytes (full checksums).
pub fn udp_frame(flow: &FlowSpec, len: usize, flow_id: u32, seq: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len.max(frames::MIN_UDP_FRAME)];
    let n = frames::build_udp(&mut buf, flow, len, flow_id, seq).expect("build_udp");
    buf.truncate(n);
    buf
}

/// Converts the testkit's (the datapath's) vnet header into the simulated guest's.
pub fn to_guest_hdr(v: &VnetHdr) -> VirtioNetHdr {
    VirtioNetHdr {
        flags: v.flags,
        gso_type: v.gso_type,
        hdr_len: v.hdr_len,
        gso_size: v.gso_size,
        csum_start: v.csum_start,
        csum_offset: v.csum_offset,
        num_buffers: v.num_buffers,
    }
}

/// A deterministic frame length in `[min, max]` for `seq`.
pub fn vary_len(seq: u64, min: usize, max: usize) -> usize {
    let span = u64::try_from(max - min + 1).expect("span");
    min + usize::try_from(seq.wrapping_mul(2_654_435_761) % span).expect("len")
}

/// A payload of `len` bytes in the frames module's verifiable pattern.
pub fn payload(len: usize, flow: u32, seq: u64) -> Vec<u8> {
    let mut p = vec![0u8; len];
    frames::write_payload(&mut p, flow, seq);
    p
}

// ---- host side --------------------------------------------------------------------------

fn setsockopt_int(fd: i32, level: i32, name: i32, val: i32) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<i32>()).expect("socklen");
    // SAFETY: `val` lives for the call and `len` is its size.
    let rc = unsafe { libc::setsockopt(fd, level, name, std::ptr::from_ref(&val).cast(), len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A host UDP socket bound to `ip:port` with an 8 MiB receive buffer (SO_RCVBUFFORCE, so the
/// kernel drops nothing for lack of socket memory) and a short read timeout.
pub fn host_udp(ip: Ipv4Addr, port: u16) -> UdpSocket {
    let s = UdpSocket::bind(SocketAddrV4::new(ip, port))
        .unwrap_or_else(|e| panic!("bind {ip}:{port}: {e}"));
    setsockopt_int(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_RCVBUFFORCE,
        8 << 20,
    )
    .expect("SO_RCVBUFFORCE");
    setsockopt_int(
        s.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_SNDBUFFORCE,
        8 << 20,
    )
    .expect("SO_SNDBUFFORCE");
    s.set_read_timeout(Some(Duration::from_millis(50)))
        .expect("SO_RCVTIMEO");
    s
}

/// Receives one datagram, waiting up to `timeout`.
pub fn host_recv(sock: &UdpSocket, buf: &mut [u8], timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        match sock.recv_from(buf) {
            Ok((n, _)) => return Some(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return None;
                }
            }
            Err(e) => panic!("host recv: {e}"),
        }
    }
}

/// `SOL_UDP`.
pub const SOL_UDP: i32 = 17;
/// `UDP_SEGMENT` (Linux 4.18+): the socket sends one GSO datagram of `gso_size` segments.
pub const UDP_SEGMENT: i32 = 103;

/// Turns on UDP_SEGMENT with `gso_size` on a UDP socket.
pub fn set_udp_segment(sock: &UdpSocket, gso_size: u16) -> io::Result<()> {
    setsockopt_int(sock.as_raw_fd(), SOL_UDP, UDP_SEGMENT, i32::from(gso_size))
}

/// An AF_PACKET socket on an interface with `PACKET_VNET_HDR` (the 10-byte
/// `virtio_net_hdr`): frames sent through it may carry GSO metadata, so the host can hand a
/// TSO super-frame to the TAP.
pub struct PacketInjector {
    fd: OwnedFd,
}

impl PacketInjector {
    /// Opens and binds the socket to `ifname`.
    pub fn new(ifname: &str) -> io::Result<PacketInjector> {
        let proto = i32::from(u16::try_from(libc::ETH_P_ALL).expect("ETH_P_ALL").to_be());
        // SAFETY: plain socket(2); the fd is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)?;
        let index = netns::iface_index(ifname).map_err(io::Error::other)?;
        // SAFETY: an all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).expect("AF_PACKET");
        sll.sll_protocol = u16::try_from(proto).expect("proto");
        sll.sll_ifindex = i32::try_from(index).expect("ifindex");
        let len =
            libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).expect("socklen");
        // SAFETY: `sll` is a valid sockaddr_ll of `len` bytes.
        let rc = unsafe { libc::bind(raw, std::ptr::from_ref(&sll).cast(), len) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(PacketInjector { fd })
    }

    /// Sends `frame` with the first 10 bytes of `vnet` as its `virtio_net_hdr`.
    pub fn send(&self, vnet: &VnetHdr, frame: &[u8]) -> io::Result<()> {
        let hdr = vnet.to_bytes();
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: 10,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths; the kernel only
        // reads them.
        let rc = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = usize::try_from(rc).expect("writev result");
        if n != 10 + frame.len() {
            return Err(io::Error::other(format!(
                "short AF_PACKET write: {n} of {}",
                10 + frame.len()
            )));
        }
        Ok(())
    }
}

/// Reads `len` bytes at `offset` of a file descriptor (the guest's memfd).
pub fn pread(fd: i32, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let off = libc::off_t::try_from(offset).expect("offset");
    // SAFETY: `buf` is valid for `len` bytes.
    let rc = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), len, off) };
    assert_eq!(
        usize::try_from(rc).ok(),
        Some(len),
        "pread of the guest memfd: {}",
        io::Error::last_os_error()
    );
    buf
}

/// A packet socket bound to interface `ifname` that receives its frames of `ethertype`
/// (`ETH_P_ALL` for every frame), each read waiting at most `timeout`.
pub fn packet_socket(ifname: &str, ethertype: u16, timeout: Duration) -> std::fs::File {
    use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("AF_PACKET socket");
    let index = nix::net::if_::if_nametoindex(ifname).expect("if_nametoindex");
    let ll = libc::sockaddr_ll {
        sll_family: u16::try_from(libc::AF_PACKET).unwrap(),
        sll_protocol: ethertype.to_be(),
        sll_ifindex: i32::try_from(index).unwrap(),
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 0,
        sll_addr: [0; 8],
    };
    // SAFETY: binding a packet socket we own to a sockaddr_ll of the right size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&ll as *const libc::sockaddr_ll).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap(),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: setting a receive timeout on our socket with a valid timeval.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            u32::try_from(std::mem::size_of::<libc::timeval>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
    std::fs::File::from(fd)
}
