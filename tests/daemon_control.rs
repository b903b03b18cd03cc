//! Live counters of `tapir serve --control PATH` while frames cross (the real binary, sandbox
//! on, in a namespace of the test's own): `tapir ctl PATH stats` is one JSON object whose
//! packet counts follow the traffic, the session part names the frontend (this process),
//! `tapir ctl PATH status` summarises, and the socket is 0600 and gone after SIGTERM;
//! `--metrics 127.0.0.1:PORT` serves the same counters in the Prometheus text format (and
//! refuses a non-loopback address).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::daemon::{attach, Netns, TAPIR};
use common::{arp_round_trip_on, one_pair_guest, HOST_IP};

fn ctl(control: &Path, what: &str) -> String {
    let out = Command::new(TAPIR)
        .arg("ctl")
        .arg(control)
        .arg(what)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tapir ctl {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stats(control: &Path) -> serde_json::Value {
    let text = ctl(control, "stats");
    assert_eq!(text.lines().count(), 1, "stats is one JSON line: {text}");
    serde_json::from_str(&text).unwrap()
}

/// `GET /metrics` from inside the namespace (where the daemon's loopback is).
fn scrape(ns: &Netns, port: u16) -> String {
    use std::io::{Read, Write};
    ns.thread(move || {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .join()
    .unwrap()
}

/// The value of the sample line starting with `series`.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn count(v: &serde_json::Value, dir: &str) -> u64 {
    v["queue_pairs"][0][dir]["packets"].as_u64().unwrap()
}

#[test]
fn ctl_stats_and_status_follow_the_traffic_on_both_engines() {
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        let tap = format!("{}t", ns.name);
        let socket = ns.socket("vu");
        let control = ns.socket("control");
        let mut d = ns.spawn(
            &[],
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                &tap,
                "--engine",
                engine,
                "--control",
                control.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:9464",
            ],
        );
        d.event("listening");
        ns.ip(&["link", "set", "lo", "up"]);
        let mode = std::fs::metadata(&control).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{engine}: control socket mode {mode:o}"
        );
        let idle = stats(&control);
        assert!(idle["session"].is_null(), "{engine}: {idle}");
        assert_eq!(count(&idle, "tx"), 0, "{engine}: {idle}");
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        let mut guest = one_pair_guest();
        let (mut rx, mut txq) = guest.take_pair(0);
        let fe = attach(&socket, &guest, 0);
        d.event("\"running\":[0]");
        let mut last = (0, 0);
        for round in 1..=3u64 {
            for _ in 0..5 {
                arp_round_trip_on(&mut rx, &mut txq, engine);
            }
            // Counters are published once per worker loop: wait for them to catch up.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let v = loop {
                let v = stats(&control);
                if count(&v, "tx") >= 5 * round || std::time::Instant::now() > deadline {
                    break v;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            let (tx, rx) = (count(&v, "tx"), count(&v, "rx"));
            assert!(tx >= 5 * round, "{engine} round {round}: tx {tx}: {v}");
            assert!(rx >= 5 * round, "{engine} round {round}: rx {rx}: {v}");
            assert!(
                tx > last.0 && rx > last.1,
                "{engine}: counters did not move: {v}"
            );
            last = (tx, rx);
            let bytes = v["queue_pairs"][0]["tx"]["bytes"].as_u64().unwrap();
            assert!(
                bytes >= 42 * tx,
                "{engine}: tx bytes {bytes} for {tx} ARP frames"
            );
            assert!(
                v["queue_pairs"][0]["tx"]["kicks"].as_u64().unwrap() > 0,
                "{v}"
            );
            assert!(v["queue_pairs"][0]["batches"].as_u64().unwrap() > 0, "{v}");
            assert_eq!(v["queue_pairs"][0]["running"], true, "{v}");
            let s = &v["session"];
            assert_eq!(s["frontend_uid"], 0, "{v}");
            assert_eq!(
                s["frontend_pid"].as_u64(),
                Some(u64::from(std::process::id())),
                "{v}"
            );
            assert_eq!(s["rings"].as_array().unwrap().len(), 2, "{v}");
            assert_eq!(v["handoffs"]["count"], 0, "{v}");
        }
        let text = scrape(&ns, 9464);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("# HELP tapir_packets "), "{text}");
        assert!(text.contains("# TYPE tapir_packets counter"), "{text}");
        let tx = sample(&text, "tapir_packets_total{pair=\"0\",direction=\"tx\"}");
        assert!(
            tx >= last.0,
            "{engine}: metrics tx {tx} behind ctl {}",
            last.0
        );
        assert_eq!(sample(&text, "tapir_pair_running{pair=\"0\"}"), 1, "{text}");
        assert_eq!(sample(&text, "tapir_frontend_connected"), 1, "{text}");
        let status = ctl(&control, "status");
        assert!(
            status.contains(&format!("engine {engine}")) && status.contains("pair 0: rx "),
            "{engine}: {status}"
        );
        drop(fe);
        d.signal(nix::sys::signal::Signal::SIGTERM);
        let (st, log) = d.wait_exit();
        assert_eq!(st.code(), Some(0), "{log}");
        assert!(!control.exists(), "{engine}: the control socket stayed");
    }
}

