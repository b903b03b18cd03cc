//! CPU helpers: per-thread CPU time, pinning, and the online CPU count.

use std::io;
use std::time::Duration;

/// CPU time consumed so far by the calling thread (`CLOCK_THREAD_CPUTIME_ID`).
///
/// Returns [`Duration::ZERO`] if the clock cannot be read (it always can on Linux).
#[must_use]
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u32::try_from(ts.tv_nsec).unwrap_or(0);
    Duration::new(secs, nanos)
}

/// Pins the calling thread to the single CPU `cpu` (`sched_setaffinity`).
///
/// # Errors
/// `EINVAL` if `cpu` is out of range for a `cpu_set_t` or not allowed, or any
/// error from `sched_setaffinity`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // `CPU_SETSIZE` is a small positive constant (1024).
    let max = usize::try_from(libc::CPU_SETSIZE).unwrap_or(1024);
    if cpu >= max {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu < CPU_SETSIZE` was checked above, so the bit is in range.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and its size is passed correctly; pid 0
    // means the calling thread.
    let rc = unsafe {
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpu` if it is `Some`; a no-op for `None`.
///
/// # Errors
/// As [`pin_current_thread`].
pub fn maybe_pin(cpu: Option<usize>) -> io::Result<()> {
    match cpu {
        Some(c) => pin_current_thread(c),
        None => Ok(()),
    }
}

/// Number of online CPUs (`sysconf(_SC_NPROCESSORS_ONLN)`), at least 1.
#[must_use]
pub fn online_cpus() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_advances_and_pin_works() {
        let before = thread_cpu_time();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i * i));
        }
        std::hint::black_box(x);
        assert!(thread_cpu_time() > before);
        assert!(online_cpus() >= 1);
        std::thread::spawn(|| {
            pin_current_thread(0).unwrap();
            assert!(pin_current_thread(usize::MAX).is_err());
        })
        .join()
        .unwrap();
    }
}
