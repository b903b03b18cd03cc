//! One queue pair's device logic, shared by both engines: popping and validating chains,
//! building the iovecs of TAP reads and writes, and completing them into the used rings
//! (`num_buffers`, dirty logging, counters). The engines only move bytes.
//!
//! Everything here is driven by guest-written values (heads, lengths, ring indices): nothing
//! indexes or slices unchecked (`clippy::indexing_slicing` is denied), and every loop that
//! pops from an avail ring is bounded by the queue size (a guest that keeps posting cannot
//! keep a worker from its stop).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::sync::Arc;

use crate::chain::{self, Access, ChainError, Segments};
use crate::features;
use crate::memory::{DirtyLogging, GuestMemory};
use crate::rx_pool::{RxChain, RxPool, MAX_RX_PIECES};
use crate::stats::{Counters, QueuePairStats};
use crate::tap::VNET_HDR_LEN;
use crate::virtqueue::{QueueError, Virtqueue};
use crate::vnet_hdr::NUM_BUFFERS_OFFSET;

/// Size of the spill area behind every RX read. With MRG_RXBUF a read is posted with guest
/// buffers for the frame size recent traffic predicts; a larger frame spills here and is copied
/// into further chains on completion. A frame that does not fit guest buffers plus spill, or
/// that would need more chains than the guest has posted, is dropped and counted: never
/// truncated silently.
pub const SPILL_LEN: usize = 128 * 1024;

const VNET_HDR_LEN_U32: u32 = 12;
const _: () = assert!(VNET_HDR_LEN_U32 as usize == VNET_HDR_LEN);

/// Outcome of continuing a frame into further chains.
enum Spill {
    Done,
    Wait,
    Drop,
}

/// Counts one event (counters are u64: wrapping is a formality).
fn bump(counter: &mut u64) {
    *counter = counter.wrapping_add(1);
}

/// Which queue of the pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Device to guest.
    Rx,
    /// Guest to device.
    Tx,
}

/// The guest buffers behind one posted TAP read: one chain, or several with MRG_RXBUF.
#[derive(Debug)]
pub struct RxRead {
    /// Host iovecs of every chain, then the spill area.
    pub seg: Segments,
    /// The chains, in order.
    chains: Vec<RxChain>,
    /// Where bytes beyond the posted chains land (pages are only touched when used).
    spill: Box<[u8]>,
    /// Guest bytes the read was posted with (the spill area follows them).
    posted: u32,
    /// Length of the frame the read returned (header included), once it completed.
    frame: usize,
    /// The frame is waiting for guest buffers.
    deferred: bool,
}

/// What became of a completed read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxCompletion {
    /// Delivered to the guest, or dropped and counted: the read is free again.
    Done,
    /// The frame overran the posted buffers and the guest has not posted enough further ones
    /// yet: it waits in the read's spill area ([`QueuePair::retry_rx`] when the guest
    /// refills). Frames after it must wait too, to stay in order.
    Deferred,
}

impl RxRead {
    /// An empty read with room for `chains` chains.
    pub fn new(chains: usize) -> RxRead {
        RxRead {
            seg: Segments::with_capacity(chains.saturating_mul(2).saturating_add(1)),
            chains: Vec::with_capacity(chains),
            spill: vec![0u8; SPILL_LEN].into_boxed_slice(),
            posted: 0,
            frame: 0,
            deferred: false,
        }
    }

    /// Records the length of the frame the read returned (see [`QueuePair::retry_rx`]).
    pub fn set_frame(&mut self, n: usize) {
        self.frame = n;
    }

    /// Bytes of guest buffers the read was posted with (the spill area follows them).
    pub fn posted_len(&self) -> u32 {
        self.posted
    }

    /// The spill area (what a read writes beyond the guest buffers).
    #[cfg(any(test, feature = "test-utils"))]
    pub(crate) fn spill_mut(&mut self) -> &mut [u8] {
        &mut self.spill
    }

    fn clear(&mut self) {
        self.seg.clear();
        self.chains.clear();
        self.posted = 0;
        self.frame = 0;
        self.deferred = false;
    }
}

/// The guest buffers behind one TAP write.
#[derive(Debug)]
pub struct TxWrite {
    /// The chain's head.
    pub head: u16,
    /// Host iovecs of the chain.
    pub seg: Segments,
}

impl TxWrite {
    /// An empty write.
    pub fn new() -> TxWrite {
        TxWrite {
            head: 0,
            seg: Segments::with_capacity(4),
        }
    }
}

impl Default for TxWrite {
    fn default() -> Self {
        TxWrite::new()
    }
}

