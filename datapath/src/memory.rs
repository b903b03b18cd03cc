//! Guest memory: fd-backed regions mapped with `vm-memory`, address translation into host
//! iovecs, and dirty-page logging of everything the device writes.
//!
//! Every region carries an [`AtomicBitmap`] with one bit per 4 KiB page: writes made through
//! `vm-memory` (used-ring updates) mark it by themselves, and the engines call
//! [`GuestMemory::mark_dirty`] for the bytes the kernel wrote into RX buffers through io_uring or
//! `readv`. A VMM doing live migration collects the log with [`GuestMemory::take_dirty_log`].

use std::fs::File;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

/// The `vm-memory` collection tapir maps guest memory into.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Dirty-log granularity.
pub const DIRTY_PAGE_SIZE: usize = 4096;

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
    /// A guest address range is not (entirely) backed by guest memory.
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
    },
}

/// A cheaply clonable handle to the mapped guest memory.
#[derive(Clone, Debug)]
pub struct GuestMemory {
    mmap: Arc<GuestMemoryMmap>,
}

impl GuestMemory {
    /// Maps the regions (`MAP_SHARED`), each with its own dirty bitmap.
    pub fn from_regions(regions: Vec<MemoryRegionSpec>) -> Result<GuestMemory, MemoryError> {
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
        let mmap = vm_memory::GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Map(e.into()))?;
        Ok(GuestMemory {
            mmap: Arc::new(mmap),
        })
    }

    /// The `vm-memory` view (for ring accesses through `virtio-queue`).
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.mmap
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
                self.mmap
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

    /// Marks `[addr, addr + len)` dirty (bytes the device wrote behind `vm-memory`'s back).
    /// Bytes outside guest memory are ignored: they cannot have been written.
    #[inline]
    pub fn mark_dirty(&self, addr: u64, len: usize) {
        let mut cur = addr;
        let mut left = len as u64;
        while left > 0 {
            let Some(region) = self.mmap.find_region(GuestAddress(cur)) else {
                return;
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

    /// Returns the guest-physical addresses of the pages written since the last call, and
    /// clears the log.
    pub fn take_dirty_log(&self) -> Vec<u64> {
        let mut pages = Vec::new();
        for region in self.mmap.iter() {
            let base = region.start_addr().raw_value();
            let words = region.get_mmap().bitmap().get_and_reset();
            for (w, word) in words.iter().enumerate() {
                let mut bits = *word;
                while bits != 0 {
                    let bit = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    pages.push(base + (w as u64 * 64 + bit) * DIRTY_PAGE_SIZE as u64);
                }
            }
        }
        pages
    }

    /// Each region's placement and backing fd (for handing the memory to a successor).
    pub fn regions(&self) -> Vec<RegionInfo<'_>> {
        self.mmap
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
        for r in self.mmap.iter() {
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
        for r in self.mmap.iter() {
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
        self.mmap.check_range(
            GuestAddress(addr),
            usize::try_from(len).unwrap_or(usize::MAX),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn memfd(size: u64) -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"tapir-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
                .unwrap();
        let file = File::from(fd);
        file.set_len(size).unwrap();
        file.into()
    }

    #[test]
    fn translate_splits_and_refuses_holes() {
        let fd = memfd(0x4000);
        let fd2 = fd.try_clone().unwrap();
        // Two regions, contiguous in guest space, at different file offsets.
        let mem = GuestMemory::from_regions(vec![
            MemoryRegionSpec {
                guest_addr: 0,
                size: 0x2000,
                fd,
                file_offset: 0,
            },
            MemoryRegionSpec {
                guest_addr: 0x2000,
                size: 0x2000,
                fd: fd2,
                file_offset: 0x2000,
            },
        ])
        .unwrap();
        let mut pieces = Vec::new();
        mem.translate(0x1ff0, 0x20, |p, l| pieces.push((p as usize, l)))
            .unwrap();
        assert_eq!(
            pieces.iter().map(|p| p.1).collect::<Vec<_>>(),
            vec![0x10, 0x10]
        );
        assert!(mem.translate(0x3ff0, 0x20, |_, _| {}).is_err());
        assert!(mem.translate(u64::MAX - 4, 8, |_, _| {}).is_err());
        let _ = File::from(memfd(1)).write(b"x");
    }

    #[test]
    fn dirty_log_collects_pages() {
        let mem = GuestMemory::from_regions(vec![MemoryRegionSpec {
            guest_addr: 0x10_0000,
            size: 0x10000,
            fd: memfd(0x10000),
            file_offset: 0,
        }])
        .unwrap();
        mem.mark_dirty(0x10_0ff0, 0x20);
        assert_eq!(mem.take_dirty_log(), vec![0x10_0000, 0x10_1000]);
        assert!(mem.take_dirty_log().is_empty());
    }
}
