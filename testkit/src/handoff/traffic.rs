//! Steady, sequence-numbered UDP in both directions through a [`HandoffRig`], and what
//! arrived: lost, duplicated, reordered, the largest gap between arrivals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};

use super::HandoffRig;
use crate::frames;
use crate::netns;
use crate::rig::{self, GUEST_MAC, TAP_NAME};

/// Per-direction result of a steady traffic run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DirectionReport {
    /// Datagrams sent.
    pub sent: u64,
    /// Distinct datagrams received.
    pub received: u64,
    /// Sent and never received.
    pub lost: u64,
    /// Received more than once.
    pub duplicated: u64,
    /// Received after a later one of the same flow.
    pub reordered: u64,
    /// Largest time between two consecutive arrivals of one flow, in µs.
    pub max_gap_us: f64,
    /// Every gap between two consecutive arrivals of a flow of at least [`GAP_NOTED`]:
    /// (CLOCK_MONOTONIC ns of the arrival that ended it, its length in ns), so that a gap can
    /// be told to be a handoff's or not.
    #[serde(skip)]
    pub gaps: Gaps,
    /// Frames the kernel itself dropped on the way, outside tapir: a full TAP queue
    /// (host->guest, when the datapath or the guest is starved of CPU) or a full socket
    /// buffer (guest->host).
    pub dropped_by_kernel: u64,
}

/// Gaps of a flow: (CLOCK_MONOTONIC ns of the arrival that ended it, length in ns). Its
/// `Debug` shows how many and the longest, not thousands of pairs.
#[derive(Clone, Default)]
pub struct Gaps(pub Vec<(u64, u64)>);

impl std::fmt::Debug for Gaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let longest = self.0.iter().map(|g| g.1).max().unwrap_or(0);
        write!(
            f,
            "{} gaps of at least {GAP_NOTED} ns, longest {longest} ns",
            self.0.len()
        )
    }
}

#[derive(Default)]
struct FlowTrack {
    next: u64,
    seen: SeenSet,
    duplicated: u64,
    reordered: u64,
    /// CLOCK_MONOTONIC ns of the last arrival.
    last: Option<u64>,
}

/// Gaps of a flow at least this long are kept with their time (ns): the traffic comes in
/// 100 µs ticks, so shorter ones are the ticks themselves.
pub const GAP_NOTED: u64 = 250_000;

/// Sequence numbers already received, one bit each: constant time per arrival at any length
/// of run. A `HashSet` here rehashed all it held whenever it grew (110 ms at 3.7 M entries),
/// and the receiver stalled behind the lock meanwhile: those stalls were the handoff runs'
/// longest traffic gaps, and the TAP drops behind them (issue 10).
#[derive(Default)]
struct SeenSet {
    /// Bit `s % 64` of word `s / 64`: `s` was received.
    bits: Vec<u64>,
    /// Numbers too large for the bitmap (never sent by this traffic; kept exact anyway).
    beyond: std::collections::HashSet<u64>,
    len: u64,
}

/// Sequence numbers below this are kept in the bitmap (32 MiB at most).
const BITMAP_SEQS: u64 = 1 << 28;

