//! `Virtqueue::give_back` with arbitrary held lists (duplicates, heads out of range) and
//! guest-written avail rings: the base is only rewound over avail slots whose heads are held,
//! each at most once; every distinct held head below the queue size is either rewound over or
//! used exactly once (length 0, in the order given; duplicates and out-of-range heads count
//! once or not at all); the used index moves by exactly the used ones; nothing panics.
//!
//! Input: size exponent (u8, size = 2^(1 + n % 8)), next_avail (u16), next_used (u16), flags
//! (u8: bit 0 event_idx, bit 1 heads raw instead of `% size`), held count (u8), the held
//! heads (u16 each), then the avail ring image (flags, idx, ring entries; u16 each) written
//! at 0x1000. Descriptor table at 0, used ring at 0x2000.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tapir_datapath::{used_index, Virtqueue};
use tapir_datapath::{GuestMemory, QueueConfig};
use tapir_fuzz::{eventfd, guest_memory, write_clipped, zero, Input};
use tapir_state::{RawRingAddresses, RingAddresses, RingPositions};
use vm_memory::{Bytes, GuestAddress};

const DESC: u64 = 0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(guest_memory)
}

fn read_u16(mem: &GuestMemory, addr: u64) -> u16 {
    u16::from_le(
        mem.mmap()
            .read_obj::<u16>(GuestAddress(addr))
            .expect("in memory"),
    )
}

fn read_u32(mem: &GuestMemory, addr: u64) -> u32 {
    u32::from_le(
        mem.mmap()
            .read_obj::<u32>(GuestAddress(addr))
            .expect("in memory"),
    )
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    zero(mem);
    let mut input = Input::new(data);
    let size: u16 = 1 << (1 + input.u8() % 8);
    let next_avail = input.u16();
    let next_used = input.u16();
    let flags = input.u8();
    let event_idx = flags & 1 == 1;
    let raw_heads = flags & 2 == 2;
    let count = usize::from(input.u8());
    let held: Vec<u16> = (0..count)
        .map(|_| {
            let h = input.u16();
            if raw_heads {
                h
            } else {
                h % size
            }
        })
        .collect();
    write_clipped(mem, AVAIL, input.rest());
    // The used ring starts where the queue says it is.
    mem.mmap()
        .write_obj(next_used.to_le(), GuestAddress(USED + 2))
        .expect("used idx");

    let ring = RingAddresses::try_from(RawRingAddresses {
        size,
        desc: DESC,
        avail: AVAIL,
        used: USED,
    })
    .expect("a power-of-two size, aligned parts");
    let cfg = QueueConfig {
        ring,
        positions: RingPositions::new(next_avail, next_used),
        kick: eventfd(),
        call: eventfd(),
    };
    let mut vq = Virtqueue::new(0, cfg, event_idx, mem).expect("rings inside memory");
    // The avail heads as the guest wrote them, before give_back (which may write used).
    let avail_at = |pos: u16| read_u16(mem, AVAIL + 4 + 2 * u64::from(pos % size));
    let avail_before: Vec<u16> = (0..count.min(usize::from(u16::MAX)))
        .map(|k| avail_at(next_avail.wrapping_sub(1).wrapping_sub(k as u16)))
        .collect();

    let given = vq.give_back(mem, &held);

    // Each distinct held head below the queue size is given back once (a head listed twice,
    // or out of range, counts once or not at all).
    let mut distinct: Vec<u16> = Vec::new();
    for &h in &held {
        if h < size && !distinct.contains(&h) {
            distinct.push(h);
        }
    }
    assert_eq!(
        given.rewound + given.emptied,
        distinct.len(),
        "{given:?} for {held:?}"
    );
    assert_eq!(
        given.base,
        next_avail.wrapping_sub(given.rewound as u16),
        "base moved by exactly the rewound count"
    );
    assert_eq!(
        vq.positions().next_avail,
        given.base,
        "the queue resumes at the base"
    );
    // The base only went back over held heads, each once.
    let mut left = distinct.clone();
    for (k, head) in avail_before.iter().take(given.rewound).enumerate() {
        let Some(i) = left.iter().position(|h| h == head) else {
            panic!(
                "rewound over slot -{} with head {head}, which is not held (or twice) ({held:?})",
                k + 1
            );
        };
        left.remove(i);
    }
    // What is left went through the used ring, once each, with length 0, in held order.
    assert_eq!(given.emptied, left.len(), "every other held head was used");
    let used_now = used_index(mem, USED).expect("used ring readable");
    assert_eq!(
        used_now,
        next_used.wrapping_add(left.len() as u16),
        "used index moved by the heads given back empty ({left:?})"
    );
    // (Only the last `size` entries: earlier ones were overwritten when the ring wrapped.)
    let first = left.len().saturating_sub(usize::from(size));
    for (k, &h) in left.iter().enumerate().skip(first) {
        let slot = u64::from(next_used.wrapping_add(k as u16) % size);
        let elem = USED + 4 + 8 * slot;
        assert_eq!(read_u32(mem, elem), u32::from(h), "used id {k}");
        assert_eq!(read_u32(mem, elem + 4), 0, "used length {k}");
    }
});
