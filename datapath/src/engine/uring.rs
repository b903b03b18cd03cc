//! The io_uring engine: one ring per queue pair, batched submissions, zero copy.

use std::os::fd::{AsRawFd, OwnedFd};

use io_uring::types::{CancelBuilder, Fixed};
use io_uring::{opcode, squeue, IoUring};

use super::{Engine, EngineConfig, EngineError, EngineKind, Leftovers, WorkerFault};
use crate::pair::{Direction, QueuePair, RxCompletion, RxPrepare, RxRead, TxNext, TxWrite};
use crate::tap::TapQueue;
use crate::virtqueue::Virtqueue;

// Registered file slots.
const FILE_TAP: u32 = 0;
const FILE_TX_KICK: u32 = 1;
const FILE_RX_KICK: u32 = 2;
const FILE_STOP: u32 = 3;
const FILE_RX_CALL: u32 = 4;
const FILE_TX_CALL: u32 = 5;

// user_data: operation in the high 32 bits, slot in the low 32.
const OP_TX: u64 = 1;
const OP_RX: u64 = 2;
const OP_TX_KICK: u64 = 3;
const OP_RX_KICK: u64 = 4;
const OP_STOP: u64 = 5;
const OP_CALL: u64 = 6;
const OP_CANCEL: u64 = 7;
const OP_RX_RETRY: u64 = 8;

/// The value written to a call eventfd. A static, so the buffer outlives every SQE.
static ONE: u64 = 1;
/// How long RX pauses after the TAP refused a read (a detached queue, a link gone away).
static RX_RETRY: io_uring::types::Timespec = io_uring::types::Timespec::new().nsec(10_000_000);

/// An iovec count for an SQE: chains are capped at `MAX_SEGMENTS` (+1 spill area), so
/// this never saturates.
fn iov_count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn ud(op: u64, slot: usize) -> u64 {
    (op << 32) | slot as u64
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

fn build_ring(entries: u32) -> std::io::Result<IoUring> {
    // DEFER_TASKRUN runs completions only when we enter the kernel to wait, on this thread:
    // no IPIs, no task-work interrupting the loop. Older kernels fall back.
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(entries))
        .or_else(|_| IoUring::new(entries))
}

/// Everything the loop tracks besides the queue pair.
struct Loop {
    ring: IoUring,
    tx: Vec<TxWrite>,
    tx_free: Vec<usize>,
    rx: Vec<RxRead>,
    rx_free: Vec<usize>,
    /// Buffers of the pending eventfd reads: tx kick, rx kick, stop.
    kick_buf: Box<[u64; 3]>,
    outstanding: usize,
    tx_inflight: usize,
    rx_posted: usize,
    tx_pending: bool,
    rx_pending: bool,
    rx_paused: bool,
    /// Reads posted per burst: grows by one per read that found a frame, halves on a read
    /// that found none (RX reads are RWF_NOWAIT: they complete inline, with a frame or
    /// EAGAIN, and never wait in the kernel or in io-wq, so frames land in ring order).
    rx_burst: usize,
    rx_depth: usize,
    /// Slots of the RX burst being prepared.
    rx_batch: Vec<usize>,
    /// Completed reads whose frames wait for guest buffers, in completion order.
    rx_waiting: std::collections::VecDeque<usize>,
    stopping: bool,
    cancel_sent: bool,
    /// Work is known to be waiting (a pass ran out of budget, buffers arrived while a frame
    /// waited): the next `io_uring_enter` must not wait for a completion.
    again: bool,
    /// Call eventfd writes go out with `RWF_NOWAIT` (an eventfd at its maximum fails them
    /// with `EAGAIN` at once; without it io_uring would keep the write pending until the
    /// counter is read, and a quiesce would wait for it). Cleared if the kernel's eventfd
    /// does not support it (`EOPNOTSUPP`): then calls are plain non-blocking `write(2)`s.
    call_nowait: bool,
}

