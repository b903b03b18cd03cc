//! Frames carried across a handoff (format version 2): bounded as they are decoded, so that a
//! hostile predecessor's blob cannot make the successor allocate without limit, and bounded
//! in total by validation.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{frame, payload};
use tapir_state::{
    decode, encode, example_snapshot, try_encode, CarriedFrame, CarriedFrames, DeviceSnapshot,
    StateError, CURRENT_VERSION, MAX_CARRIED_BYTES, MAX_CARRIED_FRAME, MAX_CARRIED_FRAMES,
    MIN_CARRIED_FRAME,
};

/// Counts the bytes live and the peak, so a test can bound what decoding allocated.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; the counters do not affect the allocations.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Largest growth of the live heap while `f` runs.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

fn frames(n: usize, len: usize) -> CarriedFrames {
    let v = (0..n)
        .map(|i| CarriedFrame::try_from(vec![u8::try_from(i % 251).unwrap(); len]).unwrap())
        .collect::<Vec<_>>();
    CarriedFrames::try_from(v).unwrap()
}

/// A snapshot whose pair 0 carries one frame of 200 bytes of 0x5a, and where in its payload
/// that frame's encoding starts (count 1, length 200 as a varint, the bytes).
fn marked() -> (DeviceSnapshot, Vec<u8>, usize) {
    let mut s = example_snapshot();
    s.queue_pairs[0].rx_carried =
        CarriedFrames::try_from(vec![CarriedFrame::try_from(vec![0x5a; 200]).unwrap()]).unwrap();
    let p = payload(&encode(&s)).to_vec();
    let body = [0x5au8; 200];
    let at = p
        .windows(body.len())
        .position(|w| w == body)
        .expect("the frame's bytes are in the payload");
    assert_eq!(&p[at - 3..at], &[0x01, 0xc8, 0x01], "count 1, length 200");
    (s, p, at - 3)
}

/// The payload with the carried-frame list of pair 0 (3 + 200 bytes at `at`) replaced.
fn with_carried(p: &[u8], at: usize, replacement: &[u8]) -> Vec<u8> {
    let mut out = p[..at].to_vec();
    out.extend_from_slice(replacement);
    out.extend_from_slice(&p[at + 3 + 200..]);
    out
}

fn varint(mut n: u64, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

#[test]
fn carried_frames_round_trip() {
    let (s, p, _) = marked();
    assert_eq!(decode(&frame(CURRENT_VERSION, 0, &p)).unwrap(), s);
    let mut s = example_snapshot();
    s.queue_pairs[1].rx_carried = frames(MAX_CARRIED_FRAMES, 100);
    assert_eq!(decode(&try_encode(&s).unwrap()).unwrap(), s);
}

#[test]
fn frame_lengths_are_checked_by_try_from() {
    for len in [0, MIN_CARRIED_FRAME - 1, MAX_CARRIED_FRAME + 1] {
        let err = CarriedFrame::try_from(vec![0; len]).unwrap_err();
        assert!(
            matches!(err, StateError::CarriedFrameLength { len: l, .. } if l == len),
            "{err}"
        );
    }
    for len in [MIN_CARRIED_FRAME, MAX_CARRIED_FRAME] {
        assert_eq!(
            CarriedFrame::try_from(vec![1; len]).unwrap().bytes().len(),
            len
        );
    }
    let too_many = (0..=MAX_CARRIED_FRAMES)
        .map(|_| CarriedFrame::try_from(vec![0; 60]).unwrap())
        .collect::<Vec<_>>();
    assert!(matches!(
        CarriedFrames::try_from(too_many),
        Err(StateError::TooManyCarriedFrames { .. })
    ));
}

#[test]
fn a_blob_with_a_bad_carried_frame_is_refused() {
    let (_, p, at) = marked();
    // A frame shorter than a vnet header.
    let mut short = vec![0x01];
    varint(5, &mut short);
    short.extend_from_slice(&[0; 5]);
    // A frame longer than a TAP hands over (present in full, inside the 1 MiB limit).
    let mut long = vec![0x01];
    varint(MAX_CARRIED_FRAME as u64 + 1, &mut long);
    long.resize(long.len() + MAX_CARRIED_FRAME + 1, 0);
    // More frames than a worker holds.
    let mut many = Vec::new();
    varint(MAX_CARRIED_FRAMES as u64 + 1, &mut many);
    for _ in 0..=MAX_CARRIED_FRAMES {
        varint(20, &mut many);
        many.extend_from_slice(&[0; 20]);
    }
    for (what, r) in [("short", short), ("long", long), ("many", many)] {
        let b = frame(CURRENT_VERSION, 0, &with_carried(&p, at, &r));
        let err = decode(&b).unwrap_err();
        assert!(
            matches!(
                err,
                StateError::Malformed {
                    version: CURRENT_VERSION,
                    ..
                }
            ),
            "{what}: {err}"
        );
    }
}

#[test]
fn a_hostile_length_does_not_make_the_decoder_allocate_it() {
    let (_, p, at) = marked();
    // Claims: 2^32 frames; then a frame of 2^40 bytes; then one of MAX_CARRIED_FRAME + 1
    // bytes whose bytes are missing. Each within a blob of a few hundred bytes.
    let mut huge_count = Vec::new();
    varint(1 << 32, &mut huge_count);
    let mut huge_frame = vec![0x01];
    varint(1 << 40, &mut huge_frame);
    let mut missing = vec![0x01];
    varint(MAX_CARRIED_FRAME as u64 + 1, &mut missing);
    for (what, r) in [
        ("count", huge_count),
        ("frame", huge_frame),
        ("missing", missing),
    ] {
        let b = frame(CURRENT_VERSION, 0, &with_carried(&p, at, &r));
        let (result, peak) = peak_during(|| decode(&b));
        let err = result.unwrap_err();
        assert!(matches!(err, StateError::Malformed { .. }), "{what}: {err}");
        // The blob is under 1 KiB; the decoder may allocate what serde's cautious size hint
        // allows (at most 1 MiB per sequence), never what the length claims.
        assert!(peak <= 2 << 20, "{what}: decoding allocated {peak} bytes");
    }
}

#[test]
fn carried_bytes_are_bounded_over_all_pairs() {
    let mut s = example_snapshot();
    let per = MAX_CARRIED_FRAME;
    let n = MAX_CARRIED_BYTES / per + 1;
    s.queue_pairs[0].rx_carried = frames(n / 2, per);
    s.queue_pairs[1].rx_carried = frames(n - n / 2, per);
    assert!(matches!(
        s.validate(),
        Err(StateError::CarriedBytes {
            max: MAX_CARRIED_BYTES,
            ..
        })
    ));
    // Encoded anyway (fits the blob limit), the decoder refuses it too.
    let err = decode(&encode(&s)).unwrap_err();
    assert!(matches!(err, StateError::CarriedBytes { .. }), "{err}");
}
