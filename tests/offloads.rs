//! Offloads through tapir: host-side GSO (UDP_SEGMENT, an injected TSO frame) reaching the
//! guest as one large frame with a correct virtio-net header, MRG_RXBUF reassembly over small
//! buffers, big buffers split over several descriptors, oversize frames dropped and counted
//! (never truncated), and guest TX with partial checksums and TSO accepted by the host stack.
//!
//! Every scenario runs over its part of the feature matrix (`common::matrix`: both engines,
//! the rings and offloads it names, one queue pair), with the guest's buffer or chain layout
//! as its own case, each cell in its own network namespace.

mod common;

use std::time::Duration;

use common::*;
use tapir_datapath::offload;
use tapir_datapath::Tap;
use tapir_testkit::capability;

/// Byte position of the first difference, for readable failures on 64 KiB frames.
fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// The TAP offloads tapir will get for `features` on this kernel (probed on a scratch TAP in
/// the current namespace, as `Device::start` does).
fn probe_offloads(features: u64) -> u32 {
    let tap = Tap::open("tprobe0", 1).expect("probe TAP");
    let flags = tap.queues()[0]
        .set_offload_from_features(features | feat::VIRTIO_F_VERSION_1)
        .expect("TUNSETOFFLOAD");
    drop(tap);
    flags
}

/// How the guest posts RX buffers, a scenario's own case: `size` bytes per chain over `descs`
/// descriptors, in queues of `queue` entries. Whether MRG_RXBUF merges them is the cell's.
#[derive(Clone, Copy, Debug)]
struct Layout {
    size: u32,
    descs: u16,
    queue: u16,
}

impl Layout {
    /// `size` bytes over `descs` descriptors; 64-entry queues for big chains (fewer, bigger
    /// buffers), 256 otherwise.
    const fn new(size: u32, descs: u16) -> Layout {
        Layout {
            size,
            descs,
            queue: if size > 4096 { 64 } else { 256 },
        }
    }

    /// This layout in queues of `queue` entries.
    const fn queue(self, queue: u16) -> Layout {
        Layout { queue, ..self }
    }

    /// The cell's guest posting these buffers.
    fn guest(self, cell: &Cell) -> GuestConfig {
        GuestConfig {
            queue_size: self.queue,
            rx_buffer_size: self.size,
            rx_descs_per_chain: self.descs,
            ..cell.guest()
        }
    }

    /// The buffers a frame of `frame_len` bytes takes: as many as it needs with MRG_RXBUF,
    /// else its one chain.
    fn buffers(self, cell: &Cell, frame_len: usize) -> u16 {
        if cell.mrg() {
            u16::try_from((frame_len + 12).div_ceil(usize::try_from(self.size).unwrap())).unwrap()
        } else {
            1
        }
    }
}

/// One 65562-byte chain: what a guest without MRG_RXBUF posts for 64 KiB frames.
const BIG: Layout = Layout::new(65562, 1);

/// Runs `f(cell, name, layout)` over `matrix` on every ring: the rings with MRG_RXBUF once per
/// `merged` layout, the others once per `whole` layout (without MRG_RXBUF a frame must fit one
/// chain, so their layouts are big ones).
fn for_each_ring_and_layout(
    matrix: Matrix,
    merged: &[(&str, Layout)],
    whole: &[(&str, Layout)],
    mut f: impl FnMut(Cell, &str, Layout) + Send,
) {
    for_each_cell_and(matrix.rings(&MRG_RINGS), merged, &mut f);
    for_each_cell_and(matrix.rings(&NO_MRG_RINGS), whole, &mut f);
}

// ---- 3a. UDP_SEGMENT from the host --------------------------------------------------------

const GSO_SIZE: u16 = 1400;
const USO_SEGMENTS: usize = 42;

