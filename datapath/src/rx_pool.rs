//! The RX chains a queue pair holds outside posted reads (as Firecracker's `rx_buffer.rs`):
//! popped from the avail ring, walked once into host pieces, and kept in ring order until a
//! read takes them. A chain is one [`RxChain`] record here and in a read; its pieces are
//! cached by head from the walk until the chain is used (the guest then owns its descriptors
//! again and may rewrite them).
//!
//! Heads come from the guest: nothing indexes unchecked (the lints below insist).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::collections::VecDeque;

use crate::chain::{self, Access, ChainError, Segments, MAX_SEGMENTS};
use crate::memory::GuestMemory;
use crate::ring_view::RingView;
use crate::tap::VNET_HDR_LEN;

/// Guest buffers one RX read may have: one `readv` takes `MAX_SEGMENTS` (`UIO_MAXIOV`)
/// iovecs, and the spill area is one of them.
pub(crate) const MAX_RX_PIECES: usize = MAX_SEGMENTS - 1;

/// One walked RX chain: its head and its capacity in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RxChain {
    /// The chain's head (below the queue size: checked when popped).
    pub head: u16,
    /// Bytes the chain holds.
    pub len: u32,
}

/// One guest buffer of a walked chain. The host address is kept as an integer so the pair
/// stays `Send`; it points into the guest mapping, which lives as long as the pair.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Piece {
    /// Host address.
    pub host: usize,
    /// Length.
    pub len: u32,
    /// Guest-physical address (for dirty logging and copies).
    pub gpa: u64,
}

/// The cached walk of one head, valid from the walk until the chain is used.
#[derive(Debug, Default)]
struct Walked {
    valid: bool,
    pieces: Vec<Piece>,
    len: u32,
}

/// The spare RX chains of a queue pair and the walk cache (see the module documentation).
#[derive(Debug)]
pub(crate) struct RxPool {
    /// Chains popped and walked, in no read, in ring order.
    spare: VecDeque<RxChain>,
    /// Bytes of guest buffers in `spare`.
    spare_bytes: u64,
    /// Pop order of each head (to list held heads in ring order at quiesce time).
    pop_seq: Vec<u64>,
    popped: u64,
    /// Walked chains by head.
    walked: Vec<Walked>,
    scratch: Segments,
}

impl RxPool {
    /// An empty pool for a queue of `size` descriptors.
    pub fn new(size: u16) -> RxPool {
        let size = usize::from(size);
        RxPool {
            // At most one entry per head (a held head is never popped again): sized once, so
            // the list never allocates while the worker runs.
            spare: VecDeque::with_capacity(size),
            spare_bytes: 0,
            pop_seq: vec![0; size],
            popped: 0,
            // Room for a chain of a few buffers per head up front (a longer chain grows its
            // entry once).
            walked: (0..size)
                .map(|_| Walked {
                    pieces: Vec::with_capacity(4),
                    ..Walked::default()
                })
                .collect(),
            scratch: Segments::with_capacity(4),
        }
    }

    /// Bytes of guest buffers in the spare chains.
    pub fn spare_bytes(&self) -> u64 {
        self.spare_bytes
    }

