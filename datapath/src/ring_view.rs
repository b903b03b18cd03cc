//! Checked host views of one split virtqueue's three rings (virtio 1.2 §2.7): the descriptor
//! table, the available ring and the used ring, each translated once when the queue starts
//! into one contiguous, aligned piece of the guest mapping. Ring accesses then cost a load or
//! a store at a checked offset, with no region lookup (what `vm-memory` does per access).
//!
//! This is the one place in the datapath that dereferences guest memory by hand. The contract
//! every access relies on is established by [`RingView::new`] and kept by the type:
//!
//! - each part lies entirely inside one mapped region (a ring crossing a region boundary, or
//!   reaching outside guest memory, is refused: DPDK's vhost library refuses rings that are
//!   not contiguous in its address space the same way), and its host address has the
//!   alignment virtio requires of the guest address (16 for descriptors, 2 for the avail
//!   ring, 4 for the used ring), so every field is naturally aligned;
//! - the view holds a [`GuestMemory`] handle, so the mapping outlives it (a file shrunk under
//!   the mapping is caught by the SIGBUS guard, which maps zeroes over it: accesses stay
//!   valid and read zeroes);
//! - every offset is computed from an index reduced modulo the ring size (a power of two) or
//!   checked against it, so no guest value can move an access outside its part;
//! - all accesses are atomic loads and stores of the field's width (the guest writes the same
//!   memory concurrently; orderings are explicit and explained where they matter).
//!
//! The ring logic above (`virtqueue.rs`, `chain.rs`) has no `unsafe`.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, AtomicU32, AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;

use crate::memory::GuestMemory;

/// Bytes of one descriptor.
const DESC_SIZE: usize = 16;
/// Avail ring: flags (2), idx (2), then one u16 per slot, then `used_event` (2).
const AVAIL_HEADER: usize = 4;
/// Used ring: flags (2), idx (2), then one (u32 id, u32 len) per slot, then `avail_event`.
const USED_HEADER: usize = 4;
const USED_ELEM: usize = 8;

/// Why a ring could not be viewed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ViewError {
    /// The queue size is not a power of two in 1..=32768.
    #[error("queue size {0} is not a power of two of at most 32768")]
    Size(u16),
    /// A part's guest address is not aligned as virtio 1.2 §2.7 requires.
    #[error("{part} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which part.
        part: &'static str,
        /// Its guest address.
        addr: u64,
        /// The alignment it needs.
        align: usize,
    },
    /// A part is not inside guest memory.
    #[error("{part} at {addr:#x}+{len:#x} is not inside guest memory")]
    Outside {
        /// Which part.
        part: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// A part spans two memory regions (not contiguous in this process).
    #[error("{part} at {addr:#x}+{len:#x} crosses a guest memory region boundary")]
    CrossesRegions {
        /// Which part.
        part: &'static str,
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: usize,
    },
    /// A part's host address does not have the alignment its guest address has (a region
    /// placed at an unaligned guest address).
    #[error("{part} at {addr:#x} is not {align}-byte aligned in this process's mapping")]
    HostMisaligned {
        /// Which part.
        part: &'static str,
        /// Its guest address.
        addr: u64,
        /// The alignment it needs.
        align: usize,
    },
}

/// One translated part: a host range inside one mapped region.
#[derive(Clone, Copy, Debug)]
struct Part {
    host: NonNull<u8>,
    len: usize,
    /// The alignment `host` has (checked in `new`).
    align: usize,
}

impl Part {
    /// Translates `[addr, addr + len)` into one host range aligned to `align`.
    fn new(
        mem: &GuestMemory,
        part: &'static str,
        addr: u64,
        len: usize,
        align: usize,
    ) -> Result<Part, ViewError> {
        // `align` is a power of two; the guest address must have it (virtio 1.2 §2.7).
        if addr & (align as u64).wrapping_sub(1) != 0 {
            return Err(ViewError::Misaligned { part, addr, align });
        }
        let outside = ViewError::Outside { part, addr, len };
        let len32 = u32::try_from(len).map_err(|_| outside.clone())?;
        let mut pieces = 0usize;
        let mut first = None;
        mem.translate(addr, len32, |ptr, l| {
            pieces = pieces.saturating_add(1);
            if first.is_none() {
                first = Some((ptr, l));
            }
        })
        .map_err(|_| outside)?;
        let (ptr, l) = first.ok_or(ViewError::Outside { part, addr, len })?;
        if pieces != 1 || l != len {
            return Err(ViewError::CrossesRegions { part, addr, len });
        }
        let host = NonNull::new(ptr).ok_or(ViewError::Outside { part, addr, len })?;
        if host.as_ptr().align_offset(align) != 0 {
            return Err(ViewError::HostMisaligned { part, addr, align });
        }
        Ok(Part { host, len, align })
    }

