//! Frame builders: each header written through its smoltcp view.

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    Icmpv4Message, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, TcpSeqNumber,
    UdpPacket,
};

use super::checksum::{csum_fold, pseudo_header_sum};
use super::parse::parse_udp;
use super::payload::write_payload;
use super::{
    len16, ArpOp, EchoKind, FlowSpec, FrameError, VnetHdr, ARP_LEN, ETH_HLEN, ETH_ZLEN, ICMP_HLEN,
    IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, L4_OFF, MAX_FRAME, MIN_TCP_FRAME, MIN_UDP_FRAME, TCP_HLEN,
    TCP_PAYLOAD_OFF, UDP_HLEN, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VNET_HDR_LEN,
};

/// A frame with a partial (offloaded) L4 checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCsumFrame {
    /// Frame length.
    pub len: usize,
    /// Offset of the L4 header (from the Ethernet header).
    pub csum_start: u16,
    /// Offset of the checksum field from `csum_start`.
    pub csum_offset: u16,
    /// A matching vnet header (`NEEDS_CSUM`, plus GSO fields for TSO).
    pub vnet: VnetHdr,
}

/// Where the checksum field of a UDP header lies, from the start of the header (the
/// `csum_offset` of a vnet header with `NEEDS_CSUM`).
const UDP_CSUM_OFFSET: u16 = 6;
/// Where the checksum field of a TCP header lies, from the start of the header.
const TCP_CSUM_OFFSET: u16 = 16;

fn check_len(buf: &[u8], need: usize) -> Result<(), FrameError> {
    if buf.len() < need {
        return Err(FrameError::BufferTooSmall {
            need,
            have: buf.len(),
        });
    }
    Ok(())
}

fn clamp_frame(frame_len: usize, min: usize) -> Result<usize, FrameError> {
    if frame_len > MAX_FRAME {
        return Err(FrameError::TooLong(frame_len));
    }
    Ok(frame_len.max(min))
}

/// Writes `h` into the first 12 bytes of `buf`.
///
/// # Errors
/// [`FrameError::BufferTooSmall`].
pub fn write_vnet_hdr(h: &VnetHdr, buf: &mut [u8]) -> Result<(), FrameError> {
    check_len(buf, VNET_HDR_LEN)?;
    buf[..VNET_HDR_LEN].copy_from_slice(&h.to_bytes());
    Ok(())
}

fn write_eth(buf: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: EthernetProtocol) {
    let mut eth = EthernetFrame::new_unchecked(buf);
    eth.set_dst_addr(EthernetAddress(dst));
    eth.set_src_addr(EthernetAddress(src));
    eth.set_ethertype(ethertype);
}

/// Writes the Ethernet header and an IPv4 header (DF, TTL 64, correct checksum) for a
/// `buf.len()`-byte frame.
fn write_eth_ipv4(buf: &mut [u8], spec: &FlowSpec, proto: IpProtocol, id: u16) {
    write_eth(buf, spec.dst_mac, spec.src_mac, EthernetProtocol::Ipv4);
    let total_len = len16(buf.len() - ETH_HLEN);
    let mut ip = Ipv4Packet::new_unchecked(&mut buf[ETH_HLEN..]);
    ip.set_version(4);
    ip.set_header_len(u8::try_from(IPV4_HLEN).unwrap_or(20));
    ip.set_dscp(0);
    ip.set_ecn(0);
    ip.set_total_len(total_len);
    ip.set_ident(id);
    ip.set_frag_offset(0);
    ip.clear_flags();
    ip.set_dont_frag(true);
    ip.set_hop_limit(64);
    ip.set_next_header(proto);
    ip.set_src_addr(spec.src_ip);
    ip.set_dst_addr(spec.dst_ip);
    ip.fill_checksum();
}

/// The IP id of a frame: the low 16 bits of its sequence number.
fn ip_id(seq: u64) -> u16 {
    u16::from_le_bytes([seq.to_le_bytes()[0], seq.to_le_bytes()[1]])
}

fn ip_pair(spec: &FlowSpec) -> (IpAddress, IpAddress) {
    (IpAddress::Ipv4(spec.src_ip), IpAddress::Ipv4(spec.dst_ip))
}

