//! The harness's own tests, and through it unit tests of the queue pair's RX and TX logic,
//! with the simulated guest on the other side. Every case asserts counter deltas and runs the
//! invariant checks.

// Test data: byte patterns cut from counters on purpose.
#![allow(clippy::cast_possible_truncation)]

use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use tapir_simguest::features as f;
use tapir_simguest::{GuestConfig, RxDriver, SimGuest, TxDriver, VirtioNetHdr, VirtqueueInfo};

use super::*;
use crate::memory::MemoryRegionSpec;
use crate::pair::{PairPositions, TxNext};
use tapir_state::RingPositions;

const WRITE: u16 = tapir_simguest::VIRTQ_DESC_F_WRITE;

fn dup(fd: RawFd) -> OwnedFd {
    // SAFETY: the SimGuest owning `fd` outlives this call.
    unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .expect("dup")
}

fn queue(info: VirtqueueInfo) -> QueueConfig {
    QueueConfig {
        ring: tapir_state::RingAddresses::try_from(tapir_state::RawRingAddresses {
            size: info.size,
            desc: info.desc_table,
            avail: info.avail_ring,
            used: info.used_ring,
        })
        .expect("ring addresses"),
        positions: tapir_state::RingPositions::default(),
        kick: dup(info.kick_fd),
        call: dup(info.call_fd),
    }
}

/// A simulated guest and a harness over its pair 0.
pub(super) struct Fixture {
    pub guest: SimGuest,
    pub h: PairHarness,
    pub rx: RxDriver,
    pub tx: TxDriver,
}

pub(super) fn fixture(cfg: GuestConfig) -> Fixture {
    let mut guest = SimGuest::new(cfg).expect("SimGuest");
    let mem = GuestMemory::from_regions(
        guest
            .regions()
            .iter()
            .map(|r| MemoryRegionSpec {
                guest_addr: r.guest_addr,
                size: r.size,
                fd: dup(r.fd),
                file_offset: r.file_offset,
            })
            .collect(),
    )
    .expect("guest memory");
    let settings = PairSettings {
        features: guest.features(),
        mtu: 1500,
    };
    let h = PairHarness::new(
        mem,
        queue(guest.rx_queue(0)),
        queue(guest.tx_queue(0)),
        settings,
    )
    .expect("harness");
    let (rx, tx) = guest.take_pair(0);
    Fixture { guest, h, rx, tx }
}

pub(super) fn config(features: u64, queue_size: u16) -> GuestConfig {
    GuestConfig {
        features: features | f::VIRTIO_F_VERSION_1,
        queue_size,
        ..GuestConfig::default()
    }
}

/// A frame as the TAP hands it over: a zeroed vnet header, then `len` bytes numbered by `seed`.
pub(super) fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; VNET_HDR_LEN];
    v.extend((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
    v
}

fn recv(rx: &mut RxDriver) -> tapir_simguest::RxPacket {
    rx.poll()
        .expect("guest saw a device bug")
        .expect("a packet")
}

#[test]
fn tx_gathers_the_frame_and_completes_it() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_CSUM, 64));
    let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
    assert!(fx.tx.push(&VirtioNetHdr::default(), &payload).unwrap());
    fx.tx.flush();
    let before = fx.h.counters();
    let got = fx.h.tx_send().expect("a TX chain");
    assert_eq!(got.len(), VNET_HDR_LEN + payload.len());
    assert_eq!(&got[VNET_HDR_LEN..], &payload[..]);
    assert_eq!(fx.h.tx_send(), None, "one chain only");
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.tx_packets, d.tx_bytes, d.tx_malformed), (1, 300, 0));
    fx.h.check().expect("invariants");
    // (Whether an interrupt is due depends on the driver's suppression: see the tests below.)
    assert!(!fx.h.interrupts().rx);
    assert_eq!(fx.tx.reclaim(), 1);
    assert_eq!(fx.tx.stats().device_errors, 0);
}

