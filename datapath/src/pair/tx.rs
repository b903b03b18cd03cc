//! TX: popping a chain into a TAP write (the notification protocol included) and completing
//! it with the kernel's result.

use super::{bump, Direction, QueuePair, Rearm, VNET_HDR_LEN_U32};
use crate::chain::{self, Access, ChainError, Segments};
use crate::tap::VNET_HDR_LEN;

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
    /// The device asked the worker to stop: nothing was popped; stop popping.
    Stopped,
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

impl QueuePair {
    // ---- TX ----------------------------------------------------------------------------

    /// Pops the next TX chain into `w`, with the notification protocol: kicks are off while
    /// chains are popped; when the ring runs dry the guest's kick is armed and the ring
    /// re-checked ([`TxPop::Idle`] only when it is really empty). Malformed chains are
    /// completed with length 0 and counted on the way. A requested stop is seen here, between
    /// chains ([`TxPop::Stopped`], before anything is popped).
    pub fn pop_tx(&mut self, w: &mut TxWrite) -> TxPop {
        if self.stop_requested() {
            return TxPop::Stopped;
        }
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
            let len = w.seg.len as usize;
            let checked = walked.and(if len < VNET_HDR_LEN {
                Err(ChainError::ShorterThanHeader(w.seg.len))
            } else if len > VNET_HDR_LEN + crate::features::MAX_GSO_FRAME {
                Err(ChainError::LongerThanFrame(w.seg.len))
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
}
