//! Hostile handoff peers (issue 9, items 11 to 14 and their kin): successors and predecessors
//! of the same uid that flood the channel with fds, talk through a dup'd fd after the fence,
//! hand over fds that are not what the snapshot says, trickle fds one at a time, or sit on
//! the socket path. Each case asserts the precise outcome, then that the source still serves
//! and still hands off to a real successor, with its fd count back at its baseline.

mod common;

use std::io::{BufRead, BufReader, IoSlice};
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tapir_datapath::EngineKind;
use tapir_migrate::{
    hand_off, hand_off_state, protocol, take_over, Channel, ChannelError, DeviceSource,
    HandoffSource, Listener, MigrateError, Outcome, SuccessorOptions, Timeouts,
};
use tapir_simguest::{GuestConfig, TxDriver, VirtioNetHdr};
use tapir_state::DeviceSnapshot;
use tapir_testkit::frames::{build_udp, verify_payload};
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{ChildOptions, HandoffRig, SteadyTraffic, TrafficReport};
use tapir_testkit::{Rig, RigConfig, HOST_IP, TAP_NAME};
use tapir_vhost_user::handoff::{
    self as session_blob, EndpointState, ReportState, SessionState, VringState,
};

const EXE: &str = env!("CARGO_BIN_EXE_tapir");

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tapir-hostile-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn guest(pairs: u16) -> GuestConfig {
    GuestConfig {
        queue_pairs: pairs,
        ..GuestConfig::default()
    }
}

/// Open fds of a process.
fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