#[test]
fn tx_chains_complete_out_of_order_and_failures_count() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_CSUM, 64));
    for i in 0..3u8 {
        assert!(fx.tx.push(&VirtioNetHdr::default(), &[i; 100]).unwrap());
    }
    fx.tx.flush();
    let before = fx.h.counters();
    let a = fx.h.tx_next().unwrap();
    let b = fx.h.tx_next().unwrap();
    let c = fx.h.tx_next().unwrap();
    assert_eq!(fx.h.tx_frame(b)[VNET_HDR_LEN], 1);
    fx.h.tx_complete(c, Ok(112));
    fx.h.tx_complete(a, Err(libc::EINVAL));
    fx.h.tx_complete(b, Ok(112));
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.tx_packets, d.tx_errors), (2, 1));
    fx.h.check().expect("invariants");
    assert_eq!(fx.tx.reclaim(), 3);
    assert_eq!(fx.tx.stats().device_errors, 0);
}

#[test]
fn rx_delivers_one_chain_with_num_buffers_1() {
    for features in [f::VIRTIO_NET_F_MRG_RXBUF, 0] {
        let mut fx = fixture(config(features | f::VIRTIO_NET_F_GUEST_CSUM, 64));
        fx.rx.refill();
        let before = fx.h.counters();
        let fr = frame(500, 7);
        assert_eq!(fx.h.rx_deliver(&fr), RxDelivery::Done);
        let d = fx.h.counters().delta(&before);
        assert_eq!((d.rx_packets, d.rx_bytes, d.rx_spilled), (1, 500, 0));
        fx.h.check().expect("invariants");
        let p = recv(&mut fx.rx);
        assert_eq!(p.data, fr[VNET_HDR_LEN..]);
        assert_eq!(p.buffers, 1);
    }
}

#[test]
fn rx_spills_into_further_chains_with_mrg_rxbuf() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    let mut fx = fixture(config(f::VIRTIO_NET_F_MRG_RXBUF | gso, 64));
    fx.rx.refill();
    let before = fx.h.counters();
    let slot = fx.h.rx_prepare().expect("buffers");
    // One full-MTU chain predicted at first.
    assert_eq!(fx.h.rx_posted_len(slot), 2048);
    let fr = frame(5000, 3);
    assert_eq!(fx.h.rx_write(slot, &fr), fr.len());
    assert_eq!(fx.h.rx_complete(slot), RxCompletion::Done);
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_packets, d.rx_spilled, d.rx_deferred), (1, 1, 0));
    fx.h.check().expect("invariants");
    let p = recv(&mut fx.rx);
    assert_eq!(p.buffers, 3, "5012 bytes over 2048-byte chains");
    assert_eq!(p.data, fr[VNET_HDR_LEN..]);
    assert_eq!(fx.rx.stats().device_errors, 0);
}

#[test]
fn rx_frame_too_large_without_mrg_rxbuf_is_dropped_not_truncated() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    let mut fx = fixture(config(gso, 64));
    fx.rx.refill();
    let before = fx.h.counters();
    assert_eq!(fx.h.rx_deliver(&frame(5000, 1)), RxDelivery::Done);
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_packets, d.rx_dropped_oversize), (0, 1));
    fx.h.check().expect("invariants");
    // The chain is reused for the next frame.
    assert_eq!(fx.h.rx_deliver(&frame(100, 2)), RxDelivery::Done);
    fx.h.check().expect("invariants");
    assert_eq!(recv(&mut fx.rx).data, frame(100, 2)[VNET_HDR_LEN..]);
}

