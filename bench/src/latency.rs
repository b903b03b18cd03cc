//! Request/response latency: the simulated guest sends a UDP request to a host echo reflector
//! and waits (on its interrupt, as a guest would) for the reply; idle, or while a host->guest
//! stream loads the same queue. The `floor` does the same round trip on the TAP fd itself
//! (write the request frame, poll and read the reply), with no virtqueue; `vhost-user` does
//! the guest's round trip through a vhost-user backend process.
//!
//! Placement as in the throughput cells: the datapath worker (a backend's too) on the last
//! CPU, the guest (the thread doing the round trips, the floor's too), the echo and the load
//! on CPU 0. Unpinned, the scheduler sometimes put the worker and the guest on one CPU, and a
//! run's p50 jumped from ~10 µs to 50-90 µs (both engines, from run to run): the comparison
//! of engines measured the placement.

use std::net::SocketAddrV4;
use std::os::fd::AsFd;
use std::sync::atomic::AtomicBool;
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

fn summarize(variant: Variant, load: bool, rt: &RoundTrips) -> LatencyResult {
    #[allow(clippy::cast_precision_loss, reason = "nanoseconds to microseconds")]
    let us = |ns: u64| ns as f64 / 1e3;
    let h = &rt.times;
    LatencyResult {
        lost: rt.lost,
        engine: variant.label(),
        busy_poll_us: variant.busy_poll_us,
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
    }
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

/// Measures `samples` round trips (after a short warm-up) with `variant`'s engine at its
/// busy-poll budget, idle or loaded (`backend`: the vhost-user backend, for
/// [`BenchEngine::VhostUser`]). Must run inside the benchmark's namespace.
pub fn measure(
    variant: Variant,
    load: bool,
    samples: u64,
    backend: Option<&VhostUserBackend>,
) -> Result<LatencyResult> {
    let engine = variant;
    match variant.engine {
        BenchEngine::Datapath(kind) => {
            let mut rig = Rig::start(&RigConfig {
                guest: latency_guest(),
                engine_config: EngineConfig {
                    busy_poll: variant.busy_poll(),
                    ..EngineConfig::default()
                },
                cpu_affinity: vec![worker_cpu(0)],
                ..RigConfig::new(kind, 1)
            })?;
            let (rx, tx) = rig.take(0);
            let host_mac = rig.host_mac;
            let result = with_echo(load, || {
                as_guest(|| guest_round_trips(rx, tx, host_mac, samples))
            })?;
            rig.shutdown()?;
            Ok(summarize(engine, load, &result?))
        }
        BenchEngine::Floor => {
            let tap = rig::host_tap(1, 1500)?;
            let host_mac = netns::iface_mac(TAP_NAME)?;
            let result = with_echo(load, || {
                as_guest(|| tap_round_trips(tap.queues()[0].as_fd(), host_mac, samples))
            })?;
            drop(tap);
            rig::wait_tap_gone()?;
            Ok(summarize(engine, load, &result?))
        }
        BenchEngine::VhostUser => {
            let backend =
                backend.ok_or_else(|| anyhow!("the vhost-user engine needs a backend"))?;
            let mut rig = VhostUserRig::start(
                backend,
                latency_guest(),
                1500,
                &[worker_cpu(0)],
                variant.busy_poll_us,
            )?;
            let (rx, tx) = rig.take(0);
            let host_mac = rig.host_mac;
            let result = with_echo(load, || {
                as_guest(|| guest_round_trips(rx, tx, host_mac, samples))
            })?;
            rig.shutdown()?;
            Ok(summarize(engine, load, &result?))
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
struct RoundTrips {
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
