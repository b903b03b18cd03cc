//! Guest memory: fd-backed regions mapped with `vm-memory`, address translation into host
//! iovecs, and dirty-page logging of everything the device writes.
//!
//! Every region carries an [`AtomicBitmap`] with one bit per 4 KiB page: writes made through
//! `vm-memory` (used-ring updates) mark it by themselves, and the engines call
//! [`GuestMemory::mark_dirty`] for the bytes the kernel wrote into RX buffers through io_uring or
//! `readv`. A VMM doing live migration collects the log with [`GuestMemory::take_dirty_log`].

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use crate::fd_check::{expect_file_range, FdCheckError};

pub mod fault;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

/// The `vm-memory` collection tapir maps guest memory into.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Dirty-log granularity.
pub const DIRTY_PAGE_SIZE: usize = 4096;

/// Most guest memory tapir maps, all regions together (1 TiB). The frontend chooses region
/// sizes; each region gets a dirty bitmap of one bit per page allocated up front (32 MiB for
/// 1 TiB), so an unbounded size would be an unbounded allocation.
pub const MAX_GUEST_MEMORY: u64 = 1 << 40;

/// One guest memory region backed by a file (usually a memfd shared with the VMM).
#[derive(Debug)]
pub struct MemoryRegionSpec {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// The backing fd (memfd, hugetlbfs file, ...).
    pub fd: OwnedFd,
    /// Offset of the region in the file.
    pub file_offset: u64,
}

/// Where a mapped region is and which fd backs it.
#[derive(Debug)]
pub struct RegionInfo<'a> {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length.
    pub size: u64,
    /// Offset in the backing file.
    pub file_offset: u64,
    /// The backing fd.
    pub fd: std::os::fd::BorrowedFd<'a>,
}

/// Errors of mapping and translating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The regions could not be mapped (overlap, zero size, mmap failure).
    #[error("cannot map guest memory: {0}")]
    Map(#[source] vm_memory::mmap::FromRangesError),
    /// A region's size does not fit in this address space.
    #[error("region at {guest_addr:#x} of size {size:#x} does not fit the host address space")]
    RegionTooLarge {
        /// Guest-physical start.
        guest_addr: u64,
        /// Size.
        size: u64,
    },
    /// The regions together are larger than [`MAX_GUEST_MEMORY`].
    #[error("guest memory of {total:#x} bytes (at most {MAX_GUEST_MEMORY:#x})")]
    TooLarge {
        /// The sum of the region sizes (saturating).
        total: u64,
    },
    /// A region's fd is not a file at least as long as the region.
    #[error(transparent)]
    Fd(#[from] FdCheckError),
    /// Every slot of the SIGBUS guard is taken (see [`guard_mapping`](crate::guard_mapping)).
    #[error("too many guest memory mappings alive at once ({})", fault::SLOTS)]
    TooManyMappings,
    /// A guest address range is not (entirely) backed by guest memory.
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
}

/// Who marks the bytes of a [`GuestMemory::write_bytes`] dirty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyLogging {
    /// The write does.
    Here,
    /// The caller does, for a larger range the bytes are part of (an RX frame: marked once
    /// when it completes).
    ByCaller,
}

/// A cheaply clonable handle to the mapped guest memory.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    inner: Arc<Mapped>,
}

/// The mapping and its SIGBUS guard. Fields drop in order: the guard is unregistered before
/// the regions are unmapped.
#[derive(Debug)]
struct Mapped {
    guards: Vec<fault::Registration>,
    mmap: GuestMemoryMmap,
}

/// Whether the file behind `fd` can still shrink (`F_SEAL_SHRINK` not set).
fn can_shrink(fd: &OwnedFd) -> bool {
    // SAFETY: F_GET_SEALS on an fd we own; fails (EINVAL) for files without seals.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    seals < 0 || seals & libc::F_SEAL_SHRINK == 0
}