/// Writes Ethernet + IPv4 + UDP header + payload, leaving the UDP checksum 0.
fn build_udp_common(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    let len = clamp_frame(frame_len, MIN_UDP_FRAME)?;
    check_len(buf, len)?;
    let buf = &mut buf[..len];
    write_eth_ipv4(buf, spec, IpProtocol::Udp, ip_id(seq));
    let mut udp = UdpPacket::new_unchecked(&mut buf[L4_OFF..]);
    udp.set_src_port(spec.src_port);
    udp.set_dst_port(spec.dst_port);
    udp.set_len(len16(len - L4_OFF));
    udp.set_checksum(0);
    write_payload(udp.payload_mut(), flow, seq);
    Ok(len)
}

/// Builds an Ethernet/IPv4/UDP frame of `frame_len` bytes (clamped to at least
/// [`MIN_UDP_FRAME`]) with correct IPv4 and UDP checksums and a seq/flow payload. Returns the
/// frame length.
///
/// # Errors
/// [`FrameError`] if `buf` is too small or the frame too long.
pub fn build_udp(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    let len = build_udp_common(buf, spec, frame_len, flow, seq)?;
    let (src, dst) = ip_pair(spec);
    UdpPacket::new_unchecked(&mut buf[L4_OFF..len]).fill_checksum(&src, &dst);
    Ok(len)
}

/// Like [`build_udp`] but with UDP checksum 0 ("no checksum").
///
/// # Errors
/// As [`build_udp`].
pub fn build_udp_nocsum(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    build_udp_common(buf, spec, frame_len, flow, seq)
}

/// Sets the UDP checksum of an Ethernet/IPv4/UDP frame to 0 ("no checksum"); false if the
/// frame is not one.
pub fn clear_udp_checksum(frame: &mut [u8]) -> bool {
    let Some(l4_off) = parse_udp(frame).map(|u| u.payload_off - UDP_HLEN) else {
        return false;
    };
    UdpPacket::new_unchecked(&mut frame[l4_off..]).set_checksum(0);
    true
}

/// Builds a UDP frame whose checksum field holds only the (folded, not complemented)
/// pseudo-header sum, as for `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
///
/// # Errors
/// As [`build_udp`].
pub fn build_udp_partial_csum(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<PartialCsumFrame, FrameError> {
    let len = build_udp_common(buf, spec, frame_len, flow, seq)?;
    let pseudo = csum_fold(pseudo_header_sum(
        spec.src_ip,
        spec.dst_ip,
        IPPROTO_UDP,
        len - L4_OFF,
    ));
    UdpPacket::new_unchecked(&mut buf[L4_OFF..len]).set_checksum(pseudo);
    let csum_start = len16(L4_OFF);
    Ok(PartialCsumFrame {
        len,
        csum_start,
        csum_offset: UDP_CSUM_OFFSET,
        vnet: VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start,
            csum_offset: UDP_CSUM_OFFSET,
            ..VnetHdr::default()
        },
    })
}

/// Builds `[vnet hdr (all zero)][UDP frame]` for writing to a TAP queue. Returns the total
/// length including the header.
///
/// # Errors
/// As [`build_udp`].
pub fn build_udp_vnet(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    flow: u32,
    seq: u64,
) -> Result<usize, FrameError> {
    write_vnet_hdr(&VnetHdr::default(), buf)?;
    Ok(VNET_HDR_LEN + build_udp(&mut buf[VNET_HDR_LEN..], spec, frame_len, flow, seq)?)
}

