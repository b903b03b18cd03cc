//! The crate's error enum and the small types that say *where* a snapshot is wrong.

use std::fmt;

use crate::snapshot::{FdKind, InFlightAction};

/// Everything that can be wrong with a blob or a snapshot. Each rule has its own variant,
/// carrying the place (queue, region, fd index) and the bad value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    // ---- framing -------------------------------------------------------------------------
    /// The input is shorter than the fixed header.
    #[error("snapshot blob too short: {len} bytes, the header alone is {need}")]
    TooShort {
        /// Input length.
        len: usize,
        /// Header length.
        need: usize,
    },
    /// The input does not start with `TAPIRSNP`.
    #[error("not a tapir snapshot: magic is {found:02x?}, expected \"TAPIRSNP\"")]
    BadMagic {
        /// The first 8 bytes of the input.
        found: [u8; 8],
    },
    /// Written by a newer tapir than this one.
    #[error("snapshot format version {found} is newer than this build supports ({supported})")]
    FutureVersion {
        /// Version in the blob.
        found: u16,
        /// Newest version this build decodes.
        supported: u16,
    },
    /// A format version that never existed (0) or is no longer decoded.
    #[error("snapshot format version {found} is not supported (oldest supported: {oldest})")]
    UnsupportedVersion {
        /// Version in the blob.
        found: u16,
        /// Oldest version this build decodes.
        oldest: u16,
    },
    /// The reserved header field is not zero.
    #[error("reserved header field is {found:#06x}, must be 0")]
    ReservedNonZero {
        /// Its value.
        found: u16,
    },
    /// The length field exceeds the largest payload accepted (refused before reading it).
    #[error("payload length {len} exceeds the maximum of {max} bytes")]
    TooLarge {
        /// The length field.
        len: u64,
        /// Largest payload accepted.
        max: u64,
    },
    /// The payload is shorter than the length field says.
    #[error("snapshot truncated: header announces {expected} payload bytes, {found} present")]
    Truncated {
        /// The length field.
        expected: usize,
        /// Bytes present after the header.
        found: usize,
    },
    /// Bytes follow the payload.
    #[error("{extra} trailing bytes after the {expected}-byte payload")]
    TrailingBytes {
        /// The length field.
        expected: usize,
        /// Bytes beyond it.
        extra: usize,
    },
    /// The payload's CRC32 does not match the header's.
    #[error(
        "payload checksum mismatch: header says {expected:#010x}, payload is {computed:#010x}"
    )]
    Checksum {
        /// Checksum in the header.
        expected: u32,
        /// Checksum of the payload present.
        computed: u32,
    },
    /// The payload passed its checksum but is not a valid encoding of the version's types.
    #[error("malformed version {version} payload")]
    Malformed {
        /// The format version it was decoded as.
        version: u16,
        /// What the decoder found.
        #[source]
        source: postcard::Error,
    },
    /// The payload decoded but did not use all its bytes.
    #[error("{unused} unused bytes at the end of the version {version} payload")]
    PayloadTrailingBytes {
        /// The format version it was decoded as.
        version: u16,
        /// Bytes left over.
        unused: usize,
    },
    /// Encoding produced a blob larger than [`crate::MAX_BLOB`] (only from
    /// [`crate::try_encode`]).
    #[error("encoded snapshot is {len} bytes, more than the maximum of {max}")]
    EncodedTooLarge {
        /// Blob length.
        len: usize,
        /// [`crate::MAX_BLOB`].
        max: usize,
    },

    // ---- device --------------------------------------------------------------------------
    /// `VIRTIO_F_VERSION_1` is not among the features.
    #[error("features {features:#018x} lack VIRTIO_F_VERSION_1 (bit 32)")]
    MissingVersion1 {
        /// The features.
        features: u64,
    },
    /// The source version string is too long.
    #[error("source version string is {len} bytes, at most {max} allowed")]
    SourceVersionTooLong {
        /// Its length in bytes.
        len: usize,
        /// [`crate::MAX_VERSION_LEN`].
        max: usize,
    },

    // ---- memory --------------------------------------------------------------------------
    /// No memory region.
    #[error("no guest memory region")]
    NoMemory,
    /// Too many memory regions.
    #[error("{count} memory regions, at most {max} allowed")]
    TooManyRegions {
        /// Number of regions.
        count: usize,
        /// [`crate::MAX_REGIONS`].
        max: usize,
    },
    /// A region of size 0.
    #[error("memory region {region} is empty")]
    EmptyRegion {
        /// Region index.
        region: usize,
    },
    /// `guest_addr + size` overflows.
    #[error(
        "memory region {region} at {guest_addr:#x} with size {size:#x} wraps the address space"
    )]
    RegionWraps {
        /// Region index.
        region: usize,
        /// Its guest address.
        guest_addr: u64,
        /// Its size.
        size: u64,
    },
    /// `file_offset + size` overflows.
    #[error("memory region {region}: file offset {file_offset:#x} + size {size:#x} overflows")]
    FileOffsetWraps {
        /// Region index.
        region: usize,
        /// Its file offset.
        file_offset: u64,
        /// Its size.
        size: u64,
    },
    /// Two regions share guest addresses.
    #[error("memory regions {first} and {second} overlap")]
    RegionsOverlap {
        /// Lower region index.
        first: usize,
        /// Higher region index.
        second: usize,
    },

    // ---- queue pairs and virtqueues ------------------------------------------------------
    /// No queue pair.
    #[error("no queue pair")]
    NoQueuePairs,
    /// Too many queue pairs.
    #[error("{count} queue pairs, at most {max} allowed")]
    TooManyQueuePairs {
        /// Number of pairs.
        count: usize,
        /// [`crate::MAX_QUEUE_PAIRS`].
        max: usize,
    },
    /// A virtqueue's index is not `2i` (RX) or `2i + 1` (TX) of its pair.
    #[error("{queue}: virtqueue index is {found}, expected {expected}")]
    QueueIndex {
        /// Which queue.
        queue: QueueRef,
        /// Index it must have.
        expected: u32,
        /// Index it has.
        found: u16,
    },
    /// The queue size is not a power of two in `1..=32768`.
    #[error("{queue}: size {size} is not a power of two in 1..=32768")]
    QueueSize {
        /// Which queue.
        queue: QueueRef,
        /// The size.
        size: u16,
    },
    /// A ring's address is not aligned as the virtio spec requires.
    #[error("{queue}: {ring} at {addr:#x} is not {align}-byte aligned")]
    RingMisaligned {
        /// Which queue.
        queue: QueueRef,
        /// Which ring.
        ring: Ring,
        /// Its guest address.
        addr: u64,
        /// Required alignment.
        align: u64,
    },
    /// A ring does not lie entirely inside one memory region.
    #[error("{queue}: {ring} [{addr:#x}, +{len:#x}) is not inside one guest memory region")]
    RingOutsideMemory {
        /// Which queue.
        queue: QueueRef,
        /// Which ring.
        ring: Ring,
        /// Its guest address.
        addr: u64,
        /// Its length in bytes.
        len: u64,
    },
    /// The queue's `event_idx` disagrees with `VIRTIO_RING_F_EVENT_IDX` in the features.
    #[error(
        "{queue}: event_idx is {event_idx} but VIRTIO_RING_F_EVENT_IDX is negotiated: {negotiated}"
    )]
    EventIdxMismatch {
        /// Which queue.
        queue: QueueRef,
        /// The queue's flag.
        event_idx: bool,
        /// Whether the feature is negotiated.
        negotiated: bool,
    },
    /// More chains popped than the queue holds.
    #[error("{queue}: next_avail {next_avail} is more than the queue size {size} ahead of next_used {next_used}")]
    AvailAheadOfUsed {
        /// Which queue.
        queue: QueueRef,
        /// Its `next_avail`.
        next_avail: u16,
        /// Its `next_used`.
        next_used: u16,
        /// Its size.
        size: u16,
    },
    /// More in-flight chains than the queue holds.
    #[error("{queue}: {count} chains in flight, the queue holds {size}")]
    TooManyInFlight {
        /// Which queue.
        queue: QueueRef,
        /// In-flight entries.
        count: usize,
        /// Queue size.
        size: u16,
    },
    /// The in-flight list does not account for every popped, unused chain.
    #[error("{queue}: {count} chains in flight, but next_avail - next_used = {popped}")]
    InFlightCount {
        /// Which queue.
        queue: QueueRef,
        /// In-flight entries.
        count: usize,
        /// `next_avail - next_used` (wrapping).
        popped: u16,
    },
    /// An in-flight head is not a descriptor index.
    #[error("{queue}: in-flight entry {position} has head {head}, queue size is {size}")]
    InFlightHeadOutOfRange {
        /// Which queue.
        queue: QueueRef,
        /// Position in the in-flight list.
        position: usize,
        /// The head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// The same head appears twice in flight.
    #[error("{queue}: head {head} is in flight twice")]
    DuplicateInFlightHead {
        /// Which queue.
        queue: QueueRef,
        /// The head.
        head: u16,
    },
    /// An RX entry that is not `RepostRx`, or a TX entry that is not `CompleteTx`.
    #[error("{queue}: in-flight head {head} has action {action:?}, not valid on this queue")]
    WrongInFlightAction {
        /// Which queue.
        queue: QueueRef,
        /// The head.
        head: u16,
        /// Its action.
        action: InFlightAction,
    },

    // ---- TAP queues ----------------------------------------------------------------------
    /// A vnet header size tapir does not use.
    #[error("queue pair {pair}: TAP vnet header length {len}, expected 12 or 10")]
    VnetHdrLen {
        /// Queue pair index.
        pair: usize,
        /// The length.
        len: u8,
    },
    /// Offload bits beyond the known `TUN_F_*` flags.
    #[error("queue pair {pair}: TAP offloads {offloads:#x} have unknown bits {unknown:#x}")]
    UnknownOffloads {
        /// Queue pair index.
        pair: usize,
        /// The offloads.
        offloads: u32,
        /// The unknown bits.
        unknown: u32,
    },

    // ---- fd manifest ---------------------------------------------------------------------
    /// A carried frame is shorter than a vnet header or longer than a TAP may hand over.
    #[error("a carried RX frame of {len} bytes (must be {min} to {max})")]
    CarriedFrameLength {
        /// Its length.
        len: usize,
        /// Shortest allowed.
        min: usize,
        /// Longest allowed.
        max: usize,
    },
    /// A queue pair carries more frames than a worker can hold.
    #[error("{count} carried RX frames in one queue pair, at most {max}")]
    TooManyCarriedFrames {
        /// How many.
        count: usize,
        /// Most allowed.
        max: usize,
    },
    /// The carried frames of all queue pairs exceed their share of a blob.
    #[error("{total} bytes of carried RX frames, at most {max}")]
    CarriedBytes {
        /// Bytes over all pairs.
        total: usize,
        /// Most allowed.
        max: usize,
    },
    /// Too many manifest entries.
    #[error("{count} fd manifest entries, at most {max} allowed")]
    TooManyFds {
        /// Number of entries.
        count: usize,
        /// [`crate::MAX_FDS`].
        max: usize,
    },
    /// An fd index beyond the manifest.
    #[error("{user}: fd index {index} is beyond the {count}-entry manifest")]
    FdIndexOutOfRange {
        /// What refers to it.
        user: FdUser,
        /// The index.
        index: u16,
        /// Manifest length.
        count: usize,
    },
    /// An fd index naming a manifest entry of the wrong kind.
    #[error("{user}: fd {index} is a {found:?} fd, expected {expected:?}")]
    FdKindMismatch {
        /// What refers to it.
        user: FdUser,
        /// The index.
        index: u16,
        /// Kind the user needs.
        expected: FdKind,
        /// Kind in the manifest.
        found: FdKind,
    },
    /// A manifest entry whose `queue_pair`/`region` does not name its user.
    #[error("{user}: fd {index} is recorded for queue pair {queue_pair:?}, region {region:?}")]
    FdOwnerMismatch {
        /// What refers to it.
        user: FdUser,
        /// The index.
        index: u16,
        /// The entry's `queue_pair`.
        queue_pair: Option<u16>,
        /// The entry's `region`.
        region: Option<u16>,
    },
    /// Two users share one fd.
    #[error("fd {index} is used twice: by {first} and by {second}")]
    FdSharedBy {
        /// The index.
        index: u16,
        /// The first user.
        first: FdUser,
        /// The second user.
        second: FdUser,
    },
    /// A manifest entry nothing refers to (only `VhostUserConnection` and `Other` may be).
    #[error("fd {index} ({kind:?}) is in the manifest but nothing uses it")]
    FdUnreferenced {
        /// The index.
        index: usize,
        /// Its kind.
        kind: FdKind,
    },
}