#[test]
fn rx_defers_until_the_guest_refills_then_delivers_in_order() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    // 8 descriptors, 2 reserved: 6 chains of 2048 bytes.
    let mut fx = fixture(config(f::VIRTIO_NET_F_MRG_RXBUF | gso, 8));
    assert_eq!(fx.rx.refill(), 6);
    let a = frame(5000, 1);
    assert_eq!(fx.h.rx_deliver(&a), RxDelivery::Done);
    fx.h.check().expect("invariants");
    assert_eq!(recv(&mut fx.rx).buffers, 3);
    // 3 chains left posted; the next frame needs 5.
    let before = fx.h.counters();
    let b = frame(10_000, 2);
    let RxDelivery::Deferred(slot) = fx.h.rx_deliver(&b) else {
        panic!("not deferred");
    };
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_deferred, d.rx_packets), (1, 0));
    // Retrying without new buffers changes nothing and counts no second deferral.
    assert_eq!(fx.h.rx_retry(), RxCompletion::Deferred);
    assert_eq!(fx.h.counters().delta(&before).rx_deferred, 1);
    assert_eq!(fx.h.rx_outstanding(), 1);
    let _ = slot;
    assert_eq!(fx.rx.refill(), 3);
    assert_eq!(fx.h.rx_retry(), RxCompletion::Done);
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_deferred, d.rx_packets, d.rx_spilled), (1, 1, 1));
    fx.h.check().expect("invariants");
    let p = recv(&mut fx.rx);
    assert_eq!(p.buffers, 5);
    assert_eq!(p.data, b[VNET_HDR_LEN..]);
    assert_eq!(fx.rx.stats().device_errors, 0);
}

#[test]
fn rx_deferred_frame_is_dropped_and_counted_at_stop() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    let mut fx = fixture(config(f::VIRTIO_NET_F_MRG_RXBUF | gso, 8));
    fx.rx.refill();
    let before = fx.h.counters();
    assert!(matches!(
        fx.h.rx_deliver(&frame(20_000, 1)),
        RxDelivery::Deferred(_)
    ));
    fx.h.rx_drop_deferred();
    let d = fx.h.counters().delta(&before);
    assert_eq!(
        (d.rx_deferred, d.rx_dropped_no_buffers, d.rx_packets),
        (1, 1, 0)
    );
    // Every chain is held again, none used.
    assert_eq!(fx.h.pair().spare_rx().count(), 6);
    fx.h.check().expect("invariants");
}

#[test]
fn mrg_rxbuf_frames_across_chains_have_the_right_num_buffers() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    let mut cfg = config(f::VIRTIO_NET_F_MRG_RXBUF | gso, 256);
    // Chains of 3 descriptors over non-contiguous pieces.
    cfg.rx_descs_per_chain = 3;
    cfg.rx_buffer_size = 1000;
    let mut fx = fixture(cfg);
    fx.rx.refill();
    for (i, len) in [60usize, 988, 989, 4000, 30_000, 65_000, 100]
        .iter()
        .enumerate()
    {
        let before = fx.h.counters();
        let fr = frame(*len, i as u8);
        assert_eq!(fx.h.rx_deliver(&fr), RxDelivery::Done, "frame {len}");
        assert_eq!(fx.h.counters().delta(&before).rx_packets, 1, "frame {len}");
        fx.h.check().expect("invariants");
        let p = recv(&mut fx.rx);
        assert_eq!(usize::from(p.buffers), (len + VNET_HDR_LEN).div_ceil(1000));
        assert_eq!(p.data, fr[VNET_HDR_LEN..], "frame {len}");
        fx.rx.refill();
    }
    assert_eq!(fx.rx.stats().device_errors, 0);
}

#[test]
fn give_back_rewinds_over_held_tail_and_empties_holes() {
    // MRG_RXBUF without GSO: several reads may be posted at once.
    let mut fx = fixture(config(
        f::VIRTIO_NET_F_MRG_RXBUF | f::VIRTIO_NET_F_GUEST_CSUM,
        8,
    ));
    assert_eq!(fx.rx.refill(), 6);
    let first = fx.h.rx_prepare().unwrap();
    let second = fx.h.rx_prepare().unwrap();
    // The second read completes, the first is cancelled: chain 0 is held below used chain 1.
    fx.h.rx_write(second, &frame(100, 1));
    assert_eq!(fx.h.rx_complete(second), RxCompletion::Done);
    fx.h.rx_cancel(first);
    fx.h.check().expect("invariants");
    let mut held: Vec<u16> = fx.h.pair().spare_rx().collect();
    fx.h.pair_mut().settle_rx_order();
    held.sort_unstable();
    let ordered: Vec<u16> = fx.h.pair().spare_rx().collect();
    assert_eq!(ordered.len(), 5);
    let pair = fx.h.pair_mut();
    let mem = pair.mem.clone();
    let gb = pair.rx.give_back(&mem, &ordered);
    assert_eq!(
        (gb.base, gb.rewound, gb.emptied),
        (2, 4, 1),
        "held {ordered:?}"
    );
    // The guest sees two used entries: the frame and the emptied hole (length 0).
    let p = recv(&mut fx.rx);
    assert_eq!(p.data, frame(100, 1)[VNET_HDR_LEN..]);
    assert_eq!(fx.rx.take_foreign_used(), Vec::<(u32, u32)>::new());
    assert_eq!(fx.rx.stats().device_errors, 0, "{:?}", fx.rx.stats());
}

