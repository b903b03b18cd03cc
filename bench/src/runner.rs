//! The throughput benchmark: for each (scenario, frame size, queue pairs), every engine in the
//! same run and the same namespace, repeated, interleaved (engine order rotates per repeat so
//! slow drift of the machine hits every engine alike), medians reported.
//!
//! - `tx` (guest -> host): simulated-guest threads fill the TX rings; 64/1500-byte frames are
//!   UDP datagrams to a host `UdpSink`, 65 535-byte frames are TSO (TCPv4 GSO) super-frames to
//!   an address the host does not own (dropped by routing, unsegmented). The floor writes the
//!   same frames to the same TAP with batched io_uring writes, no virtqueue.
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

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tapir_datapath::{Counters, EngineKind};
use tapir_simguest::{GuestConfig, RxDriver, TxDriver, VirtioNetHdr};

use crate::floor;
use crate::peers::{
    GeneratorConfig, PacketGenerator, RunControl, SeqMode, Template, UdpSink, UdpSinkConfig,
};
use crate::report::{median, HandoffResult, Meta, Report, ThroughputResult};
use crate::vhost_rig::{VhostUserBackend, VhostUserRig};
use tapir_testkit::cpu;
use tapir_testkit::frames::{self, FlowSpec, VnetHdr};
use tapir_testkit::netns;
use tapir_testkit::{self as rig, Rig, RigConfig, GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME};

/// Direction of a throughput scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Guest to host.
    Tx,
    /// Host to guest.
    Rx,
    /// Both at once (the sum is reported).
    Bidir,
}

impl Scenario {
    /// The single directions a scenario runs.
    fn directions(self) -> &'static [Scenario] {
        match self {
            Scenario::Tx => &[Scenario::Tx],
            Scenario::Rx => &[Scenario::Rx],
            Scenario::Bidir => &[Scenario::Tx, Scenario::Rx],
        }
    }

    /// `tx` / `rx`.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Tx => "tx",
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
            "rx" => Ok(Scenario::Rx),
            "bidir" => Ok(Scenario::Bidir),
            o => Err(format!("unknown scenario {o:?} (tx, rx or bidir)")),
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
}

