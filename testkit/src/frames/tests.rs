//! Frame builders against an independent reference: RFC 1071 sums computed here and header
//! fields read at their wire offsets, so a mistake in how a view is used shows.

use std::net::Ipv4Addr;

use super::*;

fn rd16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn wr16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

fn spec() -> FlowSpec {
    FlowSpec {
        src_mac: [0x02, 0, 0, 0, 0, 0x02],
        dst_mac: [0x02, 0, 0, 0, 0, 0x01],
        src_ip: Ipv4Addr::new(10, 0, 0, 2),
        dst_ip: Ipv4Addr::new(10, 0, 0, 1),
        src_port: 40000,
        dst_port: 9000,
    }
}

/// Straightforward RFC 1071 reference: 16-bit words, fold at the end.
fn ref_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < data.len() {
        let hi = u32::from(data[i]) << 8;
        let lo = data.get(i + 1).map_or(0, |&b| u32::from(b));
        sum += hi | lo;
        i += 2;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap()
}

#[test]
fn known_checksums() {
    // RFC 1071 example words.
    let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
    assert_eq!(csum_fold(csum_partial(&d, 0)), 0xddf2);
    // A classic IPv4 header example (checksum 0xb861).
    let hdr = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(checksum(&hdr), 0xb861);
    for len in 0..200 {
        let v: Vec<u8> = (0..len)
            .map(|i: u32| (i * 37 + 11).to_le_bytes()[0])
            .collect();
        assert_eq!(checksum(&v), ref_csum(&v), "len {len}");
    }
}

