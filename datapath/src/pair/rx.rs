//! RX: preparing a TAP read from the guest's chains (one, or several with MRG_RXBUF, then the
//! spill area), completing it (`num_buffers`, the frame's dirty log, used entries), and the
//! frames that spill past the posted chains or wait for the guest to refill.

use super::{bump, Direction, QueuePair, Rearm};
use crate::chain::Segments;
use crate::memory::DirtyLogging;
use crate::rx_pool::{RxChain, MAX_RX_PIECES};
use crate::tap::VNET_HDR_LEN;
use crate::vnet_hdr::NUM_BUFFERS_OFFSET;

/// Outcome of continuing a frame into further chains.
enum Spill {
    Done,
    Wait,
    Drop,
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
/// What [`QueuePair::prepare_rx`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxPrep {
    /// The read has guest buffers and the spill area: post it.
    Ready,
    /// The guest has not posted (enough) buffers and its kick is armed: wait for it.
    NoBuffers,
    /// This pass popped as many chains as it may: come back without waiting for a kick.
    Withheld,
    /// The device asked the worker to stop: nothing was popped or prepared; post nothing.
    Stopped,
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
/// Where [`QueuePair::keep_ring_order`] left a completed frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Placed {
    /// In the chains it was read into (already in ring order).
    Kept,
    /// Copied into the oldest chains.
    Moved,
    /// The oldest chains cannot hold it: dropped and counted, its chains spare again.
    Dropped,
}
/// Size of the spill area behind every RX read. With MRG_RXBUF a read is posted with guest
/// buffers for the frame size recent traffic predicts; a larger frame spills here and is copied
/// into further chains on completion. A frame that does not fit guest buffers plus spill, or
/// that would need more chains than the guest has posted, is dropped and counted: never
/// truncated silently.
const SPILL_LEN: usize = 128 * 1024;

impl QueuePair {
    /// How many chains an RX read of this pair should have room for from the start: the
    /// largest frame the pair may receive in 1 KiB buffers (a read that needs more grows
    /// once; engines create their reads with this, so that a slot first used in the middle
    /// of a run does not allocate then).
    pub fn rx_read_chains(&self) -> usize {
        (self.rx_capacity as usize / 1024)
            .saturating_add(2)
            .min(MAX_RX_PIECES)
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
        self.rx_youngest_posted = self.rx_youngest_posted.max(self.rx_pool.seq_of(c.head));
        r.chains.push(c);
        true
    }

