//! Driving a queue pair in process, without a TAP (feature `test-utils`, and the crate's own
//! tests): what the engines do with `readv`/`writev`, done with copies through guest memory.
//! For unit tests and fuzz targets: the guest side is whatever wrote the guest memory (the
//! simulated guest in tests, a raw memory image in a fuzzer); this module does not depend on
//! any driver.
//!
//! [`PairHarness`] owns a [`QueuePair`] and plays its engine:
//! - TX: [`PairHarness::tx_next`] pops the next chain and gathers its bytes (vnet header
//!   included: what the TAP would be written), [`PairHarness::tx_complete`] completes it with
//!   a TAP result; several may be outstanding, as with io_uring.
//! - RX: [`PairHarness::rx_prepare`] prepares a read (guest chains, then the spill area),
//!   [`PairHarness::rx_write`] scatters a frame (vnet header included) into its iovecs exactly
//!   as `readv` would (guest buffers first, then the spill area), [`PairHarness::rx_complete`]
//!   completes it; a deferred read is retried with [`PairHarness::rx_retry`], given up with
//!   [`PairHarness::rx_drop_deferred`], or a posted one cancelled with
//!   [`PairHarness::rx_cancel`]. [`PairHarness::rx_deliver`] does prepare, write and complete.
//! - [`PairHarness::check`] reports what the harness found in the used rings right after each
//!   device action (see `check.rs`: a guest whose buffers alias its own rings or each other
//!   only corrupts itself and must not make a correct device look wrong) and verifies the
//!   invariants a fuzzer checks: used ids below the queue size and only ids the device held,
//!   used lengths within the chain's capacity (0 for TX), a delivered frame's bytes where the
//!   used chains say and `num_buffers` right, each read's iovecs the mapping of its guest
//!   ranges, spare list and held heads bounded by the queue size.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::Access;
use crate::features;
use crate::memory::GuestMemory;
use crate::pair::{
    Direction, PairSettings, QueuePair, RxCompletion, RxPrep, RxRead, TxPop, TxWrite,
};
use crate::stats::{Counters, QueuePairStats};
#[cfg(test)]
use crate::tap::VNET_HDR_LEN;
use crate::virtqueue::{QueueConfig, QueueError, Virtqueue};

use check::{Delivered, Placement, UsedChain, UsedWatch};

/// The descriptor-chain walker on its own (one walker for both directions), for fuzz targets
/// and benchmarks of it: a chain's buffers as host iovecs, every rule a guest can break a
/// [`ChainError`](chain::ChainError).
pub mod chain {
    pub use crate::chain::{walk, Access, ChainError, DescTable, Segments, MAX_SEGMENTS};
}

/// A ring configuration at these addresses, starting at index 0, with fresh non-blocking
/// kick and call eventfds.
pub fn queue_config(
    size: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
) -> std::io::Result<QueueConfig> {
    let efd = || -> std::io::Result<OwnedFd> {
        let e = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?;
        Ok(OwnedFd::from(e))
    };
    let ring = tapir_state::RingAddresses::try_from(tapir_state::RawRingAddresses {
        size,
        desc: desc_table,
        avail: avail_ring,
        used: used_ring,
    })
    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    Ok(QueueConfig {
        ring,
        positions: tapir_state::RingPositions::default(),
        kick: efd()?,
        call: efd()?,
    })
}