impl BenchOptions {
    /// How many measurements a run makes (for a progress bar).
    pub fn steps(&self) -> u64 {
        let n = |x: usize| u64::try_from(x).unwrap_or(0);
        let datapath_engines = n(self
            .engines
            .iter()
            .filter(|e| matches!(e, BenchEngine::Datapath(_)))
            .count());
        let throughput = n(self.scenarios.len() * self.frames.len() * self.queues.len())
            * n(self.repeats)
            * n(self.engines.len());
        let latency = if self.latency_samples > 0 {
            2 * n(self.engines.len())
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

/// Largest frame the kernel keeps whole as one GSO super-frame.
const TSO_FRAME: usize = frames::MAX_GSO_FRAME;
const TSO_MSS: u16 = 1448;
/// Distinct frame buffers the TX floor cycles through: the simulated guest's TX slots.
const FLOOR_TX_BUFFERS: usize = 248;
const SINK_PORT: u16 = 9000;
/// An address on the TAP's subnet that nobody owns: TSO frames sent there are dropped by the
/// host's routing (forwarding is off) without being segmented or answered.
const BLACKHOLE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 200);

/// Features a Linux guest negotiates by default (plus EVENT_IDX and MRG_RXBUF).
pub fn bench_features() -> u64 {
    tapir_testkit::linux_guest_features()
}

fn frame_len(frame: usize) -> usize {
    frame.min(TSO_FRAME)
}

/// The frames a scenario sends, each with its vnet header (one per flow).
fn build_frames(
    scenario: Scenario,
    frame: usize,
    flows: usize,
    host_mac: [u8; 6],
) -> Result<Vec<(VnetHdr, Vec<u8>)>> {
    let mut out = Vec::with_capacity(flows);
    for i in 0..flows {
        let port = 10_000 + u16::try_from(i).unwrap_or(0);
        let (spec, tso) = match scenario {
            Scenario::Tx => (
                FlowSpec {
                    src_mac: GUEST_MAC,
                    dst_mac: host_mac,
                    src_ip: GUEST_IP,
                    dst_ip: if frame > 1500 { BLACKHOLE_IP } else { HOST_IP },
                    src_port: port,
                    dst_port: SINK_PORT,
                },
                frame > 1500,
            ),
            Scenario::Rx | Scenario::Bidir => (
                FlowSpec {
                    src_mac: host_mac,
                    dst_mac: GUEST_MAC,
                    src_ip: HOST_IP,
                    dst_ip: GUEST_IP,
                    src_port: port,
                    dst_port: SINK_PORT,
                },
                frame > 1500,
            ),
        };
        let mut buf = vec![0u8; frame_len(frame)];
        let flow = u32::try_from(i).unwrap_or(0);
        if tso {
            let f = frames::build_tcp_tso(&mut buf, &spec, frame_len(frame), TSO_MSS, 1, flow, 0)?;
            buf.truncate(f.len);
            out.push((f.vnet, buf));
        } else {
            let n = frames::build_udp(&mut buf, &spec, frame_len(frame), flow, 0)?;
            buf.truncate(n);
            out.push((VnetHdr::default(), buf));
        }
    }
    Ok(out)
}

fn to_guest_hdr(h: &VnetHdr) -> VirtioNetHdr {
    VirtioNetHdr::from_bytes(&h.to_bytes())
}

/// One measured window.
#[derive(Clone, Debug, Default)]
struct Sample {
    pps: f64,
    gbps: f64,
    /// None where the CPU time is unknown (a backend process whose CPU cannot be read).
    cpu_ns_per_packet: Option<f64>,
    datapath_cpu: Option<f64>,
    peer_pps: f64,
    peer_cpu: f64,
    guest_pps: f64,
    /// None where the datapath's counters are out of reach (a vhost-user backend).
    drops: Option<u64>,
    /// Packets per wait for the kernel (None: unknown), kicks and interrupts per packet.
    per_wait: Option<f64>,
    kicks: f64,
    interrupts: f64,
    allocs_per_packet: Option<f64>,
    notes: Vec<String>,
}

/// CPU placement on this machine: the datapath (or floor) on the last CPUs, the guest and the
/// peers on CPU 0.
fn worker_cpu(i: usize) -> Option<usize> {
    let n = cpu::online_cpus();
    if n < 2 {
        return None;
    }
    // Worker 0 on the last CPU, worker 1 on the one before, ...
    Some(n - 1 - (i % n))
}

#[allow(clippy::cast_precision_loss, reason = "rates")]
fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

/// What the simulated guest's threads saw, summed over them.
#[derive(Debug, Default)]
struct GuestCounters {
    /// Frames pushed (TX) plus frames received (RX): the guest's own rate.
    packets: AtomicU64,
    /// TX chains the device completed, and their frames' bytes.
    tx_completed: AtomicU64,
    tx_bytes: AtomicU64,
    /// RX frames received, and their bytes (after the virtio-net header).
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    /// Kicks the guest sent, interrupts it received.
    kicks: AtomicU64,
    interrupts: AtomicU64,
}

/// A reading of [`GuestCounters`].
#[derive(Clone, Copy, Debug, Default)]
struct GuestCount {
    packets: u64,
    tx_completed: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    kicks: u64,
    interrupts: u64,
}

impl GuestCounters {
    fn read(&self) -> GuestCount {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GuestCount {
            packets: r(&self.packets),
            tx_completed: r(&self.tx_completed),
            tx_bytes: r(&self.tx_bytes),
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            kicks: r(&self.kicks),
            interrupts: r(&self.interrupts),
        }
    }

    /// Adds what a driver's kick and interrupt counters moved since `last`.
    fn publish_notifications(&self, stats: &tapir_simguest::DriverStats, last: &mut (u64, u64)) {
        if stats.kicks != last.0 {
            self.kicks
                .fetch_add(stats.kicks - last.0, Ordering::Relaxed);
        }
        if stats.interrupts != last.1 {
            self.interrupts
                .fetch_add(stats.interrupts - last.1, Ordering::Relaxed);
        }
        *last = (stats.kicks, stats.interrupts);
    }
}

impl GuestCount {
    fn delta(&self, before: &GuestCount) -> GuestCount {
        GuestCount {
            packets: self.packets - before.packets,
            tx_completed: self.tx_completed - before.tx_completed,
            tx_bytes: self.tx_bytes - before.tx_bytes,
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            kicks: self.kicks - before.kicks,
            interrupts: self.interrupts - before.interrupts,
        }
    }
}

struct GuestLoad {
    stop: Arc<AtomicBool>,
    counters: Arc<GuestCounters>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl GuestLoad {
    fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| anyhow!("guest thread panicked"))??;
        }
        Ok(())
    }
}

