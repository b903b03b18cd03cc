//! Properties: decode never panics, whatever it is given; consistent snapshots round-trip.

mod common;

use common::{build, frame, payload, PairParams, QueueParams, SnapshotParams};
use proptest::prelude::*;
use tapir_state::{
    decode, decode_unvalidated, encode, example_snapshot, to_json, try_encode, DeviceSnapshot,
    FdEntry, FdKind, InFlight, InFlightAction, MemoryRegionState, QueuePairState, SourceInfo,
    TapQueueState, VirtqueueState, CURRENT_VERSION, HEADER_LEN,
};

fn queue_params() -> impl Strategy<Value = QueueParams> {
    (
        0u8..=9,
        any::<u16>(),
        any::<u32>(),
        any::<u64>(),
        any::<Option<u16>>(),
        any::<bool>(),
    )
        .prop_map(
            |(size_log2, next_used, popped, seed, signalled_used, broken)| QueueParams {
                size_log2,
                next_used,
                popped,
                seed,
                signalled_used,
                broken,
            },
        )
}

fn pair_params() -> impl Strategy<Value = PairParams> {
    (
        queue_params(),
        queue_params(),
        any::<bool>(),
        any::<u32>(),
        any::<bool>(),
    )
        .prop_map(|(rx, tx, hdr12, offloads, attached)| PairParams {
            rx,
            tx,
            hdr12,
            offloads,
            attached,
        })
}

fn source() -> impl Strategy<Value = SourceInfo> {
    (any::<u32>(), "\\PC{0,16}", any::<u64>(), any::<u64>()).prop_map(
        |(pid, version, time_ns, generation)| SourceInfo {
            pid,
            version,
            time_ns,
            generation,
        },
    )
}

/// Parameters of consistent snapshots: 1-4 regions, 1-4 pairs of up to 512 descriptors.
fn snapshot_params() -> impl Strategy<Value = SnapshotParams> {
    let region = (0u64..1 << 40, 1u64..1 << 40, 0u64..1 << 50);
    (
        (
            any::<u64>(),
            any::<bool>(),
            any::<[u8; 6]>(),
            any::<u16>(),
            any::<u8>(),
        ),
        prop::collection::vec(region, 1..=4),
        prop::collection::vec(pair_params(), 1..=4),
        prop::collection::vec(any::<bool>(), 0..=3),
        any::<u64>(),
        source(),
    )
        .prop_map(
            |((features, event_idx, mac, mtu, status), regions, pairs, extras, seed, source)| {
                SnapshotParams {
                    features,
                    event_idx,
                    mac,
                    mtu,
                    status,
                    regions,
                    pairs,
                    extras,
                    manifest_seed: seed,
                    source,
                }
            },
        )
}

fn fd_kind() -> impl Strategy<Value = FdKind> {
    prop_oneof![
        Just(FdKind::MemoryRegion),
        Just(FdKind::TapQueue),
        Just(FdKind::Kick),
        Just(FdKind::Call),
        Just(FdKind::VhostUserConnection),
        Just(FdKind::Other),
    ]
}

fn small() -> impl Strategy<Value = u16> {
    prop_oneof![0u16..16, any::<u16>()]
}

fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..0x2_0000, any::<u64>(), Just(u64::MAX)]
}

fn any_queue() -> impl Strategy<Value = VirtqueueState> {
    let action = prop_oneof![
        Just(InFlightAction::RepostRx),
        Just(InFlightAction::CompleteTx)
    ];
    let in_flight = prop::collection::vec(
        (small(), action).prop_map(|(head, action)| InFlight { head, action }),
        0..8,
    );
    (
        (small(), prop_oneof![0u16..20, any::<u16>()]),
        (addr(), addr(), addr()),
        (small(), small(), any::<bool>(), any::<Option<u16>>()),
        in_flight,
        (small(), small(), any::<bool>()),
    )
        .prop_map(
            |(
                (index, size),
                (desc_table, avail_ring, used_ring),
                (next_avail, next_used, event_idx, signalled_used),
                in_flight,
                (kick_fd, call_fd, broken),
            )| VirtqueueState {
                index,
                size,
                desc_table,
                avail_ring,
                used_ring,
                next_avail,
                next_used,
                event_idx,
                signalled_used,
                in_flight,
                kick_fd,
                call_fd,
                broken,
            },
        )
}

