//! The peers against a real TAP in a private namespace.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::seq::{SeqEvent, SeqTracker, SEQ_WINDOW};
use super::sink::Verify;
use super::*;
use tapir_testkit::frames::{
    self, FlowSpec, VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN,
};
use tapir_testkit::netns::{add_addr, add_neigh, disable_ipv6, link_up, run_in_new_netns, set_mac};
use tapir_testkit::raw_tap::{open_tap, read_frame, set_offload, write_frame};

const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

fn spec() -> FlowSpec {
    FlowSpec {
        src_mac: TAP_MAC,
        dst_mac: GUEST_MAC,
        src_ip: Ipv4Addr::new(10, 0, 0, 1),
        dst_ip: Ipv4Addr::new(10, 0, 0, 2),
        src_port: 9000,
        dst_port: 9001,
    }
}

/// A TAP "tap0" with 10.0.0.1/24, MAC `TAP_MAC`, up, and a static
/// neighbour 10.0.0.2 -> `GUEST_MAC`. Call inside a fresh namespace.
fn setup_tap() -> OwnedFd {
    disable_ipv6().unwrap();
    let fd = open_tap("tap0").unwrap();
    set_mac("tap0", TAP_MAC).unwrap();
    add_addr("tap0", "10.0.0.1/24").unwrap();
    link_up("tap0").unwrap();
    add_neigh("10.0.0.2", "02:00:00:00:00:02", "tap0").unwrap();
    fd
}

#[test]
fn seq_tracker_counts() {
    let mut t = SeqTracker::new();
    for s in [0u64, 1, 2, 4, 5, 5, 3, 6, 3] {
        t.record(7, s);
    }
    let f = t.flow(7).unwrap();
    assert_eq!(f.received, 9);
    assert_eq!(f.lost, 0); // 3 came late
    assert_eq!(f.reordered, 1);
    assert_eq!(f.duplicates, 2);
    assert_eq!(f.next_expected, 7);
    assert_eq!(t.record(7, 10), SeqEvent::Gap(3));
    assert_eq!(t.record(7, 8), SeqEvent::Reordered);
    assert_eq!(t.record(7, 8), SeqEvent::Duplicate);
    assert_eq!(t.record(7, 11), SeqEvent::InOrder);
    assert_eq!(t.flow(7).unwrap().lost, 2);
    assert_eq!(t.record(7, 100_000), SeqEvent::Gap(100_000 - 12));
    assert_eq!(t.record(7, 10), SeqEvent::TooOld);
    // Another flow, independent; window wrap keeps old bits cleared.
    assert_eq!(t.record(1, 0), SeqEvent::InOrder);
    assert_eq!(t.record(1, SEQ_WINDOW), SeqEvent::Gap(SEQ_WINDOW - 1));
    assert_eq!(t.record(1, 1), SeqEvent::Reordered);
    assert_eq!(t.record(1, 1), SeqEvent::Duplicate);
    let s = t.summary();
    assert_eq!(s.flows, 2);
    let mut b = SeqTracker::baseline_on_first();
    assert_eq!(b.record(0, 500), SeqEvent::InOrder);
    assert_eq!(b.record(0, 501), SeqEvent::InOrder);
    assert_eq!(b.flow(0).unwrap().lost, 0);
}

