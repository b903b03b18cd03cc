//! Request/response latency: the simulated guest sends a UDP request to a host echo reflector
//! and waits (on its interrupt, as a guest would) for the reply; idle, or while a host->guest
//! stream loads the same queue. The `floor` does the same round trip on the TAP fd itself
//! (write the request frame, poll and read the reply), with no virtqueue; `vhost-user` does
//! the guest's round trip through a vhost-user backend process.
//!
//! Placement ([`Placement`], `--latency-placement`): `split`, as in the throughput cells, puts
//! the datapath worker (a backend's too) on the last CPU and the guest (the thread doing the
//! round trips, the floor's too), the echo and the load on CPU 0; `shared` puts the worker on
//! CPU 0 with them. Unpinned, the scheduler chose either from run to run, and the comparison
//! of engines measured the placement. Every round trip through a worker that sleeps pays two
//! wake-ups (the guest's kick, the worker's interrupt): across CPUs with `split`, on one with
//! `shared`. The `wake` row measures just those: an eventfd ping-pong between a thread on the
//! guest's CPU and one on the worker's, the least any such datapath can answer in on this
//! machine (the floor pays neither: one thread writes and reads the TAP).

use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use hdrhistogram::Histogram;
use tapir_datapath::EngineConfig;
use tapir_simguest::{GuestConfig, RxDriver, TxDriver, VirtioNetHdr};

use crate::peers::{
    PeerHandle, RunControl, SenderReport, UdpEcho, UdpEchoConfig, UdpSender, UdpSenderConfig,
};
use crate::report::LatencyResult;
use crate::runner::{bench_features, worker_cpu, BenchEngine, Variant};
use crate::vhost_rig::{VhostUserBackend, VhostUserRig};
use tapir_testkit::frames::{self, FlowSpec};
use tapir_testkit::{self as rig, Rig, RigConfig, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};
use tapir_testkit::{cpu, netns};

const ECHO_PORT: u16 = 7;
const GUEST_PORT: u16 = 40_000;
/// Port the background load goes to (the guest ignores it).
const LOAD_PORT: u16 = 40_001;
/// Background host->guest load, packets/s.
const LOAD_PPS: u64 = 50_000;
const REQUEST_LEN: usize = 128;

fn request_flow(host_mac: [u8; 6]) -> FlowSpec {
    FlowSpec {
        src_mac: GUEST_MAC,
        dst_mac: host_mac,
        src_ip: GUEST_IP,
        dst_ip: HOST_IP,
        src_port: GUEST_PORT,
        dst_port: ECHO_PORT,
    }
}

fn start_echo() -> Result<PeerHandle<crate::peers::EchoReport>> {
    let cfg = UdpEchoConfig::new(
        SocketAddrV4::new(HOST_IP, ECHO_PORT),
        on_guest_cpu(RunControl::new(Arc::new(AtomicBool::new(false)))),
    );
    Ok(UdpEcho::bind(cfg)?.spawn()?)
}

fn start_load(load: bool) -> Result<Option<PeerHandle<SenderReport>>> {
    if !load {
        return Ok(None);
    }
    let mut cfg = UdpSenderConfig::new(
        SocketAddrV4::new(GUEST_IP, LOAD_PORT),
        REQUEST_LEN,
        on_guest_cpu(RunControl::new(Arc::new(AtomicBool::new(false)))),
    );
    cfg.rate_pps = Some(LOAD_PPS);
    cfg.batch = 8;
    Ok(Some(UdpSender::new(cfg)?.spawn()?))
}

/// The guest's and the peers' CPU (0) where there is a CPU for the datapath besides.
fn guest_cpu() -> Option<usize> {
    worker_cpu(0).map(|_| 0)
}

fn on_guest_cpu(rc: RunControl) -> RunControl {
    match guest_cpu() {
        Some(c) => rc.with_cpu(c),
        None => rc,
    }
}

