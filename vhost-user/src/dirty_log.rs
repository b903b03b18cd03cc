//! The frontend's dirty log (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`): a shared bitmap, one bit per
//! 4 KiB guest page, that the frontend reads while it live-migrates the guest. The datapath
//! marks every byte it writes in its own per-region bitmaps; [`DirtyLog::flush`] moves those
//! marks into the shared log (atomic ORs, as the frontend clears bits concurrently). The
//! daemon flushes every few milliseconds while `VHOST_F_LOG_ALL` is negotiated, and always
//! after it stops a ring, which is before the frontend's final pass.

#![deny(clippy::indexing_slicing)]

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use tapir_datapath::GuestMemory;
use tapir_datapath::{expect_file_range, FdCheckError};
use tapir_datapath::{guard_mapping, MappingGuard};

/// Granularity of the vhost log.
pub const LOG_PAGE: u64 = 4096;

/// Largest log tapir maps (1 GiB: one bit per page of 32 TiB of guest-physical space).
pub const MAX_LOG_SIZE: u64 = 1 << 30;

/// A mapped dirty log.
#[derive(Debug)]
pub struct DirtyLog {
    base: NonNull<u8>,
    len: usize,
    /// The fd it was mapped from (kept for a handoff).
    pub fd: OwnedFd,
    /// Size the frontend gave.
    pub mmap_size: u64,
    /// Offset the frontend gave.
    pub mmap_offset: u64,
    /// The SIGBUS guard of the mapping (the log fd may shrink too).
    guard: MappingGuard,
}

// SAFETY: the mapping is shared memory accessed only through atomic byte operations; the
// pointer is valid for the log's lifetime on any thread.
unsafe impl Send for DirtyLog {}

/// Errors of mapping the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Size zero or larger than [`MAX_LOG_SIZE`].
    #[error("invalid dirty log size {0:#x} (1 to {MAX_LOG_SIZE:#x} bytes)")]
    Size(u64),
    /// The fd is not a file that holds the log.
    #[error(transparent)]
    Fd(#[from] FdCheckError),
    /// No slot of the SIGBUS guard is free.
    #[error("too many guarded mappings")]
    Guard,
    /// mmap failed.
    #[error("mapping the dirty log: {0}")]
    Map(#[source] std::io::Error),
}

impl DirtyLog {
    /// Maps `mmap_size` bytes of `fd` at `mmap_offset`, shared and writable, once `fstat`
    /// says the file holds them.
    pub fn map(fd: OwnedFd, mmap_size: u64, mmap_offset: u64) -> Result<DirtyLog, LogError> {
        let len = usize::try_from(mmap_size)
            .ok()
            .filter(|&l| l > 0 && mmap_size <= MAX_LOG_SIZE)
            .ok_or(LogError::Size(mmap_size))?;
        expect_file_range(fd.as_fd(), mmap_offset, mmap_size, "dirty log")?;
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| LogError::Size(mmap_offset))?;
        // SAFETY: a fresh shared mapping of the frontend's log fd; the kernel checks the fd,
        // length and offset; we only touch it through atomics within `len`.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LogError::Map(std::io::Error::last_os_error()));
        }
        let Some(base) = NonNull::new(ptr.cast::<u8>()) else {
            return Err(LogError::Size(mmap_size));
        };
        let Some(guard) = guard_mapping(base.as_ptr(), len) else {
            // SAFETY: unmapping the mapping just made, which nothing uses.
            unsafe { libc::munmap(ptr, len) };
            return Err(LogError::Guard);
        };
        Ok(DirtyLog {
            base,
            len,
            fd,
            mmap_size,
            mmap_offset,
            guard,
        })
    }

    /// True once the log's file shrank under it and a write faulted (see
    /// [`tapir_datapath::guard_mapping`]).
    pub fn is_broken(&self) -> bool {
        self.guard.is_broken()
    }

    /// Pages the log has bits for.
    fn pages(&self) -> u64 {
        u64::try_from(self.len)
            .unwrap_or(u64::MAX)
            .saturating_mul(8)
    }

    /// Marks one guest page (by guest-physical address) dirty; pages beyond the log are
    /// ignored (the frontend sized the log for all of guest memory).
    pub fn mark(&self, gpa: u64) {
        self.mark_page(gpa / LOG_PAGE);
    }

    fn mark_page(&self, page: u64) {
        self.or_word(page / 64, 1 << (page % 64));
    }

    /// ORs `mask` into log word `word` (ignored beyond the log).
    fn or_word(&self, word: u64, mask: u64) {
        // QEMU reads and clears the log a 64-bit word at a time (`qatomic_xchg` on
        // `vhost_log_chunk_t`); update it with accesses of the same size, so that the two
        // read-modify-writes are atomic with respect to each other.
        let Ok(word) = usize::try_from(word) else {
            return;
        };
        if word
            .checked_add(1)
            .and_then(|w| w.checked_mul(8))
            .is_none_or(|end| end > self.len)
        {
            return;
        }
        // SAFETY: the word lies inside our mapping (checked above), the mapping is page
        // aligned so the word is 8-byte aligned, and the frontend updates it only atomically.
        let cell = unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(word * 8).cast::<u64>()) };
        cell.fetch_or(mask, Ordering::Relaxed);
    }

    /// Marks pages `first..=last` (`last` within the log), a word at a time: a ring stop
    /// while logging marks all of guest memory, up to 2^28 pages.
    fn mark_pages(&self, first: u64, last: u64) -> u64 {
        let mut page = first;
        while page <= last {
            let bit = page % 64;
            let span = (64 - bit).min(last - page + 1);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            self.or_word(page / 64, mask);
            page += span;
        }
        last.saturating_sub(first) + 1
    }

    /// Marks every page of guest memory the log covers dirty; returns how many. The loop
    /// runs over page numbers (no address arithmetic that could wrap) and stops at the end
    /// of the log, so it is bounded by the log's size whatever the regions say.
    pub fn mark_all(&self, memory: &GuestMemory) -> u64 {
        let mut n = 0;
        for r in memory.regions() {
            let Some(last_byte) = r
                .size
                .checked_sub(1)
                .and_then(|s| r.guest_addr.checked_add(s))
            else {
                continue;
            };
            let first = r.guest_addr / LOG_PAGE;
            let last = (last_byte / LOG_PAGE).min(self.pages().saturating_sub(1));
            if first >= self.pages() {
                continue;
            }
            n += self.mark_pages(first, last);
        }
        n
    }

    /// Moves the datapath's dirty marks into the log; returns the number of pages marked.
    pub fn flush(&self, memory: &GuestMemory) -> usize {
        let pages = memory.take_dirty_log();
        for &p in &pages {
            self.mark(p);
        }
        std::sync::atomic::fence(Ordering::Release);
        pages.len()
    }
}

