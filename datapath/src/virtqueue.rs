//! One split virtqueue as the device sees it: the ring protocol (virtio 1.2 §2.7: popping
//! heads, used entries, notification suppression, EVENT_IDX) over the rings' checked host view
//! ([`RingView`], translated once at start), plus the kick and call eventfds, the set of heads
//! the device holds, and a broken flag. Used entries are written as they complete; the used
//! index is published, and the used ring's pages dirty-logged, once per batch
//! ([`Virtqueue::publish_used`], done before every interrupt decision). A ring the guest
//! corrupts (an avail index that jumps past the queue size, rings outside memory, an avail
//! entry naming a head past the queue size or one the device already holds) marks the queue
//! broken instead of panicking; a broken queue is neither popped nor written any more.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::OwnedFd;

use std::sync::atomic::{fence, Ordering};

use vm_memory::{Bytes, GuestAddress};

/// `VRING_AVAIL_F_NO_INTERRUPT`.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `VRING_USED_F_NO_NOTIFY`.
const VRING_USED_F_NO_NOTIFY: u16 = 1;

use tapir_state::{RingAddresses, RingPositions};

use crate::chain::DescTable;
use crate::memory::GuestMemory;
use crate::ring_view::RingView;

/// Where a virtqueue lives and where to resume it (from the VMM or a snapshot).
#[derive(Debug)]
pub struct QueueConfig {
    /// Where the rings are (guest-physical; size and alignment checked on the way in).
    pub ring: RingAddresses,
    /// Where to resume (0, 0 for a fresh queue).
    pub positions: RingPositions,
    /// The guest's kick eventfd (the device reads it).
    pub kick: OwnedFd,
    /// The call eventfd (the device signals it to interrupt the guest).
    pub call: OwnedFd,
}

/// Errors of a virtqueue.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The configuration is unusable (size, alignment, rings outside guest memory).
    #[error("virtqueue {index}: invalid configuration: {reason}")]
    InvalidConfig {
        /// Queue index.
        index: u16,
        /// What is wrong.
        reason: String,
    },
    /// The guest corrupted the ring; the queue is broken until reset.
    #[error("virtqueue {index} is broken: {reason}")]
    Broken {
        /// Queue index.
        index: u16,
        /// What the guest did.
        reason: String,
    },
    /// An avail entry names a head past the queue size, or one the device holds (made
    /// available again before the device used it: virtio 1.2 §2.7.13 forbids it). The queue
    /// is broken until reset.
    #[error("virtqueue {index} is broken: avail entry names head {head}: {reason}")]
    BadHead {
        /// Queue index.
        index: u16,
        /// The head.
        head: u16,
        /// Out of range, or held.
        reason: &'static str,
    },
}

impl QueueError {
    /// The queue the error is about.
    pub fn queue_index(&self) -> u16 {
        match self {
            QueueError::InvalidConfig { index, .. }
            | QueueError::Broken { index, .. }
            | QueueError::BadHead { index, .. } => *index,
        }
    }
}

/// What reading a kick eventfd found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kick {
    /// The guest kicked this many times.
    Kicked(u64),
    /// Nothing to read (`EAGAIN`).
    None,
    /// The fd can never deliver a kick (end of file, or an error other than `EAGAIN`): not an
    /// eventfd. The queue must be marked broken rather than polled again.
    Dead,
}

/// A running virtqueue.
#[derive(Debug)]
pub struct Virtqueue {
    /// virtio queue number (rx = 2n, tx = 2n + 1).
    pub index: u16,
    view: RingView,
    table: DescTable,
    used_ring: u64,
    event_idx: bool,
    /// Next avail position to pop.
    next_avail: u16,
    /// The avail index as last read (entries up to it were checked to be at most the queue
    /// size ahead): popping reads the guest's index again only once these are taken.
    avail_seen: u16,
    /// Next used position to fill.
    next_used: u16,
    /// The used index the guest has been shown.
    published: u16,
    /// Used entries added since the last interrupt decision (EVENT_IDX's window).
    num_added: u16,
    /// Kick eventfd.
    pub kick: OwnedFd,
    /// Call eventfd.
    pub call: OwnedFd,
    broken: bool,
    /// Heads the device popped and has not used, by head (`size` entries): a head made
    /// available again while held is refused.
    held: Vec<bool>,
}

