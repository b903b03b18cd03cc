//! Virtio feature bits tapir offers and what the negotiated set implies for the datapath.

use crate::tap::offload;

/// `VIRTIO_NET_F_CSUM`: the device accepts packets with partial checksums (guest TX).
pub const NET_F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the driver accepts packets with partial checksums (guest RX).
pub const NET_F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_MTU`.
pub const NET_F_MTU: u64 = 1 << 3;
/// `VIRTIO_NET_F_MAC`.
pub const NET_F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const NET_F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub const NET_F_GUEST_TSO6: u64 = 1 << 8;
/// `VIRTIO_NET_F_GUEST_ECN`.
pub const NET_F_GUEST_ECN: u64 = 1 << 9;
/// `VIRTIO_NET_F_GUEST_UFO`.
pub const NET_F_GUEST_UFO: u64 = 1 << 10;
/// `VIRTIO_NET_F_HOST_TSO4`.
pub const NET_F_HOST_TSO4: u64 = 1 << 11;
/// `VIRTIO_NET_F_HOST_TSO6`.
pub const NET_F_HOST_TSO6: u64 = 1 << 12;
/// `VIRTIO_NET_F_HOST_ECN`.
pub const NET_F_HOST_ECN: u64 = 1 << 13;
/// `VIRTIO_NET_F_HOST_UFO`.
pub const NET_F_HOST_UFO: u64 = 1 << 14;
/// `VIRTIO_NET_F_MRG_RXBUF`.
pub const NET_F_MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_STATUS`.
pub const NET_F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_CTRL_VQ`.
pub const NET_F_CTRL_VQ: u64 = 1 << 17;
/// `VIRTIO_NET_F_MQ`.
pub const NET_F_MQ: u64 = 1 << 22;
/// `VIRTIO_F_INDIRECT_DESC`.
pub const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_RING_EVENT_IDX`.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_NET_F_HOST_USO`.
pub const NET_F_HOST_USO: u64 = 1 << 56;
/// `VIRTIO_NET_F_GUEST_USO4`.
pub const NET_F_GUEST_USO4: u64 = 1 << 54;
/// `VIRTIO_NET_F_GUEST_USO6`.
pub const NET_F_GUEST_USO6: u64 = 1 << 55;

/// Everything the datapath implements (a VMM offers these and acks the guest's subset).
pub const SUPPORTED: u64 = NET_F_CSUM
    | NET_F_GUEST_CSUM
    | NET_F_MTU
    | NET_F_MAC
    | NET_F_GUEST_TSO4
    | NET_F_GUEST_TSO6
    | NET_F_GUEST_ECN
    | NET_F_GUEST_UFO
    | NET_F_HOST_TSO4
    | NET_F_HOST_TSO6
    | NET_F_HOST_ECN
    | NET_F_HOST_UFO
    | NET_F_MRG_RXBUF
    | NET_F_STATUS
    | NET_F_MQ
    | F_INDIRECT_DESC
    | F_EVENT_IDX
    | F_VERSION_1
    | NET_F_HOST_USO
    | NET_F_GUEST_USO4
    | NET_F_GUEST_USO6;

/// Largest frame a TAP hands to a reader without GSO: MTU + Ethernet header + VLAN tag.
pub fn max_plain_frame(mtu: u16) -> usize {
    usize::from(mtu) + 14 + 4
}

/// Largest frame (without the vnet header) a TAP may hand over when the guest accepts GSO
/// super-frames: a 64 KiB IP packet plus Ethernet and VLAN headers.
pub const MAX_GSO_FRAME: usize = 65_535 + 14 + 4;

/// True when the guest accepts any kind of GSO frame on RX (the TAP may then hand us
/// super-frames of up to [`MAX_GSO_FRAME`] bytes).
pub fn guest_accepts_gso(features: u64) -> bool {
    features
        & (NET_F_GUEST_TSO4
            | NET_F_GUEST_TSO6
            | NET_F_GUEST_UFO
            | NET_F_GUEST_USO4
            | NET_F_GUEST_USO6)
        != 0
}

/// The bytes an RX read must be able to take (header included) so that no frame the TAP can
/// produce under these features is truncated.
pub fn rx_frame_capacity(features: u64, mtu: u16) -> usize {
    let frame = if guest_accepts_gso(features) {
        MAX_GSO_FRAME
    } else {
        max_plain_frame(mtu)
    };
    crate::tap::VNET_HDR_LEN + frame
}

/// TAP offload flags matching what the guest accepts on RX (virtio 1.2 §5.1.6.4: the device
/// may only hand over what the driver negotiated).
pub fn tap_offload_flags(features: u64) -> u32 {
    let mut flags = 0;
    if features & NET_F_GUEST_CSUM != 0 {
        flags |= offload::CSUM;
        if features & NET_F_GUEST_TSO4 != 0 {
            flags |= offload::TSO4;
        }
        if features & NET_F_GUEST_TSO6 != 0 {
            flags |= offload::TSO6;
        }
        if features & NET_F_GUEST_ECN != 0 && flags & (offload::TSO4 | offload::TSO6) != 0 {
            flags |= offload::TSO_ECN;
        }
        if features & NET_F_GUEST_UFO != 0 {
            flags |= offload::UFO;
        }
        if features & NET_F_GUEST_USO4 != 0 {
            flags |= offload::USO4;
        }
        if features & NET_F_GUEST_USO6 != 0 {
            flags |= offload::USO6;
        }
    }
    flags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offloads_need_guest_csum() {
        assert_eq!(tap_offload_flags(NET_F_GUEST_TSO4), 0);
        assert_eq!(
            tap_offload_flags(NET_F_GUEST_CSUM | NET_F_GUEST_TSO4 | NET_F_GUEST_ECN),
            offload::CSUM | offload::TSO4 | offload::TSO_ECN
        );
    }

    #[test]
    fn rx_capacity_follows_gso() {
        assert_eq!(rx_frame_capacity(0, 1500), 12 + 1518);
        assert_eq!(rx_frame_capacity(NET_F_GUEST_TSO4, 1500), 12 + 65_553);
    }
}