/// EVENT_IDX across the 16-bit wrap, on raw rings: `used_event` 0xffff asks for an interrupt
/// once the used index passes 0xffff, i.e. at the entry that makes it 0.
#[test]
fn event_idx_interrupts_across_the_index_wrap() {
    let mut fx = fixture(config(
        f::VIRTIO_RING_F_EVENT_IDX | f::VIRTIO_NET_F_GUEST_CSUM,
        8,
    ));
    let mem = fx.guest.memory();
    let raw = fx.rx.raw();
    let free = raw.free_desc_indices();
    raw.set_next_avail(0xfffe);
    for &d in free.iter().take(2) {
        let b = mem.alloc(2048, 64).unwrap();
        raw.write_desc(d, b, 2048, WRITE, 0);
        raw.push_avail(d);
    }
    raw.publish();
    raw.set_used_event(0xffff);
    fx.h.reposition(&PairPositions {
        rx: RingPositions::new(0xfffe, 0xfffe),
        tx: RingPositions::default(),
        rx_in_flight: Vec::new(),
        rx_carried: Vec::new(),
    })
    .unwrap();
    let before = fx.h.counters();
    assert_eq!(fx.h.rx_deliver(&frame(64, 1)), RxDelivery::Done);
    assert!(
        !fx.h.interrupts().rx,
        "used index 0xffff: not past used_event"
    );
    assert_eq!(fx.h.rx_deliver(&frame(64, 2)), RxDelivery::Done);
    assert!(fx.h.interrupts().rx, "used index 0: past used_event 0xffff");
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_packets, d.rx_interrupts), (2, 1));
    assert_eq!(fx.h.pair().rx.positions(), RingPositions::new(0, 0));
    fx.h.check().expect("invariants");
}

/// Without EVENT_IDX, `VRING_AVAIL_F_NO_INTERRUPT` suppresses interrupts while it is set.
#[test]
fn no_interrupt_flag_suppresses_interrupts() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_GUEST_CSUM, 64));
    fx.rx.refill();
    fx.rx
        .raw()
        .set_avail_flags(tapir_simguest::VIRTQ_AVAIL_F_NO_INTERRUPT);
    let before = fx.h.counters();
    assert_eq!(fx.h.rx_deliver(&frame(64, 1)), RxDelivery::Done);
    assert!(!fx.h.interrupts().rx);
    fx.rx.raw().set_avail_flags(0);
    assert_eq!(fx.h.rx_deliver(&frame(64, 2)), RxDelivery::Done);
    assert!(fx.h.interrupts().rx);
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_packets, d.rx_interrupts), (2, 1));
    fx.h.check().expect("invariants");
}

#[test]
fn no_buffers_posts_no_read_and_counts() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_GUEST_CSUM, 64));
    let before = fx.h.counters();
    assert_eq!(fx.h.rx_deliver(&frame(64, 1)), RxDelivery::NoBuffers);
    assert_eq!(fx.h.counters().delta(&before).rx_no_buffers, 1);
    fx.h.check().expect("invariants");
}