impl SeenSet {
    /// Adds `seq`; false if it was already there.
    fn insert(&mut self, seq: u64) -> bool {
        let fresh = if seq < BITMAP_SEQS {
            // Below 2^28: the index fits any usize.
            let word = (seq / 64) as usize;
            if word >= self.bits.len() {
                // Doubling: a copy of at most the bitmap's size, rarely.
                let want = (word + 1).max(self.bits.len() * 2).max(1024);
                self.bits.resize(want, 0);
            }
            let bit = 1u64 << (seq % 64);
            let fresh = self.bits[word] & bit == 0;
            self.bits[word] |= bit;
            fresh
        } else {
            self.beyond.insert(seq)
        };
        self.len += u64::from(fresh);
        fresh
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// Sequence tracking over many flows plus the inter-arrival gaps of each flow (one queue
/// pair stalled while the other delivers is a gap of its flow, not of the traffic as a whole).
#[derive(Default)]
struct Tracker {
    flows: std::collections::HashMap<u32, FlowTrack>,
    /// Largest gap of any flow, ns.
    max_gap: u64,
    /// Gaps of at least [`GAP_NOTED`]: (end, length), ns.
    gaps: Vec<(u64, u64)>,
    /// The largest gap since [`SteadyTraffic::start_window`], while a window is open.
    window_gap: Option<u64>,
}

impl Tracker {
    fn record(&mut self, flow: u32, seq: u64) {
        let now = tapir_datapath::monotonic_ns();
        let f = self.flows.entry(flow).or_default();
        if let Some(last) = f.last {
            let gap = now.saturating_sub(last);
            self.max_gap = self.max_gap.max(gap);
            if gap >= GAP_NOTED {
                self.gaps.push((now, gap));
            }
            if let Some(w) = &mut self.window_gap {
                *w = (*w).max(gap);
            }
        }
        f.last = Some(now);
        if !f.seen.insert(seq) {
            f.duplicated += 1;
        } else if seq < f.next {
            f.reordered += 1;
        } else {
            f.next = seq + 1;
        }
    }

    fn received(&self) -> u64 {
        self.flows.values().map(|f| f.seen.len()).sum()
    }

    fn report(&self, sent: u64, dropped_by_kernel: u64) -> DirectionReport {
        let received = self.received();
        DirectionReport {
            dropped_by_kernel,
            sent,
            received,
            lost: sent.saturating_sub(received),
            duplicated: self.flows.values().map(|f| f.duplicated).sum(),
            reordered: self.flows.values().map(|f| f.reordered).sum(),
            #[allow(clippy::cast_precision_loss, reason = "microseconds")]
            max_gap_us: self.max_gap as f64 / 1e3,
            gaps: Gaps(self.gaps.clone()),
        }
    }
}

/// Both directions.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TrafficReport {
    /// Guest to host.
    pub guest_to_host: DirectionReport,
    /// Host to guest.
    pub host_to_guest: DirectionReport,
}

/// Sequence-numbered UDP in both directions at a steady rate, one flow per queue pair and
/// direction, sent in 100 µs ticks (so that the first frame after a handoff's blackout comes
/// within ~100 µs and the measured downtime is not padded by idle time).
pub struct SteadyTraffic {
    stop: Arc<AtomicBool>,
    senders: Vec<std::thread::JoinHandle<Result<u64>>>,
    receivers: Vec<std::thread::JoinHandle<Result<()>>>,
    receiving: Arc<AtomicBool>,
    host_track: Arc<Mutex<Tracker>>,
    guest_track: Arc<Mutex<Tracker>>,
    /// TAP TX drops and UDP receive-buffer errors when the traffic started.
    kernel_drops0: (u64, u64),
}

fn kernel_drops() -> (u64, u64) {
    (
        netns::iface_stats(TAP_NAME).map_or(0, |s| s.tx_dropped),
        netns::snmp_counter("Udp", "RcvbufErrors").unwrap_or(0),
    )
}

const SINK_PORT: u16 = 9000;
/// Traffic is sent in bursts this far apart.
const TICK: Duration = Duration::from_micros(100);
const GUEST_PORT: u16 = 7000;
/// Host-to-guest flows are numbered from here.
const H2G_FLOW_BASE: u32 = 1000;

fn ticks(stop: &AtomicBool, per_tick: u64, mut send: impl FnMut(u64) -> Result<()>) -> Result<u64> {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut tick = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..per_tick {
            send(sent)?;
            sent += 1;
        }
        tick += 1;
        let next = start + TICK * u32::try_from(tick).unwrap_or(u32::MAX);
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    }
    Ok(sent)
}

impl SteadyTraffic {
    /// Opens a measuring window: from now, [`end_window`](Self::end_window) reports the
    /// largest gap between arrivals (either direction), e.g. over a stretch without handoffs.
    pub fn start_window(&self) {
        for t in [&self.host_track, &self.guest_track] {
            if let Ok(mut t) = t.lock() {
                t.window_gap = Some(0);
            }
        }
    }

    /// Closes the window: the largest gap of a flow in it, µs.
    pub fn end_window(&self) -> f64 {
        let mut gap = 0u64;
        for t in [&self.host_track, &self.guest_track] {
            if let Ok(mut t) = t.lock() {
                gap = gap.max(t.window_gap.take().unwrap_or_default());
            }
        }
        #[allow(clippy::cast_precision_loss, reason = "microseconds")]
        let us = gap as f64 / 1e3;
        us
    }

