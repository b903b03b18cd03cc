//! Format version 1, frozen: the snapshot types as they were before version 2 added
//! [`crate::QueuePairState::rx_carried`]. Only the types that changed are copied; the
//! others (`VirtqueueState`, `TapQueueState`, ...) are still encoded as in version 1. If one
//! of them changes, copy it here first, unchanged (`tests/golden.rs` keeps a v1 blob
//! decoding).

use serde::Deserialize;

use crate::snapshot::{
    CarriedFrames, FdEntry, MemoryRegionState, SourceInfo, TapQueueState, VirtqueueState,
};

/// Version 1's `DeviceSnapshot`.
#[derive(Deserialize)]
pub(super) struct DeviceSnapshot {
    features: u64,
    mac: [u8; 6],
    mtu: u16,
    status: u8,
    memory: Vec<MemoryRegionState>,
    queue_pairs: Vec<QueuePairState>,
    fds: Vec<FdEntry>,
    source: SourceInfo,
}

/// Version 1's `QueuePairState`: no carried frames.
#[derive(Deserialize)]
struct QueuePairState {
    rx: VirtqueueState,
    tx: VirtqueueState,
    tap: TapQueueState,
}

/// A version-1 snapshot in the current types: no frame was carried (a version-1 source
/// dropped the frames that waited for guest buffers).
pub(super) fn upgrade(s: DeviceSnapshot) -> crate::DeviceSnapshot {
    crate::DeviceSnapshot {
        features: s.features,
        mac: s.mac,
        mtu: s.mtu,
        status: s.status,
        memory: s.memory,
        queue_pairs: s
            .queue_pairs
            .into_iter()
            .map(|p| crate::QueuePairState {
                rx: p.rx,
                tx: p.tx,
                tap: p.tap,
                rx_carried: CarriedFrames::default(),
            })
            .collect(),
        fds: s.fds,
        source: s.source,
    }
}