impl Virtqueue {
    /// Validates `cfg` against guest memory and builds the queue: its rings are translated
    /// once into a checked host view (each must lie inside one memory region, aligned as
    /// virtio requires).
    pub fn new(
        index: u16,
        cfg: QueueConfig,
        event_idx: bool,
        mem: &GuestMemory,
    ) -> Result<Virtqueue, QueueError> {
        let ring = cfg.ring;
        let size = ring.size().get();
        let view =
            RingView::new(mem, size, ring.desc(), ring.avail(), ring.used()).map_err(|e| {
                QueueError::InvalidConfig {
                    index,
                    reason: e.to_string(),
                }
            })?;
        Ok(Virtqueue {
            index,
            view,
            table: DescTable {
                addr: ring.desc(),
                size,
            },
            used_ring: ring.used(),
            event_idx,
            next_avail: cfg.positions.next_avail,
            avail_seen: cfg.positions.next_avail,
            next_used: cfg.positions.next_used,
            published: cfg.positions.next_used,
            num_added: 0,
            kick: cfg.kick,
            call: cfg.call,
            broken: false,
            held: vec![false; usize::from(size)],
        })
    }

    /// The rings' host view, for walking chains through it.
    pub(crate) fn view(&self) -> &RingView {
        &self.view
    }

    /// The descriptor table, for walking chains.
    pub fn table(&self) -> DescTable {
        self.table
    }

