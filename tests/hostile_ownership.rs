//! Hostile and failing successors in version 3 of the handoff protocol (one message in the
//! blackout, ownership decided by the shared ownership word; `docs/HANDOFF.md`, "Version 3").
//! The successor is played by this test through a helper process (so that the source's fence
//! kills the helper, not the test) against a real `tapir datapath` source under traffic. Each
//! case checks the outcome, then that the source still serves, hands off to a real successor,
//! and has its fd count back at its baseline.
//!
//! A successor that dies after the switch message (before claiming) and one that claims but
//! never acknowledges are played by real `tapir datapath` successors in `tests/handoff.rs`
//! (`successor_death_at_every_phase_rolls_back`,
//! `a_successor_that_never_acknowledges_but_claimed_owns_the_device`).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use tapir_migrate::ownership::{Owner, OwnershipWord};
use tapir_migrate::{protocol, Channel};
use tapir_simguest::GuestConfig;
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{ChildOptions, HandoffRig, SteadyTraffic};

const EXE: &str = env!("CARGO_BIN_EXE_tapir");
const HELPER: &str = "helper_process_connects_and_passes_its_channel";

/// Not a test of its own: the body of the helper process (see `common::peer`).
#[test]
fn helper_process_connects_and_passes_its_channel() {
    common::peer::run_helper_if_asked();
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(Iterator::count)
        .unwrap_or(0)
}

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

/// Plays a version-3 successor (real peer process `pid`) through the prepare phase: HELLO,
/// VERSION, PREPARE, FDS, EXTENSION, OWNERSHIP. Returns the mapped word and the attempt.
fn play_until_prepared(ch: &Channel, pid: u32) -> (OwnershipWord, u32) {
    let t = Some(Duration::from_secs(10));
    let v3 = protocol::Versions {
        oldest: 3,
        newest: 3,
    };
    ch.send(protocol::HELLO, &v3.hello(pid), &[]).unwrap();
    let version = ch.recv(t).unwrap();
    assert_eq!(version.kind, protocol::VERSION);
    assert_eq!(version.payload, 3u16.to_le_bytes());
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
    let mut own = ch.recv(t).unwrap();
    assert_eq!(own.kind, protocol::OWNERSHIP);
    let attempt = u32::from_le_bytes(own.payload.get(..4).unwrap().try_into().unwrap());
    let word = OwnershipWord::adopt(own.fds.pop().unwrap()).unwrap();
    assert_eq!(word.load(), Owner::Source, "the word before the switch");
    (word, attempt)
}

/// Waits until the fence killed the helper.
fn assert_fenced(helper: &mut Child, ctx: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = helper.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{ctx}: the fence never fired");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{ctx}: {status}");
}

/// What the played successor does after the prepare phase.
#[derive(Clone, Copy, Debug)]
enum Play {
    /// Writes "claimed by me" before PREPARED: the source's hand-over finds the word taken
    /// and rolls back before SWITCH.
    ClaimBeforePrepared,
    /// Silent after SWITCH (no claim, no acknowledgement): the source takes the word back
    /// at the switch timeout, resumes and fences; a RUNNING through the dup'd fd afterwards
    /// changes nothing.
    SilentAfterSwitch,
    /// RUNNING without claiming: the source takes the word back, resumes and fences.
    AckWithoutClaim,
    /// A garbage word, then RUNNING: forged; fenced before the source resumes.
    GarbageWord,
    /// "Claimed by" another pid, then RUNNING: forged; fenced before the source resumes.
    ClaimForAnotherPid,
}

#[test]
fn a_forged_or_silent_ownership_word_never_commits() {
    let plays = [
        Play::ClaimBeforePrepared,
        Play::SilentAfterSwitch,
        Play::AckWithoutClaim,
        Play::GarbageWord,
        Play::ClaimForAnotherPid,
    ];
    for engine in common::engines() {
        run_in_new_netns(move || {
            let guest = GuestConfig {
                queue_pairs: 1,
                ..GuestConfig::default()
            };
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest, ChildOptions::default()).unwrap();
            let traffic = SteadyTraffic::start(&mut rig, 5_000).unwrap();
            std::thread::sleep(Duration::from_millis(200));
            let pid = rig.datapath_pid().unwrap();
            let baseline = fd_count(pid);
            for play in plays {
                let ctx = format!("{engine} {play:?}");
                let (mut helper, ch) =
                    common::peer::spawn_connector(&rig.handoff_socket().unwrap(), HELPER);
                let me = helper.id();
                let (word, attempt) = play_until_prepared(&ch, me);
                let t = Some(Duration::from_secs(10));
                if let Play::ClaimBeforePrepared = play {
                    word.forge(Owner::ClaimedBy { pid: me, attempt }.encode());
                    ch.send(protocol::PREPARED, &[], &[]).unwrap();
                    let m = ch.recv(t).unwrap();
                    let why = String::from_utf8_lossy(&m.payload).into_owned();
                    assert_eq!(m.kind, protocol::ABORT, "{ctx}: {why}");
                    assert!(why.contains("ownership word"), "{ctx}: {why}");
                    let _ = helper.kill();
                    let _ = helper.wait();
                } else {
                    ch.send(protocol::PREPARED, &[], &[]).unwrap();
                    let switch = ch.recv(t).unwrap();
                    assert_eq!(switch.kind, protocol::SWITCH, "{ctx}");
                    assert_eq!(
                        word.load(),
                        Owner::HandedTo { pid: me, attempt },
                        "{ctx}: SWITCH comes after the commit point"
                    );
                    match play {
                        Play::GarbageWord => word.forge(0xdead_beef),
                        Play::ClaimForAnotherPid => word.forge(
                            Owner::ClaimedBy {
                                pid: me + 1,
                                attempt,
                            }
                            .encode(),
                        ),
                        _ => {}
                    }
                    if !matches!(play, Play::SilentAfterSwitch) {
                        ch.send(protocol::RUNNING, &[], &[]).unwrap();
                    }
                    assert_fenced(&mut helper, &ctx);
                    if matches!(play, Play::SilentAfterSwitch | Play::AckWithoutClaim) {
                        assert_eq!(word.load(), Owner::Source, "{ctx}: taken back");
                    }
                    // The dead successor's channel lives on here: it says RUNNING (again).
                    let _ = ch.send(protocol::RUNNING, &[], &[]);
                }
                drop(ch);
                drop(word);
                // The source took the device back (or never gave it): it still runs.
                std::thread::sleep(Duration::from_millis(100));
                assert_eq!(rig.datapath_pid(), Some(pid), "{ctx}");
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                assert!(
                    !stat.is_empty() && !stat.contains(") Z"),
                    "{ctx}: the source exited"
                );
                wait_fd_count(pid, baseline, &ctx);
            }
            rig.handoff()
                .unwrap_or_else(|e| panic!("{engine}: real handoff after the liars: {e:#}"));
            std::thread::sleep(Duration::from_millis(100));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            for (dir, d) in [
                ("guest->host", report.guest_to_host),
                ("host->guest", report.host_to_guest),
            ] {
                assert!(d.received > 100, "{engine} {dir}: {d:?}");
                assert_eq!(d.duplicated, 0, "{engine} {dir}: {d:?}");
                assert_eq!(d.reordered, 0, "{engine} {dir}: {d:?}");
            }
        })
        .unwrap();
    }
}
