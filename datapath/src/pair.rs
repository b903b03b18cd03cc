//! One queue pair's device logic, shared by both engines: popping and validating chains,
//! building the iovecs of TAP reads and writes, and completing them into the used rings
//! (`num_buffers`, dirty logging, counters). The engines only move bytes.

use std::collections::VecDeque;
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress};

use crate::chain::{self, Access, ChainError, Segments};
use crate::features;
use crate::memory::GuestMemory;
use crate::stats::{Counters, QueuePairStats};
use crate::tap::{TapQueue, VNET_HDR_LEN};
use crate::virtqueue::Virtqueue;
use crate::vnet_hdr::NUM_BUFFERS_OFFSET;

/// Size of the discard area behind every RX read: a frame that does not fit the posted guest
/// buffers spills into it and is dropped (and counted) instead of being truncated silently.
const OVERFLOW_LEN: usize = 128 * 1024;

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
    /// Host iovecs of every chain, then the overflow area.
    pub seg: Segments,
    /// (head, capacity) of each chain, in order.
    chains: Vec<(u16, u32)>,
}

impl RxRead {
    /// An empty read with room for `chains` chains.
    pub fn new(chains: usize) -> RxRead {
        RxRead {
            seg: Segments::with_capacity(chains * 2 + 1),
            chains: Vec::with_capacity(chains),
        }
    }

    /// The heads this read holds.
    pub fn heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.chains.iter().map(|c| c.0)
    }

    fn clear(&mut self) {
        self.seg.clear();
        self.chains.clear();
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

/// Settings of a queue pair's datapath.
#[derive(Clone, Copy, Debug)]
pub struct PairSettings {
    /// Negotiated virtio features.
    pub features: u64,
    /// Link MTU (sizes RX reads when the guest takes no GSO frames).
    pub mtu: u16,
}

/// One queue pair: its rings, its TAP queue, counters.
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
    /// The TAP queue.
    pub tap: TapQueue,
    /// Counters, published to `stats`.
    pub counters: Counters,
    /// Where counters are published.
    pub stats: Arc<QueuePairStats>,
    mrg_rxbuf: bool,
    rx_capacity: u32,
    /// RX heads popped from the avail ring but not inside a posted read, in ring order.
    spare_rx: VecDeque<u16>,
    overflow: Box<[u8]>,
    rx_used_pending: bool,
    tx_used_pending: bool,
}

impl QueuePair {
    /// Assembles a queue pair.
    pub fn new(
        index: u16,
        mem: GuestMemory,
        rx: Virtqueue,
        tx: Virtqueue,
        tap: TapQueue,
        settings: PairSettings,
        stats: Arc<QueuePairStats>,
    ) -> QueuePair {
        let capacity = features::rx_frame_capacity(settings.features, settings.mtu);
        QueuePair {
            index,
            mem,
            rx,
            tx,
            tap,
            counters: Counters::default(),
            stats,
            mrg_rxbuf: settings.features & features::NET_F_MRG_RXBUF != 0,
            rx_capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
            spare_rx: VecDeque::new(),
            overflow: vec![0u8; OVERFLOW_LEN].into_boxed_slice(),
            rx_used_pending: false,
            tx_used_pending: false,
        }
    }

    /// Publishes the counters.
    pub fn publish(&self) {
        self.stats.counters.publish(&self.counters);
    }

