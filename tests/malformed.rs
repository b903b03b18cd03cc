//! Untrusted guest input: hand-built malformed descriptor chains on the TX and RX rings (through
//! the simulated guest's raw ring access and reserved descriptors) are completed with length 0
//! and counted, never crash a worker, and good traffic right after still flows; a corrupted
//! avail index breaks only its queue; rings outside guest memory are refused at start; and the
//! device never writes outside the guest's regions.
//!
//! Every scenario runs over the part of the feature matrix that applies to it (one queue pair:
//! the hand-built chains go on pair 0), each cell in its own network namespace.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tapir_simguest::{
    GuestMem, RawQueue, VIRTQ_DESC_F_INDIRECT as IND, VIRTQ_DESC_F_NEXT as NEXT,
    VIRTQ_DESC_F_WRITE as WRITE,
};

/// Builds a malformed chain on reserved descriptors `d` and returns its head.
type Build = Box<dyn Fn(&mut RawQueue, &GuestMem, &[u16]) -> u16 + Send + Sync>;

fn desc16(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// An indirect table in scratch memory holding `entries`.
fn table(mem: &GuestMem, entries: &[(u64, u32, u16, u16)]) -> u64 {
    let t = mem.alloc(16 * entries.len().max(1) as u64, 16).unwrap();
    for (i, &(a, l, f, n)) in entries.iter().enumerate() {
        mem.write(t + 16 * i as u64, &desc16(a, l, f, n)).unwrap();
    }
    t
}

/// A valid buffer (a correct vnet header and a small frame would not matter: the chains below
/// are refused before anything is read).
fn buf(mem: &GuestMem) -> u64 {
    mem.alloc(4096, 64).unwrap()
}

fn tx_cases() -> Vec<(&'static str, Build)> {
    vec![
        (
            "buffer in the hole between the regions",
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.hole().0 + 0x1000, 64, 0, 0);
                d[0]
            }),
        ),
        (
            "buffer straddling the end of the ring region",
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.hole().0 - 32, 64, 0, 0);
                d[0]
            }),
        ),
        (
            "buffer past the end of guest memory",
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.region_end(), 64, 0, 0);
                d[0]
            }),
        ),
        (
            "buffer straddling the end of guest memory",
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.region_end() - 32, 64, 0, 0);
                d[0]
            }),
        ),
        (
            "address wrapping around u64::MAX",
            Box::new(|q, _, d| {
                q.write_desc(d[0], u64::MAX - 15, 64, 0, 0);
                d[0]
            }),
        ),
        (
            "descriptor loop a -> b -> a",
            Box::new(|q, m, d| {
                let b = buf(m);
                q.write_desc(d[0], b, 12, NEXT, d[1]);
                q.write_desc(d[1], b + 64, 64, NEXT, d[0]);
                d[0]
            }),
        ),
        (
            "descriptor pointing at itself",
            Box::new(|q, m, d| {
                q.write_desc(d[0], buf(m), 64, NEXT, d[0]);
                d[0]
            }),
        ),
        (
            "lengths overflowing u32 (2 x 0xFFFF_FFF0)",
            Box::new(|q, m, d| {
                let b = buf(m);
                q.write_desc(d[0], b, 0xFFFF_FFF0, NEXT, d[1]);
                q.write_desc(d[1], b, 0xFFFF_FFF0, 0, 0);
                d[0]
            }),
        ),
        (
            "write-only TX buffer",
            Box::new(|q, m, d| {
                q.write_desc(d[0], buf(m), 64, WRITE, 0);
                d[0]
            }),
        ),
        (
            "second descriptor write-only",
            Box::new(|q, m, d| {
                let b = buf(m);
                q.write_desc(d[0], b, 12, NEXT, d[1]);
                q.write_desc(d[1], b + 64, 64, WRITE, 0);
                d[0]
            }),
        ),
        (
            "chain shorter than the 12-byte header",
            Box::new(|q, m, d| {
                q.write_desc(d[0], buf(m), 8, 0, 0);
                d[0]
            }),
        ),
        (
            "two descriptors of 4 bytes (8 < 12)",
            Box::new(|q, m, d| {
                let b = buf(m);
                q.write_desc(d[0], b, 4, NEXT, d[1]);
                q.write_desc(d[1], b + 64, 4, 0, 0);
                d[0]
            }),
        ),
        (
            "empty chain (length 0)",
            Box::new(|q, m, d| {
                q.write_desc(d[0], buf(m), 0, 0, 0);
                d[0]
            }),
        ),
        (
            "next index beyond the queue size",
            Box::new(|q, m, d| {
                q.write_desc(d[0], buf(m), 12, NEXT, 300);
                d[0]
            }),
        ),
        (
            "indirect table length not a multiple of 16",
            Box::new(|q, m, d| {
                let b = buf(m);
                let t = table(m, &[(b, 64, 0, 0), (b, 64, 0, 0)]);
                q.write_desc(d[0], t, 24, IND, 0);
                d[0]
            }),
        ),
        (
            "indirect table of length 0",
            Box::new(|q, m, d| {
                let t = table(m, &[(buf(m), 64, 0, 0)]);
                q.write_desc(d[0], t, 0, IND, 0);
                d[0]
            }),
        ),
        (
            "nested indirect table",
            Box::new(|q, m, d| {
                let inner = table(m, &[(buf(m), 64, 0, 0)]);
                let outer = table(m, &[(inner, 16, IND, 0)]);
                q.write_desc(d[0], outer, 16, IND, 0);
                d[0]
            }),
        ),
        (
            "INDIRECT together with NEXT",
            Box::new(|q, m, d| {
                let t = table(m, &[(buf(m), 64, 0, 0)]);
                q.write_desc(d[0], t, 16, IND | NEXT, d[1]);
                q.write_desc(d[1], buf(m), 64, 0, 0);
                d[0]
            }),
        ),
        (
            "indirect table in the hole",
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.hole().0 + 0x100, 32, IND, 0);
                d[0]
            }),
        ),
        (
            "indirect entry past the end of guest memory",
            Box::new(|q, m, d| {
                let t = table(m, &[(m.region_end() - 8, 64, 0, 0)]);
                q.write_desc(d[0], t, 16, IND, 0);
                d[0]
            }),
        ),
        (
            "loop inside an indirect table",
            Box::new(|q, m, d| {
                let b = buf(m);
                let t = table(m, &[(b, 12, NEXT, 1), (b + 64, 64, NEXT, 0)]);
                q.write_desc(d[0], t, 32, IND, 0);
                d[0]
            }),
        ),
        (
            "indirect next beyond its table",
            Box::new(|q, m, d| {
                let b = buf(m);
                let t = table(m, &[(b, 12, NEXT, 5), (b + 64, 64, 0, 0)]);
                q.write_desc(d[0], t, 32, IND, 0);
                d[0]
            }),
        ),
        (
            "indirect entry write-only",
            Box::new(|q, m, d| {
                let t = table(m, &[(buf(m), 64, WRITE, 0)]);
                q.write_desc(d[0], t, 16, IND, 0);
                d[0]
            }),
        ),
    ]
}

