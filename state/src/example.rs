//! A realistic, valid snapshot for tests and documentation (of this and other crates).

use crate::snapshot::{
    CarriedFrame, CarriedFrames, DeviceSnapshot, FdEntry, FdKind, InFlight, InFlightAction,
    MemoryRegionState, QueuePairState, SourceInfo, TapQueueState, VirtqueueState, F_EVENT_IDX,
    F_VERSION_1, VNET_HDR_LEN,
};

/// A valid snapshot of a device with two queue pairs of 256 descriptors over two memory
/// regions (2 GiB at 0, 1 GiB at 4 GiB), EVENT_IDX and MRG_RXBUF negotiated, RX chains in
/// flight on both pairs (one with `next_used` about to wrap), and a manifest laid out as
/// tapir-migrate lays it out: one fd per region, then per pair TAP, RX kick, RX call,
/// TX kick, TX call.
#[must_use]
pub fn example_snapshot() -> DeviceSnapshot {
    // CSUM, GUEST_CSUM, MTU, MAC, GUEST_TSO4/6, HOST_TSO4/6, MRG_RXBUF, STATUS, MQ.
    let net = (1 << 0)
        | (1 << 1)
        | (1 << 3)
        | (1 << 5)
        | (1 << 7)
        | (1 << 8)
        | (1 << 11)
        | (1 << 12)
        | (1 << 15)
        | (1 << 16)
        | (1 << 22);
    let queue = |index: u16, base: u64, next_used: u16, heads: &[u16], kick: u16| {
        let action = match index & 1 {
            0 => InFlightAction::RepostRx,
            _ => InFlightAction::CompleteTx,
        };
        let popped = u16::try_from(heads.len()).unwrap_or(u16::MAX);
        VirtqueueState {
            index,
            size: 256,
            desc_table: base,
            avail_ring: base.saturating_add(0x1000),
            used_ring: base.saturating_add(0x2000),
            next_avail: next_used.wrapping_add(popped),
            next_used,
            event_idx: true,
            signalled_used: Some(next_used.wrapping_sub(1)),
            in_flight: heads
                .iter()
                .map(|&head| InFlight { head, action })
                .collect(),
            kick_fd: kick,
            call_fd: kick.saturating_add(1),
            broken: false,
        }
    };
    let tap = |fd: u16| TapQueueState {
        vnet_hdr_len: VNET_HDR_LEN,
        offloads: 0x07, // TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        attached: true,
        fd,
    };
    let region_fd = |region: u16| FdEntry {
        kind: FdKind::MemoryRegion,
        queue_pair: None,
        region: Some(region),
    };
    let pair_fd = |kind: FdKind, pair: u16| FdEntry {
        kind,
        queue_pair: Some(pair),
        region: None,
    };
    let mut fds = vec![region_fd(0), region_fd(1)];
    for pair in 0..2 {
        fds.push(pair_fd(FdKind::TapQueue, pair));
        for _ in 0..2 {
            fds.push(pair_fd(FdKind::Kick, pair));
            fds.push(pair_fd(FdKind::Call, pair));
        }
    }
    DeviceSnapshot {
        features: F_VERSION_1 | F_EVENT_IDX | net,
        mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        mtu: 1500,
        status: 0x0f,
        memory: vec![
            MemoryRegionState {
                guest_addr: 0,
                size: 0x8000_0000,
                file_offset: 0,
                fd: 0,
            },
            MemoryRegionState {
                guest_addr: 0x1_0000_0000,
                size: 0x4000_0000,
                file_offset: 0x8000_0000,
                fd: 1,
            },
        ],
        queue_pairs: vec![
            QueuePairState {
                rx: queue(0, 0x10_0000, 1000, &[17, 4, 250], 3),
                tx: queue(1, 0x10_4000, 5000, &[], 5),
                tap: tap(2),
                rx_carried: carried(),
            },
            QueuePairState {
                rx: queue(2, 0x1_0010_0000, 65534, &[0, 1, 2, 3], 8),
                tx: queue(3, 0x1_0010_4000, 7, &[], 10),
                tap: tap(7),
                rx_carried: CarriedFrames::default(),
            },
        ],
        fds,
        source: SourceInfo {
            pid: 4242,
            version: "0.1.0".to_owned(),
            time_ns: 123_456_789_000,
            generation: 3,
        },
    }
}

/// One carried frame: a vnet header and a 60-byte Ethernet frame (a frame the source read
/// while the guest had no buffers for it).
fn carried() -> CarriedFrames {
    let frame = CarriedFrame::try_from(vec![0xab; usize::from(VNET_HDR_LEN) + 60]);
    CarriedFrames::try_from(frame.into_iter().collect::<Vec<_>>()).unwrap_or_default()
}