impl GuestMemory {
    /// Maps the regions (`MAP_SHARED`), each with its own dirty bitmap, in any order (they
    /// are sorted by guest address). Every fd is checked first: a regular file that holds
    /// `file_offset + size` bytes (a mapping past the end of its file faults on first touch),
    /// and the sizes must add up to at most [`MAX_GUEST_MEMORY`]. Every mapping is registered
    /// with the SIGBUS guard ([`guard_mapping`](crate::guard_mapping)): a file that shrinks later breaks the memory
    /// ([`GuestMemory::is_broken`]) instead of killing the process.
    pub fn from_regions(mut regions: Vec<MemoryRegionSpec>) -> Result<GuestMemory, MemoryError> {
        let total = regions
            .iter()
            .try_fold(0u64, |sum, r| sum.checked_add(r.size))
            .unwrap_or(u64::MAX);
        if total > MAX_GUEST_MEMORY {
            return Err(MemoryError::TooLarge { total });
        }
        for r in &regions {
            expect_file_range(
                r.fd.as_fd(),
                r.file_offset,
                r.size,
                &format!("guest memory region at {:#x}", r.guest_addr),
            )?;
            if can_shrink(&r.fd) {
                tracing::debug!(
                    guest_addr = format_args!("{:#x}", r.guest_addr),
                    "guest memory fd not sealed against shrinking: guarded against SIGBUS"
                );
            }
        }
        regions.sort_by_key(|r| r.guest_addr);
        let mut mapped = Vec::with_capacity(regions.len());
        for r in regions {
            let size = usize::try_from(r.size).map_err(|_| MemoryError::RegionTooLarge {
                guest_addr: r.guest_addr,
                size: r.size,
            })?;
            let file = FileOffset::new(File::from(r.fd), r.file_offset);
            let region = GuestRegionMmap::<AtomicBitmap>::from_range(
                GuestAddress(r.guest_addr),
                size,
                Some(file),
            )
            .map_err(MemoryError::Map)?;
            mapped.push(region);
        }
        let mut guards = Vec::with_capacity(mapped.len());
        for r in &mapped {
            let len = usize::try_from(r.len()).unwrap_or(usize::MAX);
            let start = r
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| MemoryError::TooManyMappings)?;
            guards.push(fault::register(start, len).ok_or(MemoryError::TooManyMappings)?);
        }
        let mmap = vm_memory::GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Map(e.into()))?;
        Ok(GuestMemory {
            inner: Arc::new(Mapped { guards, mmap }),
        })
    }

    /// True once a region's file shrank under its mapping and an access faulted there: the
    /// region now reads as zeroes (see [`guard_mapping`](crate::guard_mapping)); whoever owns the memory should stop using
    /// it (a vhost-user session ends).
    pub fn is_broken(&self) -> bool {
        self.inner.guards.iter().any(|g| g.is_broken())
    }

    /// The `vm-memory` view (for ring accesses through `virtio-queue`).
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.inner.mmap
    }

    /// Translates `[addr, addr + len)` into host (pointer, length) pieces, one per region it
    /// touches, calling `push` for each. Fails if any byte is outside guest memory.
    #[inline]
    pub fn translate(
        &self,
        addr: u64,
        len: u32,
        mut push: impl FnMut(*mut u8, usize),
    ) -> Result<(), MemoryError> {
        let mut cur = addr;
        let mut left = u64::from(len);
        while left > 0 {
            let region =
                self.inner
                    .mmap
                    .find_region(GuestAddress(cur))
                    .ok_or(MemoryError::OutOfRange {
                        addr,
                        len: u64::from(len),
                    })?;
            let offset = cur - region.start_addr().raw_value();
            let in_region = (region.len() - offset).min(left);
            let host = region
                .get_host_address(MemoryRegionAddress(offset))
                .map_err(|_| MemoryError::OutOfRange {
                    addr,
                    len: u64::from(len),
                })?;
            // `in_region <= left <= u32::MAX`, so the conversion is lossless.
            push(host, usize::try_from(in_region).unwrap_or(usize::MAX));
            cur += in_region;
            left -= in_region;
        }
        Ok(())
    }

    /// The host address of `[addr, addr + len)` when the whole range lies in one region
    /// (the common case of [`translate`](Self::translate), with one lookup and no closure).
    #[inline]
    pub(crate) fn host_range(&self, addr: u64, len: u32) -> Option<*mut u8> {
        let region = self.inner.mmap.find_region(GuestAddress(addr))?;
        let offset = addr - region.start_addr().raw_value();
        if u64::from(len) > region.len() - offset {
            return None;
        }
        region.get_host_address(MemoryRegionAddress(offset)).ok()
    }

    /// Writes `bytes` at `addr`: with one region lookup when they lie in one region (the
    /// datapath's small writes: `num_buffers`, spill copies into a chain's piece), through the
    /// general path otherwise. Fails if a byte is outside guest memory. `log` says who marks
    /// the bytes dirty: here, or the caller, which logs a whole frame's range once.
    #[inline]
    pub fn write_bytes(
        &self,
        addr: u64,
        bytes: &[u8],
        log: DirtyLogging,
    ) -> Result<(), MemoryError> {
        let out = || MemoryError::OutOfRange {
            addr,
            len: bytes.len() as u64,
        };
        if let Some(region) = self.inner.mmap.find_region(GuestAddress(addr)) {
            let offset = addr - region.start_addr().raw_value();
            if bytes.len() as u64 <= region.len() - offset {
                if let (Ok(host), Ok(off)) = (
                    region.get_host_address(MemoryRegionAddress(offset)),
                    usize::try_from(offset),
                ) {
                    // SAFETY: `host..host + bytes.len()` lies inside this region's mapping
                    // (checked just above), which lives as long as `self`. `bytes` is not
                    // guest memory: this crate never makes a Rust reference into the guest
                    // mapping (it is reached through raw pointers, atomics and vm-memory's
                    // volatile accesses), so the ranges cannot overlap.
                    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), host, bytes.len()) };
                    if log == DirtyLogging::Here {
                        region.bitmap().mark_dirty(off, bytes.len());
                    }
                    return Ok(());
                }
            }
        }
        vm_memory::Bytes::write_slice(&self.inner.mmap, bytes, GuestAddress(addr))
            .map_err(|_| out())
    }

    /// Marks `[addr, addr + len)` dirty (bytes the device wrote behind `vm-memory`'s back).
    /// Bytes outside guest memory are ignored: they cannot have been written; bytes of a
    /// region after such a hole are marked.
    #[inline]
    pub fn mark_dirty(&self, addr: u64, len: usize) {
        let mut cur = addr;
        let mut left = len as u64;
        while left > 0 {
            let Some(region) = self.inner.mmap.find_region(GuestAddress(cur)) else {
                // A hole (the datapath's ranges never start in one: each is a piece of one
                // region); skip to the next region the range reaches, if any.
                let Some(next) = self
                    .inner
                    .mmap
                    .iter()
                    .map(|r| r.start_addr().raw_value())
                    .find(|&start| start > cur)
                else {
                    return;
                };
                let gap = next - cur;
                if gap >= left {
                    return;
                }
                cur = next;
                left -= gap;
                continue;
            };
            let offset = cur - region.start_addr().raw_value();
            let in_region = (region.len() - offset).min(left);
            // Both fit in usize: they are within a mapped region.
            if let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(in_region)) {
                region.bitmap().mark_dirty(offset, len);
            }
            cur += in_region;
            left -= in_region;
        }
    }

    /// Returns the guest-physical addresses (page aligned) of the guest pages written since
    /// the last call, and clears the log. A region's bitmap counts pages from the region's
    /// start; a region that does not start on a page boundary (the frontend chooses) has
    /// bitmap pages that straddle two guest pages, and both are reported.
    pub fn take_dirty_log(&self) -> Vec<u64> {
        const PAGE: u64 = DIRTY_PAGE_SIZE as u64;
        let mut pages = Vec::new();
        for region in self.inner.mmap.iter() {
            let base = region.start_addr().raw_value();
            let end = base.saturating_add(region.len());
            let words = region.get_mmap().bitmap().get_and_reset();
            for (w, word) in words.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    // The bitmap page lies inside the region: no overflow.
                    let first = base + (w as u64 * 64 + bit) * PAGE;
                    let last = first.saturating_add(PAGE).min(end) - 1;
                    for page in [first / PAGE * PAGE, last / PAGE * PAGE] {
                        if pages.last() != Some(&page) {
                            pages.push(page);
                        }
                    }
                }
            }
        }
        pages
    }

    /// Each region's placement and backing fd (for handing the memory to a successor).
    pub fn regions(&self) -> Vec<RegionInfo<'_>> {
        self.inner
            .mmap
            .iter()
            .filter_map(|r| {
                let file = r.file_offset()?;
                Some(RegionInfo {
                    guest_addr: r.start_addr().raw_value(),
                    size: r.len(),
                    file_offset: file.start(),
                    fd: std::os::fd::AsFd::as_fd(file.file()),
                })
            })
            .collect()
    }

    /// Builds this process's page tables for all of guest memory now
    /// (`MADV_POPULATE_WRITE`), so the first packets after a handoff do not pay a page fault
    /// per guest page they touch. The memory itself is already resident (it is shared with
    /// the VMM); this only maps it. Kernels without the advice (before 5.14) are skipped.
    pub fn populate(&self) {
        const MADV_POPULATE_WRITE: libc::c_int = 23;
        for r in self.inner.mmap.iter() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let Ok(len) = usize::try_from(r.len()) else {
                continue;
            };
            // SAFETY: `host..host+len` is exactly one mapped region of ours; the advice only
            // faults pages in and changes no contents.
            let rc = unsafe { libc::madvise(host.cast(), len, MADV_POPULATE_WRITE) };
            if rc != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "MADV_POPULATE_WRITE refused");
                return;
            }
        }
    }

    /// Drops this process's page tables for guest memory in small steps, yielding between
    /// them (`MADV_DONTNEED` on a shared mapping only unmaps; the memory stays with the VMM
    /// and the successor). A handoff source calls this after it committed: tearing down the
    /// mapping of a large guest in one go (as process exit does) is long kernel work that can
    /// delay the successor's workers on the same CPU by milliseconds.
    ///
    /// The device must not touch guest memory afterwards (reads would see zero-filled pages
    /// only for private mappings; tapir's are shared, but nothing should rely on it).
    pub fn release_gently(&self) {
        const STEP: usize = 256 * 1024;
        for r in self.inner.mmap.iter() {
            let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
                continue;
            };
            let Ok(len) = usize::try_from(r.len()) else {
                continue;
            };
            let mut off = 0;
            while off < len {
                let step = STEP.min(len - off);
                // SAFETY: `host+off..+step` lies inside one mapped region of ours; DONTNEED on
                // a shared file mapping drops page-table entries, not data.
                unsafe { libc::madvise(host.add(off).cast(), step, libc::MADV_DONTNEED) };
                off += step;
                std::thread::yield_now();
            }
        }
    }

    /// True when the whole range is backed by guest memory.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        self.inner.mmap.check_range(
            GuestAddress(addr),
            usize::try_from(len).unwrap_or(usize::MAX),
        )
    }
}

#[cfg(test)]
mod tests;