    /// Prepares a read, with the notification protocol (see [`pop_tx`](Self::pop_tx)):
    /// fills `r` with guest buffers (one chain without MRG_RXBUF; with it, chains for the
    /// predicted frame size, within what one `readv` takes), then the read's spill area.
    /// `others_posted`: other reads are outstanding (with MRG_RXBUF and GSO a further read
    /// is only posted while the guest's spare buffers can take a largest frame beyond them).
    ///
    /// Frames carried over a stop or from a predecessor go first: while one waits for guest
    /// buffers, no read is prepared (frames behind it wait in the TAP, in order).
    pub fn prepare_rx(&mut self, r: &mut RxRead, others_posted: bool) -> RxPrep {
        if self.stop_requested() {
            return RxPrep::Stopped;
        }
        loop {
            self.quiet(Direction::Rx);
            let step = match self.deliver_carried(r) {
                RxPrepare::Ready => self.fill_rx_read(r, others_posted),
                waiting => waiting,
            };
            match step {
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
        // Chains are used in ring order (see `keep_ring_order`): spare chains older than
        // those of posted reads (kept over by a read that got a shorter frame, or handed back
        // by one that found nothing) wait until those reads complete, then go first.
        if others_posted && self.rx_pool.has_older_than_seq(self.rx_youngest_posted) {
            return RxPrepare::Later;
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
            match self.add_spill_chains(r, n) {
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

    /// A frame waits for guest buffers while the worker stops: it is copied out of its read
    /// (the bytes the TAP put into guest buffers, then the spill area) and kept in the pair,
    /// oldest first, so that a handoff carries it to the successor (or a resumed worker
    /// delivers it) before anything else is read. The read's chains go back to the spare
    /// list. Beyond [`MAX_CARRIED_FRAMES`](super::MAX_CARRIED_FRAMES) it is dropped and
    /// counted.
    pub fn carry_deferred(&mut self, r: &mut RxRead) {
        if self.rx_carried.len() >= super::MAX_CARRIED_FRAMES {
            self.drop_deferred(r);
            return;
        }
        let n = r.frame;
        let posted = (r.posted as usize).min(n);
        let mut frame = vec![0u8; n];
        self.read_pieces(&r.seg.gpa, frame.get_mut(..posted).unwrap_or_default());
        let spilled = n.saturating_sub(posted);
        if let (Some(dst), Some(src)) = (frame.get_mut(posted..), r.spill.get(..spilled)) {
            dst.copy_from_slice(src);
        }
        self.rx_carried.push_back(frame);
        self.return_rx(r);
    }

    /// Delivers the carried frames, oldest first, into guest chains (copies). [`RxPrepare::
    /// Ready`] when none is left; otherwise why the oldest still waits.
    fn deliver_carried(&mut self, r: &mut RxRead) -> RxPrepare {
        while let Some(frame) = self.rx_carried.pop_front() {
            r.clear();
            let n = frame.len();
            if self.rx.is_broken() {
                // Nothing is written to a broken queue: the frame is lost with it.
                continue;
            }
            if n < VNET_HDR_LEN || n > self.rx_capacity as usize {
                bump(&mut self.counters.rx_dropped_oversize);
                continue;
            }
            while (r.seg.len as usize) < n {
                if !self.mrg_rxbuf && !r.chains.is_empty() {
                    break;
                }
                if !self.add_rx_chain(r) {
                    break;
                }
            }
            if (r.seg.len as usize) < n {
                if !self.mrg_rxbuf && !r.chains.is_empty() {
                    // Without MRG_RXBUF a frame must fit one chain (virtio 1.2 §5.1.6.3.1).
                    bump(&mut self.counters.rx_dropped_oversize);
                    self.return_rx(r);
                    continue;
                }
                // Not enough guest buffers yet: the frame keeps its place.
                self.return_rx(r);
                self.rx_carried.push_front(frame);
                return self.no_rx_chain();
            }
            r.posted = r.seg.len;
            r.frame = n;
            self.write_at(&r.seg.gpa, 0, &frame);
            self.finish_rx(r, n);
        }
        RxPrepare::Ready
    }

    /// Keeps RX chains used in ring order (the order the guest made them available): a read
    /// whose first chain is younger than a spare chain (an earlier read kept chains over, or
    /// found nothing), or whose spill took older chains, has its frame moved into the oldest
    /// chains. A copy, only then; the order is what QEMU relies on when a backend dies and it
    /// resumes the avail ring at the used index (issue 12's crash recovery).
    ///
    /// [`Placed::Dropped`] (counted) when the oldest chains cannot hold the frame: without
    /// MRG_RXBUF a frame must fit the oldest chain alone, as it would have had the reads
    /// completed in order (virtio 1.2 §5.1.6.3.1; vhost-net discards such a frame too), and
    /// a frame is never spread over chains it does not fit or cut short.
    fn keep_ring_order(&mut self, r: &mut RxRead, n: usize) -> Placed {
        let Some(first) = r.chains.first() else {
            return Placed::Kept;
        };
        let in_order = r.chains.windows(2).all(
            |w| matches!(w, [a, b] if self.rx_pool.seq_of(a.head) < self.rx_pool.seq_of(b.head)),
        );
        if in_order && !self.rx_pool.has_older_than(first.head) {
            return Placed::Kept;
        }
        bump(&mut self.counters.rx_reordered);
        // What the kernel put into the posted chains, then the spill area's bytes (not
        // copied into the chains yet: a spill chain overlapping a posted buffer would
        // otherwise overwrite kernel bytes before they are read back).
        let mut frame = std::mem::take(&mut self.rx_reorder);
        frame.clear();
        frame.resize(n, 0);
        let posted = (r.posted as usize).min(n);
        let (kernel, spilled) = frame.split_at_mut(posted);
        self.read_pieces(&r.seg.gpa, kernel);
        if let Some(src) = r.spill.get(..spilled.len()) {
            spilled.copy_from_slice(src);
        }
        self.rx_pool.give_back_all(&r.chains);
        let frame_len = r.frame;
        r.clear();
        r.frame = frame_len;
        // With MRG_RXBUF the chains just given back hold the frame, so the oldest ones do
        // too; without it only the oldest chain may take it.
        while (r.seg.len as usize) < n {
            if !self.mrg_rxbuf && !r.chains.is_empty() {
                break;
            }
            if !self.add_rx_chain(r) {
                break;
            }
        }
        self.rx_reorder = frame;
        if (r.seg.len as usize) < n {
            bump(&mut self.counters.rx_dropped_oversize);
            self.return_rx(r);
            return Placed::Dropped;
        }
        r.posted = r.seg.len;
        self.write_at(&r.seg.gpa, 0, &self.rx_reorder);
        Placed::Moved
    }

    fn finish_rx(&mut self, r: &mut RxRead, n: usize) {
        match self.keep_ring_order(r, n) {
            Placed::Dropped => return,
            Placed::Kept => self.copy_spill(r, n),
            Placed::Moved => {}
        }
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
    /// fits (`finish_rx` copies the spilled bytes once it knows where the frame goes).
    /// [`Spill::Drop`] (counted) when the frame is larger than the TAP may produce,
    /// [`Spill::Wait`] while the guest has not posted enough buffers.
    fn add_spill_chains(&mut self, r: &mut RxRead, n: usize) -> Spill {
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
        bump(&mut self.counters.rx_spilled);
        Spill::Done
    }

    /// Copies the bytes of a frame of `n` bytes beyond the posted chains from the spill area
    /// into the chains `add_spill_chains` added.
    fn copy_spill(&self, r: &RxRead, n: usize) {
        let posted = r.posted as usize;
        if n > posted {
            self.write_at(
                &r.seg.gpa,
                posted,
                r.spill.get(..n.saturating_sub(posted)).unwrap_or_default(),
            );
        }
    }

    /// Writes `bytes` at `offset` of the frame laid out over `gpas` (not dirty-logged: the
    /// callers write inside a frame `finish_rx` logs as a whole).
    /// Fills `dst` from the guest pieces `gpas`, in order, until `dst` is full or the pieces
    /// end (the inverse of [`QueuePair::write_at`] at offset 0). The ranges were validated
    /// when the chains were walked.
    fn read_pieces(&self, gpas: &[(u64, u32)], dst: &mut [u8]) {
        let mut at = 0usize;
        for &(gpa, len) in gpas {
            let Some(rest) = dst.get_mut(at..).filter(|d| !d.is_empty()) else {
                return;
            };
            let take = (len as usize).min(rest.len());
            let _ = vm_memory::Bytes::read_slice(
                self.mem.mmap(),
                rest.get_mut(..take).unwrap_or_default(),
                vm_memory::GuestAddress(gpa),
            );
            at = at.saturating_add(take);
        }
    }

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
}
