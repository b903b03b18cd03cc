use std::net::UdpSocket;
use std::time::Duration;

use tapir_bench::frames::{build_udp, verify_payload};
use tapir_bench::netns::run_in_new_netns;
use tapir_bench::rig::{Rig, RigConfig, HOST_IP};
use tapir_datapath::EngineKind;
use tapir_simguest::VirtioNetHdr;

#[test]
fn smoke_udp_guest_to_host() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig = Rig::start(&RigConfig::new(engine, 1)).unwrap();
            let sock = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (_rx, mut tx) = rig.take(0);
            let flow = rig.guest_to_host(5000, 9000);
            let mut buf = vec![0u8; 2048];
            for seq in 0..100u64 {
                let n = build_udp(&mut buf, &flow, 200, 1, seq).unwrap();
                assert!(tx.send(&VirtioNetHdr::default(), &buf[..n]).unwrap());
                let mut rbuf = [0u8; 2048];
                let (got, _) = sock.recv_from(&mut rbuf).expect("datagram");
                let (f, s) = verify_payload(&rbuf[..got]).unwrap();
                assert_eq!((f, s), (1, seq));
                tx.reclaim();
            }
            let c = rig.device().counters()[0];
            println!("{engine}: {c:?}");
            rig.stop().unwrap();
        })
        .unwrap();
    }
}
