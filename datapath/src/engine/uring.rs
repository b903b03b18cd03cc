//! The io_uring engine: one ring per queue pair, batched submissions, zero copy. This file
//! is the worker's loop; `op` is what an SQE's user data says, `rx` posts the TAP reads,
//! `complete` handles completions, `setup` builds a worker's restricted ring.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::types::{CancelBuilder, Fixed};
use io_uring::{opcode, squeue, IoUring};

use super::{Engine, EngineConfig, EngineError, EngineKind, Leftovers};
use crate::pair::{Direction, QueuePair, RxRead, TxPop, TxWrite};
use crate::tap::TapQueue;

mod complete;
mod op;
mod rx;
mod setup;

use op::Op;
use setup::build_ring;

// Registered file slots.
const FILE_TAP: u32 = 0;
const FILE_TX_KICK: u32 = 1;
const FILE_RX_KICK: u32 = 2;
const FILE_STOP: u32 = 3;
const FILE_RX_CALL: u32 = 4;
const FILE_TX_CALL: u32 = 5;

/// The value written to a call eventfd. A static, so the buffer outlives every SQE.
static ONE: u64 = 1;
/// The warm-up's timeout: none (it completes at once, with `ETIME`).
static WARM_UP: io_uring::types::Timespec = io_uring::types::Timespec::new();
/// How long RX pauses after the TAP refused a read (a detached queue, a link gone away).
static RX_RETRY: io_uring::types::Timespec = io_uring::types::Timespec::new().nsec(10_000_000);

/// An iovec count for an SQE: chains are capped at `MAX_SEGMENTS` (+1 spill area), so
/// this never saturates.
fn iov_count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The io_uring engine.
#[derive(Debug)]
pub struct UringEngine {
    cfg: EngineConfig,
}

impl UringEngine {
    /// An engine with these tunables.
    pub fn new(cfg: EngineConfig) -> UringEngine {
        UringEngine { cfg }
    }
}

fn setup_err(source: std::io::Error) -> EngineError {
    EngineError::Setup {
        engine: EngineKind::Uring,
        source,
    }
}

#[cfg(test)]
mod ring_tests;

/// Where the worker's loop is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Servicing the rings.
    Running,
    /// The stop was seen: nothing new is popped; TX writes in flight finish.
    Stopping,
    /// TX is done and the cancel of every pending read is sent: the loop ends once nothing
    /// is outstanding.
    Cancelled,
}

/// Whether RX posts reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxGate {
    /// Bursts of `RWF_NOWAIT` reads are posted as guest buffers allow.
    Open,
    /// A read found the TAP empty: the next pass posts one read that waits in the kernel
    /// (see [`RxWait`]) once every read of the burst is back.
    Empty,
    /// That one waiting read (or the TAP poll) is posted: nothing else is.
    Waiting,
    /// A read failed: none are posted until the retry timeout completes.
    Paused,
}

/// How RX waits for the TAP once it is empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxWait {
    /// One read without `RWF_NOWAIT`: io_uring arms its own poll on the TAP and runs the read
    /// in the wake-up's task work, so the frame is in guest buffers when the worker wakes
    /// (one `io_uring_enter` per RX wake-up, not a poll's completion and then a read's).
    Read,
    /// A `POLLIN` poll, then reads: for a kernel that completes such a read with `EAGAIN`
    /// (it honours the TAP's `O_NONBLOCK` instead of polling).
    Poll,
}

/// One of the three eventfd reads the loop keeps pending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventRead {
    Kick(Direction),
    Stop,
}

impl EventRead {
    /// Its word in `Loop::event_buf`, its registered file and its completion.
    fn parts(self) -> (usize, u32, Op) {
        match self {
            EventRead::Kick(Direction::Tx) => (0, FILE_TX_KICK, Op::Kick(Direction::Tx)),
            EventRead::Kick(Direction::Rx) => (1, FILE_RX_KICK, Op::Kick(Direction::Rx)),
            EventRead::Stop => (2, FILE_STOP, Op::Stop),
        }
    }
}

