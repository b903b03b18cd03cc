//! The frontend's dirty log (`VHOST_USER_PROTOCOL_F_LOG_SHMFD`): a shared bitmap, one bit per
//! 4 KiB guest page, that the frontend reads while it live-migrates the guest. The datapath
//! marks every byte it writes in its own per-region bitmaps; [`DirtyLog::flush`] moves those
//! marks into the shared log (atomic ORs, as the frontend clears bits concurrently). The
//! daemon flushes every few milliseconds while `VHOST_F_LOG_ALL` is negotiated, and always
//! after it stops a ring, which is before the frontend's final pass.

use std::os::fd::{AsRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use tapir_datapath::GuestMemory;

/// Granularity of the vhost log.
pub const LOG_PAGE: u64 = 4096;

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
}

// SAFETY: the mapping is shared memory accessed only through atomic byte operations; the
// pointer is valid for the log's lifetime on any thread.
unsafe impl Send for DirtyLog {}

/// Errors of mapping the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Size zero or larger than this address space.
    #[error("invalid dirty log size {0:#x}")]
    Size(u64),
    /// mmap failed.
    #[error("mapping the dirty log: {0}")]
    Map(#[source] std::io::Error),
}

impl DirtyLog {
    /// Maps `mmap_size` bytes of `fd` at `mmap_offset`, shared and writable.
    pub fn map(fd: OwnedFd, mmap_size: u64, mmap_offset: u64) -> Result<DirtyLog, LogError> {
        let len = usize::try_from(mmap_size)
            .ok()
            .filter(|&l| l > 0)
            .ok_or(LogError::Size(mmap_size))?;
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
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(LogError::Size(mmap_size))?;
        Ok(DirtyLog {
            base,
            len,
            fd,
            mmap_size,
            mmap_offset,
        })
    }

    /// Marks one guest page (by guest-physical address) dirty; pages beyond the log are
    /// ignored (the frontend sized the log for all of guest memory).
    pub fn mark(&self, gpa: u64) {
        let page = gpa / LOG_PAGE;
        // QEMU reads and clears the log a 64-bit word at a time (`qatomic_xchg` on
        // `vhost_log_chunk_t`); update it with accesses of the same size, so that the two
        // read-modify-writes are atomic with respect to each other.
        let Ok(word) = usize::try_from(page / 64) else {
            return;
        };
        if (word + 1) * 8 > self.len {
            return;
        }
        // SAFETY: the word lies inside our mapping (checked above), the mapping is page
        // aligned so the word is 8-byte aligned, and the frontend updates it only atomically.
        let cell = unsafe { AtomicU64::from_ptr(self.base.as_ptr().add(word * 8).cast::<u64>()) };
        cell.fetch_or(1 << (page % 64), Ordering::Relaxed);
    }

    /// Marks every page of guest memory dirty; returns how many.
    pub fn mark_all(&self, memory: &GuestMemory) -> u64 {
        let mut n = 0;
        for r in memory.regions() {
            let mut p = r.guest_addr;
            while p < r.guest_addr + r.size {
                self.mark(p);
                p += LOG_PAGE;
                n += 1;
            }
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
