//! Where a stopping worker leaves its pair, and how the stopping thread picks it up.
//!
//! The worker hands its pair back and then stays parked until the stopping side is done
//! with it ([`Exiting`] is dropped: after a handoff's blackout, or at a resume); only then
//! does it drop its engine and exit. The stopping thread waits for the hand-back itself (a
//! condvar the hand-back signals), not for the thread's exit: joining the thread there put
//! the exit inside the blackout (the engine's drop, the kernel's per-task io_uring clean-up,
//! the exit's futex wake-up), measured on the 2-CPU machine under 100 kpps each way at p50
//! 111 µs, p90 179 µs, p99 256 µs between the hand-back and the join's return (issue 10,
//! item 2; docs/HANDOFF.md "A worker at a stop").
//!
//! Before the wait, a bounded spin on a flag is there opt-in ([`QUIESCE_SPIN_ENV`]): it saves
//! the cross-CPU wake-up when the worker finishes within the budget, but on the 2-CPU machine
//! under handoff traffic it made the quiesce slower (p50 +100-300 µs): the spinning thread
//! takes the CPU the worker, the guest and the traffic need. So the default is no spin; the
//! flag stays for re-measuring on other machines.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{EngineError, Leftovers};
use crate::pair::QueuePair;
use crate::tap::TapQueue;

/// What a worker hands back when it ends.
pub(super) type WorkerEnd = (QueuePair, TapQueue, Result<Leftovers, EngineError>);

/// The hidden environment variable that sets the spin budget in microseconds (unset or 0:
/// wait at once; for A/B measurements).
const QUIESCE_SPIN_ENV: &str = "TAPIR_QUIESCE_SPIN_US";

/// How long the stopping thread spins for a worker's hand-back before it waits, by default:
/// not at all (measured slower on 2 CPUs, see the module's comment).
const DEFAULT_SPIN: Duration = Duration::ZERO;

/// How often a waiting stopper looks whether the worker died without handing back (it
/// catches panics, so only an abort-like end does; a hand-back wakes the waiter at once).
const DEATH_CHECK: Duration = Duration::from_millis(10);

fn spin_budget() -> Duration {
    static BUDGET: OnceLock<Duration> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var(QUIESCE_SPIN_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(DEFAULT_SPIN, Duration::from_micros)
    })
}

/// True when the calling thread runs under a realtime policy: it must not spin (it would
/// keep the worker it waits for off a CPU it shares).
fn caller_is_realtime() -> bool {
    // SAFETY: a plain syscall about the calling thread, no pointers.
    let policy = unsafe { libc::sched_getscheduler(0) };
    policy == libc::SCHED_FIFO || policy == libc::SCHED_RR
}

/// What the worker and its stopper share under the lock.
struct Shared<T> {
    /// The worker's end, until the stopper takes it.
    end: Option<T>,
    /// The stopper is done with the worker: it may drop its engine and exit.
    released: bool,
}

/// A worker's end (a [`WorkerEnd`]; anything in the unit tests), shared by the worker and
/// the thread that stops it.
pub(super) struct Handback<T = WorkerEnd> {
    /// Set with the hand-back, for the opt-in spin (no lock taken while spinning).
    done: AtomicBool,
    shared: Mutex<Shared<T>>,
    /// Signalled at the hand-back (for the stopper) and at the release (for the worker).
    changed: Condvar,
}

impl<T> Default for Handback<T> {
    fn default() -> Self {
        Handback {
            done: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                end: None,
                released: false,
            }),
            changed: Condvar::new(),
        }
    }
}

