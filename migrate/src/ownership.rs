//! The ownership word of a version-3 handoff: one 64-bit word in a sealed one-page memfd
//! that the source creates at prepare time and both processes map. It says who owns the
//! device's rings, and it changes only by compare-and-swap, so that of a successor claiming
//! the rings and a source taking them back exactly one wins (see `docs/HANDOFF.md`, "Version
//! 3: one message in the blackout").
//!
//! ```text
//!   Source --(source, commit point)--> HandedTo(pid) --(successor, claim)--> ClaimedBy(pid)
//!                                           |
//!                                           +--(source, fence: take back)--> Source
//! ```
//!
//! The word names the successor's pid and the source's attempt number, so a word meant for one
//! successor cannot be claimed by another. The memfd is sealed (`F_SEAL_SHRINK`,
//! `F_SEAL_GROW`, `F_SEAL_SEAL`) before it is sent: a peer cannot truncate it under the other's
//! mapping (which would raise SIGBUS on the next access). A peer can still write anything into
//! the word; the source reads anything but the states above as forged (see `source.rs`).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::protocol::MigrateError;

/// The size of the memfd (and of each mapping): one page.
const LEN: usize = 4096;

const TAG_SOURCE: u64 = 1;
const TAG_HANDED: u64 = 2;
const TAG_CLAIMED: u64 = 3;

/// Who the word says owns the rings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    /// The source: the successor must not touch a ring.
    Source,
    /// Handed on (the source's commit point): the successor `pid` may claim the rings.
    HandedTo {
        /// The successor.
        pid: u32,
        /// The source's handoff attempt.
        attempt: u32,
    },
    /// Claimed by the successor `pid`: it runs the rings; the source never resumes.
    ClaimedBy {
        /// The successor.
        pid: u32,
        /// The source's handoff attempt.
        attempt: u32,
    },
    /// A value no honest process writes.
    Forged(u64),
}

impl Owner {
    /// The word's encoding: tag in bits 56..64, attempt in bits 32..56, pid in bits 0..32.
    pub fn encode(self) -> u64 {
        let pack = |tag: u64, pid: u32, attempt: u32| {
            (tag << 56) | ((u64::from(attempt) & 0x00ff_ffff) << 32) | u64::from(pid)
        };
        match self {
            Owner::Source => TAG_SOURCE << 56,
            Owner::HandedTo { pid, attempt } => pack(TAG_HANDED, pid, attempt),
            Owner::ClaimedBy { pid, attempt } => pack(TAG_CLAIMED, pid, attempt),
            Owner::Forged(w) => w,
        }
    }

    /// Reads a word.
    pub fn decode(w: u64) -> Owner {
        let pid = u32::try_from(w & 0xffff_ffff).unwrap_or(0);
        let attempt = u32::try_from((w >> 32) & 0x00ff_ffff).unwrap_or(0);
        let owner = match w >> 56 {
            TAG_SOURCE if w == TAG_SOURCE << 56 => Owner::Source,
            TAG_HANDED => Owner::HandedTo { pid, attempt },
            TAG_CLAIMED => Owner::ClaimedBy { pid, attempt },
            _ => Owner::Forged(w),
        };
        // Only the canonical encoding counts (a garbage word that happens to decode to a
        // valid state after masking is still garbage).
        if owner.encode() == w {
            owner
        } else {
            Owner::Forged(w)
        }
    }
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Source => write!(f, "owned by the source"),
            Owner::HandedTo { pid, attempt } => {
                write!(f, "handed to pid {pid} (attempt {attempt})")
            }
            Owner::ClaimedBy { pid, attempt } => {
                write!(f, "claimed by pid {pid} (attempt {attempt})")
            }
            Owner::Forged(w) => write!(f, "forged ({w:#018x})"),
        }
    }
}

/// The ownership word, mapped.
#[derive(Debug)]
pub struct OwnershipWord {
    fd: OwnedFd,
    map: NonNull<AtomicU64>,
}

// SAFETY: the mapping is owned by this value and only reached through an `AtomicU64`.
unsafe impl Send for OwnershipWord {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for OwnershipWord {}

fn os(what: &'static str) -> impl Fn(std::io::Error) -> MigrateError {
    move |e| MigrateError::Ownership(format!("{what}: {e}"))
}

fn last_os(what: &'static str) -> MigrateError {
    os(what)(std::io::Error::last_os_error())
}

const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

impl OwnershipWord {
    /// The source's word for a new handoff: a fresh sealed memfd saying [`Owner::Source`].
    pub fn create() -> Result<OwnershipWord, MigrateError> {
        // SAFETY: plain syscall with a NUL-terminated name; a non-negative result is a new fd.
        let raw = unsafe {
            libc::memfd_create(
                c"tapir-ownership".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if raw < 0 {
            return Err(last_os("memfd_create"));
        }
        // SAFETY: `raw` is the fresh fd the kernel just returned; nothing else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        let len = libc::off_t::try_from(LEN).map_err(|_| MigrateError::Ownership("len".into()))?;
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len) } != 0 {
            return Err(last_os("ftruncate"));
        }
        // SAFETY: plain syscall on an fd we own.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) } != 0 {
            return Err(last_os("F_ADD_SEALS"));
        }
        let word = OwnershipWord::map(fd)?;
        word.atomic()
            .store(Owner::Source.encode(), Ordering::SeqCst);
        Ok(word)
    }

