//! Where a stopping worker leaves its pair, and how the stopping thread picks it up: the
//! blocking join, or (opt-in, [`QUIESCE_SPIN_ENV`]) a bounded spin on a flag first. The spin
//! saves the cross-CPU wake-up of the join when the worker finishes within the budget, but on
//! the 2-CPU machine under handoff traffic it made the quiesce slower (p50 +100-300 us,
//! docs/HANDOFF.md "A worker at a stop"): the spinning thread takes the CPU the worker, the
//! guest and the traffic need. So the default is no spin; the flag stays for re-measuring on
//! other machines (issue 10, item 2).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::engine::{EngineError, Leftovers};
use crate::pair::QueuePair;
use crate::tap::TapQueue;

/// What a worker hands back when it ends.
pub(super) type WorkerEnd = (QueuePair, TapQueue, Result<Leftovers, EngineError>);

/// The hidden environment variable that sets the spin budget in microseconds (unset or 0:
/// join at once; for A/B measurements).
const QUIESCE_SPIN_ENV: &str = "TAPIR_QUIESCE_SPIN_US";

/// How long the stopping thread spins for a worker's hand-back before it joins, by default:
/// not at all (measured slower on 2 CPUs, see the module's comment).
const DEFAULT_SPIN: Duration = Duration::ZERO;

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

/// A worker's end, shared by the worker and the thread that stops it.
#[derive(Default)]
pub(super) struct Handback {
    done: AtomicBool,
    slot: Mutex<Option<WorkerEnd>>,
}

impl Handback {
    /// The worker's last step: leaves its pair here.
    pub(super) fn put(&self, end: WorkerEnd) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(end);
        self.done.store(true, Ordering::Release);
    }

    fn take(&self) -> Option<WorkerEnd> {
        self.slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Waits for the worker's end: spins (bounded, never at a realtime policy) while the
    /// worker finishes, then joins. Returns the end (None: the thread died without one)
    /// and the thread still to be joined (it has handed back and is exiting).
    pub(super) fn wait(
        &self,
        thread: JoinHandle<()>,
    ) -> (Option<WorkerEnd>, Option<JoinHandle<()>>) {
        self.wait_spinning(thread, spin_budget())
    }

    fn wait_spinning(
        &self,
        thread: JoinHandle<()>,
        budget: Duration,
    ) -> (Option<WorkerEnd>, Option<JoinHandle<()>>) {
        if !budget.is_zero() && !caller_is_realtime() {
            let until = Instant::now() + budget;
            loop {
                if self.done.load(Ordering::Acquire) {
                    return (self.take(), Some(thread));
                }
                if Instant::now() >= until {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let _ = thread.join();
        (self.take(), None)
    }
}

/// A worker thread that handed its pair back and is exiting: joined when dropped (after a
/// handoff's blackout, or at a resume), so that no thread outlives its device.
#[derive(Debug, Default)]
pub(super) struct Exiting(Option<JoinHandle<()>>);

impl Exiting {
    pub(super) fn new(thread: Option<JoinHandle<()>>) -> Exiting {
        Exiting(thread)
    }
}

impl Drop for Exiting {
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A thread that hands nothing back (its end is never put) and exits.
    fn exiting_thread(h: &Arc<Handback>, put: bool) -> JoinHandle<()> {
        let h = h.clone();
        std::thread::spawn(move || {
            if put {
                h.done.store(true, Ordering::Release);
            }
        })
    }

    #[test]
    fn a_thread_that_ends_without_handing_back_is_joined_within_or_after_the_spin() {
        for budget in [Duration::ZERO, Duration::from_millis(50)] {
            let h = Arc::new(Handback::default());
            let (end, thread) = h.wait_spinning(exiting_thread(&h, false), budget);
            assert!(end.is_none(), "{budget:?}");
            assert!(
                thread.is_none(),
                "{budget:?}: joined after the spin ran out"
            );
        }
    }

    #[test]
    fn a_hand_back_within_the_spin_leaves_the_thread_to_be_joined_later() {
        let h = Arc::new(Handback::default());
        let t = exiting_thread(&h, true);
        let (_, thread) = h.wait_spinning(t, Duration::from_secs(5));
        assert!(thread.is_some(), "seen by the spin, not by the join");
        drop(Exiting::new(thread));
    }
}