/// Runs `f` (the round trips) on a thread of its own on the guest's CPU (a new thread is in
/// the caller's network namespace); the caller's affinity stays as it was.
fn as_guest<T: Send>(f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            cpu::maybe_pin(guest_cpu()).context("pinning the guest thread")?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("the round-trip thread panicked"))?
    })
}

/// Where a latency run's worker goes, beside the guest, the echo and the load on CPU 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// The worker on the last CPU (as in the throughput cells).
    Split,
    /// The worker on CPU 0 too.
    Shared,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Split => "split",
            Placement::Shared => "shared",
        }
    }

    /// The worker's CPU (None: unpinned, on a machine of one CPU).
    fn worker_cpu(self) -> Option<usize> {
        match self {
            Placement::Split => worker_cpu(0),
            Placement::Shared => guest_cpu(),
        }
    }
}

impl std::str::FromStr for Placement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "split" => Ok(Placement::Split),
            "shared" => Ok(Placement::Shared),
            other => Err(format!("unknown placement {other:?} (split, shared)")),
        }
    }
}

/// What a latency row measures: an engine at a budget, or the machine's wake-up ping-pong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Row {
    Engine(Variant),
    Wake,
}

impl Row {
    pub fn label(self) -> String {
        match self {
            Row::Engine(v) => v.label(),
            Row::Wake => "wake".into(),
        }
    }
}

/// Merges the repeats of one row into its report line: percentiles over every round trip,
/// and the spread of the repeats' medians.
pub fn summarize(
    row: Row,
    placement: Placement,
    load: bool,
    runs: &[RoundTrips],
) -> Result<LatencyResult> {
    #[allow(clippy::cast_precision_loss, reason = "nanoseconds to microseconds")]
    let us = |ns: u64| ns as f64 / 1e3;
    let mut h = histogram()?;
    for r in runs {
        h.add(&r.times)
            .map_err(|e| anyhow!("merging histograms: {e}"))?;
    }
    let medians = runs.iter().map(|r| us(r.times.value_at_quantile(0.5)));
    let p50_spread_us = medians.fold([f64::INFINITY, 0.0f64], |[lo, hi], m| {
        [lo.min(m), hi.max(m)]
    });
    Ok(LatencyResult {
        lost: runs.iter().map(|r| r.lost).sum(),
        engine: row.label(),
        placement: placement.name().into(),
        repeats: runs.len(),
        p50_spread_us,
        busy_poll_us: match row {
            Row::Engine(v) => v.busy_poll_us,
            Row::Wake => 0,
        },
        load: if load { "loaded" } else { "idle" }.into(),
        p50_us: us(h.value_at_quantile(0.5)),
        p99_us: us(h.value_at_quantile(0.99)),
        p999_us: us(h.value_at_quantile(0.999)),
        max_us: us(h.max()),
        samples: h.len(),
        cdf: [
            0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0,
        ]
        .iter()
        .map(|&q| (us(h.value_at_quantile(q)), q))
        .collect(),
    })
}

