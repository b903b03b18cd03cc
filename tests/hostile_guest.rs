//! A hostile guest (issue 9): what it writes into its rings, and the eventfds it is given, can
//! break its own queues or queue pair, never a worker's thread, another pair or the process.
//! Every case asserts the precise outcome (counter deltas, the queue or pair broken), then
//! that the device still passes frames on the other queue or pair, and that stop returns.
//!
//! Every scenario runs over the part of the feature matrix that applies to it, each cell in its
//! own network namespace. The guest is played through the simulated guest's raw-ring API (as
//! in `malformed.rs`).

mod common;

use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use tapir_datapath::{Device, DeviceConfig, DeviceError, GuestMemory, QueuePairSpec, QuiescedPair};
use tapir_simguest::{SimGuest, VIRTQ_DESC_F_WRITE as WRITE};
use tapir_testkit::{guest_memory, host_tap, queue_config};

/// Sends one datagram from the guest's TX queue and checks the host gets it.
fn good_tx(flow: &FlowSpec, tx: &mut TxDriver, sock: &UdpSocket, seq: u64, ctx: &str) {
    let f = udp_frame(flow, 300, 0, seq);
    tx_send(tx, &VirtioNetHdr::default(), &f, ctx);
    let mut b = vec![0u8; 2048];
    let n = host_recv(sock, &mut b, TIMEOUT)
        .unwrap_or_else(|| panic!("{ctx}: guest datagram {seq} never reached the host"));
    assert_eq!(frames::verify_payload(&b[..n]).unwrap(), (0, seq), "{ctx}");
}

/// Sends one datagram from the host to the guest's port `port` and checks `rx` gets it.
fn good_rx(hs: &UdpSocket, rx: &mut RxDriver, port: u16, seq: u64, ctx: &str) {
    hs.send_to(&payload(300, 1, seq), (GUEST_IP, port)).unwrap();
    let p = rx_recv(rx, TIMEOUT, ctx)
        .unwrap_or_else(|| panic!("{ctx}: host datagram {seq} never reached the guest"));
    let u = frames::parse_udp(&p.data).expect("UDP");
    assert_eq!(
        frames::verify_payload(u.payload).unwrap(),
        (1, seq),
        "{ctx}"
    );
}

/// Stops the device on another thread; panics if that takes longer than `limit` (a worker
/// that blocks or spins never stops).
fn stop_within(device: Device, limit: Duration, ctx: &str) -> Vec<QuiescedPair> {
    let (done_tx, done_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(device.stop());
    });
    match done_rx.recv_timeout(limit) {
        Ok(r) => r.unwrap_or_else(|e| panic!("{ctx}: stop: {e}")),
        Err(_) => panic!("{ctx}: Device::stop did not return within {limit:?}"),
    }
}

// ---- 1. an RX avail entry past the queue size ------------------------------------------------

#[test]
fn rx_head_out_of_range_is_counted_and_breaks_only_rx() {
    // An RX head: every ring layout (MRG_RXBUF changes how the device takes RX chains).
    for_each_cell(Matrix::LINUX.rings(&RINGS), |cell| {
        let ctx = cell.name();
        let mut rig = start(cell.engine, cell.guest(), &ctx);
        let (mut rx, mut tx) = rig.take(0);
        let flow = rig.guest_to_host(5000, 9000);
        let sock = host_udp(HOST_IP, 9000);
        let before = rig.device().counters()[0];
        let size = rx.raw().size();
        rx.raw().push_avail(size + 1000);
        rx.raw().publish();
        rx.raw().kick();
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.queues_broken > before.queues_broken);
        assert!(ok, "{ctx}: RX queue not marked broken: {c:?}");
        let d = c.delta(&before);
        assert_eq!((d.rx_malformed, d.queues_broken), (1, 1), "{ctx}: {d:?}");
        for seq in 0..10 {
            good_tx(&flow, &mut tx, &sock, seq, &ctx);
        }
        tx_drain(&mut tx, &ctx);
        let pairs = rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
        assert!(pairs[0].pair.rx.is_broken(), "{ctx}");
        assert!(!pairs[0].pair.tx.is_broken(), "{ctx}");
        assert!(!pairs[0].pair.is_broken(), "{ctx}: the pair itself is fine");
    });
}

