//! The ring protocol over the host view, against a guest that writes its rings by hand.

#![allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::fs::File;
use std::os::fd::OwnedFd;

use nix::sys::eventfd::{EfdFlags, EventFd};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::memory::MemoryRegionSpec;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const SIZE: u16 = 8;

fn memfd(size: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"vq", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
    let file = File::from(fd);
    file.set_len(size).unwrap();
    file.into()
}

fn eventfd() -> OwnedFd {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .unwrap()
        .into()
}

fn memory(regions: &[(u64, u64)]) -> GuestMemory {
    GuestMemory::from_regions(
        regions
            .iter()
            .map(|&(guest_addr, size)| MemoryRegionSpec {
                guest_addr,
                size,
                fd: memfd(size),
                file_offset: 0,
            })
            .collect(),
    )
    .unwrap()
}

fn config(desc_table: u64, avail_ring: u64, used_ring: u64) -> QueueConfig {
    QueueConfig {
        ring: tapir_state::RingAddresses::try_from(tapir_state::RawRingAddresses {
            size: SIZE,
            desc: desc_table,
            avail: avail_ring,
            used: used_ring,
        })
        .unwrap(),
        positions: tapir_state::RingPositions::default(),
        kick: eventfd(),
        call: eventfd(),
    }
}

fn queue(mem: &GuestMemory, event_idx: bool) -> Virtqueue {
    Virtqueue::new(0, config(DESC, AVAIL, USED), event_idx, mem).unwrap()
}

/// The guest makes `heads` available after `at` entries and publishes the avail index.
fn make_available(mem: &GuestMemory, at: u16, heads: &[u16]) {
    let m = mem.mmap();
    for (i, &h) in heads.iter().enumerate() {
        let slot = (at as usize + i) % usize::from(SIZE);
        m.write_obj(h.to_le(), GuestAddress(AVAIL + 4 + 2 * slot as u64))
            .unwrap();
    }
    set_avail_idx(mem, at.wrapping_add(u16::try_from(heads.len()).unwrap()));
}