/// A broken invariant (a device bug, or a hole in its validation of guest input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A used entry names a head at or past the queue size.
    #[error("queue {queue}: used id {id} >= queue size {size}")]
    UsedIdOutOfRange {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
        /// Queue size.
        size: u16,
    },
    /// A used entry names a head the device did not hold (never popped, or used twice).
    #[error("queue {queue}: used id {id} was not held by the device")]
    UsedIdNotHeld {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
    },
    /// A used length larger than the chain's capacity (RX) or not 0 (TX).
    #[error("queue {queue}: used length {len} of id {id} exceeds its capacity {capacity}")]
    UsedLenTooLong {
        /// Queue index.
        queue: u16,
        /// The id.
        id: u32,
        /// The length.
        len: u32,
        /// What the chain can hold (0 for TX).
        capacity: u32,
    },
    /// A delivered frame does not read back as written, or its `num_buffers` is wrong.
    #[error("RX frame {frame} delivered wrong: {reason}")]
    FrameMismatch {
        /// Number of the delivered frame (0-based).
        frame: u64,
        /// What differs.
        reason: String,
    },
    /// A read was prepared with more iovecs than `readv` takes (`UIO_MAXIOV`): the kernel
    /// would refuse it with `EINVAL`.
    #[error("an RX read of {iovecs} iovecs (readv takes at most {max})")]
    TooManyIovecs {
        /// Iovecs of the read (guest pieces and the spill area).
        iovecs: usize,
        /// `UIO_MAXIOV`.
        max: usize,
    },
    /// An iovec of a read is not the host mapping of the guest range it stands for.
    #[error("iovec {index} of an RX read is not the mapping of guest range {gpa:#x}+{len:#x}")]
    IovecMismatch {
        /// Index of the iovec.
        index: usize,
        /// Guest address it stands for.
        gpa: u64,
        /// Its length.
        len: u32,
    },
    /// The pair holds more RX chains than the queue has descriptors.
    #[error("{held} RX heads held, queue size {size}")]
    TooManyHeld {
        /// Held heads.
        held: usize,
        /// Queue size.
        size: u16,
    },
}

/// A TX chain popped and not completed (see [`PairHarness::tx_next`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxSlot(usize);

/// A prepared RX read (see [`PairHarness::rx_prepare`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RxSlot(usize);

/// What [`PairHarness::rx_deliver`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxDelivery {
    /// The guest had no buffers: no read was posted (the frame stays in the TAP).
    NoBuffers,
    /// The read completed: delivered, or dropped and counted.
    Done,
    /// The frame waits in the read's spill area for more guest buffers.
    Deferred(RxSlot),
}

/// Which queues the device wants to interrupt (see [`PairHarness::interrupts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interrupts {
    /// The RX queue's call eventfd was signalled.
    pub rx: bool,
    /// The TX queue's call eventfd was signalled.
    pub tx: bool,
}

#[derive(Debug)]
struct RxState {
    read: RxRead,
    /// The frame written into the read (what the guest must get, but `num_buffers`).
    frame: Vec<u8>,
    /// Bytes the read returned (0: not written yet).
    written: usize,
    /// Where the read put them in guest memory (cut to the frame; the rest went to the
    /// spill area).
    written_at: Vec<(u64, u32)>,
    in_use: bool,
}

/// A queue pair driven in process (see the module documentation).
#[derive(Debug)]
pub struct PairHarness {
    pair: QueuePair,
    tx: Vec<(TxWrite, bool)>,
    rx: Vec<RxState>,
    /// Reads in completion order whose frames must be delivered in that order.
    rx_order: VecDeque<usize>,
    rx_watch: UsedWatch,
    tx_watch: UsedWatch,
    /// Frames delivered whose used entries were not read yet.
    delivered: VecDeque<Delivered>,
    /// RX used chains (id, length, segments as popped) not matched with a frame yet.
    rx_chains: Vec<UsedChain>,
    frames_checked: u64,
    /// A violation seen while driving the pair, reported by the next `check`.
    pending: Option<Violation>,
    mrg_rxbuf: bool,
}

impl PairHarness {
    /// Builds queue pair 0 over `mem` with these rings (validated against `mem` as
    /// [`crate::Device::start`] does) and settings.
    pub fn new(
        mem: GuestMemory,
        rx: QueueConfig,
        tx: QueueConfig,
        settings: PairSettings,
    ) -> Result<PairHarness, QueueError> {
        let event_idx = settings.features & features::F_EVENT_IDX != 0;
        let rx = Virtqueue::new(0, rx, event_idx, &mem)?;
        let tx = Virtqueue::new(1, tx, event_idx, &mem)?;
        let rx_watch = UsedWatch::new(&rx);
        let tx_watch = UsedWatch::new(&tx);
        let pair = QueuePair::new(
            0,
            mem,
            rx,
            tx,
            settings,
            Arc::new(QueuePairStats::default()),
        );
        Ok(PairHarness {
            pair,
            tx: Vec::new(),
            rx: Vec::new(),
            rx_order: VecDeque::new(),
            rx_watch,
            tx_watch,
            delivered: VecDeque::new(),
            rx_chains: Vec::new(),
            frames_checked: 0,
            pending: None,
            mrg_rxbuf: settings.features & features::NET_F_MRG_RXBUF != 0,
        })
    }

