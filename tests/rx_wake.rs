//! The io_uring engine's RX wait (issue 11 item 3): on an empty TAP it leaves one read waiting
//! in the kernel (armed on io_uring's own poll) instead of a poll followed by reads, so a frame
//! that arrives at an idle worker is in guest buffers when the worker wakes. Counted in
//! `rx_woken_reads`; the classic engine has no such read (0). No timing is asserted: frames
//! arrive one at a time, each after the guest has the previous one, so each finds the TAP
//! empty and RX waiting.
//!
//! Every scenario runs over [`RX_WAKE`], each cell in its own network namespace.

mod common;

use std::time::Duration;

use common::*;
use tapir_datapath::EngineKind;

const PACKETS: u64 = 200;

/// EVENT_IDX on and off (it changes when the worker re-arms kicks and sleeps); MRG_RXBUF and
/// offloads as Linux acks them.
const RX_WAKE: Matrix = Matrix::LINUX.rings(&EVIDX_ON_OFF);

fn one_at_a_time(cell: Cell, busy_poll: Option<Duration>) -> Counters {
    let ctx = format!("{}, busy poll {busy_poll:?}", cell.name());
    let mut rig = start_busy_polling(cell, busy_poll, &ctx);
    let (mut rx, _tx) = rig.take(0);
    rx.refill();
    let sock = host_udp(HOST_IP, 9000);
    for seq in 0..PACKETS {
        sock.send_to(&payload(64, 1, seq), (GUEST_IP, 9100))
            .unwrap_or_else(|e| panic!("{ctx}: send_to: {e}"));
        let p = rx_recv(&mut rx, TIMEOUT, &ctx).unwrap_or_else(|| panic!("{ctx}: RX {seq} lost"));
        let u = frames::parse_udp(&p.data).expect("a UDP frame");
        assert_eq!(
            frames::verify_payload(u.payload).unwrap(),
            (1, seq),
            "{ctx}: RX frame {seq}"
        );
        rx.refill();
    }
    let pairs = rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    let c = pairs[0].pair.counters;
    assert_eq!(c.rx_packets, PACKETS, "{ctx}: {c:?}");
    c
}

fn check(cell: Cell, busy_poll: Option<Duration>) {
    let c = one_at_a_time(cell, busy_poll);
    let ctx = format!("{}, busy poll {busy_poll:?}: {c:?}", cell.name());
    match cell.engine {
        // Each frame but the first finds the TAP empty and a read waiting for it (the bound
        // leaves room for a guest that sees a frame before the worker's burst behind it has
        // run, which lets that burst take the next).
        EngineKind::Uring => assert!(c.rx_woken_reads >= PACKETS / 2, "{ctx}"),
        EngineKind::Classic => assert_eq!(c.rx_woken_reads, 0, "{ctx}"),
    }
    // Never more than the frames delivered.
    assert!(c.rx_woken_reads <= c.rx_packets, "{ctx}");
}

#[test]
fn a_frame_at_an_idle_uring_worker_comes_in_the_read_that_waited() {
    for_each_cell(RX_WAKE, |cell| check(cell, None));
}

#[test]
fn a_busy_polling_worker_runs_the_waiting_read_too() {
    for_each_cell(RX_WAKE, |cell| check(cell, Some(Duration::from_micros(50))));
}
