//! Engines move bytes between a queue pair's rings and its TAP queue. Both run one queue pair
//! on one thread and share all device logic ([`crate::pair`]); they differ only in how they
//! talk to the kernel:
//!
//! - `uring`: one io_uring per worker; TX chains become `Writev` SQEs submitted as a batch,
//!   RX chains are posted as `Readv`s that the kernel completes when frames arrive, kicks are
//!   pending reads on the kick eventfds and interrupts are `Write`s on the call eventfds that
//!   ride along with the next submit.
//! - `classic`: epoll plus one `readv`/`writev` syscall per chain, the design of QEMU,
//!   Firecracker and Cloud Hypervisor; the fallback where io_uring is disabled and the baseline
//!   of every benchmark.

mod classic;
mod uring;

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::str::FromStr;

use crate::pair::QueuePair;
use crate::tap::TapQueue;

/// Which engine a worker runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EngineKind {
    /// io_uring, batched.
    Uring,
    /// epoll + readv/writev.
    Classic,
}

impl fmt::Display for EngineKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            EngineKind::Uring => "uring",
            EngineKind::Classic => "classic",
        })
    }
}

impl FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "uring" => Ok(EngineKind::Uring),
            "classic" => Ok(EngineKind::Classic),
            other => Err(format!("unknown engine {other:?} (uring or classic)")),
        }
    }
}

/// A failure a test can make a running worker suffer ([`crate::Device::inject_fault`]): the
/// only way to see a worker fail on purpose, since a correct worker does not. Not for
/// production use.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerFault {
    /// The worker panics.
    Panic,
    /// The worker's engine returns an error.
    Error,
}

impl WorkerFault {
    /// The value written to the worker's stop eventfd to inject the fault (a plain stop writes
    /// 1; these cannot be sums of a few stops).
    pub(crate) const fn stop_value(self) -> u64 {
        match self {
            WorkerFault::Panic => 0x7a91_0000_0000_0001,
            WorkerFault::Error => 0x7a91_0000_0000_0002,
        }
    }

    /// The fault a stop eventfd's value asks for, if any.
    pub(crate) fn from_stop_value(v: u64) -> Option<WorkerFault> {
        [WorkerFault::Panic, WorkerFault::Error]
            .into_iter()
            .find(|f| f.stop_value() == v)
    }
}

/// Tunables of an engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineConfig {
    /// TX writes in flight at most (uring) / chains per TX burst (classic).
    pub tx_depth: usize,
    /// TAP reads posted at most (uring) / reads per RX burst (classic).
    pub rx_depth: usize,
    /// Start workers under `SCHED_FIFO` at this priority (1-99): a parked worker woken for a
    /// handoff's resume then preempts ordinary threads at once, which bounds its wake-up
    /// latency on a busy machine. From its first used entry on, the worker is an ordinary
    /// thread again: a worker that stays busy under load at `SCHED_FIFO` starved the
    /// traffic's own threads on 2 CPUs (issue 10). None: ordinary scheduling.
    pub realtime_priority: Option<u8>,
    /// Busy polling (opt-in, the userspace twin of vhost-net's
    /// `VHOST_SET_VRING_BUSYLOOP_TIMEOUT`): after its last work, a worker polls its rings
    /// and the TAP for up to this long before it sleeps, so that the next packet finds it
    /// awake (no wake-up latency) at the price of a CPU spinning meanwhile. Counted in
    /// `busy_poll_rounds` and `busy_poll_found`. None: sleep at once.
    pub busy_poll: Option<std::time::Duration>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            tx_depth: 256,
            rx_depth: 64,
            realtime_priority: None,
            busy_poll: None,
        }
    }
}

/// Errors that stop a worker.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be set up (io_uring disabled, epoll failure, ...).
    #[error("{engine} engine set-up failed: {source}")]
    Setup {
        /// Which engine.
        engine: EngineKind,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The engine panicked (a bug in tapir), caught at the engine's or the worker's edge.
    #[error("{engine} engine panicked: {message}")]
    Panicked {
        /// Which engine.
        engine: EngineKind,
        /// The panic's message.
        message: String,
    },
    /// A syscall the loop depends on failed.
    #[error("{engine} engine: {what} failed: {source}")]
    Io {
        /// Which engine.
        engine: EngineKind,
        /// Which call.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// An engine runs a queue pair until its stop eventfd is signalled, then quiesces: it stops
/// popping, waits for every TAP write in flight, cancels or completes every TAP read in flight
/// (the guest buffers of cancelled reads stay in the pair's spare list, in ring order) and
/// returns with no I/O outstanding.
pub trait Engine: Send {
    /// Which engine this is.
    fn kind(&self) -> EngineKind;
    /// Runs the queue pair, moving its frames through `tap`, until `stop` is signalled.
    /// `ready` is called once the engine is set up, before it touches a ring or posts any I/O;
    /// it may still reposition the pair (a handoff successor learns the ring positions only
    /// at the switch). When it returns false the engine returns at once without servicing
    /// anything (a successor whose handoff was called off).
    fn run(
        &mut self,
        pair: &mut QueuePair,
        tap: &TapQueue,
        stop: &OwnedFd,
        ready: &mut dyn FnMut(&mut QueuePair) -> bool,
    ) -> Result<Leftovers, EngineError>;
}

/// What an engine leaves behind after a clean stop (its ring, buffers, epoll fd). Nothing in
/// it is in use any more; it is handed back instead of dropped so that tearing it down
/// (unmapping buffers, closing an io_uring, which the kernel finishes asynchronously) happens
/// after a handoff's blackout rather than inside it.
pub struct Leftovers(pub Option<Box<dyn std::any::Any + Send>>);

impl std::fmt::Debug for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "Leftovers(..)"
        } else {
            "Leftovers(none)"
        })
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Builds an engine.
pub fn new_engine(kind: EngineKind, cfg: EngineConfig) -> Box<dyn Engine> {
    match kind {
        EngineKind::Uring => Box::new(uring::UringEngine::new(cfg)),
        EngineKind::Classic => Box::new(classic::ClassicEngine::new(cfg)),
    }
}

/// True when this process may create an io_uring (not disabled by sysctl or seccomp).
pub fn uring_available() -> bool {
    io_uring::IoUring::new(2).is_ok()
}
