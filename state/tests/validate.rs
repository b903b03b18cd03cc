//! One test per validation rule: a blob with a valid frame and checksum over a snapshot
//! that breaks the rule is refused with the rule's own error variant.

mod common;

use common::{build, simple};
use tapir_state::{
    decode, encode, example_snapshot, Direction, FdEntry, FdKind, FdUser, InFlight, InFlightAction,
    QueueRef, Ring, StateError, F_EVENT_IDX, F_VERSION_1, MAX_FDS,
};

/// Applies `mutate` to the example, encodes it (the checksum is then valid) and returns
/// the decode error, checking `validate` agrees.
fn refused(mutate: impl FnOnce(&mut tapir_state::DeviceSnapshot)) -> StateError {
    let mut s = example_snapshot();
    mutate(&mut s);
    let from_validate = s.validate().expect_err("mutated snapshot validated");
    let err = match decode(&encode(&s)) {
        Ok(_) => panic!("mutated snapshot decoded"),
        Err(e) => e,
    };
    assert_eq!(err.to_string(), from_validate.to_string());
    err
}

/// Applies `mutate` to the example and checks it is still accepted.
fn accepted(mutate: impl FnOnce(&mut tapir_state::DeviceSnapshot)) {
    let mut s = example_snapshot();
    mutate(&mut s);
    s.validate().unwrap();
    assert_eq!(decode(&encode(&s)).unwrap(), s);
}

const RX0: QueueRef = QueueRef {
    pair: 0,
    dir: Direction::Rx,
};
const TX0: QueueRef = QueueRef {
    pair: 0,
    dir: Direction::Tx,
};

#[test]
fn version_1_feature() {
    let err = refused(|s| s.features &= !F_VERSION_1);
    assert!(matches!(err, StateError::MissingVersion1 { .. }), "{err}");
}

#[test]
fn source_version_length() {
    let err = refused(|s| s.source.version = "x".repeat(65));
    assert!(
        matches!(err, StateError::SourceVersionTooLong { len: 65, max: 64 }),
        "{err}"
    );
    accepted(|s| s.source.version = "é".repeat(32));
}

#[test]
fn memory_present() {
    let err = refused(|s| s.memory.clear());
    assert!(matches!(err, StateError::NoMemory), "{err}");
}

#[test]
fn memory_region_count() {
    let err = refused(|s| {
        let r = s.memory[1].clone();
        s.memory.resize(65, r);
    });
    assert!(
        matches!(err, StateError::TooManyRegions { count: 65, max: 64 }),
        "{err}"
    );
    // 64 regions are fine.
    let mut p = simple(1, 8, 64);
    p.manifest_seed = 7;
    build(&p).validate().unwrap();
}

#[test]
fn memory_region_empty() {
    let err = refused(|s| s.memory[1].size = 0);
    assert!(
        matches!(err, StateError::EmptyRegion { region: 1 }),
        "{err}"
    );
}

#[test]
fn memory_region_wraps() {
    let err = refused(|s| s.memory[1].guest_addr = u64::MAX - 0x1000);
    assert!(
        matches!(err, StateError::RegionWraps { region: 1, .. }),
        "{err}"
    );
    // Ending exactly at 2^64 - 1 is fine (the pair-1 rings move into region 0).
    accepted(|s| {
        s.memory[1].size = 0x1000;
        s.memory[1].guest_addr = u64::MAX - 0x1000;
        let moved = s.queue_pairs[0].rx.desc_table + 0x10_0000;
        let p1 = &mut s.queue_pairs[1];
        for (q, base) in [(&mut p1.rx, moved), (&mut p1.tx, moved + 0x4000)] {
            q.desc_table = base;
            q.avail_ring = base + 0x1000;
            q.used_ring = base + 0x2000;
        }
    });
}

#[test]
fn memory_file_offset_wraps() {
    let err = refused(|s| s.memory[1].file_offset = u64::MAX - 1);
    assert!(
        matches!(err, StateError::FileOffsetWraps { region: 1, .. }),
        "{err}"
    );
}

#[test]
fn memory_regions_overlap() {
    let err = refused(|s| s.memory[1].guest_addr = 0x7fff_f000);
    assert!(
        matches!(
            err,
            StateError::RegionsOverlap {
                first: 0,
                second: 1
            }
        ),
        "{err}"
    );
    // Adjacent is fine.
    accepted(|s| {
        s.memory[1].guest_addr = 0x8000_0000;
        s.memory[1].size = 0x1_0000_0000;
    });
}

