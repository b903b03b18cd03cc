//! Guest memory a frontend can still shrink. Every mapped fd is checked with `fstat` when it
//! is mapped, but an fd that is not sealed against shrinking (an unsealed memfd, a hugetlbfs
//! file) can be truncated afterwards, and the next access of the lost pages raises SIGBUS,
//! which kills the process by default.
//!
//! tapir catches that fault instead. Every mapped guest region is registered here, in a fixed
//! table of atomics that a signal handler can read without locks or allocation. The SIGBUS
//! handler looks the faulting address up: inside a registered region, it maps anonymous zero
//! memory over the whole region (`MAP_FIXED`), so the faulting access (and every later one)
//! completes on zeroes, and marks the region broken; the owner of the memory (the session)
//! sees the flag, logs it and ends. A fault anywhere else gets the action that was there
//! before (Rust's stack-overflow handler, or the default: the process dies with SIGBUS).
//!
//! The handler calls only `mmap`, `sigaction` and `raise` (system calls) and touches only
//! atomics: async-signal-safe.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Once, OnceLock};

/// How many mappings can be registered at once (32 regions per memory table, with room for
/// a few tables alive together across restarts and handoffs).
pub const SLOTS: usize = 512;

const FREE: u8 = 0;
const BUSY: u8 = 1;
const LIVE: u8 = 2;

struct Slot {
    state: AtomicU8,
    start: AtomicUsize,
    len: AtomicUsize,
    broken: AtomicBool,
}

impl Slot {
    const fn new() -> Slot {
        Slot {
            state: AtomicU8::new(FREE),
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            broken: AtomicBool::new(false),
        }
    }
}

static REGISTRY: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static RECOVERED: AtomicU64 = AtomicU64::new(0);
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
static INSTALL: Once = Once::new();

/// A registered mapping; unregistered on drop (before the mapping goes away).
#[derive(Debug)]
pub struct Registration {
    slot: usize,
}

impl Registration {
    /// True once a fault inside the mapping was caught (it now reads as zeroes).
    pub fn is_broken(&self) -> bool {
        REGISTRY
            .get(self.slot)
            .is_some_and(|s| s.broken.load(Ordering::Acquire))
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(s) = REGISTRY.get(self.slot) {
            s.state.store(BUSY, Ordering::SeqCst);
            s.start.store(0, Ordering::SeqCst);
            s.len.store(0, Ordering::SeqCst);
            s.broken.store(false, Ordering::SeqCst);
            s.state.store(FREE, Ordering::SeqCst);
        }
    }
}

/// The SIGBUS guard (what a mapping an untrusted frontend can shrink needs; guest memory
/// registers itself): registers the mapping `[start, start + len)` (page aligned, as mmap returns it) so that a
/// SIGBUS inside it is survived; installs the handler on first use. `None` when every slot
/// is taken.
pub fn register(start: *mut u8, len: usize) -> Option<Registration> {
    install_handler();
    for (i, s) in REGISTRY.iter().enumerate() {
        if s.state
            .compare_exchange(FREE, BUSY, Ordering::SeqCst, Ordering::Relaxed)
            .is_ok()
        {
            s.start.store(start as usize, Ordering::SeqCst);
            s.len.store(len, Ordering::SeqCst);
            s.broken.store(false, Ordering::SeqCst);
            s.state.store(LIVE, Ordering::SeqCst);
            return Some(Registration { slot: i });
        }
    }
    None
}

/// Installs the SIGBUS handler now (idempotent). [`register`] does it on first use; a process
/// that installs a seccomp filter without `rt_sigaction` calls this before.
pub fn install_handler() {
    INSTALL.call_once(install);
}

/// Faults caught in registered mappings since the process started.
pub fn recovered_faults() -> u64 {
    RECOVERED.load(Ordering::Relaxed)
}

fn install() {
    // SAFETY: sigaction is plain data; zero is an empty mask and no flags.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigbus as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: `action.sa_mask` is a valid sigset to initialise.
    unsafe { libc::sigemptyset(&mut action.sa_mask) };
    // SAFETY: plain data, filled in by sigaction.
    let mut previous: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: installs a handler that is async-signal-safe (see the module comment).
    let rc = unsafe { libc::sigaction(libc::SIGBUS, &action, &mut previous) };
    if rc != 0 {
        tracing::error!(error = %std::io::Error::last_os_error(), "installing the SIGBUS handler");
        return;
    }
    let _ = PREVIOUS.set(previous);
}

/// Gives the signal back to what was there before ours (the process then dies of it, unless
/// that handler knows better).
fn pass_on(code: libc::c_int) {
    let default = {
        // SAFETY: plain data; SIG_DFL with no flags.
        let mut a: libc::sigaction = unsafe { std::mem::zeroed() };
        a.sa_sigaction = libc::SIG_DFL;
        a
    };
    let previous = PREVIOUS.get().unwrap_or(&default);
    // SAFETY: restoring a previously installed action (or the default) for SIGBUS.
    unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
    if code <= 0 {
        // Sent by a process (kill, tgkill): returning would not repeat it.
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(libc::SIGBUS) };
    }
    // A fault: returning repeats the access, which now meets the previous action.
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: errno is thread-local; saved and restored around our system calls.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: the kernel passes a valid siginfo with SA_SIGINFO.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let caught = code == libc::BUS_ADRERR && zero_over(addr);
    if !caught {
        pass_on(code);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Maps zeroes over the registered region holding `addr`; false if none does (or mmap failed).
fn zero_over(addr: usize) -> bool {
    for s in &REGISTRY {
        if s.state.load(Ordering::Acquire) != LIVE {
            continue;
        }
        let start = s.start.load(Ordering::Acquire);
        let len = s.len.load(Ordering::Acquire);
        if addr < start || addr - start >= len {
            continue;
        }
        // SAFETY: replaces our own mapping of a guest region (registered, so still mapped)
        // with anonymous memory of the same size at the same place; nothing but guest data
        // lives there, and it is lost anyway.
        let p = unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return false;
        }
        s.broken.store(true, Ordering::Release);
        RECOVERED.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_in_a_truncated_registered_mapping_reads_zeroes_and_marks_it_broken() {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&fd, 0x4000).expect("ftruncate");
        // SAFETY: a fresh shared mapping of our memfd.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                0x4000,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let reg = register(p.cast(), 0x4000).expect("a free slot");
        // SAFETY: inside the mapping.
        unsafe { p.cast::<u8>().add(0x3000).write_volatile(7) };
        nix::unistd::ftruncate(&fd, 0).expect("shrink");
        assert!(!reg.is_broken());
        // SAFETY: inside the mapping; the page is gone from the file, so this faults, and the
        // handler maps zeroes there.
        let v = unsafe { p.cast::<u8>().add(0x3000).read_volatile() };
        assert_eq!(v, 0);
        assert!(reg.is_broken());
        assert!(recovered_faults() >= 1);
        drop(reg);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, 0x4000) };
    }
}
