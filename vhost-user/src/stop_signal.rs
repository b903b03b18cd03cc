//! SIGTERM and SIGINT as something the serve loop polls: both are blocked in the whole
//! process (before any worker thread exists, so every thread inherits the mask) and read from
//! a signalfd. No handler runs, nothing async-signal-unsafe happens, and the seccomp sandbox
//! needs nothing new (the signalfd is made before it; reading it is a `read`).

use std::os::fd::{AsFd, BorrowedFd};

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

/// The signals that stop `tapir serve`.
#[derive(Debug)]
pub struct StopSignals {
    fd: SignalFd,
}

/// Which signal asked the daemon to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopSignal {
    /// SIGTERM (systemd, `kill`).
    Term,
    /// SIGINT (Ctrl-C).
    Int,
}

impl StopSignal {
    /// The signal's name.
    pub fn name(self) -> &'static str {
        match self {
            StopSignal::Term => "SIGTERM",
            StopSignal::Int => "SIGINT",
        }
    }
}

impl StopSignals {
    /// Blocks SIGTERM and SIGINT in the calling thread (and so in every thread it starts
    /// afterwards) and opens a signalfd for them. Call it before any thread is started.
    pub fn block() -> std::io::Result<StopSignals> {
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        set.add(Signal::SIGINT);
        set.thread_block()?;
        let fd = SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        Ok(StopSignals { fd })
    }

    /// The signal that arrived, if one did (never blocks).
    pub fn take(&self) -> Option<StopSignal> {
        match self.fd.read_signal() {
            Ok(Some(info)) => match i32::try_from(info.ssi_signo).ok()? {
                libc::SIGTERM => Some(StopSignal::Term),
                libc::SIGINT => Some(StopSignal::Int),
                _ => None,
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "reading the stop signalfd");
                None
            }
        }
    }
}

impl AsFd for StopSignals {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
