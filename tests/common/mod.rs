//! Helpers shared by the integration tests: running a scenario once per engine inside a fresh
//! network namespace, guest configurations, guest-side send/receive loops with deadlines,
//! panicking forms of the testkit's host-side sockets, and counter waits.
//!
//! Every wait has a deadline and every assertion names the engine (and the configuration) it
//! failed for. Nothing here asserts on timing.

#![allow(dead_code, unused_imports)]

pub mod daemon;
pub mod matrix;
pub mod peer;
pub mod raw;

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

pub use matrix::{
    for_each_cell, for_each_cell_and, for_each_cell_of, Cell, Matrix, Offloads, Ring, EVIDX_ON_OFF,
    EVIDX_RINGS, MRG_RINGS, NO_EVIDX_RINGS, NO_MRG_RINGS, RINGS,
};
pub use tapir_datapath::{Counters, EngineKind};
pub use tapir_simguest::features as feat;
pub use tapir_simguest::{GuestConfig, RxDriver, RxPacket, TxDriver, VirtioNetHdr};
pub use tapir_testkit::frames::{self, FlowSpec, VnetHdr};
pub use tapir_testkit::host_sockets::{self, set_udp_segment, PacketInjector, UDP_SEGMENT};
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

/// Starts a rig for `cell` with this busy-poll budget ([`EngineConfig::busy_poll`]).
pub fn start_busy_polling(cell: Cell, busy_poll: Option<Duration>, ctx: &str) -> Rig {
    let mut cfg = rig_config(cell.engine, cell.guest());
    cfg.engine_config = tapir_datapath::EngineConfig {
        busy_poll,
        ..tapir_datapath::EngineConfig::default()
    };
    Rig::start(&cfg).unwrap_or_else(|e| panic!("{ctx}: Rig::start: {e}"))
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

// ---- host side (the sockets are the testkit's, `tapir_testkit::host_sockets`) -----------

/// [`host_sockets::udp`]: a host UDP socket bound to `ip:port` with 8 MiB buffers and a short
/// read timeout; panics with the address on failure.
pub fn host_udp(ip: Ipv4Addr, port: u16) -> UdpSocket {
    host_sockets::udp(ip, port).unwrap_or_else(|e| panic!("host UDP socket {ip}:{port}: {e}"))
}

/// Receives one datagram, waiting up to `timeout` ([`host_sockets::udp_recv`]).
pub fn host_recv(sock: &UdpSocket, buf: &mut [u8], timeout: Duration) -> Option<usize> {
    host_sockets::udp_recv(sock, buf, timeout).unwrap_or_else(|e| panic!("host recv: {e}"))
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
/// (`ETH_P_ALL` for every frame), each read waiting at most `timeout`
/// ([`host_sockets::packet_listener`]).
pub fn packet_socket(ifname: &str, ethertype: u16, timeout: Duration) -> std::fs::File {
    host_sockets::packet_listener(ifname, ethertype, timeout)
        .unwrap_or_else(|e| panic!("AF_PACKET socket on {ifname}: {e}"))
}

// ---- a guest's first frames ---------------------------------------------------------------

/// A simulated guest with one queue pair, other settings default.
pub fn one_pair_guest() -> tapir_simguest::SimGuest {
    tapir_simguest::SimGuest::new(GuestConfig {
        queue_pairs: 1,
        ..GuestConfig::default()
    })
    .expect("SimGuest::new")
}

/// The guest's ARP request for the host's MAC (an Ethernet frame).
pub fn arp_request() -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let n = frames::build_arp(
        &mut buf,
        frames::ArpOp::Request,
        GUEST_MAC,
        GUEST_IP,
        [0; 6],
        HOST_IP,
    )
    .expect("build_arp");
    buf.truncate(n);
    buf
}

/// The guest asks the host for its MAC (ARP through TX) and gets the answer (through RX),
/// on queue pair 0.
pub fn arp_round_trip(guest: &mut tapir_simguest::SimGuest, ctx: &str) {
    let (mut rx, mut tx) = guest.take_pair(0);
    arp_round_trip_on(&mut rx, &mut tx, ctx);
}

/// [`arp_round_trip`] on a pair the caller took.
pub fn arp_round_trip_on(rx: &mut RxDriver, tx: &mut TxDriver, ctx: &str) {
    let request = arp_request();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        tx_send(tx, &VirtioNetHdr::default(), &request, ctx);
        tx_drain(tx, ctx);
        if let Some(p) = rx_recv(rx, Duration::from_millis(500), ctx) {
            if let Some(a) = frames::parse_arp(&p.data) {
                if a.op == frames::ArpOp::Reply && a.sender_ip == HOST_IP {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "{ctx}: no ARP reply");
    }
}