/// Everything the loop tracks besides the queue pair.
struct Loop {
    ring: IoUring,
    tx: Vec<TxWrite>,
    tx_free: Vec<usize>,
    rx: Vec<RxRead>,
    rx_free: Vec<usize>,
    /// Buffers of the pending eventfd reads: tx kick, rx kick, stop.
    event_buf: Box<[u64; 3]>,
    outstanding: usize,
    tx_inflight: usize,
    rx_posted: usize,
    /// TX (RX) may have work: pop (post) on the next pass.
    tx_pending: bool,
    rx_pending: bool,
    rx_gate: RxGate,
    rx_wait: RxWait,
    /// Reads posted per burst: grows by one per read that found a frame, halves on a read
    /// that found none (a burst's reads are RWF_NOWAIT: they complete inline, with a frame or
    /// EAGAIN, and never wait in the kernel or in io-wq, so frames land in ring order; the
    /// read that waits for an empty TAP is posted alone, [`RxGate::Waiting`]).
    rx_burst: usize,
    rx_depth: usize,
    /// Slots of the RX burst being prepared.
    rx_batch: Vec<usize>,
    /// Completed reads whose frames wait for guest buffers, in completion order.
    rx_waiting: std::collections::VecDeque<usize>,
    phase: Phase,
    /// Work is known to be waiting (a pass ran out of budget, buffers arrived while a frame
    /// waited): the next `io_uring_enter` must not wait for a completion.
    again: bool,
    /// Call eventfd writes go out with `RWF_NOWAIT` (an eventfd at its maximum fails them
    /// with `EAGAIN` at once; without it io_uring would keep the write pending until the
    /// counter is read, and a quiesce would wait for it). Cleared if the kernel's eventfd
    /// does not support it (`EOPNOTSUPP`): then calls are plain non-blocking `write(2)`s.
    call_nowait: bool,
    /// Busy polling before sleeping ([`EngineConfig::busy_poll`]).
    busy_poll: Option<Duration>,
    /// TX writes queued since the last submit.
    tx_queued: usize,
    /// Writes per submitted piece: [`TX_FIRST_PIECE`] when the worker starts (a successor
    /// resuming on a TX ring the guest filled during the blackout), doubling per piece up to
    /// [`TX_SUBMIT_EVERY`].
    tx_piece: usize,
}

/// TX writes queued before `fill_tx` submits them: a stop waits at most this many writes
/// (plus those in flight) instead of a whole batch.
const TX_SUBMIT_EVERY: usize = 32;

/// The first piece a starting worker submits: its completion is shown to the guest after one
/// write, not after 32 (at 64 B through the host's UDP delivery a write is ~4 µs on the 2-CPU
/// machine, and a successor resuming on the TX ring the guest filled during the blackout made
/// its first used entry 240-270 µs p50 after it ran; 75-80 µs with this, 90-100 with 4).
const TX_FIRST_PIECE: usize = 1;

/// What a busy-poll spell found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Polled {
    /// Completions, or chains on a ring the device waits on: go on without sleeping.
    Work,
    /// Nothing within the budget: sleep.
    Nothing,
}