    /// RX heads held back (popped, in no read), in order: what a handoff re-posts.
    pub fn spare_rx(&self) -> impl Iterator<Item = u16> + '_ {
        self.spare_rx.iter().copied()
    }

    // ---- TX ----------------------------------------------------------------------------

    /// Pops the next TX chain into `w`. Malformed chains are completed with length 0 and
    /// counted. Returns false when the avail ring is empty (or the queue broken).
    pub fn next_tx(&mut self, w: &mut TxWrite) -> bool {
        loop {
            let mut head = None;
            if self.tx.pop(&self.mem, 1, |h| head = Some(h)).is_err() {
                self.counters.queues_broken += 1;
                return false;
            }
            let Some(head) = head else { return false };
            w.head = head;
            w.seg.clear();
            let walked = chain::walk(
                &self.mem,
                self.tx.table(),
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
                Ok(()) => return true,
                Err(e) => {
                    self.counters.tx_malformed += 1;
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
                self.counters.tx_packets += 1;
                self.counters.tx_bytes += u64::from(w.seg.len) - VNET_HDR_LEN as u64;
            }
            Err(errno) => {
                self.counters.tx_errors += 1;
                tracing::debug!(head = w.head, errno, "TAP refused a TX frame");
            }
        }
        self.complete_used(Direction::Tx, w.head, 0);
    }

    // ---- RX ----------------------------------------------------------------------------

    fn next_rx_head(&mut self) -> Option<u16> {
        if let Some(h) = self.spare_rx.pop_front() {
            return Some(h);
        }
        let spare = &mut self.spare_rx;
        match self.rx.pop(&self.mem, 64, |h| spare.push_back(h)) {
            Ok(_) => self.spare_rx.pop_front(),
            Err(_) => {
                self.counters.queues_broken += 1;
                None
            }
        }
    }

    /// Fills `r` with enough guest buffers for the largest frame the TAP can hand over (one
    /// chain without MRG_RXBUF; several with it), then the overflow area. With
    /// `others_posted`, a read short of the full size is not posted (its chains wait for
    /// more); without, a partial read is posted so that progress never stalls.
    /// Returns false when no buffers are available.
    pub fn prepare_rx(&mut self, r: &mut RxRead, others_posted: bool) -> bool {
        r.clear();
        loop {
            if !r.chains.is_empty() && (!self.mrg_rxbuf || r.seg.len >= self.rx_capacity) {
                break;
            }
            let Some(head) = self.next_rx_head() else {
                if r.chains.is_empty() || others_posted {
                    self.return_rx(r);
                    self.counters.rx_no_buffers += 1;
                    return false;
                }
                break;
            };
            let before = r.seg.len;
            match chain::walk(
                &self.mem,
                self.rx.table(),
                head,
                Access::DeviceWrites,
                &mut r.seg,
            ) {
                Ok(()) => r.chains.push((head, r.seg.len - before)),
                Err(e) => {
                    self.counters.rx_malformed += 1;
                    tracing::warn!(queue = self.rx.index, head, error = %e, "dropping malformed RX chain");
                    self.complete_used(Direction::Rx, head, 0);
                }
            }
        }
        r.seg.iov.push(libc::iovec {
            iov_base: self.overflow.as_mut_ptr().cast(),
            iov_len: self.overflow.len(),
        });
        true
    }

    /// Gives the chains of an unposted or cancelled read back (to the front, in order).
    pub fn return_rx(&mut self, r: &mut RxRead) {
        for &(head, _) in r.chains.iter().rev() {
            self.spare_rx.push_front(head);
        }
        r.clear();
    }

    /// Completes a read that returned `n` bytes (header included).
    pub fn complete_rx(&mut self, r: &mut RxRead, n: usize) {
        let capacity = r.seg.len as usize;
        if n > capacity || n < VNET_HDR_LEN {
            // Larger than the guest's buffers: it went into the overflow area. Dropped, counted,
            // and the chains are reused.
            self.counters.rx_dropped_oversize += 1;
            self.return_rx(r);
            return;
        }
        // How many chains the frame occupies.
        let mut left = n;
        let mut used = 0usize;
        for &(_, cap) in &r.chains {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(cap as usize);
            used += 1;
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
            left -= l;
        }
        // Used entries, consecutive as MRG_RXBUF requires.
        let mut left = n;
        for i in 0..used {
            let (head, cap) = r.chains[i];
            let len = cap.min(u32::try_from(left).unwrap_or(u32::MAX));
            left -= len as usize;
            self.complete_used(Direction::Rx, head, len);
        }
        // Unused chains go back for the next read.
        for &(head, _) in r.chains[used..].iter().rev() {
            self.spare_rx.push_front(head);
        }
        self.counters.rx_packets += 1;
        self.counters.rx_bytes += (n - VNET_HDR_LEN) as u64;
        r.clear();
    }

    fn write_at(&self, gpas: &[(u64, u32)], mut offset: usize, bytes: &[u8]) {
        let mut bytes = bytes;
        for &(gpa, len) in gpas {
            if bytes.is_empty() {
                return;
            }
            let len = len as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            let take = (len - offset).min(bytes.len());
            // The range was validated when the chain was walked.
            let _ = self
                .mem
                .mmap()
                .write_slice(&bytes[..take], GuestAddress(gpa + offset as u64));
            bytes = &bytes[take..];
            offset = 0;
        }
    }

    // ---- used ring and interrupts ----------------------------------------------------------

    fn complete_used(&mut self, dir: Direction, head: u16, len: u32) {
        let (q, pending) = match dir {
            Direction::Rx => (&mut self.rx, &mut self.rx_used_pending),
            Direction::Tx => (&mut self.tx, &mut self.tx_used_pending),
        };
        if q.add_used(&self.mem, head, len).is_err() {
            self.counters.queues_broken += 1;
        }
        *pending = true;
    }

    /// For each queue with new used entries whose guest wants an interrupt, calls `signal`
    /// (once per queue: interrupts are coalesced per batch).
    pub fn interrupts(&mut self, mut signal: impl FnMut(&Virtqueue)) {
        if self.rx_used_pending {
            self.rx_used_pending = false;
            if self.rx.needs_notification(&self.mem) {
                self.counters.rx_interrupts += 1;
                signal(&self.rx);
            }
        }
        if self.tx_used_pending {
            self.tx_used_pending = false;
            if self.tx.needs_notification(&self.mem) {
                self.counters.tx_interrupts += 1;
                signal(&self.tx);
            }
        }
    }
}
