//! A TX queue (of a queue pair driven in process by `tapir_datapath::testing::PairHarness`,
//! no TAP) over an arbitrary guest memory image, its chains completed out of order with
//! arbitrary TAP results (short writes, errors), the guest rewriting its memory between steps.
//! After every step the harness's invariant check passes (used ids below the queue size and
//! only ids the device held, each used once, used length 0, bounded held lists), a gathered
//! frame is never longer than the largest frame a TAP takes, and the device wrote guest memory
//! only in the TX used ring.
//!
//! Input: size exponent (u8), feature bits (u8: bit 0 MRG_RXBUF, 1 EVENT_IDX, 2 HOST_TSO4/6,
//! 3 HOST_USO), the initial image (guest patches, see `patch_guest`), then steps: op (u8 % 6)
//! and its fields. Rings: TX descriptors at 0x3000, avail at 0x4000, used at 0x5000.
#![no_main]

use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use tapir_datapath::features as f;
use tapir_datapath::testing::{queue_config, PairHarness, TxSlot};
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
        features |= f::NET_F_HOST_TSO4 | f::NET_F_HOST_TSO6;
    }
    if bits & 8 != 0 {
        features |= f::NET_F_HOST_USO;
    }
    patch_guest(mem, &mut input);
    let rx = queue_config(size, RX.0, RX.1, RX.2).expect("eventfds");
    let tx = queue_config(size, TX.0, TX.1, TX.2).expect("eventfds");
    let settings = PairSettings {
        features,
        mtu: 1500,
    };
    let Ok(mut h) = PairHarness::new(mem.clone(), rx, tx, settings) else {
        return;
    };
    let mut writable = writable().lock().expect("writable");
    writable.start(mem);
    writable.allow(TX.2, 4 + 8 * u64::from(size) + 2);
    let mut slots: Vec<TxSlot> = Vec::new();
    for _ in 0..64 {
        if input.is_empty() {
            break;
        }
        match input.u8() % 6 {
            0 => {
                if let Some(s) = h.tx_next() {
                    let frame = h.tx_frame(s);
                    assert!(
                        frame.len() <= f::MAX_GSO_FRAME + 12,
                        "a TX frame of {} bytes",
                        frame.len()
                    );
                    slots.push(s);
                }
            }
            1 => {
                if !slots.is_empty() {
                    let s = slots.remove(usize::from(input.u8()) % slots.len());
                    let result = match input.u8() % 4 {
                        0 => Ok(h.tx_frame(s).len()),
                        1 => Ok(usize::from(input.u16())),
                        2 => Err(libc::EAGAIN),
                        _ => Err(i32::from(input.u8())),
                    };
                    h.tx_complete(s, result);
                }
            }
            2 => {
                let _ = h.tx_send();
            }
            3 => {
                let _ = h.interrupts();
            }
            4 => h.publish(),
            _ => {
                patch_guest(mem, &mut input);
                writable.guest_wrote(mem);
                continue;
            }
        }
        if let Some(addr) = writable.first_forbidden_write(mem) {
            panic!("the TX side wrote guest byte {addr:#x}, outside its used ring");
        }
        if let Err(v) = h.check() {
            panic!("invariant: {v}");
        }
    }
    for s in slots {
        h.tx_complete(s, Ok(0));
    }
    if let Err(v) = h.check() {
        panic!("invariant at the end: {v}");
    }
});
