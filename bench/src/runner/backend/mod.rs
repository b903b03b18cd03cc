//! What a throughput cell measures, behind one [`Backend`] trait: tapir's in-process engines
//! ([`InProcess`]), a vhost-user backend process ([`VhostUser`]) and the raw TAP floor
//! ([`Floor`]). [`measure`] is the one measurement path: the host peers and the backend's load
//! start, a warm-up, a reading, the window, a reading, then everything stops in the same order
//! for every backend and the backend turns its two readings into a [`Sample`].

mod floor;
mod in_process;
mod vhost_user;

use std::time::{Duration, Instant};

use anyhow::Result;
use tapir_simguest::GuestConfig;
use tapir_testkit::{cpu, netns, TAP_NAME};

use super::traffic::{finish_peers, start_traffic, DirFrames};
use super::{bench_features, BenchOptions, Scenario};
use crate::runner::sample::Sample;

pub(super) use floor::Floor;
pub(super) use in_process::InProcess;
pub(super) use vhost_user::VhostUser;

/// The window a backend's sample covers.
pub(super) struct Window<R> {
    /// The cell's direction(s).
    pub(super) scenario: Scenario,
    /// Queue pairs (worker threads).
    pub(super) queues: usize,
    /// The reading after the warm-up, and the one after the window.
    pub(super) first: R,
    pub(super) last: R,
    /// Wall time between the two readings.
    pub(super) elapsed: Duration,
    /// The host peers' summed rate and their highest CPU share.
    pub(super) peer_pps: f64,
    pub(super) peer_cpu: f64,
}

/// Which end of the measured window a reading marks: a backend that counts the bench
/// process's own work (allocations) reads it last when the window opens and first when it
/// closes, so that the readings themselves stay outside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WindowEdge {
    /// The window begins after this reading.
    Opens,
    /// The window ended before this reading.
    Closes,
}

/// One thing a throughput cell measures, set up for that cell (its TAP exists, in the
/// benchmark's namespace).
pub(super) trait Backend {
    /// What the backend's counters say at one moment.
    type Reading;

    /// The MAC of the TAP's host side (the address host peers send to or hear from).
    fn host_mac(&self) -> [u8; 6];

    /// Starts moving the scenario's frames: the simulated guest's threads, or the floor's own
    /// I/O threads.
    fn start(&mut self, dirs: &DirFrames) -> Result<()>;

    /// Reads the counters now, at `edge` of the window.
    fn read(&self, edge: WindowEdge) -> Self::Reading;

    /// Stops moving frames.
    fn stop(&mut self) -> Result<()>;

    /// Tears the backend down and turns the window's readings into its sample.
    fn finish(self, window: Window<Self::Reading>) -> Result<Sample>;
}

/// Measures one cell on `backend`: the same steps, in the same order, for every backend.
pub(super) fn measure<B: Backend>(
    mut backend: B,
    scenario: Scenario,
    frame: usize,
    queues: usize,
    opts: &BenchOptions,
) -> Result<Sample> {
    let (dirs, peers) = start_traffic(scenario, frame, queues, backend.host_mac())?;
    backend.start(&dirs)?;
    std::thread::sleep(opts.warmup);
    // tx-drop counts on the TAP, read outside the backend's readings (a /proc read
    // allocates; the in-process backend counts allocations at the window's side of its own).
    let tap_first = tap_count(scenario)?;
    let first = backend.read(WindowEdge::Opens);
    let t0 = Instant::now();
    std::thread::sleep(opts.duration);
    let elapsed = t0.elapsed();
    let last = backend.read(WindowEdge::Closes);
    let tap_last = tap_count(scenario)?;
    backend.stop()?;
    let (peer_pps, peer_cpu) = finish_peers(peers)?;
    let sample = backend.finish(Window {
        scenario,
        queues,
        first,
        last,
        elapsed,
        peer_pps,
        peer_cpu,
    })?;
    Ok(match tap_first.zip(tap_last) {
        Some((a, b)) => sample.counted_on_the_tap(
            b.0.saturating_sub(a.0),
            b.1.saturating_sub(a.1),
            elapsed,
            queues,
        ),
        None => sample,
    })
}

/// The TAP's count of frames it took from the datapath (packets, bytes: the host
/// interface's `rx_*`), for `tx-drop`, where nothing past the TAP sees them; None for the
/// other scenarios.
fn tap_count(scenario: Scenario) -> Result<Option<(u64, u64)>> {
    if scenario != Scenario::TxDrop {
        return Ok(None);
    }
    let s = netns::iface_stats(TAP_NAME)?;
    Ok(Some((s.rx_packets, s.rx_bytes)))
}

/// CPU placement on this machine: the datapath (or floor) on the last CPUs, the guest and the
/// peers on CPU 0 (also in the latency scenario).
pub(crate) fn worker_cpu(i: usize) -> Option<usize> {
    let n = cpu::online_cpus();
    if n < 2 {
        return None;
    }
    // Worker 0 on the last CPU, worker 1 on the one before, ...
    Some(n - 1 - (i % n))
}

/// The simulated guest of the throughput cells, for every engine.
fn bench_guest(queues: usize) -> Result<GuestConfig> {
    Ok(GuestConfig {
        queue_pairs: u16::try_from(queues)?,
        queue_size: 256,
        features: bench_features(),
        rx_buffer_size: 2048,
        ..GuestConfig::default()
    })
}

/// (packets, bytes) of the window in the scenario's direction(s), from per-direction counts.
fn by_direction(scenario: Scenario, tx: (u64, u64), rx: (u64, u64)) -> (u64, u64) {
    match scenario {
        Scenario::Tx | Scenario::TxDrop => tx,
        Scenario::Rx => rx,
        Scenario::Bidir => (tx.0 + rx.0, tx.1 + rx.1),
    }
}
