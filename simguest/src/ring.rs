//! Raw split-virtqueue access (virtio 1.2 §2.7): descriptor table, available
//! ring and used ring inside the shared mapping, plus the queue's kick and
//! call eventfds.
//!
//! [`RawQueue`] is the layer the RX/TX drivers are built on, and it is exposed
//! (via `raw()`) to tests that hand-craft malformed chains. The top
//! `GuestConfig::reserved_descs()` descriptors of every table (see
//! [`RawQueue::free_desc_indices`]) are never used by the normal driver, so
//! tests can write chains there without corrupting the driver's bookkeeping.
//! Entries pushed with [`push_avail`](RawQueue::push_avail) share the
//! driver's shadow avail index, so raw and normal submissions interleave
//! consistently.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use nix::sys::eventfd::EventFd;

use crate::layout::{RingAddrs, DESC_SIZE};
use crate::memory::Mapping;
use crate::stats::DriverStats;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// `avail.flags`: the driver does not want interrupts.
pub const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used.flags`: the device does not want kicks.
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;

/// One descriptor as stored in the table (host-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VIRTQ_DESC_F_*`.
    pub flags: u16,
    /// Next descriptor index when `flags & NEXT`.
    pub next: u16,
}

/// Raw access to one split virtqueue.
#[derive(Debug)]
pub struct RawQueue {
    /// Keeps the mapping (and thus the pointers below) alive.
    map: Arc<Mapping>,
    index: u16,
    size: u16,
    desc: *mut u8,
    avail: *mut u8,
    used: *mut u8,
    addrs: RingAddrs,
    kick: Arc<EventFd>,
    call: Arc<EventFd>,
    /// Shadow of the avail index: where the next entry goes.
    next_avail: u16,
    /// Avail index at the last kick decision (the "old" of vring_need_event).
    pub(crate) last_kick_avail: u16,
    reserved: u16,
    pub(crate) event_idx: bool,
    pub(crate) stats: DriverStats,
}

// SAFETY: the raw pointers point into the shared mapping kept alive by the
// `Arc<Mapping>` field; a `RawQueue` is the single driver-side owner of its
// virtqueue, and all accesses to shared memory are atomic or volatile, so
// moving it to another thread is sound.
unsafe impl Send for RawQueue {}

