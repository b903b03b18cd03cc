//! RX under pressure: 64 KiB TSO frames flooding a guest whose ring holds only a few of them
//! (MRG_RXBUF, 2048-byte buffers), on 2 queue pairs, with the guest, the generator and one
//! worker sharing a CPU. Frames must keep flowing (no lost wake-up while a frame waits for
//! buffers) and none may be dropped or truncated by the datapath.
//!
//! Both scenarios run over [`PRESSURE`], each cell in its own network namespace.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    for_each_cell, for_each_cell_of, rig_config, EngineKind, Matrix, Offloads, MRG_RINGS,
};
use tapir_testkit::frames::{build_tcp_tso, FlowSpec};
use tapir_testkit::{Rig, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};

/// The part of the matrix RX pressure applies to: MRG_RXBUF rings only (64 KiB frames into
/// 2048-byte buffers need MRG_RXBUF), EVENT_IDX on and off (a lost wake-up hides in either
/// re-arm path), TSO offloads (the 64 KiB frames are TSO frames).
const PRESSURE: Matrix = Matrix::LINUX.rings(&MRG_RINGS).offloads(&[Offloads::Tso]);

#[test]
fn tso_flood_into_a_small_ring_keeps_flowing() {
    // Two queue pairs: the guest, the generator and one worker share a CPU, the other worker
    // has its own.
    for_each_cell(PRESSURE.pairs(&[2]), |cell| {
        {
            let engine = cell.name();
            let mut cfg = rig_config(cell.engine, cell.guest());
            cfg.guest.rx_buffer_size = 2048;
            cfg.cpu_affinity = vec![Some(1), Some(0)];
            let mut rig = Rig::start(&cfg).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let mut guests = Vec::new();
            for i in 0..2 {
                let (mut rx, _tx) = rig.take(i);
                let stop = stop.clone();
                let engine = engine.clone();
                guests.push(std::thread::spawn(move || {
                    tapir_testkit::cpu::pin_current_thread(0).ok();
                    while !stop.load(Ordering::Relaxed) {
                        rx.refill();
                        let mut bad = 0;
                        let n = rx
                            .poll_with(|h, s| {
                                let len: usize = s.iter().map(|x| x.len()).sum();
                                if len != 65535 || h.gso_type & 0x7f != 1 {
                                    bad += 1;
                                }
                            })
                            .unwrap();
                        assert_eq!(
                            bad, 0,
                            "{engine}: a frame arrived cut or without its GSO header"
                        );
                        if n == 0 {
                            rx.wait(Duration::from_millis(5)).unwrap();
                        }
                    }
                    rx.stats()
                }));
            }
            let templates = (0..8u16)
                .map(|i| {
                    let spec = FlowSpec {
                        src_mac: rig.host_mac,
                        dst_mac: GUEST_MAC,
                        src_ip: HOST_IP,
                        dst_ip: GUEST_IP,
                        src_port: 10_000 + i,
                        dst_port: 9000,
                    };
                    let mut buf = vec![0u8; 65535];
                    let f = build_tcp_tso(&mut buf, &spec, 65535, 1448, 1, 0, 0).unwrap();
                    buf.truncate(f.len);
                    (f.vnet, buf)
                })
                .collect::<Vec<_>>();
            // The flood: the templates round-robin through a packet socket on the TAP, as
            // fast as the kernel takes them, on the CPU the guest and one worker share.
            let injector = common::PacketInjector::new(TAP_NAME).unwrap();
            let flooding = Arc::new(AtomicBool::new(true));
            let generator = {
                let flooding = flooding.clone();
                let engine = engine.clone();
                std::thread::spawn(move || {
                    tapir_testkit::cpu::pin_current_thread(0).ok();
                    for (vnet, frame) in templates.iter().cycle() {
                        if !flooding.load(Ordering::Relaxed) {
                            break;
                        }
                        if let Err(e) = injector.send(vnet, frame) {
                            // A full TAP queue pushes back; anything else is a broken rig.
                            let full =
                                matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN));
                            assert!(full, "{engine}: flooding the TAP: {e}");
                        }
                    }
                })
            };
            let mut last = [0u64; 2];
            for window in 0..8 {
                std::thread::sleep(Duration::from_millis(250));
                let c = rig.device().counters();
                for (p, c) in c.iter().enumerate() {
                    assert!(
                        c.rx_packets > last[p],
                        "{engine}: queue pair {p} stalled in window {window}: {c:?}"
                    );
                    last[p] = c.rx_packets;
                    assert_eq!(
                        c.rx_dropped_oversize + c.rx_dropped_no_buffers,
                        0,
                        "{engine}: {c:?}"
                    );
                }
            }
            flooding.store(false, Ordering::Relaxed);
            generator.join().unwrap();
            stop.store(true, Ordering::Relaxed);
            for g in guests {
                let st = g.join().unwrap();
                assert_eq!(st.device_errors, 0, "{engine}: {st:?}");
            }
            rig.shutdown().unwrap();
        }
    });
}