/// Guest TX: small frames are copied into the ring per packet, as a guest's stack would;
/// TSO super-frames are written into every slot once and re-posted without copying, so the
/// simulated guest's 64 KiB memcpy (several µs on one core) is not what gets measured.
fn guest_tx_loop(
    mut tx: TxDriver,
    hdr: VirtioNetHdr,
    frame: Vec<u8>,
    stop: Arc<AtomicBool>,
    c: Arc<GuestCounters>,
) -> Result<()> {
    cpu::pin_current_thread(0).ok();
    let prefilled = frame.len() > 1500;
    if prefilled {
        tx.prefill(&hdr, &frame)?;
    }
    let len = u64::try_from(frame.len()).unwrap_or(0);
    let mut notified = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let done = u64::try_from(tx.reclaim()).unwrap_or(0);
        if done > 0 {
            c.tx_completed.fetch_add(done, Ordering::Relaxed);
            c.tx_bytes.fetch_add(done * len, Ordering::Relaxed);
        }
        let mut n = 0u64;
        while n < 64 {
            let pushed = if prefilled {
                tx.push_prefilled()?
            } else {
                tx.push(&hdr, &frame)?
            };
            if !pushed {
                break;
            }
            n += 1;
        }
        if n > 0 {
            tx.flush();
            c.packets.fetch_add(n, Ordering::Relaxed);
        } else {
            tx.wait(Duration::from_millis(5))?;
        }
        c.publish_notifications(&tx.stats(), &mut notified);
    }
    Ok(())
}

fn guest_rx_loop(mut rx: RxDriver, stop: Arc<AtomicBool>, c: Arc<GuestCounters>) -> Result<()> {
    cpu::pin_current_thread(0).ok();
    let mut notified = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        rx.refill();
        let mut bytes = 0usize;
        let got = rx.poll_with(|_, data| bytes += data.iter().map(|d| d.len()).sum::<usize>())?;
        if got > 0 {
            let got = u64::try_from(got).unwrap_or(0);
            c.packets.fetch_add(got, Ordering::Relaxed);
            c.rx_packets.fetch_add(got, Ordering::Relaxed);
            c.rx_bytes
                .fetch_add(u64::try_from(bytes).unwrap_or(0), Ordering::Relaxed);
        } else {
            rx.wait(Duration::from_millis(5))?;
        }
        c.publish_notifications(&rx.stats(), &mut notified);
    }
    Ok(())
}

/// The frames of each direction a scenario runs.
type DirFrames = Vec<(Scenario, Vec<(VnetHdr, Vec<u8>)>)>;

/// The frames of each direction of `scenario` and the host peers that send or sink them.
fn start_traffic(
    scenario: Scenario,
    frame: usize,
    queues: usize,
    host_mac: [u8; 6],
) -> Result<(DirFrames, Vec<Peer>)> {
    let dirs: DirFrames = scenario
        .directions()
        .iter()
        .map(|&d| Ok((d, build_frames(d, frame, queues.max(1) * 4, host_mac)?)))
        .collect::<Result<_>>()?;
    let peers = dirs
        .iter()
        .map(|(d, f)| Peer::start(*d, frame, f))
        .collect::<Result<Vec<_>>>()?;
    Ok((dirs, peers))
}