/// Checks the 64 KiB of the guest's memfd between the buffer region and the ring region (bytes
/// no region maps): a device writing past a region's end would land there.
fn assert_gap_untouched(rig: &Rig, ctx: &str) {
    let regions = rig.guest.regions();
    let buffers = regions
        .iter()
        .find(|r| r.file_offset == 0)
        .expect("buffer region at file offset 0");
    let ring = regions.iter().find(|r| r.file_offset != 0).unwrap();
    let gap_start = buffers.file_offset + buffers.size;
    let gap_len = usize::try_from(ring.file_offset - gap_start).unwrap();
    assert!(gap_len > 0, "{ctx}: the simulated guest has no file gap");
    let gap = pread(buffers.fd, gap_start, gap_len);
    if let Some(at) = gap.iter().position(|b| *b != 0) {
        panic!(
            "{ctx}: the device wrote outside guest memory: memfd byte {:#x}",
            gap_start + at as u64
        );
    }
}

/// Sends one good datagram from the guest and checks the host gets it.
fn good_tx(rig: &Rig, tx: &mut TxDriver, sock: &std::net::UdpSocket, seq: u64, ctx: &str) {
    let f = udp_frame(&rig.guest_to_host(5000, 9000), 300, 0, seq);
    tx_send(tx, &VirtioNetHdr::default(), &f, ctx);
    let mut b = vec![0u8; 2048];
    let n = host_recv(sock, &mut b, TIMEOUT)
        .unwrap_or_else(|| panic!("{ctx}: good datagram {seq} after a malformed chain lost"));
    assert_eq!(frames::verify_payload(&b[..n]).unwrap(), (0, seq), "{ctx}");
}