#[test]
fn host_udp_gso_reaches_the_guest_as_one_frame() {
    // Where one 64 KiB frame lands: every ring (small buffers merged with MRG_RXBUF, one big
    // chain without), with USO acked.
    let merged = [("1024-byte buffers", Layout::new(1024, 1))];
    let whole = [("big buffers", BIG)];
    let uso = Matrix::LINUX.offloads(&[Offloads::Uso]);
    for_each_ring_and_layout(uso, &merged, &whole, udp_gso);
}

#[test]
fn host_udp_gso_with_uso4_only_is_segmented_on_the_host() {
    // The fallback is the TAP's offloads, not the ring's: what Linux acks of the ring.
    let uso4 = Matrix::LINUX.offloads(&[Offloads::Uso4Only]);
    let layouts = [("2048-byte buffers", Layout::new(2048, 1))];
    for_each_cell_and(uso4, &layouts, udp_gso);
}

/// Sends one UDP_SEGMENT write of [`USO_SEGMENTS`] segments from the host and checks what the
/// guest gets: one USO frame where the TAP takes USO, the datagrams segmented otherwise.
fn udp_gso(cell: Cell, name: &str, layout: Layout) {
    let ctx = format!("{} {name}", cell.name());
    let features = cell.features();
    // The one outcome right for this kernel: USO on the TAP (one GSO frame) exactly when
    // the kernel takes it and the guest acked both USO4 and USO6 (the kernel takes them
    // together or not at all); segmented datagrams otherwise. In CI the kernel must.
    let kernel_uso =
        capability::tap_uso("tcapuso0").expect("USO probe") == capability::Presence::Present;
    let both = feat::VIRTIO_NET_F_GUEST_USO4 | feat::VIRTIO_NET_F_GUEST_USO6;
    let uso_on = kernel_uso && features & both == both;
    assert_eq!(
        probe_offloads(features) & offload::USO4 != 0,
        uso_on,
        "{ctx}: tapir's TAP offloads for features {features:#x} (kernel USO: {kernel_uso})"
    );
    let mut rig = start(cell.engine, layout.guest(&cell), &ctx);
    let (mut rx, _tx) = rig.take(0);
    rx.refill();
    let sock = host_udp(HOST_IP, 9200);
    set_udp_segment(&sock, GSO_SIZE).expect("UDP_SEGMENT");
    let total = usize::from(GSO_SIZE) * USO_SEGMENTS;
    let data = payload(total, 3, 77);
    let sent = sock
        .send_to(&data, (GUEST_IP, 7000))
        .unwrap_or_else(|e| panic!("{ctx}: UDP_SEGMENT send: {e}"));
    assert_eq!(sent, total, "{ctx}: short GSO send");
    let mut got = Vec::new();
    let mut frames_seen = Vec::new();
    let ok = rx_poll_all(std::slice::from_mut(&mut rx), TIMEOUT, &ctx, |_, p| {
        let u = frames::parse_udp(&p.data)
            .unwrap_or_else(|| panic!("{ctx}: not a UDP frame: {:?}", p.hdr));
        assert_eq!((u.src_port, u.dst_port), (9200, 7000), "{ctx}: ports");
        got.extend_from_slice(u.payload);
        frames_seen.push((p.hdr, p.buffers, p.data.len()));
        got.len() >= total
    });
    assert!(
        ok,
        "{ctx}: guest got {} of {total} bytes in {} frames; counters {:?}",
        got.len(),
        frames_seen.len(),
        rig.device().counters()
    );
    assert_eq!(got.len(), total, "{ctx}: payload bytes");
    if let Some(at) = first_diff(&got, &data) {
        panic!("{ctx}: payload differs at byte {at}");
    }
    if uso_on {
        assert_eq!(
            frames_seen.len(),
            1,
            "{ctx}: expected one USO frame: {frames_seen:?}"
        );
        let (hdr, buffers, len) = frames_seen[0];
        assert_eq!(
            hdr.gso_type,
            tapir_simguest::VIRTIO_NET_HDR_GSO_UDP_L4,
            "{ctx}: {hdr:?}"
        );
        assert_eq!(hdr.gso_size, GSO_SIZE, "{ctx}: gso_size {hdr:?}");
        assert_ne!(
            hdr.flags & tapir_simguest::VIRTIO_NET_HDR_F_NEEDS_CSUM,
            0,
            "{ctx}: NEEDS_CSUM {hdr:?}"
        );
        assert_eq!(
            usize::from(hdr.csum_start),
            frames::L4_OFF,
            "{ctx}: csum_start"
        );
        assert_eq!(hdr.csum_offset, 6, "{ctx}: csum_offset");
        assert_eq!(len, frames::UDP_PAYLOAD_OFF + total, "{ctx}: frame length");
        assert_eq!(buffers, layout.buffers(&cell, len), "{ctx}: num_buffers");
    } else {
        // Segmented on the host: every segment is a datagram of gso_size bytes.
        assert_eq!(
            frames_seen.len(),
            USO_SEGMENTS,
            "{ctx}: segments {frames_seen:?}"
        );
        for (hdr, _, len) in &frames_seen {
            assert_eq!(
                hdr.gso_type, 0,
                "{ctx}: GSO frame although USO is off: {hdr:?}"
            );
            assert_eq!(*len, frames::UDP_PAYLOAD_OFF + usize::from(GSO_SIZE));
        }
    }
    let c = rig.device().counters()[0];
    assert_eq!(c.rx_dropped_oversize, 0, "{ctx}: {c:?}");
    rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
}