/// Starts the guest threads of each queue pair's drivers (`drivers[i]` is pair `i`).
fn start_guest(drivers: Vec<(RxDriver, TxDriver)>, dirs: &DirFrames) -> Result<GuestLoad> {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(GuestCounters::default());
    let mut threads = Vec::new();
    for (i, (rx, tx)) in drivers.into_iter().enumerate() {
        let mut rx = Some(rx);
        let mut tx = Some(tx);
        for (dir, frames) in dirs {
            let (stop, c) = (stop.clone(), counters.clone());
            let t = match (dir, tx.take(), rx.take()) {
                (Scenario::Tx, Some(tx), rx_back) => {
                    rx = rx_back;
                    let (h, f) = frames[i % frames.len()].clone();
                    std::thread::Builder::new()
                        .name(format!("guest-tx{i}"))
                        .spawn(move || guest_tx_loop(tx, to_guest_hdr(&h), f, stop, c))?
                }
                (_, tx_back, Some(rx)) => {
                    tx = tx_back;
                    std::thread::Builder::new()
                        .name(format!("guest-rx{i}"))
                        .spawn(move || guest_rx_loop(rx, stop, c))?
                }
                _ => bail!("a direction twice in one scenario"),
            };
            threads.push(t);
        }
    }
    Ok(GuestLoad {
        stop,
        counters,
        threads,
    })
}

fn sum_counters(v: &[Counters]) -> Counters {
    let mut total = Counters::default();
    for c in v {
        total.add(c);
    }
    total
}

/// The host-side peer of a scenario.
enum Peer {
    Sink(crate::peers::PeerHandle<crate::peers::SinkReport>),
    Generator(crate::peers::PeerHandle<crate::peers::GeneratorReport>),
    None,
}

impl Peer {
    fn start(scenario: Scenario, frame: usize, frames: &[(VnetHdr, Vec<u8>)]) -> Result<Peer> {
        match scenario {
            Scenario::Tx if frame <= 1500 => {
                let mut cfg = UdpSinkConfig::new(
                    SocketAddrV4::new(HOST_IP, SINK_PORT),
                    RunControl::new(Arc::new(AtomicBool::new(false))).with_cpu(0),
                );
                cfg.buf_size = 2048;
                Ok(Peer::Sink(UdpSink::bind(cfg)?.spawn()?))
            }
            Scenario::Tx => Ok(Peer::None),
            Scenario::Rx | Scenario::Bidir => {
                let templates = frames
                    .iter()
                    .map(|(h, f)| Template {
                        vnet: *h,
                        frame: f.clone(),
                    })
                    .collect();
                let mut cfg = GeneratorConfig::new(
                    TAP_NAME,
                    templates,
                    RunControl::new(Arc::new(AtomicBool::new(false))).with_cpu(0),
                );
                cfg.vnet_hdr = frame > 1500;
                cfg.seq_mode = SeqMode::Off;
                Ok(Peer::Generator(PacketGenerator::new(cfg)?.spawn()?))
            }
        }
    }

    /// Stops the peer; returns (packets/s, CPU share).
    fn finish(self) -> Result<(f64, f64)> {
        match self {
            Peer::Sink(h) => {
                let r = h.stop_and_join()?;
                Ok((r.active_pps(), r.stats.cpu_utilization()))
            }
            Peer::Generator(h) => {
                let r = h.stop_and_join()?;
                Ok((r.stats.pps(), r.stats.cpu_utilization()))
            }
            Peer::None => Ok((0.0, 0.0)),
        }
    }
}

/// Stops the peers; their summed rate and their highest CPU share.
fn finish_peers(peers: Vec<Peer>) -> Result<(f64, f64)> {
    let mut pps = 0.0;
    let mut cpu: f64 = 0.0;
    for p in peers {
        let (r, c) = p.finish()?;
        pps += r;
        cpu = cpu.max(c);
    }
    Ok((pps, cpu))
}

