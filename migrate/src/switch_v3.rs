//! Version 3's switch: one message in the blackout. The successor is armed before the
//! source stops (engines set up, workers parked, the ownership word mapped); the source
//! quiesces, hands the word to the successor (its commit point) and sends SWITCH with the
//! final positions; the successor claims the word and runs at once, then acknowledges
//! (RUNNING) outside the blackout. See `docs/HANDOFF.md`, "Version 3: one message in the
//! blackout", for why this keeps one owner of every ring at every instant.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tapir_datapath::monotonic_ns;
use tapir_datapath::{Decided, PausedDevice};
use tapir_state::DeviceSnapshot;

use crate::fence::Fence;
use crate::ownership::{Owner, OwnershipWord};
use crate::protocol::{self, expect, MigrateError, Timeouts};
use crate::source::{abort, HandoffReport, HandoffSource, Outcome};
use crate::successor::{fail_here, final_positions, FailPoint, SuccessorOptions, TakeOver};
use crate::transport::Channel;

/// The source's attempts, numbered (in the word: a word meant for one attempt cannot be
/// claimed in another).
static ATTEMPTS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The source's ownership word for one handoff, and the attempt it belongs to.
pub(crate) struct SourceWord {
    word: OwnershipWord,
    attempt: u32,
}

impl SourceWord {
    /// Creates the word and sends it (OWNERSHIP, after EXTENSION).
    pub(crate) fn offer(ch: &Channel) -> Result<SourceWord, MigrateError> {
        let word = OwnershipWord::create()?;
        let attempt = ATTEMPTS
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .wrapping_add(1)
            & 0x00ff_ffff;
        ch.send(protocol::OWNERSHIP, &attempt.to_le_bytes(), &[word.fd()])?;
        Ok(SourceWord { word, attempt })
    }
}

/// The successor: receives the OWNERSHIP message (the word's memfd and the attempt).
pub(crate) fn receive_word(
    ch: &Channel,
    deadline: Instant,
) -> Result<(OwnershipWord, u32), MigrateError> {
    let mut msg = ch.recv_by(deadline)?;
    expect(&msg, protocol::OWNERSHIP, "OWNERSHIP")?;
    let attempt = msg
        .payload
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or(MigrateError::Short(protocol::OWNERSHIP))?;
    if msg.fds.len() != 1 {
        return Err(MigrateError::Fds(format!(
            "OWNERSHIP carries {} fds, not 1",
            msg.fds.len()
        )));
    }
    let fd = msg
        .fds
        .pop()
        .ok_or(MigrateError::Short(protocol::OWNERSHIP))?;
    Ok((OwnershipWord::adopt(fd)?, attempt))
}

/// The source's switch: quiesce, hand the word on (the commit point), SWITCH, then wait for
/// the acknowledgement outside the blackout. Decides once (see [`decide`]).
pub(crate) fn hand_over(
    source: &mut dyn HandoffSource,
    ch: &Channel,
    fence: &Fence,
    word: &SourceWord,
    t: Timeouts,
) -> Result<Outcome, MigrateError> {
    let pid = u32::try_from(fence.pid()).unwrap_or(0);
    let quiesce_ns = monotonic_ns();
    let snapshot = source.quiesce()?;
    let quiesced_ns = monotonic_ns();
    // The commit point: from here the successor may claim the rings. Only this process wrote
    // the word so far; anything but `Source` there is a peer writing it out of turn.
    if let Err(found) = word.word.hand_to(pid, word.attempt) {
        let e =
            MigrateError::Ownership(format!("before the switch the ownership word says {found}"));
        abort(ch, &e);
        source.resume()?;
        return Ok(Outcome::RolledBack(e));
    }
    let mut payload = quiesce_ns.to_le_bytes().to_vec();
    payload.extend_from_slice(&tapir_state::encode(&snapshot));
    let acked = ch
        .send(protocol::SWITCH, &payload, &[])
        .map_err(MigrateError::from)
        .and_then(|()| ch.recv(Some(t.switch)).map_err(MigrateError::from))
        .and_then(|msg| expect(&msg, protocol::RUNNING, "RUNNING"));
    match decide(acked, word, pid) {
        Decision::Commit => Ok(Outcome::Committed(HandoffReport {
            successor_pid: fence.pid(),
            quiesce_ns,
            running_ns: monotonic_ns(),
            switch_sent_ns: quiesced_ns,
            ready_ns: quiesced_ns,
            version: 3,
        })),
        Decision::TakeBack(why, when) => {
            if when == FenceWhen::BeforeResume {
                fire(fence, &why, t);
            }
            source.resume()?;
            if when == FenceWhen::AfterResume {
                fire(fence, &why, t);
            }
            Ok(Outcome::RolledBack(why))
        }
    }
}