/// Where a queue pair resumes: each queue's (next_avail, next_used) and the RX heads a
/// predecessor held, in ring order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairPositions {
    /// RX (next_avail, next_used).
    pub rx: (u16, u16),
    /// TX (next_avail, next_used).
    pub tx: (u16, u16),
    /// RX heads popped and not used, in ring order.
    pub rx_in_flight: Vec<u16>,
}

impl PairPositions {
    /// Checks positions against a queue size: as many RX heads held as the ring positions
    /// say are outstanding, each below the size and listed once, no TX chain outstanding.
    pub fn check(&self, size_rx: u16, size_tx: u16) -> Result<(), String> {
        let outstanding = usize::from(self.rx.0.wrapping_sub(self.rx.1));
        if outstanding > usize::from(size_rx) || self.rx_in_flight.len() != outstanding {
            return Err(format!(
                "{} RX heads held, ring positions say {outstanding}",
                self.rx_in_flight.len()
            ));
        }
        if self.tx.0 != self.tx.1 || size_tx == 0 {
            return Err("TX chains outstanding at a switch".into());
        }
        let mut seen = vec![false; usize::from(size_rx)];
        for &h in &self.rx_in_flight {
            match seen.get_mut(usize::from(h)) {
                Some(s) if !*s => *s = true,
                _ => return Err(format!("RX head {h} out of range or listed twice")),
            }
        }
        Ok(())
    }
}

/// Settings of a queue pair's datapath.
#[derive(Clone, Copy, Debug)]
pub struct PairSettings {
    /// Negotiated virtio features.
    pub features: u64,
    /// Link MTU (sizes RX reads when the guest takes no GSO frames).
    pub mtu: u16,
}

/// One queue pair: its rings and counters. It does no I/O: the engine that runs it owns the
/// TAP queue and moves the bytes (so a pair can also be driven in process, see
/// `crate::testing`).
#[derive(Debug)]
pub struct QueuePair {
    /// Queue pair number.
    pub index: u16,
    /// Guest memory.
    pub mem: GuestMemory,
    /// RX virtqueue (2n).
    pub rx: Virtqueue,
    /// TX virtqueue (2n + 1).
    pub tx: Virtqueue,
    /// Counters, published to `stats`.
    pub counters: Counters,
    /// Where counters are published.
    pub stats: Arc<QueuePairStats>,
    mrg_rxbuf: bool,
    /// Bytes (header included) of the largest frame the TAP may hand over.
    rx_capacity: u32,
    /// Bytes of the largest frame without GSO: an MRG_RXBUF read always covers this.
    rx_plain: u32,
    /// Moving average of received frame sizes (header included), in bytes.
    rx_ewma: u32,
    /// RX chains popped from the avail ring (and walked) but not inside a posted read.
    rx_pool: RxPool,
    rx_used_pending: bool,
    tx_used_pending: bool,
    serviced: bool,
    /// Pops left in this pass of the worker's loop, per queue ([`QueuePair::begin_pass`]).
    rx_budget: usize,
    tx_budget: usize,
    /// A pop was refused in this pass because the budget was spent: the engine must come
    /// back without waiting for a kick.
    yielded: bool,
    /// Whether each queue's guest is asked to kick (see [`Notify`]).
    rx_notify: Notify,
    tx_notify: Notify,
    /// The worker failed: nothing is serviced any more.
    broken: bool,
}

/// Whether a queue's guest is asked to kick. A queue starts armed; popping quiets it (no kicks
/// while the device drains the ring anyway) and running dry re-arms it, with the lost-wakeup
/// re-check of virtio 1.2 §2.7.10 ([`QueuePair::pop_tx`], [`QueuePair::prepare_rx`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Notify {
    /// The guest kicks on its next addition.
    Armed,
    /// The guest was asked not to kick (a no-op with EVENT_IDX).
    Quiet,
}

/// What re-arming a queue found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rearm {
    /// The guest kicks on its next addition, and nothing arrived meanwhile: wait for it.
    Armed,
    /// Buffers arrived while arming, or this pass's budget is spent: carry on without waiting.
    Again,
}

/// What [`QueuePair::pop_tx`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxPop {
    /// A chain, in the `TxWrite`.
    Chain,
    /// The ring is empty and the guest's kick is armed (or the queue is broken): wait.
    Idle,
    /// This pass popped as many chains as it may (see [`QueuePair::begin_pass`]): come back
    /// without waiting for a kick.
    Yield,
}

/// What [`QueuePair::prepare_rx`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxPrep {
    /// The read has guest buffers and the spill area: post it.
    Ready,
    /// The guest has not posted (enough) buffers and its kick is armed: wait for it.
    NoBuffers,
    /// This pass popped as many chains as it may: come back without waiting for a kick.
    Withheld,
}

