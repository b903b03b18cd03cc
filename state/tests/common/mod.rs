//! Builders shared by the integration tests: consistent snapshots from a few parameters,
//! and blobs framed by hand (to put a valid checksum over any payload).

#![allow(dead_code)] // each test binary uses a different subset

use tapir_state::{
    DeviceSnapshot, FdEntry, FdKind, InFlight, InFlightAction, MemoryRegionState, QueuePairState,
    SourceInfo, TapQueueState, VirtqueueState, F_EVENT_IDX, F_VERSION_1, HEADER_LEN, MAGIC,
};

/// Frames `payload` with a correct length and checksum.
pub fn frame(version: u16, reserved: u16, payload: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(HEADER_LEN + payload.len());
    blob.extend_from_slice(&MAGIC);
    blob.extend_from_slice(&version.to_le_bytes());
    blob.extend_from_slice(&reserved.to_le_bytes());
    blob.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
    blob.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    blob.extend_from_slice(payload);
    blob
}

/// The payload of a blob.
pub fn payload(blob: &[u8]) -> &[u8] {
    &blob[HEADER_LEN..]
}

/// One virtqueue's free parameters.
#[derive(Clone, Debug)]
pub struct QueueParams {
    /// log2 of the queue size.
    pub size_log2: u8,
    /// `next_used`.
    pub next_used: u16,
    /// Chains popped: this modulo `size + 1`.
    pub popped: u32,
    /// Seed of the order of the in-flight heads.
    pub seed: u64,
    /// `signalled_used`.
    pub signalled_used: Option<u16>,
    /// `broken`.
    pub broken: bool,
}

/// One queue pair's free parameters.
#[derive(Clone, Debug)]
pub struct PairParams {
    /// RX queue.
    pub rx: QueueParams,
    /// TX queue.
    pub tx: QueueParams,
    /// 12-byte (true) or 10-byte vnet header.
    pub hdr12: bool,
    /// Offloads, masked to the known bits.
    pub offloads: u32,
    /// Attached.
    pub attached: bool,
}

/// A whole snapshot's free parameters.
#[derive(Clone, Debug)]
pub struct SnapshotParams {
    /// Features besides VERSION_1 and EVENT_IDX.
    pub features: u64,
    /// Whether EVENT_IDX is negotiated.
    pub event_idx: bool,
    /// MAC.
    pub mac: [u8; 6],
    /// MTU.
    pub mtu: u16,
    /// Status.
    pub status: u8,
    /// Per region: gap before it, size, file offset (all bounded by the strategy).
    pub regions: Vec<(u64, u64, u64)>,
    /// Queue pairs.
    pub pairs: Vec<PairParams>,
    /// Extra unreferenced manifest entries: true = VhostUserConnection, false = Other.
    pub extras: Vec<bool>,
    /// Seed of the manifest order.
    pub manifest_seed: u64,
    /// Source info.
    pub source: SourceInfo,
}

