//! The virtio-net packet header (`struct virtio_net_hdr_v1`, virtio 1.2 §5.1.6)
//! and the feature bits the simulated guest understands.

/// Length of the header that precedes every packet: `virtio_net_hdr_v1`
/// (VERSION_1 is always negotiated, so `num_buffers` is always present).
pub const VIRTIO_NET_HDR_LEN: usize = 12;

/// `flags`: the packet needs a checksum computed (`csum_start`/`csum_offset`).
pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum has been validated.
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
/// `flags`: RSC information is present (not used by this driver).
pub const VIRTIO_NET_HDR_F_RSC_INFO: u8 = 4;

/// `gso_type`: not a GSO frame.
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (UFO).
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6 segmentation.
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO).
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
/// `gso_type` bit: ECN (CWR) set on the TCP segments.
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// Feature bits as masks (virtio 1.2 §5.1.3 and §6).
pub mod features {
    /// Device handles packets with partial checksum (guest TX offload).
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    /// Driver handles packets with partial checksum (guest RX).
    pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// Driver can receive TSOv4.
    pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
    /// Driver can receive TSOv6.
    pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
    /// Driver can receive TSO with ECN.
    pub const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
    /// Driver can receive UFO.
    pub const VIRTIO_NET_F_GUEST_UFO: u64 = 1 << 10;
    /// Device can receive TSOv4 (guest TX).
    pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
    /// Device can receive TSOv6 (guest TX).
    pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
    /// Device can receive TSO with ECN.
    pub const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
    /// Device can receive UFO.
    pub const VIRTIO_NET_F_HOST_UFO: u64 = 1 << 14;
    /// Driver can merge receive buffers.
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// Multiqueue with automatic receive steering.
    pub const VIRTIO_NET_F_MQ: u64 = 1 << 22;
    /// Descriptors with `VIRTQ_DESC_F_INDIRECT`.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x compliance (always acked by this driver).
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    /// Driver can receive USOv4.
    pub const VIRTIO_NET_F_GUEST_USO4: u64 = 1 << 54;
    /// Driver can receive USOv6.
    pub const VIRTIO_NET_F_GUEST_USO6: u64 = 1 << 55;
    /// Device can receive USO.
    pub const VIRTIO_NET_F_HOST_USO: u64 = 1 << 56;
}

/// `struct virtio_net_hdr_v1`, host-endian fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VirtioNetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, possibly or'ed with [`VIRTIO_NET_HDR_GSO_ECN`].
    pub gso_type: u8,
    /// Length of the headers to replicate for each segment.
    pub hdr_len: u16,
    /// Segment size (payload bytes per segment).
    pub gso_size: u16,
    /// Offset where checksumming starts.
    pub csum_start: u16,
    /// Offset (after `csum_start`) where the checksum is stored.
    pub csum_offset: u16,
    /// Number of used buffers the packet spans (mergeable RX buffers).
    pub num_buffers: u16,
}

impl VirtioNetHdr {
    /// Serialises to the little-endian wire layout.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; VIRTIO_NET_HDR_LEN] {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Parses the little-endian wire layout.
    #[must_use]
    pub fn from_bytes(b: &[u8; VIRTIO_NET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_le() {
        let h = VirtioNetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            hdr_len: 0x0102,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 3,
        };
        let b = h.to_bytes();
        assert_eq!(b[2], 0x02);
        assert_eq!(b[3], 0x01);
        assert_eq!(&b[10..12], &[3, 0]);
        assert_eq!(VirtioNetHdr::from_bytes(&b), h);
    }
}