#[test]
fn metrics_on_a_non_loopback_address_is_refused() {
    let ns = Netns::new();
    let out = ns.serve_output(
        &[],
        &[
            "--socket",
            ns.socket("vu").to_str().unwrap(),
            "--tap",
            "tm0",
            "--metrics",
            "0.0.0.0:9464",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("only a loopback address"), "{err}");
}

/// A client of the control socket or the metrics endpoint that connects and then sends one
/// byte every 200 ms, never a whole request, until `stop` is set or the daemon closes the
/// connection; returns whether the daemon closed it.
fn trickle(
    ns: &Netns,
    connect: impl FnOnce() -> Box<dyn ReadWrite> + Send + 'static,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<bool> {
    use std::io::{ErrorKind, Read, Write};
    use std::sync::atomic::Ordering;
    ns.thread(move || {
        let mut s = connect();
        let mut byte = [0u8; 1];
        while !stop.load(Ordering::Relaxed) {
            if s.write_all(b"G").is_err() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
            match s.read(&mut byte) {
                Ok(0) => return true,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {}
                Err(_) => return true,
                Ok(_) => {}
            }
        }
        false
    })
}

trait ReadWrite: std::io::Read + std::io::Write + Send {}
impl<T: std::io::Read + std::io::Write + Send> ReadWrite for T {}

/// Issue 12 (found in review): control and metrics clients were served in the vhost-user
/// loop itself, each read with a 1 s timeout, so a local client that trickles a byte now and
/// then (a loopback TCP connection needs no privilege) stalled every vhost-user request, ring
/// stop and dirty-log flush for as long as it liked. Now they are served beside the loop: with
/// slow clients on both endpoints, a frontend still sets up a session and frames cross, a
/// fresh `tapir ctl stats` is answered, and the slow clients are cut off.
#[test]
fn slow_control_and_metrics_clients_do_not_stall_the_frontend() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        let tap = format!("{}t", ns.name);
        let socket = ns.socket("vu");
        let control = ns.socket("control");
        let d = ns.spawn(
            &[],
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                &tap,
                "--engine",
                engine,
                "--control",
                control.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:9465",
            ],
        );
        d.event("listening");
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        let stop = Arc::new(AtomicBool::new(false));
        let mut slow = Vec::new();
        for _ in 0..3 {
            slow.push(trickle(
                &ns,
                || {
                    let s = std::net::TcpStream::connect(("127.0.0.1", 9465)).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                    Box::new(s)
                },
                stop.clone(),
            ));
            let path = control.clone();
            slow.push(trickle(
                &ns,
                move || {
                    let s = std::os::unix::net::UnixStream::connect(&path).unwrap();
                    s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
                    Box::new(s)
                },
                stop.clone(),
            ));
        }
        std::thread::sleep(Duration::from_millis(300));
        // The frontend's work on a thread of its own: a stalled daemon shows as a timeout
        // here, not as a test that hangs.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let (sock, ctx) = (socket.clone(), engine.to_owned());
        let frontend = std::thread::spawn(move || {
            let mut guest = one_pair_guest();
            let (mut rx, mut txq) = guest.take_pair(0);
            let fe = attach(&sock, &guest, 0);
            arp_round_trip_on(&mut rx, &mut txq, &ctx);
            let _ = done_tx.send(());
            // Kept until the test is done with the daemon.
            (fe, guest, rx, txq)
        });
        let answered = done_rx.recv_timeout(Duration::from_secs(20));
        assert!(
            answered.is_ok(),
            "{engine}: with slow control/metrics clients connected, the frontend's session \
             did not come up within 20 s (the vhost-user loop is stalled)"
        );
        let v = stats(&control);
        assert!(count(&v, "tx") >= 1, "{engine}: {v}");
        // Each slow client is cut off by the daemon (within its per-client deadline), not
        // by the test.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && !slow.iter().all(|t| t.is_finished()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        let closed: Vec<bool> = slow.into_iter().map(|t| t.join().unwrap()).collect();
        assert!(
            closed.iter().all(|&c| c),
            "{engine}: the daemon left slow clients connected: {closed:?}"
        );
        let _kept = frontend.join().unwrap();
        let text = scrape(&ns, 9465);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        let cut_off = stats(&control)["daemon"]["report_clients_cut_off"]
            .as_u64()
            .unwrap();
        assert!(
            cut_off >= 6,
            "{engine}: {cut_off} clients counted as cut off"
        );
        // More clients at once than the server takes: the rest are closed at accept, counted.
        let idle = ns
            .thread(|| {
                (0..32)
                    .map(|_| std::net::TcpStream::connect(("127.0.0.1", 9465)).unwrap())
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        drop(idle);
        let refused = stats(&control)["daemon"]["report_clients_refused"]
            .as_u64()
            .unwrap();
        assert!(refused >= 1, "{engine}: 32 clients at once, none refused");
        drop(d);
    }
}

