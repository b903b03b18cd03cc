//! A guest whose RX buffers alias its own rings or each other (rx_pair fuzz finding 9): the
//! device writes only where the guest let it (inside the chains it walked, and the used
//! ring), so such a guest corrupts only itself; the harness must not report that as a device
//! bug, and must still check what the device wrote (used ids, lengths, `num_buffers`, where
//! the frame's bytes went).

use tapir_simguest::features as f;

use super::tests::{config, fixture, frame, Fixture};
use super::*;

const WRITE: u16 = tapir_simguest::VIRTQ_DESC_F_WRITE;
const READ_ONLY: u16 = 0;

fn mrg() -> u64 {
    f::VIRTIO_NET_F_MRG_RXBUF | f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4
}

/// A malformed chain is used (length 0) when popped; a frame written later into a buffer
/// that covers the used ring overwrites that entry. The entry was right when the device
/// wrote it.
#[test]
fn a_frame_over_the_used_ring_does_not_falsify_earlier_used_entries() {
    let mut fx = fixture(config(mrg(), 16));
    let mem = fx.guest.memory();
    let raw = fx.rx.raw();
    let (_, _, used) = raw.ring_addrs();
    let d = raw.free_desc_indices();
    // d[0]: device-readable, malformed for RX. d[1]: a buffer starting at the used ring.
    raw.write_desc(d[0], mem.alloc(2048, 64).unwrap(), 2048, READ_ONLY, 0);
    raw.write_desc(d[1], used, 2048, WRITE, 0);
    raw.push_avail(d[0]);
    raw.push_avail(d[1]);
    raw.publish();
    let before = fx.h.counters();
    assert_eq!(fx.h.rx_deliver(&frame(1000, 7)), RxDelivery::Done);
    let c = fx.h.counters().delta(&before);
    assert_eq!((c.rx_malformed, c.rx_packets), (1, 1), "{c:?}");
    fx.h.check().expect("invariants");
}

/// Two chains whose buffers overlap: the second part of the frame overwrites the end of the
/// first in guest memory. The device put every byte where the used chains say.
#[test]
fn overlapping_buffers_of_one_frame_are_the_guests_problem() {
    let mut fx = fixture(config(mrg(), 16));
    let mem = fx.guest.memory();
    let raw = fx.rx.raw();
    let d = raw.free_desc_indices();
    let buf = mem.alloc(8192, 64).unwrap();
    raw.write_desc(d[0], buf, 2048, WRITE, 0);
    raw.write_desc(d[1], buf + 2040, 2048, WRITE, 0);
    raw.push_avail(d[0]);
    raw.push_avail(d[1]);
    raw.publish();
    assert_eq!(fx.h.rx_deliver(&frame(3000, 9)), RxDelivery::Done);
    assert_eq!(fx.h.counters().rx_packets, 1);
    fx.h.check().expect("invariants");
}

/// A buffer over the descriptor table: the frame rewrites the descriptors, so walking the
/// chain again afterwards finds something else. What the device walked when it popped the
/// chain is what counts.
#[test]
fn a_frame_over_the_descriptor_table_is_checked_against_the_chain_as_popped() {
    let mut fx = fixture(config(mrg(), 16));
    let raw = fx.rx.raw();
    let (desc, _, _) = raw.ring_addrs();
    let d = raw.free_desc_indices();
    raw.write_desc(d[0], desc, 2048, WRITE, 0);
    raw.push_avail(d[0]);
    raw.publish();
    let mut fr = frame(500, 3);
    // Frame bytes that make every descriptor a zero-length, device-readable one.
    fr[VNET_HDR_LEN..].fill(0);
    assert_eq!(fx.h.rx_deliver(&fr), RxDelivery::Done);
    assert_eq!(fx.h.counters().rx_packets, 1);
    fx.h.check().expect("invariants");
}

/// The checks that matter stay: a used entry the device did write wrong is still reported
/// when the guest's buffers alias the used ring.
#[test]
fn a_wrong_used_entry_is_still_reported_beside_an_aliasing_buffer() {
    let mut fx = fixture(config(mrg(), 16));
    let mem = fx.guest.memory();
    let raw = fx.rx.raw();
    let (_, _, used) = raw.ring_addrs();
    let d = raw.free_desc_indices();
    raw.write_desc(d[0], used, 2048, WRITE, 0);
    raw.push_avail(d[0]);
    raw.publish();
    assert_eq!(fx.h.rx_deliver(&frame(100, 1)), RxDelivery::Done);
    fx.h.check().expect("invariants");
    let pair = fx.h.pair_mut();
    pair.rx.add_used(9, 100).unwrap();
    assert_eq!(
        fx.h.check(),
        Err(Violation::UsedIdNotHeld { queue: 0, id: 9 })
    );
    let _ = mem;
}