fn fire(fence: &Fence, why: &MigrateError, t: Timeouts) {
    tracing::error!(pid = fence.pid(), error = %why, "fencing the successor");
    let fenced = fence.fire(t.prepare);
    tracing::warn!(pid = fence.pid(), ?fenced, "successor fenced");
}

/// How a switch ends for the source.
enum Decision {
    /// The successor claimed the device: it runs, the source goes.
    Commit,
    /// The source took the device back; when to fence the successor.
    TakeBack(MigrateError, FenceWhen),
}

/// When a taken-back successor is killed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FenceWhen {
    /// Not at all: it said ABORT (it did not claim, and now cannot).
    Never,
    /// After the source resumed: the word was taken back, so the successor's claim cannot
    /// succeed and it never touches a ring; the kill (and the wait for its exit, which
    /// tears down its guest mappings) stays off the traffic's path.
    AfterResume,
    /// Before the source resumes: the peer forged the word, so nothing it says counts; as in
    /// version 2, it must be gone before the source touches the rings again.
    BeforeResume,
}

/// Who owns the device after SWITCH went out (or failed to), decided once:
///
/// - an acknowledgement with the word claimed by this successor: committed;
/// - anything else: the source takes the word back (compare-and-swap `HandedTo` ->
///   `Source`). If that succeeds, the successor's claim can no longer succeed, so it never
///   touches a ring: the source resumes (and fences it, unless it said ABORT). If it fails
///   because the successor claimed, the successor runs: committed, acknowledged or not. If it
///   fails on any other value, the peer forged the word: it is fenced (killed and waited for)
///   before the source resumes.
fn decide(acked: Result<(), MigrateError>, word: &SourceWord, pid: u32) -> Decision {
    let claimed = Owner::ClaimedBy {
        pid,
        attempt: word.attempt,
    };
    let why = match acked {
        Ok(()) if word.word.load() == claimed => return Decision::Commit,
        Ok(()) => MigrateError::Ownership(format!(
            "RUNNING, but the ownership word says {}",
            word.word.load()
        )),
        Err(e) => e,
    };
    match word.word.take_back(pid, word.attempt) {
        Ok(()) if matches!(why, MigrateError::Aborted(_)) => {
            Decision::TakeBack(why, FenceWhen::Never)
        }
        Ok(()) => Decision::TakeBack(why, FenceWhen::AfterResume),
        Err(found) if found == claimed => {
            tracing::warn!(
                pid,
                error = %why,
                "the successor claimed the device but did not acknowledge: it runs; committing"
            );
            Decision::Commit
        }
        Err(found) => Decision::TakeBack(
            MigrateError::Ownership(format!("the ownership word says {found} ({why})")),
            FenceWhen::BeforeResume,
        ),
    }
}