    /// The queue pair.
    pub fn pair(&self) -> &QueuePair {
        &self.pair
    }

    /// The queue pair, mutably (to reposition it, or to call what the harness does not wrap).
    pub fn pair_mut(&mut self) -> &mut QueuePair {
        &mut self.pair
    }

    /// Takes the queue pair out.
    pub fn into_pair(self) -> QueuePair {
        self.pair
    }

    /// The pair's counters.
    pub fn counters(&self) -> Counters {
        self.pair.counters
    }

    /// Moves the pair to these positions (see [`QueuePair::reposition`]); the invariant
    /// checks start over from there.
    pub fn reposition(&mut self, positions: &crate::pair::PairPositions) -> Result<(), QueueError> {
        self.pair.reposition(positions)?;
        for (w, q) in [
            (&mut self.rx_watch, &self.pair.rx),
            (&mut self.tx_watch, &self.pair.tx),
        ] {
            let p = q.positions();
            (w.avail_seen, w.seen) = (p.next_avail, p.next_used);
            w.held.iter_mut().for_each(|h| *h = None);
        }
        for &head in &positions.rx_in_flight {
            self.rx_watch
                .hold(&self.pair.mem, &self.pair.rx, Access::DeviceWrites, head);
        }
        Ok(())
    }

    // ---- TX ----------------------------------------------------------------------------

    /// Pops the next TX chain (malformed ones are completed and counted on the way). None
    /// when the avail ring is empty or the queue broken.
    pub fn tx_next(&mut self) -> Option<TxSlot> {
        let slot = match self.tx.iter().position(|(_, busy)| !busy) {
            Some(s) => s,
            None => {
                self.tx.push((TxWrite::new(), false));
                self.tx.len() - 1
            }
        };
        let (w, busy) = self.tx.get_mut(slot)?;
        self.pair.begin_pass();
        let popped = self.pair.pop_tx(w) == TxPop::Chain;
        *busy = popped;
        self.end_batch();
        popped.then_some(TxSlot(slot))
    }

    /// The frame an outstanding TX chain carries (vnet header first), gathered from guest
    /// memory: the bytes a `writev` would hand the TAP.
    pub fn tx_frame(&self, slot: TxSlot) -> Vec<u8> {
        let Some((w, true)) = self.tx.get(slot.0) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(w.seg.len as usize);
        for &(gpa, len) in &w.seg.gpa {
            let start = out.len();
            out.resize(start + len as usize, 0);
            if let Some(buf) = out.get_mut(start..) {
                // The range was validated when the chain was walked.
                let _ = self.pair.mem.mmap().read_slice(buf, GuestAddress(gpa));
            }
        }
        out
    }

    /// Completes an outstanding TX chain with a TAP result (`Ok(bytes)` or `Err(errno)`).
    pub fn tx_complete(&mut self, slot: TxSlot, result: Result<usize, i32>) {
        if let Some((w, busy @ true)) = self.tx.get_mut(slot.0) {
            self.pair.complete_tx(w, result);
            *busy = false;
        }
        self.pair.publish_used();
    }

    /// Pops the next TX chain, gathers its frame and completes it as written: the frame the
    /// TAP would get.
    pub fn tx_send(&mut self) -> Option<Vec<u8>> {
        let slot = self.tx_next()?;
        let frame = self.tx_frame(slot);
        self.tx_complete(slot, Ok(frame.len()));
        Some(frame)
    }

    // ---- RX ----------------------------------------------------------------------------

    /// True when the last operation stopped popping because it had popped twice the queue
    /// size (an engine would come back at once; see [`QueuePair::begin_pass`]).
    pub fn yielded(&self) -> bool {
        self.pair.yielded()
    }

    /// Reads prepared (posted) and not completed, or deferred.
    pub fn rx_outstanding(&self) -> usize {
        self.rx.iter().filter(|s| s.in_use).count()
    }