/// The checks can fail: used entries the device had no right to write are reported.
#[test]
fn check_reports_used_entries_the_device_did_not_hold() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_GUEST_CSUM, 64));
    fx.rx.refill();
    let pair = fx.h.pair_mut();
    pair.rx.add_used(5, 100).unwrap();
    assert_eq!(
        fx.h.check(),
        Err(Violation::UsedIdNotHeld { queue: 0, id: 5 })
    );
    // A chain held, used longer than it is.
    let slot = fx.h.rx_prepare().unwrap();
    fx.h.rx_cancel(slot);
    let head = fx.h.pair().spare_rx().next().unwrap();
    let pair = fx.h.pair_mut();
    pair.rx.add_used(head, 5000).unwrap();
    assert!(matches!(
        fx.h.check(),
        Err(Violation::UsedLenTooLong {
            len: 5000,
            capacity: 2048,
            ..
        })
    ));
}

// ---- hostile guests (issue 9) ----------------------------------------------------------------

/// An avail entry naming a head past the queue size: counted as malformed, the RX queue is
/// broken (nothing can be answered for it), nothing panics, TX carries on.
#[test]
fn rx_head_out_of_range_is_malformed_and_breaks_rx_only() {
    let mut fx = fixture(config(
        f::VIRTIO_NET_F_MRG_RXBUF | f::VIRTIO_NET_F_GUEST_CSUM,
        64,
    ));
    fx.rx.raw().push_avail(1000);
    fx.rx.raw().publish();
    let before = fx.h.counters();
    assert_eq!(fx.h.rx_deliver(&frame(64, 1)), RxDelivery::NoBuffers);
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.rx_malformed, d.queues_broken), (1, 1), "{d:?}");
    assert!(fx.h.pair().rx.is_broken());
    assert!(!fx.h.pair().tx.is_broken());
    // A broken queue stays broken: buffers posted later are not touched.
    fx.rx.refill();
    assert_eq!(fx.h.rx_deliver(&frame(64, 2)), RxDelivery::NoBuffers);
    assert_eq!(fx.h.counters().delta(&before).queues_broken, 1);
    fx.h.check().expect("invariants");
    assert!(fx.tx.push(&VirtioNetHdr::default(), &[7; 100]).unwrap());
    fx.tx.flush();
    assert_eq!(fx.h.tx_send().map(|v| v.len()), Some(112));
}

#[test]
fn tx_head_out_of_range_is_malformed_and_breaks_tx_only() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_GUEST_CSUM, 64));
    fx.tx.raw().push_avail(64);
    fx.tx.raw().publish();
    let before = fx.h.counters();
    assert_eq!(fx.h.tx_send(), None);
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.tx_malformed, d.queues_broken), (1, 1), "{d:?}");
    assert!(fx.h.pair().tx.is_broken() && !fx.h.pair().rx.is_broken());
    fx.rx.refill();
    assert_eq!(fx.h.rx_deliver(&frame(64, 1)), RxDelivery::Done);
    fx.h.check().expect("invariants");
}

/// The same head made available twice while the device holds it (popped in one batch): a
/// protocol violation, counted; the RX queue is broken, the head is never used twice and the
/// spare list never holds a head twice.
#[test]
fn rx_duplicate_head_while_held_breaks_rx() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    let mut fx = fixture(config(f::VIRTIO_NET_F_MRG_RXBUF | gso, 64));
    let mem = fx.guest.memory();
    let raw = fx.rx.raw();
    let d = raw.free_desc_indices();
    for &i in &d[..3] {
        raw.write_desc(i, mem.alloc(2048, 64).unwrap(), 2048, WRITE, 0);
    }
    for &i in &[d[0], d[1], d[1], d[2]] {
        raw.push_avail(i);
    }
    raw.publish();
    let before = fx.h.counters();
    let _ = fx.h.rx_deliver(&frame(64, 1));
    let c = fx.h.counters().delta(&before);
    assert_eq!((c.rx_malformed, c.queues_broken), (1, 1), "{c:?}");
    assert!(fx.h.pair().rx.is_broken());
    let mut held: Vec<u16> = fx.h.pair().spare_rx().collect();
    held.sort_unstable();
    held.dedup();
    assert_eq!(
        held.len(),
        fx.h.pair().spare_rx().count(),
        "a head held twice"
    );
    fx.h.check().expect("invariants");
}

