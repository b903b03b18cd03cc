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
#![no_main]

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
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

fuzz_target!(|data: &[u8]| {
    let manifest = manifest_fds();
    let baseline = fd_count();
    {
        let mut input = Input::new(data);
        let state_only = input.u8() & 1 == 1;
        let (ours, theirs) = Channel::pair().expect("socketpair");
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
                    input.bytes(n).to_vec()
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
});
