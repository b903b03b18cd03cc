//! The `SIGSYS` handler of [`Trap::Report`](crate::Trap::Report): one line on stderr naming
//! the refused system call, then exit.

use std::io;

use crate::SandboxError;

/// Exit status after a refused system call (128 + SIGSYS).
pub const REFUSED_EXIT: i32 = 159;

/// Offset of `si_syscall` in a `siginfo_t` for `SIGSYS` (`_sigsys { void *_call_addr;
/// int _syscall; unsigned _arch; }` after the three-int header padded to 8 bytes).
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS from
    // seccomp its union holds `_sigsys`, whose `_syscall` int is at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    // Only async-signal-safe work: format into a stack buffer, write(2), _exit.
    let mut line = *b"tapir: sandbox: seccomp refused system call            \n";
    let prefix = b"tapir: sandbox: seccomp refused system call ".len();
    let mut digits = [0u8; 12];
    let mut n = nr.unsigned_abs();
    let mut len = 0;
    loop {
        if let Some(d) = digits.get_mut(len) {
            // A digit: n % 10 < 10.
            *d = b'0' + (n % 10) as u8;
        }
        len += 1;
        n /= 10;
        if n == 0 || len >= digits.len() {
            break;
        }
    }
    for (slot, d) in line
        .iter_mut()
        .skip(prefix)
        .zip(digits.iter().take(len).rev())
    {
        *slot = *d;
    }
    let end = (prefix + len).min(line.len() - 1);
    if let Some(nl) = line.get_mut(end) {
        *nl = b'\n';
    }
    // SAFETY: write and _exit are async-signal-safe; the buffer lives for the call.
    unsafe {
        libc::write(2, line.as_ptr().cast(), end + 1);
        libc::_exit(REFUSED_EXIT);
    }
}

/// Installs the handler.
pub(crate) fn install() -> Result<(), SandboxError> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" start.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: installs a handler that only makes async-signal-safe calls.
    let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(SandboxError::Os {
            what: "sigaction(SIGSYS)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}