// ---- 3b / 4. A TSO frame injected on the host side ----------------------------------------

/// Injects one TSO frame of `frame_len` bytes (GSO TCPV4, gso_size 1448) towards the guest and
/// checks that it arrives as one frame, byte for byte, with the right header.
fn inject_tso(rig: &mut Rig, rx: &mut RxDriver, frame_len: usize, ctx: &str) -> RxPacket {
    let flow = FlowSpec {
        src_mac: rig.host_mac,
        dst_mac: GUEST_MAC,
        src_ip: HOST_IP,
        dst_ip: GUEST_IP,
        src_port: 9300,
        dst_port: 7000,
    };
    let mut frame = vec![0u8; frame_len];
    let p = frames::build_tcp_tso(&mut frame, &flow, frame_len, 1448, 1000, 4, 5).unwrap();
    assert_eq!(p.len, frame_len);
    assert_eq!(p.vnet.gso_type, frames::VIRTIO_NET_HDR_GSO_TCPV4);
    let inj = PacketInjector::new(TAP_NAME).expect("AF_PACKET socket");
    inj.send(&p.vnet, &frame)
        .unwrap_or_else(|e| panic!("{ctx}: AF_PACKET send of the TSO frame: {e}"));
    let deadline = std::time::Instant::now() + TIMEOUT;
    let pkt = loop {
        if let Some(p) = rx_recv(rx, Duration::from_millis(20), ctx) {
            break p;
        }
        let c = rig.device().counters()[0];
        assert!(
            c.rx_dropped_no_buffers == 0 && c.rx_dropped_oversize == 0,
            "{ctx}: the TSO frame was dropped: {c:?}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{ctx}: TSO frame not delivered; counters {c:?}, tap {:?}",
            netns::iface_stats(TAP_NAME)
        );
    };
    assert_eq!(
        pkt.data.len(),
        frame_len,
        "{ctx}: frame length (header {:?})",
        pkt.hdr
    );
    if let Some(at) = first_diff(&pkt.data, &frame) {
        panic!("{ctx}: TSO frame differs at byte {at}");
    }
    assert_eq!(
        pkt.hdr.gso_type,
        frames::VIRTIO_NET_HDR_GSO_TCPV4,
        "{ctx}: {:?}",
        pkt.hdr
    );
    assert_eq!(pkt.hdr.gso_size, 1448, "{ctx}: gso_size {:?}", pkt.hdr);
    assert_ne!(
        pkt.hdr.flags & frames::VIRTIO_NET_HDR_F_NEEDS_CSUM,
        0,
        "{ctx}: {:?}",
        pkt.hdr
    );
    assert_eq!(
        usize::from(pkt.hdr.csum_start),
        frames::L4_OFF,
        "{ctx}: csum_start"
    );
    assert_eq!(pkt.hdr.csum_offset, 16, "{ctx}: csum_offset");
    assert_eq!(
        usize::try_from(pkt.used_len).unwrap(),
        frame_len + 12,
        "{ctx}: sum of used lengths"
    );
    pkt
}