    /// Guest-physical address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.used_ring
    }

    /// True once the guest corrupted the ring.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Marks the queue broken (the guest corrupted it, or its worker failed): it is popped and
    /// written no more. Returns true if it was not broken before.
    pub fn set_broken(&mut self, reason: &str) -> bool {
        let newly = !self.broken;
        let _ = self.mark_broken(reason.to_string());
        newly
    }

    fn mark_broken(&mut self, reason: String) -> QueueError {
        if !self.broken {
            // What was used before stays used: the guest is shown it.
            self.publish_used();
            tracing::error!(queue = self.index, %reason, "guest corrupted the virtqueue; marking it broken");
        }
        self.broken = true;
        QueueError::Broken {
            index: self.index,
            reason,
        }
    }

    /// Pops up to `max` available heads into `out` (each below the queue size and not held;
    /// it is held from here until [`add_used`](Self::add_used)). Returns how many. A head
    /// out of range or already held, or an avail index more than the queue size ahead,
    /// breaks the queue ([`QueueError::BadHead`], [`QueueError::Broken`]); the heads popped
    /// before it were handed to `out`.
    pub fn pop(&mut self, max: usize, mut out: impl FnMut(u16)) -> Result<usize, QueueError> {
        if self.broken {
            return Ok(0);
        }
        let size = self.view.size();
        let mut n = 0usize;
        while n < max {
            if self.next_avail == self.avail_seen {
                // Acquire: the entries up to the index were written before it (see
                // `RingView::avail_idx`).
                let idx = self.view.avail_idx(Ordering::Acquire);
                let ahead = idx.wrapping_sub(self.next_avail);
                if ahead > size {
                    return Err(self.mark_broken(format!(
                        "avail index {idx} is {ahead} entries ahead of {} (queue size {size})",
                        self.next_avail
                    )));
                }
                if ahead == 0 {
                    break;
                }
                self.avail_seen = idx;
            }
            let at = self.next_avail;
            let head = self.view.avail_entry(at);
            self.next_avail = at.wrapping_add(1);
            // The guest wrote `head`: checked here.
            let reason = match self.held.get_mut(usize::from(head)) {
                Some(held) if !*held => {
                    *held = true;
                    out(head);
                    n = n.saturating_add(1);
                    continue;
                }
                Some(_) => "the device holds it (made available twice)",
                None => "past the queue size",
            };
            let _ = self.mark_broken(format!("avail entry {at} names head {head}: {reason}"));
            return Err(QueueError::BadHead {
                index: self.index,
                head,
                reason,
            });
        }
        Ok(n)
    }

    /// Marks `head` held (taken over from a predecessor that popped it). False if it is out
    /// of range or held already.
    pub fn hold(&mut self, head: u16) -> bool {
        match self.held.get_mut(usize::from(head)) {
            Some(h) if !*h => {
                *h = true;
                true
            }
            _ => false,
        }
    }

    /// True when the device holds `head` (popped it and has not used it).
    pub fn holds(&self, head: u16) -> bool {
        self.held.get(usize::from(head)).copied().unwrap_or(false)
    }

    /// Puts `head` in the used ring with `len` bytes written (it is no longer held). The
    /// guest sees it once the used index is published ([`publish_used`](Self::publish_used),
    /// once per batch). A broken queue is not written.
    pub fn add_used(&mut self, head: u16, len: u32) -> Result<(), QueueError> {
        if self.broken {
            return Err(QueueError::Broken {
                index: self.index,
                reason: "the queue is broken".into(),
            });
        }
        match self.held.get_mut(usize::from(head)) {
            Some(h) => *h = false,
            None => {
                return Err(self.mark_broken(format!(
                    "adding {head} to the used ring: past the queue size"
                )))
            }
        }
        self.view.write_used(self.next_used, head, len);
        self.next_used = self.next_used.wrapping_add(1);
        self.num_added = self.num_added.wrapping_add(1);
        Ok(())
    }

    /// Shows the guest every used entry added so far: publishes the used index (one release
    /// store for the batch) and dirty-logs the used ring's written bytes (once per batch).
    pub fn publish_used(&mut self) {
        if self.next_used != self.published {
            self.view.publish_used(self.next_used);
            self.published = self.next_used;
        }
        self.view.flush_dirty();
    }

    /// True when the guest's avail index is past the device's position (a fresh read; a
    /// broken queue never has work).
    pub fn avail_moved(&self) -> bool {
        !self.broken && self.view.avail_idx(Ordering::Acquire) != self.next_avail
    }

    /// Asks the guest not to kick (no-op with EVENT_IDX, where kicks stop by themselves).
    pub fn disable_notification(&mut self) {
        if !self.broken && !self.event_idx {
            self.view.set_used_flags(VRING_USED_F_NO_NOTIFY);
        }
    }

    /// Asks the guest to kick on its next addition; returns true if buffers arrived meanwhile
    /// (the virtio lost-wakeup re-check, virtio 1.2 §2.7.10: the caller must then keep going).
    pub fn enable_notification(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if self.event_idx {
            // avail_event = where popping stopped (not the avail index read last: buffers
            // added since must kick).
            self.view.set_avail_event(self.next_avail);
        } else {
            self.view.set_used_flags(0);
        }
        // The re-check's load must not be ordered before the store that arms the kick (a
        // store-load pair: only a full fence keeps it), or a buffer added in between would
        // neither kick nor be seen.
        fence(Ordering::SeqCst);
        self.view.avail_idx(Ordering::Relaxed) != self.next_avail
    }

    /// Publishes the used entries ([`publish_used`](Self::publish_used)), then tells
    /// whether the guest wants an interrupt for what was added since the last call
    /// (EVENT_IDX's `used_event`, virtio 1.2 §2.7.10; without it the driver's
    /// `VRING_AVAIL_F_NO_INTERRUPT`, §2.7.7.2).
    pub fn needs_notification(&mut self) -> bool {
        if self.broken {
            return false;
        }
        self.publish_used();
        // The used index store must be visible before the driver's suppression field is
        // read (a store-load pair again: the driver does the mirror image, virtio 1.2
        // §2.7.10).
        fence(Ordering::SeqCst);
        if !self.event_idx {
            return self.view.avail_flags() & VRING_AVAIL_F_NO_INTERRUPT == 0;
        }
        // Interrupt when used_event lies in [old, new): the window of entries added since
        // the last decision, as Linux's vring_need_event (wrapping arithmetic).
        let new = self.next_used;
        let old = new.wrapping_sub(self.num_added);
        self.num_added = 0;
        let used_event = self.view.used_event();
        new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Signals the call eventfd with a `write(2)`, which never blocks: `Device::start` made
    /// the fd `O_NONBLOCK` (an eventfd whose counter is at its maximum would otherwise block
    /// the worker until someone reads it).
    pub fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // An eventfd write only fails when the counter would overflow (EAGAIN), in which case
        // the guest has an interrupt pending anyway.
        let _ = nix::unistd::write(&self.call, &one);
    }

    /// Drains the kick eventfd (non-blocking).
    pub fn drain_kick(&self) -> Kick {
        let mut buf = [0u8; 8];
        match nix::unistd::read(&self.kick, &mut buf) {
            Ok(8) => Kick::Kicked(u64::from_ne_bytes(buf)),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => Kick::None,
            // 0 bytes (a pipe at EOF), a short read, any other error: not an eventfd.
            Ok(_) | Err(_) => Kick::Dead,
        }
    }

    /// Moves the queue to these ring positions (a successor resuming a predecessor's rings).
    /// Nothing is held afterwards (see [`hold`](Self::hold)).
    pub fn set_positions(&mut self, p: RingPositions) {
        self.next_avail = p.next_avail;
        self.avail_seen = p.next_avail;
        self.next_used = p.next_used;
        self.published = p.next_used;
        self.num_added = 0;
        self.held.iter_mut().for_each(|h| *h = false);
    }

    /// Where the device is in the rings: next available index and next used index.
    pub fn positions(&self) -> RingPositions {
        RingPositions::new(self.next_avail, self.next_used)
    }

    /// The head the guest put at avail-ring position `pos` (a free-running index).
    pub fn avail_head(&self, pos: u16) -> u16 {
        self.view.avail_entry(pos)
    }

    /// Gives chains the device holds (popped, not used; `held` in pop order) back to the
    /// guest, for a next owner that can only be told one ring index (a vhost-user base).
    /// Held chains are not always the last ones popped (an RX read that filled fewer chains
    /// than it was given returns the rest while a later read's chains are used), so the next
    /// index is rewound only over the tail of the avail ring whose heads are all held: the
    /// next owner pops those again. Held chains below that tail go back through the used
    /// ring with length 0 (an empty buffer, which a driver drops and reposts). Rewinding over
    /// a used chain would make the next owner fill a buffer the guest already took back, so
    /// it is never done. Signals the guest if anything was used.
    ///
    /// `mem` is the memory the queue was built with (its rings are reached through the view
    /// made then).
    pub fn give_back(&mut self, mem: &GuestMemory, held: &[u16]) -> GiveBack {
        let _ = mem;
        let mut base = self.positions().next_avail;
        // Which heads are still to be given back, by head (a head listed twice, or out of
        // range, counts once or not at all): linear in the queue size, whatever the guest
        // made available.
        let mut left = vec![false; self.held.len()];
        let mut n_left = 0usize;
        for &h in held {
            if let Some(l) = left.get_mut(usize::from(h)) {
                if !*l {
                    *l = true;
                    n_left = n_left.saturating_add(1);
                }
            }
        }
        let mut rewound = 0usize;
        while n_left > 0 {
            let q = base.wrapping_sub(1);
            let head = self.avail_head(q);
            let slot = left.get_mut(usize::from(head)).map(|l| (head, l));
            let Some((head, l)) = slot.filter(|(_, l)| **l) else {
                break;
            };
            *l = false;
            n_left = n_left.saturating_sub(1);
            if let Some(h) = self.held.get_mut(usize::from(head)) {
                *h = false;
            }
            base = q;
            rewound = rewound.saturating_add(1);
        }
        let emptied = n_left;
        // In the order they were popped.
        for &h in held {
            if let Some(l) = left.get_mut(usize::from(h)).filter(|l| **l) {
                *l = false;
                let _ = self.add_used(h, 0);
            }
        }
        self.next_avail = base;
        self.avail_seen = base;
        self.publish_used();
        if emptied > 0 {
            self.signal();
        }
        GiveBack {
            base,
            rewound,
            emptied,
        }
    }
}

#[cfg(test)]
mod tests;

/// What [`Virtqueue::give_back`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GiveBack {
    /// The next index the next owner resumes at.
    pub base: u16,
    /// Held chains the base was rewound over.
    pub rewound: usize,
    /// Held chains returned empty through the used ring.
    pub emptied: usize,
}

/// The used index the guest sees in the used ring at `used_ring` (guest-physical).
pub fn used_index(mem: &GuestMemory, used_ring: u64) -> Option<u16> {
    mem.mmap()
        .read_obj::<u16>(GuestAddress(used_ring.checked_add(2)?))
        .ok()
        .map(u16::from_le)
}