// ---- 2. an RX head made available again while the device holds it -----------------------------

#[test]
fn rx_duplicate_head_is_a_violation_that_breaks_only_rx() {
    // RX heads: every ring layout (MRG_RXBUF changes how many chains the device holds).
    for_each_cell(Matrix::LINUX.rings(&RINGS), |cell| {
        let ctx = cell.name();
        let mut rig = start(cell.engine, cell.guest(), &ctx);
        let (mut rx, mut tx) = rig.take(0);
        let mem = rig.guest.memory();
        let flow = rig.guest_to_host(5000, 9000);
        let sock = host_udp(HOST_IP, 9000);
        let before = rig.device().counters()[0];
        // Chains d0, d1, d1, d2: the device pops them in one batch, so it holds d1 when it
        // meets it again. Then the guest keeps advancing with more duplicates.
        let raw = rx.raw();
        let d = raw.free_desc_indices();
        for &i in &d[..3] {
            raw.write_desc(i, mem.alloc(2048, 64).unwrap(), 2048, WRITE, 0);
        }
        for &i in &[d[0], d[1], d[1], d[2]] {
            raw.push_avail(i);
        }
        raw.publish();
        raw.kick();
        for _ in 0..16 {
            rx.raw().push_avail(d[1]);
        }
        rx.raw().publish();
        rx.raw().kick();
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.queues_broken > before.queues_broken);
        assert!(ok, "{ctx}: duplicate head not refused: {c:?}");
        // Let the worker run on a little: nothing more may be counted.
        std::thread::sleep(Duration::from_millis(50));
        let d = rig.device().counters()[0].delta(&before);
        assert_eq!((d.rx_malformed, d.queues_broken), (1, 1), "{ctx}: {d:?}");
        for seq in 0..10 {
            good_tx(&flow, &mut tx, &sock, seq, &ctx);
        }
        tx_drain(&mut tx, &ctx);
        let device = rig.device.take().unwrap();
        let pairs = stop_within(device, Duration::from_secs(5), &ctx);
        let qp = &pairs[0];
        assert!(qp.pair.rx.is_broken() && !qp.pair.tx.is_broken(), "{ctx}");
        let held = qp.rx_in_flight();
        let mut unique = held.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            held.len(),
            "{ctx}: a head held twice: {held:?}"
        );
        assert!(held.len() <= usize::from(rx.raw().size()), "{ctx}");
    });
}

// ---- 3. a worker that fails breaks its pair only --------------------------------------------

#[test]
fn failed_worker_breaks_only_its_pair() {
    use tapir_datapath::WorkerFault;
    let faults = [("panic", WorkerFault::Panic), ("error", WorkerFault::Error)];
    // Two queue pairs (one fails, one goes on); one ring layout: the fault is injected into
    // the worker, not written into a ring.
    for_each_cell_and(Matrix::LINUX.pairs(&[2]), &faults, |cell, name, fault| {
        let ctx = format!("{} {name}", cell.name());
        let mut rig = start(cell.engine, cell.guest(), &ctx);
        let (mut rx0, _tx0) = rig.take(0);
        let (mut rx1, mut tx1) = rig.take(1);
        rx0.refill();
        rx1.refill();
        let sock = host_udp(HOST_IP, 9000);
        let flow = rig.guest_to_host(6001, 9000);
        good_tx(&flow, &mut tx1, &sock, 0, &ctx);
        rig.device().inject_fault(0, fault);
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.pairs_broken >= 1);
        assert!(ok, "{ctx}: pair 0 not marked broken: {c:?}");
        assert_eq!(c.pairs_broken, 1, "{ctx}");
        assert_eq!(rig.device().counters()[1].pairs_broken, 0, "{ctx}");
        // Pair 1 still passes frames both ways (the host's replies on the flow pair 1 sent
        // from are steered to TAP queue 1).
        for seq in 1..20 {
            good_tx(&flow, &mut tx1, &sock, seq, &ctx);
            sock.send_to(&payload(300, 1, seq), (GUEST_IP, 6001))
                .unwrap();
            let p = rx_recv(&mut rx1, TIMEOUT, &ctx)
                .unwrap_or_else(|| panic!("{ctx}: pair 1 RX lost {seq}"));
            let u = frames::parse_udp(&p.data).expect("UDP");
            assert_eq!(
                frames::verify_payload(u.payload).unwrap(),
                (1, seq),
                "{ctx}"
            );
        }
        tx_drain(&mut tx1, &ctx);
        let device = rig.device.take().unwrap();
        let pairs = stop_within(device, Duration::from_secs(5), &ctx);
        assert_eq!(pairs.len(), 2, "{ctx}: stop returns every pair");
        assert!(pairs[0].pair.is_broken(), "{ctx}");
        assert!(!pairs[1].pair.is_broken(), "{ctx}");
    });
}

