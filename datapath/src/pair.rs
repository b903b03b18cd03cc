//! One queue pair's device logic, shared by both engines: popping and validating chains,
//! building the iovecs of TAP reads and writes, and completing them into the used rings
//! (`num_buffers`, dirty logging, counters). The engines only move bytes.
//!
//! One file per concern: this one holds the pair itself, the notification protocol and the
//! used ring and interrupts; `tx` pops and completes TAP writes, `rx` prepares and completes
//! TAP reads (spill, defer, `num_buffers`), `positions` is where a pair resumes.
//!
//! Everything here is driven by guest-written values (heads, lengths, ring indices): nothing
//! indexes or slices unchecked (`clippy::indexing_slicing` is denied), and every loop that
//! pops from an avail ring is bounded by the queue size (a guest that keeps posting cannot
//! keep a worker from its stop).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

mod positions;
mod rx;
mod stop;
mod tx;

use std::sync::Arc;

use crate::features;
use crate::memory::GuestMemory;
use crate::rx_pool::RxPool;
use crate::stats::{Counters, QueuePairStats};
use crate::tap::VNET_HDR_LEN;
use crate::virtqueue::{QueueError, Virtqueue};

pub use positions::{PairPositions, MAX_CARRIED_FRAMES};
pub use rx::{RxCompletion, RxPrep, RxRead, RxRetry};
pub use stop::StopRequest;
#[cfg(test)]
pub(crate) use tx::TxNext;
pub use tx::{TxPop, TxWrite};

const VNET_HDR_LEN_U32: u32 = 12;
const _: () = assert!(VNET_HDR_LEN_U32 as usize == VNET_HDR_LEN);

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
    /// Scratch for a frame moved into older chains ([`QueuePair::keep_ring_order`]).
    rx_reorder: Vec<u8>,
    /// Ring-order place of the youngest chain handed to a read.
    rx_youngest_posted: u64,
    /// RX chains popped from the avail ring (and walked) but not inside a posted read.
    rx_pool: RxPool,
    /// Frames read from the TAP that wait for guest buffers outside any read, oldest first
    /// (vnet header included): carried over a stop ([`QueuePair::carry_deferred`]) or from a
    /// predecessor ([`PairPositions::rx_carried`]); delivered before anything else is read.
    rx_carried: std::collections::VecDeque<Vec<u8>>,
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
    /// Called once, at the worker's first used entry ([`QueuePair::on_first_service`]).
    on_serviced: Option<fn()>,
    /// The worker's stop request, looked at before every pop ([`QueuePair::pop_tx`],
    /// [`QueuePair::prepare_rx`]).
    stop: StopRequest,
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
            rx_reorder: Vec::new(),
            rx_youngest_posted: 0,
            rx_pool: RxPool::new(rx_size),
            rx_carried: std::collections::VecDeque::new(),
            rx_used_pending: false,
            tx_used_pending: false,
            serviced: false,
            rx_budget: rx_queue_size.saturating_mul(2),
            tx_budget: tx_queue_size.saturating_mul(2),
            yielded: false,
            rx_notify: Notify::Armed,
            tx_notify: Notify::Armed,
            broken: false,
            on_serviced: None,
            stop: StopRequest::default(),
        }
    }

    /// Calls `f` once, when this worker puts its first entry into a used ring (a realtime
    /// worker returns to ordinary scheduling there: `EngineConfig::realtime_priority`).
    pub(crate) fn on_first_service(&mut self, f: fn()) {
        self.on_serviced = Some(f);
    }

    /// A fresh stop request for the worker about to run this pair; the device keeps the
    /// other handle and sets it when it stops the worker.
    pub(crate) fn new_stop_request(&mut self) -> StopRequest {
        self.stop = StopRequest::default();
        self.stop.clone()
    }

    /// True once the device asked this pair's worker to stop: pop nothing more.
    pub fn stop_requested(&self) -> bool {
        self.stop.is_requested()
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

    /// True when the guest made chains available on a queue whose kick is armed (the device
    /// ran it dry and waits for the guest): what a busy-polling worker looks at instead of
    /// waiting for the kick. A queue the device is not waiting on (RX with spare chains,
    /// waiting for the TAP; TX with every write slot in flight) is not looked at, so chains
    /// the device leaves in the ring on purpose never keep a poller from sleeping.
    pub fn guest_posted(&self) -> bool {
        let posted = |q: &Virtqueue, notify: Notify| notify == Notify::Armed && q.avail_moved();
        posted(&self.tx, self.tx_notify) || posted(&self.rx, self.rx_notify)
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
        self.after_publish();
    }

    /// After the used indexes went out: a worker that has serviced its first entry calls its
    /// first-service hook now. A realtime worker returns to ordinary scheduling there, once
    /// the guest can see the entry: demoted between writing the entry and publishing it, it
    /// was preempted before the guest saw anything (resumed -> first used entry 26-32 -> 33-54
    /// µs p50 with `--handoff-rt-priority 10`).
    fn after_publish(&mut self) {
        if self.serviced {
            if let Some(f) = self.on_serviced.take() {
                f();
            }
        }
    }

    /// For each queue with new used entries whose guest wants an interrupt (interrupt
    /// suppression: EVENT_IDX's `used_event`, or `VRING_AVAIL_F_NO_INTERRUPT`), calls
    /// `interrupt` with the queue's direction, once per queue: interrupts are coalesced per
    /// batch. The engine raises it its own way, or with [`signal`](Self::signal).
    pub fn interrupts(&mut self, mut interrupt: impl FnMut(Direction)) {
        for dir in self.due_interrupts().into_iter().flatten() {
            interrupt(dir);
        }
        self.after_publish();
    }

    /// [`interrupts`](Self::interrupts), each raised with [`signal`](Self::signal).
    pub fn raise_interrupts(&mut self) {
        for dir in self.due_interrupts().into_iter().flatten() {
            self.signal(dir);
        }
        self.after_publish();
    }

    fn due_interrupts(&mut self) -> [Option<Direction>; 2] {
        // The batch ends here: both used rings are shown to the guest and their written bytes
        // dirty-logged, also where only the notification fields changed (no interrupt due).
        self.publish_used();
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