#[test]
fn queue_pairs_present() {
    let err = refused(|s| s.queue_pairs.clear());
    assert!(matches!(err, StateError::NoQueuePairs), "{err}");
}

#[test]
fn queue_pair_count() {
    let err = refused(|s| {
        let p = s.queue_pairs[0].clone();
        s.queue_pairs.resize(257, p);
    });
    assert!(
        matches!(
            err,
            StateError::TooManyQueuePairs {
                count: 257,
                max: 256
            }
        ),
        "{err}"
    );
    // 256 pairs are fine, even with 64 regions and 64 extra fds: MAX_FDS leaves room.
    let mut p = simple(256, 4, 64);
    p.extras = vec![true; 64];
    let s = build(&p);
    assert_eq!(s.fds.len(), MAX_FDS);
    s.validate().unwrap();
}

#[test]
fn queue_index() {
    let err = refused(|s| s.queue_pairs[0].rx.index = 1);
    assert!(
        matches!(
            err,
            StateError::QueueIndex {
                queue: RX0,
                expected: 0,
                found: 1
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.queue_pairs[1].tx.index = 2);
    let tx1 = QueueRef {
        pair: 1,
        dir: Direction::Tx,
    };
    assert!(
        matches!(err, StateError::QueueIndex { queue, expected: 3, found: 2 } if queue == tx1),
        "{err}"
    );
}

#[test]
fn queue_size() {
    for size in [0, 3, 100, 65535] {
        let err = refused(|s| s.queue_pairs[0].tx.size = size);
        assert!(
            matches!(err, StateError::QueueSize { queue: TX0, size: z } if z == size),
            "{err}"
        );
    }
}

#[test]
fn ring_alignment() {
    let err = refused(|s| s.queue_pairs[0].rx.desc_table += 8);
    assert!(
        matches!(
            err,
            StateError::RingMisaligned {
                queue: RX0,
                ring: Ring::Desc,
                align: 16,
                ..
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.queue_pairs[0].rx.avail_ring += 1);
    assert!(
        matches!(
            err,
            StateError::RingMisaligned {
                ring: Ring::Avail,
                align: 2,
                ..
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.queue_pairs[0].rx.used_ring += 2);
    assert!(
        matches!(
            err,
            StateError::RingMisaligned {
                ring: Ring::Used,
                align: 4,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn ring_inside_memory() {
    // In the hole between the regions.
    let err = refused(|s| s.queue_pairs[0].tx.desc_table = 0xc000_0000);
    assert!(
        matches!(
            err,
            StateError::RingOutsideMemory {
                queue: TX0,
                ring: Ring::Desc,
                ..
            }
        ),
        "{err}"
    );
    // Straddling the end of region 0 (256 * 16 = 4096 bytes from 0x8000_0000 - 0x800).
    let err = refused(|s| s.queue_pairs[0].tx.desc_table = 0x8000_0000 - 0x800);
    assert!(
        matches!(
            err,
            StateError::RingOutsideMemory {
                ring: Ring::Desc,
                len: 4096,
                ..
            }
        ),
        "{err}"
    );
    // Straddling two adjacent regions is not inside *one* region.
    let err = refused(|s| {
        s.memory[1].guest_addr = 0x8000_0000;
        s.queue_pairs[0].rx.used_ring = 0x8000_0000 - 0x400;
    });
    assert!(
        matches!(
            err,
            StateError::RingOutsideMemory {
                queue: RX0,
                ring: Ring::Used,
                len: 2054,
                ..
            }
        ),
        "{err}"
    );
    // Past the end of the address space.
    let err = refused(|s| s.queue_pairs[0].rx.avail_ring = u64::MAX - 1);
    assert!(
        matches!(
            err,
            StateError::RingOutsideMemory {
                ring: Ring::Avail,
                ..
            }
        ),
        "{err}"
    );
    // The last byte of a region may be the last byte of a ring.
    accepted(|s| s.queue_pairs[0].rx.desc_table = 0x8000_0000 - 4096);
}

#[test]
fn event_idx_matches_features() {
    let err = refused(|s| s.features &= !F_EVENT_IDX);
    assert!(
        matches!(
            err,
            StateError::EventIdxMismatch {
                queue: RX0,
                event_idx: true,
                negotiated: false
            }
        ),
        "{err}"
    );
}

#[test]
fn avail_not_more_than_size_ahead() {
    let err = refused(|s| {
        let q = &mut s.queue_pairs[0].tx;
        q.next_avail = q.next_used.wrapping_add(257);
    });
    assert!(
        matches!(
            err,
            StateError::AvailAheadOfUsed {
                queue: TX0,
                size: 256,
                ..
            }
        ),
        "{err}"
    );
    // next_avail behind next_used is the same thing (wrapping distance 65535).
    let err =
        refused(|s| s.queue_pairs[0].tx.next_avail = s.queue_pairs[0].tx.next_used.wrapping_sub(1));
    assert!(
        matches!(err, StateError::AvailAheadOfUsed { queue: TX0, .. }),
        "{err}"
    );
}

#[test]
fn in_flight_at_most_size() {
    let err = refused(|s| {
        let q = &mut s.queue_pairs[0].rx;
        q.in_flight = (0..257)
            .map(|h| InFlight {
                head: h,
                action: InFlightAction::RepostRx,
            })
            .collect();
    });
    assert!(
        matches!(
            err,
            StateError::TooManyInFlight {
                queue: RX0,
                count: 257,
                size: 256
            }
        ),
        "{err}"
    );
}

#[test]
fn in_flight_accounts_for_every_popped_chain() {
    let err = refused(|s| {
        s.queue_pairs[0].rx.in_flight.pop();
    });
    assert!(
        matches!(
            err,
            StateError::InFlightCount {
                queue: RX0,
                count: 2,
                popped: 3
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.queue_pairs[0].rx.next_avail -= 1);
    assert!(
        matches!(
            err,
            StateError::InFlightCount {
                queue: RX0,
                count: 3,
                popped: 2
            }
        ),
        "{err}"
    );
    // Across the 16-bit wrap (the example's pair 1 RX: next_used 65534, next_avail 2).
    let err = refused(|s| s.queue_pairs[1].rx.next_avail = 1);
    assert!(
        matches!(
            err,
            StateError::InFlightCount {
                count: 4,
                popped: 3,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn in_flight_head_in_range() {
    let err = refused(|s| s.queue_pairs[0].rx.in_flight[1].head = 256);
    assert!(
        matches!(
            err,
            StateError::InFlightHeadOutOfRange {
                queue: RX0,
                position: 1,
                head: 256,
                size: 256
            }
        ),
        "{err}"
    );
}

#[test]
fn in_flight_heads_distinct() {
    let err = refused(|s| s.queue_pairs[0].rx.in_flight[2].head = 17);
    assert!(
        matches!(
            err,
            StateError::DuplicateInFlightHead {
                queue: RX0,
                head: 17
            }
        ),
        "{err}"
    );
}

#[test]
fn in_flight_action_matches_queue() {
    let err = refused(|s| s.queue_pairs[0].rx.in_flight[0].action = InFlightAction::CompleteTx);
    assert!(
        matches!(
            err,
            StateError::WrongInFlightAction {
                queue: RX0,
                head: 17,
                action: InFlightAction::CompleteTx
            }
        ),
        "{err}"
    );
    let err = refused(|s| {
        let q = &mut s.queue_pairs[0].tx;
        q.next_avail = q.next_used.wrapping_add(1);
        q.in_flight = vec![InFlight {
            head: 9,
            action: InFlightAction::RepostRx,
        }];
    });
    assert!(
        matches!(
            err,
            StateError::WrongInFlightAction {
                queue: TX0,
                head: 9,
                action: InFlightAction::RepostRx
            }
        ),
        "{err}"
    );
    // The reserved TX action is accepted on TX.
    accepted(|s| {
        let q = &mut s.queue_pairs[0].tx;
        q.next_avail = q.next_used.wrapping_add(1);
        q.in_flight = vec![InFlight {
            head: 9,
            action: InFlightAction::CompleteTx,
        }];
    });
}

#[test]
fn tap_vnet_hdr_len() {
    let err = refused(|s| s.queue_pairs[1].tap.vnet_hdr_len = 14);
    assert!(
        matches!(err, StateError::VnetHdrLen { pair: 1, len: 14 }),
        "{err}"
    );
    accepted(|s| s.queue_pairs[1].tap.vnet_hdr_len = 10);
}

#[test]
fn tap_offloads() {
    let err = refused(|s| s.queue_pairs[0].tap.offloads = 0x87);
    assert!(
        matches!(
            err,
            StateError::UnknownOffloads {
                pair: 0,
                offloads: 0x87,
                unknown: 0x80
            }
        ),
        "{err}"
    );
    accepted(|s| s.queue_pairs[0].tap.offloads = 0x7f);
}

#[test]
fn fd_manifest_length() {
    let other = FdEntry {
        kind: FdKind::Other,
        queue_pair: None,
        region: None,
    };
    let err = refused(|s| s.fds.resize(MAX_FDS + 1, other.clone()));
    assert!(
        matches!(err, StateError::TooManyFds { count, max: MAX_FDS } if count == MAX_FDS + 1),
        "{err}"
    );
    accepted(|s| s.fds.resize(MAX_FDS, other.clone()));
}

#[test]
fn fd_index_in_range() {
    let err = refused(|s| s.queue_pairs[0].rx.kick_fd = 12);
    assert!(
        matches!(
            err,
            StateError::FdIndexOutOfRange {
                user: FdUser::Kick(RX0),
                index: 12,
                count: 12
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.memory[0].fd = u16::MAX);
    assert!(
        matches!(
            err,
            StateError::FdIndexOutOfRange {
                user: FdUser::Region(0),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn fd_kind() {
    // Pair 0 RX kick pointing at pair 0 RX call.
    let err = refused(|s| s.queue_pairs[0].rx.kick_fd = s.queue_pairs[0].rx.call_fd);
    assert!(
        matches!(
            err,
            StateError::FdKindMismatch {
                user: FdUser::Kick(RX0),
                index: 4,
                expected: FdKind::Kick,
                found: FdKind::Call
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.fds[1].kind = FdKind::Other);
    assert!(
        matches!(
            err,
            StateError::FdKindMismatch {
                user: FdUser::Region(1),
                expected: FdKind::MemoryRegion,
                found: FdKind::Other,
                ..
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.queue_pairs[1].tap.fd = 0);
    assert!(
        matches!(
            err,
            StateError::FdKindMismatch {
                user: FdUser::Tap(1),
                found: FdKind::MemoryRegion,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn fd_owner() {
    let err = refused(|s| s.fds[2].queue_pair = Some(1));
    assert!(
        matches!(
            err,
            StateError::FdOwnerMismatch {
                user: FdUser::Tap(0),
                index: 2,
                queue_pair: Some(1),
                region: None
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.fds[0].region = Some(1));
    assert!(
        matches!(
            err,
            StateError::FdOwnerMismatch {
                user: FdUser::Region(0),
                region: Some(1),
                ..
            }
        ),
        "{err}"
    );
    let err = refused(|s| s.fds[0].queue_pair = Some(0));
    assert!(
        matches!(
            err,
            StateError::FdOwnerMismatch {
                user: FdUser::Region(0),
                queue_pair: Some(0),
                ..
            }
        ),
        "{err}"
    );
    // Pair 1 RX call pointing at pair 0's TX call fd.
    let err = refused(|s| s.queue_pairs[1].rx.call_fd = s.queue_pairs[0].tx.call_fd);
    assert!(
        matches!(
            err,
            StateError::FdOwnerMismatch {
                user: FdUser::Call(_),
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn fd_used_once() {
    let err = refused(|s| s.queue_pairs[0].tx.kick_fd = s.queue_pairs[0].rx.kick_fd);
    assert!(
        matches!(
            err,
            StateError::FdSharedBy {
                index: 3,
                first: FdUser::Kick(RX0),
                second: FdUser::Kick(TX0)
            }
        ),
        "{err}"
    );
}

#[test]
fn fd_entries_all_used() {
    let err = refused(|s| {
        s.fds.push(FdEntry {
            kind: FdKind::Kick,
            queue_pair: Some(0),
            region: None,
        })
    });
    assert!(
        matches!(
            err,
            StateError::FdUnreferenced {
                index: 12,
                kind: FdKind::Kick
            }
        ),
        "{err}"
    );
    let err = refused(|s| {
        s.fds.push(FdEntry {
            kind: FdKind::MemoryRegion,
            queue_pair: None,
            region: Some(0),
        })
    });
    assert!(
        matches!(
            err,
            StateError::FdUnreferenced {
                index: 12,
                kind: FdKind::MemoryRegion
            }
        ),
        "{err}"
    );
    // The vhost-user connection and other fds are passed along without a user.
    accepted(|s| {
        s.fds.insert(
            0,
            FdEntry {
                kind: FdKind::VhostUserConnection,
                queue_pair: None,
                region: None,
            },
        );
        s.fds.push(FdEntry {
            kind: FdKind::Other,
            queue_pair: Some(3),
            region: Some(9),
        });
        for r in &mut s.memory {
            r.fd += 1;
        }
        for p in &mut s.queue_pairs {
            p.tap.fd += 1;
            for q in [&mut p.rx, &mut p.tx] {
                q.kick_fd += 1;
                q.call_fd += 1;
            }
        }
    });
}
