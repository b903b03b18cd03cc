//! [`PairHarness`]'s invariant checks, made right after every device action so that a guest
//! whose buffers alias its own rings or each other (it may: it only corrupts itself) cannot
//! make a correct device look wrong (rx_pair fuzz finding 9):
//! - used entries are read right after the action that wrote them (a frame written later
//!   into a buffer over the used ring cannot falsify them), and each held head keeps the
//!   segments its chain had when the device popped it (a frame written over the descriptor
//!   table cannot change what the chain was);
//! - a frame's chains are the next used entries whose lengths add up to the frame (not what
//!   `num_buffers` in guest memory says, which the guest's aliasing may overwrite);
//! - where the frame's bytes went is checked by address: the bytes the kernel wrote (guest
//!   buffers of the posted read) must be exactly where the used chains put them, in order;
//!   the bytes the device copied itself (from the spill area into later chains) are compared
//!   with the frame right after the copy, except those a later byte of the same frame, its
//!   `num_buffers` or the used ring overwrote;
//! - `num_buffers` is read right after the device wrote it, unless it lies in the used ring.

use vm_memory::{Bytes, GuestAddress};

use super::{PairHarness, Violation};
use crate::chain::{self, Access};
use crate::memory::GuestMemory;
use crate::tap::VNET_HDR_LEN;
use crate::virtqueue::Virtqueue;
use crate::vnet_hdr::NUM_BUFFERS_OFFSET;

/// A chain the device popped and has not used: its capacity and segments as walked then.
#[derive(Debug, Clone)]
pub(super) struct Held {
    capacity: u32,
    segs: Vec<(u64, u32)>,
}

/// Ring bookkeeping of one queue, kept from the rings alone.
#[derive(Debug)]
pub(super) struct UsedWatch {
    /// Next used index not read yet.
    pub(super) seen: u16,
    /// Next avail index whose head was not noted yet.
    pub(super) avail_seen: u16,
    /// Each head the device popped and has not used, by head.
    pub(super) held: Vec<Option<Held>>,
}

impl UsedWatch {
    pub(super) fn new(q: &Virtqueue) -> UsedWatch {
        UsedWatch {
            seen: q.positions().next_used,
            avail_seen: q.positions().next_avail,
            held: vec![None; usize::from(q.table().size)],
        }
    }

    /// Notes `head` as held, with its chain as it is now.
    pub(super) fn hold(&mut self, mem: &GuestMemory, q: &Virtqueue, access: Access, head: u16) {
        let mut seg = chain::Segments::default();
        let walked = chain::walk(mem, q.table(), head, access, &mut seg).is_ok();
        let capacity = match access {
            Access::DeviceWrites => seg.len,
            Access::DeviceReads => 0,
        };
        if let Some(h) = self.held.get_mut(usize::from(head)) {
            *h = walked.then(|| Held {
                capacity,
                segs: std::mem::take(&mut seg.gpa),
            });
        }
    }
}

/// An RX used entry of nonzero length, not matched with a frame yet.
#[derive(Debug)]
pub(super) struct UsedChain {
    id: u32,
    len: u32,
    /// The chain's segments as popped, cut to the used length.
    segs: Vec<(u64, u32)>,
}

/// A frame the device delivered, waiting for its used entries.
#[derive(Debug)]
pub(super) struct Delivered {
    /// What the TAP read (vnet header first).
    pub(super) frame: Vec<u8>,
    /// Where the kernel wrote its first bytes: the guest buffers of the posted read, cut to
    /// the frame.
    pub(super) written: Vec<(u64, u32)>,
    /// Bytes of guest buffers the read was posted with (the device copies the rest).
    pub(super) posted: usize,
    /// Whether the device left the frame where the read put it.
    pub(super) placement: Placement,
}

/// Where the device left a delivered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Placement {
    /// In the read's chains (with its spill copied into further chains).
    InPlace,
    /// Copied into older chains (ring order): what the read's chains held, then the spill.
    Moved,
}