/// A guest that keeps re-posting one head while the device holds it cannot grow the spare
/// list: every round the device pops what is available, and the first duplicate ends it.
#[test]
fn rx_duplicates_never_grow_the_spare_list() {
    let gso = f::VIRTIO_NET_F_GUEST_CSUM | f::VIRTIO_NET_F_GUEST_TSO4;
    let mut fx = fixture(config(f::VIRTIO_NET_F_MRG_RXBUF | gso, 16));
    let mem = fx.guest.memory();
    let d = fx.rx.raw().free_desc_indices()[0];
    fx.rx
        .raw()
        .write_desc(d, mem.alloc(2048, 64).unwrap(), 2048, WRITE, 0);
    for _ in 0..20 {
        for _ in 0..8 {
            fx.rx.raw().push_avail(d);
        }
        fx.rx.raw().publish();
        // Two reads: the second pops everything available (MRG_RXBUF with GSO).
        let a = fx.h.rx_prepare();
        let b = fx.h.rx_prepare();
        for s in [b, a].into_iter().flatten() {
            fx.h.rx_cancel(s);
        }
        assert!(fx.h.pair().spare_rx().count() <= 1, "spare list grew");
        fx.h.check().expect("invariants");
    }
    assert_eq!(fx.h.counters().queues_broken, 1);
}

/// MRG_RXBUF chains of many tiny buffers: a read never gets more iovecs than readv takes
/// (UIO_MAXIOV), and the frame is still delivered whole.
#[test]
fn rx_read_of_tiny_buffers_stays_within_uio_maxiov() {
    let mut cfg = config(f::VIRTIO_NET_F_MRG_RXBUF | f::VIRTIO_NET_F_GUEST_CSUM, 2048);
    cfg.rx_buffer_size = 12;
    cfg.rx_descs_per_chain = 12;
    let mut fx = fixture(cfg);
    fx.rx.refill();
    let before = fx.h.counters();
    let fr = frame(1000, 9);
    assert_eq!(fx.h.rx_deliver(&fr), RxDelivery::Done);
    fx.h.check().expect("invariants");
    assert_eq!(fx.h.counters().delta(&before).rx_packets, 1);
    let p = recv(&mut fx.rx);
    assert_eq!(p.data, fr[VNET_HDR_LEN..]);
}

/// A guest that keeps posting malformed chains while the worker pops cannot keep it in one
/// pass: after twice the queue size of pops the pass yields (`Later`), so the engine gets back
/// to its event loop (and its stop) before it comes back for more.
#[test]
fn a_pass_pops_at_most_twice_the_queue_size() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_GUEST_CSUM, 8));
    let mem = fx.guest.memory();
    let d = fx.tx.raw().free_desc_indices();
    let buf = mem.alloc(64, 64).unwrap();
    // Write-only TX buffers: malformed, completed at once, reposted by the guest.
    for &i in &d {
        fx.tx.raw().write_desc(i, buf, 64, WRITE, 0);
    }
    let pair = fx.h.pair_mut();
    pair.begin_pass();
    let mut w = TxWrite::new();
    let mut rounds = Vec::new();
    for _ in 0..4 {
        for &i in &d {
            fx.tx.raw().push_avail(i);
        }
        fx.tx.raw().publish();
        rounds.push(pair.next_tx(&mut w));
    }
    // 2 descriptors per round (a queue of 8 reserves 2), budget 16: no yield here...
    assert_eq!(rounds, vec![TxNext::Empty; 4]);
    // ...but a guest posting a full ring per round exhausts it in the third.
    let mut fx = fixture(GuestConfig {
        raw_reserved_descs: 8,
        ..config(f::VIRTIO_NET_F_GUEST_CSUM, 32)
    });
    let mem = fx.guest.memory();
    let d = fx.tx.raw().free_desc_indices();
    assert_eq!(d.len(), 8);
    let buf = mem.alloc(64, 64).unwrap();
    for &i in &d {
        fx.tx.raw().write_desc(i, buf, 64, WRITE, 0);
    }
    let before = fx.h.counters();
    let pair = fx.h.pair_mut();
    pair.begin_pass();
    let mut rounds = Vec::new();
    for _ in 0..10 {
        for &i in &d {
            fx.tx.raw().push_avail(i);
        }
        fx.tx.raw().publish();
        rounds.push(pair.next_tx(&mut w));
        if pair.yielded() {
            break;
        }
    }
    // Budget 64 pop attempts, 9 per round (8 chains, then the empty ring): 7 rounds, and
    // the 8th stops after one chain.
    assert_eq!(rounds.len(), 8, "{rounds:?}");
    assert_eq!(rounds.last(), Some(&TxNext::Later));
    assert_eq!(fx.h.counters().delta(&before).tx_malformed, 57);
    // The next pass carries on with the 7 left.
    let pair = fx.h.pair_mut();
    pair.begin_pass();
    assert_eq!(pair.next_tx(&mut w), TxNext::Empty);
    assert_eq!(fx.h.counters().delta(&before).tx_malformed, 64);
    fx.h.check().expect("invariants");
}

