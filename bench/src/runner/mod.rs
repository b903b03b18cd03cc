//! The throughput benchmark: for each (scenario, frame size, queue pairs), every engine in the
//! same run and the same namespace, repeated, interleaved (engine order rotates per repeat so
//! slow drift of the machine hits every engine alike), medians reported.
//!
//! - `tx` (guest -> host): simulated-guest threads fill the TX rings; 64/1500-byte frames are
//!   UDP datagrams to a host `UdpSink`, 65 535-byte frames are TSO (TCPv4 GSO) super-frames to
//!   an address the host does not own (dropped by routing, unsegmented). The floor writes the
//!   same frames to the same TAP with batched io_uring writes, no virtqueue.
//! - `tx-drop` (guest -> host, dropped early): the same frames to a destination MAC nobody
//!   owns, so the host drops them right after the TAP (`PACKET_OTHERHOST`, before IP): the
//!   datapath, not the host's UDP delivery and its sink. Rates are the TAP's own count of
//!   frames it took (`rx_packets` of the host interface), for every engine and the floor.
//! - `rx` (host -> guest): an AF_PACKET generator (`PACKET_QDISC_BYPASS`, TSO super-frames
//!   with `PACKET_VNET_HDR`) sends on the TAP's host side; simulated-guest threads keep the RX
//!   rings refilled and consume what arrives. The floor keeps batched io_uring reads posted on
//!   the TAP queues instead.
//!
//! Rates are the datapath's own counters over the measurement window (after a warm-up); CPU
//! per packet is the worker threads' scheduler-accounted CPU time over the same window.
//!
//! `vhost-user` measures a vhost-user-net backend process (by default `tapir serve`) driven by
//! the same simulated guest through the vhost-user protocol ([`crate::vhost_rig`]). Its
//! counters are out of reach, so packets and bytes are counted on the guest side (TX chains
//! the backend completed, RX frames the guest received), kicks and interrupts are the ones the
//! guest sent and received, and CPU is the backend process's; batch size, drops and
//! allocations are not known and reported as absent.

mod backend;
mod guest_load;
mod handoff;
mod sample;
mod traffic;
mod variant;

use std::time::Duration;

use anyhow::{Context, Result};
use tapir_datapath::EngineKind;
use tapir_testkit::{cpu, netns};

use crate::latency::{Placement, RoundTrips, Row};
use crate::report::{LatencyResult, Meta, Report};
use crate::vhost_rig::VhostUserBackend;
pub(crate) use backend::worker_cpu;
use backend::{measure, Floor, InProcess, VhostUser};
use handoff::measure_handoffs;
use sample::{summarize, Sample};
pub(crate) use variant::{variants, Variant};

/// Direction of a throughput scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Guest to host.
    Tx,
    /// Guest to host, to a destination MAC nobody owns: the host drops the frames right
    /// after the TAP, which counts them.
    TxDrop,
    /// Host to guest.
    Rx,
    /// Both at once (the sum is reported).
    Bidir,
}

impl Scenario {
    /// The single directions a scenario runs.
    pub(super) fn directions(self) -> &'static [Scenario] {
        match self {
            Scenario::Tx | Scenario::TxDrop => &[Scenario::Tx],
            Scenario::Rx => &[Scenario::Rx],
            Scenario::Bidir => &[Scenario::Tx, Scenario::Rx],
        }
    }

    /// `tx` / `tx-drop` / `rx` / `bidir`.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Tx => "tx",
            Scenario::TxDrop => "tx-drop",
            Scenario::Rx => "rx",
            Scenario::Bidir => "bidir",
        }
    }
}

impl std::str::FromStr for Scenario {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tx" => Ok(Scenario::Tx),
            "tx-drop" => Ok(Scenario::TxDrop),
            "rx" => Ok(Scenario::Rx),
            "bidir" => Ok(Scenario::Bidir),
            o => Err(format!("unknown scenario {o:?} (tx, tx-drop, rx or bidir)")),
        }
    }
}

/// What is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchEngine {
    /// A tapir engine.
    Datapath(EngineKind),
    /// The raw TAP limit: batched io_uring I/O of prebuilt frames, no virtqueue.
    Floor,
    /// The vhost-user backend of [`BenchOptions::backend`], driven over its socket.
    VhostUser,
}

