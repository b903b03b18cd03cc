//! What one row of a report measures: an engine, and the busy-poll budget its workers run with
//! (`--busy-poll-us`). Budgets apply where latency and CPU per packet are the question (the
//! latency scenario, the 64-byte tx, tx-drop and rx cells), to the engines that have workers
//! (tapir's and a vhost-user backend); the floor has none and runs once.

use std::time::Duration;

use super::{BenchEngine, BenchOptions, Scenario};

/// An engine at a busy-poll budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Variant {
    pub(crate) engine: BenchEngine,
    /// Microseconds; 0: off.
    pub(crate) busy_poll_us: u64,
}

impl Variant {
    /// The row's engine label: the engine's name, with `+bpN` for a budget of N µs
    /// (`uring+bp50`); without a budget the plain name, as before budgets existed.
    pub(crate) fn label(self) -> String {
        match self.busy_poll_us {
            0 => self.engine.name(),
            us => format!("{}+bp{us}", self.engine.name()),
        }
    }

    /// The budget as the engine takes it (None: off).
    pub(crate) fn busy_poll(self) -> Option<Duration> {
        (self.busy_poll_us > 0).then(|| Duration::from_micros(self.busy_poll_us))
    }
}

/// Whether a throughput cell runs at every budget (else at 0 only).
fn cell_takes_budgets(scenario: Scenario, frame: usize) -> bool {
    frame == 64 && matches!(scenario, Scenario::Tx | Scenario::TxDrop | Scenario::Rx)
}

/// The rows of a cell (`None`: the latency scenario), in the engines' order, each engine's
/// budgets together.
pub(crate) fn variants(opts: &BenchOptions, cell: Option<(Scenario, usize)>) -> Vec<Variant> {
    let budgets: &[u64] = match cell {
        Some((s, f)) if !cell_takes_budgets(s, f) => &[0],
        _ if opts.busy_poll_us.is_empty() => &[0],
        _ => &opts.busy_poll_us,
    };
    let mut out = Vec::new();
    for &engine in &opts.engines {
        match engine {
            BenchEngine::Floor => out.push(Variant {
                engine,
                busy_poll_us: 0,
            }),
            BenchEngine::Datapath(_) | BenchEngine::VhostUser => {
                out.extend(budgets.iter().map(|&busy_poll_us| Variant {
                    engine,
                    busy_poll_us,
                }));
            }
        }
    }
    out
}