#[test]
fn popping_quiets_kicks_and_running_dry_rearms_them() {
    use tapir_simguest::VIRTQ_USED_F_NO_NOTIFY as NO_NOTIFY;
    // Without EVENT_IDX: VRING_USED_F_NO_NOTIFY while chains are popped, cleared (the kick
    // armed) once the ring runs dry.
    let mut fx = fixture(config(f::VIRTIO_NET_F_CSUM, 64));
    for _ in 0..2 {
        assert!(fx.tx.push(&VirtioNetHdr::default(), &[1u8; 60]).unwrap());
    }
    fx.tx.flush();
    let before = fx.h.counters();
    let slot = fx.h.tx_next().expect("a TX chain");
    assert_eq!(
        fx.tx.raw().used_flags() & NO_NOTIFY,
        NO_NOTIFY,
        "kicks off while the device drains the ring"
    );
    fx.h.tx_complete(slot, Ok(72));
    assert!(fx.h.tx_send().is_some());
    assert_eq!(fx.h.tx_send(), None);
    assert_eq!(
        fx.tx.raw().used_flags() & NO_NOTIFY,
        0,
        "kick re-armed when the ring ran dry"
    );
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.tx_packets, d.tx_malformed), (2, 0));
    // With EVENT_IDX: avail_event follows the ring to where it ran dry.
    let mut fx = fixture(config(
        f::VIRTIO_NET_F_CSUM | f::VIRTIO_RING_F_EVENT_IDX,
        64,
    ));
    for _ in 0..3 {
        assert!(fx.tx.push(&VirtioNetHdr::default(), &[2u8; 60]).unwrap());
    }
    fx.tx.flush();
    let before = fx.h.counters();
    while fx.h.tx_send().is_some() {}
    assert_eq!(
        fx.tx.raw().avail_event(),
        3,
        "the guest kicks for its next chain"
    );
    assert_eq!(fx.h.counters().delta(&before).tx_packets, 3);
    fx.h.check().expect("invariants");
}

#[test]
fn tx_chain_longer_than_the_largest_frame_is_malformed() {
    // Fuzz finding 13: a guest-chosen TX length reached the TAP unchecked.
    let mut cfg = config(f::VIRTIO_NET_F_CSUM, 16);
    cfg.tx_buffer_size = 70_000;
    let mut fx = fixture(cfg);
    let too_long = vec![0x5a; crate::features::MAX_GSO_FRAME + 1];
    assert!(fx.tx.push(&VirtioNetHdr::default(), &too_long).unwrap());
    let largest = vec![0x5b; crate::features::MAX_GSO_FRAME];
    assert!(fx.tx.push(&VirtioNetHdr::default(), &largest).unwrap());
    fx.tx.flush();
    let before = fx.h.counters();
    let got = fx.h.tx_send().expect("the largest frame is sent");
    assert_eq!(got.len(), VNET_HDR_LEN + largest.len());
    assert_eq!(fx.h.tx_send(), None, "the over-long chain is not sent");
    let d = fx.h.counters().delta(&before);
    assert_eq!((d.tx_packets, d.tx_malformed), (1, 1), "{d:?}");
    fx.h.check().expect("invariants");
}

