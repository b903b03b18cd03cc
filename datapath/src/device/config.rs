//! What a VMM describes a device with: its configuration, each queue pair's rings, eventfds
//! and TAP queue, what a handoff carries of them, and the errors of the lifecycle.

use std::os::fd::{AsFd, OwnedFd};

use tapir_state::RingAddresses;

use crate::engine::{EngineConfig, EngineError, EngineKind};
use crate::features;
use crate::tap::{TapError, TapQueue};
use crate::virtqueue::{QueueConfig, QueueError};

/// How to run the device.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// The negotiated (driver-acked) virtio features.
    pub features: u64,
    /// Link MTU.
    pub mtu: u16,
    /// The device's MAC address (carried through handoffs; the datapath does not filter).
    pub mac: [u8; 6],
    /// Which engine the workers run.
    pub engine: EngineKind,
    /// Engine tunables.
    pub engine_config: EngineConfig,
    /// CPU to pin each queue pair's worker to (by queue pair index); none: not pinned.
    pub cpu_affinity: Vec<Option<usize>>,
}

impl DeviceConfig {
    /// A configuration for these features and engine, MTU 1500, default tunables, no pinning.
    pub fn new(features: u64, engine: EngineKind) -> DeviceConfig {
        DeviceConfig {
            features,
            mtu: 1500,
            mac: [0; 6],
            engine,
            engine_config: EngineConfig::default(),
            cpu_affinity: Vec::new(),
        }
    }
}

/// What a successor needs of a queue pair besides its ring positions: ring addresses and
/// duplicates of its fds (taken at start, so they can be sent while the workers run).
#[derive(Debug)]
pub struct PairResources {
    /// RX rings.
    pub rx: RingAddresses,
    /// TX rings.
    pub tx: RingAddresses,
    /// The TAP queue.
    pub tap: OwnedFd,
    /// RX kick eventfd.
    pub rx_kick: OwnedFd,
    /// RX call eventfd.
    pub rx_call: OwnedFd,
    /// TX kick eventfd.
    pub tx_kick: OwnedFd,
    /// TX call eventfd.
    pub tx_call: OwnedFd,
}

pub(super) fn dup_fd(fd: std::os::fd::BorrowedFd<'_>) -> Result<OwnedFd, DeviceError> {
    fd.try_clone_to_owned().map_err(|source| DeviceError::Os {
        what: "dup",
        source,
    })
}

impl PairResources {
    pub(super) fn of(spec: &QueuePairSpec) -> Result<PairResources, DeviceError> {
        Ok(PairResources {
            rx: spec.rx.ring,
            tx: spec.tx.ring,
            tap: dup_fd(spec.tap.as_fd())?,
            rx_kick: dup_fd(spec.rx.kick.as_fd())?,
            rx_call: dup_fd(spec.rx.call.as_fd())?,
            tx_kick: dup_fd(spec.tx.kick.as_fd())?,
            tx_call: dup_fd(spec.tx.call.as_fd())?,
        })
    }
}

/// One queue pair as the VMM hands it over.
#[derive(Debug)]
pub struct QueuePairSpec {
    /// RX virtqueue (2n).
    pub rx: QueueConfig,
    /// TX virtqueue (2n + 1).
    pub tx: QueueConfig,
    /// The TAP queue serving this pair.
    pub tap: TapQueue,
    /// RX heads a predecessor popped and did not use, in ring order (empty for a fresh
    /// device): they are posted first, before anything new is popped.
    pub rx_in_flight: Vec<u16>,
    /// Frames a predecessor (or this device before a ring stop) read from the TAP and did
    /// not deliver, oldest first, vnet header included (empty for a fresh device): delivered
    /// before anything is read from the TAP. Beyond 64, dropped and counted
    /// (`rx_dropped_no_buffers`).
    pub rx_carried: Vec<Vec<u8>>,
}

/// Errors of starting and stopping a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Features tapir does not implement, or VERSION_1 missing.
    #[error("unsupported features {0:#x} (tapir needs VERSION_1 and supports {sup:#x})", sup = features::SUPPORTED)]
    UnsupportedFeatures(u64),
    /// No queue pairs.
    #[error("a device needs at least one queue pair")]
    NoQueuePairs,
    /// A virtqueue's configuration.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// The TAP.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// An eventfd or thread could not be created.
    #[error("{what}: {source}")]
    Os {
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A kick or call fd is not an eventfd.
    #[error(transparent)]
    Fd(#[from] crate::fd_check::FdCheckError),
    /// A worker's engine failed.
    #[error("queue pair {pair}: {source}")]
    Engine {
        /// Queue pair index.
        pair: u16,
        /// The cause.
        #[source]
        source: EngineError,
    },
    /// A worker panicked (a bug in tapir).
    #[error("queue pair {0}: worker thread panicked")]
    WorkerPanicked(u16),
}