/// INDIRECT_DESC acked or not: a scenario's own dimension for the chains with indirect tables.
const INDIRECT: [(&str, u64); 2] = [
    ("indirect", feat::VIRTIO_RING_F_INDIRECT_DESC),
    ("no indirect", 0),
];

#[test]
fn malformed_tx_chains_are_completed_with_len_0_and_counted() {
    // TX chains: EVENT_IDX on and off (completing a refused chain notifies), MRG_RXBUF is RX's.
    let matrix = Matrix::LINUX.rings(&EVIDX_ON_OFF);
    for_each_cell_and(matrix, &INDIRECT, |cell, name, indirect| {
        let ctx = format!("{} {name}", cell.name());
        let mut g = cell.guest();
        g.features |= indirect;
        let mut rig = start(cell.engine, g, &ctx);
        let (mut rx, mut tx) = rig.take(0);
        rx.refill();
        let mem = rig.guest.memory();
        let free = tx.raw().free_desc_indices();
        let sock = host_udp(HOST_IP, 9000);
        good_tx(&rig, &mut tx, &sock, 0, &ctx);
        let cases = tx_cases();
        for (i, (case, build)) in cases.iter().enumerate() {
            let ctx = format!("{ctx}: {case}");
            let before = rig.device().counters()[0].tx_malformed;
            let head = build(tx.raw(), &mem, &free);
            tx.raw().push_avail(head);
            tx.flush();
            let deadline = Instant::now() + TIMEOUT;
            let used = loop {
                tx.reclaim();
                let f = tx.take_foreign_used();
                assert!(
                    f.len() <= 1,
                    "{ctx}: more foreign used entries than chains: {f:?}"
                );
                if let Some(&u) = f.first() {
                    break u;
                }
                assert!(
                    Instant::now() < deadline,
                    "{ctx}: malformed chain never completed (counters {:?})",
                    rig.device().counters()
                );
                std::thread::sleep(Duration::from_millis(1));
            };
            assert_eq!(used, (u32::from(head), 0), "{ctx}: used entry (id, len)");
            let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.tx_malformed > before);
            assert!(ok, "{ctx}: tx_malformed not counted: {c:?}");
            assert_eq!(c.tx_malformed, before + 1, "{ctx}: counted twice? {c:?}");
            assert_eq!(
                c.queues_broken, 0,
                "{ctx}: a malformed chain broke the queue: {c:?}"
            );
            good_tx(&rig, &mut tx, &sock, 1 + i as u64, &ctx);
        }
        tx_drain(&mut tx, &ctx);
        let c = rig.device().counters()[0];
        assert_eq!(c.tx_malformed, cases.len() as u64, "{ctx}: {c:?}");
        assert_eq!(
            tx.stats().device_errors,
            0,
            "{ctx}: the guest saw device bugs"
        );
        // RX still works too.
        let hs = host_udp(HOST_IP, 9100);
        hs.send_to(&payload(200, 1, 1), (GUEST_IP, 7000)).unwrap();
        rx_recv(&mut rx, TIMEOUT, &ctx).expect("RX after malformed TX chains");
        assert_gap_untouched(&rig, &ctx);
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

fn rx_cases() -> Vec<(&'static str, usize, Build)> {
    // (name, descriptors used, builder); each case gets its own reserved descriptors.
    vec![
        (
            "read-only RX buffer",
            1,
            Box::new(|q, m, d| {
                q.write_desc(d[0], buf(m), 2048, 0, 0);
                d[0]
            }),
        ),
        (
            "RX buffer in the hole",
            1,
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.hole().0 + 0x1000, 2048, WRITE, 0);
                d[0]
            }),
        ),
        (
            "RX buffer straddling the end of guest memory",
            1,
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.region_end() - 16, 2048, WRITE, 0);
                d[0]
            }),
        ),
        (
            "RX buffer straddling the end of the ring region",
            1,
            Box::new(|q, m, d| {
                q.write_desc(d[0], m.hole().0 - 16, 2048, WRITE, 0);
                d[0]
            }),
        ),
        (
            "RX chain whose second descriptor is read-only",
            2,
            Box::new(|q, m, d| {
                let b = buf(m);
                q.write_desc(d[0], b, 1024, WRITE | NEXT, d[1]);
                q.write_desc(d[1], b + 1024, 1024, 0, 0);
                d[0]
            }),
        ),
        (
            "RX nested indirect table",
            1,
            Box::new(|q, m, d| {
                let inner = table(m, &[(buf(m), 2048, WRITE, 0)]);
                let outer = table(m, &[(inner, 16, IND, 0)]);
                q.write_desc(d[0], outer, 16, IND, 0);
                d[0]
            }),
        ),
    ]
}