// ---- 4 and 5. kick and call fds ---------------------------------------------------------------

/// The TAP, a simulated guest and the pair-0 spec, for tests that hand the device fds of
/// their own.
fn parts(g: GuestConfig) -> (SimGuest, GuestMemory, QueuePairSpec) {
    let tap = host_tap(1, 1500).unwrap();
    let guest = SimGuest::new(g).unwrap();
    let mem = guest_memory(&guest).unwrap();
    let spec = QueuePairSpec {
        rx: queue_config(&guest.rx_queue(0)).unwrap(),
        tx: queue_config(&guest.tx_queue(0)).unwrap(),
        tap: tap.into_queues().pop().unwrap(),
        rx_in_flight: Vec::new(),
        rx_carried: Vec::new(),
    };
    (guest, mem, spec)
}

/// A blocking eventfd whose counter is at its maximum: a blocking write of 1 waits forever.
fn full_eventfd() -> OwnedFd {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let e = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC).unwrap();
    e.write(0xffff_ffff_ffff_fffe).unwrap();
    OwnedFd::from(e)
}

#[test]
fn call_fd_at_its_maximum_never_blocks_a_worker() {
    // EVENT_IDX rings only: the guest's initial used_event 0 makes the first completion on
    // each queue due an interrupt however the guest polls, so both call fds are written.
    for_each_cell(Matrix::LINUX.rings(&EVIDX_RINGS), |cell| {
        let engine = cell.engine;
        let ctx = cell.name();
        let (mut guest, mem, mut spec) = parts(cell.guest());
        let rx_call = full_eventfd();
        let tx_call = full_eventfd();
        spec.rx.call = rx_call.try_clone().unwrap();
        spec.tx.call = tx_call.try_clone().unwrap();
        let device = Device::start(DeviceConfig::new(guest.features(), engine), mem, vec![spec])
            .unwrap_or_else(|e| panic!("{ctx}: start: {e}"));
        // On failure, unblock a stuck worker so the namespace can be torn down.
        let unblock = |fd: &OwnedFd| {
            let mut b = [0u8; 8];
            let _ = nix::unistd::read(fd.as_fd(), &mut b);
        };
        let (mut rx, mut tx) = guest.take_pair(0);
        rx.refill();
        let host_mac = netns::iface_mac(TAP_NAME).unwrap();
        let flow = FlowSpec {
            src_mac: GUEST_MAC,
            dst_mac: host_mac,
            src_ip: GUEST_IP,
            dst_ip: HOST_IP,
            src_port: 5000,
            dst_port: 9000,
        };
        let sock = host_udp(HOST_IP, 9000);
        let hs = host_udp(HOST_IP, 9100);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for seq in 0..30 {
                good_tx(&flow, &mut tx, &sock, seq, &ctx);
                good_rx(&hs, &mut rx, 7000, seq, &ctx);
            }
            tx_drain(&mut tx, &ctx);
        }));
        if let Err(p) = result {
            unblock(&rx_call);
            unblock(&tx_call);
            let _ = device.stop();
            std::panic::resume_unwind(p);
        }
        let c = device.counters()[0];
        assert!(
            c.rx_interrupts >= 1,
            "{ctx}: the first RX completion passed used_event 0, yet no RX interrupt: {c:?}"
        );
        assert!(
            c.tx_interrupts >= 1,
            "{ctx}: the first TX completion passed used_event 0, yet no TX interrupt: {c:?}"
        );
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = done_tx.send(device.stop().map(|p| p.len()));
        });
        let stopped = done_rx.recv_timeout(Duration::from_secs(5));
        if stopped.is_err() {
            unblock(&rx_call);
            unblock(&tx_call);
            let _ = done_rx.recv_timeout(Duration::from_secs(5));
            panic!("{ctx}: stop did not return with a full call eventfd");
        }
        assert_eq!(stopped.unwrap().unwrap(), 1, "{ctx}");
        // The counter is still at its maximum: tapir never blocked on it.
        let mut b = [0u8; 8];
        nix::unistd::read(rx_call.as_fd(), &mut b).unwrap();
        assert_eq!(u64::from_ne_bytes(b), 0xffff_ffff_ffff_fffe, "{ctx}");
    });
}