/// A xorshift step: deterministic shuffles without a dependency.
fn next(state: &mut u64) -> u64 {
    let mut x = *state | 1;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn shuffled(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut s = seed;
    for i in (1..n).rev() {
        let j = usize::try_from(next(&mut s) % u64::try_from(i + 1).unwrap()).unwrap();
        v.swap(i, j);
    }
    v
}

fn align(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Builds a snapshot that satisfies every validation rule.
pub fn build(p: &SnapshotParams) -> DeviceSnapshot {
    let mut features = (p.features | F_VERSION_1) & !F_EVENT_IDX;
    if p.event_idx {
        features |= F_EVENT_IDX;
    }

    // Rings of every queue go into region 0, packed after each other.
    let base = align(p.regions[0].0, 0x1000);
    let mut cursor = base;
    let mut queues = Vec::new();
    for (pair, pp) in p.pairs.iter().enumerate() {
        for (dir, qp) in [(0u16, &pp.rx), (1u16, &pp.tx)] {
            let size = 1u16 << qp.size_log2;
            let s = u64::from(size);
            let desc = align(cursor, 16);
            let avail = align(desc + 16 * s, 2);
            let used = align(avail + 6 + 2 * s, 4);
            cursor = used + 6 + 8 * s;
            let popped = u16::try_from(qp.popped % (u32::from(size) + 1)).unwrap();
            let action = if dir == 0 {
                InFlightAction::RepostRx
            } else {
                InFlightAction::CompleteTx
            };
            let in_flight = shuffled(usize::from(size), qp.seed)
                .into_iter()
                .take(usize::from(popped))
                .map(|h| InFlight {
                    head: u16::try_from(h).unwrap(),
                    action,
                })
                .collect();
            queues.push(VirtqueueState {
                index: u16::try_from(2 * pair).unwrap() + dir,
                size,
                desc_table: desc,
                avail_ring: avail,
                used_ring: used,
                next_avail: qp.next_used.wrapping_add(popped),
                next_used: qp.next_used,
                event_idx: p.event_idx,
                signalled_used: qp.signalled_used,
                in_flight,
                kick_fd: 0,
                call_fd: 0,
                broken: qp.broken,
            });
        }
    }
    let mut memory = Vec::new();
    let mut end = base;
    for (i, &(gap, size, file_offset)) in p.regions.iter().enumerate() {
        let (guest_addr, size) = if i == 0 {
            (base, size.max(cursor - base))
        } else {
            (end + gap, size)
        };
        end = guest_addr + size;
        memory.push(MemoryRegionState {
            guest_addr,
            size,
            file_offset,
            fd: 0,
        });
    }

    // The manifest in logical order, then shuffled; references follow the shuffle.
    let mut logical = Vec::new();
    for r in 0..memory.len() {
        logical.push(FdEntry {
            kind: FdKind::MemoryRegion,
            queue_pair: None,
            region: Some(u16::try_from(r).unwrap()),
        });
    }
    for pair in 0..p.pairs.len() {
        for kind in [
            FdKind::TapQueue,
            FdKind::Kick,
            FdKind::Call,
            FdKind::Kick,
            FdKind::Call,
        ] {
            logical.push(FdEntry {
                kind,
                queue_pair: Some(u16::try_from(pair).unwrap()),
                region: None,
            });
        }
    }
    for &vhost in &p.extras {
        logical.push(FdEntry {
            kind: if vhost {
                FdKind::VhostUserConnection
            } else {
                FdKind::Other
            },
            queue_pair: None,
            region: None,
        });
    }
    let pos = shuffled(logical.len(), p.manifest_seed);
    let mut fds = logical.clone();
    for (j, e) in logical.into_iter().enumerate() {
        fds[pos[j]] = e;
    }
    let at = |j: usize| u16::try_from(pos[j]).unwrap();
    for (r, m) in memory.iter_mut().enumerate() {
        m.fd = at(r);
    }
    let mut queues = queues.into_iter();
    let mut pairs = Vec::new();
    for (pair, pp) in p.pairs.iter().enumerate() {
        let first = memory.len() + 5 * pair;
        let mut rx = queues.next().unwrap();
        let mut tx = queues.next().unwrap();
        rx.kick_fd = at(first + 1);
        rx.call_fd = at(first + 2);
        tx.kick_fd = at(first + 3);
        tx.call_fd = at(first + 4);
        pairs.push(QueuePairState {
            rx,
            tx,
            tap: TapQueueState {
                vnet_hdr_len: if pp.hdr12 { 12 } else { 10 },
                offloads: pp.offloads & 0x7f,
                attached: pp.attached,
                fd: at(first),
            },
            rx_carried: Default::default(),
        });
    }
    DeviceSnapshot {
        features,
        mac: p.mac,
        mtu: p.mtu,
        status: p.status,
        memory,
        queue_pairs: pairs,
        fds,
        source: p.source.clone(),
    }
}

/// Simple parameters: `pairs` pairs of size `2^size_log2`, RX queues full of in-flight heads.
pub fn simple(pairs: usize, size_log2: u8, regions: usize) -> SnapshotParams {
    let q = |popped: u32, seed: u64| QueueParams {
        size_log2,
        next_used: 65530,
        popped,
        seed,
        signalled_used: None,
        broken: false,
    };
    SnapshotParams {
        features: 1 << 15,
        event_idx: true,
        mac: [2, 0, 0, 0, 0, 1],
        mtu: 1500,
        status: 0x0f,
        regions: (0..regions).map(|_| (0x1000, 0x10_0000, 0)).collect(),
        pairs: (0..pairs)
            .map(|i| PairParams {
                rx: q(1 << size_log2, u64::try_from(i).unwrap()),
                tx: q(0, 0),
                hdr12: true,
                offloads: 7,
                attached: true,
            })
            .collect(),
        extras: vec![],
        manifest_seed: 0,
        source: SourceInfo::default(),
    }
}