#[test]
fn generator_to_tap_reader() {
    run_in_new_netns(|| {
        let tap = setup_tap();
        let mut buf = vec![0u8; 2048];
        let len = frames::build_udp(&mut buf, &spec(), 128, 0, 0).unwrap();
        let mut cfg = GeneratorConfig::new(
            "tap0",
            vec![Template::plain(buf[..len].to_vec())],
            RunControl::for_duration(Duration::from_secs(1)).with_max_packets(100),
        );
        cfg.flow = 42;
        cfg.start_seq = 1000;
        cfg.batch = 16;
        cfg.seq_mode = SeqMode::Full;
        let rep = PacketGenerator::new(cfg).unwrap().run().unwrap();
        assert_eq!(rep.stats.packets, 100, "{rep:?}");
        assert_eq!(rep.stats.errors, 0);
        assert_eq!(rep.next_seq, 1100);
        let mut rx = vec![0u8; 4096];
        let mut expect = 1000u64;
        while let Some(n) = read_frame(&tap, &mut rx, Duration::from_millis(200)).unwrap() {
            let hdr = VnetHdr::parse(&rx[..n]).unwrap();
            let f = &rx[VNET_HDR_LEN..n];
            let Some(u) = frames::parse_udp(f) else {
                continue; // e.g. stray ARP
            };
            assert_eq!(hdr.gso_type, 0);
            assert_eq!(f.len(), 128);
            assert!(frames::l4_checksum_ok(f));
            assert_eq!(frames::verify_payload(u.payload), Ok((42, expect)));
            expect += 1;
        }
        assert_eq!(expect, 1100);
    })
    .unwrap();
}

#[test]
fn tso_superframe_arrives_whole() {
    run_in_new_netns(|| {
        let tap = setup_tap();
        set_offload(&tap, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6).unwrap();
        let mut buf = vec![0u8; frames::MAX_FRAME];
        let p =
            frames::build_tcp_tso(&mut buf, &spec(), frames::MAX_GSO_FRAME, 1448, 1, 5, 0).unwrap();
        let tpl = Template {
            vnet: p.vnet,
            frame: buf[..p.len].to_vec(),
        };
        let mut cfg = GeneratorConfig::new(
            "tap0",
            vec![tpl],
            RunControl::for_duration(Duration::from_secs(1)).with_max_packets(3),
        );
        cfg.vnet_hdr = true;
        cfg.batch = 1;
        cfg.flow = 5;
        cfg.seq_mode = SeqMode::Full;
        let rep = PacketGenerator::new(cfg).unwrap().run().unwrap();
        assert_eq!(rep.stats.packets, 3, "{rep:?}");
        let mut rx = vec![0u8; 65562 + 64];
        let mut got = 0u64;
        while let Some(n) = read_frame(&tap, &mut rx, Duration::from_millis(200)).unwrap() {
            let hdr = VnetHdr::parse(&rx[..n]).unwrap();
            let f = &rx[VNET_HDR_LEN..n];
            if frames::parse_ipv4(f).is_none_or(|ip| ip.proto != frames::IPPROTO_TCP) {
                continue;
            }
            assert_eq!(n, VNET_HDR_LEN + frames::MAX_GSO_FRAME);
            assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4, "{hdr:?}");
            assert_eq!(hdr.gso_size, 1448);
            assert_eq!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, 1);
            assert_eq!(
                frames::verify_payload(&f[frames::TCP_PAYLOAD_OFF..]),
                Ok((5, got))
            );
            got += 1;
        }
        assert_eq!(got, 3);
    })
    .unwrap();
}

#[test]
fn sink_receives_tap_writes_and_tracks_seq() {
    run_in_new_netns(|| {
        let tap = setup_tap();
        let sink = UdpSink::bind(UdpSinkConfig {
            verify: Verify::Full,
            ..UdpSinkConfig::new(
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 9000),
                RunControl::for_duration(Duration::from_secs(1)).with_max_packets(6),
            )
        })
        .unwrap();
        let h = sink.spawn().unwrap();
        // Guest -> host frames: 0, 1, 3 (2 skipped), 3 (duplicate), 4, 5.
        let g = spec().reversed();
        let mut buf = vec![0u8; 2048];
        for seq in [0u64, 1, 3, 3, 4, 5] {
            let n = frames::build_udp_vnet(&mut buf, &g, 200, 9, seq).unwrap();
            assert_eq!(write_frame(&tap, &buf[..n]).unwrap(), n);
        }
        let rep = h.join().unwrap();
        assert_eq!(rep.stats.packets, 6, "{rep:?}");
        assert_eq!(rep.verify_errors, 0);
        let s = rep.seq.unwrap();
        assert_eq!((s.lost, s.duplicates, s.reordered), (1, 1, 0));
        assert_eq!(rep.flows[0].flow, 9);
        assert_eq!(rep.socket_drops, 0);
    })
    .unwrap();
}