/// A successor (`tapir serve --takeover`) serves its predecessor's control socket and metrics
/// endpoint: the same listening sockets (no gap, no new port), the report now its own (pid,
/// the handoff counted), and it removes the control socket when it stops.
#[test]
fn the_control_socket_and_metrics_endpoint_follow_a_takeover() {
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        let tap = format!("{}t", ns.name);
        let socket = ns.socket("vu");
        let control = ns.socket("control");
        let handoff = ns.socket("handoff");
        let mut first = ns.spawn(
            &[],
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                &tap,
                "--engine",
                engine,
                "--handoff-socket",
                handoff.to_str().unwrap(),
                "--control",
                control.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:9466",
            ],
        );
        first.event("listening");
        ns.ip(&["link", "set", "lo", "up"]);
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        let mut guest = one_pair_guest();
        let (mut rx, mut txq) = guest.take_pair(0);
        let fe = attach(&socket, &guest, 0);
        first.event("\"running\":[0]");
        arp_round_trip_on(&mut rx, &mut txq, engine);
        let before = stats(&control);
        assert_eq!(before["pid"], first.pid(), "{before}");
        let mut second = ns.spawn(
            &[],
            &["--takeover", handoff.to_str().unwrap(), "--engine", engine],
        );
        second.event("\"running\"");
        first.event("handoff_committed");
        let (st, log) = first.wait_exit();
        assert_eq!(st.code(), Some(0), "{engine}: predecessor: {log}");
        assert!(
            control.exists(),
            "{engine}: the predecessor removed the control socket"
        );
        for _ in 0..3 {
            arp_round_trip_on(&mut rx, &mut txq, engine);
        }
        let after = stats(&control);
        assert_eq!(after["pid"], second.pid(), "{engine}: {after}");
        assert_eq!(after["handoffs"]["count"], 1, "{engine}: {after}");
        assert_eq!(
            after["queue_pairs"][0]["running"], true,
            "{engine}: {after}"
        );
        assert!(!after["session"].is_null(), "{engine}: {after}");
        let text = scrape(&ns, 9466);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{engine}: {text}");
        assert_eq!(sample(&text, "tapir_frontend_connected"), 1, "{text}");
        drop(fe);
        second.signal(nix::sys::signal::Signal::SIGTERM);
        let (st, log) = second.wait_exit();
        assert_eq!(st.code(), Some(0), "{engine}: successor: {log}");
        assert!(
            !control.exists(),
            "{engine}: the successor left the control socket"
        );
    }
}