fn set_avail_idx(mem: &GuestMemory, idx: u16) {
    mem.mmap()
        .write_obj(idx.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
}

fn guest_used_idx(mem: &GuestMemory) -> u16 {
    used_index(mem, USED).unwrap()
}

fn pop_all(q: &mut Virtqueue) -> Result<Vec<u16>, QueueError> {
    let mut heads = Vec::new();
    q.pop(64, |h| heads.push(h))?;
    Ok(heads)
}

#[test]
fn rings_outside_memory_or_across_a_region_boundary_refuse_the_queue() {
    let mem = memory(&[(0, 0x2000), (0x2000, 0x2000)]);
    for cfg in [
        // The used ring past the end of memory.
        config(DESC, AVAIL, 0x3ffc),
        // The avail ring across the boundary between the two regions.
        config(DESC, 0x1ffc, USED),
        // A descriptor table the guest put nowhere.
        config(0x10_0000, AVAIL, USED),
    ] {
        let e = Virtqueue::new(3, cfg, false, &mem).unwrap_err();
        assert!(
            matches!(e, QueueError::InvalidConfig { index: 3, .. }),
            "{e}"
        );
    }
}

#[test]
fn pops_what_the_guest_made_available_in_order() {
    let mem = memory(&[(0, 0x10000)]);
    let mut q = queue(&mem, false);
    make_available(&mem, 0, &[3, 1, 2]);
    assert_eq!(pop_all(&mut q).unwrap(), vec![3, 1, 2]);
    assert_eq!(pop_all(&mut q).unwrap(), Vec::<u16>::new());
    assert_eq!(q.positions(), tapir_state::RingPositions::new(3, 0));
    // Wrapping around the ring.
    for h in [3, 1, 2] {
        q.add_used(h, 0).unwrap();
    }
    make_available(&mem, 3, &[0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(pop_all(&mut q).unwrap(), vec![0, 1, 2, 3, 4, 5, 6]);
}

#[test]
fn an_avail_index_more_than_the_queue_size_ahead_breaks_the_queue() {
    let mem = memory(&[(0, 0x10000)]);
    let mut q = queue(&mem, false);
    set_avail_idx(&mem, SIZE + 1);
    assert!(matches!(pop_all(&mut q), Err(QueueError::Broken { .. })));
    assert!(q.is_broken());
    assert_eq!(
        pop_all(&mut q).unwrap(),
        Vec::<u16>::new(),
        "broken: no more pops"
    );
}

#[test]
fn a_guest_moving_its_avail_index_back_breaks_the_queue() {
    let mem = memory(&[(0, 0x10000)]);
    let mut q = queue(&mem, false);
    make_available(&mem, 0, &[0, 1]);
    assert_eq!(pop_all(&mut q).unwrap(), vec![0, 1]);
    // Back by one: 65535 entries "ahead".
    set_avail_idx(&mem, 1);
    assert!(matches!(pop_all(&mut q), Err(QueueError::Broken { .. })));
}

#[test]
fn heads_past_the_size_or_held_break_the_queue() {
    let mem = memory(&[(0, 0x10000)]);
    let mut q = queue(&mem, false);
    make_available(&mem, 0, &[2, SIZE]);
    let mut got = Vec::new();
    let e = q.pop(64, |h| got.push(h)).unwrap_err();
    assert!(matches!(e, QueueError::BadHead { head: SIZE, .. }), "{e}");
    assert_eq!(got, vec![2], "the heads before it were handed out");

    let mut q = queue(&mem, false);
    make_available(&mem, 0, &[5, 5]);
    let e = pop_all(&mut q).unwrap_err();
    assert!(matches!(e, QueueError::BadHead { head: 5, .. }), "{e}");
}

#[test]
fn used_entries_are_published_once_per_batch() {
    let mem = memory(&[(0, 0x10000)]);
    let mut q = queue(&mem, false);
    make_available(&mem, 0, &[0, 1, 2]);
    pop_all(&mut q).unwrap();
    for (h, len) in [(1, 10), (0, 20), (2, 30)] {
        q.add_used(h, len).unwrap();
    }
    assert_eq!(guest_used_idx(&mem), 0, "not shown before the batch ends");
    let _ = mem.take_dirty_log();
    q.publish_used();
    assert_eq!(guest_used_idx(&mem), 3);
    assert_eq!(
        mem.take_dirty_log(),
        vec![USED],
        "the used ring's page, once"
    );
    let elems: Vec<(u32, u32)> = (0..3u64)
        .map(|i| {
            let m = mem.mmap();
            let id: u32 = m.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
            (id, len)
        })
        .collect();
    assert_eq!(elems, vec![(1, 10), (0, 20), (2, 30)]);
}

#[test]
fn a_guest_rewriting_the_used_index_is_corrected_at_the_next_publish() {
    let mem = memory(&[(0, 0x10000)]);
    let mut q = queue(&mem, false);
    make_available(&mem, 0, &[0, 1]);
    pop_all(&mut q).unwrap();
    q.add_used(0, 0).unwrap();
    q.publish_used();
    mem.mmap()
        .write_obj(0x4242u16.to_le(), GuestAddress(USED + 2))
        .unwrap();
    // The device keeps its own position; the guest's write does not move it.
    q.add_used(1, 0).unwrap();
    q.publish_used();
    assert_eq!(guest_used_idx(&mem), 2);
    assert_eq!(q.positions(), tapir_state::RingPositions::new(2, 2));
}

#[test]
fn enable_notification_rechecks_the_avail_index() {
    let mem = memory(&[(0, 0x10000)]);
    for event_idx in [false, true] {
        let mut q = queue(&mem, event_idx);
        set_avail_idx(&mem, 0);
        q.disable_notification();
        assert!(!q.enable_notification(), "nothing arrived");
        make_available(&mem, 0, &[4]);
        assert!(q.enable_notification(), "a buffer arrived while arming");
        let m = mem.mmap();
        if event_idx {
            let avail_event: u16 = m
                .read_obj(GuestAddress(USED + 4 + 8 * u64::from(SIZE)))
                .unwrap();
            assert_eq!(avail_event, 0, "kick me at the first entry not popped");
        } else {
            let flags: u16 = m.read_obj(GuestAddress(USED)).unwrap();
            assert_eq!(flags, 0, "kicks enabled");
            q.disable_notification();
            let flags: u16 = m.read_obj(GuestAddress(USED)).unwrap();
            assert_eq!(flags, VRING_USED_F_NO_NOTIFY);
        }
    }
}

#[test]
fn interrupts_follow_used_event_and_the_no_interrupt_flag() {
    let mem = memory(&[(0, 0x10000)]);
    let m = mem.mmap();
    let used_event = GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE));
    // EVENT_IDX: the driver wants an interrupt once entry `used_event` is used.
    let mut q = queue(&mem, true);
    make_available(&mem, 0, &[0, 1, 2, 3]);
    pop_all(&mut q).unwrap();
    m.write_obj(1u16.to_le(), used_event).unwrap();
    q.add_used(0, 0).unwrap();
    assert!(
        !q.needs_notification(),
        "entry 0 used; the driver waits for 1"
    );
    q.add_used(1, 0).unwrap();
    q.add_used(2, 0).unwrap();
    assert!(q.needs_notification(), "entry 1 is in the window [1, 3)");
    q.add_used(3, 0).unwrap();
    assert!(!q.needs_notification(), "1 is behind the new window [3, 4)");
    assert_eq!(
        guest_used_idx(&mem),
        4,
        "the decision published the entries"
    );
    // Without EVENT_IDX: VRING_AVAIL_F_NO_INTERRUPT.
    let mut q = queue(&mem, false);
    q.set_positions(tapir_state::RingPositions::default());
    make_available(&mem, 0, &[0]);
    pop_all(&mut q).unwrap();
    q.add_used(0, 0).unwrap();
    m.write_obj(1u16.to_le(), GuestAddress(AVAIL)).unwrap();
    assert!(!q.needs_notification());
    m.write_obj(0u16.to_le(), GuestAddress(AVAIL)).unwrap();
    assert!(q.needs_notification());
}

#[test]
fn notification_fields_the_device_writes_are_dirty_logged_at_the_next_publish() {
    let mem = memory(&[(0, 0x10000)]);
    for event_idx in [false, true] {
        let mut q = queue(&mem, event_idx);
        let _ = mem.take_dirty_log();
        q.disable_notification();
        let _ = q.enable_notification();
        assert!(
            mem.take_dirty_log().is_empty(),
            "logged once per batch, not per write"
        );
        q.publish_used();
        assert_eq!(mem.take_dirty_log(), vec![USED], "event_idx {event_idx}");
    }
}