/// Waits (up to 5 s) until `pid` has `want` fds open; panics with what it has otherwise.
fn wait_fd_count(pid: u32, want: usize, ctx: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = fd_count(pid);
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{ctx}: pid {pid} has {now} fds open, its baseline was {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn eventfd() -> OwnedFd {
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(raw >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `raw` is a fresh fd nothing else owns.
    unsafe { OwnedFd::from_raw_fd(raw) }
}

fn memfd(len: u64) -> OwnedFd {
    tapir_testkit::memfd(len).unwrap()
}

/// Sends one message with any number of fds (more than `Channel::send` allows).
fn send_with_fds(ch: &Channel, kind: u8, payload: &[u8], fds: &[OwnedFd]) {
    let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
    let kind = [kind];
    let iov = [IoSlice::new(&kind), IoSlice::new(payload)];
    sendmsg::<()>(
        ch.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .expect("sendmsg with fds");
}

/// A HELLO that speaks exactly version 2 (the protocol these cases were written against;
/// version 3's own cases are in `hostile_ownership.rs`).
fn hello(pid: u32) -> Vec<u8> {
    protocol::Versions {
        oldest: 2,
        newest: 2,
    }
    .hello(pid)
}

fn expect_abort(ch: &Channel, contains: &str, ctx: &str) {
    let m = ch
        .recv(Some(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("{ctx}: no answer: {e}"));
    let why = String::from_utf8_lossy(&m.payload).into_owned();
    assert_eq!(m.kind, protocol::ABORT, "{ctx}: kind {} ({why})", m.kind);
    assert!(why.contains(contains), "{ctx}: ABORT says {why:?}");
}

fn assert_traffic_flowed(what: &str, r: &TrafficReport) {
    for (dir, d) in [
        ("guest->host", &r.guest_to_host),
        ("host->guest", &r.host_to_guest),
    ] {
        assert!(d.received > 100, "{what} {dir}: {d:?}");
        assert_eq!(d.duplicated, 0, "{what} {dir}: {d:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 11. A successor that sends 253 fds (more than a message may carry: MSG_CTRUNC).
// ---------------------------------------------------------------------------------------

#[test]
fn a_successor_sending_253_fds_leaks_nothing_in_tapir_datapath() {
    for engine in common::engines() {
        run_in_new_netns(move || {
            let ctx = format!("{engine}");
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest(1), ChildOptions::default())
                    .unwrap();
            let traffic = SteadyTraffic::start(&mut rig, 5_000).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let pid = rig.datapath_pid().unwrap();
            let baseline = fd_count(pid);
            let sock = rig.handoff_socket().unwrap();
            for round in 0..3 {
                let ch = Channel::connect(&sock).unwrap();
                let fds: Vec<OwnedFd> = (0..253).map(|_| eventfd()).collect();
                send_with_fds(&ch, protocol::HELLO, &hello(std::process::id()), &fds);
                expect_abort(&ch, "more than 250 fds", &format!("{ctx} round {round}"));
                drop(ch);
                wait_fd_count(pid, baseline, &format!("{ctx} round {round}"));
            }
            assert_eq!(rig.datapath_pid(), Some(pid), "{ctx}");
            rig.handoff()
                .unwrap_or_else(|e| panic!("{ctx}: real handoff after the flood: {e:#}"));
            std::thread::sleep(Duration::from_millis(100));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            assert_traffic_flowed(&ctx, &report);
        })
        .unwrap();
    }
}

/// `tapir serve ARGS`, its stdout events on a channel; killed (by pid) on drop.
struct Serve {
    child: Child,
    events: Receiver<String>,
}

impl Serve {
    fn spawn(args: &[&str]) -> Serve {
        let mut child = Command::new(EXE)
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
        Serve { child, events }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_event(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => continue,
                Err(_) => panic!("tapir serve {} never said {what:?}", self.pid()),
            }
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_successor_sending_253_fds_leaks_nothing_in_tapir_serve() {
    for engine in common::engines() {
        common::in_netns(&format!("serve {engine}"), || {
            let dir = tmp(&format!("serve-flood-{engine}"));
            let socket = dir.join("vu.sock");
            let handoff = dir.join("handoff.sock");
            let first = Serve::spawn(&[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                TAP_NAME,
                "--engine",
                &engine.to_string(),
                "--handoff-socket",
                handoff.to_str().unwrap(),
            ]);
            first.wait_event("listening");
            std::thread::sleep(Duration::from_millis(100));
            let baseline = fd_count(first.pid());
            for round in 0..3 {
                let ch = Channel::connect(&handoff).unwrap();
                let fds: Vec<OwnedFd> = (0..253).map(|_| eventfd()).collect();
                send_with_fds(&ch, protocol::HELLO, &hello(std::process::id()), &fds);
                expect_abort(&ch, "more than 250 fds", &format!("round {round}"));
                drop(ch);
                first.wait_event("handoff_rolled_back");
                wait_fd_count(first.pid(), baseline, &format!("round {round}"));
            }
            // It still serves: a frontend connects and negotiates; then a real successor
            // takes the daemon over.
            let fe = vhost::vhost_user::Frontend::connect(&socket, 2).unwrap();
            vhost::VhostBackend::get_features(&fe).expect("the daemon still answers");
            drop(fe);
            first.wait_event("disconnected");
            let second = Serve::spawn(&["--takeover", handoff.to_str().unwrap()]);
            second.wait_event("\"running\"");
            first.wait_event("handoff_committed");
            let mut first = first;
            assert!(first.child.wait().unwrap().success());
            let fe = vhost::vhost_user::Frontend::connect(&socket, 2).unwrap();
            vhost::VhostBackend::get_features(&fe).expect("the successor answers");
            drop(fe);
            drop(second);
            std::fs::remove_dir_all(dir).ok();
        });
    }
}

// ---------------------------------------------------------------------------------------
// 12. A RUNNING that arrives through a dup'd fd after the fence killed the successor.
// ---------------------------------------------------------------------------------------

/// Not a test of its own: the body of the helper process that `spawn_connector` starts
/// (this binary, re-executed). Without it, it does nothing.
#[test]
fn helper_process_connects_and_passes_its_channel() {
    common::peer::run_helper_if_asked();
}

fn spawn_connector(socket: &Path) -> (Child, Channel) {
    common::peer::spawn_connector(socket, "helper_process_connects_and_passes_its_channel")
}

/// Plays a successor on `ch` (whose real peer process is `pid`) up to GO: HELLO, the layout
/// and its fds, PREPARED, SWITCH, READY, GO.
fn play_successor_until_go(ch: &Channel, pid: u32) {
    let t = Some(Duration::from_secs(10));
    ch.send(protocol::HELLO, &hello(pid), &[]).unwrap();
    let prepare = ch.recv(t).unwrap();
    assert_eq!(prepare.kind, protocol::PREPARE);
    let layout = tapir_state::decode(&prepare.payload).unwrap();
    let mut got = 0;
    while got < layout.fds.len() {
        let m = ch.recv(t).unwrap();
        assert_eq!(m.kind, protocol::FDS);
        got += m.fds.len();
    }
    assert_eq!(ch.recv(t).unwrap().kind, protocol::EXTENSION);
    ch.send(protocol::PREPARED, &[], &[]).unwrap();
    assert_eq!(ch.recv(t).unwrap().kind, protocol::SWITCH);
    ch.send(protocol::READY, &[], &[]).unwrap();
    assert_eq!(ch.recv(t).unwrap().kind, protocol::GO);
}

#[test]
fn a_running_through_a_dupd_fd_after_the_fence_does_not_commit() {
    for engine in common::engines() {
        run_in_new_netns(move || {
            let ctx = format!("{engine}");
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest(1), ChildOptions::default())
                    .unwrap();
            let traffic = SteadyTraffic::start(&mut rig, 5_000).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let pid = rig.datapath_pid().unwrap();
            let baseline = fd_count(pid);
            let (mut helper, ch) = spawn_connector(&rig.handoff_socket().unwrap());
            play_successor_until_go(&ch, helper.id());
            // Silent after GO: the source fences the helper (the process its socket names).
            let deadline = Instant::now() + Duration::from_secs(10);
            let status = loop {
                if let Some(s) = helper.try_wait().unwrap() {
                    break s;
                }
                assert!(Instant::now() < deadline, "{ctx}: the fence never fired");
                std::thread::sleep(Duration::from_millis(1));
            };
            assert_eq!(status.signal(), Some(libc::SIGKILL), "{ctx}: {status}");
            // The dead successor's channel lives on here: it says RUNNING now.
            let _ = ch.send(protocol::RUNNING, &[], &[]);
            drop(ch);
            // The source took the device back: it still runs and serves.
            std::thread::sleep(Duration::from_millis(2500));
            assert_eq!(rig.datapath_pid(), Some(pid), "{ctx}");
            assert!(
                Path::new(&format!("/proc/{pid}")).exists()
                    && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                        .unwrap_or_default()
                        .contains(") Z"),
                "{ctx}: the source committed to a dead successor and exited"
            );
            wait_fd_count(pid, baseline, &ctx);
            rig.handoff()
                .unwrap_or_else(|e| panic!("{ctx}: real handoff after the fence: {e:#}"));
            std::thread::sleep(Duration::from_millis(100));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            assert_traffic_flowed(&ctx, &report);
        })
        .unwrap();
    }
}

/// A successor whose HELLO names another process than the one at the end of its socket is
/// refused (the fence would target the wrong process).
#[test]
fn a_hello_naming_another_pid_is_refused() {
    for engine in common::engines() {
        run_in_new_netns(move || {
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest(1), ChildOptions::default())
                    .unwrap();
            let pid = rig.datapath_pid().unwrap();
            let baseline = fd_count(pid);
            let ch = Channel::connect(&rig.handoff_socket().unwrap()).unwrap();
            ch.send(protocol::HELLO, &hello(1), &[]).unwrap();
            expect_abort(&ch, "pid 1", &format!("{engine}"));
            drop(ch);
            wait_fd_count(pid, baseline, &format!("{engine}"));
            let traffic = SteadyTraffic::start(&mut rig, 5_000).unwrap();
            rig.handoff().unwrap();
            // Long enough for over 100 datagrams each way at 5 kpps, however fast the
            // handoff was.
            std::thread::sleep(Duration::from_millis(100));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            assert_traffic_flowed(&format!("{engine}"), &report);
        })
        .unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// 13. A lying predecessor: fds that are not what its snapshot says.
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Lie {
    /// The last region says it is twice as long as its memfd.
    RegionPastItsFile,
    /// A region's fd is an eventfd.
    RegionNotAFile,
    /// The RX kick fd is a pipe.
    KickIsAPipe,
    /// The TX call fd is a memfd.
    CallIsAMemfd,
    /// The TAP fd is an eventfd.
    TapIsAnEventfd,
}

/// A running device whose layout lies.
struct LyingSource {
    inner: DeviceSource,
    lie: Lie,
    substitute: OwnedFd,
    _pipe_writer: Option<OwnedFd>,
}

impl LyingSource {
    fn new(inner: DeviceSource, lie: Lie) -> LyingSource {
        let (substitute, writer) = match lie {
            Lie::KickIsAPipe => {
                let (r, w) = nix::unistd::pipe().unwrap();
                (r, Some(w))
            }
            Lie::CallIsAMemfd => (memfd(4096), None),
            _ => (eventfd(), None),
        };
        LyingSource {
            inner,
            lie,
            substitute,
            _pipe_writer: writer,
        }
    }
}

impl HandoffSource for LyingSource {
    fn layout(&self) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>) {
        let (mut s, mut fds) = self.inner.layout();
        let sub = self.substitute.as_fd();
        match self.lie {
            Lie::RegionPastItsFile => {
                let last = s.memory.iter_mut().max_by_key(|r| r.guest_addr).unwrap();
                last.size *= 2;
            }
            Lie::RegionNotAFile => fds[usize::from(s.memory[0].fd)] = sub,
            Lie::KickIsAPipe => fds[usize::from(s.queue_pairs[0].rx.kick_fd)] = sub,
            Lie::CallIsAMemfd => fds[usize::from(s.queue_pairs[0].tx.call_fd)] = sub,
            Lie::TapIsAnEventfd => fds[usize::from(s.queue_pairs[0].tap.fd)] = sub,
        }
        (s, fds)
    }

    fn quiesce(&mut self) -> Result<DeviceSnapshot, MigrateError> {
        self.inner.quiesce()
    }

    fn resume(&mut self) -> Result<(), MigrateError> {
        self.inner.resume()
    }
}

/// Guest -> host datagrams flow: `n` datagrams, each received and verified.
fn traffic_flows(rig: &Rig, tx: &mut TxDriver, sock: &UdpSocket, first_seq: u64, n: u64) {
    let flow = rig.guest_to_host(5000, 9000);
    let mut buf = vec![0u8; 512];
    for seq in first_seq..first_seq + n {
        let len = build_udp(&mut buf, &flow, 200, 7, seq).unwrap();
        assert!(tx.send(&VirtioNetHdr::default(), &buf[..len]).unwrap());
        let mut r = [0u8; 2048];
        let (got, _) = sock.recv_from(&mut r).expect("datagram to the host");
        assert_eq!(verify_payload(&r[..got]).unwrap(), (7, seq));
        tx.reclaim();
    }
}

/// Spawns `tapir datapath --take-over` at `socket` and accepts it on `listener`.
fn datapath_successor(
    listener: &Listener,
    socket: &Path,
    listen: &Path,
    engine: EngineKind,
) -> (Child, Channel) {
    let child = Command::new(EXE)
        .args(["datapath", "--take-over"])
        .arg(socket)
        .arg("--listen")
        .arg(listen)
        .args(["--engine", &engine.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ch = listener
        .accept(Some(Duration::from_secs(10)))
        .expect("the successor connects");
    (child, ch)
}

#[test]
fn a_lying_predecessor_is_refused_before_prepared() {
    let lies = [
        (Lie::RegionPastItsFile, "past the end of its file"),
        (Lie::RegionNotAFile, "regular file"),
        (Lie::KickIsAPipe, "an eventfd"),
        (Lie::CallIsAMemfd, "an eventfd"),
        (Lie::TapIsAnEventfd, "TUNGETIFF"),
    ];
    for engine in common::engines() {
        run_in_new_netns(move || {
            let dir = tmp(&format!("lying-{engine}"));
            let socket = dir.join("source.sock");
            let listener = Listener::bind(&socket).unwrap();
            let mut rig = Rig::start(&RigConfig::new(engine, 1)).unwrap();
            let sock = UdpSocket::bind((HOST_IP, 9000)).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let (_rx, mut tx) = rig.take(0);
            let mut source = DeviceSource::new(rig.device.take().unwrap(), 0);
            let mut seq = 0;
            for (i, (lie, expect)) in lies.into_iter().enumerate() {
                let ctx = format!("{engine} {lie:?}");
                let mut liar = LyingSource::new(source, lie);
                let (child, ch) =
                    datapath_successor(&listener, &socket, &dir.join(format!("s{i}")), engine);
                let outcome = hand_off(&mut liar, &ch, Timeouts::default()).unwrap();
                drop(ch);
                match &outcome {
                    Outcome::RolledBack(MigrateError::Aborted(why)) => {
                        assert!(why.contains(expect), "{ctx}: {why}");
                    }
                    o => panic!("{ctx}: {o:?}"),
                }
                let out = child.wait_with_output().unwrap();
                assert!(!out.status.success(), "{ctx}: the successor took it");
                assert!(
                    out.status.signal().is_none(),
                    "{ctx}: the successor died of {:?}",
                    out.status.signal()
                );
                // The source never stopped: it serves.
                source = liar.inner;
                rig.device = source.into_running();
                assert!(rig.device.is_some(), "{ctx}: the source is not running");
                traffic_flows(&rig, &mut tx, &sock, seq, 20);
                seq += 20;
                source = DeviceSource::new(rig.device.take().unwrap(), 0);
            }
            // A real successor still takes the device over, and it serves.
            let (mut child, ch) = datapath_successor(&listener, &socket, &dir.join("real"), engine);
            match hand_off(&mut source, &ch, Timeouts::default()).unwrap() {
                Outcome::Committed(_) => {}
                o => panic!("{engine}: real handoff: {o:?}"),
            }
            drop(ch);
            source.release();
            traffic_flows(&rig, &mut tx, &sock, seq, 20);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
                nix::sys::signal::Signal::SIGTERM,
            );
            assert!(child.wait().unwrap().success(), "{engine}: successor exit");
            drop(listener);
            rig.shutdown().unwrap();
            std::fs::remove_dir_all(dir).ok();
        })
        .unwrap();
    }
}

/// The session blob's fds, checked by a `tapir serve --takeover` successor before it takes
/// anything: a listener that is not a listening socket, a kick fd that is a pipe, a region
/// shorter than the blob says.
#[test]
fn a_lying_serve_predecessor_is_refused() {
    common::in_netns("serve lies", || {
        let dir = tmp("serve-lies");
        let handoff = dir.join("handoff.sock");
        let tap = tapir_datapath::Tap::open(TAP_NAME, 1).unwrap();
        let (conn, _frontend) = UnixStream::pair().unwrap();
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        let not_listening = eventfd();
        let short_region = memfd(4096);
        let call = eventfd();
        let vring = |kick: Option<u16>, call: Option<u16>| VringState {
            size: 256,
            addrs: None,
            base: 0,
            held: vec![],
            kick,
            call,
            err: None,
            enabled: false,
            started: false,
        };
        let base = SessionState {
            queue_pairs: 1,
            mac: [0x52, 0x54, 0, 0, 0, 1],
            features: 1 << 32,
            protocol_features: 0,
            regions: vec![],
            vrings: vec![vring(None, None), vring(None, None)],
            log: None,
            running_pairs: vec![],
            connection: None,
            generation: 1,
            taps: vec![0],
            endpoint: EndpointState {
                path: dir.join("vu.sock").display().to_string(),
                client: false,
                listener: Some(1),
                handoff: None,
            },
            requests: 0,
            report: ReportState::default(),
            carried: Vec::new(),
        };
        let tap_fd = tap.queues()[0].as_fd();
        type Case<'a> = (&'a str, SessionState, Vec<BorrowedFd<'a>>, &'a str);
        let mut cases: Vec<Case<'_>> = Vec::new();
        // 1. The vhost-user listener is an eventfd.
        cases.push((
            "listener",
            base.clone(),
            vec![tap_fd, not_listening.as_fd()],
            "a listening socket",
        ));
        // 2. A frontend connection whose RX kick fd is a pipe.
        let mut s = base.clone();
        s.endpoint.listener = None;
        s.connection = Some(1);
        s.vrings[0] = vring(Some(2), Some(3));
        cases.push((
            "kick",
            s,
            vec![tap_fd, conn.as_fd(), pipe_r.as_fd(), call.as_fd()],
            "an eventfd",
        ));
        // 3. A region longer than its memfd.
        let mut s = base.clone();
        s.endpoint.listener = None;
        s.connection = Some(1);
        s.regions = vec![session_blob::RegionState {
            guest_addr: 0,
            size: 1 << 20,
            user_addr: 0x7f00_0000_0000,
            mmap_offset: 0,
            fd: 2,
        }];
        cases.push((
            "region",
            s,
            vec![tap_fd, conn.as_fd(), short_region.as_fd()],
            "past the end of its file",
        ));
        // 4. A handoff listener bound elsewhere than the path the blob names (the successor
        //    would remove that path when it stops listening).
        let precious = dir.join("precious");
        std::fs::write(&precious, b"keep me").unwrap();
        let elsewhere = Listener::bind(&dir.join("elsewhere.sock")).unwrap();
        let mut s = base.clone();
        s.endpoint.listener = None;
        s.endpoint.handoff = Some((precious.display().to_string(), 1));
        cases.push((
            "handoff path",
            s,
            vec![tap_fd, elsewhere.as_fd()],
            "bound at",
        ));
        // 5. The control socket's listener, bound elsewhere than the blob says (the successor
        //    removes the control socket's path when it stops).
        let mut s = base.clone();
        s.endpoint.listener = None;
        s.report.control = Some((precious.display().to_string(), 1));
        cases.push((
            "control path",
            s,
            vec![tap_fd, elsewhere.as_fd()],
            "bound at",
        ));
        // 6. A metrics listener off loopback (this namespace's own, reachable by nobody), and
        //    one that is not a listening socket.
        let wide = std::net::TcpListener::bind(("0.0.0.0", 0)).unwrap();
        let mut s = base.clone();
        s.endpoint.listener = None;
        s.report.metrics = Some(1);
        cases.push((
            "metrics off loopback",
            s.clone(),
            vec![tap_fd, wide.as_fd()],
            "loopback",
        ));
        cases.push((
            "metrics not listening",
            s,
            vec![tap_fd, not_listening.as_fd()],
            "a listening socket",
        ));
        let listener = Listener::bind(&handoff).unwrap();
        for (name, state, fds, expect) in cases {
            let mut successor = Serve::spawn(&["--takeover", handoff.to_str().unwrap()]);
            let ch = listener.accept(Some(Duration::from_secs(10))).unwrap();
            let blob = session_blob::encode(&state).unwrap();
            match hand_off_state(&ch, &blob, &fds, Timeouts::default()).unwrap() {
                Outcome::RolledBack(MigrateError::Aborted(why)) => {
                    assert!(why.contains(expect), "{name}: {why}");
                }
                o => panic!("{name}: {o:?}"),
            }
            let status = successor.child.wait().unwrap();
            assert!(!status.success(), "{name}: the successor took it");
        }
        assert_eq!(std::fs::read(&precious).unwrap(), b"keep me");
        drop(listener);
        drop(elsewhere);
        drop(tap);
        std::fs::remove_dir_all(dir).ok();
    });
}

// ---------------------------------------------------------------------------------------
// 14. `tapir state inspect` of an endless file.
// ---------------------------------------------------------------------------------------

#[test]
fn state_inspect_of_dev_zero_is_bounded() {
    let start = Instant::now();
    let mut cmd = Command::new(EXE);
    cmd.args(["state", "inspect", "/dev/zero"]);
    // Should the read be unbounded, let it fail at 1 GiB instead of taking the machine down.
    // SAFETY: setrlimit is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            libc::setrlimit(libc::RLIMIT_AS, &lim);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("larger than the largest valid snapshot"),
        "{err}"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

// ---------------------------------------------------------------------------------------
// Item 4: a peer feeding fds one at a time gets one deadline for the phase, not one per fd.
// ---------------------------------------------------------------------------------------

#[test]
fn a_source_trickling_fds_meets_one_deadline_for_the_phase() {
    let (source, successor) = Channel::pair().unwrap();
    let mut opts = SuccessorOptions::new(EngineKind::Classic);
    opts.timeouts.prepare = Duration::from_secs(1);
    let start = Instant::now();
    let taker = std::thread::spawn(move || take_over(&successor, &opts));
    let h = source.recv(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(h.kind, protocol::HELLO);
    let layout = tapir_state::example_snapshot();
    let count = layout.fds.len();
    source
        .send(protocol::PREPARE, &tapir_state::encode(&layout), &[])
        .unwrap();
    // One fd every 300 ms: each well inside the 1 s timeout, all of them far beyond it.
    let mut aborted = None;
    for i in 0..count {
        std::thread::sleep(Duration::from_millis(300));
        let fd = eventfd();
        let first = u32::try_from(i).unwrap();
        if source
            .send(protocol::FDS, &first.to_le_bytes(), &[fd.as_fd()])
            .is_err()
        {
            break;
        }
        if let Ok(m) = source.recv(Some(Duration::ZERO)) {
            aborted = Some(m);
            break;
        }
    }
    let result = taker.join().unwrap();
    let elapsed = start.elapsed();
    match result {
        Err(MigrateError::Channel(ChannelError::Timeout(_))) => {}
        other => panic!(
            "the trickle was not cut off: {:?}",
            other.map(|t| t.generation)
        ),
    }
    assert!(
        elapsed < Duration::from_millis(1900),
        "{count} fds at 300 ms each: cut off after {elapsed:?}"
    );
    let m = aborted.or_else(|| source.recv(Some(Duration::from_secs(1))).ok());
    assert_eq!(m.map(|m| m.kind), Some(protocol::ABORT));
}

// ---------------------------------------------------------------------------------------
// Item 5: binding the handoff socket never unlinks a live socket.
// ---------------------------------------------------------------------------------------

#[test]
fn binding_never_unlinks_a_live_socket_or_a_file() {
    let dir = tmp("bind");
    // A live handoff socket: refused, and it still accepts.
    let live = dir.join("live.sock");
    let first = Listener::bind(&live).unwrap();
    let err = Listener::bind(&live).expect_err("bound over a live socket");
    assert!(err.to_string().contains("in use"), "{err}");
    let probe = std::thread::spawn({
        let live = live.clone();
        move || Channel::connect(&live).map(drop)
    });
    first
        .accept(Some(Duration::from_secs(5)))
        .expect("the live socket still accepts");
    probe.join().unwrap().unwrap();
    // A live socket of another kind (a stream listener): refused too.
    let stream = dir.join("stream.sock");
    let _stream_listener = UnixListener::bind(&stream).unwrap();
    assert!(Listener::bind(&stream).is_err());
    assert!(stream.exists());
    // Not a socket at all: refused, the file stays.
    let file = dir.join("file");
    std::fs::write(&file, b"precious").unwrap();
    let err = Listener::bind(&file).expect_err("bound over a regular file");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    // A stale socket file (nobody listening): replaced.
    let stale = dir.join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let replaced = Listener::bind(&stale).expect("a stale socket file is replaced");
    drop(replaced);
    drop(first);
    std::fs::remove_dir_all(dir).ok();
}

/// The fence of a state-only handoff (`tapir serve` with no device running): a successor
/// silent after STATE_ONLY is killed, and a RUNNING sent afterwards through a dup of its fd
/// does not make the daemon give its state away.
#[test]
fn a_running_through_a_dupd_fd_after_the_fence_does_not_take_serve_state() {
    common::in_netns("serve fence", || {
        let dir = tmp("serve-fence");
        let socket = dir.join("vu.sock");
        let handoff = dir.join("handoff.sock");
        let first = Serve::spawn(&[
            "--socket",
            socket.to_str().unwrap(),
            "--tap",
            TAP_NAME,
            "--handoff-socket",
            handoff.to_str().unwrap(),
        ]);
        first.wait_event("listening");
        std::thread::sleep(Duration::from_millis(100));
        let baseline = fd_count(first.pid());
        let (mut helper, ch) = spawn_connector(&handoff);
        ch.send(protocol::HELLO, &hello(helper.id()), &[]).unwrap();
        let offer = ch.recv(Some(Duration::from_secs(10))).unwrap();
        assert_eq!(offer.kind, protocol::STATE_ONLY);
        drop(offer);
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(s) = helper.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "the fence never fired");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
        let _ = ch.send(protocol::RUNNING, &[], &[]);
        drop(ch);
        first.wait_event("handoff_rolled_back");
        wait_fd_count(first.pid(), baseline, "after the fence");
        let fe = vhost::vhost_user::Frontend::connect(&socket, 2).unwrap();
        vhost::VhostBackend::get_features(&fe).expect("the daemon still answers");
        drop(fe);
        first.wait_event("disconnected");
        let second = Serve::spawn(&["--takeover", handoff.to_str().unwrap()]);
        second.wait_event("\"running\"");
        first.wait_event("handoff_committed");
        let mut first = first;
        assert!(first.child.wait().unwrap().success());
        drop(second);
        std::fs::remove_dir_all(dir).ok();
    });
}

// ---------------------------------------------------------------------------------------
// 11, with a device running in `tapir serve` (the full handoff path, not state alone).
// ---------------------------------------------------------------------------------------

#[test]
fn a_successor_sending_253_fds_leaks_nothing_in_a_running_tapir_serve() {
    for engine in common::engines() {
        common::in_netns(&format!("serve running {engine}"), || {
            let ctx = format!("{engine}");
            let dir = tmp(&format!("serve-running-{engine}"));
            let socket = dir.join("vu.sock");
            let handoff = dir.join("handoff.sock");
            let first = Serve::spawn(&[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                TAP_NAME,
                "--engine",
                &engine.to_string(),
                "--handoff-socket",
                handoff.to_str().unwrap(),
            ]);
            first.wait_event("listening");
            common::netns::sysctl_write(&format!("net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1")
                .ok();
            common::netns::link_up(TAP_NAME).unwrap();
            common::netns::add_addr(TAP_NAME, &format!("{HOST_IP}/24")).unwrap();
            let mut g = tapir_simguest::SimGuest::new(guest(1)).unwrap();
            let fe = common::daemon::attach(&socket, &g, 0);
            first.wait_event("\"running\":[0]");
            let (mut rx, mut tx) = g.take_pair(0);
            common::arp_round_trip_on(&mut rx, &mut tx, &format!("{ctx} before"));
            std::thread::sleep(Duration::from_millis(100));
            let baseline = fd_count(first.pid());
            for round in 0..3 {
                let ch = Channel::connect(&handoff).unwrap();
                let fds: Vec<OwnedFd> = (0..253).map(|_| eventfd()).collect();
                send_with_fds(&ch, protocol::HELLO, &hello(std::process::id()), &fds);
                expect_abort(&ch, "more than 250 fds", &format!("{ctx} round {round}"));
                drop(ch);
                first.wait_event("handoff_rolled_back");
                wait_fd_count(first.pid(), baseline, &format!("{ctx} round {round}"));
            }
            common::arp_round_trip_on(&mut rx, &mut tx, &format!("{ctx} after the floods"));
            // A real successor takes the running session over, and serves it.
            let second = Serve::spawn(&["--takeover", handoff.to_str().unwrap()]);
            let running = second.wait_event("\"running\"");
            assert!(running.contains("\"pairs\":[0]"), "{ctx}: {running}");
            first.wait_event("handoff_committed");
            let mut first = first;
            assert!(first.child.wait().unwrap().success(), "{ctx}");
            common::arp_round_trip_on(&mut rx, &mut tx, &format!("{ctx} after the handoff"));
            drop(fe);
            drop(second);
            std::fs::remove_dir_all(dir).ok();
        });
    }
}

/// The other direction: a source that sends 253 fds in one FDS chunk. The successor (`tapir
/// datapath`) refuses it with the reason, closes them, and exits; the source hears why.
#[test]
fn a_source_sending_253_fds_is_refused_by_the_successor() {
    let dir = tmp("source-flood");
    let socket = dir.join("source.sock");
    let listener = Listener::bind(&socket).unwrap();
    let child = Command::new(EXE)
        .args(["datapath", "--take-over"])
        .arg(&socket)
        .arg("--listen")
        .arg(dir.join("next.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ch = listener.accept(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(
        ch.recv(Some(Duration::from_secs(10))).unwrap().kind,
        protocol::HELLO
    );
    let layout = tapir_state::example_snapshot();
    ch.send(protocol::PREPARE, &tapir_state::encode(&layout), &[])
        .unwrap();
    let fds: Vec<OwnedFd> = (0..253).map(|_| eventfd()).collect();
    send_with_fds(&ch, protocol::FDS, &0u32.to_le_bytes(), &fds);
    expect_abort(&ch, "more than 250 fds", "successor");
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("more than 250 fds"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(listener);
    std::fs::remove_dir_all(dir).ok();
}

/// A launcher that hands a datapath to a child through a socket pair (`--channel-fd`): the
/// pair's peer credentials are the launcher's own, so the launcher declares the child it gave
/// the pair to (`Channel::expect_child`); the fence pins it, and the handoff commits to it.
#[test]
fn a_socket_pair_launch_pins_the_child_named_by_hello() {
    use tapir_datapath::DeviceConfig;
    use tapir_migrate::LaunchSource;
    run_in_new_netns(|| {
        let dir = tmp("pair-launch");
        let tap = tapir_testkit::host_tap(1, 1500).unwrap();
        let mut g = tapir_simguest::SimGuest::new(guest(1)).unwrap();
        let memory = tapir_testkit::guest_memory(&g).unwrap();
        let resources =
            vec![
                tapir_testkit::pair_resources(&g, 0, tap.into_queues().remove(0).into_fd())
                    .unwrap(),
            ];
        let config = DeviceConfig {
            mac: tapir_testkit::GUEST_MAC,
            ..DeviceConfig::new(g.features(), EngineKind::Uring)
        };
        let (mut mine, theirs) = Channel::pair().unwrap();
        let theirs_raw = theirs.as_raw_fd();
        let mut cmd = Command::new(EXE);
        cmd.args(["datapath", "--channel-fd", "3", "--listen"])
            .arg(dir.join("next.sock"))
            .stdout(Stdio::piped());
        // SAFETY: dup2 is async-signal-safe; the child gets its end as fd 3.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(theirs_raw, 3) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().unwrap();
        drop(theirs);
        mine.expect_child(&child).unwrap();
        let mut source = LaunchSource::new(config, memory, resources);
        let outcome = hand_off(&mut source, &mine, Timeouts::default()).unwrap();
        match outcome {
            Outcome::Committed(r) => {
                assert_eq!(r.successor_pid, i32::try_from(child.id()).unwrap());
            }
            o => panic!("launch through a socket pair: {o:?}"),
        }
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines
            .next()
            .is_some_and(|l| l.is_ok_and(|l| l.contains("\"running\""))));
        // Its SIGTERM handler goes in just after the running event.
        std::thread::sleep(Duration::from_millis(300));
        let _ = g.take_pair(0);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap()),
            nix::sys::signal::Signal::SIGTERM,
        );
        assert!(child.wait().unwrap().success());
        drop(source);
        std::fs::remove_dir_all(dir).ok();
    })
    .unwrap();
}

/// On a socket pair this process made, the peer credentials are the source's own, so they
/// cannot say who the successor is. A HELLO there that names some other process of this user
/// (here a bystander the test started, not given the pair) is refused at HELLO: the source
/// must never pin, and so never SIGKILL, a process it did not hand the pair to.
#[test]
fn a_socket_pair_hello_naming_an_undeclared_process_is_refused() {
    let mut bystander = Command::new("sleep").arg("60").spawn().unwrap();
    let named = bystander.id();
    let (mine, theirs) = Channel::pair().unwrap();
    let liar = std::thread::spawn(move || {
        theirs.send(protocol::HELLO, &hello(named), &[]).unwrap();
        // Silent from here on: a pinned fence would fire at the prepare deadline.
        let answer = theirs.recv(Some(Duration::from_secs(10)));
        answer.map(|m| (m.kind, String::from_utf8_lossy(&m.payload).into_owned()))
    });
    let t = Timeouts {
        prepare: Duration::from_millis(500),
        switch: Duration::from_millis(500),
    };
    let outcome = hand_off_state(&mine, b"state", &[], t).unwrap();
    let answer = liar.join().unwrap();
    let alive = bystander.try_wait().unwrap().is_none();
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(
        alive,
        "the source killed a process it never handed the pair to"
    );
    match outcome {
        Outcome::RolledBack(MigrateError::Peer(why)) => {
            assert!(why.contains("given to no child"), "refused with {why:?}");
        }
        o => panic!("a HELLO naming an undeclared pid: {o:?}"),
    }
    let (kind, why) = answer.unwrap();
    assert_eq!(kind, protocol::ABORT, "the liar got {kind} ({why})");
}
