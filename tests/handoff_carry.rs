//! Nothing dropped at a handoff (issue 10, item 3): a frame that waits for guest buffers when
//! the source stops (read from the TAP, no guest buffers for all of it yet) is carried in the
//! snapshot and delivered by the successor, exactly once and in order; on both engines, over
//! the embedding API (quiesce, snapshot, blob, restore in this process).

use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use tapir_datapath::EngineKind;
use tapir_migrate::{restore, snapshot_of, SuccessorOptions};
use tapir_simguest::RxDriver;
use tapir_testkit::frames::{parse_udp, verify_payload, write_payload};
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{Rig, RigConfig, GUEST_IP, HOST_IP};

/// The next datagram the guest receives (refilling every buffer), as (flow, seq).
fn next_datagram(rx: &mut RxDriver, engine: EngineKind) -> (u32, u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        rx.refill();
        if let Some(p) = rx.poll().unwrap() {
            let udp = parse_udp(&p.data).expect("a UDP datagram");
            return verify_payload(udp.payload).expect("a verifiable payload");
        }
        assert!(Instant::now() < deadline, "{engine}: no datagram arrived");
        rx.wait(Duration::from_millis(20)).unwrap();
    }
}

/// Pair 0's counters once they show `rx_packets` frames (a worker publishes its counters
/// after the used entries the guest already sees; at most 5 s).
fn published(rig: &Rig, rx_packets: u64) -> tapir_datapath::Counters {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = rig.device().counters()[0];
        if c.rx_packets >= rx_packets || Instant::now() > deadline {
            return c;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Who runs the device after the stop.
#[derive(Clone, Copy, Debug)]
enum Next {
    /// A successor restored from the snapshot blob.
    Successor,
    /// The source itself (a handoff's rollback).
    Resume,
}

fn carried_frame_is_delivered_after_the_stop(engine: EngineKind, next: Next) {
    run_in_new_netns(move || {
        let mut cfg = RigConfig::new(engine, 1);
        // 512-byte buffers: a 1054-byte frame needs three, the guest posts one.
        cfg.guest.rx_buffer_size = 512;
        cfg.guest.queue_size = 16;
        let mut rig = Rig::start(&cfg).unwrap();
        let host = UdpSocket::bind((HOST_IP, 9000)).unwrap();
        let (mut rx, _tx) = rig.take(0);
        assert_eq!(rx.refill_up_to(1), 1);
        let mut payload = vec![0u8; 1000];
        write_payload(&mut payload, 2, 0);
        host.send_to(&payload, (GUEST_IP, 7000)).unwrap();
        let device = rig.device.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while device.counters()[0].rx_deferred == 0 {
            assert!(
                Instant::now() < deadline,
                "{engine}: the frame never waited for buffers"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // Hand off in this process: the frame waits in the source's spill area.
        let quiesced = device.quiesce().unwrap();
        let c = &quiesced.pairs[0].pair.counters;
        assert_eq!(
            (c.rx_deferred, c.rx_dropped_no_buffers, c.rx_packets),
            (1, 0, 0),
            "{engine}: the source dropped or delivered the waiting frame"
        );
        if let Next::Resume = next {
            rig.device = Some(quiesced.resume().unwrap());
            assert_eq!(next_datagram(&mut rx, engine), (2, 0), "{engine} {next:?}");
            let c = published(&rig, 1);
            assert_eq!((c.rx_packets, c.rx_dropped_no_buffers), (1, 0), "{engine}");
            rig.shutdown().unwrap();
            return;
        }
        let (snapshot, fds) = snapshot_of(&quiesced, 1);
        let blob = tapir_state::try_encode(&snapshot).unwrap();
        let fds: Vec<OwnedFd> = fds
            .iter()
            .map(|f| f.try_clone_to_owned().unwrap())
            .collect();
        drop(quiesced);
        let decoded = tapir_state::decode(&blob).unwrap();
        let carried = decoded.queue_pairs[0].rx_carried.frames();
        assert_eq!(carried.len(), 1, "{engine}: the snapshot carries the frame");
        assert_eq!(carried[0].bytes().len(), 12 + 14 + 20 + 8 + 1000);
        let device = restore(decoded, fds, &SuccessorOptions::new(engine)).unwrap();
        rig.device = Some(device);
        // The guest posts buffers: the carried frame arrives first, once, then the next one.
        assert_eq!(next_datagram(&mut rx, engine), (2, 0), "{engine}");
        write_payload(&mut payload, 2, 1);
        host.send_to(&payload, (GUEST_IP, 7000)).unwrap();
        assert_eq!(
            next_datagram(&mut rx, engine),
            (2, 1),
            "{engine}: the carried frame was delivered twice"
        );
        let c = published(&rig, 2);
        assert_eq!((c.rx_packets, c.rx_dropped_no_buffers), (2, 0), "{engine}");
        assert_eq!(rx.stats().used_out_of_order, 0, "{engine}");
        rig.shutdown().unwrap();
    })
    .unwrap();
}

#[test]
fn a_frame_waiting_for_buffers_at_a_handoff_is_delivered_by_the_successor_uring() {
    carried_frame_is_delivered_after_the_stop(EngineKind::Uring, Next::Successor);
}

#[test]
fn a_frame_waiting_for_buffers_at_a_handoff_is_delivered_by_the_successor_classic() {
    carried_frame_is_delivered_after_the_stop(EngineKind::Classic, Next::Successor);
}

#[test]
fn a_frame_waiting_for_buffers_at_a_rollback_is_delivered_on_resume() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        carried_frame_is_delivered_after_the_stop(engine, Next::Resume);
    }
}