/// What reading `frame`'s first `posted` bytes back from the guest buffers `written` gives
/// after the kernel scattered them there in order: where the buffers overlap, the later
/// bytes (rx_pair finding 15). The rest of the frame as it is.
fn as_read_back(frame: &[u8], written: &[(u64, u32)]) -> Vec<u8> {
    let mut out = frame.to_vec();
    let mut starts = Vec::with_capacity(written.len());
    let mut at = 0usize;
    for &(_, len) in written {
        starts.push(at);
        at += len as usize;
    }
    for (k, (&(gk, lk), &pk)) in written.iter().zip(&starts).enumerate() {
        let later = written.iter().zip(&starts).skip(k + 1);
        for (&(gj, lj), &pj) in later {
            let lo = gk.max(gj);
            let hi = (gk + u64::from(lk)).min(gj + u64::from(lj));
            if lo >= hi {
                continue;
            }
            // Each below a buffer's length, a u32.
            let off = |a: u64| u32::try_from(a).unwrap_or(u32::MAX) as usize;
            let (len, dst, src) = (off(hi - lo), pk + off(lo - gk), pj + off(lo - gj));
            if let (Some(src), true) = (frame.get(src..src + len), dst + len <= out.len()) {
                out[dst..dst + len].copy_from_slice(src);
            }
        }
    }
    out
}

/// Where a used chain's bytes are: its segments as popped, cut to the used length.
fn cut(segs: &[(u64, u32)], len: u32) -> impl Iterator<Item = (u64, u32)> + '_ {
    let mut left = len;
    segs.iter().map_while(move |&(gpa, l)| {
        (left > 0).then(|| {
            let take = l.min(left);
            left -= take;
            (gpa, take)
        })
    })
}

/// Guest address of frame byte `pos` under `runs`.
fn gpa_of(runs: &[(u64, u32)], pos: usize) -> Option<u64> {
    let mut at = 0usize;
    for &(gpa, len) in runs {
        let len = len as usize;
        if pos < at + len {
            return Some(gpa + (pos - at) as u64);
        }
        at += len;
    }
    None
}

/// The first position `< limit` where the two placements of a frame differ.
fn first_difference(a: &[(u64, u32)], b: &[(u64, u32)], limit: usize) -> Option<usize> {
    let (mut ia, mut ib) = (a.iter().copied(), b.iter().copied());
    let (mut ra, mut rb) = ((0u64, 0u32), (0u64, 0u32));
    let mut pos = 0usize;
    while pos < limit {
        if ra.1 == 0 {
            ra = ia.next().unwrap_or((0, 0));
        }
        if rb.1 == 0 {
            rb = ib.next().unwrap_or((0, 0));
        }
        if ra.1 == 0 || rb.1 == 0 || ra.0 != rb.0 {
            return Some(pos);
        }
        let step =
            ra.1.min(rb.1)
                .min(u32::try_from(limit - pos).unwrap_or(u32::MAX));
        ra = (ra.0 + u64::from(step), ra.1 - step);
        rb = (rb.0 + u64::from(step), rb.1 - step);
        pos += step as usize;
    }
    None
}

impl PairHarness {
    /// Notes the heads the device popped and reads the used entries it wrote, checking them,
    /// right after a device action (see the module documentation). A violation is kept for
    /// the next [`PairHarness::check`].
    pub(super) fn capture(&mut self) {
        note_pops(
            &self.pair.mem,
            &self.pair.rx,
            Access::DeviceWrites,
            &mut self.rx_watch,
        );
        note_pops(
            &self.pair.mem,
            &self.pair.tx,
            Access::DeviceReads,
            &mut self.tx_watch,
        );
        let tx = used_entries(&self.pair.mem, &self.pair.tx, &mut self.tx_watch.seen);
        for (id, len) in tx {
            if let Err(v) = take_held(&mut self.tx_watch, self.pair.tx.index, id, len) {
                self.pending.get_or_insert(v);
            }
        }
        let rx = used_entries(&self.pair.mem, &self.pair.rx, &mut self.rx_watch.seen);
        for (id, len) in rx {
            match take_held(&mut self.rx_watch, self.pair.rx.index, id, len) {
                Err(v) => {
                    self.pending.get_or_insert(v);
                }
                // Length 0: a chain given back empty (malformed, or at a give-back).
                Ok(held) if len > 0 => {
                    let segs = held
                        .map(|h| cut(&h.segs, len).collect())
                        .unwrap_or_default();
                    self.rx_chains.push(UsedChain { id, len, segs });
                }
                Ok(_) => {}
            }
        }
        self.match_frames();
    }

    /// Matches the used chains read so far with the frames delivered, in order (a frame
    /// and its used entries come from one device action, read at once).
    fn match_frames(&mut self) {
        self.match_chains();
        if !self.delivered.is_empty() {
            self.frame_violation(format!(
                "{} frames delivered without used entries",
                self.delivered.len()
            ));
            self.frames_checked += self.delivered.len() as u64;
            self.delivered.clear();
        }
    }