#[test]
fn udp_build_parse_roundtrip() {
    let mut buf = vec![0u8; 2048];
    for &fl in &[0usize, 40, 54, 60, 64, 65, 128, 1500, 1514] {
        let len = build_udp(&mut buf, &spec(), fl, 7, 0x1122_3344_5566_7788).unwrap();
        assert_eq!(len, fl.max(MIN_UDP_FRAME));
        let f = &buf[..len];
        assert!(ipv4_header_ok(f));
        assert!(l4_checksum_ok(f));
        // Cross-check the UDP checksum against the reference over an
        // explicit pseudo header.
        let mut ph = Vec::new();
        ph.extend_from_slice(&[10, 0, 0, 2, 10, 0, 0, 1, 0, 17]);
        ph.extend_from_slice(&len16(len - L4_OFF).to_be_bytes());
        let mut seg = f[L4_OFF..].to_vec();
        seg[6] = 0;
        seg[7] = 0;
        ph.extend_from_slice(&seg);
        assert_eq!(rd16(f, L4_OFF + 6), ref_csum(&ph));
        assert_eq!(rd16(f, ETH_HLEN + 2), len16(len - ETH_HLEN));
        // Version 4, IHL 5, DF, TTL 64, UDP, at their wire offsets.
        assert_eq!(f[ETH_HLEN], 0x45);
        assert_eq!(rd16(f, ETH_HLEN + 6), 0x4000);
        assert_eq!((f[ETH_HLEN + 8], f[ETH_HLEN + 9]), (64, IPPROTO_UDP));
        assert_eq!(rd16(f, 12), ETHERTYPE_IPV4);
        let eth = parse_ethernet(f).unwrap();
        assert_eq!(
            (eth.dst_mac, eth.src_mac, eth.ethertype),
            (spec().dst_mac, spec().src_mac, ETHERTYPE_IPV4)
        );
        let u = parse_udp(f).unwrap();
        assert_eq!((u.src_port, u.dst_port), (40000, 9000));
        assert_eq!(u.src_ip, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(u.dst_mac, spec().dst_mac);
        assert_eq!(u.payload.len(), len - UDP_PAYLOAD_OFF);
        assert_eq!(verify_payload(u.payload), Ok((7, 0x1122_3344_5566_7788)));
    }
    assert_eq!(build_udp(&mut buf, &spec(), 1500, 0, 0).unwrap(), 1500);
    assert_eq!(rd16(&buf, ETH_HLEN + 2), 1486);
    assert!(build_udp(&mut buf, &spec(), 4096, 0, 0).is_err());
    assert!(build_udp(&mut buf, &spec(), MAX_FRAME + 1, 0, 0).is_err());
}

#[test]
fn payload_corruption_detected() {
    let mut buf = [0u8; 300];
    let len = build_udp(&mut buf, &spec(), 300, 3, 99).unwrap();
    let off = UDP_PAYLOAD_OFF;
    for i in [12usize, 13, 20, 100, len - off - 1] {
        let mut c = buf;
        c[off + i] ^= 0x40;
        match verify_payload(&c[off..len]) {
            Err(PayloadError::Mismatch {
                offset, flow, seq, ..
            }) => {
                assert_eq!((offset, flow, seq), (i, 3, 99));
            }
            r => panic!("{r:?}"),
        }
    }
    assert_eq!(
        verify_payload(&buf[off..off + 5]),
        Err(PayloadError::TooShort(5))
    );
    // Pattern differs between seqs.
    let mut b2 = [0u8; 300];
    build_udp(&mut b2, &spec(), 300, 3, 100).unwrap();
    assert_ne!(buf[off + 12..len], b2[off + 12..len]);
    assert_eq!(pattern_byte(99, 200), buf[off + 200]);
}

#[test]
fn partial_and_nocsum() {
    let mut buf = [0u8; 1500];
    let p = build_udp_partial_csum(&mut buf, &spec(), 1000, 1, 5).unwrap();
    assert_eq!((p.csum_start, p.csum_offset), (34, 6));
    assert_eq!(p.vnet.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM);
    // Completing the checksum the way an offload does yields a valid frame.
    let start = usize::from(p.csum_start);
    let c = checksum(&buf[start..p.len]);
    wr16(&mut buf, start + 6, c);
    assert!(l4_checksum_ok(&buf[..p.len]));
    let n = build_udp_nocsum(&mut buf, &spec(), 100, 1, 5).unwrap();
    assert_eq!(rd16(&buf, L4_OFF + 6), 0);
    assert!(l4_checksum_ok(&buf[..n]));
    let n = build_udp_vnet(&mut buf, &spec(), 64, 1, 5).unwrap();
    assert_eq!(n, 76);
    assert_eq!(VnetHdr::parse(&buf).unwrap(), VnetHdr::default());
}

#[test]
fn seq_rewrite_keeps_checksum_valid() {
    let mut buf = [0u8; 1514];
    for fl in [64usize, 65, 333, 1514] {
        let len = build_udp(&mut buf, &spec(), fl, 9, 0).unwrap();
        let f = &mut buf[..len];
        let loc = PayloadLoc::locate(f, false).unwrap();
        assert_eq!(loc.fixup, CsumFixup::Udp);
        for seq in [1u64, 2, u64::MAX, 0x8000_0000_0000_0000, 12345] {
            loc.set_seq(f, seq);
            assert!(l4_checksum_ok(f), "fl {fl} seq {seq}");
            assert_eq!(read_payload_header(&f[UDP_PAYLOAD_OFF..]), Some((9, seq)));
            loc.set_payload(f, 9, seq);
            assert!(l4_checksum_ok(f));
            assert_eq!(verify_payload(&f[UDP_PAYLOAD_OFF..]), Ok((9, seq)));
        }
    }
}

#[test]
fn tcp_tso_frame() {
    let mut buf = vec![0u8; MAX_FRAME];
    let p = build_tcp_tso(&mut buf, &spec(), MAX_FRAME, 1448, 1000, 2, 77).unwrap();
    assert_eq!(p.len, MAX_FRAME);
    let f = &buf[..p.len];
    assert!(ipv4_header_ok(f));
    assert_eq!(rd16(f, ETH_HLEN + 2), 65535);
    assert_eq!(p.vnet.gso_type, VIRTIO_NET_HDR_GSO_TCPV4);
    assert_eq!(p.vnet.gso_size, 1448);
    assert_eq!(p.vnet.hdr_len, 54);
    assert_eq!((p.vnet.csum_start, p.vnet.csum_offset), (34, 16));
    assert_eq!(verify_payload(&f[TCP_PAYLOAD_OFF..]), Ok((2, 77)));
    // Sequence 1000, ACK 1, data offset 5, PSH|ACK, window 0xffff at their wire offsets.
    assert_eq!(f[L4_OFF + 4..L4_OFF + 8], 1000u32.to_be_bytes());
    assert_eq!(f[L4_OFF + 8..L4_OFF + 12], 1u32.to_be_bytes());
    assert_eq!((f[L4_OFF + 12], f[L4_OFF + 13]), (0x50, 0x18));
    assert_eq!(rd16(f, L4_OFF + 14), 0xffff);
    // Completing the partial checksum gives a valid TCP checksum.
    let mut g = f.to_vec();
    let c = checksum(&g[34..]);
    wr16(&mut g, 34 + 16, c);
    assert!(l4_checksum_ok(&g));
    let loc = PayloadLoc::locate(f, true).unwrap();
    assert_eq!(loc.payload_off, TCP_PAYLOAD_OFF);
    // Small TCP frame: no GSO.
    let p = build_tcp_tso(&mut buf, &spec(), 200, 1448, 0, 0, 0).unwrap();
    assert_eq!(p.vnet.gso_type, VIRTIO_NET_HDR_GSO_NONE);
    let h = p.vnet.to_bytes();
    assert_eq!(VnetHdr::parse(&h), Some(p.vnet));
}

#[test]
fn arp_and_icmp() {
    let mut buf = [0u8; 200];
    let s = spec();
    let n = build_arp(
        &mut buf,
        ArpOp::Request,
        s.src_mac,
        s.src_ip,
        [0; 6],
        s.dst_ip,
    )
    .unwrap();
    assert_eq!(n, ETH_ZLEN);
    assert_eq!(buf[..6], [0xff; 6]);
    let a = parse_arp(&buf[..n]).unwrap();
    assert_eq!(a.op, ArpOp::Request);
    assert_eq!((a.sender_ip, a.target_ip), (s.src_ip, s.dst_ip));
    let n = build_arp(
        &mut buf,
        ArpOp::Reply,
        s.dst_mac,
        s.dst_ip,
        s.src_mac,
        s.src_ip,
    )
    .unwrap();
    let a = parse_arp(&buf[..n]).unwrap();
    assert_eq!(a.op, ArpOp::Reply);
    assert_eq!(buf[..6], s.src_mac);
    assert_eq!(a.target_mac, s.src_mac);

    let n = build_icmp_echo(&mut buf, &s, EchoKind::Request, 0x1234, 7, 56).unwrap();
    assert_eq!(n, 14 + 20 + 8 + 56);
    assert!(ipv4_header_ok(&buf[..n]));
    assert!(l4_checksum_ok(&buf[..n]));
    assert_eq!(ref_csum(&buf[L4_OFF..n]), 0);
    let e = parse_icmp_echo(&buf[..n]).unwrap();
    assert_eq!(
        (e.kind, e.ident, e.seq, e.payload.len()),
        (EchoKind::Request, 0x1234, 7, 56)
    );
    let n = build_icmp_echo(&mut buf, &s.reversed(), EchoKind::Reply, 1, 2, 3).unwrap();
    let e = parse_icmp_echo(&buf[..n]).unwrap();
    assert_eq!((e.kind, e.src), (EchoKind::Reply, s.dst_ip));
    assert!(parse_udp(&buf[..n]).is_none());
    assert!(parse_arp(&buf[..n]).is_none());
}