impl Drop for DirtyLog {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping made in `map`, which nothing uses any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tapir_datapath::MemoryRegionSpec;

    fn memfd(len: u64) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&fd, i64::try_from(len).expect("len")).expect("ftruncate");
        fd
    }

    #[test]
    fn a_log_longer_than_its_file_or_too_large_is_refused() {
        assert!(matches!(
            DirtyLog::map(memfd(0x1000), 0x2000, 0),
            Err(LogError::Fd(_))
        ));
        assert!(matches!(
            DirtyLog::map(memfd(0x1000), 0x1000, 0x1000),
            Err(LogError::Fd(_))
        ));
        assert!(matches!(
            DirtyLog::map(memfd(0x1000), 0, 0),
            Err(LogError::Size(0))
        ));
        assert!(matches!(
            DirtyLog::map(memfd(0x1000), MAX_LOG_SIZE + 1, 0),
            Err(LogError::Size(_))
        ));
        DirtyLog::map(memfd(0x1000), 0x1000, 0).expect("a fitting log");
    }

    #[test]
    fn marking_a_region_at_the_top_of_the_address_space_ends() {
        let fd = memfd(0x10000);
        let mem = GuestMemory::from_regions(vec![MemoryRegionSpec {
            guest_addr: u64::MAX - 0xffff,
            size: 0xffff,
            fd,
            file_offset: 0,
        }])
        .expect("map");
        let log = DirtyLog::map(memfd(0x1000), 0x1000, 0).expect("log");
        // The region is far beyond what the log covers: nothing to mark, and no wrap.
        assert_eq!(log.mark_all(&mem), 0);
        let low = GuestMemory::from_regions(vec![MemoryRegionSpec {
            guest_addr: 0x1000,
            size: 0x2001,
            fd: memfd(0x3000),
            file_offset: 0,
        }])
        .expect("map");
        assert_eq!(log.mark_all(&low), 3, "pages 1, 2 and 3");
        let mut bits = [0u8; 1];
        nix::sys::uio::pread(log.fd.as_fd(), &mut bits, 0).expect("pread");
        assert_eq!(bits, [0b1110]);
    }

    #[test]
    fn marking_page_ranges_sets_exactly_their_bits() {
        let log = DirtyLog::map(memfd(0x1000), 0x1000, 0).expect("log");
        assert_eq!(log.mark_pages(3, 200), 198);
        assert_eq!(log.mark_pages(64, 127), 64);
        let mut bits = [0u8; 0x1000];
        nix::sys::uio::pread(log.fd.as_fd(), &mut bits, 0).expect("pread");
        for p in 0..0x8000usize {
            let set = bits.get(p / 8).is_some_and(|b| b & (1 << (p % 8)) != 0);
            assert_eq!(set, (3..=200).contains(&p), "page {p}");
        }
    }
}
