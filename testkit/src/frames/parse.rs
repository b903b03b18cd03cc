//! Frame parsers: each header read through a checked smoltcp view, so a short or malformed
//! frame is `None`, never a panic.

use std::net::Ipv4Addr;

use smoltcp::wire::{
    ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet, IpProtocol,
    Ipv4Packet, UdpPacket,
};

use super::{ArpOp, EchoKind, ETH_HLEN, IPV4_HLEN, UDP_HLEN};

/// A parsed Ethernet header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EthernetView {
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Ethertype.
    pub ethertype: u16,
}

/// Parses the Ethernet header of any frame.
#[must_use]
pub fn parse_ethernet(frame: &[u8]) -> Option<EthernetView> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    Some(EthernetView {
        dst_mac: eth.dst_addr().0,
        src_mac: eth.src_addr().0,
        ethertype: eth.ethertype().into(),
    })
}

/// A parsed Ethernet/IPv4 header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4View {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// End of the IP datagram in the frame (`ETH_HLEN + total length`).
    pub end: usize,
}

/// Parses the Ethernet and IPv4 headers (no VLAN). Trailing padding beyond the IP total
/// length is allowed.
#[must_use]
pub fn parse_ipv4(frame: &[u8]) -> Option<Ipv4View> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
    let ihl = usize::from(ip.header_len());
    if ip.version() != 4 || ihl < IPV4_HLEN {
        return None;
    }
    Some(Ipv4View {
        src_mac: eth.src_addr().0,
        dst_mac: eth.dst_addr().0,
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        proto: ip.next_header().into(),
        l4_off: ETH_HLEN + ihl,
        end: ETH_HLEN + usize::from(ip.total_len()),
    })
}

/// A parsed Ethernet/IPv4/UDP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpView<'a> {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source address.
    pub src_ip: Ipv4Addr,
    /// Destination address.
    pub dst_ip: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
    /// UDP checksum field as found.
    pub checksum: u16,
    /// Offset of the payload in the frame.
    pub payload_off: usize,
    /// The UDP payload (bounded by the UDP length).
    pub payload: &'a [u8],
}

/// Parses an Ethernet/IPv4/UDP frame (unfragmented).
#[must_use]
pub fn parse_udp(frame: &[u8]) -> Option<UdpView<'_>> {
    let ip = parse_ipv4(frame)?;
    if IpProtocol::from(ip.proto) != IpProtocol::Udp {
        return None;
    }
    let udp = UdpPacket::new_checked(&frame[ip.l4_off..ip.end]).ok()?;
    Some(UdpView {
        src_mac: ip.src_mac,
        dst_mac: ip.dst_mac,
        src_ip: ip.src,
        dst_ip: ip.dst,
        src_port: udp.src_port(),
        dst_port: udp.dst_port(),
        checksum: udp.checksum(),
        payload_off: ip.l4_off + UDP_HLEN,
        payload: udp.payload(),
    })
}

/// A parsed ARP frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpView {
    /// Operation.
    pub op: ArpOp,
    /// Sender hardware address.
    pub sender_mac: [u8; 6],
    /// Sender protocol address.
    pub sender_ip: Ipv4Addr,
    /// Target hardware address.
    pub target_mac: [u8; 6],
    /// Target protocol address.
    pub target_ip: Ipv4Addr,
}

/// Parses an Ethernet/ARP (IPv4 over Ethernet) frame.
#[must_use]
pub fn parse_arp(frame: &[u8]) -> Option<ArpView> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Arp {
        return None;
    }
    let packet = ArpPacket::new_checked(eth.payload()).ok()?;
    let ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_hardware_addr,
        target_protocol_addr,
    } = ArpRepr::parse(&packet).ok()?
    else {
        return None;
    };
    let op = match operation {
        smoltcp::wire::ArpOperation::Request => ArpOp::Request,
        smoltcp::wire::ArpOperation::Reply => ArpOp::Reply,
        _ => return None,
    };
    Some(ArpView {
        op,
        sender_mac: source_hardware_addr.0,
        sender_ip: source_protocol_addr,
        target_mac: target_hardware_addr.0,
        target_ip: target_protocol_addr,
    })
}

/// A parsed ICMP echo frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IcmpEchoView<'a> {
    /// Request or reply.
    pub kind: EchoKind,
    /// Source IP.
    pub src: Ipv4Addr,
    /// Destination IP.
    pub dst: Ipv4Addr,
    /// Identifier.
    pub ident: u16,
    /// Sequence number.
    pub seq: u16,
    /// Payload after the 8-byte ICMP header.
    pub payload: &'a [u8],
}

/// Parses an Ethernet/IPv4/ICMP echo request or reply.
#[must_use]
pub fn parse_icmp_echo(frame: &[u8]) -> Option<IcmpEchoView<'_>> {
    let ip = parse_ipv4(frame)?;
    if IpProtocol::from(ip.proto) != IpProtocol::Icmp {
        return None;
    }
    let icmp = Icmpv4Packet::new_checked(&frame[ip.l4_off..ip.end]).ok()?;
    let kind = match (icmp.msg_type(), icmp.msg_code()) {
        (Icmpv4Message::EchoRequest, 0) => EchoKind::Request,
        (Icmpv4Message::EchoReply, 0) => EchoKind::Reply,
        _ => return None,
    };
    Some(IcmpEchoView {
        kind,
        src: ip.src,
        dst: ip.dst,
        ident: icmp.echo_ident(),
        seq: icmp.echo_seq_no(),
        payload: icmp.data(),
    })
}
