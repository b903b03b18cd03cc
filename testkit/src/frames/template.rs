//! In-place sequence rewriting for traffic generators: where a template frame's payload
//! lives, and how its checksum follows a rewrite.

use std::net::Ipv4Addr;

use smoltcp::wire::{IpAddress, IpProtocol, TcpPacket, UdpPacket};

use super::checksum::csum_replace;
use super::parse::{parse_ipv4, parse_udp};
use super::payload::{write_payload, PAYLOAD_HDR_LEN, PAYLOAD_SEQ_OFF};

/// How the L4 checksum of a template must be maintained when its payload changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CsumFixup {
    /// No payload-dependent checksum (UDP checksum 0, or a partial checksum that an offload
    /// completes).
    None,
    /// A full UDP checksum.
    Udp,
}

/// Where a template frame's seq/flow payload lives, for cheap per-packet rewriting by
/// generators.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadLoc {
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Offset of the payload.
    pub payload_off: usize,
    /// End of the payload.
    pub payload_end: usize,
    /// Checksum maintenance.
    pub fixup: CsumFixup,
    /// The addresses of the pseudo-header (for full recomputation).
    src: Ipv4Addr,
    dst: Ipv4Addr,
}

impl PayloadLoc {
    /// Locates the payload of an Ethernet/IPv4 UDP or TCP frame. `partial_csum` says the L4
    /// checksum is completed by an offload (vnet `NEEDS_CSUM`) and so needs no maintenance.
    /// `None` if the frame is neither or its payload is shorter than [`PAYLOAD_HDR_LEN`].
    #[must_use]
    pub fn locate(frame: &[u8], partial_csum: bool) -> Option<Self> {
        let ip = parse_ipv4(frame)?;
        let segment = &frame[ip.l4_off..ip.end];
        let (payload_off, fixup) = match IpProtocol::from(ip.proto) {
            IpProtocol::Udp => {
                let u = parse_udp(frame)?;
                let fix = if partial_csum || u.checksum == 0 {
                    CsumFixup::None
                } else {
                    CsumFixup::Udp
                };
                (u.payload_off, fix)
            }
            IpProtocol::Tcp if partial_csum => {
                let tcp = TcpPacket::new_checked(segment).ok()?;
                (ip.l4_off + usize::from(tcp.header_len()), CsumFixup::None)
            }
            _ => return None,
        };
        if ip.end - payload_off < PAYLOAD_HDR_LEN {
            return None;
        }
        Some(Self {
            l4_off: ip.l4_off,
            payload_off,
            payload_end: ip.end,
            fixup,
            src: ip.src,
            dst: ip.dst,
        })
    }

    /// Rewrites only the sequence number (8 bytes) and updates the checksum incrementally.
    /// O(1).
    pub fn set_seq(&self, frame: &mut [u8], seq: u64) {
        let off = self.payload_off + PAYLOAD_SEQ_OFF;
        let mut old = [0u8; 8];
        old.copy_from_slice(&frame[off..off + 8]);
        let new = seq.to_le_bytes();
        frame[off..off + 8].copy_from_slice(&new);
        if self.fixup == CsumFixup::Udp {
            // RFC 1624 works on 16-bit words: the rewritten bytes must start at an even
            // offset of the checksummed segment.
            if (off - self.l4_off) & 1 == 0 {
                let mut udp = UdpPacket::new_unchecked(&mut frame[self.l4_off..self.payload_end]);
                let csum = udp.checksum();
                udp.set_checksum(csum_replace(csum, &old, &new));
            } else {
                self.recompute(frame);
            }
        }
    }

    /// Rewrites the whole payload (header + pattern) for `flow`/`seq` and recomputes the
    /// checksum if needed. O(payload).
    pub fn set_payload(&self, frame: &mut [u8], flow: u32, seq: u64) {
        write_payload(&mut frame[self.payload_off..self.payload_end], flow, seq);
        self.recompute(frame);
    }

    fn recompute(&self, frame: &mut [u8]) {
        if self.fixup == CsumFixup::Udp {
            UdpPacket::new_unchecked(&mut frame[self.l4_off..self.payload_end])
                .fill_checksum(&IpAddress::Ipv4(self.src), &IpAddress::Ipv4(self.dst));
        }
    }
}
