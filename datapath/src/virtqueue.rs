//! One split virtqueue as the device sees it: `virtio-queue`'s ring logic plus the kick and
//! call eventfds and a broken flag. A ring the guest corrupts (an avail index that jumps past
//! the queue size, rings outside memory) marks the queue broken instead of panicking.

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

    /// Pops up to `max` available heads into `out`. Returns how many.
    pub fn pop(
        &mut self,
        mem: &GuestMemory,
        max: usize,
        mut out: impl FnMut(u16),
    ) -> Result<usize, QueueError> {
        if self.broken {
            return Ok(0);
        }
        let iter = match self.queue.iter(mem.mmap()) {
            Ok(it) => it,
            Err(e) => return Err(self.mark_broken(format!("reading the avail ring: {e}"))),
        };
        let mut n = 0;
        for chain in iter.take(max) {
            out(chain.head_index());
            n += 1;
        }
        Ok(n)
    }

    /// Puts `head` in the used ring with `len` bytes written.
    pub fn add_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), QueueError> {
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

    /// Signals the call eventfd with a plain `write(2)`.
    pub fn signal(&self) {
        let one = 1u64.to_ne_bytes();
        // An eventfd write only fails when the counter would overflow, in which case the guest
        // has an interrupt pending anyway.
        let _ = nix::unistd::write(&self.call, &one);
    }

    /// Drains the kick eventfd (non-blocking); returns the number of kicks it counted.
    pub fn drain_kick(&self) -> u64 {
        let mut buf = [0u8; 8];
        match nix::unistd::read(&self.kick, &mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            _ => 0,
        }
    }

    /// Moves the queue to these ring positions (a successor resuming a predecessor's rings).
    pub fn set_positions(&mut self, next_avail: u16, next_used: u16) {
        self.queue.set_next_avail(next_avail);
        self.queue.set_next_used(next_used);
    }

    /// Next available index (ring position) and next used index.
    pub fn positions(&self) -> (u16, u16) {
        (self.queue.next_avail(), self.queue.next_used())
    }

    /// The head the guest put at avail-ring position `pos` (a free-running index).
    pub fn avail_head(&self, mem: &GuestMemory, pos: u16) -> Option<u16> {
        let slot = u64::from(pos % self.table.size.max(1));
        let addr = self.queue.avail_ring() + 4 + 2 * slot;
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
        let mut left: Vec<u16> = held.to_vec();
        let mut rewound = 0;
        while !left.is_empty() {
            let q = base.wrapping_sub(1);
            let Some(k) = self
                .avail_head(mem, q)
                .and_then(|head| left.iter().position(|&h| h == head))
            else {
                break;
            };
            left.remove(k);
            base = q;
            rewound += 1;
        }
        for &h in &left {
            let _ = self.add_used(mem, h, 0);
        }
        self.queue.set_next_avail(base);
        if !left.is_empty() {
            self.signal();
        }
        GiveBack {
            base,
            rewound,
            emptied: left.len(),
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
        .read_obj::<u16>(GuestAddress(used_ring + 2))
        .ok()
        .map(u16::from_le)
}
