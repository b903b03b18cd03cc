//! tapir-state: the snapshot of a running device that a handoff carries.
//!
//! Plain data and its codec, no I/O and no fds (those travel separately with `SCM_RIGHTS`,
//! in the order of the snapshot's fd manifest):
//!
//! - `snapshot`: [`DeviceSnapshot`] and its parts (features, MAC, MTU, memory regions, per
//!   queue pair the two virtqueues' ring positions and in-flight heads and the TAP queue
//!   settings, the fd manifest, who made it);
//! - `codec`: [`encode`] / [`decode`], a versioned, length-prefixed, CRC-checked postcard
//!   blob (layout and versioning rules in the module);
//! - `validate`: [`DeviceSnapshot::validate`], every field against the memory map, the
//!   queue sizes and the manifest; [`decode`] calls it, so a decoded snapshot is consistent;
//! - `ring`: the one vocabulary for ring state ([`RingAddresses`], [`RingPositions`],
//!   [`HeldHeads`], [`QueueSize`]), checked on the way in (`TryFrom`), shared by the
//!   datapath, the handoff and the vhost-user backend;
//! - `inspect`: [`to_json`] for `tapir state inspect`;
//! - `example`: [`example_snapshot`], a valid snapshot for tests.
//!
//! A blob is untrusted input: every failure is a [`StateError`], never a panic.
//!
//! ```
//! let s = tapir_state::example_snapshot();
//! let blob = tapir_state::try_encode(&s).unwrap();
//! assert_eq!(tapir_state::decode(&blob).unwrap(), s);
//! ```

mod codec;
mod error;
mod example;
mod inspect;
mod ring;
mod snapshot;
mod validate;

pub use codec::{
    decode, decode_unvalidated, encode, seal, try_encode, unseal, Header, CURRENT_VERSION,
    HEADER_LEN, MAGIC, MAX_BLOB, MAX_PAYLOAD, OLDEST_VERSION,
};
pub use error::{Direction, FdUser, QueueRef, Ring, StateError};
pub use example::example_snapshot;
pub use inspect::{feature_names, status_names, to_json};
pub use ring::{
    part_align, HeldHeads, QueueSize, RawRingAddresses, RingAddresses, RingError, RingPositions,
};
pub use snapshot::{
    CarriedFrame, CarriedFrames, DeviceSnapshot, FdEntry, FdKind, InFlight, InFlightAction,
    MemoryRegionState, QueuePairState, SourceInfo, TapQueueState, VirtqueueState, F_EVENT_IDX,
    F_VERSION_1, MAX_CARRIED_BYTES, MAX_CARRIED_FRAME, MAX_CARRIED_FRAMES, MAX_EXTRA_FDS, MAX_FDS,
    MAX_QUEUE_PAIRS, MAX_QUEUE_SIZE, MAX_REGIONS, MAX_VERSION_LEN, MIN_CARRIED_FRAME, TUN_F_KNOWN,
    VNET_HDR_LEN, VNET_HDR_LEN_LEGACY,
};