    /// The `T`-sized, `T`-aligned field at `offset`, if it lies inside the part.
    fn field<T>(&self, offset: usize) -> Option<NonNull<T>> {
        let size = std::mem::size_of::<T>();
        let align = std::mem::align_of::<T>();
        let end = offset.checked_add(size)?;
        if end > self.len || align > self.align || offset & align.wrapping_sub(1) != 0 {
            return None;
        }
        // SAFETY: `offset + size <= len`: the result stays inside the part, which is one
        // mapped range (`Part::new`).
        let p = unsafe { self.host.as_ptr().add(offset) };
        // Aligned for `T`: the base has `self.align >= align_of::<T>()` and the offset is a
        // multiple of `align_of::<T>()` (both checked above).
        NonNull::new(p.cast::<T>())
    }

    fn load16(&self, offset: usize, order: Ordering) -> Option<u16> {
        let p = self.field::<u16>(offset)?;
        // SAFETY: `p` is an aligned u16 inside the mapping (`field`), which lives as long as
        // the view holds its `GuestMemory`. The driver writes the same field concurrently
        // with plain stores: the virtio shared-memory model, which `vm-memory`'s
        // `load`/`store` rely on the same way.
        let a = unsafe { AtomicU16::from_ptr(p.as_ptr()) };
        Some(u16::from_le(a.load(order)))
    }

    fn store16(&self, offset: usize, value: u16, order: Ordering) -> Option<()> {
        let p = self.field::<u16>(offset)?;
        // SAFETY: as in `load16`.
        let a = unsafe { AtomicU16::from_ptr(p.as_ptr()) };
        a.store(value.to_le(), order);
        Some(())
    }

    fn store32(&self, offset: usize, value: u32, order: Ordering) -> Option<()> {
        let p = self.field::<u32>(offset)?;
        // SAFETY: as in `load16`, for an aligned u32.
        let a = unsafe { AtomicU32::from_ptr(p.as_ptr()) };
        a.store(value.to_le(), order);
        Some(())
    }

    fn load64(&self, offset: usize) -> Option<u64> {
        let p = self.field::<u64>(offset)?;
        // SAFETY: as in `load16`, for an aligned u64 (the descriptor table is 16-aligned).
        let a = unsafe { AtomicU64::from_ptr(p.as_ptr()) };
        Some(u64::from_le(a.load(Ordering::Relaxed)))
    }
}

/// The host view of one split virtqueue's rings (see the module documentation).
#[derive(Debug)]
pub(crate) struct RingView {
    size: u16,
    desc: Part,
    avail: Part,
    used: Part,
    used_gpa: u64,
    /// Bytes of the used ring written since the last [`take_used_dirty`](Self::take_used_dirty)
    /// (start, end offsets), for the dirty log.
    used_dirty: Option<(usize, usize)>,
    /// Keeps the mapping the parts point into alive.
    mem: GuestMemory,
}

// SAFETY: the parts point into the guest mapping, which is shared by every thread of the
// process and kept alive by `mem`; all accesses are atomic, so moving the view to a worker
// thread is sound.
unsafe impl Send for RingView {}

impl RingView {
    /// Translates a queue of `size` descriptors whose rings are at these guest addresses.
    pub fn new(
        mem: &GuestMemory,
        size: u16,
        desc_table: u64,
        avail_ring: u64,
        used_ring: u64,
    ) -> Result<RingView, ViewError> {
        if size == 0 || !size.is_power_of_two() || size > 32768 {
            return Err(ViewError::Size(size));
        }
        let n = usize::from(size);
        // Sizes of the parts, event fields included (virtio 1.2 §2.7.6, §2.7.8). At most
        // 32768 entries: no overflow.
        let desc_len = n.saturating_mul(DESC_SIZE);
        let avail_len = n.saturating_mul(2).saturating_add(AVAIL_HEADER + 2);
        let used_len = n.saturating_mul(USED_ELEM).saturating_add(USED_HEADER + 2);
        Ok(RingView {
            size,
            desc: Part::new(mem, "descriptor table", desc_table, desc_len, 16)?,
            avail: Part::new(mem, "avail ring", avail_ring, avail_len, 2)?,
            used: Part::new(mem, "used ring", used_ring, used_len, 4)?,
            used_gpa: used_ring,
            used_dirty: None,
            mem: mem.clone(),
        })
    }