/// Snapshots with every field arbitrary (small values favoured, so that some rules pass
/// and later ones get exercised).
fn any_snapshot() -> impl Strategy<Value = DeviceSnapshot> {
    let region =
        (addr(), addr(), addr(), small()).prop_map(|(guest_addr, size, file_offset, fd)| {
            MemoryRegionState {
                guest_addr,
                size,
                file_offset,
                fd,
            }
        });
    let tap = (any::<u8>(), any::<u32>(), any::<bool>(), small()).prop_map(
        |(vnet_hdr_len, offloads, attached, fd)| TapQueueState {
            vnet_hdr_len,
            offloads,
            attached,
            fd,
        },
    );
    let pair = (any_queue(), any_queue(), tap).prop_map(|(rx, tx, tap)| QueuePairState {
        rx,
        tx,
        tap,
        rx_carried: Default::default(),
    });
    let entry = (fd_kind(), any::<Option<u16>>(), any::<Option<u16>>()).prop_map(
        |(kind, queue_pair, region)| FdEntry {
            kind,
            queue_pair,
            region,
        },
    );
    (
        (any::<u64>(), any::<[u8; 6]>(), any::<u16>(), any::<u8>()),
        prop::collection::vec(region, 0..4),
        prop::collection::vec(pair, 0..3),
        prop::collection::vec(entry, 0..16),
        source(),
    )
        .prop_map(
            |((features, mac, mtu, status), memory, queue_pairs, fds, source)| DeviceSnapshot {
                features,
                mac,
                mtu,
                status,
                memory,
                queue_pairs,
                fds,
                source,
            },
        )
}

/// Ways to damage a blob.
#[derive(Clone, Debug)]
enum Mutation {
    Set(usize, u8),
    Flip(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| Mutation::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Set(i, b) if n > 0 => bytes[i % n] = b,
        Mutation::Flip(i, bit) if n > 0 => bytes[i % n] ^= 1 << bit,
        Mutation::Insert(i, b) => bytes.insert(i % (n + 1), b),
        Mutation::Remove(i) if n > 0 => {
            bytes.remove(i % n);
        }
        Mutation::Truncate(i) => bytes.truncate(i % (n + 1)),
        _ => {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn arbitrary_payloads_never_panic(p in prop::collection::vec(any::<u8>(), 0..512)) {
        // A valid frame around random bytes reaches the payload decoder and validation.
        for version in [1, CURRENT_VERSION] {
            let _ = decode(&frame(version, 0, &p));
        }
    }

    #[test]
    fn mutated_blobs_never_panic(ms in prop::collection::vec(mutation(), 1..8)) {
        let mut b = encode(&example_snapshot());
        for m in &ms {
            apply(&mut b, m);
        }
        let _ = decode(&b);
    }

    #[test]
    fn mutated_payloads_never_panic(ms in prop::collection::vec(mutation(), 1..8)) {
        // Damage the payload, then fix the frame so the damage gets past the checksum.
        let mut p = payload(&encode(&example_snapshot())).to_vec();
        for m in &ms {
            apply(&mut p, m);
        }
        let b = frame(CURRENT_VERSION, 0, &p);
        if let Ok(s) = decode(&b) {
            // Whatever decodes is valid and re-encodes to something that decodes the same.
            prop_assert!(s.validate().is_ok());
            prop_assert_eq!(decode(&encode(&s)).unwrap(), s);
        }
        let _ = decode_unvalidated(&b);
    }

    #[test]
    fn consistent_snapshots_round_trip(p in snapshot_params()) {
        let s = build(&p);
        prop_assert!(s.validate().is_ok(), "{:?}", s.validate());
        let blob = try_encode(&s).unwrap();
        prop_assert_eq!(&decode(&blob).unwrap(), &s);
        // Every prefix is an error, never a panic.
        for len in (0..blob.len()).step_by(7) {
            prop_assert!(decode(&blob[..len]).is_err());
        }
        let _ = to_json(&s);
    }

    #[test]
    fn arbitrary_snapshots_never_panic(s in any_snapshot()) {
        // validate never panics, and decode accepts exactly what validate accepts.
        let valid = s.validate();
        let blob = encode(&s);
        prop_assert!(blob.len() >= HEADER_LEN);
        match decode(&blob) {
            Ok(d) => {
                prop_assert!(valid.is_ok());
                prop_assert_eq!(d, s.clone());
            }
            Err(e) => {
                let v = valid.expect_err("decode refused a valid snapshot");
                prop_assert_eq!(e.to_string(), v.to_string());
            }
        }
        prop_assert_eq!(decode_unvalidated(&blob).unwrap(), s.clone());
        let _ = to_json(&s);
    }
}