/// What [`QueuePair::retry_deferred`] did with a frame waiting for guest buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxRetry {
    /// Delivered (or dropped and counted): the read is free again.
    Done,
    /// Still waiting, and the guest's kick is armed: wait for it.
    Waiting,
    /// Still waiting, and this pass's budget is spent: come back without waiting.
    Yield,
}

/// What [`QueuePair::next_tx`] found (one pop, without the notification protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TxNext {
    /// A chain, in the `TxWrite`.
    Chain,
    /// The avail ring is empty (or the queue broken).
    Empty,
    /// This pass popped as many chains as the queue holds (malformed ones, a guest that
    /// keeps posting): come back without waiting for a kick.
    Later,
}

/// What [`QueuePair::fill_rx_read`] did (without the notification protocol).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RxPrepare {
    /// The read has guest buffers and the spill area: post it.
    Ready,
    /// The guest has not posted (enough) buffers: enable notifications, re-check, wait.
    NoBuffers,
    /// This pass popped as many chains as the queue holds: come back without waiting.
    Later,
}

impl QueuePair {
    /// Assembles a queue pair.
    pub fn new(
        index: u16,
        mem: GuestMemory,
        rx: Virtqueue,
        tx: Virtqueue,
        settings: PairSettings,
        stats: Arc<QueuePairStats>,
    ) -> QueuePair {
        let capacity = features::rx_frame_capacity(settings.features, settings.mtu);
        let rx_size = rx.table().size;
        let rx_queue_size = usize::from(rx_size);
        let tx_queue_size = usize::from(tx.table().size);
        QueuePair {
            index,
            mem,
            rx,
            tx,
            counters: Counters::default(),
            stats,
            mrg_rxbuf: settings.features & features::NET_F_MRG_RXBUF != 0,
            rx_capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            rx_plain: u32::try_from(
                VNET_HDR_LEN.saturating_add(features::max_plain_frame(settings.mtu)),
            )
            .unwrap_or(u32::MAX),
            rx_ewma: 0,
            rx_pool: RxPool::new(rx_size),
            rx_used_pending: false,
            tx_used_pending: false,
            serviced: false,
            rx_budget: rx_queue_size.saturating_mul(2),
            tx_budget: tx_queue_size.saturating_mul(2),
            yielded: false,
            rx_notify: Notify::Armed,
            tx_notify: Notify::Armed,
            broken: false,
        }
    }

    /// Starts a pass of the worker's loop: each queue may pop twice its size in it, so that
    /// a guest that keeps posting (malformed chains, say) cannot keep the worker from
    /// noticing its stop. [`yielded`](Self::yielded) says whether the budget ran out.
    pub fn begin_pass(&mut self) {
        self.rx_budget = usize::from(self.rx.table().size).saturating_mul(2);
        self.tx_budget = usize::from(self.tx.table().size).saturating_mul(2);
        self.yielded = false;
    }

    /// True when a pop was refused in this pass for want of budget: more may be available
    /// (and no kick will say so), so the engine must come back without waiting.
    pub fn yielded(&self) -> bool {
        self.yielded
    }

    /// Marks the pair broken (its worker failed): both queues are serviced no more. Counted
    /// once (`pairs_broken`) and logged.
    pub fn mark_broken(&mut self, reason: &str) {
        if self.broken {
            return;
        }
        self.broken = true;
        self.counters.pairs_broken = self.counters.pairs_broken.saturating_add(1);
        tracing::error!(pair = self.index, %reason, "queue pair broken: its worker failed");
        let why = format!("queue pair {} broken: {reason}", self.index);
        self.rx.set_broken(&why);
        self.tx.set_broken(&why);
        self.publish();
    }

    /// Moves the pair to where a predecessor stopped (before its worker services anything).
    pub fn reposition(&mut self, p: &PairPositions) -> Result<(), QueueError> {
        self.rx.set_positions(p.rx.0, p.rx.1);
        self.tx.set_positions(p.tx.0, p.tx.1);
        self.restore_rx_in_flight(&p.rx_in_flight)
    }