impl BenchEngine {
    /// `uring`, `classic`, `floor` or `vhost-user`.
    pub fn name(self) -> String {
        match self {
            BenchEngine::Datapath(k) => k.to_string(),
            BenchEngine::Floor => "floor".into(),
            BenchEngine::VhostUser => "vhost-user".into(),
        }
    }
}

impl std::str::FromStr for BenchEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "floor" => Ok(BenchEngine::Floor),
            "vhost-user" => Ok(BenchEngine::VhostUser),
            _ => s
                .parse()
                .map(BenchEngine::Datapath)
                .map_err(|_| format!("unknown engine {s:?} (uring, classic, floor or vhost-user)")),
        }
    }
}

/// A benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Directions.
    pub scenarios: Vec<Scenario>,
    /// Ethernet frame sizes (65536 means a TSO super-frame of the largest size the kernel
    /// keeps whole, 65 535 bytes).
    pub frames: Vec<usize>,
    /// Queue pair counts.
    pub queues: Vec<usize>,
    /// Engines, side by side.
    pub engines: Vec<BenchEngine>,
    /// Measurement window per repeat.
    pub duration: Duration,
    /// Warm-up before each window.
    pub warmup: Duration,
    /// Repeats per cell.
    pub repeats: usize,
    /// The command line, for the report.
    pub command: String,
    /// Handoffs per handoff-scenario run (0: no handoff scenario).
    pub handoffs: usize,
    /// Traffic per direction during the handoff scenario, packets/s.
    pub handoff_pps: u64,
    /// SCHED_FIFO priority of the datapath workers in the handoff scenario.
    pub handoff_rt_priority: Option<u8>,
    /// Round trips per latency run (0: no latency scenario).
    pub latency_samples: u64,
    /// The vhost-user backend the `vhost-user` engine measures.
    pub backend: Option<VhostUserBackend>,
    /// Busy-poll budgets in µs (0: off) the latency scenario and the 64-byte tx, tx-drop and
    /// rx cells run every worker engine at, a row each (`uring+bp50`); other cells run at 0.
    /// Empty: 0 only.
    pub busy_poll_us: Vec<u64>,
    /// Where the latency scenario's workers run, a set of rows each (empty: `split` only).
    pub latency_placements: Vec<Placement>,
}

impl BenchOptions {
    fn placements(&self) -> Vec<Placement> {
        if self.latency_placements.is_empty() {
            vec![Placement::Split]
        } else {
            self.latency_placements.clone()
        }
    }

    /// How many measurements a run makes (for a progress bar).
    pub fn steps(&self) -> u64 {
        let n = |x: usize| u64::try_from(x).unwrap_or(0);
        let datapath_engines = n(self
            .engines
            .iter()
            .filter(|e| matches!(e, BenchEngine::Datapath(_)))
            .count());
        let mut throughput = 0;
        for &s in &self.scenarios {
            for &f in &self.frames {
                throughput +=
                    n(self.queues.len()) * n(self.repeats) * n(variants(self, Some((s, f))).len());
            }
        }
        let latency = if self.latency_samples > 0 {
            // Per placement: every engine row idle and loaded, and the wake row idle.
            n(self.placements().len()) * n(self.repeats) * (2 * n(variants(self, None).len()) + 1)
        } else {
            0
        };
        let handoff = if self.handoffs > 0 {
            n(self.queues.len()) * datapath_engines
        } else {
            0
        };
        throughput + latency + handoff
    }
}

/// Features a Linux guest negotiates by default (plus EVENT_IDX and MRG_RXBUF).
pub(crate) fn bench_features() -> u64 {
    tapir_testkit::linux_guest_features()
}

/// Runs the benchmark in a private network namespace and returns the report.
pub fn run(opts: &BenchOptions, progress: &mut (dyn FnMut(&str) + Send)) -> Result<Report> {
    netns::run_in_new_netns_scoped(|| run_here(opts, progress))?
}