impl<T> Handback<T> {
    fn lock(&self) -> MutexGuard<'_, Shared<T>> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The worker's last step: leaves its pair here, wakes the stopper, and returns only
    /// when the stopper released it (its [`Exiting`] dropped), so that what the worker
    /// drops after this and its thread's exit happen then, not inside a blackout.
    pub(super) fn put_and_park(&self, end: T) {
        let mut shared = self.lock();
        shared.end = Some(end);
        self.done.store(true, Ordering::Release);
        self.changed.notify_all();
        while !shared.released {
            shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn release(&self) {
        self.lock().released = true;
        self.changed.notify_all();
    }

    /// Waits for the worker's end: spins (bounded, opt-in, never at a realtime policy),
    /// then sleeps until the hand-back. Returns the end (None: the thread died without one)
    /// and the worker, parked until the returned [`Exiting`] is dropped.
    pub(super) fn wait(self: &Arc<Self>, thread: JoinHandle<()>) -> (Option<T>, Exiting<T>) {
        self.wait_spinning(thread, spin_budget())
    }

    fn wait_spinning(
        self: &Arc<Self>,
        thread: JoinHandle<()>,
        budget: Duration,
    ) -> (Option<T>, Exiting<T>) {
        if !budget.is_zero() && !caller_is_realtime() {
            let until = Instant::now() + budget;
            while !self.done.load(Ordering::Acquire) && Instant::now() < until {
                std::hint::spin_loop();
            }
        }
        let mut shared = self.lock();
        loop {
            if let Some(end) = shared.end.take() {
                drop(shared);
                return (Some(end), Exiting::parked(thread, self.clone()));
            }
            if thread.is_finished() {
                // Ended without a hand-back (the worker catches panics, so this is an
                // abort-like end): nothing to release, the join returns at once.
                drop(shared);
                let _ = thread.join();
                return (None, Exiting::default());
            }
            shared = self
                .changed
                .wait_timeout(shared, DEATH_CHECK)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A worker thread that handed its pair back and is parked: released and joined when
/// dropped (after a handoff's blackout, or at a resume), so that no thread outlives its
/// device.
pub(super) struct Exiting<T = WorkerEnd> {
    thread: Option<JoinHandle<()>>,
    handback: Option<Arc<Handback<T>>>,
}

impl<T> Default for Exiting<T> {
    fn default() -> Self {
        Exiting {
            thread: None,
            handback: None,
        }
    }
}

impl<T> std::fmt::Debug for Exiting<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.thread.is_some() {
            "Exiting(parked)"
        } else {
            "Exiting(joined)"
        })
    }
}

impl<T> Exiting<T> {
    fn parked(thread: JoinHandle<()>, handback: Arc<Handback<T>>) -> Exiting<T> {
        Exiting {
            thread: Some(thread),
            handback: Some(handback),
        }
    }
}

impl<T> Drop for Exiting<T> {
    fn drop(&mut self) {
        if let Some(h) = self.handback.take() {
            h.release();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A worker that hands back `end` (or nothing) and then counts its exit in `exited`.
    fn worker(
        h: &Arc<Handback<u32>>,
        end: Option<u32>,
        exited: &Arc<AtomicUsize>,
    ) -> JoinHandle<()> {
        let (h, exited) = (h.clone(), exited.clone());
        std::thread::spawn(move || {
            if let Some(end) = end {
                h.put_and_park(end);
            }
            exited.fetch_add(1, Ordering::SeqCst);
        })
    }

    #[test]
    fn a_thread_that_ends_without_handing_back_is_joined() {
        for budget in [Duration::ZERO, Duration::from_millis(50)] {
            let h = Arc::new(Handback::<u32>::default());
            let exited = Arc::new(AtomicUsize::new(0));
            let (end, thread) = h.wait_spinning(worker(&h, None, &exited), budget);
            assert!(end.is_none(), "{budget:?}");
            assert!(thread.thread.is_none(), "{budget:?}: joined");
            assert_eq!(exited.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn the_stopper_gets_the_end_while_the_worker_stays_parked_until_released() {
        for budget in [Duration::ZERO, Duration::from_secs(5)] {
            let h = Arc::new(Handback::<u32>::default());
            let exited = Arc::new(AtomicUsize::new(0));
            let (end, parked) = h.wait_spinning(worker(&h, Some(7), &exited), budget);
            assert_eq!(end, Some(7), "{budget:?}");
            // The wait returned on the hand-back, not on the thread's exit: the worker is
            // still there, and stays until it is released.
            std::thread::sleep(Duration::from_millis(20));
            assert_eq!(
                exited.load(Ordering::SeqCst),
                0,
                "{budget:?}: exited unreleased"
            );
            assert!(
                parked.thread.as_ref().is_some_and(|t| !t.is_finished()),
                "{budget:?}"
            );
            drop(parked);
            assert_eq!(
                exited.load(Ordering::SeqCst),
                1,
                "{budget:?}: released and joined"
            );
        }
    }
}
