//! The RX side of the driver: posts device-writable chains, and consumes
//! received packets from the used ring — zero copy, across several chains
//! with MRG_RXBUF (virtio 1.2 §5.1.6.4) — validating everything the device
//! wrote.
//!
//! Chain `c` owns descriptors `c*k .. c*k+k` (`k = rx_descs_per_chain`);
//! its `rx_buffer_size` bytes are split into `k` pieces separated by guard
//! gaps, so the pieces are not contiguous in guest memory.

use std::time::Duration;

use crate::error::{DeviceError, Error};
use crate::layout::RxGeometry;
use crate::memory::Area;
use crate::net_hdr::{VirtioNetHdr, VIRTIO_NET_HDR_LEN};
use crate::ring::{RawQueue, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use crate::stats::DriverStats;

/// Header length as u32 (12 always fits).
const HDR_LEN_U32: u32 = 12;

/// A received packet, copied out of guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxPacket {
    /// The virtio-net header of the packet.
    pub hdr: VirtioNetHdr,
    /// The packet bytes after the header.
    pub data: Vec<u8>,
    /// Used ring entries the packet consumed.
    pub buffers: u16,
    /// Sum of the used entries' `len` (header included).
    pub used_len: u32,
}

/// Per-packet facts passed to the internal consumer.
#[derive(Clone, Copy, Debug)]
struct PacketInfo {
    buffers: u16,
    used_len: u32,
}

/// Driver for one RX virtqueue.
#[derive(Debug)]
pub struct RxDriver {
    raw: RawQueue,
    geo: RxGeometry,
    bufs: Area,
    mrg: bool,
    /// Chains not posted to the device (a stack).
    free: Vec<u16>,
    posted: Vec<bool>,
    /// Posted chains in the order they were made available (for `used_out_of_order`).
    posted_order: std::collections::VecDeque<u16>,
    n_posted: u16,
    last_used: u16,
    /// Used entries the next packet needs (> 1 while a merged packet is
    /// only partly in the used ring).
    need: u16,
    foreign: Vec<(u32, u32)>,
    /// Reused scratch for the zero-copy slices of one packet. Only holds
    /// entries while a callback runs; see `poll_inner`.
    slices: Vec<&'static [u8]>,
}

impl RxDriver {
    pub(crate) fn new(raw: RawQueue, geo: RxGeometry, bufs: Area, mrg: bool) -> Self {
        let slices = Vec::with_capacity(usize::from(raw.size()));
        Self {
            raw,
            geo,
            bufs,
            mrg,
            free: (0..geo.chains).rev().collect(),
            posted: vec![false; usize::from(geo.chains)],
            posted_order: std::collections::VecDeque::with_capacity(usize::from(geo.chains)),
            n_posted: 0,
            last_used: 0,
            need: 1,
            foreign: Vec::with_capacity(64),
            slices,
        }
    }

    /// Offset of piece `i` of chain `c` inside the RX area.
    fn piece_off(&self, c: u16, i: u16) -> u64 {
        u64::from(c) * self.geo.chain_stride + u64::from(i) * self.geo.piece_stride
    }

    /// Posts every free chain, publishes, and kicks if the device wants it.
    /// Returns the number of chains posted.
    pub fn refill(&mut self) -> usize {
        self.refill_up_to(usize::MAX)
    }

    /// Posts at most `max` free chains (a guest slow to refill: tests that make frames wait
    /// for buffers), publishes, and kicks if the device wants it. Returns the number posted.
    pub fn refill_up_to(&mut self, max: usize) -> usize {
        let k = self.geo.descs_per_chain;
        let mut n = 0;
        while n < max {
            let Some(c) = self.free.pop() else {
                break;
            };
            let head = c * k;
            for i in 0..k {
                let gpa = self.bufs.gpa(self.piece_off(c, i));
                let last = i + 1 == k;
                let flags = VIRTQ_DESC_F_WRITE | if last { 0 } else { VIRTQ_DESC_F_NEXT };
                let next = if last { 0 } else { head + i + 1 };
                self.raw
                    .write_desc(head + i, gpa, self.geo.piece_len(i), flags, next);
            }
            self.posted[usize::from(c)] = true;
            self.posted_order.push_back(c);
            self.n_posted += 1;
            self.raw.push_avail(head);
            n += 1;
        }
        if n > 0 {
            self.raw.flush_and_kick();
        }
        n
    }

    fn device_err(&mut self, kind: DeviceError) -> Error {
        self.raw.stats.device_errors += 1;
        Error::Device {
            queue: self.raw.index(),
            kind,
        }
    }