    /// Number of descriptors.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// The ring slot of a free-running index.
    fn slot(&self, pos: u16) -> usize {
        // `size` is a power of two (checked in `new`).
        usize::from(pos & self.size.wrapping_sub(1))
    }

    /// The descriptor at `index` of the table, None past the table.
    pub fn descriptor(&self, index: u16) -> Option<Descriptor> {
        if index >= self.size {
            return None;
        }
        let off = usize::from(index).checked_mul(DESC_SIZE)?;
        // addr (u64), then len (u32), flags (u16), next (u16): read as two u64s.
        let addr = self.desc.load64(off)?;
        let rest = self.desc.load64(off.checked_add(8)?)?;
        let len = (rest & 0xffff_ffff) as u32;
        let flags = ((rest >> 32) & 0xffff) as u16;
        let next = (rest >> 48) as u16;
        Some(Descriptor::new(addr, len, flags, next))
    }

    /// The driver's avail index. Acquire: the entries it covers were written before it
    /// (virtio 1.2 §2.7.13.3: the driver publishes the index after the entries), so they are
    /// read after it.
    pub fn avail_idx(&self, order: Ordering) -> u16 {
        self.avail.load16(2, order).unwrap_or(0)
    }

    /// The avail ring's flags (`VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn avail_flags(&self) -> u16 {
        self.avail.load16(0, Ordering::Relaxed).unwrap_or(0)
    }

    /// The head the driver put at avail position `pos` (a free-running index).
    pub fn avail_entry(&self, pos: u16) -> u16 {
        let off = AVAIL_HEADER.saturating_add(self.slot(pos).saturating_mul(2));
        self.avail.load16(off, Ordering::Relaxed).unwrap_or(0)
    }

    /// EVENT_IDX's `used_event` (after the avail entries).
    pub fn used_event(&self) -> u16 {
        let off = AVAIL_HEADER.saturating_add(usize::from(self.size).saturating_mul(2));
        self.avail.load16(off, Ordering::Relaxed).unwrap_or(0)
    }

    /// The used index as the guest sees it.
    #[cfg(test)]
    pub fn used_idx(&self) -> u16 {
        self.used.load16(2, Ordering::Acquire).unwrap_or(0)
    }

    fn note_dirty(&mut self, start: usize, len: usize) {
        let end = start.saturating_add(len);
        self.used_dirty = Some(match self.used_dirty {
            Some((s, e)) => (s.min(start), e.max(end)),
            None => (start, end),
        });
    }

    /// Writes the used flags (`VRING_USED_F_NO_NOTIFY`).
    pub fn set_used_flags(&mut self, flags: u16) {
        let _ = self.used.store16(0, flags, Ordering::Relaxed);
        self.note_dirty(0, 2);
    }

    /// Writes EVENT_IDX's `avail_event` (after the used entries).
    pub fn set_avail_event(&mut self, value: u16) {
        let off = USED_HEADER.saturating_add(usize::from(self.size).saturating_mul(USED_ELEM));
        let _ = self.used.store16(off, value, Ordering::Relaxed);
        self.note_dirty(off, 2);
    }

    /// Writes the used element at used position `pos` (a free-running index). The guest sees
    /// it once the used index passing it is published ([`publish_used`](Self::publish_used)).
    pub fn write_used(&mut self, pos: u16, id: u16, len: u32) {
        let off = USED_HEADER.saturating_add(self.slot(pos).saturating_mul(USED_ELEM));
        let _ = self.used.store32(off, u32::from(id), Ordering::Relaxed);
        let _ = self
            .used
            .store32(off.saturating_add(4), len, Ordering::Relaxed);
        self.note_dirty(off, USED_ELEM);
    }

    /// Publishes the used index. Release: every used element written before is visible to
    /// the driver once it sees the index (virtio 1.2 §2.7.14).
    pub fn publish_used(&mut self, idx: u16) {
        let _ = self.used.store16(2, idx, Ordering::Release);
        self.note_dirty(2, 2);
    }

    /// Marks the used-ring bytes written since the last call dirty in the guest's log (once
    /// per batch, not per entry).
    pub fn flush_dirty(&mut self) {
        if let Some((start, end)) = self.used_dirty.take() {
            let gpa = self.used_gpa.saturating_add(start as u64);
            self.mem.mark_dirty(gpa, end.saturating_sub(start));
        }
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::arithmetic_side_effects)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegionSpec;
    use std::fs::File;
    use std::os::fd::OwnedFd;
    use vm_memory::{Bytes, GuestAddress};

    fn memfd(size: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"view", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(size).unwrap();
        file.into()
    }

    fn region(guest_addr: u64, size: u64) -> MemoryRegionSpec {
        MemoryRegionSpec {
            guest_addr,
            size,
            fd: memfd(size),
            file_offset: 0,
        }
    }

    fn one_region() -> GuestMemory {
        GuestMemory::from_regions(vec![region(0, 0x10000)]).unwrap()
    }

    #[test]
    fn reads_and_writes_the_fields_where_virtio_puts_them() {
        let mem = one_region();
        let m = mem.mmap();
        let mut v = RingView::new(&mem, 8, 0x1000, 0x2000, 0x3000).unwrap();
        m.write_obj(
            Descriptor::new(0x4000, 1500, 3, 5),
            GuestAddress(0x1000 + 2 * 16),
        )
        .unwrap();
        let d = v.descriptor(2).unwrap();
        assert_eq!(
            (d.addr().0, d.len(), d.flags(), d.next()),
            (0x4000, 1500, 3, 5)
        );
        assert!(v.descriptor(8).is_none(), "past the table");
        m.write_obj(1u16.to_le(), GuestAddress(0x2000)).unwrap();
        m.write_obj(9u16.to_le(), GuestAddress(0x2002)).unwrap();
        m.write_obj(6u16.to_le(), GuestAddress(0x2004 + 2 * 3))
            .unwrap();
        m.write_obj(7u16.to_le(), GuestAddress(0x2004 + 2 * 8))
            .unwrap();
        assert_eq!(v.avail_flags(), 1);
        assert_eq!(v.avail_idx(Ordering::Acquire), 9);
        assert_eq!(v.avail_entry(3), 6);
        assert_eq!(v.avail_entry(8 + 3), 6, "positions wrap at the ring size");
        assert_eq!(v.used_event(), 7);
        v.write_used(8 + 1, 4, 99);
        v.publish_used(10);
        v.set_avail_event(0x1234);
        v.set_used_flags(1);
        let id: u32 = m.read_obj(GuestAddress(0x3004 + 8)).unwrap();
        let len: u32 = m.read_obj(GuestAddress(0x3004 + 8 + 4)).unwrap();
        assert_eq!((id, len), (4, 99));
        assert_eq!(v.used_idx(), 10);
        let ev: u16 = m.read_obj(GuestAddress(0x3004 + 8 * 8)).unwrap();
        let flags: u16 = m.read_obj(GuestAddress(0x3000)).unwrap();
        assert_eq!((ev, flags), (0x1234, 1));
    }

    #[test]
    fn used_ring_writes_are_logged_once_per_flush() {
        let mem = one_region();
        let _ = mem.take_dirty_log();
        let mut v = RingView::new(&mem, 256, 0x1000, 0x2000, 0x3000).unwrap();
        v.write_used(0, 1, 1);
        v.write_used(255, 1, 1);
        v.publish_used(2);
        assert!(mem.take_dirty_log().is_empty(), "nothing before the flush");
        v.flush_dirty();
        // The used ring of 256 entries ends at 0x3000 + 4 + 256 * 8 + 2: one page.
        assert_eq!(mem.take_dirty_log(), vec![0x3000]);
        v.flush_dirty();
        assert!(
            mem.take_dirty_log().is_empty(),
            "a flush with nothing written logs nothing"
        );
    }

    #[test]
    fn fields_past_a_part_or_wider_than_its_alignment_are_refused() {
        let mem = one_region();
        let v = RingView::new(&mem, 8, 0x1000, 0x2000, 0x3000).unwrap();
        assert!(
            v.avail.load64(0).is_none(),
            "the avail ring is only 2-aligned"
        );
        assert!(
            v.used.load16(v.used.len, Ordering::Relaxed).is_none(),
            "past the part"
        );
        assert!(
            v.used.load16(v.used.len - 1, Ordering::Relaxed).is_none(),
            "straddles its end"
        );
        assert!(
            v.used.store32(2, 0, Ordering::Relaxed).is_none(),
            "misaligned offset"
        );
        assert!(v.desc.load64(8 * 16 - 8).is_some(), "the table's last word");
        assert!(v.desc.load64(8 * 16).is_none(), "past the table");
    }

    #[test]
    fn refuses_rings_outside_memory() {
        let mem = one_region();
        let e = RingView::new(&mem, 256, 0xf800, 0x2000, 0x3000).unwrap_err();
        assert!(matches!(e, ViewError::Outside { .. }), "{e}");
        let e = RingView::new(&mem, 8, 0x1000, 0x2000, u64::MAX - 3).unwrap_err();
        assert!(matches!(e, ViewError::Outside { .. }), "{e}");
        let e = RingView::new(&mem, 8, 0x1000, 0x20_0000, 0x3000).unwrap_err();
        assert!(matches!(e, ViewError::Outside { .. }), "{e}");
    }

    #[test]
    fn refuses_a_ring_crossing_a_region_boundary() {
        // Two regions contiguous in guest space, separate mappings here: a used ring that
        // starts in the first and ends in the second cannot be one host range.
        let mem =
            GuestMemory::from_regions(vec![region(0, 0x4000), region(0x4000, 0x4000)]).unwrap();
        let e = RingView::new(&mem, 256, 0x1000, 0x2000, 0x3c00).unwrap_err();
        assert!(matches!(e, ViewError::CrossesRegions { .. }), "{e}");
        // The same ring inside the second region is fine.
        RingView::new(&mem, 256, 0x1000, 0x2000, 0x4000).unwrap();
    }

    #[test]
    fn refuses_bad_sizes_and_alignments() {
        let mem = one_region();
        for size in [0, 3, 100, 65535] {
            assert_eq!(
                RingView::new(&mem, size, 0x1000, 0x2000, 0x3000).unwrap_err(),
                ViewError::Size(size)
            );
        }
        for (d, a, u) in [
            (0x1008, 0x2000, 0x3000),
            (0x1000, 0x2001, 0x3000),
            (0x1000, 0x2000, 0x3002),
        ] {
            let e = RingView::new(&mem, 8, d, a, u).unwrap_err();
            assert!(matches!(e, ViewError::Misaligned { .. }), "{e}");
        }
    }

    #[test]
    fn refuses_rings_whose_host_address_is_misaligned() {
        // A region placed at an odd guest address: a 16-aligned guest address in it is not
        // 16-aligned in the mapping (which starts on a page).
        let mem = GuestMemory::from_regions(vec![region(0x808, 0x8000)]).unwrap();
        let e = RingView::new(&mem, 8, 0x1010, 0x2000, 0x3000).unwrap_err();
        assert!(matches!(e, ViewError::HostMisaligned { .. }), "{e}");
    }

    #[test]
    fn guest_rewrites_never_move_an_access_outside_the_parts() {
        // Whatever the guest writes into the indices, positions are reduced modulo the size:
        // every access stays in its part (the view is bounded by construction; what the
        // indices mean is checked by the virtqueue).
        let mem = one_region();
        let m = mem.mmap();
        let mut v = RingView::new(&mem, 4, 0x1000, 0x2000, 0x3000).unwrap();
        m.write_obj(u16::MAX, GuestAddress(0x2002)).unwrap();
        assert_eq!(v.avail_idx(Ordering::Acquire), u16::MAX);
        for pos in [0u16, 3, 4, 0x7fff, u16::MAX] {
            let _ = v.avail_entry(pos);
            v.write_used(pos, 0, 0);
        }
        // Nothing landed past the used ring's 4 entries (+ avail_event).
        let past: u64 = m.read_obj(GuestAddress(0x3000 + 4 + 4 * 8 + 2)).unwrap();
        assert_eq!(past, 0);
    }
}
