//! Guest memory: one memfd, mapped once into this process, exposed to the
//! device as two guest-physical regions at different file offsets.
//!
//! [`Mapping`] owns the memfd and the mapping and is shared through an `Arc`
//! by [`SimGuest`](crate::SimGuest), the drivers and [`GuestMem`] handles, so
//! the memory stays mapped while any of them lives.

use std::num::NonZeroUsize;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, PoisonError};

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};

use crate::error::Error;
use crate::layout::{Layout, BUFFER_REGION_GPA, RING_REGION_GPA, SCRATCH_SIZE};

/// One guest memory region as a vhost-user front-end would describe it.
///
/// `fd` is borrowed: it stays valid while the [`SimGuest`](crate::SimGuest)
/// (or any driver or [`GuestMem`] of it) lives. Map it yourself (e.g. with a
/// dup) to get device-side access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRegionInfo {
    /// Guest-physical base address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The memfd backing the region (borrowed).
    pub fd: RawFd,
    /// Offset of the region's first byte within `fd`.
    pub file_offset: u64,
}

/// A guest-physical region inside the memfd.
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    size: u64,
    file_offset: u64,
}

/// The memfd and its single shared mapping.
#[derive(Debug)]
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    /// Sorted by `gpa`.
    regions: [Region; 2],
    scratch_start: u64,
    scratch_end: u64,
    scratch_next: Mutex<u64>,
}