    /// Chain number for a used id, if it heads a posted chain.
    fn posted_chain(&self, id: u32) -> Option<u16> {
        let k = u32::from(self.geo.descs_per_chain);
        let rem = id % k;
        if rem > 0 {
            return None;
        }
        let c = u16::try_from(id / k).ok()?;
        self.posted
            .get(usize::from(c))
            .copied()
            .unwrap_or(false)
            .then_some(c)
    }

    /// Returns posted chain `c` to the free list.
    fn release(&mut self, c: u16) {
        match self.posted_order.iter().position(|&p| p == c) {
            Some(0) => {
                self.posted_order.pop_front();
            }
            Some(i) => {
                self.raw.stats.used_out_of_order += 1;
                self.posted_order.remove(i);
            }
            None => {}
        }
        self.posted[usize::from(c)] = false;
        self.n_posted -= 1;
        self.free.push(c);
    }

    /// Consumes the used entry at `last_used` as a device bug of kind
    /// `kind`, freeing its chain if it names a posted one.
    fn reject(&mut self, kind: DeviceError) -> Error {
        let (id, _) = self.raw.read_used(self.last_used);
        self.last_used = self.last_used.wrapping_add(1);
        self.need = 1;
        if let Some(c) = self.posted_chain(id) {
            self.release(c);
        }
        self.device_err(kind)
    }

    /// Consumes the used entry at `last_used`: validates id and len, returns
    /// the chain to the free list. On error the entry is consumed anyway.
    fn consume_entry(&mut self) -> Result<(u16, u32), Error> {
        let (id, len) = self.raw.read_used(self.last_used);
        let Some(c) = self.posted_chain(id) else {
            return Err(self.reject(DeviceError::UnknownId { id }));
        };
        if len > self.geo.capacity {
            let cap = self.geo.capacity;
            return Err(self.reject(DeviceError::LenTooLarge { id, len, cap }));
        }
        self.last_used = self.last_used.wrapping_add(1);
        self.release(c);
        let s = &mut self.raw.stats;
        s.completed += 1;
        s.used_len_total += u64::from(len);
        Ok((c, len))
    }

    /// Appends zero-copy slices of bytes `[from, to)` of chain `c`.
    fn push_slices(&mut self, c: u16, from: u32, to: u32) {
        let mut start = 0u32;
        for i in 0..self.geo.descs_per_chain {
            let plen = self.geo.piece_len(i);
            let (lo, hi) = (from.max(start), to.min(start + plen));
            if lo < hi {
                let off = self.piece_off(c, i) + u64::from(lo - start);
                let n = hi - lo;
                let p = self.bufs.ptr(off, u64::from(n));
                // SAFETY: `Area::ptr` checked that the `n` bytes are inside
                // the mapping, which `self.bufs` keeps alive. The device
                // returned the chain through the used ring (Acquire on
                // used.idx makes its writes visible) and the chain is on the
                // free list, which only `refill` touches, so nothing writes
                // these bytes while the slice exists; the 'static lifetime
                // never escapes: `poll_inner` clears `slices` before it
                // returns and callers only see them for the callback's
                // duration.
                let s: &'static [u8] =
                    unsafe { std::slice::from_raw_parts(p, usize::try_from(n).unwrap_or(0)) };
                self.slices.push(s);
            }
            start += plen;
            if start >= to {
                break;
            }
        }
    }

    /// Copies the header out of chain `c`.
    fn read_hdr(&self, c: u16) -> VirtioNetHdr {
        let mut b = [0u8; VIRTIO_NET_HDR_LEN];
        let mut got = 0usize;
        for i in 0..self.geo.descs_per_chain {
            if got == VIRTIO_NET_HDR_LEN {
                break;
            }
            let plen = usize::try_from(self.geo.piece_len(i)).unwrap_or(0);
            let n = plen.min(VIRTIO_NET_HDR_LEN - got);
            self.bufs.read(self.piece_off(c, i), &mut b[got..got + n]);
            got += n;
        }
        VirtioNetHdr::from_bytes(&b)
    }

