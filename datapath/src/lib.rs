//! tapir-datapath: a performance-first virtio-net datapath between a guest's split virtqueues
//! and a multiqueue TAP, through io_uring (or epoll, as the `classic` baseline).
//!
//! A VMM embeds it like this: map guest memory ([`GuestMemory::from_regions`]), open or adopt
//! the TAP ([`Tap`]), describe each queue pair ([`QueuePairSpec`]: ring addresses, kick and call
//! eventfds, a TAP queue) and [`Device::start`] it with the negotiated features
//! ([`DeviceConfig`], [`features`]). One worker thread per queue pair runs until
//! [`Device::stop`] or [`Device::quiesce`] ends it; [`Device::start_paused`] and
//! [`QuiescedDevice`] are the two halves of a handoff. [`Counters`] are per queue pair.
//!
//! Everything public is re-exported here; the modules behind it are private, one concern
//! each: `tap` (TAP ioctls), `memory` (mapping, translation, dirty log, the SIGBUS guard),
//! `ring_view` (a queue's rings translated once at start into a checked host view: the one
//! place that dereferences guest memory by hand), `chain` (descriptor chains to iovecs, both directions), `vnet_hdr`
//! (the header), `virtqueue` (ring protocol + eventfds + broken state), `pair` (the device
//! logic of a queue pair, shared by the engines, the notification protocol included),
//! `rx_pool` (the RX chains a pair holds), `engine` (uring and classic), `device` (workers),
//! `stats` (counters), `fd_check` (what a handed-in fd must be).
//!
//! Two namespaces stay modules: [`features`] (virtio feature bits and what follows from them)
//! and, behind the `test-utils` feature, `testing` (a queue pair driven in process without a
//! TAP, for unit tests and fuzz targets).

mod chain;
mod device;
mod engine;
mod fd_check;
pub mod features;
mod memory;
mod pair;
mod ring_view;
mod rx_pool;
mod stats;
mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
mod virtqueue;
mod vnet_hdr;

// The device lifecycle and its configuration.
pub use device::{
    Decided, Decider, Device, DeviceConfig, DeviceError, PairResources, PausedDevice,
    QueuePairSpec, QuiescedDevice, QuiescedPair,
};
pub use pair::{PairPositions, MAX_CARRIED_FRAMES};
pub use virtqueue::{QueueConfig, QueueError};

// Engines, for an embedder that runs a queue pair on its own thread.
pub use engine::{
    new_engine, uring_available, Engine, EngineConfig, EngineError, EngineKind, Leftovers,
    WorkerFault,
};
pub use pair::{
    Direction, PairSettings, QueuePair, RxCompletion, RxPrep, RxRead, RxRetry, TxPop, TxWrite,
};
pub use virtqueue::{used_index, GiveBack, Kick, Virtqueue};

// Guest memory and the SIGBUS guard of mappings a frontend can shrink.
pub use memory::fault::{
    recovered_faults, register as guard_mapping, Registration as MappingGuard,
};
pub use memory::{GuestMemory, MemoryError, MemoryRegionSpec, RegionInfo, MAX_GUEST_MEMORY};

// The TAP and its header.
pub use tap::{offload, Tap, TapError, TapQueue, VNET_HDR_LEN};
pub use vnet_hdr::VirtioNetHdr;

// Counters.
pub use stats::{monotonic_ns, Counters, QueuePairStats, SharedCounters};

// Checks of handed-in fds (also used by the vhost-user backend and the handoff).
pub use fd_check::{
    expect_eventfd, expect_file_range, expect_listening_socket, is_listening_socket, link_target,
    FdCheckError,
};