    fn match_chains(&mut self) {
        while !self.rx_chains.is_empty() {
            let Some(d) = self.delivered.front() else {
                let chains: Vec<(u32, u32)> =
                    self.rx_chains.drain(..).map(|c| (c.id, c.len)).collect();
                self.frame_violation(format!(
                    "used entries {chains:?} but no frame was delivered"
                ));
                return;
            };
            let want = d.frame.len();
            let mut sum = 0usize;
            let mut n = 0;
            for c in &self.rx_chains {
                sum += c.len as usize;
                n += 1;
                if sum >= want || !self.mrg_rxbuf {
                    break;
                }
            }
            if sum < want && self.mrg_rxbuf {
                // A frame's used entries are written in one action, read all at once.
                let chains: Vec<(u32, u32)> =
                    self.rx_chains.drain(..).map(|c| (c.id, c.len)).collect();
                self.frame_violation(format!(
                    "{sum} bytes in the used chains {chains:?}, {want} bytes read from the TAP"
                ));
                self.delivered.pop_front();
                self.frames_checked += 1;
                return;
            }
            let chains: Vec<UsedChain> = self.rx_chains.drain(..n).collect();
            let d = self.delivered.pop_front().expect("a frame");
            if let Err(reason) = self.check_frame(&d, &chains) {
                self.frame_violation(reason);
            }
            self.frames_checked += 1;
        }
    }

    fn frame_violation(&mut self, reason: String) {
        self.pending.get_or_insert(Violation::FrameMismatch {
            frame: self.frames_checked,
            reason,
        });
    }

    /// Checks one delivered frame against the used chains it got (see the module
    /// documentation).
    fn check_frame(&self, d: &Delivered, chains: &[UsedChain]) -> Result<(), String> {
        let heads: Vec<(u32, u32)> = chains.iter().map(|c| (c.id, c.len)).collect();
        let total: usize = chains.iter().map(|c| c.len as usize).sum();
        if total != d.frame.len() {
            return Err(format!(
                "{total} bytes in the used chains {heads:?}, {} bytes read from the TAP",
                d.frame.len()
            ));
        }
        let runs: Vec<(u64, u32)> = chains.iter().flat_map(|c| c.segs.iter().copied()).collect();
        let placed: usize = runs.iter().map(|r| r.1 as usize).sum();
        if placed != total {
            return Err(format!(
                "used chains {heads:?} hold {placed} bytes as popped, used for {total}"
            ));
        }
        // The kernel's bytes: exactly where the used chains say; a moved frame's bytes are
        // all the device's (checked by value below).
        let (by_kernel, expected) = match d.placement {
            Placement::InPlace => (d.posted.min(total), None),
            Placement::Moved => (0, Some(as_read_back(&d.frame, &d.written))),
        };
        let expected = expected.as_deref().unwrap_or(&d.frame);
        if let Some(pos) = first_difference(&d.written, &runs, by_kernel) {
            return Err(format!(
                "byte {pos} was read into {:#x?}, the used chains {heads:?} put it at {:#x?}",
                gpa_of(&d.written, pos),
                gpa_of(&runs, pos)
            ));
        }
        let used_ring = self.used_ring_range();
        let in_used_ring = |g: u64| used_ring.contains(&g);
        // num_buffers, as the device just wrote it.
        let nb_at = [
            gpa_of(&runs, NUM_BUFFERS_OFFSET),
            gpa_of(&runs, NUM_BUFFERS_OFFSET + 1),
        ];
        if let [Some(lo), Some(hi)] = nb_at {
            if !in_used_ring(lo) && !in_used_ring(hi) {
                let want = if self.mrg_rxbuf { chains.len() } else { 1 };
                let nb = [self.byte_at(lo), self.byte_at(hi)];
                let got = usize::from(u16::from_le_bytes(nb));
                if got != want {
                    return Err(format!("num_buffers {got}, {want} chains used ({heads:?})"));
                }
            }
        } else if total >= VNET_HDR_LEN {
            return Err(format!("no num_buffers in the used chains {heads:?}"));
        }
        // The device's own bytes (copied from the spill area): as the TAP read them, but
        // where something written after them landed on the same guest byte.
        let overwritten = |pos: usize, g: u64| {
            in_used_ring(g)
                || nb_at.contains(&Some(g))
                || runs_after(&runs, pos + 1).any(|(a, l)| g >= a && g < a + u64::from(l))
        };
        // Run by run: one read of guest memory per run, not one per byte (a 64 KiB frame's
        // bytes one by one were a sixth of the rx_pair fuzz target's time).
        let mut pos = by_kernel;
        let mut got = Vec::new();
        for (run, len) in runs_after(&runs, by_kernel) {
            got.resize(len as usize, 0);
            if self
                .pair
                .mem
                .mmap()
                .read_slice(&mut got, GuestAddress(run))
                .is_err()
            {
                // Partly outside guest memory: as `byte_at` reads it, byte by byte.
                for (i, b) in got.iter_mut().enumerate() {
                    *b = self.byte_at(run + i as u64);
                }
            }
            for (i, &byte) in got.iter().enumerate() {
                let g = run + i as u64;
                let in_nb = (NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2).contains(&pos);
                let want = expected.get(pos).copied().unwrap_or(0);
                if !in_nb && byte != want && !overwritten(pos, g) {
                    return Err(format!(
                        "byte {pos} (at {g:#x}) is {byte:#x}, should be {want:#x}"
                    ));
                }
                pos += 1;
            }
        }
        Ok(())
    }