fn run_here(opts: &BenchOptions, progress: &mut (dyn FnMut(&str) + Send)) -> Result<Report> {
    let mut report = Report {
        meta: Meta {
            command: opts.command.clone(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            cpus: cpu::online_cpus(),
            cpu_model: cpu_model(),
            duration_s: opts.duration.as_secs_f64(),
            repeats: opts.repeats,
            started: utc_now(),
        },
        results: Vec::new(),
        handoff: Vec::new(),
        latency: Vec::new(),
    };
    if opts.latency_samples > 0 {
        report.latency = measure_latency(opts, progress)?;
    }
    if opts.handoffs > 0 {
        for &queues in &opts.queues {
            for engine in &opts.engines {
                let BenchEngine::Datapath(kind) = *engine else {
                    continue;
                };
                progress(&format!(
                    "handoff q{queues} {kind}: {} handoffs",
                    opts.handoffs
                ));
                report.handoff.push(
                    measure_handoffs(kind, queues, opts)
                        .with_context(|| format!("handoff q{queues} {kind}"))?,
                );
            }
        }
    }
    let cells: usize = opts.scenarios.len() * opts.frames.len() * opts.queues.len();
    let mut cell = 0;
    for &scenario in &opts.scenarios {
        for &frame in &opts.frames {
            for &queues in &opts.queues {
                cell += 1;
                let rows = variants(opts, Some((scenario, frame)));
                let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); rows.len()];
                for rep in 0..opts.repeats {
                    for k in 0..rows.len() {
                        let e = (k + rep) % rows.len();
                        let v = rows[e];
                        progress(&format!(
                            "[{cell}/{cells}] {} {frame}B q{queues} {} run {}/{}",
                            scenario.name(),
                            v.label(),
                            rep + 1,
                            opts.repeats
                        ));
                        let s = match v.engine {
                            BenchEngine::Datapath(kind) => InProcess::start(kind, queues, v)
                                .and_then(|b| measure(b, scenario, frame, queues, opts)),
                            BenchEngine::Floor => Floor::start(queues, opts)
                                .and_then(|b| measure(b, scenario, frame, queues, opts)),
                            BenchEngine::VhostUser => VhostUser::start(queues, opts, v)
                                .and_then(|b| measure(b, scenario, frame, queues, opts)),
                        }
                        .with_context(|| {
                            format!("{} {frame} q{queues} {}", scenario.name(), v.label())
                        })?;
                        samples[e].push(s);
                    }
                }
                for (e, runs) in samples.into_iter().enumerate() {
                    report
                        .results
                        .push(summarize(scenario, frame, queues, rows[e], &runs));
                }
            }
        }
    }
    Ok(report)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn utc_now() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The latency scenario: per placement and load, every row's repeats interleaved (the rows'
/// order turns by one each repeat, as in the throughput cells), merged into a line each.
fn measure_latency(
    opts: &BenchOptions,
    progress: &mut (dyn FnMut(&str) + Send),
) -> Result<Vec<LatencyResult>> {
    let mut out = Vec::new();
    for placement in opts.placements() {
        for load in [false, true] {
            let mut rows: Vec<Row> = variants(opts, None).into_iter().map(Row::Engine).collect();
            if !load {
                rows.push(Row::Wake);
            }
            let mut runs: Vec<Vec<RoundTrips>> = rows.iter().map(|_| Vec::new()).collect();
            for rep in 0..opts.repeats.max(1) {
                for k in 0..rows.len() {
                    let e = (k + rep) % rows.len();
                    let row = rows[e];
                    let what = format!(
                        "latency {} {} {} run {}/{}",
                        row.label(),
                        placement.name(),
                        if load { "loaded" } else { "idle" },
                        rep + 1,
                        opts.repeats.max(1)
                    );
                    progress(&what);
                    runs[e].push(
                        crate::latency::measure(
                            row,
                            placement,
                            load,
                            opts.latency_samples,
                            opts.backend.as_ref(),
                        )
                        .context(what)?,
                    );
                }
            }
            for (row, r) in rows.iter().zip(&runs) {
                out.push(crate::latency::summarize(*row, placement, load, r)?);
            }
        }
    }
    Ok(out)
}