fn measure_datapath(
    engine: EngineKind,
    scenario: Scenario,
    frame: usize,
    queues: usize,
    opts: &BenchOptions,
) -> Result<Sample> {
    let cfg = RigConfig {
        guest: bench_guest(queues)?,
        cpu_affinity: (0..queues).map(worker_cpu).collect(),
        ..RigConfig::new(engine, u16::try_from(queues)?)
    };
    let mut rig = Rig::start(&cfg).context("starting the rig")?;
    let (dirs, peers) = start_traffic(scenario, frame, queues, rig.host_mac)?;
    let drivers = (0..queues).map(|i| rig.take(i)).collect();
    let load = start_guest(drivers, &dirs)?;
    std::thread::sleep(opts.warmup);
    let stats = rig.device().worker_stats();
    let cpu0: u64 = stats.iter().filter_map(|s| s.cpu_time_ns()).sum();
    let c0 = sum_counters(&rig.device().counters());
    let g0 = load.counters.packets.load(Ordering::Relaxed);
    let a0 = crate::alloc_count::allocations();
    let t0 = Instant::now();
    std::thread::sleep(opts.duration);
    let elapsed = t0.elapsed();
    let c1 = sum_counters(&rig.device().counters());
    let g1 = load.counters.packets.load(Ordering::Relaxed);
    let a1 = crate::alloc_count::allocations();
    let cpu1: u64 = stats.iter().filter_map(|s| s.cpu_time_ns()).sum();
    load.finish()?;
    let (peer_pps, peer_cpu) = finish_peers(peers)?;
    rig.shutdown()?;
    let d = c1.delta(&c0);
    let (packets, bytes) = match scenario {
        Scenario::Tx => (d.tx_packets, d.tx_bytes),
        Scenario::Rx => (d.rx_packets, d.rx_bytes),
        Scenario::Bidir => (d.tx_packets + d.rx_packets, d.tx_bytes + d.rx_bytes),
    };
    let cpu_ns = cpu1.saturating_sub(cpu0);
    Ok(sample(
        packets,
        bytes,
        Some(cpu_ns),
        elapsed,
        queues,
        peer_pps,
        peer_cpu,
        per_sec(g1 - g0, elapsed),
        Some(
            d.rx_dropped_oversize
                + d.rx_dropped_no_buffers
                + d.tx_errors
                + d.tx_malformed
                + d.rx_malformed,
        ),
    )
    .with_counters(packets, &d)
    .with_allocations(a0.zip(a1).map(|(a, b)| b - a), packets))
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

/// The `vhost-user` engine: the backend process started for this cell, the same guest,
/// frames and peers as [`measure_datapath`]; packets and bytes counted by the guest.
fn measure_vhost_user(
    scenario: Scenario,
    frame: usize,
    queues: usize,
    opts: &BenchOptions,
) -> Result<Sample> {
    let backend = opts
        .backend
        .as_ref()
        .ok_or_else(|| anyhow!("the vhost-user engine needs a backend (--backend)"))?;
    let cpus: Vec<Option<usize>> = (0..queues).map(worker_cpu).collect();
    let mut rig = VhostUserRig::start(backend, bench_guest(queues)?, 1500, &cpus)
        .context("starting the vhost-user backend")?;
    let (dirs, peers) = start_traffic(scenario, frame, queues, rig.host_mac)?;
    let drivers = (0..queues).map(|i| rig.take(i)).collect();
    let load = start_guest(drivers, &dirs)?;
    std::thread::sleep(opts.warmup);
    let cpu0 = rig.backend_cpu_ns();
    let g0 = load.counters.read();
    let t0 = Instant::now();
    std::thread::sleep(opts.duration);
    let elapsed = t0.elapsed();
    let g1 = load.counters.read();
    let cpu1 = rig.backend_cpu_ns();
    load.finish()?;
    let (peer_pps, peer_cpu) = finish_peers(peers)?;
    let notes = rig.shutdown()?;
    let g = g1.delta(&g0);
    let (packets, bytes) = match scenario {
        Scenario::Tx => (g.tx_completed, g.tx_bytes),
        Scenario::Rx => (g.rx_packets, g.rx_bytes),
        Scenario::Bidir => (g.tx_completed + g.rx_packets, g.tx_bytes + g.rx_bytes),
    };
    let cpu_ns = cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a));
    let mut s = sample(
        packets,
        bytes,
        cpu_ns,
        elapsed,
        queues,
        peer_pps,
        peer_cpu,
        per_sec(g.packets, elapsed),
        None,
    )
    .with_guest_notifications(packets, &g);
    s.per_wait = None;
    s.notes.extend(notes);
    Ok(s)
}