impl Loop {
    /// Queues an SQE, submitting first when the submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid and unmoved until its completion is
    /// reaped (guest memory stays mapped for the worker's life; slot iovecs are not touched
    /// while their operation is in flight; `event_buf` lives as long as the ring).
    unsafe fn push(&mut self, entry: squeue::Entry) -> Result<(), EngineError> {
        // The ring requires IOSQE_FIXED_FILE on every SQE (see `ring_restrictions`), also on
        // those without a file (timeout, cancel), where the kernel ignores it.
        let entry = entry.flags(squeue::Flags::FIXED_FILE);
        loop {
            // SAFETY: forwarded to the caller's contract.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.outstanding += 1;
                return Ok(());
            }
            self.ring.submit().map_err(|source| EngineError::Io {
                engine: EngineKind::Uring,
                what: "io_uring_enter (submit)",
                source,
            })?;
        }
    }

    fn post_event_read(&mut self, which: EventRead) -> Result<(), EngineError> {
        let (word, file, op) = which.parts();
        let buf = std::ptr::from_mut(&mut self.event_buf[word]).cast::<u8>();
        let entry = opcode::Read::new(Fixed(file), buf, 8)
            .build()
            .user_data(op.user_data());
        // SAFETY: `event_buf` is boxed and lives in `self` as long as the ring; each of its
        // three words has at most one read in flight.
        unsafe { self.push(entry) }
    }

    fn fill_tx(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        loop {
            let Some(slot) = self.tx_free.pop() else {
                // Out of slots: more work may wait; completions will free slots.
                self.tx_pending = true;
                return Ok(());
            };
            let Some(w) = self.tx.get_mut(slot) else {
                return Ok(());
            };
            match pair.pop_tx(w) {
                TxPop::Chain => {}
                TxPop::Yield => {
                    // The pass's budget is spent: come back without waiting for a kick.
                    self.tx_free.push(slot);
                    self.tx_pending = true;
                    self.again = true;
                    return Ok(());
                }
                TxPop::Idle => {
                    self.tx_free.push(slot);
                    self.tx_pending = false;
                    return Ok(());
                }
                TxPop::Stopped => {
                    // Seen between chains: every chain popped so far is queued; they finish,
                    // nothing more is popped.
                    self.tx_free.push(slot);
                    self.stop_seen();
                    return Ok(());
                }
            }
            let w = &self.tx[slot];
            // At most MAX_SEGMENTS (1024) iovecs.
            let entry = opcode::Writev::new(
                Fixed(FILE_TAP),
                w.seg.iov.as_ptr(),
                iov_count(w.seg.iov.len()),
            )
            .build()
            .user_data(Op::Tx(slot).user_data());
            // SAFETY: the iovecs point into guest memory, mapped for the worker's life, and the
            // slot's iovec array is left alone until the write's completion frees the slot.
            unsafe { self.push(entry)? };
            self.tx_inflight += 1;
            self.tx_queued += 1;
            if self.tx_queued >= self.tx_piece {
                // The kernel runs a submitted TAP write inline: a batch submitted in pieces
                // lets the stop request be seen between them, not only after the whole
                // batch (issue 10, item 2); and the piece's completions are there at once:
                // used and shown to the guest now, not after the rest of a long backlog
                // (a successor resuming on a full TX ring completed nothing for 200 µs
                // p50, 1.1 ms p99, while it wrote the backlog).
                self.tx_queued = 0;
                self.tx_piece = (self.tx_piece * 2).min(TX_SUBMIT_EVERY);
                self.submit_now()?;
                self.reap(pair)?;
                pair.publish_used();
            }
        }
    }

    /// Enters the kernel once before the start gate, with a zero timeout (no file, no ring
    /// of the guest's): a thread's first `io_uring_enter` with work sets up the kernel's
    /// per-task io_uring state, which a successor otherwise paid at its first write, inside
    /// the blackout (resumed -> first used entry 26-27 -> 23 µs p50 under the handoff bench).
    fn warm_up(&mut self) -> Result<(), EngineError> {
        let entry = opcode::Timeout::new(&WARM_UP)
            .build()
            .user_data(Op::WarmUp.user_data());
        // SAFETY: `WARM_UP` is a static; the kernel reads it when it takes the entry.
        unsafe { self.push(entry)? };
        let mut reaped = false;
        while !reaped {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(source) => {
                    return Err(EngineError::Io {
                        engine: EngineKind::Uring,
                        what: "io_uring_enter (warm-up)",
                        source,
                    })
                }
            }
            for cqe in self.ring.completion() {
                self.outstanding = self.outstanding.saturating_sub(1);
                reaped |= Op::from_user_data(cqe.user_data()) == Some(Op::WarmUp);
            }
        }
        Ok(())
    }

    /// Submits what is queued without waiting for completions.
    fn submit_now(&mut self) -> Result<(), EngineError> {
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(source) => Err(EngineError::Io {
                engine: EngineKind::Uring,
                what: "io_uring_enter (submit)",
                source,
            }),
        }
    }

    /// The stop request was seen: pop nothing more; TX writes in flight finish first.
    fn stop_seen(&mut self) {
        if self.phase == Phase::Running {
            self.phase = Phase::Stopping;
        }
    }

    fn signal(&mut self, dir: Direction) -> Result<(), EngineError> {
        let file = match dir {
            Direction::Rx => FILE_RX_CALL,
            Direction::Tx => FILE_TX_CALL,
        };
        // RWF_NOWAIT: a call eventfd at its maximum fails the write at once (EAGAIN) instead
        // of keeping it pending until someone reads the counter (measured on 6.18: with
        // O_NONBLOCK alone io_uring still arms a poll and retries).
        let entry = opcode::Write::new(Fixed(file), std::ptr::from_ref(&ONE).cast::<u8>(), 8)
            .rw_flags(libc::RWF_NOWAIT)
            .build()
            .user_data(Op::Call(dir).user_data());
        // SAFETY: `ONE` is a static.
        unsafe { self.push(entry) }
    }

    fn interrupts(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        if !self.call_nowait {
            // Plain non-blocking write(2)s (the fds are O_NONBLOCK).
            pair.raise_interrupts();
            return Ok(());
        }
        let mut due = [None, None];
        let mut n = 0usize;
        pair.interrupts(|dir| {
            if let Some(d) = due.get_mut(n) {
                *d = Some(dir);
                n += 1;
            }
        });
        for dir in due.into_iter().flatten() {
            self.signal(dir)?;
        }
        Ok(())
    }

    /// Busy polling ([`EngineConfig::busy_poll`]): instead of sleeping at once, look for up
    /// to `budget` for completions (running the kernel's deferred task work whenever the SQ
    /// flags say some waits: a frame on the TAP, a kick) and for chains on a ring the device
    /// waits on. Queued SQEs (interrupts above all) are submitted first. The guest's kicks
    /// stay armed meanwhile. Never inlined: instruction counts keep it apart from the loop's
    /// work (`bench/examples/per_packet.rs`).
    #[inline(never)]
    fn poll_busily(
        &mut self,
        pair: &mut QueuePair,
        budget: Duration,
    ) -> Result<Polled, EngineError> {
        let submit_err = |source| EngineError::Io {
            engine: EngineKind::Uring,
            what: "io_uring_enter (busy poll)",
            source,
        };
        let ignorable = |e: &std::io::Error| {
            matches!(
                e.raw_os_error(),
                Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
            )
        };
        match self.ring.submit() {
            Ok(_) => {}
            Err(e) if ignorable(&e) => {}
            Err(e) => return Err(submit_err(e)),
        }
        let deadline = Instant::now() + budget;
        loop {
            pair.counters.busy_poll_rounds += 1;
            if self.ring.submission().taskrun() {
                // An enter with GETEVENTS runs the task work (`submit` adds it for this flag).
                match self.ring.submit() {
                    Ok(_) => {}
                    Err(e) if ignorable(&e) => {}
                    Err(e) => return Err(submit_err(e)),
                }
            }
            if !self.ring.completion().is_empty() {
                pair.counters.busy_poll_found += 1;
                return Ok(Polled::Work);
            }
            if pair.guest_posted() {
                pair.counters.busy_poll_found += 1;
                self.tx_pending = true;
                self.rx_pending = true;
                return Ok(Polled::Work);
            }
            if Instant::now() >= deadline {
                // What the spell counted is visible while the worker sleeps.
                pair.publish();
                return Ok(Polled::Nothing);
            }
            std::hint::spin_loop();
        }
    }

    fn reap(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        // Copy completions out first: handling them pushes new SQEs.
        let mut done: [(u64, i32); 64] = [(0, 0); 64];
        loop {
            let mut n = 0;
            for cqe in self.ring.completion().take(done.len()) {
                done[n] = (cqe.user_data(), cqe.result());
                n += 1;
            }
            if n == 0 {
                return Ok(());
            }
            self.outstanding -= n;
            for &(data, res) in &done[..n] {
                match Op::from_user_data(data) {
                    Some(op) => self.complete(pair, op, res)?,
                    None => tracing::error!(data, res, "io_uring completion of unknown user data"),
                }
            }
        }
    }
}

