//! The source side of a handoff (`tapir_migrate::hand_off` and `hand_off_state`) against a
//! fuzzer-controlled successor: the successor's whole script (up to 8 messages, each a kind,
//! a payload built from fuzzed fields or raw, and 0 to 3 real fds) is written into the peer
//! end of a real SEQPACKET socketpair, which then shuts down for writing, so the source reads
//! the script and then end of file (never a timeout: a timeout would make the source fence
//! the peer pid, which is this process). The source is a `HandoffSource` that records its
//! calls. Checks: nothing panics, `hand_off` never returns `Err` (the source never fails),
//! it commits only on exactly HELLO (version 2), PREPARED, READY, RUNNING (`hand_off_state`:
//! HELLO, RUNNING), never after a version-3 HELLO (a script cannot claim the ownership word,
//! and without a claim version 3 never commits), a source quiesced and not committed is resumed exactly once, and no fd
//! leaks (the fds the peer sent included).
//!
//! Input: mode (u8, bit 0: hand_off_state), then up to 8 messages: kind choice (u8: 0 HELLO,
//! 1 PREPARED, 2 READY, 3 RUNNING, 4 ABORT, else a raw kind byte), payload choice (u8: 0 the
//! right payload (HELLO: version 2 only), 1 for HELLO: versions 2 to 3, else raw u8-length
//! bytes), fd count (u8 % 4).
//!
//! The pid a raw HELLO names: the socket pair is made in this process and declared given to a
//! live child (`Channel::expect_child`), so the source accepts a HELLO naming that child or
//! this process, pins it and fences (SIGKILLs) the child when the script stops short; any
//! other pid is refused at HELLO. A raw HELLO's pid below 2^31 is replaced by one of four
//! (`pid % 4`): this target's own (in process, not killable), the live child (`cat`, killed
//! by the fence and respawned), a zombie child (not declared: refused) and a pid above
//! `pid_max` (no such process: refused). Pids of 2^31 and above stay as fuzzed (not a pid:
//! refused). Before the declaration existed (`fbf4fff`), a fuzzed pid could name any process
//! on the machine and the fence killed it.
#![no_main]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tapir_fuzz::{eventfd, fd_count, small_snapshot, Input};
use tapir_migrate::protocol::{self, Versions};
use tapir_migrate::{
    hand_off, hand_off_state, Channel, HandoffSource, MigrateError, Outcome, Timeouts,
};
use tapir_state::DeviceSnapshot;

/// Records what the protocol made it do.
struct Recorder {
    layout: DeviceSnapshot,
    fds: &'static [OwnedFd],
    quiesced: usize,
    resumed: usize,
}

impl HandoffSource for Recorder {
    fn layout(&self) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>) {
        (
            self.layout.clone(),
            self.fds.iter().map(AsFd::as_fd).collect(),
        )
    }
    fn quiesce(&mut self) -> Result<DeviceSnapshot, MigrateError> {
        assert_eq!(
            self.quiesced, self.resumed,
            "quiesced twice without a resume"
        );
        self.quiesced += 1;
        Ok(self.layout.clone())
    }
    fn resume(&mut self) -> Result<(), MigrateError> {
        assert_eq!(self.quiesced, self.resumed + 1, "resumed without a quiesce");
        self.resumed += 1;
        Ok(())
    }
}

/// The six fds of `small_snapshot`'s manifest (eventfds stand in: the source only sends them).
fn manifest_fds() -> &'static [OwnedFd] {
    static FDS: OnceLock<Vec<OwnedFd>> = OnceLock::new();
    FDS.get_or_init(|| (0..6).map(|_| eventfd()).collect())
}

/// A pid no process has: above the largest `pid_max` Linux allows (2^22).
const NO_SUCH_PID: u32 = 0x4000_0000;

/// A child process of this target, killed by the fence at will. Its stdin is a pipe from
/// this process, so a `cat` ends with the fuzzer whatever way that ends.
fn spawn_child(program: &str) -> Child {
    Command::new(program)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn a child")
}

/// The live child a raw HELLO may name: respawned when a fence killed it.
fn live_child() -> &'static Mutex<Child> {
    static CHILD: OnceLock<Mutex<Child>> = OnceLock::new();
    CHILD.get_or_init(|| Mutex::new(spawn_child("cat")))
}

/// A child that has exited and is never reaped (a zombie: `pidfd_open` works, it has exited).
fn zombie_pid() -> u32 {
    static ZOMBIE: OnceLock<u32> = OnceLock::new();
    *ZOMBIE.get_or_init(|| {
        let child = spawn_child("true");
        let pid = child.id();
        // Wait until it has exited without reaping it (waitid with WNOWAIT).
        let id = nix::sys::wait::Id::Pid(nix::unistd::Pid::from_raw(
            i32::try_from(pid).expect("a pid"),
        ));
        let flags = nix::sys::wait::WaitPidFlag::WEXITED | nix::sys::wait::WaitPidFlag::WNOWAIT;
        nix::sys::wait::waitid(id, flags).expect("the zombie child exits");
        std::mem::forget(child);
        pid
    })
}

