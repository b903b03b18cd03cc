//! Frame building and parsing into caller-provided buffers (no allocation), on smoltcp's
//! `wire` views ([`EthernetFrame`], [`Ipv4Packet`], [`UdpPacket`], [`TcpPacket`],
//! [`ArpPacket`], [`Icmpv4Packet`]): no header offset is written out here, every field is
//! reached through its view.
//!
//! Frames are Ethernet II + IPv4 (no options) + UDP / TCP / ICMP, or ARP. A "frame length"
//! always means the full Ethernet frame as written to a TAP (destination MAC to last payload
//! byte, no FCS, no vnet header): a 64-byte UDP frame has an IPv4 total length of 50, a
//! 1500-byte one 1486.
//!
//! UDP and TCP payloads produced here start with a 12-byte header (the sequence number, u64
//! LE, then the flow id, u32 LE) followed by a pattern derived from the sequence number, so a
//! receiver can verify every byte with [`verify_payload`].
//!
//! Frames written to / read from a TAP queue are preceded by the 12-byte `virtio_net_hdr_v1`,
//! see [`VnetHdr`].
//!
//! [`EthernetFrame`]: smoltcp::wire::EthernetFrame
//! [`Ipv4Packet`]: smoltcp::wire::Ipv4Packet
//! [`UdpPacket`]: smoltcp::wire::UdpPacket
//! [`TcpPacket`]: smoltcp::wire::TcpPacket
//! [`ArpPacket`]: smoltcp::wire::ArpPacket
//! [`Icmpv4Packet`]: smoltcp::wire::Icmpv4Packet

mod build;
mod checksum;
mod parse;
mod payload;
mod template;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;

use smoltcp::wire::{ETHERNET_HEADER_LEN, IPV4_HEADER_LEN, TCP_HEADER_LEN, UDP_HEADER_LEN};

pub use build::{
    build_arp, build_icmp_echo, build_tcp_tso, build_udp, build_udp_nocsum, build_udp_partial_csum,
    build_udp_vnet, clear_udp_checksum, write_vnet_hdr, PartialCsumFrame,
};
pub use checksum::{
    checksum, csum_fold, csum_partial, csum_replace, ipv4_header_ok, l4_checksum_ok,
    pseudo_header_sum,
};
pub use parse::{
    parse_arp, parse_ethernet, parse_icmp_echo, parse_ipv4, parse_udp, ArpView, EthernetView,
    IcmpEchoView, Ipv4View, UdpView,
};
pub use payload::{
    pattern_byte, read_payload_header, verify_payload, write_payload, write_payload_seq,
    PayloadError, PAYLOAD_FLOW_OFF, PAYLOAD_HDR_LEN, PAYLOAD_SEQ_OFF,
};
pub use template::{CsumFixup, PayloadLoc};

/// Ethernet header length.
pub const ETH_HLEN: usize = ETHERNET_HEADER_LEN;
/// IPv4 header length (no options).
pub const IPV4_HLEN: usize = IPV4_HEADER_LEN;
/// UDP header length.
pub const UDP_HLEN: usize = UDP_HEADER_LEN;
/// TCP header length (no options).
pub const TCP_HLEN: usize = TCP_HEADER_LEN;
/// ICMP echo header length (type, code, checksum, identifier, sequence number).
pub const ICMP_HLEN: usize = 8;
/// ARP packet length for IPv4 over Ethernet.
pub const ARP_LEN: usize = 28;
/// Length of `virtio_net_hdr_v1` (with `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;
/// Offset of the L4 header in an Ethernet/IPv4 frame built here.
pub const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
/// Offset of the UDP payload in an Ethernet/IPv4/UDP frame built here.
pub const UDP_PAYLOAD_OFF: usize = L4_OFF + UDP_HLEN;
/// Offset of the TCP payload in an Ethernet/IPv4/TCP frame built here.
pub const TCP_PAYLOAD_OFF: usize = L4_OFF + TCP_HLEN;
/// Smallest UDP frame built here: headers plus the seq/flow payload header.
pub const MIN_UDP_FRAME: usize = UDP_PAYLOAD_OFF + PAYLOAD_HDR_LEN;
/// Smallest TCP frame built here.
pub const MIN_TCP_FRAME: usize = TCP_PAYLOAD_OFF + PAYLOAD_HDR_LEN;
/// Largest frame (IPv4 total length 65535).
pub const MAX_FRAME: usize = ETH_HLEN + 65535;
/// Largest GSO super-frame a Linux device transmits unsegmented: `skb->len` must stay below
/// the default `gso_max_size` of 65536, so the whole Ethernet frame is at most 65535 bytes
/// (IPv4 total length 65521). Larger GSO frames are segmented in software (and dropped on
/// `PACKET_QDISC_BYPASS` sockets).
pub const MAX_GSO_FRAME: usize = 65535;
/// Minimum Ethernet frame length without FCS; ARP frames are padded to it.
pub const ETH_ZLEN: usize = 60;

/// Ethertype IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// IP protocol ICMP.
pub const IPPROTO_ICMP: u8 = 1;
/// IP protocol TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol UDP.
pub const IPPROTO_UDP: u8 = 17;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_UDP` (UFO, obsolete).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `VIRTIO_NET_HDR_GSO_UDP_L4` (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `VIRTIO_NET_HDR_GSO_ECN` flag bit.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// The 12-byte `virtio_net_hdr_v1` preceding every frame on a TAP queue fd (the datapath's
/// typed view).
pub use tapir_datapath::VirtioNetHdr as VnetHdr;

/// Errors from frame builders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The output buffer is smaller than the frame.
    #[error("buffer too small: need {need} bytes, have {have}")]
    BufferTooSmall {
        /// Bytes needed.
        need: usize,
        /// Bytes available.
        have: usize,
    },
    /// The requested frame is longer than IPv4 allows.
    #[error("frame length {0} exceeds {MAX_FRAME}")]
    TooLong(usize),
}

/// Addresses and ports of a frame (ports unused for ICMP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSpec {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: Ipv4Addr,
    /// Destination IPv4 address.
    pub dst_ip: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

impl FlowSpec {
    /// The same flow in the opposite direction.
    #[must_use]
    pub fn reversed(&self) -> Self {
        Self {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// ARP operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArpOp {
    /// Who-has (1).
    Request,
    /// Is-at (2).
    Reply,
}

/// ICMP echo direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EchoKind {
    /// Echo request (type 8).
    Request,
    /// Echo reply (type 0).
    Reply,
}

/// `v` as u16, for lengths already bounded by [`MAX_FRAME`].
#[inline]
fn len16(v: usize) -> u16 {
    u16::try_from(v).unwrap_or(u16::MAX)
}
