//! The tapir-state snapshot decoder (`decode`, `decode_unvalidated`, the header parser and
//! validation) and the vhost-user session blob decoder (`handoff::decode`): never panic,
//! whatever the bytes; whatever decodes re-encodes to something that decodes to the same
//! value (`decode(encode(x)) == x`); a validated snapshot passes `try_encode`; `to_json` of
//! anything decoded works.
//!
//! Input: mode (u8), then the bytes. Mode % 4: 0 a raw snapshot blob; 1 a snapshot payload
//! (postcard) that the target frames with a correct header and CRC, so mutations reach the
//! payload decoder and validation; 2 a raw session blob; 3 a session payload the target
//! frames as `handoff::encode` does (tapir-state's header, magic `TAPIRVUS`, a correct CRC). For 2 and 3 the next byte is the fd count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapir_fuzz::Input;
use tapir_vhost_user::handoff;

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut blob = Vec::with_capacity(tapir_state::HEADER_LEN + payload.len());
    blob.extend_from_slice(&tapir_state::MAGIC);
    blob.extend_from_slice(&tapir_state::CURRENT_VERSION.to_le_bytes());
    blob.extend_from_slice(&0u16.to_le_bytes());
    blob.extend_from_slice(
        &u32::try_from(payload.len())
            .unwrap_or(u32::MAX)
            .to_le_bytes(),
    );
    blob.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    blob.extend_from_slice(payload);
    blob
}

fn snapshot(blob: &[u8]) {
    let _ = tapir_state::Header::parse(blob);
    if let Ok(s) = tapir_state::decode_unvalidated(blob) {
        let again = tapir_state::decode_unvalidated(&tapir_state::encode(&s))
            .expect("a decoded snapshot re-encodes into a blob that decodes");
        assert_eq!(again, s, "decode(encode(x)) == x (unvalidated)");
        let _ = tapir_state::to_json(&s);
        let validated = s.validate().is_ok();
        match tapir_state::decode(blob) {
            Ok(v) => {
                assert!(validated, "decode accepted what validate refuses");
                assert_eq!(v, s);
                match tapir_state::try_encode(&v) {
                    Ok(b) => assert_eq!(tapir_state::decode(&b).expect("round trip"), v),
                    Err(tapir_state::StateError::EncodedTooLarge { .. }) => {}
                    Err(e) => panic!("a validated snapshot failed try_encode: {e}"),
                }
            }
            Err(_) => assert!(!validated, "decode refused what validate accepts"),
        }
    } else {
        assert!(
            tapir_state::decode(blob).is_err(),
            "decode is stricter than unvalidated"
        );
    }
}

fn session(blob: &[u8], fds: usize) {
    if let Ok(st) = handoff::decode(blob, fds) {
        let blob = handoff::encode(&st).expect("a decoded session state encodes");
        let again = handoff::decode(&blob, fds)
            .expect("a decoded session blob re-encodes into one that decodes");
        assert_eq!(again, st, "decode(encode(x)) == x (session blob)");
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input::new(data);
    match input.u8() % 4 {
        0 => snapshot(input.rest()),
        1 => snapshot(&frame(input.rest())),
        2 => {
            let fds = usize::from(input.u8());
            session(input.rest(), fds);
        }
        _ => {
            let fds = usize::from(input.u8());
            // Framed as `handoff::encode` frames it (tapir-state's header, a correct CRC).
            let blob = tapir_state::seal(*b"TAPIRVUS", 2, input.rest());
            session(&blob, fds);
        }
    }
});