    /// Takes over RX heads a predecessor popped and did not use (in ring order). Each must be
    /// below the queue size and listed once, and there must be exactly as many as the ring
    /// positions say are outstanding (`next_avail - next_used`).
    pub fn restore_rx_in_flight(&mut self, heads: &[u16]) -> Result<(), QueueError> {
        let (next_avail, next_used) = self.rx.positions();
        let outstanding = usize::from(next_avail.wrapping_sub(next_used));
        let size = usize::from(self.rx.table().size);
        let mut seen = vec![false; size];
        let bad = |reason: String| QueueError::InvalidConfig {
            index: self.rx.index,
            reason,
        };
        if heads.len() != outstanding {
            return Err(bad(format!(
                "{} in-flight heads, but the ring positions say {outstanding}",
                heads.len()
            )));
        }
        for &h in heads {
            match seen.get_mut(usize::from(h)) {
                Some(s) if !*s => *s = true,
                Some(_) => return Err(bad(format!("in-flight head {h} listed twice"))),
                None => return Err(bad(format!("in-flight head {h} >= queue size {size}"))),
            }
        }
        self.rx_pool.clear();
        for &h in heads {
            self.rx_pool.note_popped(h);
            // Checked above: in range and listed once.
            let _ = self.rx.hold(h);
            match self.rx_pool.walk(&self.mem, self.rx.view(), h) {
                Ok(c) => self.rx_pool.push_back(c),
                Err(e) => {
                    bump(&mut self.counters.rx_malformed);
                    tracing::warn!(queue = self.rx.index, head = h, error = %e, "dropping malformed RX chain");
                    self.complete_used(Direction::Rx, h, 0);
                }
            }
        }
        Ok(())
    }

    /// True once the pair's worker failed: its queues are serviced no more.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// A kick fd of this pair can never deliver a kick (end of file, an error: not an
    /// eventfd): that queue is marked broken instead of being polled again.
    pub fn kick_failed(&mut self, dir: Direction) {
        let q = match dir {
            Direction::Rx => &mut self.rx,
            Direction::Tx => &mut self.tx,
        };
        if q.set_broken("its kick fd reports end of file or an error (not an eventfd)") {
            bump(&mut self.counters.queues_broken);
        }
    }

    /// Publishes the counters.
    pub fn publish(&self) {
        self.stats.counters.publish(&self.counters);
    }

