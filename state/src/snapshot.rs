//! The snapshot types: plain data, no behaviour beyond [`DeviceSnapshot::validate`]
//! (in `validate.rs`).
//!
//! These types are also the wire format of the current codec version (see `codec.rs`):
//! reordering, adding or removing a field changes the encoding and needs a new format
//! version, which `tests/golden.rs` catches.

use serde::{Deserialize, Serialize};

/// Most queue pairs a snapshot may describe (virtio-net's `max_virtqueue_pairs` is a u16,
/// tapir runs one worker thread per pair; 256 is far beyond any host it runs on).
pub const MAX_QUEUE_PAIRS: usize = 256;
/// Most guest memory regions a snapshot may describe (vhost-user's `VHOST_USER_MAX_RAM_SLOTS`
/// is 512, QEMU uses a handful; tapir caps at 64).
pub const MAX_REGIONS: usize = 64;
/// Most entries in the fd manifest: one fd per region, five per queue pair (TAP queue and
/// a kick and a call eventfd per virtqueue), and 64 more (the vhost-user connection and
/// other passed fds), so that a snapshot at every other limit still fits (1408).
/// `SCM_RIGHTS` carries at most 253 fds per message; the handoff protocol sends the
/// manifest's fds in several messages. (The receiver's `RLIMIT_NOFILE` must allow them.)
pub const MAX_FDS: usize = MAX_REGIONS + 5 * MAX_QUEUE_PAIRS + MAX_EXTRA_FDS;
/// Manifest entries beyond those of regions and queue pairs that [`MAX_FDS`] leaves room for.
pub const MAX_EXTRA_FDS: usize = 64;
/// Largest split virtqueue size (virtio 1.2, 2.7: "Queue Size ... maximum is 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Longest [`SourceInfo::version`] string, in bytes.
pub const MAX_VERSION_LEN: usize = 64;
/// The vnet header tapir uses on its TAP queues (`virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: u8 = 12;
/// The legacy vnet header without `num_buffers`, also accepted on load.
pub const VNET_HDR_LEN_LEGACY: u8 = 10;
/// Every `TUN_F_*` offload bit the kernel knows: CSUM, TSO4, TSO6, TSO_ECN, UFO, USO4, USO6.
pub const TUN_F_KNOWN: u32 = 0x7f;
/// `VIRTIO_F_VERSION_1` as a mask: the only virtio revision tapir speaks.
pub const F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_RING_F_EVENT_IDX` as a mask.
pub const F_EVENT_IDX: u64 = 1 << 29;
/// Most frames a queue pair may carry across a handoff ([`QueuePairState::rx_carried`]): a
/// uring worker has at most its RX depth (64 by default) of reads waiting for guest buffers.
pub const MAX_CARRIED_FRAMES: usize = 64;
/// Shortest carried frame: the vnet header alone.
pub const MIN_CARRIED_FRAME: usize = VNET_HDR_LEN as usize;
/// Longest carried frame: the vnet header and the largest frame a TAP hands over (a 64 KiB
/// IP packet with Ethernet and VLAN headers, as with GSO; or an MTU of 65535).
pub const MAX_CARRIED_FRAME: usize = VNET_HDR_LEN as usize + 65_535 + 14 + 4;
/// Most bytes of carried frames in one snapshot, over all queue pairs: half of what a blob
/// may hold, so that the rest of a snapshot at every other limit still fits. A source with
/// more drops the youngest frames (counted) rather than fail the handoff.
pub const MAX_CARRIED_BYTES: usize = 512 * 1024;

/// Everything a successor needs to take over a running virtio-net device.
///
/// Untrusted plain data: a snapshot from another process is input, not truth, so
/// [`crate::decode`] checks it with [`DeviceSnapshot::validate`] before returning it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    /// Negotiated virtio feature bits (device and driver agreed on these).
    pub features: u64,
    /// The device's MAC address.
    pub mac: [u8; 6],
    /// The device's MTU.
    pub mtu: u16,
    /// The virtio device status byte (`ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK`, ...).
    pub status: u8,
    /// Guest memory regions, each backed by an fd of the manifest.
    pub memory: Vec<MemoryRegionState>,
    /// Queue pairs in order: pair `i` holds virtqueues `2i` (RX) and `2i + 1` (TX).
    pub queue_pairs: Vec<QueuePairState>,
    /// The fd manifest: entry `i` describes the `i`-th fd sent with `SCM_RIGHTS`.
    pub fds: Vec<FdEntry>,
    /// Who made the snapshot.
    pub source: SourceInfo,
}

/// One guest memory region: `size` bytes at `guest_addr`, mapped from `file_offset` of an fd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegionState {
    /// Guest physical address of the region's first byte.
    pub guest_addr: u64,
    /// Length of the region in bytes (non-zero).
    pub size: u64,
    /// Offset of the region's first byte in its fd.
    pub file_offset: u64,
    /// Index into [`DeviceSnapshot::fds`] of the fd backing the region
    /// (an [`FdKind::MemoryRegion`] entry naming this region).
    pub fd: u16,
}

/// One queue pair: its RX and TX virtqueues and the TAP queue they move frames to and from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuePairState {
    /// The receive virtqueue (index `2i`): the device fills guest buffers with frames.
    pub rx: VirtqueueState,
    /// The transmit virtqueue (index `2i + 1`): the device sends guest frames to the TAP.
    pub tx: VirtqueueState,
    /// The TAP queue of this pair.
    pub tap: TapQueueState,
    /// Frames the source read from the TAP but could not put into guest buffers yet (the
    /// guest had not posted enough), in the order they arrived: the successor delivers them
    /// before it reads anything from the TAP. Added in format version 2 (version 1 carried
    /// none: such frames were dropped).
    pub rx_carried: CarriedFrames,
}

/// A frame carried across a handoff: the 12-byte vnet header, then the Ethernet frame, as
/// the TAP returned it. Checked as it is decoded (`TryFrom<Vec<u8>>`): from
/// [`MIN_CARRIED_FRAME`] to [`MAX_CARRIED_FRAME`] bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<u8>", into = "Vec<u8>")]
pub struct CarriedFrame(Vec<u8>);

impl CarriedFrame {
    /// The frame's bytes (vnet header first).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
    /// The frame's bytes, owned.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl TryFrom<Vec<u8>> for CarriedFrame {
    type Error = crate::StateError;
    fn try_from(bytes: Vec<u8>) -> Result<Self, Self::Error> {
        if (MIN_CARRIED_FRAME..=MAX_CARRIED_FRAME).contains(&bytes.len()) {
            Ok(CarriedFrame(bytes))
        } else {
            Err(crate::StateError::CarriedFrameLength {
                len: bytes.len(),
                min: MIN_CARRIED_FRAME,
                max: MAX_CARRIED_FRAME,
            })
        }
    }
}

impl From<CarriedFrame> for Vec<u8> {
    fn from(f: CarriedFrame) -> Vec<u8> {
        f.0
    }
}

/// A queue pair's carried frames, in arrival order: at most [`MAX_CARRIED_FRAMES`], each a
/// [`CarriedFrame`]. Checked as it is decoded (`TryFrom<Vec<CarriedFrame>>`); the bytes of
/// all pairs together are bounded by [`DeviceSnapshot::validate`] ([`MAX_CARRIED_BYTES`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<CarriedFrame>", into = "Vec<CarriedFrame>")]
pub struct CarriedFrames(Vec<CarriedFrame>);

impl CarriedFrames {
    /// The frames, oldest first.
    pub fn frames(&self) -> &[CarriedFrame] {
        &self.0
    }
    /// Bytes of all frames together.
    pub fn total_bytes(&self) -> usize {
        self.0
            .iter()
            .map(|f| f.0.len())
            .fold(0usize, usize::saturating_add)
    }
    /// True when there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl TryFrom<Vec<CarriedFrame>> for CarriedFrames {
    type Error = crate::StateError;
    fn try_from(frames: Vec<CarriedFrame>) -> Result<Self, Self::Error> {
        if frames.len() > MAX_CARRIED_FRAMES {
            return Err(crate::StateError::TooManyCarriedFrames {
                count: frames.len(),
                max: MAX_CARRIED_FRAMES,
            });
        }
        Ok(CarriedFrames(frames))
    }
}

impl From<CarriedFrames> for Vec<CarriedFrame> {
    fn from(f: CarriedFrames) -> Vec<CarriedFrame> {
        f.0
    }
}

/// One split virtqueue, as the device sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtqueueState {
    /// The virtqueue's index on the device (`2i` for RX, `2i + 1` for TX of pair `i`).
    pub index: u16,
    /// Number of descriptors: a power of two, at most [`MAX_QUEUE_SIZE`].
    pub size: u16,
    /// Guest address of the descriptor table (`16 * size` bytes, 16-byte aligned).
    pub desc_table: u64,
    /// Guest address of the available ring (`6 + 2 * size` bytes, 2-byte aligned).
    pub avail_ring: u64,
    /// Guest address of the used ring (`6 + 8 * size` bytes, 4-byte aligned).
    pub used_ring: u64,
    /// The device's next index into the available ring (free-running, wraps at 2^16).
    pub next_avail: u16,
    /// The device's next index into the used ring (free-running, wraps at 2^16).
    pub next_used: u16,
    /// Whether `VIRTIO_RING_F_EVENT_IDX` is in use on this queue.
    pub event_idx: bool,
    /// used_event/avail_event bookkeeping the device needs to resume interrupt suppression
    /// exactly: the used index at the last interrupt sent, if any.
    pub signalled_used: Option<u16>,
    /// Popped, not yet used, in ring order; the successor handles them first.
    pub in_flight: Vec<InFlight>,
    /// Index into [`DeviceSnapshot::fds`] of the kick eventfd (guest -> device).
    pub kick_fd: u16,
    /// Index into [`DeviceSnapshot::fds`] of the call eventfd (device -> guest interrupt).
    pub call_fd: u16,
    /// The guest corrupted this ring: it is not serviced until the device is reset.
    pub broken: bool,
}

impl VirtqueueState {
    /// Where the rings are, as the snapshot says (checked with `RingAddresses::try_from`).
    #[must_use]
    pub fn addresses(&self) -> crate::RawRingAddresses {
        crate::RawRingAddresses {
            size: self.size,
            desc: self.desc_table,
            avail: self.avail_ring,
            used: self.used_ring,
        }
    }
    /// Where the device is in the rings.
    #[must_use]
    pub fn positions(&self) -> crate::RingPositions {
        crate::RingPositions::new(self.next_avail, self.next_used)
    }
    /// The heads in flight, in ring order (checked with `HeldHeads::at`).
    #[must_use]
    pub fn held_heads(&self) -> Vec<u16> {
        self.in_flight.iter().map(|f| f.head).collect()
    }
}

/// A descriptor chain the device popped from the available ring but has not put into the
/// used ring yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InFlight {
    /// The chain's head descriptor index (`< size`).
    pub head: u16,
    /// What the successor must do with the chain.
    pub action: InFlightAction,
}

/// What a successor does with an in-flight chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InFlightAction {
    /// An RX chain held by the device: post it in a read again.
    RepostRx,
    /// Reserved: a TX chain whose write completed but that is not in the used ring yet; the
    /// successor adds it to the used ring with length 0. (tapir's source waits for every TX
    /// write before snapshotting, so today no TX chain is ever in flight.)
    CompleteTx,
}

/// One TAP queue's settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TapQueueState {
    /// The vnet header size set with `TUNSETVNETHDRSZ`: [`VNET_HDR_LEN`] or
    /// [`VNET_HDR_LEN_LEGACY`].
    pub vnet_hdr_len: u8,
    /// The `TUN_F_*` offload flags set with `TUNSETOFFLOAD` (only bits of [`TUN_F_KNOWN`]).
    pub offloads: u32,
    /// Whether the queue is attached (`TUNSETQUEUE` with `IFF_ATTACH_QUEUE`).
    pub attached: bool,
    /// Index into [`DeviceSnapshot::fds`] of the TAP queue fd.
    pub fd: u16,
}

/// One entry of the fd manifest: what the fd at the same position is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FdEntry {
    /// What the fd is.
    pub kind: FdKind,
    /// The queue pair it belongs to (for [`FdKind::TapQueue`], [`FdKind::Kick`],
    /// [`FdKind::Call`]).
    pub queue_pair: Option<u16>,
    /// The memory region it backs (for [`FdKind::MemoryRegion`]).
    pub region: Option<u16>,
}

/// The kinds of fd a handoff passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FdKind {
    /// Backs a guest memory region (a memfd, usually).
    MemoryRegion,
    /// A TAP queue fd.
    TapQueue,
    /// A virtqueue's kick eventfd.
    Kick,
    /// A virtqueue's call eventfd.
    Call,
    /// The vhost-user connection to the VMM.
    VhostUserConnection,
    /// Anything else the successor needs; not referenced by the snapshot.
    Other,
}

/// Who made a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Process id of the source.
    pub pid: u32,
    /// The source's tapir version string (at most [`MAX_VERSION_LEN`] bytes).
    pub version: String,
    /// When the snapshot was taken, `CLOCK_MONOTONIC` nanoseconds.
    pub time_ns: u64,
    /// Handoff generation: 0 for a device started fresh, +1 per handoff.
    pub generation: u64,
}
