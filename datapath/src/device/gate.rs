//! Where the workers of a paused device wait for the decision to go (at which positions) or
//! to abort, and where the first of them may make that decision itself ([`Decider`]).

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

/// What decides, on the thread of the first worker at the gate, whether a paused device runs:
/// the positions to run at (one entry per queue pair, validated), or `None` to end the
/// workers without servicing anything. A handoff successor's decider waits for the switch,
/// checks it and claims the device; the worker that ran it services its rings right after,
/// without the sleep and cross-CPU wake-up that a decision made on another thread costs.
pub type Decider = Box<dyn FnOnce() -> Option<Vec<PairPositions>> + Send>;

#[derive(Default)]
struct GateState {
    decision: Option<Decision>,
    /// Installed by [`Gate::decide_by`], taken by the first worker that sees it.
    decider: Option<Decider>,
}

impl std::fmt::Debug for GateState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GateState")
            .field("decision", &self.decision)
            .field("decider", &self.decider.is_some())
            .finish()
    }
}

#[derive(Debug, Default)]
pub(super) struct Gate {
    state: Mutex<GateState>,
    cond: Condvar,
    /// Set by [`PausedDevice::arm`]: the decision is imminent; wait spinning, not sleeping.
    armed: AtomicBool,
    /// Realtime workers wake fast and must not spin (they would starve the thread that is
    /// about to decide).
    no_spin: bool,
    /// A decision or a decider arrived: an armed worker stops spinning and looks.
    news: AtomicBool,
}

/// How often the thread that installed a decider looks whether it decided.
const DECIDED_POLL: Duration = Duration::from_millis(1);

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

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker's wait: returns the decision, made by another thread or, if a decider is
    /// installed and no other worker took it, by running it here.
    pub(super) fn wait(&self) -> Decision {
        let mut spun = false;
        loop {
            let mut d = self.lock();
            if let Some(decision) = &d.decision {
                return decision.clone();
            }
            if let Some(decider) = d.decider.take() {
                drop(d);
                return self.run_decider(decider);
            }
            if self.armed.load(Ordering::Acquire) && !spun && !self.no_spin {
                drop(d);
                spun = true;
                let until = Instant::now() + ARMED_SPIN;
                // Yielding, not pure spinning: on a small machine the thread that will send
                // the decision may need this CPU.
                while !self.news.load(Ordering::Acquire) && Instant::now() < until {
                    std::thread::yield_now();
                }
                continue;
            }
            let _d = self.cond.wait(d).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Runs a decider on this worker's thread and publishes what it decided (a panic in it
    /// decides `Abort`: the workers end, nothing was touched).
    fn run_decider(&self, decider: Decider) -> Decision {
        let decision = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decider)) {
            Ok(Some(positions)) => Decision::Go(Some(Arc::new(positions))),
            Ok(None) => Decision::Abort,
            Err(_) => {
                tracing::error!("the start gate's decider panicked: not running");
                Decision::Abort
            }
        };
        self.decide(decision.clone());
        decision
    }

    /// Installs a decider for the first worker at the gate (see [`Decider`]). With no
    /// worker to run it (a device without queue pairs), it runs here.
    pub(super) fn decide_by(&self, decider: Decider, workers: usize) {
        if workers == 0 {
            self.run_decider(decider);
            return;
        }
        self.lock().decider = Some(decider);
        self.news.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    /// Waits until the decision was made (by a decider on a worker's thread), looking every
    /// [`DECIDED_POLL`]: not woken by the decision, so that the deciding worker, about to
    /// service its rings, does not wake this thread onto its CPU (measured: a woken waiter
    /// there preempted it, claim -> worker resumed p90 ~100 µs).
    pub(super) fn decided(&self) -> Decision {
        loop {
            if let Some(decision) = &self.lock().decision {
                return decision.clone();
            }
            std::thread::sleep(DECIDED_POLL);
        }
    }

    pub(super) fn arm(&self) {
        let _d = self.lock();
        self.armed.store(true, Ordering::Release);
        self.cond.notify_all();
    }

    pub(super) fn decide(&self, decision: Decision) {
        self.lock().decision = Some(decision);
        self.news.store(true, Ordering::Release);
        self.cond.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;

    /// `n` parked "workers", each returning what the gate told it and its thread.
    fn workers(gate: &Arc<Gate>, n: usize) -> Vec<std::thread::JoinHandle<(Decision, ThreadId)>> {
        (0..n)
            .map(|_| {
                let gate = gate.clone();
                std::thread::spawn(move || (gate.wait(), std::thread::current().id()))
            })
            .collect()
    }

    fn positions(n: u16) -> Vec<PairPositions> {
        (0..n).map(|_| PairPositions::default()).collect()
    }

    #[test]
    fn a_decider_runs_on_one_worker_and_every_worker_follows_it() {
        let gate = Arc::new(Gate::new(false));
        let ws = workers(&gate, 3);
        let ran_on = Arc::new(Mutex::new(Vec::new()));
        let r = ran_on.clone();
        gate.decide_by(
            Box::new(move || {
                r.lock().unwrap().push(std::thread::current().id());
                Some(positions(3))
            }),
            3,
        );
        assert!(matches!(gate.decided(), Decision::Go(Some(p)) if p.len() == 3));
        let ends: Vec<_> = ws.into_iter().map(|w| w.join().unwrap()).collect();
        let ran_on = ran_on.lock().unwrap().clone();
        assert_eq!(ran_on.len(), 1, "run once");
        assert_ne!(
            ran_on[0],
            std::thread::current().id(),
            "not on the caller's thread"
        );
        assert!(
            ends.iter().any(|(_, t)| *t == ran_on[0]),
            "on a worker's thread"
        );
        assert!(ends.iter().all(|(d, _)| matches!(d, Decision::Go(Some(_)))));
    }

    #[test]
    fn a_decider_that_says_no_or_panics_ends_every_worker() {
        let deciders: [Decider; 2] = [Box::new(|| None), Box::new(|| panic!("hostile switch"))];
        for decider in deciders {
            let gate = Arc::new(Gate::new(false));
            let ws = workers(&gate, 2);
            gate.decide_by(decider, 2);
            assert!(matches!(gate.decided(), Decision::Abort));
            for w in ws {
                assert!(matches!(w.join().unwrap().0, Decision::Abort));
            }
        }
    }

    #[test]
    fn an_armed_worker_takes_a_decider_installed_while_it_spins() {
        let gate = Arc::new(Gate::new(false));
        gate.arm();
        let ws = workers(&gate, 1);
        std::thread::sleep(Duration::from_millis(1));
        gate.decide_by(Box::new(|| Some(positions(1))), 1);
        assert!(matches!(gate.decided(), Decision::Go(Some(_))));
        assert!(matches!(
            ws.into_iter().next().unwrap().join().unwrap().0,
            Decision::Go(_)
        ));
    }

    #[test]
    fn without_workers_the_decider_runs_on_the_caller() {
        let gate = Gate::new(false);
        let me = std::thread::current().id();
        gate.decide_by(
            Box::new(move || {
                assert_eq!(std::thread::current().id(), me);
                Some(Vec::new())
            }),
            0,
        );
        assert!(matches!(gate.decided(), Decision::Go(Some(_))));
    }
}
