//! Configuration of the simulated guest ([`GuestConfig`]) and its validation.

use crate::error::Error;
use crate::net_hdr::features::{
    VIRTIO_F_VERSION_1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::net_hdr::VIRTIO_NET_HDR_LEN;

/// Largest split virtqueue size allowed by the specification.
pub const MAX_QUEUE_SIZE: u16 = 32768;

/// How the guest is set up: queues, features, buffer geometry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestConfig {
    /// Number of RX/TX queue pairs (default 1).
    pub queue_pairs: u16,
    /// Virtqueue size, a power of two `<= 32768` (default 256).
    pub queue_size: u16,
    /// Feature bits the driver acks (VERSION_1 is always added). The driver
    /// follows them: EVENT_IDX, MRG_RXBUF and INDIRECT_DESC change its
    /// behaviour. Default: VERSION_1 | RING_EVENT_IDX | MRG_RXBUF | CSUM |
    /// GUEST_CSUM.
    pub features: u64,
    /// Bytes per RX chain including the 12-byte header (default 2048).
    pub rx_buffer_size: u32,
    /// Descriptors each RX chain is split over (default 1). The pieces are
    /// not contiguous in guest memory, so a device must honour descriptor
    /// boundaries.
    pub rx_descs_per_chain: u16,
    /// Maximum header + frame bytes per TX slot (default 65562 + 14).
    pub tx_buffer_size: u32,
    /// TX chain is `[header desc, frame desc]` instead of one descriptor.
    pub tx_split_header: bool,
    /// Descriptors at the top of each descriptor table (RX and TX) that the
    /// normal driver never uses, left to [`RawQueue`](crate::RawQueue) users
    /// for hand-built chains (default 8). Clamped to `queue_size / 4`, so
    /// small queues work without touching it; see
    /// [`reserved_descs`](Self::reserved_descs).
    pub raw_reserved_descs: u16,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            queue_pairs: 1,
            queue_size: 256,
            features: VIRTIO_F_VERSION_1
                | VIRTIO_RING_F_EVENT_IDX
                | VIRTIO_NET_F_MRG_RXBUF
                | VIRTIO_NET_F_CSUM
                | VIRTIO_NET_F_GUEST_CSUM,
            rx_buffer_size: 2048,
            rx_descs_per_chain: 1,
            tx_buffer_size: 65562 + 14,
            tx_split_header: false,
            raw_reserved_descs: 8,
        }
    }
}

impl GuestConfig {
    /// The features the driver acks: `features | VERSION_1`.
    #[must_use]
    pub fn acked_features(&self) -> u64 {
        self.features | VIRTIO_F_VERSION_1
    }

    /// Whether `VIRTIO_RING_F_EVENT_IDX` is acked.
    #[must_use]
    pub fn event_idx(&self) -> bool {
        self.features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    /// Whether `VIRTIO_NET_F_MRG_RXBUF` is acked.
    #[must_use]
    pub fn mrg_rxbuf(&self) -> bool {
        self.features & VIRTIO_NET_F_MRG_RXBUF != 0
    }

    /// Whether `VIRTIO_RING_F_INDIRECT_DESC` is acked.
    #[must_use]
    pub fn indirect_desc(&self) -> bool {
        self.features & VIRTIO_RING_F_INDIRECT_DESC != 0
    }

    /// Descriptors actually reserved for raw use per queue:
    /// `min(raw_reserved_descs, queue_size / 4)`.
    #[must_use]
    pub fn reserved_descs(&self) -> u16 {
        self.raw_reserved_descs.min(self.queue_size / 4)
    }

    /// Checks the configuration for consistency.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::InvalidConfig(m.to_owned()));
        if self.queue_pairs == 0 || self.queue_pairs > 0x7fff {
            return bad("queue_pairs must be in 1..=32767");
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return bad("queue_size must be a power of two <= 32768");
        }
        let usable = self.queue_size - self.reserved_descs();
        if self.rx_descs_per_chain == 0 || self.rx_descs_per_chain > usable {
            return bad("rx_descs_per_chain must be in 1..=queue_size-raw_reserved_descs");
        }
        let tx_descs = if self.tx_split_header && !self.indirect_desc() {
            2
        } else {
            1
        };
        if usable < tx_descs {
            return bad("queue too small for one TX chain");
        }
        if (self.rx_buffer_size as usize) < VIRTIO_NET_HDR_LEN
            || self.rx_buffer_size < u32::from(self.rx_descs_per_chain)
        {
            return bad("rx_buffer_size must hold the header and one byte per descriptor");
        }
        if self.tx_buffer_size as usize <= VIRTIO_NET_HDR_LEN {
            return bad("tx_buffer_size must be larger than the header");
        }
        Ok(())
    }
}