/// The uid of a running process, from /proc (its real, effective, saved and fs uids).
fn uids_of(pid: i32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .unwrap()
        .trim()
        .to_owned()
}

/// Both sides of a takeover sandboxed as another user (`--user` on the predecessor and on the
/// successor): the handoff socket is bound and checked as that user, the successor takes the
/// live session over and serves it as that user, frames keep crossing.
#[test]
fn a_takeover_works_with_both_sides_running_as_another_user() {
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        // The sockets are bound after the switch to uid 65534: it needs a directory of its own.
        let dir = ns.socket("nobody").with_extension("d");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let tap = format!("{}t", ns.name);
        let socket = dir.join("vu.sock");
        let handoff = dir.join("handoff.sock");
        let as_nobody = ["--user", "65534", "--group", "65534", "--allow-uid", "0"];
        let mut first_args = vec![
            "--socket",
            socket.to_str().unwrap(),
            "--tap",
            &tap,
            "--engine",
            engine,
            "--handoff-socket",
            handoff.to_str().unwrap(),
        ];
        first_args.extend(as_nobody);
        let mut first = ns.spawn(&[], &first_args);
        first.event("listening");
        assert_eq!(
            uids_of(first.pid()),
            "65534\t65534\t65534\t65534",
            "{engine}"
        );
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        let mut guest = one_pair_guest();
        let (mut rx, mut txq) = guest.take_pair(0);
        let fe = attach(&socket, &guest, 0);
        first.event("\"running\":[0]");
        arp_round_trip_on(&mut rx, &mut txq, engine);
        let mut second_args = vec!["--takeover", handoff.to_str().unwrap(), "--engine", engine];
        second_args.extend(as_nobody);
        let mut second = ns.spawn(&[], &second_args);
        second.event("\"running\"");
        first.event("handoff_committed");
        let (st, log) = first.wait_exit();
        assert_eq!(st.code(), Some(0), "{engine}: predecessor: {log}");
        assert_eq!(
            uids_of(second.pid()),
            "65534\t65534\t65534\t65534",
            "{engine}"
        );
        for _ in 0..3 {
            arp_round_trip_on(&mut rx, &mut txq, engine);
        }
        drop(fe);
        second.signal(nix::sys::signal::Signal::SIGTERM);
        let (st, log) = second.wait_exit();
        assert_eq!(st.code(), Some(0), "{engine}: successor: {log}");
    }
}

