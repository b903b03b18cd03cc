//! tapir-datapath: a performance-first virtio-net datapath between a guest's split virtqueues
//! and a multiqueue TAP, through io_uring (or epoll, as the `classic` baseline).
//!
//! A VMM embeds it like this: map guest memory ([`GuestMemory::from_regions`]), open or adopt
//! the TAP ([`Tap`]), describe each queue pair ([`QueuePairSpec`]: ring addresses, kick and call
//! eventfds, a TAP queue) and [`Device::start`] it with the negotiated features. One worker
//! thread per queue pair runs until [`Device::stop`] quiesces it.
//!
//! Module map (one concern each): [`tap`] (TAP ioctls), [`memory`] (mapping, translation,
//! dirty log), [`chain`] (descriptor chains to iovecs, both directions), [`vnet_hdr`] (the
//! header), [`virtqueue`] (ring + eventfds + broken state), [`pair`] (the device logic of a
//! queue pair, shared by the engines, the notification protocol included), `rx_pool` (the RX
//! chains a pair holds), [`engine`] (uring and classic, behind [`engine::new_engine`]),
//! [`device`] (workers), [`stats`] (counters), [`features`] (feature bits and what follows
//! from them).
//!
//! The door is moving to the re-exports below: the modules still public are so for the
//! crates that import through them today (vhost-user, migrate, bench, tests, fuzz); new code
//! imports from the crate root.

pub mod chain;
pub mod device;
pub mod engine;
pub mod fd_check;
pub mod features;
pub mod memory;
pub mod pair;
mod rx_pool;
pub mod stats;
pub mod tap;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod virtqueue;
pub mod vnet_hdr;

pub use device::{
    Device, DeviceConfig, DeviceError, PairResources, PausedDevice, QueuePairSpec, QuiescedDevice,
    QuiescedPair, RingAddrs,
};
pub use engine::{new_engine, Engine, EngineConfig, EngineError, EngineKind, WorkerFault};
pub use memory::{GuestMemory, MemoryError, MemoryRegionSpec};
pub use pair::{
    Direction, PairPositions, PairSettings, QueuePair, RxCompletion, RxPrep, RxRead, RxRetry,
    TxPop, TxWrite,
};
pub use stats::Counters;
pub use tap::{Tap, TapError, TapQueue};
pub use virtqueue::{used_index, QueueConfig, QueueError, Virtqueue};