#[test]
fn kick_and_call_fds_that_are_not_eventfds_are_refused_at_start() {
    let cases: [(&str, u8); 4] = [
        ("RX kick a pipe at EOF", 0),
        ("TX kick a pipe at EOF", 1),
        ("RX call a pipe", 2),
        ("TX call a memfd", 3),
    ];
    // One cell per engine: the fds are refused at start, before any feature is used.
    for_each_cell_and(Matrix::LINUX, &cases, |cell, name, which| {
        let engine = cell.engine;
        let ctx = format!("{} {name}", cell.name());
        let (guest, mem, mut spec) = parts(cell.guest());
        let (r, w) = nix::unistd::pipe().unwrap();
        match which {
            0 => {
                drop(w);
                spec.rx.kick = r;
            }
            1 => {
                drop(w);
                spec.tx.kick = r;
            }
            2 => spec.rx.call = w,
            _ => {
                let fd = nix::sys::memfd::memfd_create(
                    c"not-an-eventfd",
                    nix::sys::memfd::MFdFlags::MFD_CLOEXEC,
                )
                .unwrap();
                spec.tx.call = fd;
            }
        }
        match Device::start(DeviceConfig::new(guest.features(), engine), mem, vec![spec]) {
            Err(DeviceError::Fd(e)) => println!("{ctx}: refused: {e}"),
            Err(e) => panic!("{ctx}: refused with an unexpected error: {e}"),
            Ok(d) => {
                let _ = d.stop();
                panic!("{ctx}: started with a non-eventfd");
            }
        }
    });
}