    /// Prepares a read as an engine posts it (`others_posted` when other reads are
    /// outstanding). None when the guest has no buffers for it.
    pub fn rx_prepare(&mut self) -> Option<RxSlot> {
        let others = self.rx_outstanding() > 0;
        let slot = match self.rx.iter().position(|s| !s.in_use) {
            Some(s) => s,
            None => {
                self.rx.push(RxState {
                    read: RxRead::new(4),
                    frame: Vec::new(),
                    written: 0,
                    written_at: Vec::new(),
                    in_use: false,
                });
                self.rx.len() - 1
            }
        };
        let state = self.rx.get_mut(slot)?;
        self.pair.begin_pass();
        let prepared = self.pair.prepare_rx(&mut state.read, others) == RxPrep::Ready;
        state.in_use = prepared;
        state.written = 0;
        state.frame.clear();
        let iovecs = state.read.seg.iov.len();
        if prepared && iovecs > chain::MAX_SEGMENTS {
            self.pending.get_or_insert(Violation::TooManyIovecs {
                iovecs,
                max: chain::MAX_SEGMENTS,
            });
        }
        if prepared {
            if let Some(v) = iovec_mismatch(&self.pair.mem, &state.read.seg) {
                self.pending.get_or_insert(v);
                // Never write through an iovec that is not the guest range's mapping.
                state.read.seg.iov.clear();
            }
        }
        self.end_batch();
        prepared.then_some(RxSlot(slot))
    }

    /// The bytes of guest buffers a prepared read was posted with (the spill area follows).
    pub fn rx_posted_len(&self, slot: RxSlot) -> usize {
        self.rx
            .get(slot.0)
            .map_or(0, |s| s.read.posted_len() as usize)
    }

    /// Scatters `frame` (vnet header first) into a prepared read's iovecs as `readv` would:
    /// guest buffers first, then the spill area; returns the bytes written (a frame longer
    /// than buffers plus spill is cut, as the TAP would).
    pub fn rx_write(&mut self, slot: RxSlot, frame: &[u8]) -> usize {
        let Some(state) = self.rx.get_mut(slot.0).filter(|s| s.in_use) else {
            return 0;
        };
        let mut left = frame;
        state.written_at.clear();
        for (k, &(gpa, len)) in state.read.seg.gpa.iter().enumerate() {
            let take = (len as usize).min(left.len());
            let (now, rest) = left.split_at(take);
            // As readv does: through the read's host iovec (checked in `rx_prepare` to be
            // the mapping of this guest range).
            if let Some(iov) = state.read.seg.iov.get(k) {
                // SAFETY: `rx_prepare` checked that this iovec is the host mapping of
                // `gpa..gpa+len`, inside guest memory, and `take <= len`.
                unsafe {
                    std::ptr::copy_nonoverlapping(now.as_ptr(), iov.iov_base.cast::<u8>(), take);
                }
            }
            if take > 0 {
                state
                    .written_at
                    .push((gpa, u32::try_from(take).unwrap_or(u32::MAX)));
            }
            left = rest;
        }
        let spill = state.read.spill_mut();
        let take = spill.len().min(left.len());
        if let (Some(dst), Some(src)) = (spill.get_mut(..take), left.get(..take)) {
            dst.copy_from_slice(src);
        }
        let n = frame.len() - left.len() + take;
        state.frame.clear();
        state
            .frame
            .extend_from_slice(frame.get(..n).unwrap_or_default());
        state.written = n;
        n
    }

    /// Completes a read with the bytes [`rx_write`](Self::rx_write) wrote.
    pub fn rx_complete(&mut self, slot: RxSlot) -> RxCompletion {
        let Some(state) = self.rx.get_mut(slot.0).filter(|s| s.in_use) else {
            return RxCompletion::Done;
        };
        let n = state.written;
        state.read.set_frame(n);
        self.rx_order.push_back(slot.0);
        self.rx_retry_waiting()
    }

    /// Tries again to complete the deferred reads, in completion order (the guest posted
    /// buffers). Returns what became of the oldest one.
    pub fn rx_retry(&mut self) -> RxCompletion {
        self.rx_retry_waiting()
    }