/// Without MRG_RXBUF, a frame moved into an older spare chain to keep ring order (the read
/// before it got a runt, so its chain went back) must still be one chain: when the older chain
/// cannot hold it alone, the frame is dropped and counted, as it would have been had the reads
/// completed in order (virtio 1.2 §5.1.6.3.1; vhost-net discards such a frame the same way),
/// never spread over two used entries or truncated. Fuzz crash 14 (rx_pair).
#[test]
fn rx_reorder_without_mrg_rxbuf_never_splits_a_frame() {
    let mut fx = fixture(config(f::VIRTIO_NET_F_GUEST_CSUM, 64));
    let mem = fx.guest.memory();
    let raw = fx.rx.raw();
    let d = raw.free_desc_indices();
    // The older chain is small (a driver ignoring the 1526-byte SHOULD), the younger is not.
    raw.write_desc(d[0], mem.alloc(256, 64).unwrap(), 256, WRITE, 0);
    raw.write_desc(d[1], mem.alloc(2048, 64).unwrap(), 2048, WRITE, 0);
    raw.push_avail(d[0]);
    raw.push_avail(d[1]);
    raw.publish();
    let a = fx.h.rx_prepare().expect("a read over the small chain");
    let b = fx.h.rx_prepare().expect("a read over the large chain");
    let before = fx.h.counters();
    // The first read gets a runt (dropped, its chain goes back), the second a 1000-byte frame.
    fx.h.rx_write(a, &[0u8; 5]);
    assert_eq!(fx.h.rx_complete(a), RxCompletion::Done);
    fx.h.rx_write(b, &frame(1000, 3));
    assert_eq!(fx.h.rx_complete(b), RxCompletion::Done);
    fx.h.check().expect("invariants");
    let c = fx.h.counters().delta(&before);
    assert_eq!((c.rx_packets, c.rx_dropped_oversize), (0, 2), "{c:?}");
    // Both chains are spare again, oldest first, and the next small frame lands in the oldest.
    assert_eq!(fx.h.pair().spare_rx().collect::<Vec<_>>(), vec![d[0], d[1]]);
    assert_eq!(fx.h.rx_deliver(&frame(100, 4)), RxDelivery::Done);
    fx.h.check().expect("invariants");
    // The guest posted these chains by hand: its driver reports their used entries as foreign.
    assert_eq!(
        fx.rx.poll().expect("no device bug").map(|p| p.buffers),
        None
    );
    assert_eq!(fx.rx.take_foreign_used(), vec![(u32::from(d[0]), 112)]);
    assert_eq!(fx.rx.stats().device_errors, 0);
}

/// What the first-service hook saw: the TX used index the guest could read when it ran.
static USED_AT_HOOK: std::sync::Mutex<Option<(GuestMemory, u64, Option<u16>)>> =
    std::sync::Mutex::new(None);

fn record_used_at_hook() {
    let mut seen = USED_AT_HOOK.lock().unwrap();
    if let Some((mem, used_ring, at)) = seen.as_mut() {
        *at = crate::virtqueue::used_index(mem, *used_ring);
    }
}

#[test]
fn the_first_service_hook_runs_once_the_guest_can_see_the_entry() {
    // A realtime worker returns to ordinary scheduling in this hook: demoted before the used
    // index is out, it could be preempted with the entry written and not shown.
    let mut fx = fixture(config(0, 64));
    let used_ring = fx.guest.tx_queue(0).used_ring;
    *USED_AT_HOOK.lock().unwrap() = Some((fx.h.pair().mem.clone(), used_ring, None));
    fx.h.pair_mut().on_first_service(record_used_at_hook);
    assert!(fx.tx.push(&VirtioNetHdr::default(), &[7u8; 60]).unwrap());
    fx.tx.flush();
    fx.h.tx_send().expect("a TX chain");
    let seen = USED_AT_HOOK
        .lock()
        .unwrap()
        .take()
        .and_then(|(_, _, at)| at);
    assert_eq!(
        seen,
        Some(1),
        "the hook ran before the used index showed the entry"
    );
}