/// `tapir serve --busy-poll-us N` reaches the engine: with a budget, the workers poll before
/// they sleep (`busy_poll.rounds` in `tapir ctl stats` grows with the traffic); without
/// (the default, 0), they never do. `--help` documents the flag.
#[test]
fn serve_busy_poll_us_reaches_the_workers_on_both_engines() {
    let help = Command::new(TAPIR)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--busy-poll-us <US>") && help.contains("VHOST_SET_VRING_BUSYLOOP_TIMEOUT"),
        "{help}"
    );
    for engine in ["uring", "classic"] {
        for budget in ["0", "200"] {
            let ns = Netns::new();
            let tap = format!("{}t", ns.name);
            let socket = ns.socket("vu");
            let control = ns.socket("control");
            let mut d = ns.spawn(
                &[],
                &[
                    "--socket",
                    socket.to_str().unwrap(),
                    "--tap",
                    &tap,
                    "--engine",
                    engine,
                    "--control",
                    control.to_str().unwrap(),
                    "--busy-poll-us",
                    budget,
                ],
            );
            d.event("listening");
            ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
            ns.ip(&["link", "set", &tap, "up"]);
            let mut guest = one_pair_guest();
            let (mut rx, mut txq) = guest.take_pair(0);
            let fe = attach(&socket, &guest, 0);
            d.event("\"running\":[0]");
            for _ in 0..10 {
                arp_round_trip_on(&mut rx, &mut txq, engine);
            }
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let v = loop {
                let v = stats(&control);
                if count(&v, "tx") >= 10 || std::time::Instant::now() > deadline {
                    break v;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            assert!(count(&v, "tx") >= 10, "{engine} {budget}: {v}");
            let rounds = v["queue_pairs"][0]["busy_poll"]["rounds"].as_u64().unwrap();
            let found = v["queue_pairs"][0]["busy_poll"]["found"].as_u64().unwrap();
            if budget == "0" {
                assert_eq!(
                    (rounds, found),
                    (0, 0),
                    "{engine}: polled without a budget: {v}"
                );
            } else {
                // At least one round per wake-up for work (10 ARP requests at least).
                assert!(rounds >= 10, "{engine} {budget} us: {v}");
                assert!(found <= rounds, "{engine}: {v}");
            }
            drop(fe);
            d.signal(nix::sys::signal::Signal::SIGTERM);
            let (st, log) = d.wait_exit();
            assert_eq!(st.code(), Some(0), "{log}");
        }
    }
}

/// Who serves the rings after they were stopped with a frame waiting for guest buffers.
#[derive(Clone, Copy, Debug)]
enum AfterStop {
    /// A `tapir serve --takeover` successor, from the session blob.
    Takeover,
    /// The same daemon, the frontend starting the rings again (a VMM's stop and continue).
    Restart,
    /// Nobody: the frontend resets the device (`RESET_OWNER`), and the guest that would have
    /// taken the frame is gone. The frame is dropped, and counted.
    Reset,
}

/// A frame read from the TAP that waits for guest buffers when the frontend stops the rings
/// (`GET_VRING_BASE`) stays with the session instead of being dropped: a `--takeover`
/// successor gets it in the session blob, and whoever serves the rings when the frontend
/// starts them again delivers it before anything newer, once. A reset instead drops it and
/// counts it (`no_buffers`).
#[test]
fn a_frame_waiting_for_buffers_at_a_ring_stop_is_delivered_when_the_rings_start_again() {
    use common::frames::{parse_udp, verify_payload, write_payload};
    use common::{GUEST_IP, GUEST_MAC};
    use vhost::VhostBackend;
    for engine in ["uring", "classic"] {
        for after in [AfterStop::Takeover, AfterStop::Restart, AfterStop::Reset] {
            let ctx = format!("{engine} {after:?}");
            let ns = Netns::new();
            let tap = format!("{}t", ns.name);
            let socket = ns.socket("vu");
            let control = ns.socket("control");
            let handoff = ns.socket("handoff");
            let first = ns.spawn(
                &[],
                &[
                    "--socket",
                    socket.to_str().unwrap(),
                    "--tap",
                    &tap,
                    "--engine",
                    engine,
                    "--handoff-socket",
                    handoff.to_str().unwrap(),
                    "--control",
                    control.to_str().unwrap(),
                ],
            );
            first.event("listening");
            // Nothing but the test's datagrams reaches the guest: no IPv6, a static neighbour.
            common::daemon::sh(&[
                "ip",
                "netns",
                "exec",
                &ns.name,
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{tap}.disable_ipv6=1"),
            ]);
            ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
            ns.ip(&["link", "set", &tap, "up"]);
            let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
            ns.ip(&[
                "neigh",
                "replace",
                &GUEST_IP.to_string(),
                "lladdr",
                &mac,
                "dev",
                &tap,
                "nud",
                "permanent",
            ]);
            // 512-byte buffers: a 1054-byte frame needs three, the guest posts one.
            let mut guest = tapir_simguest::SimGuest::new(common::GuestConfig {
                queue_pairs: 1,
                rx_buffer_size: 512,
                queue_size: 16,
                ..common::GuestConfig::default()
            })
            .unwrap();
            let (mut rx, _txq) = guest.take_pair(0);
            let fe = attach(&socket, &guest, 0);
            first.event("\"running\":[0]");
            assert_eq!(rx.refill_up_to(1), 1);
            let send = |seq: u64| {
                ns.thread(move || {
                    let host = std::net::UdpSocket::bind((HOST_IP, 9000)).unwrap();
                    let mut payload = vec![0u8; 1000];
                    write_payload(&mut payload, 2, seq);
                    host.send_to(&payload, (GUEST_IP, 7000)).unwrap();
                })
                .join()
                .unwrap();
            };
            send(0);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while stats(&control)["queue_pairs"][0]["rx"]["deferred"] != 1 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{ctx}: the frame never waited for buffers: {}",
                    stats(&control)
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let bases: Vec<u32> = (0..2).map(|i| fe.get_vring_base(i).unwrap()).collect();
            let stopped = stats(&control);
            assert_eq!(
                stopped["queue_pairs"][0]["rx"]["drops"]["no_buffers"], 0,
                "{ctx}: the ring stop dropped the waiting frame: {stopped}"
            );
            if let AfterStop::Reset = after {
                fe.reset_owner().unwrap();
                let v = stats(&control);
                assert_eq!(
                    v["queue_pairs"][0]["rx"]["drops"]["no_buffers"], 1,
                    "{ctx}: the kept frame dropped at the reset and counted: {v}"
                );
                drop(fe);
                drop(first);
                continue;
            }
            let mut successor = None;
            if let AfterStop::Takeover = after {
                let second = ns.spawn(
                    &[],
                    &["--takeover", handoff.to_str().unwrap(), "--engine", engine],
                );
                second.event("\"running\"");
                first.event("handoff_committed");
                successor = Some(second);
            }
            // The frontend starts the rings again where they stopped.
            for (q, &base) in guest.queues().iter().zip(&bases) {
                let i = usize::from(q.index);
                fe.set_vring_base(i, u16::try_from(base).unwrap()).unwrap();
                let kick = tapir_testkit::vhost_frontend::guest_eventfd(q.kick_fd).unwrap();
                fe.set_vring_kick(i, &kick).unwrap();
            }
            let got = |rx: &mut tapir_simguest::RxDriver| {
                let p = common::rx_recv(rx, std::time::Duration::from_secs(5), &ctx)
                    .unwrap_or_else(|| panic!("{ctx}: no frame after the rings started again"));
                verify_payload(parse_udp(&p.data).expect("a UDP datagram").payload)
                    .expect("a verifiable payload")
            };
            assert_eq!(got(&mut rx), (2, 0), "{ctx}: the waiting frame first");
            send(1);
            assert_eq!(got(&mut rx), (2, 1), "{ctx}: then the next, once");
            let v = stats(&control);
            assert_eq!(
                v["queue_pairs"][0]["rx"]["drops"]["no_buffers"], 0,
                "{ctx}: {v}"
            );
            drop(fe);
            drop(successor);
            drop(first);
        }
    }
}
