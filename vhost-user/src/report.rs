//! The live report of `tapir serve` (what `tapir ctl PATH stats` and `GET /metrics` show), as
//! a board the serve loop writes and the report server ([`crate::report_server`]) reads.
//!
//! The serve loop publishes a [`Snapshot`] after every request and every wake-up: the
//! report's slow-moving part as JSON (session, handoffs, daemon counters) and where each queue
//! pair's counters live (the workers' published atomics, plus the totals of devices already
//! stopped). A reader composes the report from the latest snapshot and the atomics' current
//! values, so counters are live while the serve loop never waits for a reader, and a reader
//! never waits for the serve loop (only for the board's lock, held to copy a snapshot).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;
use tapir_datapath::Counters;
use tapir_datapath::QueuePairStats;

/// Where each queue pair's counters are: totals of devices already stopped plus the running
/// device's live counters.
#[derive(Clone, Debug, Default)]
pub struct CounterSources {
    /// Per queue pair, what stopped devices counted.
    pub stopped: Vec<Counters>,
    /// The running device's workers: (queue pair, its published counters).
    pub live: Vec<(u16, Arc<QueuePairStats>)>,
}

impl CounterSources {
    /// Each queue pair's counters now.
    pub fn read(&self) -> Vec<Counters> {
        let mut all = self.stopped.clone();
        for (p, stats) in &self.live {
            if let Some(total) = all.get_mut(usize::from(*p)) {
                total.add(&stats.counters.snapshot());
            }
        }
        all
    }
}

/// What the serve loop publishes.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The report without `queue_pairs` (an object).
    pub base: Value,
    /// Where the queue pairs' counters are.
    pub counters: CounterSources,
    /// The queue pairs running.
    pub running: Vec<u16>,
}

/// The board: the latest snapshot, shared between the serve loop and the report server, and
/// the report server's own counters.
#[derive(Clone, Debug, Default)]
pub struct Board {
    snapshot: Arc<Mutex<Option<Snapshot>>>,
    clients: Arc<ClientCounters>,
}

/// What the report server counts of its clients.
#[derive(Debug, Default)]
struct ClientCounters {
    /// Cut off at their deadline, or for a request too long or malformed.
    cut_off: AtomicU64,
    /// Closed at accept: too many at once.
    refused: AtomicU64,
}

impl Board {
    /// Replaces the snapshot.
    pub fn publish(&self, snapshot: Snapshot) {
        *self.snapshot.lock().unwrap_or_else(PoisonError::into_inner) = Some(snapshot);
    }

    /// Counts `n` report clients cut off.
    pub fn count_cut_off(&self, n: usize) {
        if n > 0 {
            self.clients.cut_off.fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Counts a report client refused at accept.
    pub fn count_refused(&self) {
        self.clients.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// The report now: the latest snapshot with the queue pairs' current counters.
    pub fn report(&self) -> Value {
        let snapshot = self
            .snapshot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(s) = snapshot else {
            return serde_json::json!({ "error": "the daemon has not published a report yet" });
        };
        let mut report = s.base;
        if let Value::Object(fields) = &mut report {
            fields.insert(
                "queue_pairs".into(),
                crate::control::queue_pairs(&s.counters.read(), &s.running),
            );
            if let Some(Value::Object(daemon)) = fields.get_mut("daemon") {
                let c = &self.clients;
                daemon.insert(
                    "report_clients_cut_off".into(),
                    c.cut_off.load(Ordering::Relaxed).into(),
                );
                daemon.insert(
                    "report_clients_refused".into(),
                    c.refused.load(Ordering::Relaxed).into(),
                );
            }
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_adds_live_counters_to_the_stopped_totals() {
        let board = Board::default();
        assert!(board.report().get("error").is_some());
        let live = Arc::new(QueuePairStats::default());
        let stopped = Counters {
            tx_packets: 5,
            ..Counters::default()
        };
        board.publish(Snapshot {
            base: serde_json::json!({ "pid": 1 }),
            counters: CounterSources {
                stopped: vec![Counters::default(), stopped],
                live: vec![(1, live.clone())],
            },
            running: vec![1],
        });
        live.counters.publish(&Counters {
            tx_packets: 2,
            ..Counters::default()
        });
        let r = board.report();
        assert_eq!(r["pid"], 1);
        assert_eq!(r["queue_pairs"][1]["tx"]["packets"], 7, "{r}");
        assert_eq!(r["queue_pairs"][1]["running"], true, "{r}");
        assert_eq!(r["queue_pairs"][0]["tx"]["packets"], 0, "{r}");
        // Live: a later publication by the worker shows without a new snapshot.
        live.counters.publish(&Counters {
            tx_packets: 4,
            ..Counters::default()
        });
        assert_eq!(board.report()["queue_pairs"][1]["tx"]["packets"], 9);
    }
}
