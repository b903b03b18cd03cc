//! The framing: round trips, and one test per way a blob can be broken.

mod common;

use common::{build, frame, payload, simple};
use tapir_state::{
    decode, decode_unvalidated, encode, example_snapshot, to_json, try_encode, DeviceSnapshot,
    Header, StateError, CURRENT_VERSION, HEADER_LEN, MAX_BLOB, MAX_PAYLOAD,
};

fn blob() -> Vec<u8> {
    encode(&example_snapshot())
}

#[test]
fn example_is_valid_and_realistic() {
    let s = example_snapshot();
    s.validate().unwrap();
    assert_eq!(s.queue_pairs.len(), 2);
    assert_eq!(s.memory.len(), 2);
    assert!(s.queue_pairs.iter().all(|p| !p.rx.in_flight.is_empty()));
}

#[test]
fn round_trip() {
    let s = example_snapshot();
    let blob = try_encode(&s).unwrap();
    assert_eq!(blob, encode(&s));
    assert_eq!(decode(&blob).unwrap(), s);
    let h = Header::parse(&blob).unwrap();
    assert_eq!(h.version, CURRENT_VERSION);
    assert_eq!(
        usize::try_from(h.payload_len).unwrap(),
        blob.len() - HEADER_LEN
    );
}

#[test]
fn round_trip_full_queues() {
    // 32768-entry queues, RX entirely in flight, next_used wrapping past 65535.
    let s = build(&simple(2, 15, 1));
    assert_eq!(s.queue_pairs[0].rx.in_flight.len(), 32768);
    assert_eq!(decode(&try_encode(&s).unwrap()).unwrap(), s);
}

#[test]
fn too_short() {
    for len in 0..HEADER_LEN {
        let err = decode(&blob()[..len]).unwrap_err();
        assert!(
            matches!(err, StateError::TooShort { len: l, need: HEADER_LEN } if l == len),
            "{err}"
        );
    }
}

#[test]
fn wrong_magic() {
    let mut b = blob();
    b[0] = b'X';
    let err = decode(&b).unwrap_err();
    assert!(
        matches!(err, StateError::BadMagic { found } if &found == b"XAPIRSNP"),
        "{err}"
    );
}

#[test]
fn future_version() {
    let mut b = blob();
    let next = CURRENT_VERSION + 1;
    b[8..10].copy_from_slice(&next.to_le_bytes());
    let err = decode(&b).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::FutureVersion { found, supported: CURRENT_VERSION } if found == next
        ),
        "{err}"
    );
    assert!(err.to_string().contains("newer"), "{err}");
}

