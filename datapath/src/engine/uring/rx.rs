//! Posting the TAP reads: frames waiting for guest buffers first, then a burst of reads
//! (each a `Readv` into guest chains and the slot's spill area), one read that waits in the
//! kernel when the TAP is empty, and pausing RX when the TAP fails.

use io_uring::opcode;
use io_uring::types::Fixed;

use super::{iov_count, Loop, Op, RxGate, RxWait, FILE_TAP, RX_RETRY};
use crate::engine::EngineError;
use crate::pair::{QueuePair, RxPrep, RxRetry};

/// How a TAP read is issued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadKind {
    /// `RWF_NOWAIT`: completes inline, with a frame or `EAGAIN` (a burst's reads).
    NoWait,
    /// Without it: on an empty TAP io_uring arms its poll (the TAP's `O_NONBLOCK` does not
    /// make it fail, tests/uring_tap_read.rs) and reads in the wake-up.
    Waiting,
}

impl Loop {
    /// Completes waiting frames in order while the guest has buffers for them; when one still
    /// waits, the guest's RX kick is armed (and re-checked) for it.
    pub(super) fn drain_rx_waiting(&mut self, pair: &mut QueuePair) {
        while let Some(&slot) = self.rx_waiting.front() {
            match pair.retry_deferred(&mut self.rx[slot]) {
                RxRetry::Done => {
                    self.rx_waiting.pop_front();
                    self.rx_free.push(slot);
                }
                RxRetry::Waiting => return,
                RxRetry::Yield => {
                    // Buffers may be there (no kick will come for them): try again at once.
                    self.rx_pending = true;
                    self.again = true;
                    return;
                }
            }
        }
    }

    pub(super) fn fill_rx(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        self.rx_pending = false;
        self.drain_rx_waiting(pair);
        if !self.rx_waiting.is_empty() {
            // A frame waits for guest buffers: read nothing more (frames wait in the TAP).
            return Ok(());
        }
        match self.rx_gate {
            RxGate::Open => {}
            // Every read of the last burst is back (so frames stay in ring order): wait.
            RxGate::Empty if self.rx_posted == 0 => return self.wait_for_frame(pair),
            RxGate::Empty | RxGate::Waiting | RxGate::Paused => return Ok(()),
        }
        // Prepare the burst, then post it. (Linking the reads so that the first EAGAIN
        // cancels the rest was measured 15x slower: a linked read runs from task work after
        // its predecessor completes, i.e. one read per io_uring_enter under DEFER_TASKRUN.)
        self.rx_batch.clear();
        while self.rx_posted + self.rx_batch.len() < self.rx_burst {
            let others = self.rx_posted + self.rx_batch.len() > 0;
            let Some(slot) = self.prepare_slot(pair, others) else {
                break;
            };
            self.rx_batch.push(slot);
        }
        for k in 0..self.rx_batch.len() {
            let slot = self.rx_batch[k];
            self.post_read(slot, ReadKind::NoWait)?;
        }
        Ok(())
    }

    /// A free slot filled with guest buffers by `prepare_rx`, or None (the slot back in the
    /// free list) when no read can be posted now: the pass's budget is spent (come back
    /// without waiting for a kick), the guest has no buffers (its RX kick, armed by
    /// `prepare_rx`, brings this back) or the stop was seen.
    fn prepare_slot(&mut self, pair: &mut QueuePair, others: bool) -> Option<usize> {
        let slot = self.rx_free.pop()?;
        let r = self.rx.get_mut(slot)?;
        match pair.prepare_rx(r, others) {
            RxPrep::Ready => return Some(slot),
            RxPrep::Withheld => {
                self.rx_pending = true;
                self.again = true;
            }
            RxPrep::NoBuffers => {}
            RxPrep::Stopped => self.stop_seen(),
        }
        self.rx_free.push(slot);
        None
    }

    /// Posts the `Readv` of a prepared slot: at most MAX_SEGMENTS chains' iovecs plus the
    /// spill area.
    fn post_read(&mut self, slot: usize, kind: ReadKind) -> Result<(), EngineError> {
        let r = &self.rx[slot];
        let read = opcode::Readv::new(
            Fixed(FILE_TAP),
            r.seg.iov.as_ptr(),
            iov_count(r.seg.iov.len()),
        );
        let read = match kind {
            ReadKind::NoWait => read.rw_flags(libc::RWF_NOWAIT),
            ReadKind::Waiting => read,
        };
        let entry = read.build().user_data(Op::Rx(slot).user_data());
        // SAFETY: the iovecs point into guest memory (mapped for the worker's life) and into
        // the slot's spill area (owned by the slot, which outlives the loop); the slot is
        // untouched until the read's completion (a waiting read is ended by the quiesce's
        // cancel if no frame comes, and the loop ends only once it has completed).
        unsafe { self.push(entry)? };
        self.rx_posted += 1;
        Ok(())
    }

    /// The TAP was found empty and no read is out: post one read that waits in the kernel
    /// for the next frame ([`RxWait::Read`]), or a poll ([`RxWait::Poll`]). Nothing else is
    /// posted until it completes, so the frame it brings is the next in ring order.
    fn wait_for_frame(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        if self.rx_wait == RxWait::Poll {
            self.rx_gate = RxGate::Waiting;
            // POLLIN fits in u32 (it is 1).
            let entry = opcode::PollAdd::new(Fixed(FILE_TAP), libc::POLLIN.unsigned_abs().into())
                .build()
                .user_data(Op::RxRetry.user_data());
            // SAFETY: a poll carries no buffer.
            return unsafe { self.push(entry) };
        }
        let Some(slot) = self.prepare_slot(pair, false) else {
            return Ok(());
        };
        self.post_read(slot, ReadKind::Waiting)?;
        self.rx_gate = RxGate::Waiting;
        Ok(())
    }

    /// A read failed (not `EAGAIN`): stop posting reads for 10 ms (a detached queue, a link
    /// that went away), so a failing TAP never makes the loop spin.
    pub(super) fn pause_rx(&mut self, pair: &QueuePair, res: i32) -> Result<(), EngineError> {
        self.rx_gate = RxGate::Paused;
        tracing::warn!(
            pair = pair.index,
            errno = -res,
            "TAP read failed; pausing RX for 10 ms"
        );
        let entry = opcode::Timeout::new(&RX_RETRY)
            .build()
            .user_data(Op::RxRetry.user_data());
        // SAFETY: `RX_RETRY` is a static.
        unsafe { self.push(entry) }
    }
}
