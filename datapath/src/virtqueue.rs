//! One split virtqueue as the device sees it: `virtio-queue`'s ring logic plus the kick and
//! call eventfds, the set of heads the device holds, and a broken flag. A ring the guest
//! corrupts (an avail index that jumps past the queue size, rings outside memory, an avail
//! entry naming a head past the queue size or one the device already holds) marks the queue
//! broken instead of panicking; a broken queue is neither popped nor written any more.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::os::fd::OwnedFd;

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// `VRING_AVAIL_F_NO_INTERRUPT`.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

use crate::chain::DescTable;
use crate::memory::GuestMemory;

/// Where a virtqueue lives and where to resume it (from the VMM or a snapshot).
#[derive(Debug)]
pub struct QueueConfig {
    /// Number of descriptors (a power of two, at most 32768).
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
    /// Next available-ring index to process (0 for a fresh queue).
    pub next_avail: u16,
    /// Next used-ring index to fill (0 for a fresh queue).
    pub next_used: u16,
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
    queue: Queue,
    table: DescTable,
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
    /// Validates `cfg` against guest memory and builds the queue.
    pub fn new(
        index: u16,
        cfg: QueueConfig,
        event_idx: bool,
        mem: &GuestMemory,
    ) -> Result<Virtqueue, QueueError> {
        let invalid = |reason: String| QueueError::InvalidConfig { index, reason };
        let mut queue =
            Queue::new(cfg.size).map_err(|e| invalid(format!("size {}: {e}", cfg.size)))?;
        queue
            .try_set_desc_table_address(vm_memory::GuestAddress(cfg.desc_table))
            .map_err(|e| invalid(format!("descriptor table {:#x}: {e}", cfg.desc_table)))?;
        queue
            .try_set_avail_ring_address(vm_memory::GuestAddress(cfg.avail_ring))
            .map_err(|e| invalid(format!("avail ring {:#x}: {e}", cfg.avail_ring)))?;
        queue
            .try_set_used_ring_address(vm_memory::GuestAddress(cfg.used_ring))
            .map_err(|e| invalid(format!("used ring {:#x}: {e}", cfg.used_ring)))?;
        queue.set_event_idx(event_idx);
        queue.set_next_avail(cfg.next_avail);
        queue.set_next_used(cfg.next_used);
        queue.set_ready(true);
        if !queue.is_valid(mem.mmap()) {
            return Err(invalid("rings are not inside guest memory".into()));
        }
        Ok(Virtqueue {
            index,
            queue,
            table: DescTable {
                addr: cfg.desc_table,
                size: cfg.size,
            },
            kick: cfg.kick,
            call: cfg.call,
            broken: false,
            held: vec![false; usize::from(cfg.size)],
        })
    }

    /// The descriptor table, for walking chains.
    pub fn table(&self) -> DescTable {
        self.table
    }