impl Engine for UringEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Uring
    }

    fn run(
        &mut self,
        pair: &mut QueuePair,
        tap: &TapQueue,
        stop: &OwnedFd,
        ready: &mut dyn FnMut(&mut QueuePair) -> bool,
    ) -> Result<Leftovers, EngineError> {
        let tx_depth = self.cfg.tx_depth.max(1);
        let rx_depth = self.cfg.rx_depth.max(1);
        let entries = u32::try_from((tx_depth + rx_depth + 16).next_power_of_two())
            .map_err(|_| setup_err(std::io::ErrorKind::InvalidInput.into()))?;
        let ring = build_ring(
            entries,
            &[
                tap.as_raw_fd(),
                pair.tx.kick.as_raw_fd(),
                pair.rx.kick.as_raw_fd(),
                stop.as_raw_fd(),
                pair.rx.call.as_raw_fd(),
                pair.tx.call.as_raw_fd(),
            ],
        )
        .map_err(setup_err)?;
        let mut lp = Loop {
            ring,
            tx: (0..tx_depth).map(|_| TxWrite::new()).collect(),
            tx_free: (0..tx_depth).rev().collect(),
            rx: (0..rx_depth)
                .map(|_| RxRead::new(pair.rx_read_chains()))
                .collect(),
            rx_free: (0..rx_depth).rev().collect(),
            event_buf: Box::new([0; 3]),
            outstanding: 0,
            tx_inflight: 0,
            rx_posted: 0,
            tx_pending: true,
            rx_pending: true,
            rx_gate: RxGate::Open,
            rx_wait: RxWait::Read,
            rx_burst: 4.min(rx_depth),
            rx_depth,
            rx_batch: Vec::with_capacity(rx_depth),
            rx_waiting: std::collections::VecDeque::with_capacity(rx_depth),
            phase: Phase::Running,
            again: false,
            call_nowait: true,
            busy_poll: self.cfg.busy_poll.filter(|d| !d.is_zero()),
            tx_queued: 0,
            tx_piece: TX_FIRST_PIECE,
        };
        lp.warm_up()?;
        if !ready(pair) {
            return Ok(Leftovers(Some(Box::new(lp))));
        }
        for which in [
            EventRead::Kick(Direction::Tx),
            EventRead::Kick(Direction::Rx),
            EventRead::Stop,
        ] {
            lp.post_event_read(which)?;
        }
        // A panic must not unwind through `lp` while the kernel may still write into its
        // buffers: it is caught here and handled like an error.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_loop(&mut lp, pair)))
                .unwrap_or_else(|p| {
                    Err(EngineError::Panicked {
                        engine: EngineKind::Uring,
                        message: super::panic_message(p.as_ref()),
                    })
                });
        if result.is_err() && lp.outstanding > 0 {
            // Operations may still be in flight, and closing the ring cancels them
            // asynchronously: leak the buffers they point at rather than free them under the
            // kernel. (Only on this error path; a normal stop drains everything first.)
            let Loop {
                ring,
                tx,
                rx,
                event_buf,
                ..
            } = lp;
            drop(ring);
            std::mem::forget(tx);
            std::mem::forget(rx);
            std::mem::forget(event_buf);
            pair.publish();
            return result.map(|()| Leftovers(None));
        }
        pair.publish();
        result.map(|()| Leftovers(Some(Box::new(lp))))
    }
}