#[test]
fn malformed_rx_chains_are_completed_with_len_0_and_counted() {
    // RX chains: every ring layout (MRG_RXBUF changes how chains are taken, EVENT_IDX how
    // their completion notifies).
    for_each_cell(Matrix::LINUX.rings(&RINGS), |cell| {
        let ctx = cell.name();
        let mut rig = start(cell.engine, cell.guest(), &ctx);
        let (mut rx, _tx) = rig.take(0);
        let mem = rig.guest.memory();
        let free = rx.raw().free_desc_indices();
        let cases = rx_cases();
        // The bad chains go first in the ring, so the device meets them as soon as it wants
        // buffers; then the good ones.
        let mut heads = Vec::new();
        let mut next = 0;
        for (_, n, build) in &cases {
            let head = build(rx.raw(), &mem, &free[next..next + n]);
            next += n;
            rx.raw().push_avail(head);
            heads.push(head);
        }
        rx.raw().publish();
        rx.raw().kick();
        rx.refill();
        let hs = host_udp(HOST_IP, 9100);
        let mut foreign = Vec::new();
        let mut seq = 0u64;
        let deadline = Instant::now() + TIMEOUT;
        while foreign.len() < cases.len() {
            hs.send_to(&payload(500, 1, seq), (GUEST_IP, 7000)).unwrap();
            let p = rx_recv(&mut rx, TIMEOUT, &ctx)
                .unwrap_or_else(|| panic!("{ctx}: good datagram {seq} lost"));
            let u = frames::parse_udp(&p.data).expect("UDP");
            assert_eq!(
                frames::verify_payload(u.payload).unwrap(),
                (1, seq),
                "{ctx}"
            );
            seq += 1;
            foreign.extend(rx.take_foreign_used());
            assert!(
                Instant::now() < deadline,
                "{ctx}: malformed RX chains completed: {foreign:?} of {heads:?}"
            );
        }
        for ((case, _, _), head) in cases.iter().zip(&heads) {
            assert!(
                foreign.contains(&(u32::from(*head), 0)),
                "{ctx}: {case}: head {head} not completed with len 0: {foreign:?}"
            );
        }
        assert_eq!(foreign.len(), cases.len(), "{ctx}: {foreign:?}");
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.rx_malformed >= cases.len() as u64);
        assert!(ok, "{ctx}: rx_malformed: {c:?}");
        assert_eq!(c.rx_malformed, cases.len() as u64, "{ctx}: {c:?}");
        assert_eq!(c.queues_broken, 0, "{ctx}: {c:?}");

        // Once more mid-traffic, on a recycled descriptor: the device meets it after the
        // chains posted before it.
        let d = free[0];
        rx.raw().write_desc(d, buf(&mem), 2048, 0, 0);
        rx.raw().push_avail(d);
        rx.raw().publish();
        rx.raw().kick();
        let deadline = Instant::now() + TIMEOUT;
        let mut late = Vec::new();
        while late.is_empty() {
            hs.send_to(&payload(500, 1, seq), (GUEST_IP, 7000)).unwrap();
            let p = rx_recv(&mut rx, TIMEOUT, &ctx).expect("good datagram");
            let u = frames::parse_udp(&p.data).expect("UDP");
            assert_eq!(
                frames::verify_payload(u.payload).unwrap(),
                (1, seq),
                "{ctx}"
            );
            seq += 1;
            late.extend(rx.take_foreign_used());
            assert!(
                Instant::now() < deadline,
                "{ctx}: late malformed chain never completed"
            );
        }
        assert_eq!(late, vec![(u32::from(d), 0)], "{ctx}");
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.rx_malformed > cases.len() as u64);
        assert!(ok, "{ctx}: {c:?}");
        assert_eq!(
            rx.stats().device_errors,
            0,
            "{ctx}: the guest saw device bugs"
        );
        assert_gap_untouched(&rig, &ctx);
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

/// An avail index more than the queue size ahead of the device: the queue is broken (and only
/// that queue), the worker keeps serving the other queue of the pair, and stop is clean.
#[test]
fn avail_index_jump_breaks_only_that_queue() {
    let configs = [("tx broken", true), ("rx broken", false)];
    // EVENT_IDX on and off (how the device learns of the new index); MRG_RXBUF changes
    // nothing in an index check.
    let matrix = Matrix::LINUX.rings(&EVIDX_ON_OFF);
    for_each_cell_and(matrix, &configs, |cell, name, break_tx| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, cell.guest(), &ctx);
        let (mut rx, mut tx) = rig.take(0);
        let sock = host_udp(HOST_IP, 9000);
        let hs = host_udp(HOST_IP, 9100);
        if break_tx {
            rx.refill();
            good_tx(&rig, &mut tx, &sock, 0, &ctx);
            tx_drain(&mut tx, &ctx);
            let q = tx.raw();
            let jump = q.next_avail().wrapping_add(q.size() + 10);
            q.set_avail_idx(jump);
            q.kick();
        } else {
            let q = rx.raw();
            let jump = q.next_avail().wrapping_add(q.size() + 10);
            q.set_avail_idx(jump);
            q.kick();
        }
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.queues_broken >= 1);
        assert!(ok, "{ctx}: queue not marked broken: {c:?}");
        if break_tx {
            // RX still delivers.
            for seq in 0..20 {
                hs.send_to(&payload(300, 1, seq), (GUEST_IP, 7000)).unwrap();
                let p = rx_recv(&mut rx, TIMEOUT, &ctx)
                    .unwrap_or_else(|| panic!("{ctx}: RX dead after TX broke ({seq})"));
                let u = frames::parse_udp(&p.data).unwrap();
                assert_eq!(frames::verify_payload(u.payload).unwrap(), (1, seq));
            }
        } else {
            // TX still sends.
            for seq in 0..20 {
                good_tx(&rig, &mut tx, &sock, seq, &ctx);
            }
            tx_drain(&mut tx, &ctx);
        }
        let c = rig.device().counters()[0];
        assert!(c.queues_broken >= 1, "{ctx}: {c:?}");
        let pairs = rig
            .stop()
            .unwrap_or_else(|e| panic!("{ctx}: stop after a broken queue: {e}"));
        assert_eq!(pairs.len(), 1, "{ctx}");
        let qp = &pairs[0];
        let broken = if break_tx { &qp.pair.tx } else { &qp.pair.rx };
        let healthy = if break_tx { &qp.pair.rx } else { &qp.pair.tx };
        assert!(broken.is_broken(), "{ctx}: queue not broken after stop");
        assert!(!healthy.is_broken(), "{ctx}: the other queue broke too");
    });
}