/// The successor's switch: PREPARED, then SWITCH, claim and run on the thread of the first
/// worker at the start gate (it waits on the channel itself, so the switch wakes the thread
/// that services the rings, not this one, which would then have to wake it: a cross-CPU
/// wake-up less inside the blackout), then RUNNING from here, after it runs.
pub(crate) fn claim_and_run(
    ch: &Channel,
    opts: &SuccessorOptions,
    layout: &DeviceSnapshot,
    paused: PausedDevice,
    word: (OwnershipWord, u32),
) -> Result<TakeOver, MigrateError> {
    let prepared = ch
        .try_clone()
        .and_then(|receiver| ch.send(protocol::PREPARED, &[], &[]).map(|()| receiver));
    let receiver = match prepared {
        Ok(receiver) => receiver,
        Err(e) => {
            let _ = paused.abort();
            return Err(e.into());
        }
    };
    let switched: Arc<Mutex<Option<Switched>>> = Arc::default();
    let decider = {
        let (opts, layout, slot) = (opts.clone(), layout.clone(), switched.clone());
        Box::new(move || {
            let (positions, claimed) = match receive_and_claim(&receiver, &opts, &layout, &word) {
                Ok((positions, claimed)) => (Some(positions), Ok(claimed)),
                Err(e) => (None, Err(e)),
            };
            // Everything the decider holds goes back to this thread, to be dropped here
            // after the blackout, not on the worker's thread before its first service (the
            // receive buffer and the word's page are mappings).
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(Switched {
                claimed,
                held: (receiver, word, layout, opts),
            });
            positions
        })
    };
    let decided = paused.go_when_decided(decider);
    let running_ns = monotonic_ns();
    // Dropped when this returns (after RUNNING), with what the decider held.
    let taken = switched.lock().unwrap_or_else(|e| e.into_inner()).take();
    let (claimed, _held) = match taken {
        Some(s) => (s.claimed, Some(s.held)),
        None => (
            Err(MigrateError::Ownership(
                "the switch was not decided (its decider panicked)".to_owned(),
            )),
            None,
        ),
    };
    let (device, claimed) = match (decided, claimed) {
        (Decided::Running(device), Ok(claimed)) => (device, claimed),
        (Decided::Aborted(_), Err(e)) => return Err(e),
        (Decided::Running(device), Err(e)) => {
            // Cannot happen (the decider gives positions only with a claim); never run
            // without one.
            let _ = device.stop();
            return Err(e);
        }
        (Decided::Aborted(_), Ok(_)) => {
            return Err(MigrateError::Ownership(
                "claimed the device, but the workers did not start".to_owned(),
            ))
        }
    };
    if opts.fail_at == Some(FailPoint::NoAck) {
        tracing::error!("test hook: running without acknowledging the switch");
    } else if let Err(e) = ch.send(protocol::RUNNING, &[], &[]) {
        // The device is ours (claimed); the source learns it from the word.
        tracing::warn!(error = %e, "could not acknowledge the switch; running anyway");
    }
    Ok(TakeOver {
        device,
        quiesce_ns: claimed.quiesce_ns,
        running_ns,
        switch_ns: claimed.switch_ns,
        ready_ns: claimed.claimed_ns,
        go_ns: claimed.claimed_ns,
        generation: claimed.generation,
        version: 3,
        extension: crate::successor::Extension::default(),
    })
}

/// What the decider hands back: its outcome, and what it held.
struct Switched {
    claimed: Result<Claimed, MigrateError>,
    held: (
        Channel,
        (OwnershipWord, u32),
        DeviceSnapshot,
        SuccessorOptions,
    ),
}

/// What the deciding worker learnt from SWITCH, besides the positions it runs at.
struct Claimed {
    switch_ns: u64,
    claimed_ns: u64,
    quiesce_ns: u64,
    generation: u64,
}

/// On the deciding worker's thread: receives SWITCH, checks it against the layout, claims
/// the word. The claim comes before any ring is touched: if the source took the word back
/// first, this process never runs.
fn receive_and_claim(
    ch: &Channel,
    opts: &SuccessorOptions,
    layout: &DeviceSnapshot,
    word: &(OwnershipWord, u32),
) -> Result<(Vec<tapir_datapath::PairPositions>, Claimed), MigrateError> {
    let msg = ch.recv_spinning(Some(opts.timeouts.prepare))?;
    let (switch_ns, sw) = final_positions(&msg, opts, layout)?;
    fail_here(opts, FailPoint::BeforeRunning);
    word.0.claim(std::process::id(), word.1).map_err(|found| {
        MigrateError::Ownership(format!("cannot claim the device: the word says {found}"))
    })?;
    let claimed = Claimed {
        switch_ns,
        claimed_ns: monotonic_ns(),
        quiesce_ns: sw.quiesce_ns,
        generation: sw.generation,
    };
    Ok((sw.positions, claimed))
}