impl Sample {
    #[allow(clippy::cast_precision_loss, reason = "ratios")]
    fn with_allocations(mut self, allocs: Option<u64>, packets: u64) -> Sample {
        self.allocs_per_packet = allocs.map(|a| a as f64 / packets.max(1) as f64);
        self
    }

    #[allow(clippy::cast_precision_loss, reason = "ratios")]
    fn with_counters(mut self, packets: u64, d: &Counters) -> Sample {
        let p = packets.max(1) as f64;
        self.per_wait = Some(p / d.batches.max(1) as f64);
        self.kicks = (d.tx_kicks + d.rx_kicks) as f64 / p;
        self.interrupts = (d.tx_interrupts + d.rx_interrupts) as f64 / p;
        self
    }

    /// Kicks and interrupts as the guest counted them (sent / received).
    #[allow(clippy::cast_precision_loss, reason = "ratios")]
    fn with_guest_notifications(mut self, packets: u64, g: &GuestCount) -> Sample {
        let p = packets.max(1) as f64;
        self.kicks = g.kicks as f64 / p;
        self.interrupts = g.interrupts as f64 / p;
        self
    }
}

#[allow(
    clippy::too_many_arguments,
    clippy::cast_precision_loss,
    reason = "a plain record; rates"
)]
fn sample(
    packets: u64,
    bytes: u64,
    cpu_ns: Option<u64>,
    elapsed: Duration,
    threads: usize,
    peer_pps: f64,
    peer_cpu: f64,
    guest_pps: f64,
    drops: Option<u64>,
) -> Sample {
    let mut s = Sample {
        pps: per_sec(packets, elapsed),
        gbps: per_sec(bytes, elapsed) * 8.0 / 1e9,
        cpu_ns_per_packet: cpu_ns.map(|c| {
            if packets > 0 {
                c as f64 / packets as f64
            } else {
                0.0
            }
        }),
        datapath_cpu: cpu_ns.map(|c| c as f64 / elapsed.as_nanos() as f64 / threads.max(1) as f64),
        peer_pps,
        peer_cpu,
        guest_pps,
        drops,
        per_wait: Some(0.0),
        kicks: 0.0,
        interrupts: 0.0,
        allocs_per_packet: None,
        notes: Vec::new(),
    };
    if peer_cpu > 0.95 {
        s.notes.push(format!(
            "host peer at {:.0}% CPU: may be peer-limited",
            peer_cpu * 100.0
        ));
    }
    if let Some(drops) = drops.filter(|&d| d > 0) {
        s.notes
            .push(format!("{drops} frames dropped or refused by the datapath"));
    }
    s
}