/// Past `Device::start` (an embedder driving an engine itself), a kick fd at EOF marks that
/// queue broken in the worker instead of making it spin; the other queue keeps working.
#[test]
fn kick_fd_at_eof_breaks_its_queue_instead_of_spinning() {
    use std::sync::Arc;
    use tapir_datapath::new_engine;
    use tapir_datapath::QueuePairStats;
    use tapir_datapath::Virtqueue;
    use tapir_datapath::{PairSettings, QueuePair};
    // EVENT_IDX on and off: how the engine re-arms TX notifications around the dead kick fd;
    // MRG_RXBUF changes nothing on TX.
    for_each_cell(Matrix::LINUX.rings(&EVIDX_ON_OFF), |cell| {
        let engine = cell.engine;
        let ctx = cell.name();
        let (mut guest, mem, mut spec) = parts(cell.guest());
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(w);
        spec.tx.kick = r;
        nix::fcntl::fcntl(
            spec.tx.kick.as_fd(),
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .unwrap();
        let features = guest.features();
        let event_idx = cell.ring.event_idx();
        let rx = Virtqueue::new(0, spec.rx, event_idx, &mem).unwrap();
        let tx = Virtqueue::new(1, spec.tx, event_idx, &mem).unwrap();
        let stats = Arc::new(QueuePairStats::default());
        let mut pair = QueuePair::new(
            0,
            mem,
            rx,
            tx,
            PairSettings {
                features,
                mtu: 1500,
            },
            stats.clone(),
        );
        let tap = spec.tap;
        let stop = nix::sys::eventfd::EventFd::from_flags(
            nix::sys::eventfd::EfdFlags::EFD_NONBLOCK | nix::sys::eventfd::EfdFlags::EFD_CLOEXEC,
        )
        .unwrap();
        let stop_fd: OwnedFd = stop.as_fd().try_clone_to_owned().unwrap();
        let worker = std::thread::spawn(move || {
            let mut engine = new_engine(engine, Default::default());
            let r = engine.run(&mut pair, &tap, &stop_fd, &mut |_| true);
            (pair, r.map(|_| ()))
        });
        let (mut rx, _tx) = guest.take_pair(0);
        rx.refill();
        let hs = host_udp(HOST_IP, 9100);
        let deadline = Instant::now() + TIMEOUT;
        while stats.counters.snapshot().queues_broken == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = stats.counters.snapshot();
        // RX still delivers; the worker is not spinning on the dead kick.
        for seq in 0..10 {
            good_rx(&hs, &mut rx, 7000, seq, &ctx);
        }
        std::thread::sleep(Duration::from_millis(300));
        let after = stats.counters.snapshot();
        stop.write(1).unwrap();
        let (pair, r) = worker.join().expect("worker panicked");
        r.unwrap_or_else(|e| panic!("{ctx}: engine: {e}"));
        assert_eq!(before.queues_broken, 1, "{ctx}: {before:?}");
        assert!(pair.tx.is_broken() && !pair.rx.is_broken(), "{ctx}");
        let spins = after.batches - before.batches;
        assert!(
            spins < 1000,
            "{ctx}: {spins} loop iterations in 300 ms: spinning"
        );
        let _ = hs.as_raw_fd();
    });
}

// ---- others of the same kind -------------------------------------------------------------------

/// MRG_RXBUF chains of twelve 1-byte buffers: a read sized for a full frame would need 1536
/// iovecs, more than readv takes (UIO_MAXIOV, 1024), and the TAP would refuse every read.
/// Reads stay within the limit and frames arrive whole.
#[test]
fn rx_chains_of_tiny_buffers_stay_within_uio_maxiov() {
    // MRG_RXBUF rings only: a frame spans many 144-byte chains only with MRG_RXBUF.
    for_each_cell(Matrix::LINUX.rings(&MRG_RINGS), |cell| {
        let ctx = cell.name();
        let mut g = cell.guest();
        g.queue_size = 2048;
        g.rx_buffer_size = 12;
        g.rx_descs_per_chain = 12;
        let mut rig = start(cell.engine, g, &ctx);
        let (mut rx, _tx) = rig.take(0);
        let hs = host_udp(HOST_IP, 9100);
        let before = rig.device().counters()[0];
        for seq in 0..5 {
            good_rx(&hs, &mut rx, 7000, seq, &ctx);
        }
        let (c, ok) = wait_counters(&rig, 0, TIMEOUT, |c| c.rx_packets >= before.rx_packets + 5);
        assert!(ok, "{ctx}: {c:?}");
        let d = c.delta(&before);
        assert_eq!(
            (d.rx_packets, d.rx_malformed, d.queues_broken),
            (5, 0, 0),
            "{ctx}: {d:?}"
        );
        assert_eq!(rx.stats().device_errors, 0, "{ctx}");
        rig.stop().unwrap_or_else(|e| panic!("{ctx}: stop: {e}"));
    });
}