/// Builds an Ethernet/IPv4/TCP frame of up to [`MAX_FRAME`] bytes for TSO: ACK|PSH, TCP
/// sequence `tcp_seq`, seq/flow payload, partial TCP checksum (pseudo-header sum) and a vnet
/// header with `NEEDS_CSUM` and, if the payload exceeds `gso_size`, `GSO_TCPV4` (`hdr_len`
/// 54).
///
/// # Errors
/// As [`build_udp`].
#[allow(clippy::too_many_arguments, reason = "a flat builder is simplest here")]
pub fn build_tcp_tso(
    buf: &mut [u8],
    spec: &FlowSpec,
    frame_len: usize,
    gso_size: u16,
    tcp_seq: u32,
    flow: u32,
    seq: u64,
) -> Result<PartialCsumFrame, FrameError> {
    let len = clamp_frame(frame_len, MIN_TCP_FRAME)?;
    check_len(buf, len)?;
    let buf = &mut buf[..len];
    write_eth_ipv4(buf, spec, IpProtocol::Tcp, ip_id(seq));
    let mut tcp = TcpPacket::new_unchecked(&mut buf[L4_OFF..]);
    tcp.set_src_port(spec.src_port);
    tcp.set_dst_port(spec.dst_port);
    tcp.set_seq_number(TcpSeqNumber(i32::from_ne_bytes(tcp_seq.to_ne_bytes())));
    tcp.set_ack_number(TcpSeqNumber(1));
    tcp.set_header_len(u8::try_from(TCP_HLEN).unwrap_or(20));
    tcp.clear_flags();
    tcp.set_psh(true);
    tcp.set_ack(true);
    tcp.set_window_len(0xffff);
    tcp.set_urgent_at(0);
    let pseudo = csum_fold(pseudo_header_sum(
        spec.src_ip,
        spec.dst_ip,
        IPPROTO_TCP,
        len - L4_OFF,
    ));
    tcp.set_checksum(pseudo);
    write_payload(tcp.payload_mut(), flow, seq);
    let payload_len = len - TCP_PAYLOAD_OFF;
    let gso = gso_size > 0 && payload_len > usize::from(gso_size);
    let csum_start = len16(L4_OFF);
    Ok(PartialCsumFrame {
        len,
        csum_start,
        csum_offset: TCP_CSUM_OFFSET,
        vnet: VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: if gso {
                VIRTIO_NET_HDR_GSO_TCPV4
            } else {
                VIRTIO_NET_HDR_GSO_NONE
            },
            hdr_len: if gso { len16(TCP_PAYLOAD_OFF) } else { 0 },
            gso_size: if gso { gso_size } else { 0 },
            csum_start,
            csum_offset: TCP_CSUM_OFFSET,
            num_buffers: 0,
        },
    })
}

/// Builds an Ethernet ARP request (broadcast; target MAC zero) or reply (unicast to
/// `target_mac`), padded to [`ETH_ZLEN`]. Returns its length.
///
/// # Errors
/// [`FrameError::BufferTooSmall`].
pub fn build_arp(
    buf: &mut [u8],
    op: ArpOp,
    sender_mac: [u8; 6],
    sender_ip: std::net::Ipv4Addr,
    target_mac: [u8; 6],
    target_ip: std::net::Ipv4Addr,
) -> Result<usize, FrameError> {
    check_len(buf, ETH_ZLEN)?;
    let buf = &mut buf[..ETH_ZLEN];
    let (dst, tha, operation) = match op {
        ArpOp::Request => ([0xff; 6], [0u8; 6], ArpOperation::Request),
        ArpOp::Reply => (target_mac, target_mac, ArpOperation::Reply),
    };
    write_eth(buf, dst, sender_mac, EthernetProtocol::Arp);
    let repr = ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr: EthernetAddress(sender_mac),
        source_protocol_addr: sender_ip,
        target_hardware_addr: EthernetAddress(tha),
        target_protocol_addr: target_ip,
    };
    repr.emit(&mut ArpPacket::new_unchecked(
        &mut buf[ETH_HLEN..ETH_HLEN + ARP_LEN],
    ));
    buf[ETH_HLEN + ARP_LEN..].fill(0);
    Ok(ETH_ZLEN)
}

/// Builds an Ethernet/IPv4/ICMP echo frame with `payload_len` bytes of payload (byte `i` =
/// `i as u8`) and correct checksums. Returns its length.
///
/// # Errors
/// As [`build_udp`].
pub fn build_icmp_echo(
    buf: &mut [u8],
    spec: &FlowSpec,
    kind: EchoKind,
    ident: u16,
    seq: u16,
    payload_len: usize,
) -> Result<usize, FrameError> {
    let len = L4_OFF + ICMP_HLEN + payload_len;
    if len > MAX_FRAME {
        return Err(FrameError::TooLong(len));
    }
    check_len(buf, len)?;
    let buf = &mut buf[..len];
    write_eth_ipv4(buf, spec, IpProtocol::Icmp, seq);
    let mut icmp = Icmpv4Packet::new_unchecked(&mut buf[L4_OFF..]);
    icmp.set_msg_type(match kind {
        EchoKind::Request => Icmpv4Message::EchoRequest,
        EchoKind::Reply => Icmpv4Message::EchoReply,
    });
    icmp.set_msg_code(0);
    icmp.set_echo_ident(ident);
    icmp.set_echo_seq_no(seq);
    for (i, b) in icmp.data_mut().iter_mut().enumerate() {
        *b = i.to_le_bytes()[0];
    }
    icmp.fill_checksum();
    Ok(len)
}