    /// RX heads held back (popped, in no read), in order: what a handoff re-posts.
    pub fn spare_rx(&self) -> impl Iterator<Item = u16> + '_ {
        self.rx_pool.heads()
    }

    /// Puts the held RX heads back in the order they were popped (reads that were cancelled
    /// or refused hand their chains back in completion order). Called once a worker stopped.
    pub fn settle_rx_order(&mut self) {
        self.rx_pool.settle_order();
    }

    // ---- notifications: the lost-wakeup protocol, written once ---------------------------

    /// Asks the guest not to kick while the device drains the ring (once per drain).
    fn quiet(&mut self, dir: Direction) {
        let (q, notify) = match dir {
            Direction::Rx => (&mut self.rx, &mut self.rx_notify),
            Direction::Tx => (&mut self.tx, &mut self.tx_notify),
        };
        if *notify == Notify::Armed {
            q.disable_notification();
            *notify = Notify::Quiet;
        }
    }

    /// The ring ran dry: arm the guest's kick, then look again (virtio 1.2 §2.7.10: buffers
    /// added between the last pop and the arming raise no kick, so going to sleep without the
    /// re-check could sleep forever). A spent budget also means "again": more may wait.
    fn rearm(&mut self, dir: Direction) -> Rearm {
        if self.yielded {
            return Rearm::Again;
        }
        let (q, notify) = match dir {
            Direction::Rx => (&mut self.rx, &mut self.rx_notify),
            Direction::Tx => (&mut self.tx, &mut self.tx_notify),
        };
        *notify = Notify::Armed;
        if q.enable_notification() {
            Rearm::Again
        } else {
            Rearm::Armed
        }
    }

    // ---- TX ----------------------------------------------------------------------------

    /// Pops the next TX chain into `w`, with the notification protocol: kicks are off while
    /// chains are popped; when the ring runs dry the guest's kick is armed and the ring
    /// re-checked ([`TxPop::Idle`] only when it is really empty). Malformed chains are
    /// completed with length 0 and counted on the way.
    pub fn pop_tx(&mut self, w: &mut TxWrite) -> TxPop {
        loop {
            self.quiet(Direction::Tx);
            match self.next_tx(w) {
                TxNext::Chain => return TxPop::Chain,
                TxNext::Later => return TxPop::Yield,
                TxNext::Empty => match self.rearm(Direction::Tx) {
                    Rearm::Armed => return TxPop::Idle,
                    Rearm::Again if self.yielded => return TxPop::Yield,
                    Rearm::Again => {}
                },
            }
        }
    }

    /// Pops the next TX chain into `w`. Malformed chains are completed with length 0 and
    /// counted. At most the pass's budget of chains is popped ([`TxNext::Later`]).
    pub(crate) fn next_tx(&mut self, w: &mut TxWrite) -> TxNext {
        loop {
            if self.tx_budget == 0 {
                self.yielded = true;
                return TxNext::Later;
            }
            self.tx_budget = self.tx_budget.saturating_sub(1);
            let mut head = None;
            if let Err(e) = self.tx.pop(1, |h| head = Some(h)) {
                self.count_broken(Direction::Tx, &e);
                return TxNext::Empty;
            }
            let Some(head) = head else {
                return TxNext::Empty;
            };
            w.head = head;
            w.seg.clear();
            let walked = chain::walk_ring(
                &self.mem,
                self.tx.view(),
                head,
                Access::DeviceReads,
                &mut w.seg,
            );
            let checked = walked.and(if (w.seg.len as usize) < VNET_HDR_LEN {
                Err(ChainError::ShorterThanHeader(w.seg.len))
            } else {
                Ok(())
            });
            match checked {
                Ok(()) => return TxNext::Chain,
                Err(e) => {
                    bump(&mut self.counters.tx_malformed);
                    tracing::warn!(queue = self.tx.index, head, error = %e, "dropping malformed TX chain");
                    self.complete_used(Direction::Tx, head, 0);
                }
            }
        }
    }

    /// Completes a TX write with the kernel's result.
    pub fn complete_tx(&mut self, w: &TxWrite, result: Result<usize, i32>) {
        match result {
            Ok(_) => {
                bump(&mut self.counters.tx_packets);
                // The chain was checked to hold at least the header.
                self.counters.tx_bytes = (self.counters.tx_bytes)
                    .wrapping_add(u64::from(w.seg.len.saturating_sub(VNET_HDR_LEN_U32)));
            }
            Err(errno) => {
                bump(&mut self.counters.tx_errors);
                tracing::debug!(head = w.head, errno, "TAP refused a TX frame");
            }
        }
        self.complete_used(Direction::Tx, w.head, 0);
    }

    // ---- RX ----------------------------------------------------------------------------

    /// Pops up to `max` chains from the avail ring into the spare list, walking each (a
    /// malformed one is completed with length 0 and counted). Returns how many were popped.
    fn fill_spare(&mut self, max: usize) -> usize {
        let mut heads = [0u16; 64];
        let mut n = 0usize;
        let max = max.min(heads.len()).min(self.rx_budget);
        if max == 0 {
            self.yielded = true;
            return 0;
        }
        let popped = self.rx.pop(max, |h| {
            if let Some(slot) = heads.get_mut(n) {
                *slot = h;
                n = n.saturating_add(1);
            }
        });
        self.rx_budget = self.rx_budget.saturating_sub(n);
        if let Err(e) = popped {
            self.count_broken(Direction::Rx, &e);
        }
        for &h in heads.get(..n).unwrap_or_default() {
            self.rx_pool.note_popped(h);
            match self.rx_pool.walk(&self.mem, self.rx.view(), h) {
                Ok(c) => self.rx_pool.push_back(c),
                Err(e) => {
                    bump(&mut self.counters.rx_malformed);
                    tracing::warn!(queue = self.rx.index, head = h, error = %e, "dropping malformed RX chain");
                    self.complete_used(Direction::Rx, h, 0);
                }
            }
        }
        n
    }

    /// The next RX chain: from the spare list, else from the avail ring (bounded by the
    /// pass's budget: a ring full of malformed chains ends the loop).
    fn next_rx_chain(&mut self) -> Option<RxChain> {
        loop {
            if let Some(c) = self.rx_pool.pop_front() {
                return Some(c);
            }
            if self.fill_spare(64) == 0 {
                return None;
            }
        }
    }

    /// Counts a queue found broken while popping (once per queue): an avail entry naming a
    /// bad head is also a malformed chain of that queue.
    fn count_broken(&mut self, dir: Direction, e: &QueueError) {
        if let QueueError::BadHead { head, .. } = e {
            tracing::warn!(queue = e.queue_index(), head, error = %e, "refusing an avail entry");
            match dir {
                Direction::Rx => bump(&mut self.counters.rx_malformed),
                Direction::Tx => bump(&mut self.counters.tx_malformed),
            }
        }
        bump(&mut self.counters.queues_broken);
    }

    /// How many bytes of guest buffers an MRG_RXBUF read is posted with: twice the recent
    /// average frame, at least a full non-GSO frame, at most the largest frame. Small-frame
    /// traffic then costs one chain per read, and 64 KiB GSO traffic lands zero-copy.
    fn rx_target(&self) -> u32 {
        self.rx_ewma
            .saturating_mul(2)
            .clamp(self.rx_plain.min(self.rx_capacity), self.rx_capacity)
    }

    /// Appends the next RX chain (from the spare list or the avail ring) to `r`. Returns false
    /// when none is available.
    fn add_rx_chain(&mut self, r: &mut RxRead) -> bool {
        let Some(c) = self.next_rx_chain() else {
            return false;
        };
        for p in self.rx_pool.pieces(c.head) {
            r.seg.iov.push(libc::iovec {
                iov_base: p.host as *mut libc::c_void,
                iov_len: p.len as usize,
            });
            r.seg.gpa.push((p.gpa, p.len));
        }
        // Saturating: a guest's chain lengths may sum past 4 GiB (each chain is below it).
        r.seg.len = r.seg.len.saturating_add(c.len);
        r.chains.push(c);
        true
    }

    /// Prepares a read, with the notification protocol (see [`pop_tx`](Self::pop_tx)):
    /// fills `r` with guest buffers (one chain without MRG_RXBUF; with it, chains for the
    /// predicted frame size, within what one `readv` takes), then the read's spill area.
    /// `others_posted`: other reads are outstanding (with MRG_RXBUF and GSO a further read
    /// is only posted while the guest's spare buffers can take a largest frame beyond them).
    pub fn prepare_rx(&mut self, r: &mut RxRead, others_posted: bool) -> RxPrep {
        loop {
            self.quiet(Direction::Rx);
            match self.fill_rx_read(r, others_posted) {
                RxPrepare::Ready => return RxPrep::Ready,
                RxPrepare::Later => return RxPrep::Withheld,
                RxPrepare::NoBuffers => match self.rearm(Direction::Rx) {
                    Rearm::Armed => return RxPrep::NoBuffers,
                    Rearm::Again if self.yielded => return RxPrep::Withheld,
                    Rearm::Again => {}
                },
            }
        }
    }

    /// Tries again to complete a read whose frame waits for guest buffers; while it still
    /// waits, arms the guest's kick and re-checks (the lost-wakeup rule, as in
    /// [`pop_tx`](Self::pop_tx)).
    pub fn retry_deferred(&mut self, r: &mut RxRead) -> RxRetry {
        loop {
            if self.retry_rx(r) == RxCompletion::Done {
                return RxRetry::Done;
            }
            if self.yielded {
                return RxRetry::Yield;
            }
            match self.rearm(Direction::Rx) {
                Rearm::Armed => return RxRetry::Waiting,
                Rearm::Again if self.yielded => return RxRetry::Yield,
                Rearm::Again => {}
            }
        }
    }

    /// Fills `r` with guest buffers (one chain without MRG_RXBUF; with it, chains for the
    /// predicted frame size, within what one `readv` takes), then the read's spill area.
    /// [`RxPrepare::NoBuffers`] when the guest has posted no buffers, or (with
    /// `others_posted`, MRG_RXBUF and GSO) when the guest's spare buffers could not take a
    /// largest frame beyond what posted reads hold; [`RxPrepare::Later`] when this pass
    /// popped as many chains as the queue holds without finding one.
    pub(crate) fn fill_rx_read(&mut self, r: &mut RxRead, others_posted: bool) -> RxPrepare {
        r.clear();
        if self.rx.is_broken() {
            return RxPrepare::NoBuffers;
        }
        let target = if self.mrg_rxbuf { self.rx_target() } else { 0 };
        if self.mrg_rxbuf && self.rx_capacity > self.rx_plain {
            // Pop what the guest has made available; a further read is posted only while the
            // guest's spare buffers can still take a largest frame spilling out of one, so
            // that a spill rarely has to wait for the guest (it is never dropped for it).
            if others_posted {
                // Bounded by the pass's budget (fill_spare returns 0 once it is spent).
                while self.fill_spare(64) > 0 {}
                if self.rx_pool.spare_bytes()
                    < u64::from(self.rx_capacity).saturating_add(u64::from(target))
                {
                    return self.no_rx_chain();
                }
            }
        }
        // One readv takes at most UIO_MAXIOV iovecs, the spill area's included: a guest
        // posting chains of tiny buffers gets reads of fewer bytes (the rest spills and is
        // copied). One chain always fits (`walk_rx` refuses longer ones).
        while r.chains.is_empty() || r.seg.len < target {
            if !self.add_rx_chain(r) {
                break;
            }
            if r.seg.iov.len() > MAX_RX_PIECES {
                // Hand the last chain back: it goes first into the next read.
                if let Some(c) = r.chains.pop() {
                    let keep = r
                        .seg
                        .iov
                        .len()
                        .saturating_sub(self.rx_pool.pieces(c.head).len());
                    r.seg.iov.truncate(keep);
                    r.seg.gpa.truncate(keep);
                    r.seg.len = r.seg.len.saturating_sub(c.len);
                    self.rx_pool.give_back(c);
                }
                break;
            }
        }
        if r.chains.is_empty() {
            return self.no_rx_chain();
        }
        r.posted = r.seg.len;
        r.seg.iov.push(libc::iovec {
            iov_base: r.spill.as_mut_ptr().cast(),
            iov_len: r.spill.len(),
        });
        RxPrepare::Ready
    }

    /// Why no chain could be had: the budget ran out, or the guest has none.
    fn no_rx_chain(&mut self) -> RxPrepare {
        if self.yielded {
            return RxPrepare::Later;
        }
        bump(&mut self.counters.rx_no_buffers);
        RxPrepare::NoBuffers
    }

    /// Gives the chains of an unposted or cancelled read back (to the front, in order).
    pub fn return_rx(&mut self, r: &mut RxRead) {
        self.rx_pool.give_back_all(&r.chains);
        r.clear();
    }

    /// Completes a read that returned `n` bytes (header included).
    pub fn complete_rx(&mut self, r: &mut RxRead, n: usize) -> RxCompletion {
        r.frame = n;
        self.retry_rx(r)
    }

    /// Completes (or tries again to complete) a read whose frame length is recorded.
    pub fn retry_rx(&mut self, r: &mut RxRead) -> RxCompletion {
        let n = r.frame;
        if self.rx.is_broken() {
            // Nothing is written to a broken queue: the frame is lost with it.
            self.return_rx(r);
            return RxCompletion::Done;
        }
        if n < VNET_HDR_LEN {
            bump(&mut self.counters.rx_dropped_oversize);
            self.return_rx(r);
            return RxCompletion::Done;
        }
        if n > r.posted as usize {
            match self.spill_into_chains(r, n) {
                Spill::Done => {}
                Spill::Wait => {
                    if !r.deferred {
                        r.deferred = true;
                        bump(&mut self.counters.rx_deferred);
                    }
                    return RxCompletion::Deferred;
                }
                Spill::Drop => {
                    self.return_rx(r);
                    return RxCompletion::Done;
                }
            }
        }
        self.finish_rx(r, n);
        RxCompletion::Done
    }

    /// Gives up on a deferred frame (the worker is stopping and the guest never posted the
    /// buffers it needs): dropped and counted.
    pub fn drop_deferred(&mut self, r: &mut RxRead) {
        bump(&mut self.counters.rx_dropped_no_buffers);
        tracing::warn!(
            pair = self.index,
            bytes = r.frame,
            "dropping a frame that waited for RX buffers at stop"
        );
        self.return_rx(r);
    }

    fn finish_rx(&mut self, r: &mut RxRead, n: usize) {
        // Moving average of frame sizes (1/8 weight), for sizing the next reads.
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        self.rx_ewma = self
            .rx_ewma
            .saturating_sub(self.rx_ewma / 8)
            .saturating_add(n32 / 8);
        // How many chains the frame occupies.
        let mut left = n;
        let mut used = 0usize;
        for c in &r.chains {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(c.len as usize);
            used = used.saturating_add(1);
        }
        // num_buffers: the TAP leaves bytes 10-11 alone (virtio 1.2 §5.1.6.4: 1 without
        // MRG_RXBUF, the number of used buffers with it).
        let num_buffers = u16::try_from(used).unwrap_or(u16::MAX);
        self.write_at(&r.seg.gpa, NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes());
        // Dirty-log the written bytes.
        let mut left = n;
        for &(gpa, len) in &r.seg.gpa {
            if left == 0 {
                break;
            }
            let l = (len as usize).min(left);
            self.mem.mark_dirty(gpa, l);
            left = left.saturating_sub(l);
        }
        // Used entries, consecutive as MRG_RXBUF requires.
        let mut left = n;
        for c in r.chains.iter().take(used) {
            let len = c.len.min(u32::try_from(left).unwrap_or(u32::MAX));
            left = left.saturating_sub(len as usize);
            self.complete_used(Direction::Rx, c.head, len);
        }
        // Unused chains go back for the next read.
        self.rx_pool
            .give_back_all(r.chains.get(used..).unwrap_or_default());
        bump(&mut self.counters.rx_packets);
        // `retry_rx` checked n >= VNET_HDR_LEN.
        self.counters.rx_bytes =
            (self.counters.rx_bytes).wrapping_add(n.saturating_sub(VNET_HDR_LEN) as u64);
        r.clear();
    }

    /// A frame of `n` bytes overran the posted chains into the spill area: add chains until it
    /// fits and copy the spilled bytes into them. False (frame dropped, counted) when the
    /// frame is larger than the TAP may produce or the guest has not posted enough buffers.
    fn spill_into_chains(&mut self, r: &mut RxRead, n: usize) -> Spill {
        let posted = r.posted as usize;
        // The caller checked n > posted.
        let spilled = n.saturating_sub(posted);
        if !self.mrg_rxbuf || n > self.rx_capacity as usize || spilled >= r.spill.len() {
            // Without MRG_RXBUF a frame must fit one chain (virtio 1.2 §5.1.6.3.1); and no
            // frame may exceed what the negotiated features allow.
            bump(&mut self.counters.rx_dropped_oversize);
            return Spill::Drop;
        }
        while (r.seg.len as usize) < n {
            if !self.add_rx_chain(r) {
                return Spill::Wait;
            }
        }
        self.write_at(
            &r.seg.gpa,
            posted,
            r.spill.get(..spilled).unwrap_or_default(),
        );
        bump(&mut self.counters.rx_spilled);
        Spill::Done
    }

    /// Writes `bytes` at `offset` of the frame laid out over `gpas` (not dirty-logged: the
    /// callers write inside a frame `finish_rx` logs as a whole).
    fn write_at(&self, gpas: &[(u64, u32)], mut offset: usize, bytes: &[u8]) {
        let mut bytes = bytes;
        for &(gpa, len) in gpas {
            if bytes.is_empty() {
                return;
            }
            let len = len as usize;
            if offset >= len {
                offset = offset.saturating_sub(len);
                continue;
            }
            let take = len.saturating_sub(offset).min(bytes.len());
            let (now, rest) = bytes.split_at(take);
            // The range was validated when the chain was walked (gpa + len is inside guest
            // memory, so gpa + offset cannot wrap).
            // Inside the frame's first `n` bytes, which `finish_rx` dirty-logs once.
            let _ =
                self.mem
                    .write_bytes(gpa.wrapping_add(offset as u64), now, DirtyLogging::ByCaller);
            bytes = rest;
            offset = 0;
        }
    }

    // ---- used ring and interrupts ----------------------------------------------------------

    fn complete_used(&mut self, dir: Direction, head: u16, len: u32) {
        if dir == Direction::Rx {
            // The guest owns the chain again and may rewrite its descriptors.
            self.rx_pool.forget_walk(head);
        }
        let (q, pending) = match dir {
            Direction::Rx => (&mut self.rx, &mut self.rx_used_pending),
            Direction::Tx => (&mut self.tx, &mut self.tx_used_pending),
        };
        if q.is_broken() {
            // Counted when it broke; a broken ring is written no more.
            return;
        }
        if q.add_used(head, len).is_err() {
            bump(&mut self.counters.queues_broken);
        }
        *pending = true;
        if !self.serviced {
            self.serviced = true;
            self.stats.mark_first_service();
        }
    }

    /// Shows the guest the used entries of both queues (the used index, published once per
    /// batch; [`interrupts`](Self::interrupts) does it first, so an engine only calls this
    /// where it completes chains without deciding interrupts).
    pub fn publish_used(&mut self) {
        self.rx.publish_used();
        self.tx.publish_used();
    }

    /// For each queue with new used entries whose guest wants an interrupt (interrupt
    /// suppression: EVENT_IDX's `used_event`, or `VRING_AVAIL_F_NO_INTERRUPT`), calls
    /// `interrupt` with the queue's direction, once per queue: interrupts are coalesced per
    /// batch. The engine raises it its own way, or with [`signal`](Self::signal).
    pub fn interrupts(&mut self, mut interrupt: impl FnMut(Direction)) {
        for dir in self.due_interrupts().into_iter().flatten() {
            interrupt(dir);
        }
    }

    /// [`interrupts`](Self::interrupts), each raised with [`signal`](Self::signal).
    pub fn raise_interrupts(&mut self) {
        for dir in self.due_interrupts().into_iter().flatten() {
            self.signal(dir);
        }
    }

    fn due_interrupts(&mut self) -> [Option<Direction>; 2] {
        let mut due = [None, None];
        if self.rx_used_pending {
            self.rx_used_pending = false;
            if self.rx.needs_notification() {
                bump(&mut self.counters.rx_interrupts);
                due[0] = Some(Direction::Rx);
            }
        }
        if self.tx_used_pending {
            self.tx_used_pending = false;
            if self.tx.needs_notification() {
                bump(&mut self.counters.tx_interrupts);
                due[1] = Some(Direction::Tx);
            }
        }
        due
    }

    /// Raises a queue's interrupt with a non-blocking `write(2)` on its call eventfd.
    pub fn signal(&self, dir: Direction) {
        match dir {
            Direction::Rx => self.rx.signal(),
            Direction::Tx => self.tx.signal(),
        }
    }
}
