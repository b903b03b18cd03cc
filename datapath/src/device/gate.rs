//! Where the workers of a paused device wait for the decision to go (at which positions) or
//! to abort.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::pair::PairPositions;

/// What paused workers wait for.
#[derive(Clone, Debug)]
pub(super) enum Decision {
    Go(Option<Arc<Vec<PairPositions>>>),
    Abort,
}

#[derive(Debug, Default)]
pub(super) struct Gate {
    decision: Mutex<Option<Decision>>,
    cond: Condvar,
    /// Set by [`PausedDevice::arm`]: the decision is imminent; wait spinning, not sleeping.
    armed: AtomicBool,
    /// Realtime workers wake fast and must not spin (they would starve the thread that is
    /// about to decide).
    no_spin: bool,
    decided: AtomicBool,
}

/// How long armed workers spin for the decision before they sleep again.
const ARMED_SPIN: Duration = Duration::from_millis(2);

impl Gate {
    /// A gate nobody decided yet; `no_spin` for realtime workers (see the field).
    pub(super) fn new(no_spin: bool) -> Gate {
        Gate {
            no_spin,
            ..Gate::default()
        }
    }

    pub(super) fn wait(&self) -> Decision {
        let mut spun = false;
        loop {
            let d = self.decision.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(decision) = &*d {
                return decision.clone();
            }
            if self.armed.load(Ordering::Acquire) && !spun && !self.no_spin {
                drop(d);
                spun = true;
                let until = Instant::now() + ARMED_SPIN;
                // Yielding, not pure spinning: on a small machine the thread that will send
                // the decision may need this CPU.
                while !self.decided.load(Ordering::Acquire) && Instant::now() < until {
                    std::thread::yield_now();
                }
                continue;
            }
            let _d = self.cond.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub(super) fn arm(&self) {
        let _d = self.decision.lock().unwrap_or_else(|e| e.into_inner());
        self.armed.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    pub(super) fn decide(&self, decision: Decision) {
        *self.decision.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision);
        self.decided.store(true, Ordering::Release);
        self.cond.notify_all();
    }
}