    /// Guest-physical address of the used ring.
    pub fn used_ring(&self) -> u64 {
        self.queue.used_ring()
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
    /// out of range or already held breaks the queue ([`QueueError::BadHead`]); the heads
    /// popped before it were handed to `out`.
    pub fn pop(
        &mut self,
        mem: &GuestMemory,
        max: usize,
        mut out: impl FnMut(u16),
    ) -> Result<usize, QueueError> {
        if self.broken {
            return Ok(0);
        }
        let first = self.queue.next_avail();
        let iter = match self.queue.iter(mem.mmap()) {
            Ok(it) => it,
            Err(e) => return Err(self.mark_broken(format!("reading the avail ring: {e}"))),
        };
        let mut n = 0usize;
        let mut bad = None;
        // `take(max)` bounds the loop; `iter` itself stops at the avail index, which
        // virtio-queue has checked to be at most the queue size ahead.
        for chain in iter.take(max) {
            let head = chain.head_index();
            // virtio-queue's iterator does not check heads: this is where they are checked.
            match self.held.get_mut(usize::from(head)) {
                Some(held) if !*held => {
                    *held = true;
                    out(head);
                    n = n.saturating_add(1);
                }
                Some(_) => {
                    bad = Some((head, "the device holds it (made available twice)"));
                    break;
                }
                None => {
                    bad = Some((head, "past the queue size"));
                    break;
                }
            }
        }
        if let Some((head, reason)) = bad {
            let at = first.wrapping_add(u16::try_from(n).unwrap_or(u16::MAX));
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

    /// Puts `head` in the used ring with `len` bytes written (it is no longer held). A broken
    /// queue is not written.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
        if self.broken {
            return Err(QueueError::Broken {
                index: self.index,
                reason: "the queue is broken".into(),
            });
        }
        if let Some(h) = self.held.get_mut(usize::from(head)) {
            *h = false;
        }
        if let Err(e) = self.queue.add_used(mem.mmap(), head, len) {
            return Err(self.mark_broken(format!("adding {head} to the used ring: {e}")));
        }
        Ok(())
    }

    /// Asks the guest not to kick (no-op with EVENT_IDX, where kicks stop by themselves).
    pub fn disable_notification(&mut self, mem: &GuestMemory) {
        if !self.broken && self.queue.disable_notification(mem.mmap()).is_err() {
            let _ = self.mark_broken("writing used flags".into());
        }
    }

    /// Asks the guest to kick on its next addition; returns true if buffers arrived meanwhile
    /// (the virtio lost-wakeup re-check, virtio 1.2 §2.7.10: the caller must then keep going).
    pub fn enable_notification(&mut self, mem: &GuestMemory) -> bool {
        if self.broken {
            return false;
        }
        match self.queue.enable_notification(mem.mmap()) {
            Ok(more) => more,
            Err(e) => {
                let _ = self.mark_broken(format!("enabling notifications: {e}"));
                false
            }
        }
    }

    /// True when the guest wants an interrupt for what was added since the last call
    /// (EVENT_IDX's `used_event`, virtio 1.2 §2.7.10).
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> bool {
        if self.broken {
            return false;
        }
        if !self.queue.event_idx_enabled() {
            // Without EVENT_IDX the driver suppresses interrupts with VRING_AVAIL_F_NO_INTERRUPT
            // (virtio 1.2 §2.7.7.2: the device SHOULD NOT notify while it is set). The used
            // ring writes must be visible before the flag is read, as with used_event.
            std::sync::atomic::fence(Ordering::SeqCst);
            let flags: Result<u16, _> = mem
                .mmap()
                .load(GuestAddress(self.queue.avail_ring()), Ordering::Relaxed);
            return flags.map_or(true, |f| u16::from_le(f) & VRING_AVAIL_F_NO_INTERRUPT == 0);
        }
        self.queue.needs_notification(mem.mmap()).unwrap_or(true)
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
    pub fn set_positions(&mut self, next_avail: u16, next_used: u16) {
        self.queue.set_next_avail(next_avail);
        self.queue.set_next_used(next_used);
        self.held.iter_mut().for_each(|h| *h = false);
    }

    /// Next available index (ring position) and next used index.
    pub fn positions(&self) -> (u16, u16) {
        (self.queue.next_avail(), self.queue.next_used())
    }

    /// The head the guest put at avail-ring position `pos` (a free-running index).
    pub fn avail_head(&self, mem: &GuestMemory, pos: u16) -> Option<u16> {
        let slot = u64::from(pos.checked_rem(self.table.size)?);
        // avail ring: flags (2), idx (2), then one u16 per slot; `is_valid` checked that the
        // ring lies inside guest memory.
        let addr = self
            .queue
            .avail_ring()
            .checked_add(4)?
            .checked_add(slot.checked_mul(2)?)?;
        mem.mmap()
            .read_obj::<u16>(GuestAddress(addr))
            .ok()
            .map(u16::from_le)
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
    pub fn give_back(&mut self, mem: &GuestMemory, held: &[u16]) -> GiveBack {
        let (mut base, _) = self.positions();
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
            let slot = self
                .avail_head(mem, q)
                .and_then(|head| left.get_mut(usize::from(head)).map(|l| (head, l)));
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
                let _ = self.add_used(mem, h, 0);
            }
        }
        self.queue.set_next_avail(base);
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