/// RX chains are used in the order the guest made them available, with traffic that mixes
/// 64 KiB TSO frames and small ones (so that reads sized for a large frame get a small one and
/// keep chains over). QEMU relies on it: when a vhost-user backend dies, it resumes the avail
/// ring at the used index, so a chain used before an earlier one was would be handed to the
/// restarted backend again while the guest has it back (seen with a real guest: its RX queue
/// then broke, issue 12's crash recovery). Found by the real-guest crash test: the uring
/// engine, with several reads posted, gave a read's spare chains back to the pool while a
/// later read used later chains.
fn rx_chains_in_ring_order(engine: EngineKind) {
    // One queue pair: ring order is a property of one RX queue.
    for_each_cell_of(engine, PRESSURE, |cell| {
        let engine = cell.name();
        let mut cfg = rig_config(cell.engine, cell.guest());
        cfg.guest.rx_buffer_size = 2048;
        let mut rig = Rig::start(&cfg).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (mut rx, _tx) = rig.take(0);
        let guest = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut packets = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    rx.refill();
                    let n = rx.poll_with(|_, _| {}).unwrap();
                    packets += n;
                    if n == 0 {
                        rx.wait(Duration::from_millis(5)).unwrap();
                    }
                }
                (packets, rx.stats())
            })
        };
        let templates = [65535usize, 200, 200, 1500, 65535, 120]
            .into_iter()
            .enumerate()
            .map(|(i, len)| {
                let spec = FlowSpec {
                    src_mac: rig.host_mac,
                    dst_mac: GUEST_MAC,
                    src_ip: HOST_IP,
                    dst_ip: GUEST_IP,
                    src_port: 10_000 + u16::try_from(i).unwrap(),
                    dst_port: 9000,
                };
                let mut buf = vec![0u8; 65535];
                let f = build_tcp_tso(&mut buf, &spec, len, 1448, 1, 0, 0).unwrap();
                buf.truncate(f.len);
                (f.vnet, buf)
            })
            .collect::<Vec<_>>();
        let injector = common::PacketInjector::new(TAP_NAME).unwrap();
        let flooding = Arc::new(AtomicBool::new(true));
        let generator = {
            let flooding = flooding.clone();
            let engine = engine.clone();
            std::thread::spawn(move || {
                for (vnet, frame) in templates.iter().cycle() {
                    if !flooding.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = injector.send(vnet, frame) {
                        let full = matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN));
                        assert!(full, "{engine}: flooding the TAP: {e}");
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_secs(2));
        flooding.store(false, Ordering::Relaxed);
        generator.join().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        stop.store(true, Ordering::Relaxed);
        let (packets, st) = guest.join().unwrap();
        let c = rig.device().counters()[0];
        rig.shutdown().unwrap();
        assert!(
            packets > 100,
            "{engine}: only {packets} frames arrived: {c:?}"
        );
        assert_eq!(st.device_errors, 0, "{engine}: {st:?}");
        assert_eq!(
            st.used_out_of_order, 0,
            "{engine}: {} of {} RX chains used out of the order the guest made them \
                 available ({packets} frames; {c:?})",
            st.used_out_of_order, st.completed
        );
    });
}

#[test]
fn rx_chains_are_used_in_the_order_they_were_made_available_classic() {
    rx_chains_in_ring_order(EngineKind::Classic);
}

/// The uring engine moves a frame into older chains when an earlier read kept chains over
/// (`rx_reordered`), and posts no read with such chains while later ones are out; what is
/// left: a frame that spills past its read while later reads are posted takes chains younger
/// than theirs (about 1 chain in 1500 in this flood). Run with `--ignored`; see
/// docs/ARCHITECTURE.md ("RX ring order").
#[test]
#[ignore = "uring: a spill past a read while later reads are posted still skips their chains"]
fn rx_chains_are_used_in_the_order_they_were_made_available_uring() {
    rx_chains_in_ring_order(EngineKind::Uring);
}
