//! The run harness every peer shares: when it stops ([`RunControl`]), what it reports
//! ([`PeerStats`]), the thread it runs on ([`PeerHandle`]) and the pacing of senders.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tapir_testkit::cpu;

use super::{io_err, PeerError};

/// When a peer stops, and where it runs.
#[derive(Debug, Clone)]
pub struct RunControl {
    /// Stop when this becomes true (checked once per batch / receive timeout).
    pub stop: Arc<AtomicBool>,
    /// Stop after this much wall time.
    pub duration: Option<Duration>,
    /// Stop after this many packets.
    pub max_packets: Option<u64>,
    /// Pin the peer thread to this CPU (only for `spawn`, or when `run`
    /// is called and pinning is wanted on the current thread).
    pub cpu: Option<usize>,
}

impl RunControl {
    /// Runs until `stop` is set.
    #[must_use]
    pub fn new(stop: Arc<AtomicBool>) -> Self {
        Self {
            stop,
            duration: None,
            max_packets: None,
            cpu: None,
        }
    }

    /// Runs for `d` (or until a fresh, private stop flag is set).
    #[cfg(test)]
    #[must_use]
    pub fn for_duration(d: Duration) -> Self {
        Self::new(Arc::new(AtomicBool::new(false))).with_duration(d)
    }

    /// Sets the duration limit.
    #[cfg(test)]
    #[must_use]
    pub fn with_duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }

    /// Sets the packet budget.
    #[cfg(test)]
    #[must_use]
    pub fn with_max_packets(mut self, n: u64) -> Self {
        self.max_packets = Some(n);
        self
    }

    /// Sets the CPU to pin to.
    #[must_use]
    pub fn with_cpu(mut self, cpu: usize) -> Self {
        self.cpu = Some(cpu);
        self
    }
}

/// Tracks start time, deadline and CPU time of a peer loop.
pub(super) struct Clock {
    pub(super) start: Instant,
    pub(super) deadline: Option<Instant>,
    pub(super) cpu0: Duration,
}

impl Clock {
    pub(super) fn start(ctl: &RunControl) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: ctl.duration.map(|d| start + d),
            cpu0: cpu::thread_cpu_time(),
        }
    }

    pub(super) fn done(&self, ctl: &RunControl, packets: u64) -> bool {
        ctl.stop.load(Ordering::Relaxed)
            || ctl.max_packets.is_some_and(|m| packets >= m)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    pub(super) fn finish(&self, stats: &mut PeerStats) {
        stats.elapsed = self.start.elapsed();
        stats.cpu_time = cpu::thread_cpu_time().saturating_sub(self.cpu0);
    }
}

/// Counters common to all peers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PeerStats {
    /// Packets sent / received (for GSO sends: wire-size segments).
    pub packets: u64,
    /// Payload-carrying bytes: Ethernet frame bytes for the generator, UDP
    /// payload bytes for UDP peers.
    pub bytes: u64,
    /// Wall time of the loop.
    pub elapsed: Duration,
    /// CPU time of the peer thread during the loop.
    pub cpu_time: Duration,
    /// Times the kernel pushed back (`EAGAIN` / `ENOBUFS`).
    pub backpressure: u64,
    /// Other failed calls.
    pub errors: u64,
}

impl PeerStats {
    /// Packets per second over `elapsed`.
    #[must_use]
    pub fn pps(&self) -> f64 {
        rate(self.packets, self.elapsed)
    }

    /// Fraction of one CPU used (`cpu_time / elapsed`); near 1.0 means the
    /// peer itself is likely the bottleneck.
    #[must_use]
    pub fn cpu_utilization(&self) -> f64 {
        if self.elapsed.is_zero() {
            return 0.0;
        }
        self.cpu_time.as_secs_f64() / self.elapsed.as_secs_f64()
    }
}

#[allow(clippy::cast_precision_loss, reason = "rates are approximate")]
pub(super) fn rate(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// A peer running on its own thread.
#[derive(Debug)]
pub struct PeerHandle<R> {
    handle: JoinHandle<Result<R, PeerError>>,
    stop: Arc<AtomicBool>,
}

impl<R> PeerHandle<R> {
    /// Asks the peer to stop (it notices within one batch / receive timeout).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Waits for the peer and returns its report.
    ///
    /// # Errors
    /// The peer's error, or [`PeerError::Panicked`].
    pub fn join(self) -> Result<R, PeerError> {
        self.handle.join().map_err(|_| PeerError::Panicked)?
    }

    /// [`stop`](Self::stop) then [`join`](Self::join).
    ///
    /// # Errors
    /// As [`join`](Self::join).
    pub fn stop_and_join(self) -> Result<R, PeerError> {
        self.stop();
        self.join()
    }
}

pub(super) fn spawn_peer<R: Send + 'static>(
    name: &str,
    ctl: &RunControl,
    f: impl FnOnce() -> Result<R, PeerError> + Send + 'static,
) -> Result<PeerHandle<R>, PeerError> {
    let cpu = ctl.cpu;
    let handle = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            cpu::maybe_pin(cpu).map_err(io_err("pinning the peer thread"))?;
            f()
        })
        .map_err(io_err("spawning the peer thread"))?;
    Ok(PeerHandle {
        handle,
        stop: Arc::clone(&ctl.stop),
    })
}

/// Paces a sender at `pps`: how many packets may go now, at most `batch`;
/// sleeps (or spins when close) until at least one may.
pub(super) struct Pacer {
    pub(super) pps: Option<u64>,
    pub(super) start: Instant,
}

impl Pacer {
    pub(super) fn allowance(&self, sent: u64, batch: usize, deadline: Option<Instant>) -> usize {
        let Some(pps) = self.pps.filter(|&p| p > 0) else {
            return batch;
        };
        loop {
            let el = self.start.elapsed();
            let due_total = u128::from(pps) * el.as_nanos() / 1_000_000_000;
            let due_total = u64::try_from(due_total).unwrap_or(u64::MAX);
            let due = due_total.saturating_sub(sent);
            if due > 0 {
                return usize::try_from(due).unwrap_or(batch).min(batch);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return 0;
            }
            let next_ns = u128::from(sent + 1) * 1_000_000_000 / u128::from(pps);
            let wait = next_ns.saturating_sub(el.as_nanos());
            if wait > 100_000 {
                // Sleep in bounded steps so stop flags stay responsive.
                let w = u64::try_from(wait.min(20_000_000)).unwrap_or(20_000_000);
                std::thread::sleep(Duration::from_nanos(w - 50_000));
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// How long a blocking receive waits before re-checking stop conditions.
pub(super) const RECV_POLL: Duration = Duration::from_millis(20);