fn measure_floor(
    scenario: Scenario,
    frame: usize,
    queues: usize,
    opts: &BenchOptions,
) -> Result<Sample> {
    let tap = rig::host_tap(queues, 1500)?;
    let host_mac = netns::iface_mac(TAP_NAME)?;
    for q in tap.queues() {
        q.set_offload_from_features(bench_features())?;
    }
    let (dirs, peers) = start_traffic(scenario, frame, queues, host_mac)?;
    let window = opts.warmup + opts.duration;
    let results: Vec<floor::FloorResult> = std::thread::scope(|s| {
        let handles: Vec<_> = tap
            .queues()
            .iter()
            .enumerate()
            .flat_map(|(i, q)| dirs.iter().map(move |(dir, frames)| (i, q, *dir, frames)))
            .map(|(i, q, dir, frames)| {
                s.spawn(move || {
                    if let Some(c) = worker_cpu(i) {
                        cpu::pin_current_thread(c).ok();
                    }
                    match dir {
                        Scenario::Tx => {
                            // As many distinct buffers as the guest has TX slots, so the
                            // floor copies from the same memory footprint (a 64 KiB frame
                            // from a cold 16 MiB pool costs twice what it does from L2).
                            let bufs: Vec<Vec<u8>> = (0..FLOOR_TX_BUFFERS)
                                .map(|i| {
                                    let (h, f) = &frames[i % frames.len()];
                                    let mut v = h.to_bytes().to_vec();
                                    v.extend_from_slice(f);
                                    v
                                })
                                .collect();
                            floor::floor_tx(q.as_fd(), &bufs, 64, window)
                        }
                        Scenario::Rx | Scenario::Bidir => {
                            floor::floor_rx(q.as_fd(), 65_562 + 64, 64, window)
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow!("floor thread panicked"))?
                    .map_err(Into::into)
            })
            .collect::<Result<Vec<_>>>()
    })?;
    let (peer_pps, peer_cpu) = finish_peers(peers)?;
    drop(tap);
    rig::wait_tap_gone()?;
    // The floor counts over warm-up + window; it runs flat out from the start.
    let packets: u64 = results.iter().map(|r| r.packets).sum();
    let bytes: u64 = results.iter().map(|r| r.bytes).sum();
    let cpu_ns: u64 = results.iter().map(|r| r.cpu_ns).sum();
    let elapsed = results.iter().map(|r| r.elapsed).max().unwrap_or(window);
    let errors: u64 = results.iter().map(|r| r.errors).sum();
    Ok(sample(
        packets,
        bytes,
        Some(cpu_ns),
        elapsed,
        queues,
        peer_pps,
        peer_cpu,
        0.0,
        Some(errors),
    ))
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
        for load in [false, true] {
            for engine in &opts.engines {
                progress(&format!(
                    "latency {} {}",
                    engine.name(),
                    if load { "loaded" } else { "idle" }
                ));
                report.latency.push(
                    crate::latency::measure(
                        *engine,
                        load,
                        opts.latency_samples,
                        opts.backend.as_ref(),
                    )
                    .with_context(|| format!("latency {}", engine.name()))?,
                );
            }
        }
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
                let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); opts.engines.len()];
                for rep in 0..opts.repeats {
                    for k in 0..opts.engines.len() {
                        let e = (k + rep) % opts.engines.len();
                        let engine = opts.engines[e];
                        progress(&format!(
                            "[{cell}/{cells}] {} {frame}B q{queues} {} run {}/{}",
                            scenario.name(),
                            engine.name(),
                            rep + 1,
                            opts.repeats
                        ));
                        let s = match engine {
                            BenchEngine::Datapath(kind) => {
                                measure_datapath(kind, scenario, frame, queues, opts)
                            }
                            BenchEngine::Floor => measure_floor(scenario, frame, queues, opts),
                            BenchEngine::VhostUser => {
                                measure_vhost_user(scenario, frame, queues, opts)
                            }
                        }
                        .with_context(|| {
                            format!("{} {frame} q{queues} {}", scenario.name(), engine.name())
                        })?;
                        samples[e].push(s);
                    }
                }
                for (e, runs) in samples.into_iter().enumerate() {
                    report
                        .results
                        .push(summarize(scenario, frame, queues, opts.engines[e], &runs));
                }
            }
        }
    }
    Ok(report)
}

fn summarize(
    scenario: Scenario,
    frame: usize,
    queues: usize,
    engine: BenchEngine,
    runs: &[Sample],
) -> ThroughputResult {
    let col = |f: fn(&Sample) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    // The median of the repeats that know the value; None if none does.
    let known = |f: fn(&Sample) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let pps: Vec<f64> = runs.iter().map(|s| s.pps).collect();
    let mut notes: Vec<String> = runs.iter().flat_map(|s| s.notes.clone()).collect();
    notes.sort();
    notes.dedup();
    ThroughputResult {
        scenario: scenario.name().into(),
        frame,
        queues,
        engine: engine.name(),
        pps: median(&pps),
        gbps: col(|s| s.gbps),
        cpu_ns_per_packet: known(|s| s.cpu_ns_per_packet),
        pps_min: pps.iter().copied().fold(f64::INFINITY, f64::min),
        pps_max: pps.iter().copied().fold(0.0, f64::max),
        pps_runs: pps,
        peer_pps: col(|s| s.peer_pps),
        peer_cpu: col(|s| s.peer_cpu),
        datapath_cpu: known(|s| s.datapath_cpu),
        guest_pps: col(|s| s.guest_pps),
        datapath_drops: runs.iter().map(|s| s.drops).sum::<Option<u64>>(),
        packets_per_wait: known(|s| s.per_wait),
        kicks_per_packet: col(|s| s.kicks),
        interrupts_per_packet: col(|s| s.interrupts),
        allocations_per_packet: runs
            .iter()
            .filter_map(|s| s.allocs_per_packet)
            .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a)))),
        notes,
    }
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