/// The two virtqueues of a pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The receive queue (`2i`).
    Rx,
    /// The transmit queue (`2i + 1`).
    Tx,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rx => "rx",
            Self::Tx => "tx",
        })
    }
}

/// Names one virtqueue: queue pair index and direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueRef {
    /// Queue pair index.
    pub pair: usize,
    /// RX or TX.
    pub dir: Direction,
}

impl fmt::Display for QueueRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "queue pair {} {}", self.pair, self.dir)
    }
}

/// The three parts of a split virtqueue in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ring {
    /// The descriptor table.
    Desc,
    /// The available (driver) ring.
    Avail,
    /// The used (device) ring.
    Used,
}

impl fmt::Display for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Desc => "descriptor table",
            Self::Avail => "available ring",
            Self::Used => "used ring",
        })
    }
}

/// What refers to an fd of the manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FdUser {
    /// Memory region (index).
    Region(usize),
    /// The TAP queue of a queue pair (index).
    Tap(usize),
    /// A virtqueue's kick eventfd.
    Kick(QueueRef),
    /// A virtqueue's call eventfd.
    Call(QueueRef),
}

impl fmt::Display for FdUser {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Region(r) => write!(f, "memory region {r}"),
            Self::Tap(p) => write!(f, "queue pair {p} tap"),
            Self::Kick(q) => write!(f, "{q} kick"),
            Self::Call(q) => write!(f, "{q} call"),
        }
    }
}
