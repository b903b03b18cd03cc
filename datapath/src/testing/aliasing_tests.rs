//! A guest whose RX buffers alias its own rings or each other (rx_pair fuzz finding 9): the
//! device writes only where the guest let it (inside the chains it walked, and the used
//! ring), so such a guest corrupts only itself; the harness must not report that as a device
//! bug, and must still check what the device wrote (used ids, lengths, `num_buffers`, where
//! the frame's bytes went).

use tapir_simguest::features as f;

use super::tests::{config, fixture, frame};
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