    fn poll_inner<F>(&mut self, max_packets: usize, mut f: F) -> Result<usize, Error>
    where
        F: FnMut(&VirtioNetHdr, &[&[u8]], PacketInfo),
    {
        let size = self.raw.size();
        let mut packets = 0;
        while packets < max_packets {
            let used = self.raw.used_idx();
            let pending = used.wrapping_sub(self.last_used);
            if pending > size {
                return Err(self.device_err(DeviceError::UsedIdxJump {
                    delta: pending,
                    size,
                }));
            }
            if pending == 0 {
                break;
            }
            let (id, len) = self.raw.read_used(self.last_used);
            if self.raw.is_reserved(id) {
                self.last_used = self.last_used.wrapping_add(1);
                self.raw.stats.foreign_used += 1;
                self.foreign.push((id, len));
                continue;
            }
            // Peek at the first buffer to learn how many entries the packet
            // spans before consuming anything.
            let Some(c0) = self.posted_chain(id) else {
                return Err(self.reject(DeviceError::UnknownId { id }));
            };
            if len > self.geo.capacity {
                let cap = self.geo.capacity;
                return Err(self.reject(DeviceError::LenTooLarge { id, len, cap }));
            }
            if len < HDR_LEN_U32 {
                return Err(self.reject(DeviceError::ShortPacket { id, len }));
            }
            let hdr = self.read_hdr(c0);
            let nbufs = if self.mrg { hdr.num_buffers } else { 1 };
            if nbufs == 0 {
                return Err(self.reject(DeviceError::ZeroBuffers));
            }
            if nbufs > self.n_posted {
                let posted = self.n_posted;
                return Err(self.reject(DeviceError::TooManyBuffers { num: nbufs, posted }));
            }
            if nbufs > pending {
                // The rest of the packet is not in the used ring yet.
                self.need = nbufs;
                break;
            }
            self.need = 1;
            self.slices.clear(); // in case a callback panicked earlier
            let mut used_len = 0u32;
            let mut result = Ok(());
            for j in 0..nbufs {
                match self.consume_entry() {
                    Ok((c, len)) => {
                        let from = if j == 0 { HDR_LEN_U32 } else { 0 };
                        self.push_slices(c, from, len);
                        used_len = used_len.saturating_add(len);
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if let Err(e) = result {
                self.slices.clear();
                return Err(e);
            }
            f(
                &hdr,
                &self.slices,
                PacketInfo {
                    buffers: nbufs,
                    used_len,
                },
            );
            self.slices.clear();
            self.raw.stats.packets += 1;
            packets += 1;
        }
        Ok(packets)
    }

    /// Delivers every complete received packet to `f` as the header and
    /// zero-copy slices of guest memory holding the bytes after the header
    /// (several slices across chains/descriptors). The chains are freed but
    /// NOT reposted (call [`refill`](Self::refill)). Returns the number of
    /// packets; a packet whose buffers are not all used yet is left alone.
    ///
    /// A device bug (unknown/unposted id, len beyond the chain, short first
    /// buffer, bad `num_buffers`, used index jump) yields
    /// [`Error::Device`]; the offending entry is consumed, and packets
    /// delivered earlier in the same call are not counted in the error.
    pub fn poll_with<F: FnMut(&VirtioNetHdr, &[&[u8]])>(
        &mut self,
        mut f: F,
    ) -> Result<usize, Error> {
        self.poll_inner(usize::MAX, |h, s, _| f(h, s))
    }

    /// Receives at most one packet, copying it out (allocates).
    pub fn poll(&mut self) -> Result<Option<RxPacket>, Error> {
        let mut out = None;
        self.poll_inner(1, |hdr, slices, info| {
            let mut data = Vec::with_capacity(slices.iter().map(|s| s.len()).sum());
            for s in slices {
                data.extend_from_slice(s);
            }
            out = Some(RxPacket {
                hdr: *hdr,
                data,
                buffers: info.buffers,
                used_len: info.used_len,
            });
        })?;
        Ok(out)
    }

    /// Like [`TxDriver::wait`](crate::TxDriver::wait) for received packets.
    /// If the last poll saw only part of a merged packet, the interrupt is
    /// armed for (and "work available" means) its last buffer.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, Error> {
        self.raw.wait_used(self.last_used, self.need, timeout)
    }

    /// Used entries for raw (reserved-descriptor) chains as `(id, len)`,
    /// drained.
    pub fn take_foreign_used(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.foreign)
    }

    /// Chains currently posted to the device.
    #[must_use]
    pub fn posted(&self) -> usize {
        usize::from(self.n_posted)
    }

    /// Chains waiting for `refill`.
    #[must_use]
    pub fn free_chains(&self) -> usize {
        self.free.len()
    }

    /// Total number of RX chains.
    #[must_use]
    pub fn capacity(&self) -> usize {
        usize::from(self.geo.chains)
    }

    /// Bytes per chain (header included).
    #[must_use]
    pub fn buffer_size(&self) -> u32 {
        self.geo.capacity
    }

    /// The next used ring position the driver will read.
    #[must_use]
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> DriverStats {
        self.raw.stats
    }

    /// Raw ring access for hand-built chains.
    pub fn raw(&mut self) -> &mut RawQueue {
        &mut self.raw
    }
}