#[test]
fn host_tso_frame_reaches_the_guest_as_one_frame() {
    // Where one 60 KB frame lands: every ring (small buffers merged with MRG_RXBUF, one big
    // chain without), with TSO acked.
    let merged = [("2048-byte buffers", Layout::new(2048, 1))];
    let whole = [("big buffers", BIG)];
    let tso = Matrix::LINUX.offloads(&[Offloads::Tso]);
    for_each_ring_and_layout(tso, &merged, &whole, |cell, name, layout| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, layout.guest(&cell), &ctx);
        let (mut rx, _tx) = rig.take(0);
        rx.refill();
        let pkt = inject_tso(&mut rig, &mut rx, 60_000, &ctx);
        assert_eq!(pkt.buffers, layout.buffers(&cell, 60_000), "{ctx}: buffers");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

#[test]
fn mrg_rxbuf_reassembles_a_64k_frame_over_small_buffers() {
    // Every ring: small buffers (one or two descriptors a chain) merged with MRG_RXBUF; without
    // it one 65562-byte chain per frame, split over 4 descriptors that are not contiguous in
    // guest memory.
    let merged = [
        ("1024-byte buffers", Layout::new(1024, 1)),
        (
            "1500-byte buffers 2 descs per chain queue 512",
            Layout::new(1500, 2).queue(512),
        ),
    ];
    let whole = [("big buffers 4 descs per chain", Layout::new(65562, 4))];
    let tso = Matrix::LINUX.offloads(&[Offloads::Tso]);
    for_each_ring_and_layout(tso, &merged, &whole, |cell, name, layout| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, layout.guest(&cell), &ctx);
        let (mut rx, _tx) = rig.take(0);
        rx.refill();
        // Twice, so that the second frame lands in recycled (re-walked) buffers.
        for round in 0..2 {
            let pkt = inject_tso(
                &mut rig,
                &mut rx,
                frames::MAX_GSO_FRAME,
                &format!("{ctx} round {round}"),
            );
            let want = layout.buffers(&cell, frames::MAX_GSO_FRAME);
            assert_eq!(pkt.buffers, want, "{ctx}: num_buffers");
            if cell.mrg() {
                assert!(
                    pkt.buffers > 1,
                    "{ctx}: a 64 KiB frame in one small buffer?"
                );
                assert_eq!(
                    pkt.hdr.num_buffers, pkt.buffers,
                    "{ctx}: header num_buffers"
                );
            }
        }
        // A small frame right after still uses exactly one buffer.
        let hs = host_udp(HOST_IP, 9100);
        hs.send_to(&payload(100, 1, 1), (GUEST_IP, 7000)).unwrap();
        let p = rx_recv(&mut rx, TIMEOUT, &ctx).expect("small datagram after the big frames");
        assert_eq!(p.buffers, 1, "{ctx}: small frame buffers");
        frames::verify_payload(frames::parse_udp(&p.data).unwrap().payload).unwrap();
        let c = rig.device().counters()[0];
        assert_eq!(c.rx_dropped_oversize, 0, "{ctx}: {c:?}");
        assert_eq!(c.rx_malformed, 0, "{ctx}: {c:?}");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

/// The guest posts plenty of buffer space for a 64 KiB frame, but in few chains: 124 chains of
/// 1500 bytes (186 KB) or 56 chains of 2048 bytes (114 KB). The frame must be delivered;
/// buffers parked in idle reads must not make the device drop it for "no buffers".
#[test]
fn mrg_rxbuf_64k_frame_with_few_chains_posted() {
    let layouts = [
        ("1500-byte buffers 2 descs per chain", Layout::new(1500, 2)),
        ("2048-byte buffers queue 64", Layout::new(2048, 1).queue(64)),
    ];
    // Few chains is MRG_RXBUF's case (the frame is spread over them); EVENT_IDX as Linux acks.
    let tso = Matrix::LINUX.offloads(&[Offloads::Tso]);
    for_each_cell_and(tso, &layouts, |cell, name, layout| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, layout.guest(&cell), &ctx);
        let (mut rx, _tx) = rig.take(0);
        rx.refill();
        let pkt = inject_tso(&mut rig, &mut rx, frames::MAX_GSO_FRAME, &ctx);
        let want = layout.buffers(&cell, frames::MAX_GSO_FRAME);
        assert_eq!(pkt.buffers, want, "{ctx}: num_buffers");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

// ---- 4. Oversize frames are dropped and counted, never truncated --------------------------

#[test]
fn oversize_frames_are_dropped_and_counted_never_truncated() {
    let layouts = [
        ("512-byte buffers", Layout::new(512, 1)),
        ("512-byte buffers 2 descs", Layout::new(512, 2)),
    ];
    // Without MRG_RXBUF (with it the frame is merged), EVENT_IDX as Linux acks (a dropped
    // frame takes no chain, so it notifies nothing); checksum offloads as Linux acks (they
    // change no frame's size).
    let matrix = Matrix::LINUX.rings(&[Ring::Evidx]);
    for_each_cell_and(matrix, &layouts, |cell, name, layout| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, layout.guest(&cell), &ctx);
        let (mut rx, _tx) = rig.take(0);
        rx.refill();
        let hs = host_udp(HOST_IP, 9100);
        for round in 1..=3u64 {
            hs.send_to(&payload(1400, 1, round), (GUEST_IP, 7000))
                .unwrap();
            let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.rx_dropped_oversize >= round);
            assert!(ok, "{ctx}: oversize frame {round} not counted: {c:?}");
            let leaked = rx_drain_for(
                std::slice::from_mut(&mut rx),
                Duration::from_millis(50),
                &ctx,
            );
            assert!(
                leaked.is_empty(),
                "{ctx}: a frame larger than the buffers was delivered: {:?}",
                leaked
                    .iter()
                    .map(|(_, p)| (p.hdr, p.data.len()))
                    .collect::<Vec<_>>()
            );
            // A datagram that fits still arrives, intact.
            hs.send_to(&payload(100, 1, 1000 + round), (GUEST_IP, 7000))
                .unwrap();
            let p = rx_recv(&mut rx, TIMEOUT, &ctx)
                .unwrap_or_else(|| panic!("{ctx}: small datagram after drop {round} lost"));
            let u = frames::parse_udp(&p.data).expect("UDP");
            assert_eq!(
                frames::verify_payload(u.payload).unwrap(),
                (1, 1000 + round)
            );
            assert_eq!(
                p.data.len(),
                frames::UDP_PAYLOAD_OFF + 100,
                "{ctx}: small frame"
            );
        }
        // Counters are published once per worker loop: wait for the last delivery to show.
        let (c, _) = wait_counters(&rig, 0, TIMEOUT, |c| c.rx_packets >= 3);
        assert_eq!(c.rx_dropped_oversize, 3, "{ctx}: {c:?}");
        assert_eq!(c.rx_packets, 3, "{ctx}: {c:?}");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

/// A guest that takes TSO frames but (against the spec) posts small buffers without
/// MRG_RXBUF: a 60 KB frame must be dropped and counted, not truncated.
#[test]
fn oversize_gso_frame_is_dropped_for_a_guest_with_small_buffers() {
    // The rings without MRG_RXBUF, by definition, with TSO acked.
    let matrix = Matrix::LINUX
        .rings(&NO_MRG_RINGS)
        .offloads(&[Offloads::Tso]);
    let layouts = [("2048-byte buffers", Layout::new(2048, 1))];
    for_each_cell_and(matrix, &layouts, |cell, name, layout| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, layout.guest(&cell), &ctx);
        let (mut rx, _tx) = rig.take(0);
        rx.refill();
        let flow = FlowSpec {
            src_mac: rig.host_mac,
            dst_mac: GUEST_MAC,
            src_ip: HOST_IP,
            dst_ip: GUEST_IP,
            src_port: 9300,
            dst_port: 7000,
        };
        let mut frame = vec![0u8; 60_000];
        let p = frames::build_tcp_tso(&mut frame, &flow, 60_000, 1448, 1, 4, 5).unwrap();
        PacketInjector::new(TAP_NAME)
            .unwrap()
            .send(&p.vnet, &frame)
            .unwrap();
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.rx_dropped_oversize >= 1);
        assert!(ok, "{ctx}: oversize GSO frame not counted: {c:?}");
        let leaked = rx_drain_for(
            std::slice::from_mut(&mut rx),
            Duration::from_millis(50),
            &ctx,
        );
        assert!(leaked.is_empty(), "{ctx}: truncated GSO frame delivered");
        let hs = host_udp(HOST_IP, 9100);
        hs.send_to(&payload(1000, 1, 9), (GUEST_IP, 7000)).unwrap();
        let p = rx_recv(&mut rx, TIMEOUT, &ctx).expect("datagram after the drop");
        frames::verify_payload(frames::parse_udp(&p.data).unwrap().payload).unwrap();
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

// ---- 3c. Guest TX with partial checksums and TSO ------------------------------------------

/// How the guest lays out a TX chain, a scenario's own case.
#[derive(Clone, Copy, Debug)]
enum TxChain {
    /// Header and frame in one descriptor.
    Contiguous,
    /// The header in a descriptor of its own.
    SplitHeader,
    /// The header in a descriptor of its own, the chain in an indirect table
    /// (INDIRECT_DESC acked).
    IndirectSplitHeader,
}

impl TxChain {
    /// The cell's guest sending such chains.
    fn guest(self, cell: &Cell) -> GuestConfig {
        let g = cell.guest();
        match self {
            TxChain::Contiguous => g,
            TxChain::SplitHeader => GuestConfig {
                tx_split_header: true,
                ..g
            },
            TxChain::IndirectSplitHeader => GuestConfig {
                tx_split_header: true,
                features: g.features | feat::VIRTIO_RING_F_INDIRECT_DESC,
                ..g
            },
        }
    }
}

#[test]
fn guest_partial_checksum_frames_are_accepted_by_the_host() {
    let chains = [
        ("one descriptor", TxChain::Contiguous),
        ("split header", TxChain::SplitHeader),
    ];
    // TX: EVENT_IDX on and off (completions notify), MRG_RXBUF is RX's; checksums acked.
    let matrix = Matrix::LINUX.rings(&EVIDX_ON_OFF);
    for_each_cell_and(matrix, &chains, |cell, name, chain| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, chain.guest(&cell), &ctx);
        let (_rx, mut tx) = rig.take(0);
        let sock = host_udp(HOST_IP, 9000);
        let flow = rig.guest_to_host(5000, 9000);
        let mut buf = vec![0u8; 2048];
        let mut rbuf = vec![0u8; 2048];
        for seq in 0..200u64 {
            let len = vary_len(seq, 60, 1514);
            let p = frames::build_udp_partial_csum(&mut buf, &flow, len, 6, seq).unwrap();
            assert!(
                !frames::l4_checksum_ok(&buf[..p.len]),
                "the checksum must be partial"
            );
            tx_send(&mut tx, &to_guest_hdr(&p.vnet), &buf[..p.len], &ctx);
            let n = host_recv(&sock, &mut rbuf, TIMEOUT).unwrap_or_else(|| {
                panic!(
                    "{ctx}: NEEDS_CSUM datagram {seq} not accepted by the host (counters {:?})",
                    rig.device().counters()
                )
            });
            assert_eq!(
                frames::verify_payload(&rbuf[..n]).unwrap(),
                (6, seq),
                "{ctx}"
            );
            assert_eq!(n, len - frames::UDP_PAYLOAD_OFF, "{ctx}: length");
            tx.reclaim();
        }
        tx_drain(&mut tx, &ctx);
        let (c, _) = wait_counters(&rig, 0, TIMEOUT, |c| c.tx_packets >= 200);
        assert_eq!(c.tx_errors, 0, "{ctx}: {c:?}");
        assert_eq!(c.tx_packets, 200, "{ctx}: {c:?}");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

#[test]
fn guest_tso_frame_is_accepted_by_the_host() {
    let chains = [
        ("one descriptor", TxChain::Contiguous),
        ("indirect split header", TxChain::IndirectSplitHeader),
    ];
    // TX: EVENT_IDX on and off (completions notify), MRG_RXBUF is RX's; TSO acked.
    let matrix = Matrix::LINUX
        .rings(&EVIDX_ON_OFF)
        .offloads(&[Offloads::Tso]);
    for_each_cell_and(matrix, &chains, |cell, name, chain| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, chain.guest(&cell), &ctx);
        let (mut rx, mut tx) = rig.take(0);
        rx.refill();
        let flow = FlowSpec {
            src_mac: GUEST_MAC,
            dst_mac: rig.host_mac,
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
            src_port: 7000,
            dst_port: 9400,
        };
        let before_tap = netns::iface_stats(TAP_NAME).unwrap();
        let before = rig.device().counters()[0];
        let len = 60_000;
        let mut frame = vec![0u8; len];
        let p = frames::build_tcp_tso(&mut frame, &flow, len, 1448, 5000, 8, 1).unwrap();
        assert_eq!(p.vnet.gso_type, frames::VIRTIO_NET_HDR_GSO_TCPV4);
        tx_send(&mut tx, &to_guest_hdr(&p.vnet), &frame, &ctx);
        tx_drain(&mut tx, &ctx);
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.tx_packets > before.tx_packets);
        assert!(ok, "{ctx}: TSO frame not written: {c:?}");
        assert_eq!(
            c.tx_errors, 0,
            "{ctx}: the TAP refused the TSO frame: {c:?}"
        );
        assert_eq!(c.tx_malformed, 0, "{ctx}: {c:?}");
        assert_eq!(c.tx_bytes - before.tx_bytes, len as u64, "{ctx}: tx_bytes");
        // The host stack took it as one 60 KB packet...
        let ok = wait_until(TIMEOUT, || {
            let s = netns::iface_stats(TAP_NAME).unwrap();
            s.rx_bytes - before_tap.rx_bytes >= len as u64
        });
        assert!(
            ok,
            "{ctx}: TAP rx_bytes grew by less than {len}: {:?} -> {:?}",
            before_tap,
            netns::iface_stats(TAP_NAME)
        );
        // ...and answered it: nobody listens on port 9400, so a RST comes back.
        let mut rst = None;
        let ok = rx_poll_all(std::slice::from_mut(&mut rx), TIMEOUT, &ctx, |_, p| {
            if let Some(ip) = frames::parse_ipv4(&p.data) {
                if ip.proto == frames::IPPROTO_TCP && ip.src == HOST_IP {
                    let tcp = &p.data[ip.l4_off..];
                    let ports = (
                        u16::from_be_bytes([tcp[0], tcp[1]]),
                        u16::from_be_bytes([tcp[2], tcp[3]]),
                    );
                    rst = Some((ports, tcp[13]));
                }
            }
            rst.is_some()
        });
        assert!(ok, "{ctx}: no TCP answer from the host");
        let (ports, flags) = rst.unwrap();
        assert_eq!(ports, (9400, 7000), "{ctx}: RST ports");
        assert_ne!(flags & 0x04, 0, "{ctx}: expected RST, flags {flags:#x}");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}
