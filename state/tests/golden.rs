//! The wire formats, frozen: a blob written by any version must decode forever (v1 through
//! its upgrade to v2), and encoding the same snapshot must give the same bytes until the
//! format version changes. If this test fails after a change to the snapshot
//! types, the change needs a new format version (see the `codec` module docs), not a new
//! golden blob.

use tapir_state::{
    decode, encode, CarriedFrame, CarriedFrames, DeviceSnapshot, FdEntry, FdKind, InFlight,
    InFlightAction, MemoryRegionState, QueuePairState, SourceInfo, TapQueueState, VirtqueueState,
};

/// A snapshot written out field by field (not `example_snapshot`, which may evolve).
fn golden_snapshot() -> DeviceSnapshot {
    let fd = |kind, queue_pair, region| FdEntry {
        kind,
        queue_pair,
        region,
    };
    DeviceSnapshot {
        features: (1 << 32) | (1 << 29) | (1 << 15) | (1 << 5) | 1,
        mac: [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef],
        mtu: 1500,
        status: 0x0f,
        memory: vec![MemoryRegionState {
            guest_addr: 0,
            size: 0x1000_0000,
            file_offset: 0,
            fd: 1,
        }],
        queue_pairs: vec![QueuePairState {
            rx: VirtqueueState {
                index: 0,
                size: 8,
                desc_table: 0x1_0000,
                avail_ring: 0x1_0080,
                used_ring: 0x1_0100,
                next_avail: 3,
                next_used: 65534,
                event_idx: true,
                signalled_used: Some(65533),
                in_flight: [5, 0, 7, 2, 1]
                    .map(|head| InFlight {
                        head,
                        action: InFlightAction::RepostRx,
                    })
                    .to_vec(),
                kick_fd: 3,
                call_fd: 4,
                broken: false,
            },
            tx: VirtqueueState {
                index: 1,
                size: 8,
                desc_table: 0x2_0000,
                avail_ring: 0x2_0080,
                used_ring: 0x2_0100,
                next_avail: 1,
                next_used: 0,
                event_idx: true,
                signalled_used: None,
                in_flight: vec![InFlight {
                    head: 6,
                    action: InFlightAction::CompleteTx,
                }],
                kick_fd: 5,
                call_fd: 6,
                broken: true,
            },
            tap: TapQueueState {
                vnet_hdr_len: 12,
                offloads: 0x27,
                attached: false,
                fd: 2,
            },
            rx_carried: CarriedFrames::default(),
        }],
        fds: vec![
            fd(FdKind::VhostUserConnection, None, None),
            fd(FdKind::MemoryRegion, None, Some(0)),
            fd(FdKind::TapQueue, Some(0), None),
            fd(FdKind::Kick, Some(0), None),
            fd(FdKind::Call, Some(0), None),
            fd(FdKind::Kick, Some(0), None),
            fd(FdKind::Call, Some(0), None),
            fd(FdKind::Other, None, None),
        ],
        source: SourceInfo {
            pid: 77,
            version: "tapir 0.1.0".to_owned(),
            time_ns: 1_000_000_007,
            generation: 42,
        },
    }
}

/// `golden_snapshot()` as written by format version 1: magic, version, reserved, length,
/// CRC, then the postcard payload.
const GOLDEN_V1: &str = "
    5441504952534e50 0100 0000 85000000 a90ad634
    a180828012525400abcdefdc0b0f010080808080010001010008808004808104
    80820403feff030101fdff030505000000070002000100030400010880800880
    8108808208010001000106010506010c27000208040000000001000101000002
    0100000301000002010000030100000500004d0b746170697220302e312e3087
    94ebdc032a
";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn v1_golden_blob_decodes() {
    let golden = unhex(GOLDEN_V1);
    assert_eq!(decode(&golden).unwrap(), golden_snapshot());
}

/// The golden snapshot with two carried frames (format version 2's addition).
fn golden_snapshot_v2() -> DeviceSnapshot {
    let mut s = golden_snapshot();
    let frames = vec![
        CarriedFrame::try_from((0u8..40).collect::<Vec<u8>>()).unwrap(),
        CarriedFrame::try_from(vec![0xee; 12]).unwrap(),
    ];
    s.queue_pairs[0].rx_carried = CarriedFrames::try_from(frames).unwrap();
    s
}

/// `golden_snapshot_v2()` as written by format version 2.
const GOLDEN_V2: &str = "
    5441504952534e50 0200 0000 bc000000 113b4209
    a180828012525400abcdefdc0b0f010080808080010001010008808004808104
    80820403feff030101fdff030505000000070002000100030400010880800880
    8108808208010001000106010506010c2700020228000102030405060708090a
    0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526270ceeee
    eeeeeeeeeeeeeeeeeeee08040000000001000101000002010000030100000201
    0000030100000500004d0b746170697220302e312e308794ebdc032a
";

#[test]
fn v1_golden_blob_upgrades_with_no_carried_frames() {
    let s = decode(&unhex(GOLDEN_V1)).unwrap();
    assert!(s.queue_pairs.iter().all(|p| p.rx_carried.is_empty()));
}

#[test]
fn v2_golden_blob_decodes() {
    assert_eq!(decode(&unhex(GOLDEN_V2)).unwrap(), golden_snapshot_v2());
}

#[test]
fn v2_encoding_is_stable() {
    assert_eq!(hex(&encode(&golden_snapshot_v2())), hex(&unhex(GOLDEN_V2)));
}
