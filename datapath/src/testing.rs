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
//! - [`PairHarness::check`] reads what the device put in the used rings since the last check
//!   and verifies the invariants a fuzzer checks: used ids below the queue size and only ids
//!   the device held, used lengths within the chain's capacity (0 for TX), a delivered frame's
//!   bytes and `num_buffers` exactly right, spare list and held heads bounded by the queue size.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use vm_memory::{Bytes, GuestAddress};

use crate::chain::{self, Access};
use crate::features;
use crate::memory::GuestMemory;
use crate::pair::{
    Direction, PairSettings, QueuePair, RxCompletion, RxPrep, RxRead, TxPop, TxWrite,
};
use crate::stats::{Counters, QueuePairStats};
use crate::tap::VNET_HDR_LEN;
use crate::virtqueue::{QueueConfig, QueueError, Virtqueue};
use crate::vnet_hdr::NUM_BUFFERS_OFFSET;

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
    Ok(QueueConfig {
        size,
        desc_table,
        avail_ring,
        used_ring,
        next_avail: 0,
        next_used: 0,
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
    in_use: bool,
}

/// Ring bookkeeping of one queue, for [`PairHarness::check`], kept from the rings alone.
#[derive(Debug)]
struct UsedWatch {
    /// Next used index not checked yet.
    seen: u16,
    /// Next avail index whose head was not noted yet.
    avail_seen: u16,
    /// Capacity (bytes, as walked when the device popped it) of each head the device popped
    /// and has not used, by head.
    held: Vec<Option<u32>>,
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
    /// Frames delivered whose used entries `check` has not matched yet.
    delivered: VecDeque<Vec<u8>>,
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
        let watch = |q: &Virtqueue| UsedWatch {
            seen: q.positions().1,
            avail_seen: q.positions().0,
            held: vec![None; usize::from(q.table().size)],
        };
        let rx_watch = watch(&rx);
        let tx_watch = watch(&tx);
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
            (w.avail_seen, w.seen) = q.positions();
            w.held.iter_mut().for_each(|h| *h = None);
        }
        for &head in &positions.rx_in_flight {
            let mut seg = chain::Segments::default();
            let walked = chain::walk(
                &self.pair.mem,
                self.pair.rx.table(),
                head,
                Access::DeviceWrites,
                &mut seg,
            );
            if let (Ok(()), Some(h)) = (walked, self.rx_watch.held.get_mut(usize::from(head))) {
                *h = Some(seg.len);
            }
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
        self.note_pops();
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
        self.note_pops();
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
        for &(gpa, len) in &state.read.seg.gpa {
            let take = (len as usize).min(left.len());
            let (now, rest) = left.split_at(take);
            // The range was validated when the chain was walked.
            let _ = self.pair.mem.mmap().write_slice(now, GuestAddress(gpa));
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
            let before = self.pair.counters.rx_packets;
            if self.pair.retry_rx(&mut state.read) == RxCompletion::Deferred {
                return RxCompletion::Deferred;
            }
            if self.pair.counters.rx_packets > before {
                self.delivered.push_back(std::mem::take(&mut state.frame));
            }
            state.in_use = false;
            self.rx_order.pop_front();
        }
        self.note_pops();
        RxCompletion::Done
    }

    /// Notes the heads the device popped since the last call, from the avail rings.
    fn note_pops(&mut self) {
        note_pops(
            &self.pair.mem,
            &self.pair.rx,
            Access::DeviceWrites,
            &mut self.rx_watch,
        );
        note_pops(
            &self.pair.mem,
            &self.pair.tx,
            Access::DeviceReads,
            &mut self.tx_watch,
        );
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
    }

    /// Drops the frames waiting for guest buffers (counted), as a stopping engine does.
    pub fn rx_drop_deferred(&mut self) {
        while let Some(slot) = self.rx_order.pop_front() {
            if let Some(state) = self.rx.get_mut(slot) {
                self.pair.drop_deferred(&mut state.read);
                state.in_use = false;
            }
        }
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

    /// Checks everything the device added to the used rings since the last check, and the
    /// pair's bounds (see the module documentation).
    pub fn check(&mut self) -> Result<(), Violation> {
        self.note_pops();
        if let Some(v) = self.pending.take() {
            return Err(v);
        }
        let size = self.pair.rx.table().size;
        let held = self.pair.spare_rx().count();
        if held > usize::from(size) {
            return Err(Violation::TooManyHeld { held, size });
        }
        let tx_entries = used_entries(&self.pair.mem, &self.pair.tx, &mut self.tx_watch.seen);
        for (id, len) in tx_entries {
            take_held(&mut self.tx_watch, self.pair.tx.index, id, len)?;
        }
        let rx_entries = used_entries(&self.pair.mem, &self.pair.rx, &mut self.rx_watch.seen);
        // Group the entries into frames: used length 0 is a chain given back empty
        // (malformed, or at a give-back); a frame's chains are consecutive.
        let mut frame_chains: Vec<(u16, u32)> = Vec::new();
        let mut frames: Vec<Vec<(u16, u32)>> = Vec::new();
        for (id, len) in rx_entries {
            take_held(&mut self.rx_watch, self.pair.rx.index, id, len)?;
            if len == 0 {
                continue;
            }
            let head = u16::try_from(id).unwrap_or(u16::MAX);
            frame_chains.push((head, len));
            let first = frame_chains.first().copied();
            let want = match first {
                Some((h, _)) if self.mrg_rxbuf => self.num_buffers_of(h),
                _ => 1,
            };
            if frame_chains.len() >= usize::from(want.max(1)) {
                frames.push(std::mem::take(&mut frame_chains));
            }
        }
        if !frame_chains.is_empty() {
            frames.push(frame_chains);
        }
        for chains in frames {
            self.check_frame(&chains)?;
        }
        Ok(())
    }

    /// `num_buffers` as the device wrote it into the chain at `head` (whose descriptors
    /// still describe it: nothing runs between the device's write and this read).
    fn num_buffers_of(&self, head: u16) -> u16 {
        let bytes = self.chain_bytes(head, VNET_HDR_LEN);
        let lo = bytes.get(NUM_BUFFERS_OFFSET).copied().unwrap_or(0);
        let hi = bytes.get(NUM_BUFFERS_OFFSET + 1).copied().unwrap_or(0);
        u16::from_le_bytes([lo, hi])
    }

    /// The first `max` bytes of the chain at `head`, read from guest memory.
    fn chain_bytes(&self, head: u16, max: usize) -> Vec<u8> {
        let mut seg = chain::Segments::default();
        if chain::walk(
            &self.pair.mem,
            self.pair.rx.table(),
            head,
            Access::DeviceWrites,
            &mut seg,
        )
        .is_err()
        {
            return Vec::new();
        }
        let mut out = Vec::new();
        for &(gpa, len) in &seg.gpa {
            if out.len() >= max {
                break;
            }
            let take = (len as usize).min(max - out.len());
            let start = out.len();
            out.resize(start + take, 0);
            if let Some(buf) = out.get_mut(start..) {
                let _ = self.pair.mem.mmap().read_slice(buf, GuestAddress(gpa));
            }
        }
        out
    }

    fn check_frame(&mut self, chains: &[(u16, u32)]) -> Result<(), Violation> {
        let frame_no = self.frames_checked;
        self.frames_checked += 1;
        let bad = |reason: String| Violation::FrameMismatch {
            frame: frame_no,
            reason,
        };
        let Some(expected) = self.delivered.pop_front() else {
            return Err(bad(format!(
                "used entries {chains:?} but no frame was delivered"
            )));
        };
        let mut got = Vec::with_capacity(expected.len());
        for &(head, len) in chains {
            got.extend(self.chain_bytes(head, len as usize));
        }
        let want_nb = if self.mrg_rxbuf { chains.len() } else { 1 };
        let nb = got
            .get(NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2)
            .map(|b| usize::from(u16::from_le_bytes([b[0], b[1]])));
        if self.mrg_rxbuf || nb.is_some() {
            // Without MRG_RXBUF num_buffers is 1 as well (virtio 1.2 §5.1.6.4).
            if nb != Some(want_nb) {
                return Err(bad(format!(
                    "num_buffers {nb:?}, {want_nb} chains used ({chains:?})"
                )));
            }
        }
        if got.len() != expected.len() {
            return Err(bad(format!(
                "{} bytes in the used chains, {} bytes read from the TAP",
                got.len(),
                expected.len()
            )));
        }
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            let in_nb = (NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2).contains(&i);
            if g != e && !in_nb {
                return Err(bad(format!("byte {i} is {g:#x}, the TAP read {e:#x}")));
            }
        }
        Ok(())
    }
}

