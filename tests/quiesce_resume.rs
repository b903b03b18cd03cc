//! Quiesce and resume a running device (the rollback half of a handoff) under traffic:
//! nothing lost, nothing duplicated, ring positions continuous.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use tapir_datapath::EngineKind;
use tapir_simguest::VirtioNetHdr;
use tapir_testkit::frames::{build_udp, parse_udp, verify_payload, FlowSpec};
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{Rig, RigConfig, GUEST_IP, HOST_IP};

#[test]
fn quiesce_and_resume_loses_nothing() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig = Rig::start(&RigConfig::new(engine, 1)).unwrap();
            let host = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (mut rx, mut tx) = rig.take(0);
            rx.refill();
            let flow: FlowSpec = rig.guest_to_host(5000, 9000);
            let mut buf = vec![0u8; 2048];
            let mut device = rig.device.take().unwrap();
            let mut next_rx_seq = 0u64;
            for round in 0..10u64 {
                // Guest -> host.
                for i in 0..20u64 {
                    let seq = round * 20 + i;
                    let n = build_udp(&mut buf, &flow, 300, 1, seq).unwrap();
                    assert!(tx.send(&VirtioNetHdr::default(), &buf[..n]).unwrap());
                    let mut r = [0u8; 2048];
                    let (got, _) = host.recv_from(&mut r).expect("datagram to host");
                    assert_eq!(verify_payload(&r[..got]).unwrap(), (1, seq), "{engine}");
                    tx.reclaim();
                }
                // Host -> guest: payload carries a sequence number.
                for _ in 0..20 {
                    let mut payload = vec![0u8; 200];
                    tapir_testkit::frames::write_payload(&mut payload, 2, next_rx_seq);
                    host.send_to(&payload, (GUEST_IP, 7000)).unwrap();
                    let deadline = Instant::now() + Duration::from_secs(2);
                    loop {
                        rx.refill();
                        if let Some(p) = rx.poll().unwrap() {
                            let udp = parse_udp(&p.data).expect("udp");
                            assert_eq!(
                                verify_payload(udp.payload).unwrap(),
                                (2, next_rx_seq),
                                "{engine}"
                            );
                            break;
                        }
                        assert!(
                            Instant::now() < deadline,
                            "{engine}: datagram {next_rx_seq} lost"
                        );
                        rx.wait(Duration::from_millis(20)).unwrap();
                    }
                    next_rx_seq += 1;
                }
                // Quiesce: nothing in flight; then resume where it stopped.
                let q = device.quiesce().unwrap();
                let p = &q.pairs[0];
                let tx_ring = p.tx_positions();
                assert_eq!(
                    tx_ring.outstanding(),
                    0,
                    "{engine}: a TX chain in flight after quiesce"
                );
                let tx_used = tx_ring.next_used;
                assert_eq!(u64::from(tx_used), (round + 1) * 20, "{engine}");
                assert_eq!(
                    usize::from(p.rx_positions().outstanding()),
                    p.rx_in_flight().len(),
                    "{engine}"
                );
                device = q.resume().unwrap();
            }
            rig.device = Some(device);
            rig.shutdown().unwrap();
        })
        .unwrap();
    }
}

/// A stop that arrives while a worker writes a full TX ring is seen between chains: the
/// worker stops before the ring's last chain (in some of the trials at least: the stop must
/// land mid-batch), and what it leaves is consistent: nothing in flight, every chain before
/// the stop position on the host exactly once and in order, every chain after it delivered
/// after the resume.
#[test]
fn a_stop_during_a_full_tx_batch_is_seen_between_chains() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig = Rig::start(&RigConfig::new(engine, 1)).unwrap();
            let host = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            // Room for every datagram of a trial: a drop here would read as a loss.
            nix::sys::socket::setsockopt(
                &host,
                nix::sys::socket::sockopt::RcvBufForce,
                &(16 << 20),
            )
            .unwrap();
            host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (_rx, mut tx) = rig.take(0);
            let flow: FlowSpec = rig.guest_to_host(5000, 9000);
            let mut buf = vec![0u8; 2048];
            let mut r = [0u8; 2048];
            let mut device = rig.device.take().unwrap();
            let mut seq = 0u64;
            let mut next_host = 0u64;
            let mut mid_batch = 0;
            let trials = 20;
            for trial in 0..trials {
                let mut pushed = 0u64;
                loop {
                    let n = build_udp(&mut buf, &flow, 1000, 1, seq + pushed).unwrap();
                    if !tx.push(&VirtioNetHdr::default(), &buf[..n]).unwrap() {
                        break;
                    }
                    pushed += 1;
                }
                // Every earlier chain is used (the trial before waited for it).
                let used_before = u16::try_from(seq % 65_536).unwrap();
                tx.flush();
                // The batch has started once the first datagram is on the host: stop now.
                let (got, _) = host.recv_from(&mut r).expect("first datagram of the batch");
                assert_eq!(
                    verify_payload(&r[..got]).unwrap(),
                    (1, next_host),
                    "{engine}"
                );
                next_host += 1;
                let q = device.quiesce().unwrap();
                let p = &q.pairs[0];
                let tx_ring = p.tx_positions();
                assert_eq!(
                    tx_ring.outstanding(),
                    0,
                    "{engine}: a TX chain in flight after quiesce"
                );
                let tx_used = tx_ring.next_used;
                let done = u64::from(tx_used.wrapping_sub(used_before));
                assert!(done >= 1 && done <= pushed, "{engine}: {done} of {pushed}");
                if done < pushed {
                    mid_batch += 1;
                }
                // Exactly the chains before the stop position reached the host, in order.
                while next_host < seq + done {
                    let (got, _) = host.recv_from(&mut r).expect("datagram before the stop");
                    assert_eq!(
                        verify_payload(&r[..got]).unwrap(),
                        (1, next_host),
                        "{engine}"
                    );
                    next_host += 1;
                }
                device = q.resume().unwrap();
                // The rest follows after the resume, in order, nothing twice.
                while next_host < seq + pushed {
                    let (got, _) = host.recv_from(&mut r).expect("datagram after the resume");
                    assert_eq!(
                        verify_payload(&r[..got]).unwrap(),
                        (1, next_host),
                        "{engine}, trial {trial}"
                    );
                    next_host += 1;
                }
                seq += pushed;
                let deadline = Instant::now() + Duration::from_secs(2);
                while tx.in_flight() > 0 {
                    tx.reclaim();
                    assert!(Instant::now() < deadline, "{engine}: TX chains not used");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            host.set_read_timeout(Some(Duration::from_millis(50)))
                .unwrap();
            assert!(
                host.recv_from(&mut r).is_err(),
                "{engine}: a datagram twice"
            );
            assert!(
                mid_batch > 0,
                "{engine}: in none of {trials} trials was the stop seen before the batch's end"
            );
            eprintln!("{engine}: stop seen mid-batch in {mid_batch} of {trials} trials");
            rig.device = Some(device);
            rig.shutdown().unwrap();
        })
        .unwrap();
    }
}