    /// The successor's view of the word the source sent: checked to be a sealed memfd of one
    /// page (so that neither side can shrink it under the other), then mapped.
    pub fn adopt(fd: OwnedFd) -> Result<OwnershipWord, MigrateError> {
        // SAFETY: plain syscall on an fd we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals < 0 || seals & SEALS != SEALS {
            return Err(MigrateError::Ownership(
                "the ownership word's fd is not a sealed memfd".into(),
            ));
        }
        let len = u64::try_from(LEN).unwrap_or(u64::MAX);
        tapir_datapath::expect_file_range(fd.as_fd(), 0, len, "the ownership word")
            .map_err(|e| MigrateError::Ownership(e.to_string()))?;
        OwnershipWord::map(fd)
    }

    fn map(fd: OwnedFd) -> Result<OwnershipWord, MigrateError> {
        // SAFETY: a new shared mapping of a file at least LEN long that cannot shrink (sealed,
        // checked by the callers); the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(last_os("mmap"));
        }
        let map = NonNull::new(p.cast::<AtomicU64>())
            .ok_or_else(|| MigrateError::Ownership("mmap returned null".into()))?;
        Ok(OwnershipWord { fd, map })
    }

    fn atomic(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page aligned, LEN bytes long and lives as long as `self`;
        // every access to it, in this process and the peer, goes through atomics.
        unsafe { self.map.as_ref() }
    }

    /// The memfd, to send to the successor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// What the word says now.
    pub fn load(&self) -> Owner {
        Owner::decode(self.atomic().load(Ordering::SeqCst))
    }

    /// `from` -> `to`, atomically; on failure, what the word said instead.
    fn swap(&self, from: Owner, to: Owner) -> Result<(), Owner> {
        self.atomic()
            .compare_exchange(
                from.encode(),
                to.encode(),
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .map(|_| ())
            .map_err(Owner::decode)
    }

    /// The source's commit point: [`Owner::Source`] -> [`Owner::HandedTo`].
    pub fn hand_to(&self, pid: u32, attempt: u32) -> Result<(), Owner> {
        self.swap(Owner::Source, Owner::HandedTo { pid, attempt })
    }

    /// The successor, before it touches a ring: [`Owner::HandedTo`] -> [`Owner::ClaimedBy`].
    pub fn claim(&self, pid: u32, attempt: u32) -> Result<(), Owner> {
        self.swap(
            Owner::HandedTo { pid, attempt },
            Owner::ClaimedBy { pid, attempt },
        )
    }

    /// The source's fence: [`Owner::HandedTo`] -> [`Owner::Source`]. Once this succeeded
    /// the successor's claim cannot.
    pub fn take_back(&self, pid: u32, attempt: u32) -> Result<(), Owner> {
        self.swap(Owner::HandedTo { pid, attempt }, Owner::Source)
    }

    /// Writes any value (tests of a lying peer only).
    #[doc(hidden)]
    pub fn forge(&self, word: u64) {
        self.atomic().store(word, Ordering::SeqCst);
    }
}

impl Drop for OwnershipWord {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once; nothing refers to it afterwards.
        unsafe { libc::munmap(self.map.as_ptr().cast(), LEN) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_garbage_is_forged() {
        for o in [
            Owner::Source,
            Owner::HandedTo { pid: 7, attempt: 3 },
            Owner::ClaimedBy {
                pid: u32::MAX,
                attempt: 0x00ff_ffff,
            },
        ] {
            assert_eq!(Owner::decode(o.encode()), o);
        }
        assert_eq!(Owner::decode(0), Owner::Forged(0));
        assert_eq!(Owner::decode(u64::MAX), Owner::Forged(u64::MAX));
        assert_eq!(Owner::decode((1 << 56) | 5), Owner::Forged((1 << 56) | 5));
    }

    #[test]
    fn of_a_claim_and_a_take_back_exactly_one_wins() {
        let src = OwnershipWord::create().unwrap();
        let succ = OwnershipWord::adopt(src.fd().try_clone_to_owned().unwrap()).unwrap();
        // Nothing to claim before the source handed the device on.
        assert_eq!(succ.claim(9, 1), Err(Owner::Source));
        src.hand_to(9, 1).unwrap();
        // Another successor, or another attempt, cannot claim it.
        assert!(succ.claim(10, 1).is_err());
        assert!(succ.claim(9, 2).is_err());
        succ.claim(9, 1).unwrap();
        assert_eq!(
            src.take_back(9, 1),
            Err(Owner::ClaimedBy { pid: 9, attempt: 1 })
        );
        // The other order.
        let src = OwnershipWord::create().unwrap();
        let succ = OwnershipWord::adopt(src.fd().try_clone_to_owned().unwrap()).unwrap();
        src.hand_to(9, 1).unwrap();
        src.take_back(9, 1).unwrap();
        assert_eq!(succ.claim(9, 1), Err(Owner::Source));
        assert_eq!(src.load(), Owner::Source);
    }

    #[test]
    fn an_unsealed_or_short_fd_is_refused() {
        let fd =
            nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4096).unwrap();
        assert!(OwnershipWord::adopt(file.into()).is_err());
        let (r, _w) = nix::unistd::pipe().unwrap();
        assert!(OwnershipWord::adopt(r).is_err());
    }
}
