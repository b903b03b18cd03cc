//! `tapir serve` at the protocol level, driven by the rust-vmm `vhost` crate's frontend and
//! the simulated guest (no QEMU): frames both ways through a vhost-user session, the dirty log
//! (LOG_SHMFD) the frontend reads to live-migrate, requests a backend must refuse without
//! losing the session, a frontend that speaks garbage, and a frontend that goes away.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use std::io::Read;

use common::daemon::attach;
use common::raw::{
    Answer, Raw, GET_PROTOCOL_FEATURES, NET_SET_MTU, PROTOCOL, PROTOCOL_F_NET_MTU, PROTOCOL_F_RARP,
    SEND_RARP,
};
use common::{netns, GUEST_IP, HOST_IP, TAP_NAME};
use vhost::vhost_user::message::VhostUserVirtioFeatures;
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

/// `tapir serve` in the calling thread's namespace, killed (by pid) on drop.
struct Serve {
    child: Child,
    events: Receiver<String>,
    socket: PathBuf,
}

impl Serve {
    fn start(engine: &str, queues: u16) -> Serve {
        Serve::start_with(engine, queues, &[])
    }

    /// `start` with more `tapir serve` arguments.
    fn start_with(engine: &str, queues: u16, extra: &[&str]) -> Serve {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let socket = std::env::temp_dir().join(format!(
            "tapir-vu-proto-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let queues = queues.to_string();
        let mut args = vec![
            "--socket",
            socket.to_str().unwrap(),
            "--tap",
            TAP_NAME,
            "--queues",
            &queues,
            "--engine",
            engine,
        ];
        args.extend_from_slice(extra);
        let (child, events) = spawn_serve(&args);
        let serve = Serve {
            child,
            events,
            socket,
        };
        serve.wait_event("listening");
        netns::sysctl_write(&format!("net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1").ok();
        netns::link_up(TAP_NAME).unwrap();
        netns::add_addr(TAP_NAME, &format!("{HOST_IP}/24")).unwrap();
        serve
    }

    fn wait_event(&self, what: &str) -> String {
        wait_for(&self.events, what)
    }
}

/// `tapir serve ARGS` in the calling thread's namespace, its stdout events on a channel.
fn spawn_serve(args: &[&str]) -> (Child, Receiver<String>) {
    let mut child = Command::new(TAPIR)
        .arg("serve")
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, events) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, events)
}

/// The next event line containing `what` (panics after 10 s).
fn wait_for(events: &Receiver<String>, what: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(l) if l.contains(what) => return l,
            Ok(_) => continue,
            Err(_) => panic!("tapir serve never said {what:?}"),
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

#[test]
fn frames_cross_a_vhost_user_session_with_both_engines() {
    for engine in ["uring", "classic"] {
        common::in_netns(engine, || {
            let serve = Serve::start(engine, 1);
            let mut g = common::one_pair_guest();
            let fe = attach(&serve.socket, &g, 0);
            serve.wait_event("\"running\":[0]");
            common::arp_round_trip(&mut g, engine);
            // Stopping a ring hands back where to resume: everything tapir popped is either
            // in the used ring (TX, sent) or given back (RX buffers it held are popped again
            // by the next owner), so the base equals the used index the guest sees.
            let mem = g.memory();
            for q in g.queues() {
                let base = fe.get_vring_base(usize::from(q.index)).unwrap();
                let used = mem.read_u16(q.used_ring + 2).unwrap();
                assert_eq!(
                    base,
                    u32::from(used),
                    "{engine}: vring {} stopped at {base}, used index {used}",
                    q.index
                );
            }
            // Held RX chains were given back: with buffers posted, the RX ring's avail index
            // is ahead of the base.
            let rx = g.rx_queue(0);
            let avail = mem.read_u16(rx.avail_ring + 2).unwrap();
            assert!(
                avail > mem.read_u16(rx.used_ring + 2).unwrap(),
                "{engine}: no RX buffers posted?"
            );
        });
    }
}

fn memfd(len: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"tapir-log", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    nix::unistd::ftruncate(&fd, i64::try_from(len).unwrap()).unwrap();
    fd
}

fn log_bit(log: &[u8], gpa: u64) -> bool {
    let page = gpa / 4096;
    log[usize::try_from(page / 8).unwrap()] & (1 << (page % 8)) != 0
}

#[test]
fn the_dirty_log_shows_what_the_device_wrote() {
    common::in_netns("dirty log", || {
        let serve = Serve::start("uring", 1);
        let mut g = common::one_pair_guest();
        let top = g
            .regions()
            .iter()
            .map(|r| r.guest_addr + r.size)
            .max()
            .unwrap();
        let log_len = top / 4096 / 8 + 1;
        let log_fd = memfd(log_len);
        let fe = attach(&serve.socket, &g, VhostUserVirtioFeatures::LOG_ALL.bits());
        fe.set_log_base(
            0,
            Some(VhostUserDirtyLogRegion {
                mmap_size: log_len,
                mmap_offset: 0,
                mmap_handle: log_fd.as_raw_fd(),
            }),
        )
        .unwrap();
        serve.wait_event("\"running\":[0]");
        common::arp_round_trip(&mut g, "dirty log");
        let rx_used = g.rx_queue(0).used_ring;
        let tx_used = g.tx_queue(0).used_ring;
        let read_log = || {
            let mut log = vec![0u8; usize::try_from(log_len).unwrap()];
            nix::sys::uio::pread(&log_fd, &mut log, 0).unwrap();
            log
        };
        // tapir moves its marks into the shared log every few milliseconds while LOG_ALL is
        // on, and always when a ring stops. The RX buffer the ARP reply landed in is a page
        // of the buffer region (the simulated guest keeps rings and buffers apart).
        let buffers = g.regions().iter().map(|r| r.guest_addr).max().unwrap();
        let buffer_pages = |log: &[u8]| {
            (usize::try_from(buffers / 4096).unwrap()..usize::try_from(top / 4096).unwrap())
                .filter(|&p| log[p / 8] & (1 << (p % 8)) != 0)
                .count()
        };
        let logged =
            |log: &[u8]| log_bit(log, rx_used) && log_bit(log, tx_used) && buffer_pages(log) >= 1;
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut log = read_log();
        while !logged(&log) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            log = read_log();
        }
        assert!(log_bit(&log, rx_used), "RX used ring page not logged");
        assert!(log_bit(&log, tx_used), "TX used ring page not logged");
        assert!(
            buffer_pages(&log) >= 1,
            "no RX buffer page logged (the ARP reply's)"
        );
        // Nothing beyond guest memory.
        let beyond = (top / 4096) as usize;
        for p in beyond..log.len() * 8 {
            assert_eq!(
                log[p / 8] & (1 << (p % 8)),
                0,
                "page {p} beyond guest memory logged"
            );
        }
    });
}

#[test]
fn bad_requests_fail_and_the_session_goes_on() {
    common::in_netns("bad requests", || {
        let serve = Serve::start("uring", 1);
        let mut g = common::one_pair_guest();
        let fe = attach(&serve.socket, &g, 0);
        serve.wait_event("\"running\":[0]");
        // REPLY_ACK is on: each of these comes back as a failure.
        assert!(
            fe.set_vring_num(7, 256).is_err(),
            "vring 7 of a 1-pair device accepted"
        );
        assert!(
            fe.set_vring_num(0, 100).is_err(),
            "a ring size of 100 accepted"
        );
        assert!(fe.set_vring_base(9, 0).is_err(), "vring 9 accepted");
        // And the session still moves frames.
        common::arp_round_trip(&mut g, "after refused requests");
    });
}

fn raw_send(path: &Path, bytes: &[u8]) -> UnixStream {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(bytes).unwrap();
    s
}

#[test]
fn a_frontend_that_speaks_garbage_is_dropped_and_the_next_is_served() {
    common::in_netns("garbage", || {
        let serve = Serve::start("classic", 1);
        // A header with a reply flag and an unknown version, then one announcing a 1 MiB
        // body: both end that connection.
        for header in [[1u32, 0x6, 0], [1, 0x1, 1 << 20]] {
            let bytes: Vec<u8> = header.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut s = raw_send(&serve.socket, &bytes);
            serve.wait_event("disconnected");
            let mut b = [0u8; 1];
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            assert_eq!(std::io::Read::read(&mut s, &mut b).unwrap_or(0), 0);
        }
        // A frontend that vanishes mid-session.
        {
            let g = common::one_pair_guest();
            let _fe = attach(&serve.socket, &g, 0);
            serve.wait_event("\"running\":[0]");
        }
        serve.wait_event("disconnected");
        // The next frontend gets a working device.
        let mut g = common::one_pair_guest();
        let _fe = attach(&serve.socket, &g, 0);
        serve.wait_event("\"running\":[0]");
        common::arp_round_trip(&mut g, "after garbage");
    });
}

/// `tapir serve --takeover` while nothing runs: with no frontend at all, and with a frontend
/// connected whose rings are not started yet. The successor carries on (the listening
/// socket, the TAP, the half-built session) and the guest's frames then flow through it.
#[test]
fn an_idle_daemon_and_a_half_built_session_are_handed_over() {
    common::in_netns("idle handoff", || {
        let handoff =
            std::env::temp_dir().join(format!("tapir-vu-idle-{}.handoff", std::process::id()));
        let socket =
            std::env::temp_dir().join(format!("tapir-vu-idle-{}.sock", std::process::id()));
        let mut children = Vec::new();
        let (first, first_events) = spawn_serve(&[
            "--socket",
            socket.to_str().unwrap(),
            "--tap",
            TAP_NAME,
            "--handoff-socket",
            handoff.to_str().unwrap(),
        ]);
        children.push(first);
        wait_for(&first_events, "listening");
        netns::link_up(TAP_NAME).unwrap();
        netns::add_addr(TAP_NAME, &format!("{HOST_IP}/24")).unwrap();
        // 1. No frontend: the sockets and the TAP move.
        let (second, second_events) = spawn_serve(&["--takeover", handoff.to_str().unwrap()]);
        children.push(second);
        let running = wait_for(&second_events, "\"running\"");
        assert!(running.contains("\"frontend\":false"), "{running}");
        wait_for(&first_events, "handoff_committed");
        assert!(
            children[0].wait().unwrap().success(),
            "the first daemon did not exit cleanly"
        );
        // 2. A frontend that negotiated but started no ring yet.
        let stream = tapir_testkit::vhost_frontend::connect(&socket, Duration::from_secs(10))
            .expect("the successor serves the socket");
        let fe = Frontend::from_stream(stream.try_clone().unwrap(), 64);
        wait_for(&second_events, "connected");
        let offered = fe.get_features().unwrap();
        let g = common::one_pair_guest();
        fe.set_features(
            (g.features() & offered) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
        )
        .unwrap();
        let (third, third_events) = spawn_serve(&["--takeover", handoff.to_str().unwrap()]);
        children.push(third);
        let running = wait_for(&third_events, "\"running\"");
        assert!(
            running.contains("\"frontend\":true") && running.contains("\"pairs\":[]"),
            "{running}"
        );
        wait_for(&second_events, "handoff_committed");
        // The same connection goes on with the successor: rings, then frames.
        let mut g = g;
        let _fe = common::daemon::attach_on(stream, &g, &common::daemon::negotiation(0));
        wait_for(&third_events, "\"running\":[0]");
        common::arp_round_trip(&mut g, "after two idle handoffs");
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&socket);
        let _ = std::fs::remove_file(&handoff);
    });
}