#[test]
fn version_zero_never_existed() {
    let mut b = blob();
    b[8..10].copy_from_slice(&0u16.to_le_bytes());
    let err = decode(&b).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::UnsupportedVersion {
                found: 0,
                oldest: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn reserved_nonzero() {
    let mut b = blob();
    b[10] = 1;
    let err = decode(&b).unwrap_err();
    assert!(
        matches!(err, StateError::ReservedNonZero { found: 1 }),
        "{err}"
    );
}

#[test]
fn oversized_length_refused_before_reading() {
    for len in [u32::MAX, u32::try_from(MAX_PAYLOAD + 1).unwrap()] {
        let mut b = blob();
        b[12..16].copy_from_slice(&len.to_le_bytes());
        let err = decode(&b).unwrap_err();
        assert!(matches!(err, StateError::TooLarge { .. }), "{err}");
        // Also with only the header present: nothing is read past it.
        let err = decode(&b[..HEADER_LEN]).unwrap_err();
        assert!(matches!(err, StateError::TooLarge { .. }), "{err}");
    }
    // The largest accepted length is merely truncated here.
    let mut b = blob();
    b[12..16].copy_from_slice(&u32::try_from(MAX_PAYLOAD).unwrap().to_le_bytes());
    let err = decode(&b).unwrap_err();
    assert!(
        matches!(err, StateError::Truncated { expected, .. } if expected == MAX_PAYLOAD),
        "{err}"
    );
}

#[test]
fn every_prefix_is_an_error() {
    let b = blob();
    for len in 0..b.len() {
        let err = decode(&b[..len]).unwrap_err();
        if len >= HEADER_LEN {
            assert!(
                matches!(err, StateError::Truncated { found, .. } if found == len - HEADER_LEN),
                "prefix {len}: {err}"
            );
        }
    }
}

#[test]
fn trailing_bytes() {
    let mut b = blob();
    b.extend_from_slice(&[0, 0, 0]);
    let err = decode(&b).unwrap_err();
    assert!(
        matches!(err, StateError::TrailingBytes { extra: 3, .. }),
        "{err}"
    );
}

#[test]
fn every_flipped_payload_bit_fails_the_checksum() {
    let b = blob();
    for i in HEADER_LEN..b.len() {
        for bit in 0..8 {
            let mut m = b.clone();
            m[i] ^= 1 << bit;
            let err = decode(&m).unwrap_err();
            assert!(
                matches!(err, StateError::Checksum { .. }),
                "byte {i} bit {bit}: {err}"
            );
        }
    }
}

#[test]
fn every_flipped_header_bit_is_an_error() {
    let b = blob();
    for i in 0..HEADER_LEN {
        for bit in 0..8 {
            let mut m = b.clone();
            m[i] ^= 1 << bit;
            assert!(decode(&m).is_err(), "byte {i} bit {bit}");
        }
    }
}

#[test]
fn malformed_payload() {
    for p in [&[][..], &[0xff; 16][..], &payload(&blob())[..10]] {
        let err = decode(&frame(CURRENT_VERSION, 0, p)).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Malformed {
                    version: CURRENT_VERSION,
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }
}

#[test]
fn payload_with_unused_bytes() {
    let mut p = payload(&blob()).to_vec();
    p.push(0);
    let err = decode(&frame(CURRENT_VERSION, 0, &p)).unwrap_err();
    assert!(
        matches!(
            err,
            StateError::PayloadTrailingBytes {
                version: CURRENT_VERSION,
                unused: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn decode_unvalidated_shows_invalid_snapshots() {
    let mut s = example_snapshot();
    s.mtu = 9000;
    s.queue_pairs[0].tap.vnet_hdr_len = 0;
    let b = encode(&s);
    assert!(matches!(
        decode(&b),
        Err(StateError::VnetHdrLen { pair: 0, len: 0 })
    ));
    assert_eq!(decode_unvalidated(&b).unwrap(), s);
    assert!(matches!(try_encode(&s), Err(StateError::VnetHdrLen { .. })));
}

#[test]
fn try_encode_refuses_blobs_over_the_limit() {
    // Twelve full 32768-entry RX queues of in-flight heads: valid, but over 1 MiB.
    let s = build(&simple(12, 15, 1));
    s.validate().unwrap();
    let Err(err) = try_encode(&s) else {
        panic!("a {}-byte blob was accepted", encode(&s).len())
    };
    assert!(
        matches!(err, StateError::EncodedTooLarge { max: MAX_BLOB, .. }),
        "{err}"
    );
    let err = decode(&encode(&s)).unwrap_err();
    assert!(matches!(err, StateError::TooLarge { .. }), "{err}");
}

#[test]
fn json_view() {
    let s = example_snapshot();
    let json = to_json(&s);
    for needle in [
        "\"VERSION_1\"",
        "\"RING_EVENT_IDX\"",
        "\"MRG_RXBUF\"",
        "\"DRIVER_OK\"",
        "\"52:54:00:12:34:56\"",
        "\"head\": 17",
        "\"RepostRx\"",
        "\"TapQueue\"",
    ] {
        assert!(json.contains(needle), "{needle} missing from\n{json}");
    }
    // The snapshot's own fields are all there, as they are.
    let back: DeviceSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["decoded"]["features"].is_array());
}

#[test]
fn unknown_feature_bits_are_named_by_number() {
    assert_eq!(
        tapir_state::feature_names((1 << 32) | (1 << 4)),
        ["bit 4", "VERSION_1"]
    );
    assert_eq!(tapir_state::status_names(0x21), ["ACKNOWLEDGE", "bit 5"]);
}

#[test]
fn errors_say_where() {
    let mut s = example_snapshot();
    s.queue_pairs[1].rx.in_flight[2].head = 300;
    let err = decode(&encode(&s)).unwrap_err().to_string();
    assert_eq!(
        err,
        "queue pair 1 rx: in-flight entry 2 has head 300, queue size is 256"
    );
}
