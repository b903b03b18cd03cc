//! A typed view of `virtio_net_hdr_v1` (virtio 1.2 §5.1.6), the 12-byte header in front of
//! every frame in the rings and on the TAP fd. Offsets live here and nowhere else.

use crate::tap::VNET_HDR_LEN;

mod field {
    use std::ops::Range;
    pub const FLAGS: usize = 0;
    pub const GSO_TYPE: usize = 1;
    pub const HDR_LEN: Range<usize> = 2..4;
    pub const GSO_SIZE: Range<usize> = 4..6;
    pub const CSUM_START: Range<usize> = 6..8;
    pub const CSUM_OFFSET: Range<usize> = 8..10;
    /// Written by the device with MRG_RXBUF; the TAP leaves these bytes untouched.
    pub const NUM_BUFFERS: Range<usize> = 10..12;
}

/// Offset of `num_buffers` in the header (the TAP skips these two bytes; tapir writes them).
pub const NUM_BUFFERS_OFFSET: usize = field::NUM_BUFFERS.start;

/// A decoded `virtio_net_hdr_v1`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `F_NEEDS_CSUM`, `F_DATA_VALID`.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Number of merged RX buffers.
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
    pub const F_NEEDS_CSUM: u8 = 1;
    /// `VIRTIO_NET_HDR_F_DATA_VALID`.
    pub const F_DATA_VALID: u8 = 2;
    /// `VIRTIO_NET_HDR_GSO_NONE`.
    pub const GSO_NONE: u8 = 0;
    /// `VIRTIO_NET_HDR_GSO_TCPV4`.
    pub const GSO_TCPV4: u8 = 1;
    /// `VIRTIO_NET_HDR_GSO_UDP`.
    pub const GSO_UDP: u8 = 3;
    /// `VIRTIO_NET_HDR_GSO_TCPV6`.
    pub const GSO_TCPV6: u8 = 4;
    /// `VIRTIO_NET_HDR_GSO_UDP_L4`.
    pub const GSO_UDP_L4: u8 = 5;
    /// `VIRTIO_NET_HDR_GSO_ECN`.
    pub const GSO_ECN: u8 = 0x80;
}

fn le16(b: &[u8; VNET_HDR_LEN], r: std::ops::Range<usize>) -> u16 {
    u16::from_le_bytes([b[r.start], b[r.start + 1]])
}

impl VirtioNetHdr {
    /// Decodes the header.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> VirtioNetHdr {
        VirtioNetHdr {
            flags: b[field::FLAGS],
            gso_type: b[field::GSO_TYPE],
            hdr_len: le16(b, field::HDR_LEN),
            gso_size: le16(b, field::GSO_SIZE),
            csum_start: le16(b, field::CSUM_START),
            csum_offset: le16(b, field::CSUM_OFFSET),
            num_buffers: le16(b, field::NUM_BUFFERS),
        }
    }

    /// Decodes the first 12 bytes of `b`; None if it is shorter.
    pub fn parse(b: &[u8]) -> Option<VirtioNetHdr> {
        let head: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        Some(VirtioNetHdr::from_bytes(head))
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[field::FLAGS] = self.flags;
        b[field::GSO_TYPE] = self.gso_type;
        b[field::HDR_LEN].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[field::GSO_SIZE].copy_from_slice(&self.gso_size.to_le_bytes());
        b[field::CSUM_START].copy_from_slice(&self.csum_start.to_le_bytes());
        b[field::CSUM_OFFSET].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[field::NUM_BUFFERS].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// The GSO type without the ECN bit.
    pub fn gso_kind(&self) -> u8 {
        self.gso_type & !Self::GSO_ECN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = VirtioNetHdr {
            flags: VirtioNetHdr::F_NEEDS_CSUM,
            gso_type: VirtioNetHdr::GSO_TCPV4 | VirtioNetHdr::GSO_ECN,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(&b[10..12], &3u16.to_le_bytes());
        assert_eq!(VirtioNetHdr::from_bytes(&b), h);
        assert_eq!(h.gso_kind(), VirtioNetHdr::GSO_TCPV4);
    }
}
