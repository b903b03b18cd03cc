//! A fixed-count, paced packet driver for instruction counts per packet (not a benchmark of
//! speed): a rig (real TAP in a private namespace, simulated guest, one queue pair) moves
//! `COUNT` 64-byte frames one way, in bursts of `BURST` that each complete before the next,
//! so that the engine sees the same batches on every run. Run it under callgrind with
//! collection limited to the engine's worker loop:
//!
//! ```text
//! cargo build --release -p tapir-bench --example per_packet
//! valgrind --tool=callgrind --toggle-collect='*Engine>::run' --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/per_packet uring tx 20000
//! callgrind_annotate /tmp/cg.out | head   # total Ir / packets = instructions per packet
//! ```
//!
//! Arguments: engine (`uring` or `classic`), direction (`tx`: guest to host, to a MAC nobody
//! owns so the host drops the frames early; `rx`: host UDP to the guest), packet count, and
//! optionally a busy-poll budget in microseconds (`EngineConfig::busy_poll`).
//!
//! The io_uring engine hangs under valgrind 3.19 whenever its worker blocks in
//! `io_uring_enter` (valgrind keeps its thread lock through that call). With a busy-poll
//! budget longer than the run the worker never blocks, and its count is the engine's work
//! without the polling: `Engine::run` minus `poll_busily` (inclusive), from
//! `callgrind_annotate --inclusive=yes`.

use std::net::{SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use tapir_datapath::{Counters, EngineConfig, EngineKind};
use tapir_simguest::VirtioNetHdr;
use tapir_testkit::frames::{self, FlowSpec};
use tapir_testkit::netns;
use tapir_testkit::{Rig, RigConfig, GUEST_IP, HOST_IP};

const BURST: usize = 32;
const FRAME: usize = 64;
const DEADLINE: Duration = Duration::from_secs(60);

fn tx(rig: &mut Rig, count: usize) {
    let (_rx, mut tx) = rig.take(0);
    let mut flow = rig.guest_to_host(4000, 4001);
    // Nobody owns this MAC: the host drops the frames as PACKET_OTHERHOST.
    flow.dst_mac = [0x02, 0, 0, 0, 0xde, 0xad];
    let frame = udp(&flow);
    let hdr = VirtioNetHdr::default();
    let start = Instant::now();
    let mut sent = 0;
    while sent < count {
        let n = BURST.min(count - sent);
        for _ in 0..n {
            assert!(tx.push(&hdr, &frame).expect("TX push"), "TX ring full");
        }
        tx.flush();
        while tx.in_flight() > 0 {
            tx.reclaim();
            if tx.in_flight() > 0 {
                tx.wait(Duration::from_millis(5)).expect("TX wait");
            }
            assert!(start.elapsed() < DEADLINE, "TX chains not completed");
        }
        sent += n;
    }
    wait_counted(rig, |c| c.tx_packets, count);
}

fn rx(rig: &mut Rig, count: usize) {
    let (mut rx, _tx) = rig.take(0);
    rx.refill();
    let sock = UdpSocket::bind(SocketAddrV4::new(HOST_IP, 5000)).expect("bind");
    let payload = [0x5au8; FRAME - 42];
    let to = SocketAddrV4::new(GUEST_IP, 5001);
    let start = Instant::now();
    let mut got = 0;
    while got < count {
        let n = BURST.min(count - got);
        for _ in 0..n {
            sock.send_to(&payload, to).expect("send_to");
        }
        let want = got + n;
        while got < want {
            let k = rx.poll_with(|_, _| {}).expect("RX poll");
            got += k;
            if k > 0 {
                rx.refill();
            } else {
                rx.wait(Duration::from_millis(5)).expect("RX wait");
            }
            assert!(
                start.elapsed() < DEADLINE,
                "RX frames lost: {got} of {want}"
            );
        }
    }
    wait_counted(rig, |c| c.rx_packets, count);
}

/// Waits until the device's counters (published after each batch) show `count` packets.
fn wait_counted(rig: &Rig, field: impl Fn(&Counters) -> u64, count: usize) {
    let start = Instant::now();
    loop {
        let n: u64 = rig.device().counters().iter().map(&field).sum();
        if n == count as u64 {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{n} packets counted, {count} moved"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn udp(flow: &FlowSpec) -> Vec<u8> {
    let mut buf = vec![0u8; FRAME.max(frames::MIN_UDP_FRAME)];
    let n = frames::build_udp(&mut buf, flow, FRAME, 0, 0).expect("build_udp");
    buf.truncate(n);
    buf
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let engine: EngineKind = args
        .get(1)
        .map_or("uring", String::as_str)
        .parse()
        .expect("engine");
    let dir = args.get(2).cloned().unwrap_or_else(|| "tx".into());
    let count: usize = args
        .get(3)
        .map_or(Ok(20_000), |s| s.parse())
        .expect("count");
    let busy_poll = args
        .get(4)
        .map(|s| s.parse::<u64>().expect("busy-poll budget in microseconds"))
        .map(Duration::from_micros);
    netns::run_in_new_netns_scoped(|| {
        let mut cfg = RigConfig::new(engine, 1);
        cfg.engine_config = EngineConfig {
            busy_poll,
            ..EngineConfig::default()
        };
        let mut rig = Rig::start(&cfg).expect("rig");
        match dir.as_str() {
            "tx" => tx(&mut rig, count),
            "rx" => rx(&mut rig, count),
            other => panic!("direction {other:?}: tx or rx"),
        }
        rig.shutdown().expect("shutdown");
    })
    .expect("network namespace");
    println!("{engine} {dir} {count} packets");
}