    fn rx_retry_waiting(&mut self) -> RxCompletion {
        self.pair.begin_pass();
        while let Some(&slot) = self.rx_order.front() {
            let Some(state) = self.rx.get_mut(slot) else {
                self.rx_order.pop_front();
                continue;
            };
            let before = self.pair.counters;
            // Before the device clears the read.
            let posted = state.read.posted_len() as usize;
            if self.pair.retry_rx(&mut state.read) == RxCompletion::Deferred {
                self.pair.publish_used();
                return RxCompletion::Deferred;
            }
            let after = &self.pair.counters;
            if after.rx_packets > before.rx_packets {
                self.delivered.push_back(Delivered {
                    frame: std::mem::take(&mut state.frame),
                    written: std::mem::take(&mut state.written_at),
                    posted,
                    placement: if after.rx_reordered > before.rx_reordered {
                        Placement::Moved
                    } else {
                        Placement::InPlace
                    },
                });
            }
            state.in_use = false;
            self.rx_order.pop_front();
            // Read what the device wrote before anything else can land on it.
            self.capture();
        }
        self.end_batch();
        RxCompletion::Done
    }

    /// Cancels a prepared read that was not completed (its chains go back to the spare list),
    /// as a stopping engine does.
    pub fn rx_cancel(&mut self, slot: RxSlot) {
        if self.rx_order.contains(&slot.0) {
            return;
        }
        if let Some(state) = self.rx.get_mut(slot.0).filter(|s| s.in_use) {
            self.pair.return_rx(&mut state.read);
            state.in_use = false;
        }
        self.pair.publish_used();
    }

    /// Drops the frames waiting for guest buffers (counted), as a stopping engine does.
    pub fn rx_drop_deferred(&mut self) {
        while let Some(slot) = self.rx_order.pop_front() {
            if let Some(state) = self.rx.get_mut(slot) {
                self.pair.drop_deferred(&mut state.read);
                state.in_use = false;
            }
        }
        self.pair.publish_used();
    }

    /// Prepares a read, writes `frame` into it and completes it.
    pub fn rx_deliver(&mut self, frame: &[u8]) -> RxDelivery {
        let Some(slot) = self.rx_prepare() else {
            return RxDelivery::NoBuffers;
        };
        self.rx_write(slot, frame);
        match self.rx_complete(slot) {
            RxCompletion::Done => RxDelivery::Done,
            RxCompletion::Deferred => RxDelivery::Deferred(slot),
        }
    }

    // ---- interrupts and invariants ---------------------------------------------------------

    /// What an engine does after each batch: the used entries are published (the guest sees
    /// them), then the harness reads what the device wrote.
    fn end_batch(&mut self) {
        self.pair.publish_used();
        self.capture();
    }

    /// Raises the interrupts the device owes the guest (signalling the call eventfds).
    pub fn interrupts(&mut self) -> Interrupts {
        let mut irq = Interrupts::default();
        self.pair.interrupts(|dir| match dir {
            Direction::Rx => irq.rx = true,
            Direction::Tx => irq.tx = true,
        });
        if irq.rx {
            self.pair.signal(Direction::Rx);
        }
        if irq.tx {
            self.pair.signal(Direction::Tx);
        }
        irq
    }

    /// Publishes the counters to the pair's shared stats.
    pub fn publish(&self) {
        self.pair.publish();
    }

    /// Reports the first violation seen since the last check (used entries and frames are
    /// checked as the device writes them: see [`check`](self::check)), then the pair's
    /// bounds.
    pub fn check(&mut self) -> Result<(), Violation> {
        self.capture();
        if let Some(v) = self.pending.take() {
            return Err(v);
        }
        let size = self.pair.rx.table().size;
        let held = self.pair.spare_rx().count();
        if held > usize::from(size) {
            return Err(Violation::TooManyHeld { held, size });
        }
        Ok(())
    }
}

/// The first guest piece of `seg` whose iovec is not the host mapping of its guest range.
fn iovec_mismatch(mem: &GuestMemory, seg: &chain::Segments) -> Option<Violation> {
    seg.gpa.iter().enumerate().find_map(|(index, &(gpa, len))| {
        let mut pieces = Vec::new();
        let ok = mem.translate(gpa, len, |p, l| pieces.push((p, l))).is_ok();
        let iov = seg.iov.get(index);
        let same = ok
            && pieces.len() == 1
            && iov.is_some_and(|v| pieces.first() == Some(&(v.iov_base.cast::<u8>(), v.iov_len)));
        (!same).then_some(Violation::IovecMismatch { index, gpa, len })
    })
}

#[cfg(test)]
mod aliasing_tests;
mod check;
#[cfg(test)]
mod tests;
