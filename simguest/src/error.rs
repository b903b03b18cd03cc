//! Error types of the simulated guest driver.
//!
//! [`Error`] covers configuration mistakes, system call failures and misuse of
//! the API; [`DeviceError`] describes device bugs the driver detected while
//! validating what the device wrote into the used ring (the driver never
//! trusts device input, so a buggy datapath shows up as an error, not a panic).

/// Everything that can go wrong in `tapir-simguest`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The [`GuestConfig`](crate::GuestConfig) is not usable.
    #[error("invalid guest configuration: {0}")]
    InvalidConfig(String),
    /// A system call (memfd, mmap, eventfd, poll) failed.
    #[error("system call failed: {0}")]
    Sys(#[from] nix::Error),
    /// The header plus frame does not fit into one TX slot.
    #[error(
        "frame of {len} bytes plus the virtio-net header exceeds the TX buffer size of {max} bytes"
    )]
    FrameTooLarge {
        /// Length of the frame (without header).
        len: usize,
        /// Configured `tx_buffer_size` (header included).
        max: usize,
    },
    /// A guest-physical range is not (entirely) backed by guest memory.
    #[error("guest address range {gpa:#x}+{len:#x} is not backed by guest memory")]
    BadAddress {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: u64,
    },
    /// The scratch allocator cannot satisfy a request.
    #[error("scratch area exhausted: requested {requested} bytes, {available} left")]
    OutOfScratch {
        /// Bytes requested (before alignment).
        requested: u64,
        /// Bytes still free in the scratch area.
        available: u64,
    },
    /// A queue pair index beyond `queue_pairs`.
    #[error("queue pair {0} does not exist")]
    NoSuchPair(u16),
    /// `take_pair` was called twice for the same pair.
    #[error("queue pair {0} was already taken")]
    PairTaken(u16),
    /// The device violated the virtio specification on a queue.
    #[error("device bug on virtqueue {queue}: {kind}")]
    Device {
        /// Virtqueue index (virtio-net numbering).
        queue: u16,
        /// What the device did wrong.
        kind: DeviceError,
    },
}

/// A device bug detected by the driver while consuming the used ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The used entry names a descriptor id that is not the head of a chain the
    /// driver currently has outstanding.
    #[error("used entry names id {id}, which is not an outstanding chain head")]
    UnknownId {
        /// The id from the used element.
        id: u32,
    },
    /// The used length exceeds the capacity of the chain.
    #[error("used length {len} of id {id} exceeds the chain capacity of {cap} bytes")]
    LenTooLarge {
        /// The id from the used element.
        id: u32,
        /// The length from the used element.
        len: u32,
        /// Bytes the chain can hold.
        cap: u32,
    },
    /// The first buffer of a packet is shorter than the virtio-net header.
    #[error("used length {len} of id {id} is shorter than the 12-byte virtio-net header")]
    ShortPacket {
        /// The id from the used element.
        id: u32,
        /// The length from the used element.
        len: u32,
    },
    /// A merged-buffer header with `num_buffers == 0`.
    #[error("num_buffers is 0 in a mergeable-buffer header")]
    ZeroBuffers,
    /// `num_buffers` is larger than the number of chains the driver posted.
    #[error("num_buffers {num} exceeds the {posted} RX chains outstanding")]
    TooManyBuffers {
        /// `num_buffers` from the header.
        num: u16,
        /// Chains outstanding when the packet was seen.
        posted: u16,
    },
    /// The used index advanced by more than the queue size.
    #[error("used index advanced by {delta}, more than the queue size {size}")]
    UsedIdxJump {
        /// `used.idx - last_seen_used`.
        delta: u16,
        /// Queue size.
        size: u16,
    },
}