/// Hands the datapath from process to process `opts.handoffs` times under steady
/// bidirectional traffic; downtime is measured inside (quiesce start to the successor's first
/// used-ring update), gaps and losses by the traffic endpoints outside.
fn measure_handoffs(
    engine: EngineKind,
    queues: usize,
    opts: &BenchOptions,
) -> Result<HandoffResult> {
    let exe = crate::self_exe();
    let guest = GuestConfig {
        queue_pairs: u16::try_from(queues)?,
        ..GuestConfig::default()
    };
    let child = tapir_testkit::ChildOptions {
        cpus: Vec::new(),
        rt_priority: opts.handoff_rt_priority,
    };
    let mut rig = tapir_testkit::HandoffRig::launch(&exe, engine, guest, child)?;
    // Runs of many handoffs do not wait for each predecessor's idle-priority teardown.
    rig.defer_teardown(8);
    let traffic = tapir_testkit::SteadyTraffic::start(&mut rig, opts.handoff_pps)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss_kib = rig.datapath_rss_anon_kib().unwrap_or(0);
    // The same traffic without handoffs: what the machine's own scheduling does to it.
    traffic.start_window();
    std::thread::sleep(Duration::from_secs(1));
    let baseline_gap = traffic.end_window();
    let mut downtime = Vec::with_capacity(opts.handoffs);
    let mut switch = Vec::with_capacity(opts.handoffs);
    let mut phases = Vec::with_capacity(opts.handoffs);
    for _ in 0..opts.handoffs {
        let s = rig.handoff()?;
        downtime.push(s.downtime_us);
        switch.push(s.switch_us);
        phases.push(s.phases_us);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = traffic.finish()?;
    rig.shutdown()?;
    let pct = |v: &[f64], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return 0.0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a short vector"
        )]
        let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
        s[i.min(s.len() - 1)]
    };
    let (g, h) = (t.guest_to_host, t.host_to_guest);
    Ok(HandoffResult {
        queues,
        handoffs: opts.handoffs,
        engine: engine.to_string(),
        downtime_us_p50: pct(&downtime, 50.0),
        downtime_us_p99: pct(&downtime, 99.0),
        downtime_us_max: pct(&downtime, 100.0),
        switch_us_p50: pct(&switch, 50.0),
        gap_us_max: g.max_gap_us.max(h.max_gap_us),
        baseline_gap_us_max: baseline_gap,
        lost: g.lost + h.lost,
        lost_by_tapir: g.lost.saturating_sub(g.dropped_by_kernel)
            + h.lost.saturating_sub(h.dropped_by_kernel),
        dropped_by_kernel: g.dropped_by_kernel + h.dropped_by_kernel,
        tap_tx_dropped: h.dropped_by_kernel,
        udp_rcvbuf_errors: g.dropped_by_kernel,
        duplicated: g.duplicated + h.duplicated,
        reordered: g.reordered + h.reordered,
        traffic_pps: opts.handoff_pps,
        sent: g.sent + h.sent,
        rss_anon_kib: rss_kib,
        phases_us_p50: std::array::from_fn(|i| {
            pct(&phases.iter().map(|p| p[i]).collect::<Vec<_>>(), 50.0)
        }),
        phases_us_p99: std::array::from_fn(|i| {
            pct(&phases.iter().map(|p| p[i]).collect::<Vec<_>>(), 99.0)
        }),
        downtime_us: downtime,
    })
}