/// A request whose reply carries data cannot be answered with a failure: asking for the base
/// of a vring the device does not have ends the session (rather than hanging the frontend),
/// and the daemon waits for the next.
#[test]
fn an_unanswerable_request_ends_the_session_not_the_daemon() {
    common::in_netns("unanswerable", || {
        let serve = Serve::start("uring", 1);
        let mut s = UnixStream::connect(&serve.socket).unwrap();
        // GET_VRING_BASE (11) for vring 9, version 1: header + VhostUserVringState.
        let mut msg: Vec<u8> = [11u32, 1, 8].iter().flat_map(|w| w.to_ne_bytes()).collect();
        msg.extend_from_slice(&9u32.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        s.write_all(&msg).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        assert_eq!(
            std::io::Read::read(&mut s, &mut b).unwrap_or(0),
            0,
            "tapir answered a GET_VRING_BASE it cannot serve"
        );
        serve.wait_event("disconnected");
        let mut g = common::one_pair_guest();
        let _fe = attach(&serve.socket, &g, 0);
        serve.wait_event("\"running\":[0]");
        common::arp_round_trip(&mut g, "after an unanswerable request");
    });
}

/// A hand-written frontend on `serve`'s socket.
fn raw_frontend(serve: &Serve) -> Raw {
    let s = UnixStream::connect(&serve.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    Raw { s }
}

/// The TAP's MTU as `ip link` shows it (sysfs shows the host's namespace).
fn tap_mtu() -> u16 {
    let out = Command::new("ip")
        .args(["-o", "link", "show", "dev", TAP_NAME])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    words
        .find(|&w| w == "mtu")
        .and_then(|_| words.next())
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no MTU in {text:?}"))
}

#[test]
fn send_rarp_announces_the_mac_on_the_tap() {
    common::in_netns("rarp", || {
        let serve = Serve::start("uring", 1);
        let mut sock = common::packet_socket(TAP_NAME, 0x8035, Duration::from_secs(5));
        let mut fe = raw_frontend(&serve);
        fe.send(GET_PROTOCOL_FEATURES, false, &[], &[]);
        let Answer::Reply(b) = fe.answer() else {
            panic!("no GET_PROTOCOL_FEATURES reply")
        };
        let offered = u64::from_ne_bytes(b.try_into().unwrap());
        assert_eq!(
            offered & (PROTOCOL_F_RARP | PROTOCOL_F_NET_MTU),
            PROTOCOL_F_RARP | PROTOCOL_F_NET_MTU,
            "protocol features offered: {offered:#x}"
        );
        fe.negotiate_with(0, PROTOCOL | PROTOCOL_F_RARP);
        let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef];
        let mut body = [0u8; 8];
        body[..6].copy_from_slice(&mac);
        fe.accepted(SEND_RARP, &body, &[], "SEND_RARP");
        let mut f = [0u8; 2048];
        let n = sock
            .read(&mut f)
            .expect("no RARP frame on the TAP within 5 s");
        let f = &f[..n];
        assert_eq!(n, 60, "frame {f:02x?}");
        assert_eq!(&f[..6], &[0xff; 6], "not broadcast: {f:02x?}");
        assert_eq!(&f[6..12], &mac, "source: {f:02x?}");
        assert_eq!(
            &f[12..22],
            &[0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3],
            "{f:02x?}"
        );
        assert_eq!(&f[22..28], &mac, "sender hardware address: {f:02x?}");
        assert_eq!(&f[32..38], &mac, "target hardware address: {f:02x?}");
        drop(fe);
        serve.wait_event("disconnected");
        // Without the protocol feature the request is refused, and nothing is sent.
        let mut quiet = common::packet_socket(TAP_NAME, 0x8035, Duration::from_millis(300));
        let mut fe = raw_frontend(&serve);
        fe.negotiate_with(0, PROTOCOL);
        fe.refused(SEND_RARP, &body, &[], "SEND_RARP without F_RARP");
        fe.still_answers("after a refused SEND_RARP");
        assert!(
            quiet.read(&mut [0u8; 2048]).is_err(),
            "a refused SEND_RARP sent a frame"
        );
    });
}

#[test]
fn net_set_mtu_agrees_to_the_taps_mtu_in_the_sandbox_and_sets_it_without() {
    common::in_netns("mtu", || {
        // Sandboxed (the default): --mtu sets the TAP's MTU at start; the frontend may ask for
        // exactly that one.
        let serve = Serve::start_with("uring", 1, &["--mtu", "9000"]);
        assert_eq!(tap_mtu(), 9000, "--mtu 9000 did not set the TAP's MTU");
        let mut fe = raw_frontend(&serve);
        fe.negotiate_with(0, PROTOCOL | PROTOCOL_F_NET_MTU);
        fe.accepted(NET_SET_MTU, &9000u64.to_ne_bytes(), &[], "MTU 9000");
        fe.refused(
            NET_SET_MTU,
            &4000u64.to_ne_bytes(),
            &[],
            "MTU 4000 in the sandbox",
        );
        assert_eq!(tap_mtu(), 9000);
        fe.refused(NET_SET_MTU, &60u64.to_ne_bytes(), &[], "MTU 60");
        fe.refused(NET_SET_MTU, &70_000u64.to_ne_bytes(), &[], "MTU 70000");
        fe.still_answers("after refused MTUs");
        drop(fe);
        serve.wait_event("disconnected");
        let mut fe = raw_frontend(&serve);
        fe.negotiate_with(0, PROTOCOL);
        fe.refused(
            NET_SET_MTU,
            &9000u64.to_ne_bytes(),
            &[],
            "NET_SET_MTU without F_NET_MTU",
        );
        drop(fe);
        drop(serve);
        // Without the sandbox tapir keeps CAP_NET_ADMIN and the TAP follows the frontend.
        let serve = Serve::start_with("uring", 1, &["--no-sandbox"]);
        let mut fe = raw_frontend(&serve);
        fe.negotiate_with(0, PROTOCOL | PROTOCOL_F_NET_MTU);
        fe.accepted(
            NET_SET_MTU,
            &4000u64.to_ne_bytes(),
            &[],
            "MTU 4000 without the sandbox",
        );
        assert_eq!(tap_mtu(), 4000, "the TAP did not follow NET_SET_MTU");
    });
}

#[test]
fn frames_up_to_the_taps_mtu_reach_a_guest_without_gso() {
    for engine in ["uring", "classic"] {
        common::in_netns(engine, || {
            let serve = Serve::start_with(engine, 1, &["--mtu", "9000"]);
            // MRG_RXBUF and checksum offloads, no GSO: RX reads are sized by the MTU.
            let mut g = common::one_pair_guest();
            let _fe = attach(&serve.socket, &g, 0);
            serve.wait_event("\"running\":[0]");
            let status = Command::new("ip")
                .args(["neigh", "replace", &GUEST_IP.to_string(), "lladdr"])
                .arg(
                    common::GUEST_MAC
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":"),
                )
                .args(["dev", TAP_NAME])
                .status()
                .unwrap();
            assert!(status.success());
            let host = common::host_udp(HOST_IP, 0);
            let payload: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
            let (mut rx, _tx) = g.take_pair(0);
            let deadline = Instant::now() + Duration::from_secs(10);
            let got = loop {
                host.send_to(&payload, (GUEST_IP, 9)).unwrap();
                if let Some(p) = common::rx_recv(&mut rx, Duration::from_millis(300), engine) {
                    if p.data.len() > 1500 {
                        break p;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "{engine}: no 8000-byte datagram reached the guest at MTU 9000"
                );
            };
            assert_eq!(got.data.len(), 14 + 20 + 8 + 8000, "{engine}: frame length");
            assert_eq!(&got.data[42..], &payload[..], "{engine}: payload");
        });
    }
}
