//! The Internet checksum (RFC 1071): the running sums the generators update per packet
//! (RFC 1624) and the checks of frames received, through smoltcp's views.

use std::net::Ipv4Addr;

use smoltcp::wire::{Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet, TcpPacket, UdpPacket};

use super::parse::parse_ipv4;
use super::ETH_HLEN;

/// Adds `data` to a running ones'-complement sum (unfolded, big-endian 16-bit words; an odd
/// trailing byte is padded with zero). Only the last chunk summed may have odd length.
#[must_use]
pub fn csum_partial(data: &[u8], mut sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        sum += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        sum += u64::from(rest[i]) << 8;
    }
    sum
}

/// Folds a running sum to 16 bits (not complemented).
#[must_use]
pub fn csum_fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // The loop leaves sum <= 0xffff.
    u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The Internet checksum (RFC 1071) of `data`.
#[must_use]
pub fn checksum(data: &[u8]) -> u16 {
    !csum_fold(csum_partial(data, 0))
}

/// Unfolded IPv4 pseudo-header sum for an L4 segment of `l4_len` bytes.
#[must_use]
pub fn pseudo_header_sum(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, l4_len: usize) -> u64 {
    let s = u64::from(u32::from(src));
    let d = u64::from(u32::from(dst));
    // l4_len is bounded by 65535 - 20 for frames built/parsed here.
    let len = u64::try_from(l4_len).unwrap_or(0);
    (s >> 16) + (s & 0xffff) + (d >> 16) + (d & 0xffff) + u64::from(proto) + len
}

/// Incrementally updates checksum `csum` for `old` bytes replaced by `new` (same length, even,
/// starting at an even offset of the checksummed area; RFC 1624 eqn. 3). Never returns 0 (UDP
/// "no checksum"); returns 0xffff instead.
#[must_use]
pub fn csum_replace(csum: u16, old: &[u8], new: &[u8]) -> u16 {
    let mut sum = u64::from(!csum);
    for (o, n) in old.chunks_exact(2).zip(new.chunks_exact(2)) {
        sum += u64::from(!u16::from_be_bytes([o[0], o[1]]));
        sum += u64::from(u16::from_be_bytes([n[0], n[1]]));
    }
    match !csum_fold(sum) {
        0 => 0xffff,
        c => c,
    }
}

/// Verifies the IPv4 header checksum of an Ethernet/IPv4 frame.
#[must_use]
pub fn ipv4_header_ok(frame: &[u8]) -> bool {
    parse_ipv4(frame).is_some() && Ipv4Packet::new_unchecked(&frame[ETH_HLEN..]).verify_checksum()
}

/// Verifies the L4 (UDP/TCP/ICMP) checksum of an Ethernet/IPv4 frame. A UDP checksum of 0
/// ("none") is accepted.
#[must_use]
pub fn l4_checksum_ok(frame: &[u8]) -> bool {
    let Some(ip) = parse_ipv4(frame) else {
        return false;
    };
    let seg = &frame[ip.l4_off..ip.end];
    let (src, dst) = (IpAddress::Ipv4(ip.src), IpAddress::Ipv4(ip.dst));
    match IpProtocol::from(ip.proto) {
        IpProtocol::Udp => UdpPacket::new_checked(seg).is_ok_and(|u| u.verify_checksum(&src, &dst)),
        IpProtocol::Tcp => TcpPacket::new_checked(seg).is_ok_and(|t| t.verify_checksum(&src, &dst)),
        IpProtocol::Icmp => Icmpv4Packet::new_checked(seg).is_ok_and(|i| i.verify_checksum()),
        _ => false,
    }
}