    fn byte_at(&self, gpa: u64) -> u8 {
        self.pair
            .mem
            .mmap()
            .read_obj(GuestAddress(gpa))
            .unwrap_or(0)
    }

    /// The RX used ring's bytes (flags, idx, the entries, avail_event).
    fn used_ring_range(&self) -> std::ops::Range<u64> {
        let start = self.pair.rx.used_ring();
        start..start + 6 + 8 * u64::from(self.pair.rx.table().size)
    }
}

/// The frame's runs from position `from` on.
fn runs_after(runs: &[(u64, u32)], from: usize) -> impl Iterator<Item = (u64, u32)> + '_ {
    let mut at = 0usize;
    runs.iter().filter_map(move |&(gpa, len)| {
        let start = at;
        at += len as usize;
        if at <= from {
            None
        } else if start >= from {
            Some((gpa, len))
        } else {
            // Less than `len`, a u32.
            let skip = u32::try_from(from - start).unwrap_or(len);
            Some((gpa + u64::from(skip), len - skip))
        }
    })
}

/// The used entries the device added to `q` since `seen` (which is advanced).
fn used_entries(mem: &GuestMemory, q: &Virtqueue, seen: &mut u16) -> Vec<(u32, u32)> {
    let next_used = q.positions().next_used;
    let size = q.table().size.max(1);
    let used_ring = q.used_ring();
    let mut out = Vec::new();
    while *seen != next_used {
        let slot = u64::from(*seen % size);
        let addr = used_ring + 4 + 8 * slot;
        let id: u32 = mem.mmap().read_obj(GuestAddress(addr)).unwrap_or(u32::MAX);
        let len: u32 = mem
            .mmap()
            .read_obj(GuestAddress(addr + 4))
            .unwrap_or(u32::MAX);
        out.push((u32::from_le(id), u32::from_le(len)));
        *seen = seen.wrapping_add(1);
    }
    out
}

/// Notes the heads popped from `q` since `watch.avail_seen`, with their chains as they are
/// now (what the device walked when it popped them: nothing ran in between).
fn note_pops(mem: &GuestMemory, q: &Virtqueue, access: Access, watch: &mut UsedWatch) {
    let next = q.positions().next_avail;
    if next.wrapping_sub(watch.avail_seen) > q.table().size {
        // Rewound (a give-back) or a jump the queue refused: start over from here.
        watch.avail_seen = next;
        return;
    }
    while watch.avail_seen != next {
        let head = q.avail_head(watch.avail_seen);
        watch.hold(mem, q, access, head);
        watch.avail_seen = watch.avail_seen.wrapping_add(1);
    }
}

fn take_held(
    watch: &mut UsedWatch,
    queue: u16,
    id: u32,
    len: u32,
) -> Result<Option<Held>, Violation> {
    let size = u16::try_from(watch.held.len()).unwrap_or(u16::MAX);
    let slot = usize::try_from(id).unwrap_or(usize::MAX);
    let Some(entry) = watch.held.get_mut(slot) else {
        return Err(Violation::UsedIdOutOfRange { queue, id, size });
    };
    match entry.take() {
        // A chain refused as malformed is used (length 0) without ever being handed out.
        None if len == 0 => Ok(None),
        None => Err(Violation::UsedIdNotHeld { queue, id }),
        Some(h) if len > h.capacity => Err(Violation::UsedLenTooLong {
            queue,
            id,
            len,
            capacity: h.capacity,
        }),
        Some(h) => Ok(Some(h)),
    }
}
