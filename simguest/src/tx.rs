//! The TX side of the driver: copies frames into per-slot buffers, exposes
//! them on the avail ring, kicks, and reclaims completed slots.
//!
//! Slot `s` owns descriptor `s` (or `2s, 2s+1` with `tx_split_header` and no
//! indirect descriptors) and the buffer `[virtio_net_hdr_v1][frame]` at
//! `slot_stride * s` in the queue's TX area. With INDIRECT_DESC the main
//! descriptor points at the slot's 1- or 2-entry indirect table.

use std::time::Duration;

use crate::error::{DeviceError, Error};
use crate::layout::{TxGeometry, DESC_SIZE};
use crate::memory::Area;
use crate::net_hdr::{VirtioNetHdr, VIRTIO_NET_HDR_LEN};
use crate::ring::{RawQueue, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT};
use crate::stats::DriverStats;

/// Header length as u32/u64 (12 always fits).
const HDR_LEN_U32: u32 = 12;
const HDR_LEN_U64: u64 = 12;

/// Encodes one descriptor in the little-endian table format.
fn encode_desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// Driver for one TX virtqueue.
#[derive(Debug)]
pub struct TxDriver {
    raw: RawQueue,
    geo: TxGeometry,
    bufs: Area,
    /// Indirect tables (only with INDIRECT_DESC).
    tables: Option<Area>,
    /// Free slot numbers (a stack).
    free: Vec<u16>,
    in_flight: Vec<bool>,
    n_in_flight: usize,
    last_used: u16,
    foreign: Vec<(u32, u32)>,
    /// Header + frame length every slot holds after `prefill`.
    prefilled: Option<u32>,
}

impl TxDriver {
    pub(crate) fn new(raw: RawQueue, geo: TxGeometry, bufs: Area, tables: Option<Area>) -> Self {
        let slots = usize::from(geo.slots);
        Self {
            raw,
            geo,
            bufs,
            tables,
            free: (0..geo.slots).rev().collect(),
            in_flight: vec![false; slots],
            n_in_flight: 0,
            last_used: 0,
            foreign: Vec::with_capacity(64),
            prefilled: None,
        }
    }