/// Chains `(addr, len)` made available in this order, each one buffer.
fn post(fx: &mut Fixture, bufs: &[(u64, u32)]) {
    let raw = fx.rx.raw();
    let d = raw.free_desc_indices();
    assert!(
        bufs.len() <= d.len(),
        "the fixture reserves {} descriptors",
        d.len()
    );
    for (&(addr, len), &desc) in bufs.iter().zip(&d) {
        raw.write_desc(desc, addr, len, WRITE, 0);
        raw.push_avail(desc);
    }
    raw.publish();
}

/// Two reads prepared one after the other, each posted with 2048 bytes of buffers.
fn two_reads_of_2048(fx: &mut Fixture) -> (RxSlot, RxSlot) {
    let first = fx.h.rx_prepare().expect("read 1");
    let second = fx.h.rx_prepare().expect("read 2");
    assert_eq!(fx.h.rx_posted_len(first), 2048);
    assert_eq!(fx.h.rx_posted_len(second), 2048);
    (first, second)
}

/// The TAP's `readv` into a prepared read returns `frame`, and the read completes.
fn deliver(fx: &mut Fixture, slot: RxSlot, frame: &[u8]) {
    fx.h.rx_write(slot, frame);
    assert_eq!(fx.h.rx_complete(slot), RxCompletion::Done);
}

/// rx_pair fuzz finding 15: a read's own chains overlap (the kernel's later bytes overwrite
/// earlier ones in guest memory), and the read is younger than a spare chain, so the device
/// moves the frame into the older chains (ring order). The moved frame is what the guest's
/// buffers held, its own corruption included: the device had nothing else to copy (the
/// kernel read into guest memory). The harness expects exactly that, no more.
#[test]
fn a_moved_frame_keeps_what_its_overlapping_source_chains_held() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_MRG_RXBUF, 16));
    let mem = fx.guest.memory();
    let a = mem.alloc(8192, 4096).unwrap();
    let b = mem.alloc(8192, 4096).unwrap();
    // Read 1: a, a+1024 (the target is one full frame). Read 2: b, and b+1000, which
    // overlaps b's last 24 bytes.
    post(
        &mut fx,
        &[(a, 1024), (a + 1024, 1024), (b, 1024), (b + 1000, 1024)],
    );
    let (first, second) = two_reads_of_2048(&mut fx);
    let before = fx.h.counters();
    // Frame 1 takes a alone: a+1024 goes back, older than read 2's chains.
    deliver(&mut fx, first, &frame(500, 1));
    deliver(&mut fx, second, &frame(1500, 2));
    let c = fx.h.counters().delta(&before);
    assert_eq!((c.rx_packets, c.rx_reordered), (2, 1), "{c:?}");
    fx.h.check().expect("invariants");
}

/// A frame that spills into a chain overlapping its posted buffer, and has to move (the spill
/// took a chain older than the read's). The device moves what the kernel put into the posted
/// buffers and the spill area's bytes, not guest memory it had just overwritten itself: the
/// frame arrives as the TAP read it.
#[test]
fn a_moved_spilled_frame_is_copied_from_the_kernels_bytes_not_its_own() {
    let mut fx = fixture(config(mrg(), 16));
    let mem = fx.guest.memory();
    let a = mem.alloc(8192, 4096).unwrap();
    let b = mem.alloc(8192, 4096).unwrap();
    let spare = mem.alloc(128 * 1024, 4096).unwrap();
    // Read 1: a, a+1024 (after it, b+1500 is the oldest spare chain). Read 2: b. Then b+1500
    // (overlapping b's last 548 bytes), and one large chain so that read 2 may be posted
    // (the spare buffers must take a largest GSO frame).
    post(
        &mut fx,
        &[(a, 1024), (b + 1500, 1024), (b, 2048), (spare, 128 * 1024)],
    );
    let (first, second) = two_reads_of_2048(&mut fx);
    let before = fx.h.counters();
    deliver(&mut fx, first, &frame(500, 1));
    // 3000 bytes: 2048 in b, the rest spills into b+1500 (older than b: the frame moves).
    deliver(&mut fx, second, &frame(3000 - VNET_HDR_LEN, 2));
    let c = fx.h.counters().delta(&before);
    assert_eq!(
        (c.rx_packets, c.rx_reordered, c.rx_spilled),
        (2, 1, 1),
        "{c:?}"
    );
    fx.h.check().expect("invariants");
}