fn run_loop(lp: &mut Loop, pair: &mut QueuePair) -> Result<(), EngineError> {
    loop {
        pair.begin_pass();
        lp.again = false;
        if pair.stop_requested() {
            lp.stop_seen();
        }
        if lp.phase == Phase::Running {
            if lp.tx_pending {
                lp.fill_tx(pair)?;
            }
            if lp.rx_pending {
                lp.fill_rx(pair)?;
            }
        } else if lp.phase == Phase::Stopping && lp.tx_inflight == 0 {
            // Quiesce: TX writes are done (never repeated, never lost); now cancel the posted
            // reads (and the kick reads). A read that already completed is still delivered.
            let entry = opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(Op::Cancel.user_data());
            // SAFETY: a cancel request carries no buffer.
            unsafe { lp.push(entry)? };
            lp.phase = Phase::Cancelled;
        }
        lp.interrupts(pair)?;
        if lp.phase == Phase::Cancelled && lp.outstanding == 0 {
            break;
        }
        // Publish before blocking: what this iteration counted (malformed chains completed
        // while popping, a queue found broken, interrupts) must not wait for the next event.
        pair.publish();
        // Known work left (see `again`), or the quiesce's next step due (the stop was seen
        // and no TX write is in flight: the cancel goes out on the next pass; its wake-up, the
        // stop's or a write's completion, may have been reaped already): enter the kernel
        // without waiting.
        let next_step_due = lp.phase == Phase::Stopping && lp.tx_inflight == 0;
        let known_work = lp.again && lp.phase == Phase::Running;
        let mut want = usize::from(!known_work && !next_step_due);
        if want == 1 && lp.phase == Phase::Running {
            if let Some(budget) = lp.busy_poll {
                if lp.poll_busily(pair, budget)? == Polled::Work {
                    want = 0;
                }
            }
        }
        lp.tx_queued = 0;
        match lp.ring.submit_and_wait(want) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            // EBUSY: the completion queue overflowed; reaping makes room.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(source) => {
                return Err(EngineError::Io {
                    engine: EngineKind::Uring,
                    what: "io_uring_enter",
                    source,
                })
            }
        }
        pair.counters.batches += 1;
        pair.counters.io_syscalls += 1;
        lp.reap(pair)?;
    }
    // Frames still waiting for guest buffers: last try, then kept in the pair in order (a
    // handoff carries them, a resumed worker delivers them first).
    lp.drain_rx_waiting(pair);
    while let Some(slot) = lp.rx_waiting.pop_front() {
        pair.carry_deferred(&mut lp.rx[slot]);
        lp.rx_free.push(slot);
    }
    // Interrupts for the last completions.
    pair.raise_interrupts();
    Ok(())
}
