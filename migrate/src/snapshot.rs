//! Describing a device as a `tapir-state` snapshot plus the fds that travel with it, and
//! rebuilding queue-pair specs from one.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use tapir_datapath::features::{tap_offload_flags, F_EVENT_IDX};
use tapir_datapath::VNET_HDR_LEN;
use tapir_datapath::{DeviceConfig, GuestMemory, PairPositions, PairResources};
use tapir_state::{
    CarriedFrame, CarriedFrames, DeviceSnapshot, FdEntry, FdKind, InFlight, InFlightAction,
    MemoryRegionState, QueuePairState, RingAddresses, RingPositions, SourceInfo, TapQueueState,
    VirtqueueState,
};

/// The carried frames of every pair, as the snapshot holds them: at most
/// [`tapir_state::MAX_CARRIED_BYTES`] over all pairs (the youngest frames beyond it, and any
/// frame of a length no TAP hands over, are dropped and logged: a successor would refuse
/// the snapshot, and the handoff with it).
fn carried_frames(positions: Option<&[PairPositions]>, pairs: usize) -> Vec<CarriedFrames> {
    let mut budget = tapir_state::MAX_CARRIED_BYTES;
    let mut out = Vec::with_capacity(pairs);
    for i in 0..pairs {
        let mut frames = Vec::new();
        let all = positions
            .and_then(|p| p.get(i))
            .map(|p| p.rx_carried.as_slice())
            .unwrap_or_default();
        for f in all.iter().take(tapir_state::MAX_CARRIED_FRAMES) {
            if f.len() > budget {
                tracing::warn!(
                    pair = i,
                    bytes = f.len(),
                    "carried RX frame over the snapshot's budget: dropped"
                );
                continue;
            }
            match CarriedFrame::try_from(f.clone()) {
                Ok(frame) => {
                    budget = budget.saturating_sub(f.len());
                    frames.push(frame);
                }
                Err(e) => tracing::warn!(pair = i, error = %e, "carried RX frame dropped"),
            }
        }
        out.push(CarriedFrames::try_from(frames).unwrap_or_default());
    }
    out
}

fn u16_of(n: usize) -> u16 {
    u16::try_from(n).unwrap_or(u16::MAX)
}

/// Describes a device: its configuration, memory, rings and (optionally) positions. The fds
/// come back in manifest order: each region's backing fd, then per pair the TAP queue, RX
/// kick, RX call, TX kick, TX call. Without positions, every ring is at 0 with nothing in
/// flight (the layout a successor prepares with before the switch).
pub fn describe<'a>(
    config: &DeviceConfig,
    memory: &'a GuestMemory,
    resources: &'a [PairResources],
    positions: Option<&[PairPositions]>,
    generation: u64,
) -> (DeviceSnapshot, Vec<BorrowedFd<'a>>) {
    let mut fds: Vec<BorrowedFd<'a>> = Vec::new();
    let mut manifest = Vec::new();
    let mut regions = Vec::new();
    for (i, r) in memory.regions().into_iter().enumerate() {
        regions.push(MemoryRegionState {
            guest_addr: r.guest_addr,
            size: r.size,
            file_offset: r.file_offset,
            fd: u16_of(fds.len()),
        });
        manifest.push(FdEntry {
            kind: FdKind::MemoryRegion,
            queue_pair: None,
            region: Some(u16_of(i)),
        });
        fds.push(r.fd);
    }
    let event_idx = config.features & F_EVENT_IDX != 0;
    let mut pairs = Vec::new();
    let mut carried = carried_frames(positions, resources.len()).into_iter();
    for (i, res) in resources.iter().enumerate() {
        let qp = Some(u16_of(i));
        let mut add = |kind: FdKind, fd: BorrowedFd<'a>| {
            let index = u16_of(fds.len());
            manifest.push(FdEntry {
                kind,
                queue_pair: qp,
                region: None,
            });
            fds.push(fd);
            index
        };
        let tap = add(FdKind::TapQueue, res.tap.as_fd());
        let rx_kick = add(FdKind::Kick, res.rx_kick.as_fd());
        let rx_call = add(FdKind::Call, res.rx_call.as_fd());
        let tx_kick = add(FdKind::Kick, res.tx_kick.as_fd());
        let tx_call = add(FdKind::Call, res.tx_call.as_fd());
        let pos = positions
            .and_then(|p| p.get(i))
            .cloned()
            .unwrap_or_default();
        let queue = |index: u16,
                     addrs: &RingAddresses,
                     pos: RingPositions,
                     held: &[u16],
                     kick: u16,
                     call: u16,
                     action: InFlightAction| {
            VirtqueueState {
                index,
                size: addrs.size().get(),
                desc_table: addrs.desc(),
                avail_ring: addrs.avail(),
                used_ring: addrs.used(),
                next_avail: pos.next_avail,
                next_used: pos.next_used,
                event_idx,
                signalled_used: None,
                in_flight: held.iter().map(|&head| InFlight { head, action }).collect(),
                kick_fd: kick,
                call_fd: call,
                broken: false,
            }
        };
        let index = u16_of(i);
        pairs.push(QueuePairState {
            rx: queue(
                index.saturating_mul(2),
                &res.rx,
                pos.rx,
                &pos.rx_in_flight,
                rx_kick,
                rx_call,
                InFlightAction::RepostRx,
            ),
            tx: queue(
                index.saturating_mul(2).saturating_add(1),
                &res.tx,
                pos.tx,
                // tapir's source waits for every TX write before it stops: none held.
                &[],
                tx_kick,
                tx_call,
                InFlightAction::CompleteTx,
            ),
            tap: TapQueueState {
                vnet_hdr_len: u8::try_from(VNET_HDR_LEN).unwrap_or(12),
                offloads: tap_offload_flags(config.features),
                attached: true,
                fd: tap,
            },
            rx_carried: carried.next().unwrap_or_default(),
        });
    }
    let snapshot = DeviceSnapshot {
        features: config.features,
        mac: config.mac,
        mtu: config.mtu,
        status: 0x0f,
        memory: regions,
        queue_pairs: pairs,
        fds: manifest,
        source: SourceInfo {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            time_ns: tapir_datapath::monotonic_ns(),
            generation,
        },
    };
    (snapshot, fds)
}

/// True when two snapshots describe the same device (everything but positions, in-flight
/// heads and source information): a successor checks that the switch-time snapshot matches
/// what it prepared with.
pub fn same_layout(a: &DeviceSnapshot, b: &DeviceSnapshot) -> bool {
    let strip = |s: &DeviceSnapshot| {
        let mut s = s.clone();
        s.source = SourceInfo::default();
        for p in &mut s.queue_pairs {
            for q in [&mut p.rx, &mut p.tx] {
                q.next_avail = 0;
                q.next_used = 0;
                q.in_flight.clear();
                q.signalled_used = None;
                q.broken = false;
            }
            p.rx_carried = CarriedFrames::default();
        }
        s
    };
    strip(a) == strip(b)
}

/// Takes fd `index` out of the received list (each is used once).
pub fn take_fd(fds: &mut [Option<OwnedFd>], index: u16) -> Option<OwnedFd> {
    fds.get_mut(usize::from(index)).and_then(Option::take)
}
