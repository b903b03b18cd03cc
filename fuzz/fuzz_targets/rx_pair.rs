//! An RX queue (of a queue pair driven in process by `tapir_datapath::testing::PairHarness`,
//! no TAP) over an arbitrary guest memory image, fed TAP frames of arbitrary lengths, with the
//! guest rewriting its memory between steps. After every step the harness's invariant check
//! passes (used ids below the queue size and only ids the device held, used lengths within
//! the chain's capacity, a delivered frame's bytes and `num_buffers` right, spare list and held
//! heads bounded by the queue size), and the device (with the fake kernel that plays
//! `readv`) wrote guest memory only inside device-writable chains and the used ring.
//!
//! Both crashes this target found are fixed (docs/RELIABILITY.md, findings 1 and 8; finding
//! 9 was the harness's), so it skips nothing under `TAPIR_FUZZ_SKIP_KNOWN=1`.
//!
//! Input: size exponent (u8, size 2^(1 + n % 8)), feature bits (u8: bit 0 MRG_RXBUF, 1
//! EVENT_IDX, 2 GUEST_TSO4/6 + GUEST_CSUM, 3 GUEST_USO4/6), the MTU (u16, 0: 1500), the
//! initial image (guest patches, see `patch_guest`), then steps: op (u8 % 8) and its fields.
//! Rings: descriptors at 0, avail at 0x1000, used at 0x2000 (the TX queue at 0x3000 ff.).
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tapir_datapath::features as f;
use tapir_datapath::testing::{queue_config, PairHarness, RxSlot};
use tapir_datapath::GuestMemory;
use tapir_datapath::PairSettings;
use tapir_fuzz::{guest_memory, patch_guest, zero, Input, Writable};

const RX: (u64, u64, u64) = (0, 0x1000, 0x2000);
const TX: (u64, u64, u64) = (0x3000, 0x4000, 0x5000);

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(guest_memory)
}

/// What the device may write, one for the process (fresh buffers per input cost a tenth of
/// the time).
fn writable() -> &'static Mutex<Writable> {
    static WRITABLE: OnceLock<Mutex<Writable>> = OnceLock::new();
    WRITABLE.get_or_init(|| Mutex::new(Writable::default()))
}

/// A frame the TAP would hand over: a vnet header (12 bytes, from the input) and `len`
/// payload bytes.
fn frame(input: &mut Input) -> Vec<u8> {
    let len = match input.u8() % 4 {
        0 => usize::from(input.u8()),
        1 => 1514,
        2 => usize::from(input.u16()),
        _ => f::MAX_GSO_FRAME + usize::from(input.u8()),
    };
    let mut frame = input.bytes(12).to_vec();
    frame.resize(12, 0);
    frame.extend_from_slice(&payload()[..len]);
    frame
}

/// Payload bytes `i % 251`, enough for the longest frame (made once: per input it was a
/// fifth of the target's time).
fn payload() -> &'static [u8] {
    static P: OnceLock<Vec<u8>> = OnceLock::new();
    P.get_or_init(|| {
        (0..f::MAX_GSO_FRAME + 256)
            .map(|i| (i % 251) as u8)
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    zero(mem);
    let mut input = Input::new(data);
    let size: u16 = 1 << (1 + input.u8() % 8);
    let bits = input.u8();
    let mut features = f::F_VERSION_1 | f::NET_F_CSUM;
    if bits & 1 != 0 {
        features |= f::NET_F_MRG_RXBUF;
    }
    if bits & 2 != 0 {
        features |= f::F_EVENT_IDX;
    }
    if bits & 4 != 0 {
        features |= f::NET_F_GUEST_CSUM | f::NET_F_GUEST_TSO4 | f::NET_F_GUEST_TSO6;
    }
    if bits & 8 != 0 {
        features |= f::NET_F_GUEST_CSUM | f::NET_F_GUEST_USO4 | f::NET_F_GUEST_USO6;
    }
    let mtu = match input.u16() {
        0 => 1500,
        m => m,
    };
    patch_guest(mem, &mut input);
    let rx = queue_config(size, RX.0, RX.1, RX.2).expect("eventfds");
    let tx = queue_config(size, TX.0, TX.1, TX.2).expect("eventfds");
    let Ok(mut h) = PairHarness::new(mem.clone(), rx, tx, PairSettings { features, mtu }) else {
        return;
    };
    let table = h.pair().rx.table();
    let mut writable = writable().lock().expect("writable");
    writable.start(mem);
    // The used ring (with avail_event after it).
    writable.allow(RX.2, 4 + 8 * u64::from(size) + 2);
    writable.allow_chains(mem, table);
    let mut slots: Vec<RxSlot> = Vec::new();
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        // Chains the device may walk now (the device's own writes may have made new ones).
        writable.allow_chains(mem, table);
        match input.u8() % 8 {
            0 => {
                let fr = frame(&mut input);
                let _ = h.rx_deliver(&fr);
            }
            1 => {
                if let Some(s) = h.rx_prepare() {
                    slots.push(s);
                }
            }
            2 => {
                if !slots.is_empty() {
                    let s = slots.remove(usize::from(input.u8()) % slots.len());
                    let fr = frame(&mut input);
                    h.rx_write(s, &fr);
                    let _ = h.rx_complete(s);
                }
            }
            3 => {
                let _ = h.rx_retry();
            }
            4 => {
                if !slots.is_empty() {
                    let s = slots.remove(usize::from(input.u8()) % slots.len());
                    h.rx_cancel(s);
                }
            }
            5 => h.rx_drop_deferred(),
            6 => {
                let _ = h.interrupts();
            }
            _ => {
                // The guest rewrites part of its memory (new buffers, a new avail index).
                patch_guest(mem, &mut input);
                writable.guest_wrote(mem);
                continue;
            }
        }
        if let Some(addr) = writable.first_forbidden_write(mem) {
            panic!(
                "the device wrote guest byte {addr:#x}, outside every RX chain and the used ring"
            );
        }
        if let Err(v) = h.check() {
            panic!("invariant: {v}");
        }
    }
    h.rx_drop_deferred();
    if let Err(v) = h.check() {
        panic!("invariant at the end: {v}");
    }
});