    /// Datagrams the kernel dropped (TAP queue, host socket) since the traffic started.
    pub fn kernel_drops_so_far(&self) -> u64 {
        let (tap, udp) = kernel_drops();
        tap.saturating_sub(self.kernel_drops0.0) + udp.saturating_sub(self.kernel_drops0.1)
    }

    /// Starts `pps` datagrams per second per direction (split over the queue pairs). Takes
    /// every pair's drivers from the rig. Must run in the rig's namespace.
    pub fn start(rig: &mut HandoffRig, pps: u64) -> Result<SteadyTraffic> {
        let pairs = rig.drivers.len();
        let ticks_per_s = 1_000_000 / u64::try_from(TICK.as_micros()).unwrap_or(1_000_000);
        let per_tick = (pps / ticks_per_s / pairs as u64).max(1);
        let kernel_drops0 = kernel_drops();
        let stop = Arc::new(AtomicBool::new(false));
        let receiving = Arc::new(AtomicBool::new(true));
        let host_track = Arc::new(Mutex::new(Tracker::default()));
        let guest_track = Arc::new(Mutex::new(Tracker::default()));
        let mut senders = Vec::new();
        let mut receivers = Vec::new();
        // Host sink.
        let sink = std::net::UdpSocket::bind((rig::HOST_IP, SINK_PORT))?;
        sink.set_read_timeout(Some(Duration::from_millis(20)))?;
        // A large receive buffer: the sink thread shares two CPUs with the guest, the traffic
        // and the datapath processes, and must not drop what tapir delivered.
        nix::sys::socket::setsockopt(&sink, nix::sys::socket::sockopt::RcvBufForce, &(32 << 20))?;
        {
            let (receiving, track) = (receiving.clone(), host_track.clone());
            receivers.push(std::thread::spawn(move || -> Result<()> {
                let mut buf = vec![0u8; 2048];
                while receiving.load(Ordering::Relaxed) {
                    match sink.recv_from(&mut buf) {
                        Ok((n, _)) => {
                            let (flow, seq) = frames::read_payload_header(&buf[..n])
                                .ok_or_else(|| anyhow!("host sink: datagram without a header"))?;
                            track
                                .lock()
                                .map_err(|_| anyhow!("poisoned"))?
                                .record(flow, seq);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                Ok(())
            }));
        }
        for i in 0..pairs {
            let (mut rx, mut tx) = rig.take(i);
            let flow = frames::FlowSpec {
                src_mac: GUEST_MAC,
                dst_mac: rig.host_mac,
                src_ip: rig::GUEST_IP,
                dst_ip: rig::HOST_IP,
                src_port: 20_000 + u16::try_from(i)?,
                dst_port: SINK_PORT,
            };
            // Guest TX.
            let s = stop.clone();
            senders.push(std::thread::spawn(move || -> Result<u64> {
                let mut buf = vec![0u8; 256];
                let flow_id = u32::try_from(i)?;
                let hdr = tapir_simguest::VirtioNetHdr::default();
                let sent = ticks(&s, per_tick, |seq| {
                    let n = frames::build_udp(&mut buf, &flow, 128, flow_id, seq)?;
                    loop {
                        tx.reclaim();
                        if tx.push(&hdr, &buf[..n])? {
                            break;
                        }
                        tx.wait(Duration::from_millis(1))?;
                    }
                    tx.flush();
                    Ok(())
                })?;
                // Let the last ones complete.
                let deadline = Instant::now() + Duration::from_secs(5);
                while tx.in_flight() > 0 && Instant::now() < deadline {
                    tx.reclaim();
                    tx.wait(Duration::from_millis(5))?;
                }
                // Every TX chain must come back exactly once, with a head the guest posted.
                let st = tx.stats();
                if st.device_errors > 0 || tx.in_flight() > 0 {
                    bail!(
                        "guest TX: {} bogus used entries, {} chains never completed",
                        st.device_errors,
                        tx.in_flight()
                    );
                }
                Ok(sent)
            }));
            // Guest RX.
            let (receiving, track) = (receiving.clone(), guest_track.clone());
            receivers.push(std::thread::spawn(move || -> Result<()> {
                while receiving.load(Ordering::Relaxed) {
                    rx.refill();
                    let mut err = None;
                    let got = rx.poll_with(|_, slices| {
                        let frame: Vec<u8> = slices.concat();
                        match frames::parse_udp(&frame)
                            .and_then(|u| frames::read_payload_header(u.payload))
                        {
                            Some((flow, seq)) => {
                                if let Ok(mut t) = track.lock() {
                                    t.record(flow, seq);
                                }
                            }
                            None => err = Some(anyhow!("guest: a frame that is not our UDP")),
                        }
                    })?;
                    if let Some(e) = err {
                        return Err(e);
                    }
                    if got == 0 {
                        rx.wait(Duration::from_millis(5))?;
                    }
                }
                Ok(())
            }));
            // Host -> guest.
            let s = stop.clone();
            senders.push(std::thread::spawn(move || -> Result<u64> {
                let sock = std::net::UdpSocket::bind((rig::HOST_IP, 0))?;
                let flow_id = H2G_FLOW_BASE + u32::try_from(i)?;
                let mut payload = vec![0u8; 128];
                let dst = (rig::GUEST_IP, GUEST_PORT + u16::try_from(i)?);
                ticks(&s, per_tick, |seq| {
                    frames::write_payload(&mut payload, flow_id, seq);
                    sock.send_to(&payload, dst)?;
                    Ok(())
                })
            }));
        }
        Ok(SteadyTraffic {
            stop,
            senders,
            receivers,
            receiving,
            host_track,
            guest_track,
            kernel_drops0,
        })
    }

    /// Stops sending, waits (up to 5 s) for everything sent to arrive, and reports.
    pub fn finish(self) -> Result<TrafficReport> {
        self.stop.store(true, Ordering::Relaxed);
        let mut g2h_sent = 0;
        let mut h2g_sent = 0;
        for (k, s) in self.senders.into_iter().enumerate() {
            let n = s.join().map_err(|_| anyhow!("sender panicked"))??;
            // Senders alternate: guest TX, host -> guest.
            if k % 2 == 0 {
                g2h_sent += n;
            } else {
                h2g_sent += n;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let h = self
                .host_track
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .received();
            let g = self
                .guest_track
                .lock()
                .map_err(|_| anyhow!("poisoned"))?
                .received();
            if (h >= g2h_sent && g >= h2g_sent) || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.receiving.store(false, Ordering::Relaxed);
        for r in self.receivers {
            r.join().map_err(|_| anyhow!("receiver panicked"))??;
        }
        let host = self.host_track.lock().map_err(|_| anyhow!("poisoned"))?;
        let guest = self.guest_track.lock().map_err(|_| anyhow!("poisoned"))?;
        let (tap1, udp1) = kernel_drops();
        let (tap0, udp0) = self.kernel_drops0;
        Ok(TrafficReport {
            guest_to_host: host.report(g2h_sent, udp1.saturating_sub(udp0)),
            host_to_guest: guest.report(h2g_sent, tap1.saturating_sub(tap0)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_counts_loss_duplicates_and_reordering_per_flow() {
        let mut t = Tracker::default();
        for seq in [0, 1, 2, 4, 3, 4, 5] {
            t.record(7, seq);
        }
        // Flow 8 interleaved, with a number past the bitmap.
        for seq in [0, BITMAP_SEQS + 5, BITMAP_SEQS + 5, 1] {
            t.record(8, seq);
        }
        let r = t.report(6 + 3, 0);
        assert_eq!(r.received, 6 + 3);
        assert_eq!(r.lost, 0);
        assert_eq!(r.duplicated, 1 + 1);
        assert_eq!(r.reordered, 1 + 1);
        let r = t.report(20, 0);
        assert_eq!(r.lost, 20 - 9);
    }

    #[test]
    fn the_seen_set_grows_past_its_first_words_and_stays_exact() {
        let mut s = SeenSet::default();
        for seq in (0..200_000u64).step_by(3) {
            assert!(s.insert(seq));
        }
        for seq in (0..200_000u64).step_by(3) {
            assert!(!s.insert(seq), "{seq} twice");
        }
        assert!(s.insert(1));
        let inserted = (0..200_000u64).step_by(3).count() as u64;
        assert_eq!(s.len(), inserted + 1);
    }
}