// SAFETY: `Mapping` is an owning handle to a MAP_SHARED mapping and an fd; the
// raw base pointer is never handed out as a Rust reference with a lifetime
// longer than a `Mapping` borrow, and every access to the mapped bytes goes
// through atomics, volatile accesses or byte copies whose callers document
// their own synchronisation. Nothing in it is tied to a thread.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`; shared access only reads immutable fields or goes
// through the `Mutex`-protected scratch cursor.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Creates the memfd, sizes it and maps it read/write, shared.
    pub fn new(layout: &Layout) -> Result<Self, Error> {
        let fd = memfd_create(c"tapir-simguest", MFdFlags::MFD_CLOEXEC)?;
        let file_len = i64::try_from(layout.file_size)
            .map_err(|_| Error::InvalidConfig("guest memory too large".into()))?;
        nix::unistd::ftruncate(&fd, file_len)?;
        let len = usize::try_from(layout.file_size)
            .map_err(|_| Error::InvalidConfig("guest memory too large".into()))?;
        let nz = NonZeroUsize::new(len)
            .ok_or_else(|| Error::InvalidConfig("empty guest memory".into()))?;
        // SAFETY: a fresh mapping chosen by the kernel (no fixed address), of
        // a file we just sized to `len`; it aliases no Rust object.
        let base = unsafe {
            mmap(
                None,
                nz,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                &fd,
                0,
            )?
        };
        let regions = [
            Region {
                gpa: RING_REGION_GPA,
                size: layout.ring_region_size,
                file_offset: layout.ring_file_offset,
            },
            Region {
                gpa: BUFFER_REGION_GPA,
                size: layout.buffer_region_size,
                file_offset: layout.buffer_file_offset,
            },
        ];
        Ok(Self {
            base: base.cast(),
            len,
            fd,
            regions,
            scratch_start: layout.scratch_gpa,
            scratch_end: layout.scratch_gpa + SCRATCH_SIZE,
            scratch_next: Mutex::new(layout.scratch_gpa),
        })
    }

    /// Host pointer for `len` bytes at `gpa`, if the whole range lies in one
    /// region.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        let r = self
            .regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa - r.gpa < r.size)?;
        let off = gpa - r.gpa;
        if len > r.size - off {
            return None;
        }
        let file_off = usize::try_from(r.file_offset + off).ok()?;
        debug_assert!(file_off <= self.len);
        // SAFETY: `file_off + len` lies within the region, which lies within
        // the `self.len`-byte mapping, so the offset stays in bounds.
        Some(unsafe { self.base.as_ptr().add(file_off) })
    }

    /// Like [`host_ptr`](Self::host_ptr) but with an error for bad ranges.
    pub fn host_ptr_checked(&self, gpa: u64, len: u64) -> Result<*mut u8, Error> {
        self.host_ptr(gpa, len)
            .ok_or(Error::BadAddress { gpa, len })
    }

    fn region_infos(&self) -> Vec<MemoryRegionInfo> {
        self.regions
            .iter()
            .map(|r| MemoryRegionInfo {
                guest_addr: r.gpa,
                size: r.size,
                fd: self.fd.as_raw_fd(),
                file_offset: r.file_offset,
            })
            .collect()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` describe the mapping created in `new`; the last
        // owner is going away, so nothing references the memory any more.
        // A failure cannot be handled meaningfully here.
        let _ = unsafe { munmap(self.base.cast(), self.len) };
    }
}

/// A cloneable, `Send` handle for raw access to guest memory (tests,
/// hand-built descriptor chains).
#[derive(Clone, Debug)]
pub struct GuestMem {
    pub(crate) map: Arc<Mapping>,
}

impl GuestMem {
    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let p = self.map.host_ptr_checked(gpa, len_u64(buf.len()))?;
        // SAFETY: `p` is valid for `buf.len()` bytes (checked above); the
        // mapping is never part of a Rust allocation, so the ranges cannot
        // overlap. Concurrent device writes only make the bytes stale.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), Error> {
        let p = self.map.host_ptr_checked(gpa, len_u64(data.len()))?;
        // SAFETY: `p` is valid for `data.len()` bytes (checked above) and is
        // not part of any Rust allocation, so no overlap or aliasing.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Reads a little-endian `u16` at `gpa`.
    pub fn read_u16(&self, gpa: u64) -> Result<u16, Error> {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32` at `gpa`.
    pub fn read_u32(&self, gpa: u64) -> Result<u32, Error> {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64` at `gpa`.
    pub fn read_u64(&self, gpa: u64) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) from the
    /// 1 MiB scratch area at the end of the buffer region. Never freed.
    pub fn alloc(&self, len: u64, align: u64) -> Result<u64, Error> {
        if !align.is_power_of_two() {
            return Err(Error::InvalidConfig(format!(
                "alignment {align} is not a power of two"
            )));
        }
        let mut next = self
            .map
            .scratch_next
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let start = next
            .checked_add(align - 1)
            .map(|v| v & !(align - 1))
            .filter(|s| *s <= self.map.scratch_end);
        let available = self.map.scratch_end - *next;
        match start.and_then(|s| s.checked_add(len).map(|e| (s, e))) {
            Some((s, e)) if e <= self.map.scratch_end => {
                *next = e;
                Ok(s)
            }
            _ => Err(Error::OutOfScratch {
                requested: len,
                available,
            }),
        }
    }

    /// The scratch area as `[start, end)` guest-physical addresses.
    #[must_use]
    pub fn scratch_range(&self) -> (u64, u64) {
        (self.map.scratch_start, self.map.scratch_end)
    }

    /// The guest memory regions (same as [`SimGuest::regions`](crate::SimGuest::regions)).
    #[must_use]
    pub fn regions(&self) -> Vec<MemoryRegionInfo> {
        self.map.region_infos()
    }

    /// One past the last byte of the highest region: the first address
    /// after all guest memory.
    #[must_use]
    pub fn region_end(&self) -> u64 {
        let r = &self.map.regions[1];
        r.gpa + r.size
    }

    /// The unbacked hole between the two regions as `[start, end)`.
    #[must_use]
    pub fn hole(&self) -> (u64, u64) {
        let [a, b] = &self.map.regions;
        (a.gpa + a.size, b.gpa)
    }

    /// Whether `[gpa, gpa+len)` is entirely backed by one region.
    #[must_use]
    pub fn is_mapped(&self, gpa: u64, len: u64) -> bool {
        self.map.host_ptr(gpa, len).is_some()
    }

    /// Host pointer to `len` bytes at `gpa` (for benchmarks that want to
    /// bypass copies). The pointer is valid while this handle lives.
    pub fn host_ptr(&self, gpa: u64, len: u64) -> Result<*mut u8, Error> {
        self.map.host_ptr_checked(gpa, len)
    }
}

/// `usize` → `u64`, lossless on every supported target.
pub(crate) fn len_u64(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

/// A contiguous, bounds-checked guest-memory area (RX chains, TX slots,
/// indirect tables) with its host pointer cached for the hot paths.
#[derive(Debug)]
pub(crate) struct Area {
    /// Keeps `host` mapped.
    _map: Arc<Mapping>,
    host: *mut u8,
    gpa: u64,
    len: u64,
}

// SAFETY: `host` points into the mapping owned by `_map`, which lives as long
// as the `Area`; the area is owned by a single driver, and accesses to the
// bytes are copies whose synchronisation is documented at each use.
unsafe impl Send for Area {}

impl Area {
    /// The area `[gpa, gpa+len)`, which must lie in one region.
    pub fn new(map: &Arc<Mapping>, gpa: u64, len: u64) -> Result<Self, Error> {
        let host = map.host_ptr_checked(gpa, len)?;
        Ok(Self {
            _map: Arc::clone(map),
            host,
            gpa,
            len,
        })
    }

    /// Guest-physical address of byte `off`.
    pub fn gpa(&self, off: u64) -> u64 {
        self.gpa + off
    }

    /// Host pointer to `len` bytes at `off`. Panics if out of bounds (the
    /// callers' offsets come from the layout, so this is an internal bug).
    pub fn ptr(&self, off: u64, len: u64) -> *mut u8 {
        assert!(
            off <= self.len && len <= self.len - off,
            "area access out of bounds"
        );
        // `off < self.len <= isize::MAX` because the mapping succeeded.
        self.host
            .wrapping_add(usize::try_from(off).unwrap_or(usize::MAX))
    }

    /// Copies `data` to `off`.
    pub fn write(&self, off: u64, data: &[u8]) {
        let p = self.ptr(off, len_u64(data.len()));
        // SAFETY: `ptr` checked that `data.len()` bytes at `p` are inside the
        // mapping; the mapping never overlaps a Rust allocation. The driver
        // owns these bytes (not made available to the device) while writing.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    }

    /// Copies bytes at `off` into `buf`.
    pub fn read(&self, off: u64, buf: &mut [u8]) {
        let p = self.ptr(off, len_u64(buf.len()));
        // SAFETY: as in `write`; the device has returned these bytes through
        // the used ring (ordered by the Acquire load of used.idx).
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
    }
}