    /// Heads of the spare chains, in order.
    pub fn heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.spare.iter().map(|c| c.head)
    }

    /// Forgets every spare chain (a successor taking over a predecessor's heads).
    pub fn clear(&mut self) {
        self.spare.clear();
        self.spare_bytes = 0;
    }

    /// Notes that `head` was popped now (its place in ring order).
    pub fn note_popped(&mut self, head: u16) {
        self.popped = self.popped.wrapping_add(1);
        if let Some(s) = self.pop_seq.get_mut(usize::from(head)) {
            *s = self.popped;
        }
    }

    /// Adds a chain at the back (just popped).
    pub fn push_back(&mut self, c: RxChain) {
        self.spare.push_back(c);
        self.spare_bytes = self.spare_bytes.saturating_add(u64::from(c.len));
    }

    /// Puts a chain back at the front (it goes first into the next read).
    pub fn give_back(&mut self, c: RxChain) {
        self.spare.push_front(c);
        self.spare_bytes = self.spare_bytes.saturating_add(u64::from(c.len));
    }

    /// Puts a read's chains back, keeping the spare list in ring order: each goes where its
    /// pop order puts it (a binary search), at the front in the usual case, just after the
    /// chains an earlier read of the same burst handed back when several found nothing.
    pub fn give_back_all(&mut self, chains: &[RxChain]) {
        for &c in chains {
            let seq = self.seq_of(c.head);
            let at = self.spare.partition_point(|s| self.seq_of(s.head) < seq);
            self.spare.insert(at, c);
            self.spare_bytes = self.spare_bytes.saturating_add(u64::from(c.len));
        }
    }

    /// Where `head` was popped in ring order (larger: later).
    pub fn seq_of(&self, head: u16) -> u64 {
        self.pop_seq
            .get(usize::from(head))
            .copied()
            .unwrap_or(u64::MAX)
    }

    /// True when some spare chain was popped before `head` (a read's first chain): a frame
    /// in that read would be used before an older chain.
    pub fn has_older_than(&self, head: u16) -> bool {
        self.has_older_than_seq(self.seq_of(head))
    }

    /// True when some spare chain was popped before ring-order place `seq`.
    pub fn has_older_than_seq(&self, seq: u64) -> bool {
        self.spare
            .front()
            .is_some_and(|c| self.seq_of(c.head) < seq)
    }

    /// Takes the first spare chain.
    pub fn pop_front(&mut self) -> Option<RxChain> {
        let c = self.spare.pop_front()?;
        self.spare_bytes = self.spare_bytes.saturating_sub(u64::from(c.len));
        Some(c)
    }

    /// Puts the spare chains back in the order they were popped (reads that were cancelled or
    /// refused hand their chains back in completion order).
    pub fn settle_order(&mut self) {
        let seq = &self.pop_seq;
        self.spare
            .make_contiguous()
            .sort_by_key(|c| seq.get(usize::from(c.head)).copied().unwrap_or(u64::MAX));
    }

    /// The cached pieces of `head` (empty if it was not walked).
    pub fn pieces(&self, head: u16) -> &[Piece] {
        self.walked
            .get(usize::from(head))
            .map_or(&[], |w| w.pieces.as_slice())
    }

    /// The guest owns the chain at `head` again (it was used): its walk is stale.
    pub fn forget_walk(&mut self, head: u16) {
        if let Some(w) = self.walked.get_mut(usize::from(head)) {
            w.valid = false;
        }
    }

    /// Walks the RX chain at `head` into the cache (or finds it there); returns it. A chain
    /// with more pieces than a read takes, or shorter than the vnet header, is refused.
    pub fn walk(
        &mut self,
        mem: &GuestMemory,
        ring: &RingView,
        head: u16,
    ) -> Result<RxChain, ChainError> {
        let slot = usize::from(head);
        let out_of_range = ChainError::IndexOutOfRange {
            index: head,
            size: ring.size(),
        };
        let Some(cached) = self.walked.get(slot) else {
            return Err(out_of_range);
        };
        if cached.valid {
            return Ok(RxChain {
                head,
                len: cached.len,
            });
        }
        self.scratch.clear();
        chain::walk_ring(mem, ring, head, Access::DeviceWrites, &mut self.scratch)?;
        if self.scratch.iov.len() > MAX_RX_PIECES {
            // A read needs one more iovec for its spill area.
            return Err(ChainError::TooManySegments(MAX_RX_PIECES));
        }
        if (self.scratch.len as usize) < VNET_HDR_LEN {
            // Every RX buffer must hold the header (and so `num_buffers`) of a frame that
            // starts in it: found by the rx_pair fuzz target (a chain of 8 bytes was used as
            // the first buffer of a merged frame, its `num_buffers` written into the next).
            return Err(ChainError::ShorterThanHeader(self.scratch.len));
        }
        let Some(walked) = self.walked.get_mut(slot) else {
            return Err(out_of_range);
        };
        walked.pieces.clear();
        for (iov, &(gpa, len)) in self.scratch.iov.iter().zip(&self.scratch.gpa) {
            walked.pieces.push(Piece {
                host: iov.iov_base as usize,
                len,
                gpa,
            });
        }
        walked.len = self.scratch.len;
        walked.valid = true;
        Ok(RxChain {
            head,
            len: walked.len,
        })
    }
}