impl Loop {
    /// Queues an SQE, submitting first when the submission queue is full.
    ///
    /// # Safety
    /// Every buffer the entry points to must stay valid and unmoved until its completion is
    /// reaped (guest memory stays mapped for the worker's life; slot iovecs are not touched
    /// while their operation is in flight; `kick_buf` lives as long as the ring).
    unsafe fn push(&mut self, entry: squeue::Entry) -> Result<(), EngineError> {
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

    fn post_eventfd_read(&mut self, which: usize) -> Result<(), EngineError> {
        let (file, op) = match which {
            0 => (FILE_TX_KICK, OP_TX_KICK),
            1 => (FILE_RX_KICK, OP_RX_KICK),
            _ => (FILE_STOP, OP_STOP),
        };
        let buf = std::ptr::from_mut(&mut self.kick_buf[which]).cast::<u8>();
        let entry = opcode::Read::new(Fixed(file), buf, 8)
            .build()
            .user_data(ud(op, which));
        // SAFETY: `kick_buf` is boxed and lives in `self` as long as the ring; each of its
        // three words has at most one read in flight.
        unsafe { self.push(entry) }
    }

    fn fill_tx(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        pair.tx.disable_notification(&pair.mem);
        loop {
            let Some(slot) = self.tx_free.pop() else {
                // Out of slots: more work may wait; completions will free slots.
                self.tx_pending = true;
                return Ok(());
            };
            let Some(w) = self.tx.get_mut(slot) else {
                return Ok(());
            };
            match pair.next_tx(w) {
                TxNext::Chain => {}
                TxNext::Later => {
                    // The pass's budget is spent: come back without waiting for a kick.
                    self.tx_free.push(slot);
                    self.tx_pending = true;
                    self.again = true;
                    return Ok(());
                }
                TxNext::Empty => {
                    self.tx_free.push(slot);
                    if pair.tx.enable_notification(&pair.mem) {
                        pair.tx.disable_notification(&pair.mem);
                        continue;
                    }
                    self.tx_pending = false;
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
            .user_data(ud(OP_TX, slot));
            // SAFETY: the iovecs point into guest memory, mapped for the worker's life, and the
            // slot's iovec array is left alone until the write's completion frees the slot.
            unsafe { self.push(entry)? };
            self.tx_inflight += 1;
        }
    }

    /// Completes waiting frames in order while the guest has buffers for them.
    fn drain_rx_waiting(&mut self, pair: &mut QueuePair) {
        while let Some(&slot) = self.rx_waiting.front() {
            if pair.retry_rx(&mut self.rx[slot]) == RxCompletion::Deferred {
                return;
            }
            self.rx_waiting.pop_front();
            self.rx_free.push(slot);
        }
    }

    fn fill_rx(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        self.rx_pending = false;
        self.drain_rx_waiting(pair);
        if !self.rx_waiting.is_empty() {
            // A frame waits for guest buffers: read nothing more (frames wait in the TAP),
            // and have the guest kick when it refills.
            if pair.yielded() || pair.rx.enable_notification(&pair.mem) {
                // Buffers are there (no kick will come for them): try again at once.
                self.rx_pending = true;
                self.again = true;
            }
            return Ok(());
        }
        if self.rx_paused {
            return Ok(());
        }
        pair.rx.disable_notification(&pair.mem);
        // Prepare the burst, then post it. (Linking the reads so that the first EAGAIN
        // cancels the rest was measured 15x slower: a linked read runs from task work after
        // its predecessor completes, i.e. one read per io_uring_enter under DEFER_TASKRUN.)
        self.rx_batch.clear();
        while self.rx_posted + self.rx_batch.len() < self.rx_burst {
            let Some(slot) = self.rx_free.pop() else {
                break;
            };
            let others = self.rx_posted + self.rx_batch.len() > 0;
            let Some(r) = self.rx.get_mut(slot) else {
                break;
            };
            match pair.prepare_rx(r, others) {
                RxPrepare::Ready => {}
                RxPrepare::Later => {
                    // The pass's budget is spent: come back without waiting for a kick.
                    self.rx_free.push(slot);
                    self.rx_pending = true;
                    self.again = true;
                    break;
                }
                RxPrepare::NoBuffers => {
                    self.rx_free.push(slot);
                    if pair.rx.enable_notification(&pair.mem) {
                        pair.rx.disable_notification(&pair.mem);
                        continue;
                    }
                    break;
                }
            }
            self.rx_batch.push(slot);
        }
        let n = self.rx_batch.len();
        for k in 0..n {
            let slot = self.rx_batch[k];
            let r = &self.rx[slot];
            // At most MAX_SEGMENTS chains' iovecs plus the spill area.
            let entry = opcode::Readv::new(
                Fixed(FILE_TAP),
                r.seg.iov.as_ptr(),
                iov_count(r.seg.iov.len()),
            )
            .rw_flags(libc::RWF_NOWAIT)
            .build()
            .user_data(ud(OP_RX, slot));
            // SAFETY: the iovecs point into guest memory (mapped for the worker's life) and
            // into the slot's spill area (owned by the slot, which outlives the loop); the
            // slot is untouched until the read's completion.
            unsafe { self.push(entry)? };
            self.rx_posted += 1;
        }
        Ok(())
    }

    /// A read found nothing or failed: stop posting reads until the TAP is readable again
    /// (EAGAIN: the TAP queue is empty; one POLLIN wait replaces a pending read per slot) or
    /// for 10 ms (other errors: a detached queue, a link that went away), so a failing TAP
    /// never makes the loop spin.
    fn pause_rx(&mut self, pair: &QueuePair, res: i32) -> Result<(), EngineError> {
        self.rx_paused = true;
        let entry = if res == -libc::EAGAIN {
            // POLLIN fits in u32 (it is 1).
            opcode::PollAdd::new(Fixed(FILE_TAP), libc::POLLIN.unsigned_abs().into())
                .build()
                .user_data(ud(OP_RX_RETRY, 0))
        } else {
            tracing::warn!(
                pair = pair.index,
                errno = -res,
                "TAP read failed; pausing RX for 10 ms"
            );
            opcode::Timeout::new(&RX_RETRY)
                .build()
                .user_data(ud(OP_RX_RETRY, 0))
        };
        // SAFETY: a poll carries no buffer; `RX_RETRY` is a static.
        unsafe { self.push(entry) }
    }

    fn signal(&mut self, file: u32) -> Result<(), EngineError> {
        // RWF_NOWAIT: a call eventfd at its maximum fails the write at once (EAGAIN) instead
        // of keeping it pending until someone reads the counter (measured on 6.18: with
        // O_NONBLOCK alone io_uring still arms a poll and retries).
        let entry = opcode::Write::new(Fixed(file), std::ptr::from_ref(&ONE).cast::<u8>(), 8)
            .rw_flags(libc::RWF_NOWAIT)
            .build()
            .user_data(ud(OP_CALL, file as usize));
        // SAFETY: `ONE` is a static.
        unsafe { self.push(entry) }
    }

    fn interrupts(&mut self, pair: &mut QueuePair) -> Result<(), EngineError> {
        let mut files = [0u32; 2];
        let mut n = 0usize;
        let nowait = self.call_nowait;
        pair.interrupts(|q: &Virtqueue| {
            if !nowait {
                // A plain non-blocking write(2) (the fd is O_NONBLOCK).
                q.signal();
                return;
            }
            if let Some(f) = files.get_mut(n) {
                *f = if q.index.is_multiple_of(2) {
                    FILE_RX_CALL
                } else {
                    FILE_TX_CALL
                };
                n += 1;
            }
        });
        for &f in files.iter().take(n) {
            self.signal(f)?;
        }
        Ok(())
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
                self.complete(pair, data, res)?;
            }
        }
    }

    fn complete(&mut self, pair: &mut QueuePair, data: u64, res: i32) -> Result<(), EngineError> {
        let op = data >> 32;
        let slot = (data & 0xffff_ffff) as usize;
        match op {
            OP_TX => {
                let result = usize::try_from(res).map_err(|_| -res);
                pair.complete_tx(&self.tx[slot], result);
                self.tx_free.push(slot);
                self.tx_inflight -= 1;
                self.tx_pending = true;
            }
            OP_RX => {
                self.rx_posted -= 1;
                match usize::try_from(res) {
                    Ok(n) if n > 0 => {
                        // Frames complete in order: behind a frame waiting for guest buffers,
                        // the next ones wait too.
                        self.rx[slot].set_frame(n);
                        self.rx_waiting.push_back(slot);
                        self.drain_rx_waiting(pair);
                        self.rx_burst = (self.rx_burst + 1).min(self.rx_depth);
                        self.rx_pending = true;
                        return Ok(());
                    }
                    _ => {
                        if res == -libc::EAGAIN {
                            self.rx_burst = (self.rx_burst / 2).max(1);
                        }
                        pair.return_rx(&mut self.rx[slot]);
                        if res != -libc::ECANCELED && !self.stopping && !self.rx_paused {
                            self.pause_rx(pair, res)?;
                        }
                    }
                }
                self.rx_free.push(slot);
                self.rx_pending = true;
            }
            OP_TX_KICK | OP_RX_KICK => {
                let dir = if op == OP_TX_KICK {
                    Direction::Tx
                } else {
                    Direction::Rx
                };
                // End of file, a short read or an error other than EAGAIN: the fd is not an
                // eventfd and will never kick; re-posting the read would spin.
                let dead = (0..8).contains(&res)
                    || (res < 0 && ![-libc::EAGAIN, -libc::EINTR, -libc::ECANCELED].contains(&res));
                if dead && !self.stopping {
                    pair.kick_failed(dir);
                    return Ok(());
                }
                if res == 8 {
                    if op == OP_TX_KICK {
                        pair.counters.tx_kicks += 1;
                        self.tx_pending = true;
                    } else {
                        pair.counters.rx_kicks += 1;
                        self.rx_pending = true;
                    }
                }
                if !self.stopping && res != -libc::ECANCELED {
                    self.post_eventfd_read(slot)?;
                }
            }
            OP_STOP => {
                if res == 8 {
                    if let Some(fault) = WorkerFault::from_stop_value(self.kick_buf[2]) {
                        return inject(fault);
                    }
                }
                if res != -libc::ECANCELED {
                    self.stopping = true;
                }
            }
            OP_CALL if res == -libc::EOPNOTSUPP || res == -libc::EINVAL => {
                // This kernel's eventfd takes no RWF_NOWAIT: plain non-blocking writes from
                // now on, and this interrupt again.
                self.call_nowait = false;
                let q = if slot == FILE_RX_CALL as usize {
                    &pair.rx
                } else {
                    &pair.tx
                };
                q.signal();
            }
            OP_RX_RETRY => {
                self.rx_paused = false;
                self.rx_pending = true;
            }
            OP_CALL | OP_CANCEL => {}
            _ => tracing::error!(data, res, "unknown io_uring completion"),
        }
        Ok(())
    }
}

/// Fails as a test asked ([`crate::Device::inject_fault`]).
fn inject(fault: WorkerFault) -> Result<(), EngineError> {
    match fault {
        WorkerFault::Panic => panic!("uring engine: injected panic (a test's fault)"),
        WorkerFault::Error => Err(EngineError::Io {
            engine: EngineKind::Uring,
            what: "an injected fault",
            source: std::io::Error::other("a test's fault"),
        }),
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
        let ring = build_ring(entries).map_err(setup_err)?;
        ring.submitter()
            .register_files(&[
                tap.as_raw_fd(),
                pair.tx.kick.as_raw_fd(),
                pair.rx.kick.as_raw_fd(),
                stop.as_raw_fd(),
                pair.rx.call.as_raw_fd(),
                pair.tx.call.as_raw_fd(),
            ])
            .map_err(setup_err)?;
        let mut lp = Loop {
            ring,
            tx: (0..tx_depth).map(|_| TxWrite::new()).collect(),
            tx_free: (0..tx_depth).rev().collect(),
            rx: (0..rx_depth).map(|_| RxRead::new(4)).collect(),
            rx_free: (0..rx_depth).rev().collect(),
            kick_buf: Box::new([0; 3]),
            outstanding: 0,
            tx_inflight: 0,
            rx_posted: 0,
            tx_pending: true,
            rx_pending: true,
            rx_paused: false,
            rx_burst: 4.min(rx_depth),
            rx_depth,
            rx_batch: Vec::with_capacity(rx_depth),
            rx_waiting: std::collections::VecDeque::with_capacity(rx_depth),
            stopping: false,
            cancel_sent: false,
            again: false,
            call_nowait: true,
        };
        if !ready(pair) {
            return Ok(Leftovers(Some(Box::new(lp))));
        }
        for which in 0..3 {
            lp.post_eventfd_read(which)?;
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
                kick_buf,
                ..
            } = lp;
            drop(ring);
            std::mem::forget(tx);
            std::mem::forget(rx);
            std::mem::forget(kick_buf);
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
        if !lp.stopping {
            if lp.tx_pending {
                lp.fill_tx(pair)?;
            }
            if lp.rx_pending {
                lp.fill_rx(pair)?;
            }
        } else if lp.tx_inflight == 0 && !lp.cancel_sent {
            // Quiesce: TX writes are done (never repeated, never lost); now cancel the posted
            // reads (and the kick reads). A read that already completed is still delivered.
            let entry = opcode::AsyncCancel2::new(CancelBuilder::any())
                .build()
                .user_data(ud(OP_CANCEL, 0));
            // SAFETY: a cancel request carries no buffer.
            unsafe { lp.push(entry)? };
            lp.cancel_sent = true;
        }
        lp.interrupts(pair)?;
        if lp.stopping && lp.outstanding == 0 {
            break;
        }
        // Publish before blocking: what this iteration counted (malformed chains completed
        // while popping, a queue found broken, interrupts) must not wait for the next event.
        pair.publish();
        // Known work left (see `again`): enter the kernel without waiting.
        let want = usize::from(!lp.again || lp.stopping);
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
    // Frames still waiting for guest buffers cannot be carried over: last try, then drop.
    lp.drain_rx_waiting(pair);
    while let Some(slot) = lp.rx_waiting.pop_front() {
        pair.drop_deferred(&mut lp.rx[slot]);
        lp.rx_free.push(slot);
    }
    // Interrupts for the last completions.
    pair.interrupts(|q| q.signal());
    Ok(())
}
