//! A hostile vhost-user frontend against a running `tapir serve` (issue 9): malformed
//! messages, fds of the wrong kind or too short, memory that shrinks under the daemon, sizes
//! and addresses at the edges of the address space, too many fds, a frontend that stalls, and
//! peers of another uid. Each case asserts its precise outcome (a failure reply, or the session
//! ended), then that the same daemon still serves a new frontend end to end (frames both ways)
//! and that its fd count is back at its baseline. Every case runs on both engines.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use common::raw::{Answer, Raw, F_PROTOCOL_FEATURES, GET_FEATURES, SET_FEATURES};
use common::{netns, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};
use tapir_simguest::SimGuest;
use tapir_testkit::vhost_frontend::{Negotiation, RegionOrder};
use vhost::vhost_user::Frontend;
use vhost::{VhostBackend, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");
const ENGINES: [&str; 2] = ["uring", "classic"];

// vhost-user request codes.
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const SET_VRING_ERR: u32 = 14;
const ADD_MEM_REG: u32 = 37;
const REM_MEM_REG: u32 = 38;

const F_LOG_ALL: u64 = 1 << 26;

/// `tapir serve` in the calling thread's namespace, killed (by pid) on drop.
struct Serve {
    child: Child,
    events: Receiver<String>,
    socket: PathBuf,
    baseline_fds: usize,
}

fn unique_path(what: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "tapir-hostile-{}-{}-{what}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ))
}

impl Serve {
    fn start(engine: &str, extra: &[&str]) -> Serve {
        let socket = unique_path("vu.sock");
        let path = socket.to_str().unwrap().to_owned();
        let mut args = vec!["--socket", &path, "--tap", TAP_NAME, "--engine", engine];
        args.extend_from_slice(extra);
        Serve::spawn(&args, socket)
    }

    fn spawn(args: &[&str], socket: PathBuf) -> Serve {
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
        let mut serve = Serve {
            child,
            events,
            socket,
            baseline_fds: 0,
        };
        serve.wait_event("listening");
        netns::sysctl_write(&format!("net/ipv6/conf/{TAP_NAME}/disable_ipv6"), "1").ok();
        netns::link_up(TAP_NAME).unwrap();
        netns::add_addr(TAP_NAME, &format!("{HOST_IP}/24")).unwrap();
        serve.baseline_fds = serve.fd_count();
        serve
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next event line containing `what` (panics after 10 s, or if the daemon died).
    fn wait_event(&mut self, what: &str) -> String {
        self.wait_event_for(what, Duration::from_secs(10))
    }

    fn wait_event_for(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(what) => return l,
                Ok(_) => continue,
                Err(_) => {
                    let status = self.child.try_wait().unwrap();
                    panic!("tapir serve never said {what:?} (exit status: {status:?})")
                }
            }
        }
    }

    fn assert_alive(&mut self, ctx: &str) {
        assert!(
            self.child.try_wait().unwrap().is_none(),
            "{ctx}: tapir serve died"
        );
    }

    fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// The daemon's fd count settles back at its baseline (sessions ended leave nothing).
    fn assert_fds_at_baseline(&mut self, ctx: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut now = self.fd_count();
        while now != self.baseline_fds && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = self.fd_count();
        }
        assert_eq!(
            now, self.baseline_fds,
            "{ctx}: the daemon has {now} fds, {} at the start",
            self.baseline_fds
        );
    }

    /// A rust-vmm frontend on a new connection, for cases that set up their own rings.
    fn connect(&self) -> Frontend {
        Frontend::from_stream(self.raw().s, 64)
    }

    fn raw(&self) -> Raw {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                    return Raw { s };
                }
                Err(e) if Instant::now() > deadline => panic!("connecting to tapir serve: {e}"),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// The ending every case shares: the session the case ran is over (`disconnected`), the
    /// daemon serves a new frontend end to end, and its fd count is back at the baseline.
    fn still_serves(&mut self, ctx: &str) {
        self.assert_alive(ctx);
        self.assert_fds_at_baseline(ctx);
        {
            let mut g = common::one_pair_guest();
            let _fe = attach(self.raw().s, &g, RegionOrder::Ascending);
            self.wait_event("\"running\":[0]");
            common::arp_round_trip(&mut g, ctx);
        }
        self.wait_event("disconnected");
        self.assert_fds_at_baseline(&format!("{ctx}, after the working session"));
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

fn u64s(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// A SET_MEM_TABLE body: (guest address, size, user address, mmap offset) per region.
fn mem_table(regions: &[(u64, u64, u64, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&u32::try_from(regions.len()).unwrap().to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    for &(g, s, u, o) in regions {
        b.extend_from_slice(&u64s(&[g, s, u, o]));
    }
    b
}

/// An ADD_MEM_REG / REM_MEM_REG body.
fn single_region(g: u64, s: u64, u: u64, o: u64) -> Vec<u8> {
    u64s(&[0, g, s, u, o])
}

fn memfd(len: u64) -> OwnedFd {
    tapir_testkit::memfd(len).unwrap()
}

/// Attaches the simulated guest over `stream` as the other tests do
/// ([`common::daemon::negotiation`]: guest-physical addresses, REPLY_ACK on every request),
/// with the memory table's regions in `order`.
fn attach(stream: UnixStream, guest: &SimGuest, order: RegionOrder) -> Frontend {
    let negotiation = Negotiation {
        region_order: order,
        ..common::daemon::negotiation(0)
    };
    common::daemon::attach_on(stream, guest, &negotiation)
}

/// Runs `case` on both engines, each in its own namespace with its own daemon.
fn on_both_engines(extra: &[&str], case: impl Fn(&mut Serve, &str) + Sync) {
    for engine in ENGINES {
        common::in_netns(engine, || {
            let mut serve = Serve::start(engine, extra);
            case(&mut serve, engine);
        });
    }
}

// ---------------------------------------------------------------------------------------
// Item 3: fds too short for what is mapped from them.

#[test]
fn regions_beyond_the_end_of_their_file_are_refused() {
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(0);
        let fd = memfd(0x10000);
        // A region longer than its file.
        fe.refused(
            SET_MEM_TABLE,
            &mem_table(&[(0, 0x20000, 0x7000_0000, 0)]),
            &[fd.as_fd()],
            &format!("{engine}: region longer than its fd"),
        );
        // An mmap offset past the end of the file.
        fe.refused(
            SET_MEM_TABLE,
            &mem_table(&[(0, 0x1000, 0x7000_0000, 0x20000)]),
            &[fd.as_fd()],
            &format!("{engine}: offset past EOF"),
        );
        // The same through ADD_MEM_REG.
        fe.refused(
            ADD_MEM_REG,
            &single_region(0, 0x10000, 0x7000_0000, 0x1000),
            &[fd.as_fd()],
            &format!("{engine}: ADD_MEM_REG past EOF"),
        );
        // Not a file at all.
        let efd = EventFd::new(0).unwrap();
        // SAFETY: borrowed for the call; `efd` outlives it.
        let efd_fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
        fe.refused(
            SET_MEM_TABLE,
            &mem_table(&[(0, 0x1000, 0x7000_0000, 0)]),
            &[efd_fd],
            &format!("{engine}: an eventfd as memory"),
        );
        fe.still_answers(engine);
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

#[test]
fn a_dirty_log_longer_than_its_file_ends_the_session() {
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(F_LOG_ALL);
        let mem = memfd(0x10000);
        fe.accepted(
            SET_MEM_TABLE,
            &mem_table(&[(0, 0x10000, 0x7000_0000, 0)]),
            &[mem.as_fd()],
            engine,
        );
        let log = memfd(0x1000);
        // SET_LOG_BASE's reply carries data: a refusal ends the session.
        fe.send(SET_LOG_BASE, false, &u64s(&[0x10000, 0]), &[log.as_fd()]);
        fe.closed(&format!("{engine}: a 64 KiB log in a 4 KiB file"));
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

/// An fd that can still shrink (an unsealed memfd): truncated under a running session with
/// traffic, the daemon's next touch of guest memory faults. The session ends; the daemon lives.
#[test]
fn guest_memory_truncated_under_traffic_ends_the_session_not_the_daemon() {
    on_both_engines(&[], |serve, engine| {
        let mut g = common::one_pair_guest();
        let fe = attach(serve.raw().s, &g, RegionOrder::Ascending);
        serve.wait_event("\"running\":[0]");
        common::arp_round_trip(&mut g, engine);
        let regions = g.regions();
        let kicks: Vec<RawFd> = g.queues().iter().map(|q| q.kick_fd).collect();
        // From here on this process must not touch the guest's memory either.
        for r in &regions {
            // SAFETY: ftruncate on the guest's memfd, which `g` keeps open.
            assert_eq!(unsafe { libc::ftruncate(r.fd, 0) }, 0);
        }
        // Traffic: the guest kicks both rings, and the host sends frames towards it.
        let host = std::net::UdpSocket::bind((HOST_IP, 0)).unwrap();
        netns::add_neigh(
            &GUEST_IP.to_string(),
            &netns::format_mac(GUEST_MAC),
            TAP_NAME,
        )
        .ok();
        let broken = Instant::now();
        let mut ended = None;
        while broken.elapsed() < Duration::from_secs(10) {
            for &k in &kicks {
                // SAFETY: writing 8 bytes to an eventfd the guest owns.
                unsafe { libc::write(k, 1u64.to_ne_bytes().as_ptr().cast(), 8) };
            }
            let _ = host.send_to(&[0u8; 100], (GUEST_IP, 9));
            if let Ok(l) = serve.events.recv_timeout(Duration::from_millis(20)) {
                if l.contains("memory_broken") {
                    ended = Some(l);
                    break;
                }
            }
        }
        let line = ended.unwrap_or_else(|| {
            serve.assert_alive(engine);
            panic!("{engine}: the session on truncated memory never ended")
        });
        assert!(line.contains("memory_broken"), "{line}");
        serve.wait_event("disconnected");
        serve.assert_alive(engine);
        std::mem::forget(g); // its mapping is of a truncated file: leave it alone.
        drop(fe);
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Item 4: sizes that would make the daemon allocate without bound.

#[test]
fn huge_regions_are_refused() {
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(0);
        // A sparse memfd as large as the region, so that only the size itself is wrong.
        let big = memfd(1 << 62);
        fe.refused(
            SET_MEM_TABLE,
            &mem_table(&[(0, 1 << 62, 0x1000_0000_0000, 0)]),
            &[big.as_fd()],
            &format!("{engine}: a 2^62-byte region"),
        );
        fe.refused(
            ADD_MEM_REG,
            &single_region(0, 1 << 62, 0x1000_0000_0000, 0),
            &[big.as_fd()],
            &format!("{engine}: ADD_MEM_REG of 2^62 bytes"),
        );
        // Each region acceptable, the sum not (1 TiB is the limit).
        let half = (1u64 << 39) + 0x1000;
        fe.refused(
            SET_MEM_TABLE,
            &mem_table(&[
                (0, half, 0x1000_0000_0000, 0),
                (half, half, 0x2000_0000_0000, half),
            ]),
            &[big.as_fd(), big.as_fd()],
            &format!("{engine}: two regions of 512 GiB + 4 KiB"),
        );
        fe.still_answers(engine);
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Item 5: a region at the top of the address space, with the dirty log on.

#[test]
fn a_region_ending_at_the_top_of_the_address_space_does_not_hang_the_log() {
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(F_LOG_ALL);
        let mem = memfd(0x10000);
        // Ends at 2^64 - 1: stepping a page at a time from its start wraps past the end.
        fe.accepted(
            SET_MEM_TABLE,
            &mem_table(&[(u64::MAX - 0xffff, 0xffff, 0x7000_0000, 0)]),
            &[mem.as_fd()],
            engine,
        );
        let log = memfd(0x1000);
        fe.send(SET_LOG_BASE, false, &u64s(&[0x1000, 0]), &[log.as_fd()]);
        assert!(matches!(fe.answer(), Answer::Reply(b) if b.len() == 16));
        // Stopping a ring while logging marks all of guest memory dirty.
        fe.s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        fe.send(GET_VRING_BASE, false, &[0u8; 8], &[]);
        assert!(
            matches!(fe.answer(), Answer::Reply(b) if b.len() == 8),
            "{engine}: GET_VRING_BASE did not come back"
        );
        fe.still_answers(engine);
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Item 6: fds beyond the control buffer, and running out of fds.

#[test]
fn fds_beyond_what_a_message_may_carry_are_all_closed() {
    on_both_engines(&[], |serve, engine| {
        let efd = EventFd::new(0).unwrap();
        for round in 0..3 {
            let fe = serve.raw();
            // SAFETY: borrowed for the call; `efd` outlives it.
            let one = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
            let many = vec![one; 100];
            fe.send(SET_VRING_CALL, false, &0u64.to_ne_bytes(), &many);
            let mut fe = fe;
            fe.closed(&format!("{engine}: 100 fds, round {round}"));
            serve.wait_event("disconnected");
            serve.assert_fds_at_baseline(&format!("{engine}: after 100 fds, round {round}"));
        }
        serve.still_serves(engine);
    });
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `after` starts at field 3.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn set_nofile(pid: u32, soft: u64) -> u64 {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    assert_eq!(
        // SAFETY: reading the limit into `old`.
        unsafe {
            libc::prlimit(
                i32::try_from(pid).unwrap(),
                libc::RLIMIT_NOFILE,
                std::ptr::null(),
                &mut old,
            )
        },
        0
    );
    let new = libc::rlimit {
        rlim_cur: soft,
        rlim_max: old.rlim_max,
    };
    assert_eq!(
        // SAFETY: setting the daemon's (our child's) soft limit.
        unsafe {
            libc::prlimit(
                i32::try_from(pid).unwrap(),
                libc::RLIMIT_NOFILE,
                &new,
                std::ptr::null_mut(),
            )
        },
        0
    );
    old.rlim_cur
}

#[test]
fn accept_at_the_fd_limit_backs_off_and_the_daemon_recovers() {
    on_both_engines(&[], |serve, engine| {
        let pid = serve.pid();
        // No new fd fits under a limit of 3 (0, 1 and 2 are taken): accept fails with EMFILE.
        let old = set_nofile(pid, 3);
        let waiting = UnixStream::connect(&serve.socket).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(2));
        let spent = cpu_ticks(pid) - before;
        set_nofile(pid, old);
        // Clock ticks are 10 ms: a busy loop would spend ~200 in 2 s.
        assert!(spent < 20, "{engine}: {spent} ticks of CPU at EMFILE");
        drop(waiting);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Items 7 and 8: kick, call and error fds that are not eventfds.

#[test]
fn kick_call_and_err_fds_that_are_not_eventfds_are_refused() {
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(0);
        let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
        let (sock, _peer) = UnixStream::pair().unwrap();
        let mem = memfd(0x1000);
        let fds: [(&str, BorrowedFd<'_>); 3] = [
            ("a pipe", pipe_r.as_fd()),
            ("a socket", sock.as_fd()),
            ("a memfd", mem.as_fd()),
        ];
        for (code, name) in [
            (SET_VRING_KICK, "kick"),
            (SET_VRING_CALL, "call"),
            (SET_VRING_ERR, "err"),
        ] {
            for (what, fd) in &fds {
                fe.refused(
                    code,
                    &0u64.to_ne_bytes(),
                    &[*fd],
                    &format!("{engine}: {what} as the {name} fd"),
                );
            }
        }
        fe.still_answers(engine);
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Item 9: valid input refused, refused input kept.

#[test]
fn descending_regions_are_taken_and_a_refused_region_is_not_kept() {
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(0);
        let mem = memfd(0x20000);
        fe.accepted(
            SET_MEM_TABLE,
            &mem_table(&[
                (0x10_0000, 0x10000, 0x7000_0010_0000, 0x10000),
                (0, 0x10000, 0x7000_0000_0000, 0),
            ]),
            &[mem.as_fd(), mem.as_fd()],
            &format!("{engine}: disjoint regions in descending order"),
        );
        // Overlaps the first region: refused, and then not in the table.
        let overlapping = single_region(0x8000, 0x10000, 0x7000_0020_0000, 0);
        fe.refused(
            ADD_MEM_REG,
            &overlapping,
            &[mem.as_fd()],
            &format!("{engine}: an overlapping region"),
        );
        fe.refused(
            REM_MEM_REG,
            &overlapping,
            &[mem.as_fd()],
            &format!("{engine}: removing the refused region"),
        );
        fe.accepted(
            REM_MEM_REG,
            &single_region(0, 0x10000, 0x7000_0000_0000, 0),
            &[mem.as_fd()],
            &format!("{engine}: removing a real region"),
        );
        drop(fe);
        serve.wait_event("disconnected");
        // A real guest whose regions come in descending order.
        {
            let mut g = common::one_pair_guest();
            let _fe = attach(serve.raw().s, &g, RegionOrder::Descending);
            serve.wait_event("\"running\":[0]");
            common::arp_round_trip(&mut g, &format!("{engine}: descending regions"));
        }
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Item 10: a frontend that stalls.

#[test]
fn a_frontend_that_stops_mid_message_is_dropped() {
    on_both_engines(&["--frontend-timeout", "1.5"], |serve, engine| {
        let mut fe = serve.raw();
        fe.s.write_all(&GET_FEATURES.to_ne_bytes()).unwrap();
        fe.s.write_all(&1u32.to_ne_bytes()[..2]).unwrap();
        let start = Instant::now();
        serve.wait_event("disconnected");
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(1000) && took < Duration::from_secs(8),
            "{engine}: dropped after {took:?}"
        );
        fe.closed(engine);
        // A header followed by half a body.
        let mut fe = serve.raw();
        fe.send(SET_FEATURES, false, &[], &[]);
        let mut msg: Vec<u8> = [SET_FEATURES, 1, 8]
            .iter()
            .flat_map(|w| w.to_ne_bytes())
            .collect();
        msg.extend_from_slice(&[0u8; 3]);
        fe.s.write_all(&msg).unwrap();
        serve.wait_event("disconnected");
        fe.closed(engine);
        serve.still_serves(engine);
    });
}

#[test]
fn a_frontend_that_never_reads_its_replies_is_dropped() {
    on_both_engines(&["--frontend-timeout", "1.5"], |serve, engine| {
        let fe = serve.raw();
        let writer = fe.s.try_clone().unwrap();
        writer
            .set_write_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let flood = std::thread::spawn(move || {
            let msg: Vec<u8> = [GET_FEATURES, 1, 0]
                .iter()
                .flat_map(|w| w.to_ne_bytes())
                .collect();
            let mut w = writer;
            let mut sent = 0u64;
            while w.write_all(&msg).is_ok() {
                sent += 1;
            }
            sent
        });
        serve.wait_event_for("disconnected", Duration::from_secs(30));
        let sent = flood.join().unwrap();
        // The daemon stopped reading once its replies filled the socket, and waited no longer
        // than its timeout for them to leave.
        assert!(sent > 100, "{engine}: only {sent} requests before the end");
        drop(fe);
        serve.still_serves(engine);
    });
}

// ---------------------------------------------------------------------------------------
// Access control: the socket's mode, and peers of another uid.

const NOBODY: u32 = 65534;

/// Runs `f` in a forked child as uid `NOBODY`; returns its exit code. The child only makes
/// system calls (async-signal-safe) before `_exit`.
fn as_nobody(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only calls setgid/setuid, socket calls and _exit.
    match unsafe { libc::fork() } {
        -1 => panic!("fork: {}", std::io::Error::last_os_error()),
        0 => {
            // SAFETY: plain system calls in the child.
            let code = unsafe {
                if libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                    100
                } else {
                    f()
                }
            };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(libc::WIFEXITED(status), "child status {status:#x}");
            libc::WEXITSTATUS(status)
        }
    }
}

/// The `sockaddr_un` of `path`, built before a fork (the child allocates nothing).
fn sockaddr_of(path: &Path) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain data; zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap();
    for (d, s) in addr.sun_path.iter_mut().zip(cpath(path).to_bytes()) {
        *d = s.cast_signed();
    }
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap();
    (addr, len)
}

/// Connects to `addr` with plain system calls (fit for a forked child).
fn raw_connect(addr: &(libc::sockaddr_un, libc::socklen_t)) -> Result<OwnedFd, i32> {
    // SAFETY: plain socket calls on a filled-in sockaddr_un.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(*libc::__errno_location());
        }
        if libc::connect(fd, (&raw const addr.0).cast(), addr.1) != 0 {
            let e = *libc::__errno_location();
            libc::close(fd);
            return Err(e);
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.to_str().unwrap()).unwrap()
}

/// Child outcome codes.
const CONNECT_REFUSED_EACCES: i32 = 10;
const CLOSED_BY_DAEMON: i32 = 11;
const ANSWERED: i32 = 12;

fn nobody_tries(path: &Path) -> i32 {
    let addr = sockaddr_of(path);
    as_nobody(move || match raw_connect(&addr) {
        Err(libc::EACCES) => CONNECT_REFUSED_EACCES,
        Err(e) => 50 + e,
        Ok(fd) => {
            // GET_FEATURES: a daemon that serves us answers; a refusing one closes.
            let msg: [u32; 3] = [GET_FEATURES, 1, 0];
            let mut b = [0u8; 20];
            // SAFETY: plain reads and writes on our socket.
            unsafe {
                libc::write(fd.as_raw_fd(), msg.as_ptr().cast(), 12);
                match libc::read(fd.as_raw_fd(), b.as_mut_ptr().cast(), 20) {
                    n if n > 0 => ANSWERED,
                    _ => CLOSED_BY_DAEMON,
                }
            }
        }
    })
}

#[test]
fn the_socket_is_private_and_peers_of_other_uids_are_refused() {
    use std::os::unix::fs::PermissionsExt;
    on_both_engines(&[], |serve, engine| {
        let mode = std::fs::metadata(&serve.socket)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{engine}: socket mode {mode:o}");
        assert_eq!(
            nobody_tries(&serve.socket),
            CONNECT_REFUSED_EACCES,
            "{engine}"
        );
        serve.still_serves(engine);
    });
    // A socket opened to everyone: the uid check refuses the peer, the daemon goes on.
    on_both_engines(&["--socket-mode", "0666"], |serve, engine| {
        let mode = std::fs::metadata(&serve.socket)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o666, "{engine}: socket mode {mode:o}");
        assert_eq!(nobody_tries(&serve.socket), CLOSED_BY_DAEMON, "{engine}");
        let refused = serve.wait_event("peer_refused");
        assert!(refused.contains(&format!("\"uid\":{NOBODY}")), "{refused}");
        serve.still_serves(engine);
    });
    // Widened to a group and allowed explicitly, the same peer is served.
    on_both_engines(
        &[
            "--socket-mode",
            "0660",
            "--socket-group",
            "65534",
            "--allow-uid",
            "65534",
            "--allow-uid",
            "0",
        ],
        |serve, engine| {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&serve.socket).unwrap();
            assert_eq!(meta.mode() & 0o777, 0o660, "{engine}");
            assert_eq!(meta.gid(), NOBODY, "{engine}: socket group");
            assert_eq!(nobody_tries(&serve.socket), ANSWERED, "{engine}");
            serve.wait_event("disconnected");
            serve.still_serves(engine);
        },
    );
}

/// In client mode the peer is the frontend's listener: one of another uid is refused (and
/// the daemon keeps trying), then the real frontend is served.
#[test]
fn in_client_mode_a_listener_of_another_uid_is_refused() {
    for engine in ENGINES {
        common::in_netns(engine, || {
            let dir = unique_path("client-dir");
            std::fs::create_dir(&dir).unwrap();
            std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))
                .unwrap();
            let socket = dir.join("fe.sock");
            let c = cpath(&socket);
            let addr = sockaddr_of(&socket);
            // The hostile listener: uid nobody, accepts one connection, waits for it to close.
            let (ready_r, ready_w) = nix::unistd::pipe().unwrap();
            // SAFETY: the child only makes system calls and _exits.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                // SAFETY: plain system calls in the child.
                unsafe {
                    if libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                        libc::_exit(100);
                    }
                    let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                    // World-writable: a sandboxed daemon has no CAP_DAC_OVERRIDE, and the
                    // point is the uid check, not the file mode.
                    if libc::bind(fd, (&raw const addr.0).cast(), addr.1) != 0
                        || libc::chmod(c.as_ptr(), 0o666) != 0
                        || libc::listen(fd, 4) != 0
                    {
                        libc::_exit(101);
                    }
                    libc::write(ready_w.as_raw_fd(), [1u8].as_ptr().cast(), 1);
                    let conn = libc::accept(fd, std::ptr::null_mut(), std::ptr::null_mut());
                    if conn < 0 {
                        libc::_exit(102);
                    }
                    let mut b = [0u8; 64];
                    let code = match libc::read(conn, b.as_mut_ptr().cast(), 64) {
                        0 => CLOSED_BY_DAEMON,
                        _ => ANSWERED,
                    };
                    libc::unlink(c.as_ptr());
                    libc::_exit(code);
                }
            }
            drop(ready_w);
            let mut b = [0u8; 1];
            nix::unistd::read(&ready_r, &mut b).unwrap();
            let mut serve = Serve::spawn(
                &[
                    "--socket",
                    socket.to_str().unwrap(),
                    "--client",
                    "--tap",
                    TAP_NAME,
                    "--engine",
                    engine,
                ],
                socket.clone(),
            );
            let refused = serve.wait_event("peer_refused");
            assert!(refused.contains(&format!("\"uid\":{NOBODY}")), "{refused}");
            let mut status = 0;
            // SAFETY: waiting for our own child.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert_eq!(libc::WEXITSTATUS(status), CLOSED_BY_DAEMON, "{engine}");
            // The real frontend (our uid) listens now and is served.
            let _ = std::fs::remove_file(&socket);
            let listener = UnixListener::bind(&socket).unwrap();
            let (stream, _) = listener.accept().unwrap();
            serve.wait_event("connected");
            let mut g = common::one_pair_guest();
            let fe = attach(stream, &g, RegionOrder::Ascending);
            serve.wait_event("\"running\":[0]");
            common::arp_round_trip(&mut g, &format!("{engine}: client mode"));
            drop(fe);
            drop(serve);
            let _ = std::fs::remove_dir_all(&dir);
        });
    }
}

// ---------------------------------------------------------------------------------------
// Others of the same kind: frontend-controlled indices, counts, sizes and addresses.

#[test]
fn hostile_indices_counts_and_sizes_are_refused_and_the_session_goes_on() {
    const SET_VRING_NUM: u32 = 8;
    const SET_VRING_BASE: u32 = 10;
    const SET_VRING_ENABLE: u32 = 18;
    const GET_CONFIG: u32 = 24;
    const SET_CONFIG: u32 = 25;
    const GET_INFLIGHT_FD: u32 = 31;
    const SET_INFLIGHT_FD: u32 = 32;
    on_both_engines(&[], |serve, engine| {
        let mut fe = serve.raw();
        fe.negotiate(0);
        let mem = memfd(0x1000);
        let efd = EventFd::new(0).unwrap();
        // SAFETY: borrowed for the calls; `efd` outlives them.
        let efd_fd = unsafe { BorrowedFd::borrow_raw(efd.as_raw_fd()) };
        let vring_state = |index: u32, num: u32| {
            let mut b = index.to_ne_bytes().to_vec();
            b.extend_from_slice(&num.to_ne_bytes());
            b
        };
        let mut table_claims = u32::MAX.to_ne_bytes().to_vec();
        table_claims.extend_from_slice(&[0u8; 4 + 32]);
        let cases: Vec<(&str, u32, Vec<u8>, Vec<BorrowedFd<'_>>)> = vec![
            (
                "vring index 255",
                SET_VRING_NUM,
                vring_state(255, 256),
                vec![],
            ),
            (
                "vring index u32::MAX",
                SET_VRING_BASE,
                vring_state(u32::MAX, 0),
                vec![],
            ),
            ("ring size 0", SET_VRING_NUM, vring_state(0, 0), vec![]),
            (
                "ring size 65536",
                SET_VRING_NUM,
                vring_state(0, 65536),
                vec![],
            ),
            (
                "enable state 2",
                SET_VRING_ENABLE,
                vring_state(0, 2),
                vec![],
            ),
            (
                "kick of vring 255",
                SET_VRING_KICK,
                0xffu64.to_ne_bytes().to_vec(),
                vec![efd_fd],
            ),
            (
                "kick flag and fds disagree",
                SET_VRING_KICK,
                0x100u64.to_ne_bytes().to_vec(),
                vec![efd_fd],
            ),
            (
                "a table claiming 2^32-1 regions",
                SET_MEM_TABLE,
                table_claims,
                vec![mem.as_fd()],
            ),
            (
                "33 regions (with 32 fds: more end the session, see above)",
                SET_MEM_TABLE,
                mem_table(&vec![(0, 0x1000, 0, 0); 33]),
                vec![mem.as_fd(); 32],
            ),
            (
                "a region of size 0",
                SET_MEM_TABLE,
                mem_table(&[(0, 0, 0, 0)]),
                vec![mem.as_fd()],
            ),
            (
                "a region wrapping the address space",
                SET_MEM_TABLE,
                mem_table(&[(u64::MAX - 0xfff, 0x2000, 0, 0)]),
                vec![mem.as_fd()],
            ),
            (
                "config space at offset 2^32-1",
                GET_CONFIG,
                [u32::MAX, u32::MAX, 0]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect(),
                vec![],
            ),
            (
                "a config write of 2^32-1 bytes",
                SET_CONFIG,
                [0, u32::MAX, 0]
                    .iter()
                    .flat_map(|w| w.to_ne_bytes())
                    .collect(),
                vec![],
            ),
            (
                "inflight region of 2^64-1 bytes",
                GET_INFLIGHT_FD,
                u64s(&[u64::MAX, 0, 0xffff_ffff_ffff]),
                vec![],
            ),
            (
                "inflight fd",
                SET_INFLIGHT_FD,
                u64s(&[u64::MAX, 0, 0xffff_ffff_ffff]),
                vec![mem.as_fd()],
            ),
            ("an unknown request", 9999, vec![], vec![]),
            (
                "fds on a request that takes none",
                SET_FEATURES,
                F_PROTOCOL_FEATURES.to_ne_bytes().to_vec(),
                vec![efd_fd],
            ),
        ];
        for (what, code, body, fds) in &cases {
            fe.refused(*code, body, fds, &format!("{engine}: {what}"));
        }
        fe.still_answers(engine);
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

/// Ring addresses the frontend gives that lie (partly) outside guest memory: the pair does
/// not start (a failure reply for the request that would have started it), and a corrected
/// address starts it.
#[test]
fn rings_outside_guest_memory_are_refused() {
    on_both_engines(&[], |serve, engine| {
        let mut g = common::one_pair_guest();
        let fe = attach(serve.raw().s, &g, RegionOrder::Ascending);
        serve.wait_event("\"running\":[0]");
        let rings_end = g
            .regions()
            .iter()
            .map(|r| r.guest_addr + r.size)
            .min()
            .unwrap();
        let rx = g.rx_queue(0);
        let good = VringConfigData {
            queue_max_size: rx.size,
            queue_size: rx.size,
            flags: 0,
            desc_table_addr: rx.desc_table,
            used_ring_addr: rx.used_ring,
            avail_ring_addr: rx.avail_ring,
            log_addr: None,
        };
        let bad = [
            (
                "a descriptor table running past its region",
                VringConfigData {
                    desc_table_addr: rings_end - 16,
                    ..good
                },
            ),
            (
                "a used ring in no region",
                VringConfigData {
                    used_ring_addr: 0x8000_0000,
                    ..good
                },
            ),
            (
                "an avail ring at the top of the address space",
                VringConfigData {
                    avail_ring_addr: u64::MAX - 1,
                    ..good
                },
            ),
            (
                "a misaligned used ring",
                VringConfigData {
                    used_ring_addr: rx.used_ring + 1,
                    ..good
                },
            ),
        ];
        for (what, cfg) in &bad {
            assert!(
                fe.set_vring_addr(0, cfg).is_err(),
                "{engine}: {what} accepted"
            );
        }
        fe.set_vring_addr(0, &good).unwrap();
        serve.wait_event("\"running\":[0]");
        common::arp_round_trip(&mut g, &format!("{engine}: corrected ring address"));
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}

/// In client mode, a frontend listener that never accepts (its backlog full) must not block
/// the daemon in `connect`: its handoff socket is still served, and a successor takes it over.
#[test]
fn in_client_mode_a_listener_that_never_accepts_does_not_block_the_daemon() {
    for engine in ENGINES {
        common::in_netns(engine, || {
            let socket = unique_path("full-backlog.sock");
            let handoff = unique_path("full-backlog.handoff");
            let addr = sockaddr_of(&socket);
            // SAFETY: a listening socket with a backlog of 0, filled by our own connects.
            let listener = unsafe {
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0);
                assert_eq!(libc::bind(fd, (&raw const addr.0).cast(), addr.1), 0);
                assert_eq!(libc::listen(fd, 0), 0);
                OwnedFd::from_raw_fd(fd)
            };
            let mut fillers = Vec::new();
            loop {
                let s = nix::sys::socket::socket(
                    nix::sys::socket::AddressFamily::Unix,
                    nix::sys::socket::SockType::Stream,
                    nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                    None,
                )
                .unwrap();
                let ua = nix::sys::socket::UnixAddr::new(&socket).unwrap();
                match nix::sys::socket::connect(s.as_raw_fd(), &ua) {
                    Ok(()) => fillers.push(s),
                    Err(nix::errno::Errno::EAGAIN) => break,
                    Err(e) => panic!("filling the backlog: {e}"),
                }
                assert!(fillers.len() < 64, "the backlog never filled");
            }
            let mut first = Serve::spawn(
                &[
                    "--socket",
                    socket.to_str().unwrap(),
                    "--client",
                    "--tap",
                    TAP_NAME,
                    "--engine",
                    engine,
                    "--handoff-socket",
                    handoff.to_str().unwrap(),
                ],
                socket.clone(),
            );
            std::thread::sleep(Duration::from_millis(500));
            let mut second = Command::new(TAPIR)
                .args(["serve", "--takeover", handoff.to_str().unwrap()])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let out = BufReader::new(second.stdout.take().unwrap());
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for l in out.lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
            let running = rx.recv_timeout(Duration::from_secs(10));
            let _ = second.kill();
            let _ = second.wait();
            let running = running.unwrap_or_else(|_| {
                panic!("{engine}: the successor was never served (the daemon is stuck in connect)")
            });
            assert!(running.contains("\"running\""), "{running}");
            first.wait_event("handoff_committed");
            drop(fillers);
            drop(listener);
            let _ = std::fs::remove_file(&handoff);
        });
    }
}

// Guest memory on hugetlbfs and in a sealed memfd (item 3).
#[path = "hostile_frontend/shrinkable_memory.rs"]
mod shrinkable_memory;