/// The pid a raw HELLO's fuzzed `pid` stands for (see the module comment).
fn owned_pid(pid: u32) -> u32 {
    if i32::try_from(pid).is_err() {
        return pid;
    }
    match pid % 4 {
        0 => std::process::id(),
        1 => live_child().lock().expect("child lock").id(),
        2 => zombie_pid(),
        _ => NO_SUCH_PID,
    }
}

/// Respawns the live child if a fence killed it.
fn revive_child() {
    let mut child = live_child().lock().expect("child lock");
    if child.try_wait().expect("try_wait").is_some() {
        *child = spawn_child("cat");
    }
}

fuzz_target!(|data: &[u8]| {
    let manifest = manifest_fds();
    live_child();
    zombie_pid();
    let baseline = fd_count();
    {
        let mut input = Input::new(data);
        let state_only = input.u8() & 1 == 1;
        let (mut ours, theirs) = Channel::pair().expect("socketpair");
        // The pair is declared given to the live child, as a launcher declares the child it
        // spawned: the one pid besides this process's own that a HELLO may name.
        ours.expect_child(&live_child().lock().expect("child lock"))
            .expect("pidfd of the live child");
        let mut kinds = Vec::new();
        let mut hello_ok = Vec::new();
        while !input.is_empty() && kinds.len() < 8 {
            let kind = match input.u8() {
                0 => protocol::HELLO,
                1 => protocol::PREPARED,
                2 => protocol::READY,
                3 => protocol::RUNNING,
                4 => protocol::ABORT,
                k => k,
            };
            let v = |newest| Versions { oldest: 2, newest };
            let choice = input.u8();
            let payload = match choice {
                0 if kind == protocol::HELLO => v(2).hello(std::process::id()),
                1 if kind == protocol::HELLO => v(3).hello(std::process::id()),
                0 => Vec::new(),
                _ => {
                    let n = usize::from(input.u8());
                    let mut raw = input.bytes(n).to_vec();
                    if let Some(pid) = raw.get_mut(2..6).filter(|_| kind == protocol::HELLO) {
                        let named = u32::from_le_bytes([pid[0], pid[1], pid[2], pid[3]]);
                        pid.copy_from_slice(&owned_pid(named).to_le_bytes());
                    }
                    raw
                }
            };
            let fds: Vec<OwnedFd> = (0..input.u8() % 4).map(|_| eventfd()).collect();
            let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
            theirs
                .send(kind, &payload, &borrowed)
                .expect("the script fits the socket");
            // The version a HELLO makes the source agree on (none: refused).
            hello_ok.push(
                Versions::of_hello(&payload)
                    .ok()
                    .filter(|_| kind == protocol::HELLO)
                    .and_then(|(theirs, _)| Versions::spoken().agree(theirs).ok()),
            );
            kinds.push(kind);
        }
        // End of script: the source reads end of file after it.
        nix::sys::socket::shutdown(theirs.as_raw_fd(), nix::sys::socket::Shutdown::Write)
            .expect("shutdown");
        let t = Timeouts {
            prepare: Duration::from_secs(5),
            switch: Duration::from_secs(5),
        };
        if state_only {
            let blob = [1u8, 2, 3];
            let fds: Vec<BorrowedFd<'_>> = manifest.iter().map(AsFd::as_fd).collect();
            let outcome = hand_off_state(&ours, &blob, &fds, t).expect("hand_off_state");
            if let Outcome::Committed(_) = outcome {
                assert!(
                    matches!(hello_ok.first(), Some(Some(_)))
                        && kinds.get(1) == Some(&protocol::RUNNING),
                    "committed state on the script {kinds:?}"
                );
            }
        } else {
            let mut source = Recorder {
                layout: small_snapshot(16),
                fds: manifest,
                quiesced: 0,
                resumed: 0,
            };
            let outcome = hand_off(&mut source, &ours, t).expect("hand_off never fails here");
            if std::env::var_os("TAPIR_FUZZ_VERBOSE").is_some() {
                eprintln!("script {kinds:?}, outcome {outcome:?}");
            }
            match outcome {
                Outcome::Committed(_) => {
                    assert!(
                        hello_ok.first() == Some(&Some(2))
                            && kinds.get(1..4)
                                == Some(
                                    &[protocol::PREPARED, protocol::READY, protocol::RUNNING][..]
                                ),
                        "committed on the script {kinds:?}"
                    );
                    assert_eq!(
                        (source.quiesced, source.resumed),
                        (1, 0),
                        "committed: stays quiesced"
                    );
                }
                Outcome::RolledBack(_) => {
                    assert_eq!(
                        source.quiesced, source.resumed,
                        "rolled back: running again"
                    );
                }
            }
        }
    }
    assert_eq!(fd_count(), baseline, "fds leaked");
    revive_child();
});
