//! A simulated virtio-net guest driver for tests, benchmarks and fuzzing.
//!
//! [`SimGuest`] plays the guest side of a vhost-user virtio-net device: it
//! creates guest memory in a memfd (two guest-physical regions with a hole
//! between them, at different file offsets), lays out split virtqueues
//! (virtio 1.2 §2.7) for every RX/TX pair, creates kick/call eventfds, and
//! hands out [`RxDriver`]/[`TxDriver`] — real split-ring drivers that
//! behave like Linux's `virtio_net`/`virtio_ring`: they honour EVENT_IDX,
//! MRG_RXBUF and INDIRECT_DESC, suppress kicks and interrupts as the
//! device and driver ask, and validate everything the device writes.
//!
//! The device under test gets the same information a vhost-user front-end
//! would send: [`SimGuest::regions`] (memory table) and
//! [`SimGuest::rx_queue`]/[`SimGuest::tx_queue`] (ring addresses and fds).
//! [`RawQueue`] (via `raw()`) and [`GuestMem`] let tests hand-craft
//! malformed chains.
//!
//! Modules: `config` (settings), `layout` (addresses), `memory` (memfd and
//! mapping), `ring` (raw split-ring access), `notify` (kick/interrupt
//! logic), `tx`/`rx` (drivers), `net_hdr` (packet header), `stats`,
//! `error`, `guest` ([`SimGuest`]).

mod config;
mod error;
mod guest;
mod layout;
mod memory;
mod net_hdr;
mod notify;
mod ring;
mod rx;
mod stats;
mod tx;

pub use config::{GuestConfig, MAX_QUEUE_SIZE};
pub use error::{DeviceError, Error};
pub use guest::{SimGuest, VirtqueueInfo};
pub use layout::{BUFFER_REGION_GPA, RING_REGION_GPA, SCRATCH_SIZE};
pub use memory::{GuestMem, MemoryRegionInfo};
pub use net_hdr::{
    features, VirtioNetHdr, VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VIRTIO_NET_HDR_F_RSC_INFO, VIRTIO_NET_HDR_GSO_ECN, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4, VIRTIO_NET_HDR_LEN,
};
pub use notify::vring_need_event;
pub use ring::{
    RawDesc, RawQueue, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
};
pub use rx::{RxDriver, RxPacket};
pub use stats::DriverStats;
pub use tx::TxDriver;