/// The used entries the device added to `q` since `seen` (which is advanced).
fn used_entries(mem: &GuestMemory, q: &Virtqueue, seen: &mut u16) -> Vec<(u32, u32)> {
    let (_, next_used) = q.positions();
    let size = q.table().size.max(1);
    let used_ring = q.used_ring();
    let mut out = Vec::new();
    while *seen != next_used {
        let slot = u64::from(*seen % size);
        let addr = used_ring + 4 + 8 * slot;
        let id: u32 = mem.mmap().read_obj(GuestAddress(addr)).unwrap_or(u32::MAX);
        let len: u32 = mem
            .mmap()
            .read_obj(GuestAddress(addr + 4))
            .unwrap_or(u32::MAX);
        out.push((u32::from_le(id), u32::from_le(len)));
        *seen = seen.wrapping_add(1);
    }
    out
}

/// Notes the heads popped from `q` since `watch.avail_seen`, with the capacity their chains
/// have now (what the device walked when it popped them: nothing ran in between).
fn note_pops(mem: &GuestMemory, q: &Virtqueue, access: Access, watch: &mut UsedWatch) {
    let (next, _) = q.positions();
    if next.wrapping_sub(watch.avail_seen) > q.table().size {
        // Rewound (a give-back) or a jump the queue refused: start over from here.
        watch.avail_seen = next;
        return;
    }
    while watch.avail_seen != next {
        if let Some(head) = q.avail_head(mem, watch.avail_seen) {
            let mut seg = chain::Segments::default();
            let walked = chain::walk(mem, q.table(), head, access, &mut seg).is_ok();
            let capacity = match access {
                Access::DeviceWrites => seg.len,
                Access::DeviceReads => 0,
            };
            if let Some(h) = watch.held.get_mut(usize::from(head)) {
                *h = walked.then_some(capacity);
            }
        }
        watch.avail_seen = watch.avail_seen.wrapping_add(1);
    }
}

fn take_held(watch: &mut UsedWatch, queue: u16, id: u32, len: u32) -> Result<(), Violation> {
    let size = u16::try_from(watch.held.len()).unwrap_or(u16::MAX);
    let slot = usize::try_from(id).unwrap_or(usize::MAX);
    let Some(entry) = watch.held.get_mut(slot) else {
        return Err(Violation::UsedIdOutOfRange { queue, id, size });
    };
    match entry.take() {
        // A chain refused as malformed is used (length 0) without ever being handed out.
        None if len == 0 => Ok(()),
        None => Err(Violation::UsedIdNotHeld { queue, id }),
        Some(capacity) if len > capacity => Err(Violation::UsedLenTooLong {
            queue,
            id,
            len,
            capacity,
        }),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests;