#[test]
fn udp_sender_echo_sink_over_loopback() {
    run_in_new_netns(|| {
        let lo = Ipv4Addr::LOCALHOST;
        // Sender (with GSO) -> sink.
        let sink = UdpSink::bind(UdpSinkConfig {
            verify: Verify::Full,
            ..UdpSinkConfig::new(
                SocketAddrV4::new(lo, 0),
                RunControl::for_duration(Duration::from_secs(1)).with_max_packets(400),
            )
        })
        .unwrap();
        let dst = sink.local_addr();
        let h = sink.spawn().unwrap();
        let mut cfg = UdpSenderConfig::new(
            dst,
            1000,
            RunControl::for_duration(Duration::from_secs(1)).with_max_packets(400),
        );
        cfg.gso_segments = Some(20);
        cfg.batch = 4;
        cfg.flow = 3;
        cfg.rate_pps = Some(400);
        cfg.seq_mode = SeqMode::Full;
        let srep = UdpSender::new(cfg).unwrap().run().unwrap();
        let rep = h.join().unwrap();
        assert_eq!(srep.stats.packets, 400, "{srep:?}");
        assert_eq!(rep.stats.packets, 400, "{rep:?}");
        assert_eq!(rep.verify_errors, 0, "{:?}", rep.first_verify_error);
        let s = rep.seq.unwrap();
        assert_eq!((s.lost, s.duplicates), (0, 0));

        // Echo: send 10 datagrams, get 10 back.
        let echo = UdpEcho::bind(UdpEchoConfig::new(
            SocketAddrV4::new(lo, 0),
            RunControl::for_duration(Duration::from_secs(1)).with_max_packets(10),
        ))
        .unwrap();
        let eaddr = echo.local_addr();
        let eh = echo.spawn().unwrap();
        let sock = std::net::UdpSocket::bind((lo, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 64];
        for i in 0..10u8 {
            sock.send_to(&[i; 33], eaddr).unwrap();
            let (n, from) = sock.recv_from(&mut b).unwrap();
            assert_eq!((n, b[0], from), (33, i, std::net::SocketAddr::V4(eaddr)));
        }
        let erep = eh.join().unwrap();
        assert_eq!(erep.stats.packets, 10);
        assert_eq!(erep.dropped, 0);
    })
    .unwrap();
}

#[test]
fn udp_sender_to_tap_reader_and_stop_flag() {
    run_in_new_netns(|| {
        let tap = setup_tap();
        let stop = Arc::new(AtomicBool::new(false));
        let cfg = UdpSenderConfig::new(
            SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7000),
            100,
            RunControl::new(Arc::clone(&stop)),
        );
        let h = UdpSender::new(cfg).unwrap().spawn().unwrap();
        let mut rx = vec![0u8; 4096];
        let mut seen = 0;
        while seen < 10 {
            let n = read_frame(&tap, &mut rx, Duration::from_millis(500))
                .unwrap()
                .unwrap();
            if let Some(u) = frames::parse_udp(&rx[VNET_HDR_LEN..n]) {
                assert_eq!(u.dst_port, 7000);
                assert_eq!(u.dst_mac, GUEST_MAC);
                assert!(frames::read_payload_header(u.payload).is_some());
                seen += 1;
            }
        }
        let rep = h.stop_and_join().unwrap();
        assert!(rep.stats.packets >= 10);
        assert!(rep.stats.elapsed < Duration::from_secs(2));
    })
    .unwrap();
}