fn histogram() -> Result<Histogram<u64>> {
    Histogram::new_with_bounds(100, 10_000_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

fn latency_guest() -> GuestConfig {
    GuestConfig {
        features: bench_features(),
        rx_buffer_size: 2048,
        ..GuestConfig::default()
    }
}

/// Measures `samples` round trips (after a short warm-up) of `row`: `variant`'s engine at its
/// busy-poll budget, its worker placed by `placement`, idle or loaded (`backend`: the
/// vhost-user backend, for [`BenchEngine::VhostUser`]); or the wake-up ping-pong (idle only).
/// Must run inside the benchmark's namespace.
pub fn measure(
    row: Row,
    placement: Placement,
    load: bool,
    samples: u64,
    backend: Option<&VhostUserBackend>,
) -> Result<RoundTrips> {
    let variant = match row {
        Row::Engine(v) => v,
        Row::Wake => return wake_round_trips(placement, samples),
    };
    match variant.engine {
        BenchEngine::Datapath(kind) => {
            let mut rig = Rig::start(&RigConfig {
                guest: latency_guest(),
                engine_config: EngineConfig {
                    busy_poll: variant.busy_poll(),
                    ..EngineConfig::default()
                },
                cpu_affinity: vec![placement.worker_cpu()],
                ..RigConfig::new(kind, 1)
            })?;
            let (rx, tx) = rig.take(0);
            let host_mac = rig.host_mac;
            let result = with_echo(load, || {
                as_guest(|| guest_round_trips(rx, tx, host_mac, samples))
            })?;
            rig.shutdown()?;
            result
        }
        BenchEngine::Floor => {
            let tap = rig::host_tap(1, 1500)?;
            let host_mac = netns::iface_mac(TAP_NAME)?;
            let result = with_echo(load, || {
                as_guest(|| tap_round_trips(tap.queues()[0].as_fd(), host_mac, samples))
            })?;
            drop(tap);
            rig::wait_tap_gone()?;
            result
        }
        BenchEngine::VhostUser => {
            let backend =
                backend.ok_or_else(|| anyhow!("the vhost-user engine needs a backend"))?;
            let mut rig = VhostUserRig::start(
                backend,
                latency_guest(),
                1500,
                &[placement.worker_cpu()],
                variant.busy_poll_us,
            )?;
            let (rx, tx) = rig.take(0);
            let host_mac = rig.host_mac;
            let result = with_echo(load, || {
                as_guest(|| guest_round_trips(rx, tx, host_mac, samples))
            })?;
            rig.shutdown()?;
            result
        }
    }
}

/// Runs `round_trips` while the host echo (and, if `load`, the load generator) runs; the
/// peers' own failures come first, the round trips' result second.
fn with_echo<T>(load: bool, round_trips: impl FnOnce() -> T) -> Result<T> {
    let echo = start_echo()?;
    let loader = start_load(load)?;
    let result = round_trips();
    if let Some(l) = loader {
        l.stop_and_join()?;
    }
    echo.stop_and_join()?;
    Ok(result)
}

fn is_reply(frame: &[u8], seq: u64) -> bool {
    frames::parse_udp(frame)
        .filter(|u| u.src_port == ECHO_PORT && u.dst_port == GUEST_PORT)
        .and_then(|u| frames::read_payload_header(u.payload))
        .is_some_and(|(_, s)| s == seq)
}

/// What the kernel dropped on the way so far: the TAP's `tx_dropped` (its queue full while
/// the datapath did not read: a starved worker under load) and `Udp RcvbufErrors` (the echo's
/// socket full).
fn kernel_drops() -> u64 {
    netns::iface_stats(TAP_NAME).map_or(0, |s| s.tx_dropped)
        + netns::snmp_counter("Udp", "RcvbufErrors").unwrap_or(0)
}

/// The round trips' times and how many were lost to the kernel's drops.
pub struct RoundTrips {
    times: Histogram<u64>,
    lost: u64,
}

/// Counts the request whose echo did not come as lost if the kernel dropped something since
/// the last one (the request or its reply may have been it; the round trip is not measured
/// and the next request goes out); if it dropped nothing, the datapath lost it: an error.
fn lost_to_the_kernel(rt: &mut RoundTrips, drops_seen: &mut u64, seq: u64) -> Result<()> {
    let now = kernel_drops();
    if now <= *drops_seen {
        bail!("no echo for request {seq} within 2 s, and the kernel dropped nothing");
    }
    *drops_seen = now;
    rt.lost += 1;
    Ok(())
}

fn guest_round_trips(
    mut rx: RxDriver,
    mut tx: TxDriver,
    host_mac: [u8; 6],
    samples: u64,
) -> Result<RoundTrips> {
    let flow = request_flow(host_mac);
    let mut buf = vec![0u8; 256];
    let mut rt = RoundTrips {
        times: histogram()?,
        lost: 0,
    };
    let warmup = samples / 10 + 10;
    let mut drops_seen = kernel_drops();
    rx.refill();
    let mut seq = 0u64;
    while rt.times.len() < samples {
        seq += 1;
        let n = frames::build_udp(&mut buf, &flow, REQUEST_LEN, 1, seq)?;
        let start = Instant::now();
        tx.reclaim();
        if !tx.send(&VirtioNetHdr::default(), &buf[..n])? {
            bail!("guest TX ring full");
        }
        let deadline = start + Duration::from_secs(2);
        let answered = 'reply: loop {
            rx.refill();
            while let Some(p) = rx.poll()? {
                if is_reply(&p.data, seq) {
                    break 'reply true;
                }
            }
            if Instant::now() > deadline {
                break false;
            }
            rx.wait(Duration::from_millis(100))?;
        };
        if !answered {
            lost_to_the_kernel(&mut rt, &mut drops_seen, seq)?;
        } else if seq > warmup {
            rt.times
                .record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
    }
    Ok(rt)
}

fn tap_round_trips(
    tap: std::os::fd::BorrowedFd<'_>,
    host_mac: [u8; 6],
    samples: u64,
) -> Result<RoundTrips> {
    let flow = request_flow(host_mac);
    let mut out = vec![0u8; 12 + 256];
    let mut inb = vec![0u8; 12 + 65_562];
    let mut rt = RoundTrips {
        times: histogram()?,
        lost: 0,
    };
    let warmup = samples / 10 + 10;
    let mut drops_seen = kernel_drops();
    let mut seq = 0u64;
    while rt.times.len() < samples {
        seq += 1;
        let n = frames::build_udp(&mut out[12..], &flow, REQUEST_LEN, 1, seq)?;
        let start = Instant::now();
        nix::unistd::write(tap, &out[..12 + n]).context("writing the request to the TAP")?;
        let deadline = start + Duration::from_secs(2);
        let answered = loop {
            let mut fds = [nix::poll::PollFd::new(tap, nix::poll::PollFlags::POLLIN)];
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(100u16))?;
            match nix::unistd::read(tap, &mut inb) {
                Ok(got) if got > 12 && is_reply(&inb[12..got], seq) => break true,
                Ok(_) | Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => return Err(e).context("reading the TAP"),
            }
            if Instant::now() > deadline {
                break false;
            }
        };
        if !answered {
            lost_to_the_kernel(&mut rt, &mut drops_seen, seq)?;
        } else if seq > warmup {
            rt.times
                .record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
        }
    }
    Ok(rt)
}

/// The wake-up ping-pong: a thread on the guest's CPU writes an eventfd the other thread (on
/// the worker's CPU per `placement`) blocks on, which answers on a second eventfd the first
/// blocks on; the time from the first write to the answer, `samples` times after a warm-up.
/// Two wake-ups, as a kick and an interrupt, and nothing else.
fn wake_round_trips(placement: Placement, samples: u64) -> Result<RoundTrips> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let ping = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
    let pong = EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC)?;
    let warmup = samples / 10 + 10;
    let total = samples + warmup;
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let answerer = s.spawn(|| -> Result<()> {
            cpu::maybe_pin(placement.worker_cpu()).context("pinning the answering thread")?;
            for _ in 0..total {
                ping.read()?;
                if stop.load(Ordering::Acquire) {
                    break;
                }
                pong.write(1)?;
            }
            Ok(())
        });
        let asker = s.spawn(|| -> Result<RoundTrips> {
            cpu::maybe_pin(guest_cpu()).context("pinning the asking thread")?;
            let mut rt = RoundTrips {
                times: histogram()?,
                lost: 0,
            };
            for i in 0..total {
                let start = Instant::now();
                ping.write(1)?;
                pong.read()?;
                if i >= warmup {
                    rt.times
                        .record(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))?;
                }
            }
            Ok(rt)
        });
        let rt = asker
            .join()
            .map_err(|_| anyhow!("the asking thread panicked"))
            .and_then(|r| r);
        if rt.is_err() {
            // The answerer may be waiting for a ping that will not come.
            stop.store(true, Ordering::Release);
            ping.write(1)?;
        }
        answerer
            .join()
            .map_err(|_| anyhow!("the answering thread panicked"))??;
        rt
    })
}