impl RawQueue {
    /// Binds to the rings at `addrs` and writes the initial driver state.
    pub(crate) fn new(
        map: Arc<Mapping>,
        index: u16,
        size: u16,
        addrs: RingAddrs,
        (kick, call): (Arc<EventFd>, Arc<EventFd>),
        reserved: u16,
        event_idx: bool,
    ) -> Result<Self, crate::Error> {
        let qsz = u64::from(size);
        let desc = map.host_ptr_checked(addrs.desc, DESC_SIZE * qsz)?;
        let avail = map.host_ptr_checked(addrs.avail, 6 + 2 * qsz)?;
        let used = map.host_ptr_checked(addrs.used, 6 + 8 * qsz)?;
        let q = Self {
            map,
            index,
            size,
            desc,
            avail,
            used,
            addrs,
            kick,
            call,
            next_avail: 0,
            last_kick_avail: 0,
            reserved,
            event_idx,
            stats: DriverStats::default(),
        };
        // Outside `wait` the driver polls, like NAPI: without EVENT_IDX ask
        // the device not to interrupt (with EVENT_IDX, used_event = 0 lags).
        if !event_idx {
            q.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT);
        }
        Ok(q)
    }

    /// Atomic view of a 16-bit ring field.
    fn a16(&self, p: *mut u8) -> &AtomicU16 {
        debug_assert!(p.cast::<u16>().is_aligned());
        // SAFETY: every caller passes a pointer to a 2-byte-aligned u16 field
        // inside this queue's ring memory, which the `Arc<Mapping>` keeps
        // mapped for at least the lifetime of `&self`. `AtomicU16` has the
        // layout of `u16`, and the device accesses the same bytes only
        // atomically or from another process, so no non-atomic Rust access
        // races with it.
        unsafe { &*p.cast::<AtomicU16>() }
    }

    /// Pointer `off` bytes into a ring part (offsets computed from `size`
    /// and always within the part, as checked when the queue was created).
    fn at(base: *mut u8, off: usize) -> *mut u8 {
        base.wrapping_add(off)
    }

    fn avail_ring_entry(&self, pos: u16) -> *mut u8 {
        Self::at(self.avail, 4 + 2 * usize::from(pos % self.size))
    }

    fn used_elem(&self, pos: u16) -> *mut u8 {
        Self::at(self.used, 4 + 8 * usize::from(pos % self.size))
    }

    /// Virtqueue index (rx = 2*pair, tx = 2*pair+1).
    #[must_use]
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Queue size.
    #[must_use]
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Whether EVENT_IDX was negotiated for this queue.
    #[must_use]
    pub fn event_idx_enabled(&self) -> bool {
        self.event_idx
    }

    /// Guest-physical (desc table, avail ring, used ring) addresses.
    #[must_use]
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        (self.addrs.desc, self.addrs.avail, self.addrs.used)
    }

    /// A [`GuestMem`](crate::GuestMem) handle to the same memory.
    #[must_use]
    pub fn memory(&self) -> crate::GuestMem {
        crate::GuestMem {
            map: Arc::clone(&self.map),
        }
    }

    /// Descriptor indices the normal driver never uses (the top
    /// `GuestConfig::reserved_descs()` of the table). Used entries whose id is one of
    /// them are handed to the driver's `take_foreign_used`.
    #[must_use]
    pub fn free_desc_indices(&self) -> Vec<u16> {
        (self.size - self.reserved..self.size).collect()
    }

    /// Whether `id` is one of the reserved raw descriptors.
    pub(crate) fn is_reserved(&self, id: u32) -> bool {
        id < u32::from(self.size) && id >= u32::from(self.size - self.reserved)
    }

    /// Writes descriptor `idx`. Panics if `idx >= size`.
    pub fn write_desc(&mut self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(idx < self.size, "descriptor index {idx} out of range");
        let p = Self::at(self.desc, 16 * usize::from(idx));
        // SAFETY: `idx < size`, so the 16 bytes at `p` are inside the
        // descriptor table (8-aligned: the table is 4 KiB aligned). The
        // device only reads descriptors after the avail idx release store
        // that follows; volatile keeps the compiler from eliding the writes
        // to memory another party reads.
        unsafe {
            p.cast::<u64>().write_volatile(addr.to_le());
            p.add(8).cast::<u32>().write_volatile(len.to_le());
            p.add(12).cast::<u16>().write_volatile(flags.to_le());
            p.add(14).cast::<u16>().write_volatile(next.to_le());
        }
    }

    /// Reads descriptor `idx`. Panics if `idx >= size`.
    #[must_use]
    pub fn read_desc(&self, idx: u16) -> RawDesc {
        assert!(idx < self.size, "descriptor index {idx} out of range");
        let p = Self::at(self.desc, 16 * usize::from(idx));
        // SAFETY: as in `write_desc`: in bounds and aligned.
        unsafe {
            RawDesc {
                addr: u64::from_le(p.cast::<u64>().read_volatile()),
                len: u32::from_le(p.add(8).cast::<u32>().read_volatile()),
                flags: u16::from_le(p.add(12).cast::<u16>().read_volatile()),
                next: u16::from_le(p.add(14).cast::<u16>().read_volatile()),
            }
        }
    }

    /// Puts `head` into the avail ring at the shadow index and advances the
    /// shadow, without publishing (see [`publish`](Self::publish)).
    pub fn push_avail(&mut self, head: u16) {
        let p = self.avail_ring_entry(self.next_avail);
        // Relaxed: ordered before the device's view by the Release store of
        // avail.idx in `publish` (virtio 1.2 §2.7.13.2).
        self.a16(p).store(head.to_le(), Ordering::Relaxed);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Stores the shadow index into `avail.idx` and returns it.
    pub fn publish(&mut self) -> u16 {
        // virtio 1.2 §2.7.13.2/§2.7.13.3: the descriptor table and ring
        // entries must be visible before the device sees the new idx, hence
        // Release (pairs with the device's Acquire load of avail.idx).
        self.a16(Self::at(self.avail, 2))
            .store(self.next_avail.to_le(), Ordering::Release);
        self.next_avail
    }

    /// Raw store of `avail.idx` (Release), leaving the shadow untouched.
    pub fn set_avail_idx(&mut self, v: u16) {
        self.a16(Self::at(self.avail, 2))
            .store(v.to_le(), Ordering::Release);
    }

    /// The published `avail.idx`.
    #[must_use]
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.a16(Self::at(self.avail, 2)).load(Ordering::Relaxed))
    }

    /// The shadow avail index (where the next `push_avail` goes).
    #[must_use]
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Overrides the shadow avail index (tests only; breaks the normal
    /// driver's accounting if misused).
    pub fn set_next_avail(&mut self, v: u16) {
        self.next_avail = v;
    }

    /// `used.idx`, loaded with Acquire so that the used elements and buffer
    /// contents written before it are visible (virtio 1.2 §2.7.8).
    #[must_use]
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.a16(Self::at(self.used, 2)).load(Ordering::Acquire))
    }

    /// Used element at ring position `pos` (taken modulo size): `(id, len)`.
    /// Call [`used_idx`](Self::used_idx) first for ordering.
    #[must_use]
    pub fn read_used(&self, pos: u16) -> (u32, u32) {
        let p = self.used_elem(pos);
        // SAFETY: `pos % size` keeps the 8-byte element inside the used ring
        // (4-aligned). The device wrote it before its Release store of
        // used.idx, which the caller's Acquire load synchronised with.
        unsafe {
            (
                u32::from_le(p.cast::<u32>().read_volatile()),
                u32::from_le(p.add(4).cast::<u32>().read_volatile()),
            )
        }
    }

    /// `avail.flags`.
    #[must_use]
    pub fn avail_flags(&self) -> u16 {
        u16::from_le(self.a16(self.avail).load(Ordering::Relaxed))
    }

    /// Sets `avail.flags` (e.g. [`VIRTQ_AVAIL_F_NO_INTERRUPT`]).
    pub fn set_avail_flags(&self, flags: u16) {
        self.a16(self.avail).store(flags.to_le(), Ordering::Relaxed);
    }

    /// `used.flags` as written by the device.
    #[must_use]
    pub fn used_flags(&self) -> u16 {
        u16::from_le(self.a16(self.used).load(Ordering::Relaxed))
    }

    /// `used_event` (the trailing field of the avail ring).
    #[must_use]
    pub fn used_event(&self) -> u16 {
        let p = Self::at(self.avail, 4 + 2 * usize::from(self.size));
        u16::from_le(self.a16(p).load(Ordering::Relaxed))
    }

    /// Sets `used_event`.
    pub fn set_used_event(&self, v: u16) {
        let p = Self::at(self.avail, 4 + 2 * usize::from(self.size));
        self.a16(p).store(v.to_le(), Ordering::Relaxed);
    }

    /// `avail_event` (the trailing field of the used ring) as written by the
    /// device.
    #[must_use]
    pub fn avail_event(&self) -> u16 {
        let p = Self::at(self.used, 4 + 8 * usize::from(self.size));
        u16::from_le(self.a16(p).load(Ordering::Relaxed))
    }

    /// Writes 1 to the kick eventfd (unconditionally) and counts it.
    pub fn kick(&mut self) {
        // EAGAIN only if the counter would overflow, i.e. a kick is pending.
        let _ = self.kick.write(1);
        self.stats.kicks += 1;
    }

    /// Reads (and resets) the call eventfd counter without blocking; returns
    /// 0 if no interrupt is pending. Counted in `stats.interrupts`.
    pub fn read_call(&mut self) -> u64 {
        let n = self.call.read().unwrap_or(0);
        self.stats.interrupts += n;
        n
    }

    /// The kick eventfd (driver → device).
    #[must_use]
    pub fn kick_fd(&self) -> RawFd {
        self.kick.as_raw_fd()
    }

    /// The call eventfd (device → driver).
    #[must_use]
    pub fn call_fd(&self) -> RawFd {
        self.call.as_raw_fd()
    }

    pub(crate) fn call_eventfd(&self) -> &EventFd {
        &self.call
    }
}