/// An avail ring entry naming a head beyond the queue size: refused without a crash; the rest
/// of the device keeps working and stops cleanly.
#[test]
fn head_index_out_of_range_is_survived() {
    // A TX head: EVENT_IDX on and off, MRG_RXBUF is RX's.
    for_each_cell(Matrix::LINUX.rings(&EVIDX_ON_OFF), |cell| {
        let ctx = cell.name();
        let mut rig = start(cell.engine, cell.guest(), &ctx);
        let (mut rx, mut tx) = rig.take(0);
        rx.refill();
        let sock = host_udp(HOST_IP, 9000);
        good_tx(&rig, &mut tx, &sock, 0, &ctx);
        tx.raw().push_avail(1000);
        tx.flush();
        // The one outcome: the avail entry is refused as a malformed chain and breaks its
        // queue, once (virtqueue: a head past the queue size breaks the queue).
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.queues_broken >= 1);
        assert!(
            ok,
            "{ctx}: an out-of-range TX head did not break the queue: {c:?}"
        );
        assert_eq!(
            (c.tx_malformed, c.queues_broken),
            (1, 1),
            "{ctx}: an out-of-range TX head is one malformed chain on one broken queue: {c:?}"
        );
        // The RX queue of the same pair goes on.
        let hs = host_udp(HOST_IP, 9100);
        hs.send_to(&payload(300, 1, 5), (GUEST_IP, 7000)).unwrap();
        rx_recv(&mut rx, TIMEOUT, &ctx).expect("RX after an out-of-range TX head");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}

/// Rings that are not inside guest memory are refused when the device starts.
#[test]
fn rings_outside_guest_memory_are_refused_at_start() {
    use tapir_datapath::{Device, DeviceConfig, DeviceError, QueuePairSpec};
    use tapir_simguest::SimGuest;
    use tapir_testkit::{guest_memory, host_tap, queue_config};

    let cases: [(&str, u8); 3] = [
        ("descriptor table in the hole", 0),
        ("avail ring past the end of memory", 1),
        ("used ring straddling the end of the ring region", 2),
    ];
    // One cell per engine: the rings are refused at start, before any feature is used.
    for_each_cell_and(Matrix::LINUX, &cases, |cell, name, which| {
        let engine = cell.engine;
        let ctx = format!("{} {name}", cell.name());
        let tap = host_tap(1, 1500).unwrap();
        let g = SimGuest::new(cell.guest()).unwrap();
        let mem = g.memory();
        let (hole, _) = mem.hole();
        let q = |info: tapir_simguest::VirtqueueInfo| queue_config(&info).unwrap();
        let mut tx = q(g.tx_queue(0));
        let mut raw = tx.ring.raw();
        match which {
            0 => raw.desc = hole + 0x1000,
            1 => raw.avail = mem.region_end() + 0x1000,
            _ => raw.used = hole - 0x100,
        }
        tx.ring = tapir_state::RingAddresses::try_from(raw).unwrap();
        let spec = QueuePairSpec {
            rx: q(g.rx_queue(0)),
            tx,
            tap: tap.into_queues().pop().unwrap(),
            rx_in_flight: Vec::new(),
            rx_carried: Vec::new(),
        };
        let r = Device::start(
            DeviceConfig::new(g.features(), engine),
            guest_memory(&g).unwrap(),
            vec![spec],
        );
        match r {
            Err(DeviceError::Queue(e)) => println!("{ctx}: refused: {e}"),
            Err(e) => panic!("{ctx}: refused with an unexpected error: {e}"),
            Ok(d) => {
                let _ = d.stop();
                panic!("{ctx}: a device with rings outside guest memory started");
            }
        }
    });
}
