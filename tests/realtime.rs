//! `EngineConfig::realtime_priority` (issue 10): a worker is `SCHED_FIFO` from its start
//! through its first used entry (a handoff successor's resume), then an ordinary thread, so
//! that a worker kept busy by load cannot starve the traffic's own threads on a small machine.

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use tapir_datapath::EngineKind;
use tapir_simguest::VirtioNetHdr;
use tapir_testkit::frames::build_udp;
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{Rig, RigConfig, HOST_IP};

fn policy(tid: i32) -> i32 {
    // SAFETY: a query about a thread of this process; no memory is passed.
    unsafe { libc::sched_getscheduler(tid) }
}

fn realtime_until_first_service(engine: EngineKind) {
    run_in_new_netns(move || {
        let mut cfg = RigConfig::new(engine, 1);
        cfg.engine_config.realtime_priority = Some(1);
        let mut rig = Rig::start(&cfg).unwrap();
        let tid = rig.device().worker_stats()[0].tid();
        assert_eq!(policy(tid), libc::SCHED_FIFO, "{engine}: realtime at start");
        let host = UdpSocket::bind((HOST_IP, 9000)).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (_rx, mut tx) = rig.take(0);
        let flow = rig.guest_to_host(5000, 9000);
        let mut buf = vec![0u8; 512];
        let n = build_udp(&mut buf, &flow, 100, 1, 0).unwrap();
        assert!(tx.send(&VirtioNetHdr::default(), &buf[..n]).unwrap());
        let mut r = [0u8; 512];
        host.recv_from(&mut r)
            .expect("the datagram reaches the host");
        let deadline = Instant::now() + Duration::from_secs(5);
        while policy(tid) != libc::SCHED_OTHER {
            assert!(
                Instant::now() < deadline,
                "{engine}: still policy {} after serving",
                policy(tid)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        rig.shutdown().unwrap();
    })
    .unwrap();
}

#[test]
fn a_realtime_worker_is_ordinary_after_its_first_used_entry_uring() {
    realtime_until_first_service(EngineKind::Uring);
}

#[test]
fn a_realtime_worker_is_ordinary_after_its_first_used_entry_classic() {
    realtime_until_first_service(EngineKind::Classic);
}