    /// Copies `hdr` + `frame` into a free slot and adds it to the avail ring
    /// without publishing. `Ok(false)` if every slot is in flight;
    /// [`Error::FrameTooLarge`] if it exceeds `tx_buffer_size`.
    pub fn push(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<bool, Error> {
        let total = VIRTIO_NET_HDR_LEN + frame.len();
        let too_large = || Error::FrameTooLarge {
            len: frame.len(),
            max: usize::try_from(self.geo.capacity).unwrap_or(usize::MAX),
        };
        let total32 = u32::try_from(total).map_err(|_| too_large())?;
        if total32 > self.geo.capacity {
            return Err(too_large());
        }
        let Some(slot) = self.free.pop() else {
            return Ok(false);
        };
        // This slot no longer holds the prefilled frame.
        self.prefilled = None;
        let off = u64::from(slot) * self.geo.slot_stride;
        self.bufs.write(off, &hdr.to_bytes());
        self.bufs.write(off + HDR_LEN_U64, frame);
        self.post_slot(slot, total32);
        Ok(true)
    }

    /// Writes `hdr` + `frame` into every slot's buffer once, for
    /// [`push_prefilled`](Self::push_prefilled).
    pub fn prefill(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<(), Error> {
        let total = VIRTIO_NET_HDR_LEN + frame.len();
        if u32::try_from(total).map_or(true, |t| t > self.geo.capacity) {
            return Err(Error::FrameTooLarge {
                len: frame.len(),
                max: usize::try_from(self.geo.capacity).unwrap_or(usize::MAX),
            });
        }
        for slot in 0..self.geo.slots {
            let off = u64::from(slot) * self.geo.slot_stride;
            self.bufs.write(off, &hdr.to_bytes());
            self.bufs.write(off + HDR_LEN_U64, frame);
        }
        self.prefilled = Some(u32::try_from(total).unwrap_or(u32::MAX));
        Ok(())
    }

    /// Adds a free slot whose buffer already holds the frame written by
    /// [`prefill`](Self::prefill), without copying it again: a guest whose
    /// data is already in its buffers (benchmarks of large frames, where the
    /// copy would otherwise measure the simulated guest instead of the
    /// device). `Ok(false)` if every slot is in flight; an error without a
    /// prefill.
    pub fn push_prefilled(&mut self) -> Result<bool, Error> {
        let Some(total) = self.prefilled else {
            return Err(Error::InvalidConfig("push_prefilled before prefill".into()));
        };
        let Some(slot) = self.free.pop() else {
            return Ok(false);
        };
        self.post_slot(slot, total);
        Ok(true)
    }

    /// Writes the descriptors of a filled slot and adds it to the avail ring.
    fn post_slot(&mut self, slot: u16, total32: u32) {
        let off = u64::from(slot) * self.geo.slot_stride;
        let gpa = self.bufs.gpa(off);
        let frame_len = total32 - HDR_LEN_U32;
        // A zero-length frame descriptor is pointless; fall back to one.
        let split = self.geo.split && frame_len > 0;
        let head = slot * self.geo.descs_per_slot;

        if let Some(tables) = &self.tables {
            let entries = u64::from(self.geo.indirect_entries);
            let toff = u64::from(slot) * entries * DESC_SIZE;
            let used_entries = if split {
                tables.write(toff, &encode_desc(gpa, HDR_LEN_U32, VIRTQ_DESC_F_NEXT, 1));
                tables.write(
                    toff + DESC_SIZE,
                    &encode_desc(gpa + HDR_LEN_U64, frame_len, 0, 0),
                );
                2
            } else {
                tables.write(toff, &encode_desc(gpa, total32, 0, 0));
                1
            };
            let table_len = u32::try_from(DESC_SIZE).unwrap_or(16) * used_entries;
            self.raw
                .write_desc(head, tables.gpa(toff), table_len, VIRTQ_DESC_F_INDIRECT, 0);
        } else if split {
            self.raw
                .write_desc(head, gpa, HDR_LEN_U32, VIRTQ_DESC_F_NEXT, head + 1);
            self.raw
                .write_desc(head + 1, gpa + HDR_LEN_U64, frame_len, 0, 0);
        } else {
            self.raw.write_desc(head, gpa, total32, 0, 0);
        }
        self.in_flight[usize::from(slot)] = true;
        self.n_in_flight += 1;
        self.raw.push_avail(head);
    }

    /// Publishes the avail index and kicks if the device wants it
    /// (EVENT_IDX: `vring_need_event(avail_event, new, old)`; otherwise
    /// unless `used.flags` has NO_NOTIFY). Returns whether it kicked.
    pub fn flush(&mut self) -> bool {
        self.raw.flush_and_kick()
    }

    /// [`push`](Self::push) followed by [`flush`](Self::flush); returns
    /// the result of `push`.
    pub fn send(&mut self, hdr: &VirtioNetHdr, frame: &[u8]) -> Result<bool, Error> {
        let pushed = self.push(hdr, frame)?;
        if pushed {
            self.flush();
        }
        Ok(pushed)
    }

    /// Maps a used id to a slot number if it is a slot head.
    fn slot_of(&self, id: u32) -> Option<usize> {
        let per = u32::from(self.geo.descs_per_slot);
        let rem = id % per;
        if rem > 0 {
            return None;
        }
        let slot = usize::try_from(id / per).ok()?;
        (slot < self.in_flight.len()).then_some(slot)
    }

    fn reclaim_inner(&mut self, strict: bool) -> Result<usize, Error> {
        let used = self.raw.used_idx();
        let size = self.raw.size();
        let delta = used.wrapping_sub(self.last_used);
        if delta > size {
            self.raw.stats.device_errors += 1;
            return Err(self.device_err(DeviceError::UsedIdxJump { delta, size }));
        }
        let mut n = 0;
        while self.last_used != used {
            let (id, len) = self.raw.read_used(self.last_used);
            self.last_used = self.last_used.wrapping_add(1);
            if self.raw.is_reserved(id) {
                self.raw.stats.foreign_used += 1;
                self.foreign.push((id, len));
                continue;
            }
            match self.slot_of(id) {
                Some(slot) if self.in_flight[slot] => {
                    self.in_flight[slot] = false;
                    self.n_in_flight -= 1;
                    // `slot < slots <= u16::MAX` by construction.
                    self.free.push(u16::try_from(slot).unwrap_or(u16::MAX));
                    n += 1;
                    let s = &mut self.raw.stats;
                    s.completed += 1;
                    s.packets += 1;
                    s.used_len_total += u64::from(len);
                }
                _ => {
                    self.raw.stats.device_errors += 1;
                    if strict {
                        return Err(self.device_err(DeviceError::UnknownId { id }));
                    }
                    self.foreign.push((id, len));
                }
            }
        }
        Ok(n)
    }

    fn device_err(&self, kind: DeviceError) -> Error {
        Error::Device {
            queue: self.raw.index(),
            kind,
        }
    }

    /// Consumes the used ring, frees the completed slots and returns how
    /// many completed. Used entries for raw (reserved) heads, and bogus ones
    /// (also counted in `stats().device_errors`), go to
    /// [`take_foreign_used`](Self::take_foreign_used).
    pub fn reclaim(&mut self) -> usize {
        self.reclaim_inner(false).unwrap_or(0)
    }

    /// Like [`reclaim`](Self::reclaim) but returns an error for a used entry
    /// that names no in-flight slot (or a used index jump). Entries before
    /// the bad one are reclaimed; the bad one is consumed.
    pub fn try_reclaim(&mut self) -> Result<usize, Error> {
        self.reclaim_inner(true)
    }

    /// Used entries the driver did not own, as `(id, len)`, drained.
    pub fn take_foreign_used(&mut self) -> Vec<(u32, u32)> {
        std::mem::take(&mut self.foreign)
    }

    /// Slots pushed but not yet reclaimed.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.n_in_flight
    }

    /// Slots available for `push`.
    #[must_use]
    pub fn free_slots(&self) -> usize {
        self.free.len()
    }

    /// Total number of TX slots.
    #[must_use]
    pub fn capacity(&self) -> usize {
        usize::from(self.geo.slots)
    }

    /// Largest frame (without header) `push` accepts.
    #[must_use]
    pub fn max_frame_len(&self) -> usize {
        usize::try_from(self.geo.capacity - HDR_LEN_U32).unwrap_or(usize::MAX)
    }

    /// The next used ring position the driver will read.
    #[must_use]
    pub fn last_used(&self) -> u16 {
        self.last_used
    }

    /// Arms the interrupt (EVENT_IDX: `used_event = last_used`; otherwise
    /// clears NO_INTERRUPT), re-checks the used ring, else blocks on the call
    /// eventfd for up to `timeout`. True if woken or completions are
    /// available. Interrupts are suppressed again afterwards.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, Error> {
        self.raw.wait_used(self.last_used, 1, timeout)
    }

    /// Counters.
    #[must_use]
    pub fn stats(&self) -> DriverStats {
        self.raw.stats
    }

    /// Raw ring access for hand-built chains (use the descriptors from
    /// [`RawQueue::free_desc_indices`]).
    pub fn raw(&mut self) -> &mut RawQueue {
        &mut self.raw
    }
}

#[cfg(test)]
mod tests {
    use super::encode_desc;

    #[test]
    fn desc_encoding_is_le() {
        let d = encode_desc(0x1122_3344_5566_7788, 0x99aa_bbcc, 0x0102, 0x0304);
        assert_eq!(d[0], 0x88);
        assert_eq!(d[8], 0xcc);
        assert_eq!(d[12], 0x02);
        assert_eq!(d[14], 0x04);
    }
}
