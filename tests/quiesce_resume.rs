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
                let (tx_avail, tx_used) = p.tx_positions();
                assert_eq!(
                    tx_avail, tx_used,
                    "{engine}: a TX chain in flight after quiesce"
                );
                assert_eq!(u64::from(tx_used), (round + 1) * 20, "{engine}");
                let (rx_avail, rx_used) = p.rx_positions();
                assert_eq!(
                    usize::from(rx_avail.wrapping_sub(rx_used)),
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
