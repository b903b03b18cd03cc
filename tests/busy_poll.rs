//! Busy polling (`EngineConfig::busy_poll`, issue 11 item 3): a worker with a budget polls its
//! rings and the TAP before it sleeps (counted in `busy_poll_rounds`), moves every frame both
//! ways as without it, and stops as usual; without a budget it never polls. No timing is
//! asserted: only what the counters and the frames say.
//!
//! Every scenario runs over [`BUSY_POLL`], each cell in its own network namespace.

mod common;

use std::time::Duration;

use common::*;

const PACKETS: u64 = 200;

/// Guest -> host and host -> guest, a frame at a time (the worker goes idle between frames).
fn ping_pong(rig: &mut Rig, ctx: &str) {
    let (mut rx, mut tx) = rig.take(0);
    rx.refill();
    let sock = host_udp(HOST_IP, 9000);
    let flow = rig.guest_to_host(5000, 9000);
    let mut buf = vec![0u8; 2048];
    for seq in 0..PACKETS {
        tx_send(
            &mut tx,
            &VirtioNetHdr::default(),
            &udp_frame(&flow, 64, 0, seq),
            ctx,
        );
        let n = host_recv(&sock, &mut buf, TIMEOUT)
            .unwrap_or_else(|| panic!("{ctx}: TX frame {seq} lost"));
        assert_eq!(
            frames::verify_payload(&buf[..n]).unwrap(),
            (0, seq),
            "{ctx}"
        );
        tx_drain(&mut tx, ctx);
        sock.send_to(&payload(64, 1, seq), (GUEST_IP, 9100))
            .unwrap_or_else(|e| panic!("{ctx}: send_to: {e}"));
        let p = rx_recv(&mut rx, TIMEOUT, ctx).unwrap_or_else(|| panic!("{ctx}: RX {seq} lost"));
        let u = frames::parse_udp(&p.data).expect("a UDP frame");
        assert_eq!(
            frames::verify_payload(u.payload).unwrap(),
            (1, seq),
            "{ctx}: RX frame {seq}"
        );
    }
}

/// The part of the matrix busy polling applies to: EVENT_IDX on and off (the worker polls
/// where it would otherwise re-arm notifications and sleep); one queue pair and MRG_RXBUF and
/// offloads as Linux acks them, which change nothing in when a worker polls.
const BUSY_POLL: Matrix = Matrix::LINUX.rings(&EVIDX_ON_OFF);

fn run(cell: Cell, busy_poll: Option<Duration>) -> Counters {
    let ctx = format!("{}, busy poll {busy_poll:?}", cell.name());
    let mut rig = start_busy_polling(cell, busy_poll, &ctx);
    ping_pong(&mut rig, &ctx);
    let pairs = rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    let c = pairs[0].pair.counters;
    assert_eq!(
        (c.tx_packets, c.rx_packets),
        (PACKETS, PACKETS),
        "{ctx}: {c:?}"
    );
    c
}

#[test]
fn a_budget_makes_an_idle_worker_poll_before_it_sleeps() {
    for_each_cell(BUSY_POLL, |cell| {
        let ctx = cell.name();
        let c = run(cell, Some(Duration::from_micros(200)));
        // Every frame left the worker idle at least once: it polled each time.
        assert!(
            c.busy_poll_rounds >= PACKETS,
            "{ctx}: {} rounds for {PACKETS} idle spells",
            c.busy_poll_rounds
        );
        assert!(c.busy_poll_found <= c.busy_poll_rounds, "{ctx}: {c:?}");
    });
}

#[test]
fn without_a_budget_a_worker_never_polls() {
    let budgets = [("no budget", None), ("a zero budget", Some(Duration::ZERO))];
    for_each_cell_and(BUSY_POLL, &budgets, |cell, name, budget| {
        let c = run(cell, budget);
        assert_eq!(
            (c.busy_poll_rounds, c.busy_poll_found),
            (0, 0),
            "{}, {name}",
            cell.name()
        );
    });
}

#[test]
fn a_budget_far_longer_than_the_test_still_stops_and_sleeps() {
    // A budget far past the test: the worker polls through every gap between frames, and the
    // stop is still seen (the stop eventfd is polled with the rest).
    for_each_cell(BUSY_POLL, |cell| {
        let ctx = cell.name();
        let c = run(cell, Some(Duration::from_secs(3600)));
        assert!(c.busy_poll_rounds > 0, "{ctx}: {c:?}");
        assert!(c.busy_poll_found > 0, "{ctx}: {c:?}");
    });
}
