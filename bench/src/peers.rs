//! Host-side traffic peers: a raw packet generator on an interface
//! ([`PacketGenerator`]), a UDP sink ([`UdpSink`]), a UDP reflector
//! ([`UdpEcho`]) and a UDP sender through the routing stack ([`UdpSender`]),
//! plus the per-flow [`SeqTracker`].
//!
//! Every peer creates its socket in its constructor — in the *calling
//! thread's* network namespace — and then runs either on the calling thread
//! (`run`) or on its own thread (`spawn`, optionally pinned) until the stop
//! flag is set, the duration elapses or a packet budget is reached (see
//! [`RunControl`]). Each reports packets, bytes, wall time and its own thread
//! CPU time ([`PeerStats`]) so a benchmark can tell when a peer is the
//! bottleneck. The hot loops do not allocate.

use std::io;
use std::mem;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tapir_testkit::cpu;
use tapir_testkit::frames::{
    self, PayloadError, PayloadLoc, VnetHdr, PAYLOAD_HDR_LEN, VIRTIO_NET_HDR_F_NEEDS_CSUM,
    VNET_HDR_LEN,
};
use tapir_testkit::netns::{self, NetnsError};

/// `PACKET_VNET_HDR_SZ` (Linux 6.2+): choose the vnet header size of a packet socket.
const PACKET_VNET_HDR_SZ: libc::c_int = 24;

/// Errors from peers.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Interface lookup etc.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// An invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The peer thread panicked.
    #[error("peer thread panicked")]
    Panicked,
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> PeerError {
    move |source| PeerError::Io { context, source }
}

fn last_err(context: &'static str) -> PeerError {
    PeerError::Io {
        context,
        source: io::Error::last_os_error(),
    }
}

// ---------------------------------------------------------------------------
// Run control and reporting

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
    #[must_use]
    pub fn for_duration(d: Duration) -> Self {
        Self::new(Arc::new(AtomicBool::new(false))).with_duration(d)
    }

    /// Sets the duration limit.
    #[must_use]
    pub fn with_duration(mut self, d: Duration) -> Self {
        self.duration = Some(d);
        self
    }

    /// Sets the packet budget.
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
struct Clock {
    start: Instant,
    deadline: Option<Instant>,
    cpu0: Duration,
}

impl Clock {
    fn start(ctl: &RunControl) -> Self {
        let start = Instant::now();
        Self {
            start,
            deadline: ctl.duration.map(|d| start + d),
            cpu0: cpu::thread_cpu_time(),
        }
    }

    fn done(&self, ctl: &RunControl, packets: u64) -> bool {
        ctl.stop.load(Ordering::Relaxed)
            || ctl.max_packets.is_some_and(|m| packets >= m)
            || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn finish(&self, stats: &mut PeerStats) {
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

    /// Bits per second over `elapsed`.
    #[must_use]
    pub fn bps(&self) -> f64 {
        rate(self.bytes, self.elapsed) * 8.0
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
fn rate(n: u64, d: Duration) -> f64 {
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

    /// Whether the thread has finished.
    #[must_use]
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
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

fn spawn_peer<R: Send + 'static>(
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

// ---------------------------------------------------------------------------
// Socket helpers

fn new_socket(
    domain: libc::c_int,
    ty: libc::c_int,
    proto: libc::c_int,
) -> Result<OwnedFd, PeerError> {
    // SAFETY: plain socket() call; the returned fd is owned below.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(last_err("socket"));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `val` is a valid c_int and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            (&raw const val).cast(),
            socklen_of::<libc::c_int>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_timeout(fd: RawFd, opt: libc::c_int, d: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(d.subsec_micros()),
    };
    // SAFETY: `tv` is a valid timeval and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw const tv).cast(),
            socklen_of::<libc::timeval>(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets a socket buffer size, trying the `*FORCE` variant (root) first.
fn set_buf(fd: RawFd, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
        // Best effort: the plain variant is capped by rmem_max / wmem_max.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, v);
    }
}

/// The socket's kernel drop counter (`SO_MEMINFO`, `SK_MEMINFO_DROPS`).
fn socket_drops(fd: RawFd) -> u64 {
    let mut info = [0u32; 16];
    let mut len = libc::socklen_t::try_from(mem::size_of_val(&info)).unwrap_or(0);
    // SAFETY: `info` is writable for `len` bytes; the kernel writes at most that.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    let idx = usize::try_from(libc::SK_MEMINFO_DROPS).unwrap_or(8);
    if rc != 0 || usize::try_from(len).unwrap_or(0) < (idx + 1) * 4 {
        return 0;
    }
    u64::from(info[idx])
}

fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

fn from_sockaddr_in(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

fn udp_socket(bind: Option<SocketAddrV4>) -> Result<OwnedFd, PeerError> {
    let fd = new_socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    if let Some(b) = bind {
        let sa = sockaddr_in(b);
        // SAFETY: `sa` is a valid sockaddr_in and its size is passed.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const sa).cast(),
                socklen_of::<libc::sockaddr_in>(),
            )
        };
        if rc != 0 {
            return Err(last_err("bind (UDP)"));
        }
    }
    Ok(fd)
}

fn local_addr(fd: RawFd) -> Result<SocketAddrV4, PeerError> {
    // SAFETY: all-zero sockaddr_in is valid.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    let mut len = socklen_of::<libc::sockaddr_in>();
    // SAFETY: `sa` is writable for `len` bytes.
    let rc = unsafe { libc::getsockname(fd, (&raw mut sa).cast(), &raw mut len) };
    if rc != 0 {
        return Err(last_err("getsockname"));
    }
    Ok(from_sockaddr_in(&sa))
}

fn is_backpressure(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR)
    )
}

/// Converts a non-negative syscall count to usize.
fn count(n: libc::c_int) -> usize {
    usize::try_from(n).unwrap_or(0)
}

fn c_uint(n: usize) -> libc::c_uint {
    libc::c_uint::try_from(n).unwrap_or(libc::c_uint::MAX)
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Zeroed mmsghdr/iovec arrays (plain old data).
/// One `recvmmsg` (`MSG_WAITFORONE`) into `msgs`: the number of messages received, or None on
/// backpressure (try again).
///
/// # Safety
/// Every header in `msgs` must point at live iovecs (and names, if set) whose buffers stay
/// valid and unaliased for the call.
unsafe fn recv_batch(raw: RawFd, msgs: &mut [libc::mmsghdr]) -> Result<Option<usize>, PeerError> {
    // SAFETY: forwarded to the caller's contract; the length is the slice's.
    let rc = unsafe {
        libc::recvmmsg(
            raw,
            msgs.as_mut_ptr(),
            c_uint(msgs.len()),
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if is_backpressure(&e) {
            return Ok(None);
        }
        return Err(PeerError::Io {
            context: "recvmmsg",
            source: e,
        });
    }
    Ok(Some(count(rc)))
}

fn zeroed_vec<T>(n: usize) -> Vec<T> {
    // SAFETY: only used for libc iovec / mmsghdr / sockaddr types, for which
    // all-zero bytes are a valid value.
    (0..n).map(|_| unsafe { mem::zeroed() }).collect()
}

/// Paces a sender at `pps`: how many packets may go now, at most `batch`;
/// sleeps (or spins when close) until at least one may.
struct Pacer {
    pps: Option<u64>,
    start: Instant,
}

impl Pacer {
    fn allowance(&self, sent: u64, batch: usize, deadline: Option<Instant>) -> usize {
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

// ---------------------------------------------------------------------------
// SeqTracker

const SEQ_WINDOW_WORDS: usize = 64;
const SEQ_WINDOW: u64 = 64 * 64;

#[derive(Debug, Clone)]
struct FlowSeq {
    flow: u32,
    next: u64,
    started: bool,
    stats: FlowSeqStats,
    /// Bit `s % SEQ_WINDOW` is set iff seq `s` in `[next - SEQ_WINDOW, next)`
    /// was received.
    seen: Box<[u64; SEQ_WINDOW_WORDS]>,
}

impl FlowSeq {
    #[allow(
        clippy::cast_possible_truncation,
        reason = "reduced modulo SEQ_WINDOW first"
    )]
    fn bit(s: u64) -> (usize, u64) {
        let b = (s % SEQ_WINDOW) as usize;
        (b / 64, 1u64 << (b % 64))
    }
}

/// Per-flow sequence statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FlowSeqStats {
    /// The flow id.
    pub flow: u32,
    /// Packets recorded.
    pub received: u64,
    /// Sequence numbers skipped and not (yet) seen late: currently missing
    /// below `next_expected`.
    pub lost: u64,
    /// Sequence numbers seen more than once.
    pub duplicates: u64,
    /// Sequence numbers that arrived late (after a higher one) and filled a gap.
    pub reordered: u64,
    /// Late arrivals too old for the window (duplicate or reordered, unknown).
    pub too_old: u64,
    /// One past the highest sequence number seen.
    pub next_expected: u64,
}

/// Totals over all flows of a [`SeqTracker`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeqSummary {
    /// Number of flows seen.
    pub flows: usize,
    /// Packets recorded.
    pub received: u64,
    /// Missing sequence numbers (gaps not filled later).
    pub lost: u64,
    /// Duplicates.
    pub duplicates: u64,
    /// Late arrivals that filled a gap.
    pub reordered: u64,
    /// Late arrivals outside the window.
    pub too_old: u64,
}

/// What [`SeqTracker::record`] concluded about one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqEvent {
    /// The expected next sequence number.
    InOrder,
    /// Ahead of the expected one; this many were skipped.
    Gap(u64),
    /// Already seen.
    Duplicate,
    /// Late but new: filled an earlier gap.
    Reordered,
    /// Late, older than the tracking window.
    TooOld,
}

/// Tracks per-flow sequence numbers: gaps (lost), duplicates and reordering,
/// with a 4096-entry window per flow for telling late arrivals from duplicates.
///
/// Flows are created on first sight (a small allocation, not per packet).
#[derive(Debug, Clone)]
pub struct SeqTracker {
    flows: Vec<FlowSeq>,
    last: usize,
    first_seq: Option<u64>,
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self::new()
    }
}

impl SeqTracker {
    /// Every flow is expected to start at sequence number 0.
    #[must_use]
    pub fn new() -> Self {
        Self::starting_at(0)
    }

    /// Every flow is expected to start at `first`.
    #[must_use]
    pub fn starting_at(first: u64) -> Self {
        Self {
            flows: Vec::new(),
            last: 0,
            first_seq: Some(first),
        }
    }

    /// The first sequence number seen on a flow becomes its baseline (earlier
    /// losses are not counted).
    #[must_use]
    pub fn baseline_on_first() -> Self {
        Self {
            flows: Vec::new(),
            last: 0,
            first_seq: None,
        }
    }

    fn flow_mut(&mut self, flow: u32) -> &mut FlowSeq {
        if self.flows.get(self.last).is_none_or(|f| f.flow != flow) {
            self.last = if let Some(i) = self.flows.iter().position(|f| f.flow == flow) {
                i
            } else {
                self.flows.push(FlowSeq {
                    flow,
                    next: self.first_seq.unwrap_or(0),
                    started: self.first_seq.is_some(),
                    stats: FlowSeqStats {
                        flow,
                        ..FlowSeqStats::default()
                    },
                    seen: Box::new([0; SEQ_WINDOW_WORDS]),
                });
                self.flows.len() - 1
            };
        }
        &mut self.flows[self.last]
    }

    /// Records one packet.
    pub fn record(&mut self, flow: u32, seq: u64) -> SeqEvent {
        let f = self.flow_mut(flow);
        if !f.started {
            f.started = true;
            f.next = seq;
        }
        f.stats.received += 1;
        let ev = if seq >= f.next {
            let gap = seq - f.next;
            if gap >= SEQ_WINDOW {
                f.seen.fill(0);
            } else {
                for s in f.next..seq {
                    let (w, m) = FlowSeq::bit(s);
                    f.seen[w] &= !m;
                }
            }
            let (w, m) = FlowSeq::bit(seq);
            f.seen[w] |= m;
            f.next = seq + 1;
            f.stats.lost += gap;
            if gap == 0 {
                SeqEvent::InOrder
            } else {
                SeqEvent::Gap(gap)
            }
        } else if f.next - seq > SEQ_WINDOW {
            f.stats.too_old += 1;
            SeqEvent::TooOld
        } else {
            let (w, m) = FlowSeq::bit(seq);
            if f.seen[w] & m != 0 {
                f.stats.duplicates += 1;
                SeqEvent::Duplicate
            } else {
                f.seen[w] |= m;
                f.stats.reordered += 1;
                f.stats.lost = f.stats.lost.saturating_sub(1);
                SeqEvent::Reordered
            }
        };
        f.stats.next_expected = f.next;
        ev
    }

    /// Statistics of one flow.
    #[must_use]
    pub fn flow(&self, flow: u32) -> Option<FlowSeqStats> {
        self.flows.iter().find(|f| f.flow == flow).map(|f| f.stats)
    }

    /// Statistics of all flows, in order of first appearance.
    pub fn flows(&self) -> impl Iterator<Item = FlowSeqStats> + '_ {
        self.flows.iter().map(|f| f.stats)
    }

    /// Totals over all flows.
    #[must_use]
    pub fn summary(&self) -> SeqSummary {
        let mut s = SeqSummary {
            flows: self.flows.len(),
            ..SeqSummary::default()
        };
        for f in &self.flows {
            s.received += f.stats.received;
            s.lost += f.stats.lost;
            s.duplicates += f.stats.duplicates;
            s.reordered += f.stats.reordered;
            s.too_old += f.stats.too_old;
        }
        s
    }
}

// ---------------------------------------------------------------------------
// PacketGenerator

/// One frame a [`PacketGenerator`] sends (cyclically with the others).
#[derive(Debug, Clone, Default)]
pub struct Template {
    /// Vnet header (used when the generator has `vnet_hdr` set), e.g. for
    /// GSO/TSO super-frames or `NEEDS_CSUM`.
    pub vnet: VnetHdr,
    /// The Ethernet frame.
    pub frame: Vec<u8>,
}

impl Template {
    /// A plain frame with an all-zero vnet header.
    #[must_use]
    pub fn plain(frame: Vec<u8>) -> Self {
        Self {
            vnet: VnetHdr::default(),
            frame,
        }
    }
}

/// How a sender updates the seq/flow payload per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeqMode {
    /// Send the templates unchanged.
    Off,
    /// Rewrite only the 8-byte sequence number (checksum fixed incrementally):
    /// receivers can check seq/flow but not the pattern.
    #[default]
    Header,
    /// Rewrite the whole payload so receivers can verify every byte.
    Full,
}

/// [`PacketGenerator`] configuration.
#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    /// Interface to send on (e.g. the TAP's host side).
    pub ifname: String,
    /// Frames to send round-robin. UDP or TCP frames built by
    /// [`frames`] get their sequence numbers rewritten per `seq_mode`.
    pub templates: Vec<Template>,
    /// Enable `PACKET_VNET_HDR` and prefix each frame with its template's vnet
    /// header (needed for GSO super-frames, which must not exceed
    /// [`frames::MAX_GSO_FRAME`] bytes with `qdisc_bypass`).
    pub vnet_hdr: bool,
    /// Messages per `sendmmsg`.
    pub batch: usize,
    /// Rate limit in packets per second.
    pub rate_pps: Option<u64>,
    /// Flow id written into every payload.
    pub flow: u32,
    /// First sequence number.
    pub start_seq: u64,
    /// Per-packet payload update.
    pub seq_mode: SeqMode,
    /// Set the UDP checksum of UDP templates to 0 instead of maintaining it.
    pub zero_udp_csum: bool,
    /// `PACKET_QDISC_BYPASS` (default on).
    pub qdisc_bypass: bool,
    /// Stop conditions and pinning.
    pub ctl: RunControl,
}

impl GeneratorConfig {
    /// Defaults: batch 64, no rate limit, flow 0 from seq 0, [`SeqMode::Header`],
    /// qdisc bypass, no vnet header.
    #[must_use]
    pub fn new(ifname: &str, templates: Vec<Template>, ctl: RunControl) -> Self {
        Self {
            ifname: ifname.to_owned(),
            templates,
            vnet_hdr: false,
            batch: 64,
            rate_pps: None,
            flow: 0,
            start_seq: 0,
            seq_mode: SeqMode::Header,
            zero_udp_csum: false,
            qdisc_bypass: true,
            ctl,
        }
    }
}

/// What a [`PacketGenerator`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GeneratorReport {
    /// Packets (super-frames count once), frame bytes, time, backpressure.
    pub stats: PeerStats,
    /// The next sequence number it would have used.
    pub next_seq: u64,
    /// The vnet header size the socket used (0, 10 or 12).
    pub vnet_hdr_len: usize,
    /// The last non-backpressure error, if any.
    pub last_error: Option<String>,
}

/// Sends prebuilt frames on an interface through an `AF_PACKET` raw socket
/// with `sendmmsg`. Frames sent out of a TAP interface arrive at the TAP
/// queue readers.
#[derive(Debug)]
pub struct PacketGenerator {
    fd: OwnedFd,
    ifindex: i32,
    vnet_len: usize,
    cfg: GeneratorConfig,
}

struct GenSlot {
    buf: Vec<u8>,
    hdr: usize,
    loc: Option<PayloadLoc>,
}

impl PacketGenerator {
    /// Opens and binds the packet socket in the calling thread's namespace.
    ///
    /// # Errors
    /// Bad configuration, unknown interface, socket errors.
    pub fn new(cfg: GeneratorConfig) -> Result<Self, PeerError> {
        if cfg.templates.is_empty() || cfg.batch == 0 {
            return Err(PeerError::Config(
                "need at least one template and batch >= 1".into(),
            ));
        }
        if cfg.vnet_hdr
            && cfg.qdisc_bypass
            && cfg.templates.iter().any(|t| {
                t.vnet.gso_type != frames::VIRTIO_NET_HDR_GSO_NONE
                    && t.frame.len() > frames::MAX_GSO_FRAME
            })
        {
            return Err(PeerError::Config(format!(
                "GSO frames over {} bytes get segmented in software, which \
                 PACKET_QDISC_BYPASS drops",
                frames::MAX_GSO_FRAME
            )));
        }
        let ifindex = netns::iface_index(&cfg.ifname)?;
        let ifindex = i32::try_from(ifindex).map_err(|_| PeerError::Config("ifindex".into()))?;
        let fd = new_socket(libc::AF_PACKET, libc::SOCK_RAW, 0)?;
        let raw = fd.as_raw_fd();
        let mut vnet_len = 0;
        if cfg.vnet_hdr {
            let sz = libc::c_int::try_from(VNET_HDR_LEN).unwrap_or(12);
            if setsockopt_int(raw, libc::SOL_PACKET, PACKET_VNET_HDR_SZ, sz).is_ok() {
                vnet_len = VNET_HDR_LEN;
            } else {
                setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)
                    .map_err(io_err("PACKET_VNET_HDR"))?;
                vnet_len = 10;
            }
        }
        if cfg.qdisc_bypass {
            setsockopt_int(raw, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, 1)
                .map_err(io_err("PACKET_QDISC_BYPASS"))?;
        }
        set_buf(raw, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 8 << 20);
        // Bind with protocol 0: send only, no receive hook.
        // SAFETY: all-zero sockaddr_ll is valid.
        let mut sll: libc::sockaddr_ll = unsafe { mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        sll.sll_ifindex = ifindex;
        // SAFETY: `sll` is a valid sockaddr_ll and its size is passed.
        let rc = unsafe {
            libc::bind(
                raw,
                (&raw const sll).cast(),
                socklen_of::<libc::sockaddr_ll>(),
            )
        };
        if rc != 0 {
            return Err(last_err("bind (AF_PACKET)"));
        }
        Ok(Self {
            fd,
            ifindex,
            vnet_len,
            cfg,
        })
    }

    /// Runs the generator on another thread (pinned if configured).
    ///
    /// # Errors
    /// Thread spawn failure.
    pub fn spawn(self) -> Result<PeerHandle<GeneratorReport>, PeerError> {
        let ctl = self.cfg.ctl.clone();
        spawn_peer("pktgen", &ctl, move || self.run())
    }

    fn build_slots(&self) -> Vec<GenSlot> {
        let cfg = &self.cfg;
        let n = cfg.templates.len();
        let nslots = n.max(cfg.batch);
        let mut slots = Vec::with_capacity(nslots);
        for i in 0..nslots {
            let t = &cfg.templates[i % n];
            let hdr = self.vnet_len;
            let mut buf = Vec::with_capacity(hdr + t.frame.len());
            buf.extend_from_slice(&t.vnet.to_bytes()[..hdr]);
            buf.extend_from_slice(&t.frame);
            let partial = cfg.vnet_hdr && t.vnet.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
            let frame = &mut buf[hdr..];
            if cfg.zero_udp_csum && !partial {
                frames::clear_udp_checksum(frame);
            }
            let loc = if cfg.seq_mode == SeqMode::Off {
                None
            } else {
                PayloadLoc::locate(frame, partial)
            };
            if let Some(l) = &loc {
                l.set_payload(frame, cfg.flow, cfg.start_seq);
            }
            slots.push(GenSlot { buf, hdr, loc });
        }
        slots
    }

    /// Runs the generator on the calling thread until a stop condition.
    ///
    /// # Errors
    /// Only setup errors; send errors are counted in the report.
    pub fn run(self) -> Result<GeneratorReport, PeerError> {
        let cfg = &self.cfg;
        let batch = cfg.batch;
        let mut slots = self.build_slots();
        let nslots = slots.len();
        let mut addrs: Vec<libc::sockaddr_ll> = zeroed_vec(nslots);
        for (a, s) in addrs.iter_mut().zip(&slots) {
            a.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
            a.sll_ifindex = self.ifindex;
            let (ethertype, dst) = frames::parse_ethernet(&s.buf[s.hdr..])
                .map_or((0, [0; 6]), |e| (e.ethertype, e.dst_mac));
            a.sll_protocol = ethertype.to_be();
            a.sll_halen = 6;
            a.sll_addr[..6].copy_from_slice(&dst);
        }
        let mut iovs: Vec<libc::iovec> = zeroed_vec(batch);
        let mut msgs: Vec<libc::mmsghdr> = zeroed_vec(batch);
        let ctl = &cfg.ctl;
        let clock = Clock::start(ctl);
        let pacer = Pacer {
            pps: cfg.rate_pps,
            start: clock.start,
        };
        let mut rep = GeneratorReport {
            vnet_hdr_len: self.vnet_len,
            ..GeneratorReport::default()
        };
        let mut cursor = 0usize;
        let mut seq = cfg.start_seq;
        let mut consecutive_errors = 0u32;
        while !clock.done(ctl, rep.stats.packets) {
            let mut n = pacer.allowance(rep.stats.packets, batch, clock.deadline);
            if let Some(m) = ctl.max_packets {
                let left = m.saturating_sub(rep.stats.packets);
                n = n.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            if n == 0 {
                continue;
            }
            for j in 0..n {
                let si = (cursor + j) % nslots;
                let slot = &mut slots[si];
                if let Some(loc) = &slot.loc {
                    let frame = &mut slot.buf[slot.hdr..];
                    let s = seq + u64_of(j);
                    match cfg.seq_mode {
                        SeqMode::Full => loc.set_payload(frame, cfg.flow, s),
                        _ => loc.set_seq(frame, s),
                    }
                }
                iovs[j].iov_base = slot.buf.as_mut_ptr().cast();
                iovs[j].iov_len = slot.buf.len();
                let h = &mut msgs[j].msg_hdr;
                h.msg_iov = &raw mut iovs[j];
                h.msg_iovlen = 1;
                h.msg_name = (&raw mut addrs[si]).cast();
                h.msg_namelen = socklen_of::<libc::sockaddr_ll>();
            }
            // SAFETY: `msgs[..n]` point at live iovecs, buffers and addresses
            // owned by this function; the kernel only reads them.
            let rc = unsafe {
                libc::sendmmsg(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr(),
                    c_uint(n),
                    libc::MSG_DONTWAIT,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if is_backpressure(&e) {
                    rep.stats.backpressure += 1;
                    std::thread::yield_now();
                } else {
                    rep.stats.errors += 1;
                    consecutive_errors += 1;
                    if consecutive_errors == 1 || rep.last_error.is_none() {
                        rep.last_error = Some(e.to_string());
                    }
                    if consecutive_errors > 10_000 {
                        break;
                    }
                }
                continue;
            }
            consecutive_errors = 0;
            let sent = count(rc);
            for j in 0..sent {
                let s = &slots[(cursor + j) % nslots];
                rep.stats.bytes += u64_of(s.buf.len() - s.hdr);
            }
            rep.stats.packets += u64_of(sent);
            seq += u64_of(sent);
            cursor = (cursor + sent) % nslots;
            if sent < n {
                rep.stats.backpressure += 1;
            }
        }
        clock.finish(&mut rep.stats);
        rep.next_seq = seq;
        Ok(rep)
    }
}

// ---------------------------------------------------------------------------
// UdpSink

/// How much of each received payload a [`UdpSink`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Count only.
    #[default]
    None,
    /// Read seq/flow (enables sequence tracking).
    Header,
    /// Verify every payload byte (and track sequences).
    Full,
}

/// [`UdpSink`] configuration.
#[derive(Debug, Clone)]
pub struct UdpSinkConfig {
    /// Address to bind (in the calling thread's namespace).
    pub bind: SocketAddrV4,
    /// Messages per `recvmmsg`.
    pub batch: usize,
    /// Receive buffer per message (bigger datagrams count as truncated errors).
    pub buf_size: usize,
    /// Payload checking.
    pub verify: Verify,
    /// Socket receive buffer (`SO_RCVBUFFORCE`).
    pub rcvbuf: usize,
    /// Stop conditions and pinning.
    pub ctl: RunControl,
}

impl UdpSinkConfig {
    /// Defaults: batch 64, 2048-byte buffers, no verification, 32 MiB rcvbuf.
    #[must_use]
    pub fn new(bind: SocketAddrV4, ctl: RunControl) -> Self {
        Self {
            bind,
            batch: 64,
            buf_size: 2048,
            verify: Verify::None,
            rcvbuf: 32 << 20,
            ctl,
        }
    }
}

/// What a [`UdpSink`] saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SinkReport {
    /// Datagrams and UDP payload bytes received.
    pub stats: PeerStats,
    /// Time from the first to the last received batch (use for rates when
    /// the sink waited for traffic).
    pub active: Duration,
    /// Payloads that failed verification (or had no header).
    pub verify_errors: u64,
    /// The first verification failure.
    #[serde(skip)]
    pub first_verify_error: Option<PayloadError>,
    /// Datagrams larger than the buffer.
    pub truncated: u64,
    /// Sequence statistics (when verifying).
    pub seq: Option<SeqSummary>,
    /// Per-flow sequence statistics (when verifying).
    pub flows: Vec<FlowSeqStats>,
    /// Datagrams the kernel dropped on this socket (`SO_MEMINFO`), e.g.
    /// because the receive buffer was full: the sink was the bottleneck.
    pub socket_drops: u64,
    /// Namespace-wide `Udp: RcvbufErrors` delta during the run.
    pub rcvbuf_errors: u64,
}

impl SinkReport {
    /// Packets per second over the active period.
    #[must_use]
    pub fn active_pps(&self) -> f64 {
        rate(self.stats.packets, self.active)
    }
}

/// A UDP receiver counting (and optionally verifying) datagrams with
/// `recvmmsg`.
#[derive(Debug)]
pub struct UdpSink {
    fd: OwnedFd,
    local: SocketAddrV4,
    cfg: UdpSinkConfig,
}

/// How long a blocking receive waits before re-checking stop conditions.
const RECV_POLL: Duration = Duration::from_millis(20);

impl UdpSink {
    /// Creates and binds the socket in the calling thread's namespace.
    ///
    /// # Errors
    /// Socket / bind errors.
    pub fn bind(cfg: UdpSinkConfig) -> Result<Self, PeerError> {
        if cfg.batch == 0 || cfg.buf_size == 0 {
            return Err(PeerError::Config("batch and buf_size must be >= 1".into()));
        }
        let fd = udp_socket(Some(cfg.bind))?;
        set_buf(
            fd.as_raw_fd(),
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            cfg.rcvbuf,
        );
        set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, RECV_POLL).map_err(io_err("SO_RCVTIMEO"))?;
        let local = local_addr(fd.as_raw_fd())?;
        Ok(Self { fd, local, cfg })
    }

    /// The bound address (with the actual port if 0 was requested).
    #[must_use]
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Runs the sink on another thread.
    ///
    /// # Errors
    /// Thread spawn failure.
    pub fn spawn(self) -> Result<PeerHandle<SinkReport>, PeerError> {
        let ctl = self.cfg.ctl.clone();
        spawn_peer("udpsink", &ctl, move || self.run())
    }

    /// Runs the sink on the calling thread until a stop condition.
    ///
    /// # Errors
    /// Fatal receive errors.
    pub fn run(self) -> Result<SinkReport, PeerError> {
        let cfg = &self.cfg;
        let batch = cfg.batch;
        let bs = cfg.buf_size;
        let raw = self.fd.as_raw_fd();
        let mut bufs = vec![0u8; batch * bs];
        let mut iovs: Vec<libc::iovec> = zeroed_vec(batch);
        let mut msgs: Vec<libc::mmsghdr> = zeroed_vec(batch);
        for (i, (iov, m)) in iovs.iter_mut().zip(msgs.iter_mut()).enumerate() {
            iov.iov_base = bufs[i * bs..].as_mut_ptr().cast();
            iov.iov_len = bs;
            m.msg_hdr.msg_iov = iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        let mut tracker = SeqTracker::baseline_on_first();
        let drops0 = socket_drops(raw);
        let rcvbuf0 = netns::snmp_counter("Udp", "RcvbufErrors").unwrap_or(0);
        let ctl = &cfg.ctl;
        let clock = Clock::start(ctl);
        let mut rep = SinkReport::default();
        let mut first: Option<Instant> = None;
        let mut last = clock.start;
        while !clock.done(ctl, rep.stats.packets) {
            for m in &mut msgs {
                m.msg_hdr.msg_flags = 0;
            }
            // SAFETY: every mmsghdr points at its own iovec and a disjoint
            // `bs`-byte region of `bufs`, all alive for the call.
            let Some(n) = (unsafe { recv_batch(raw, &mut msgs)? }) else {
                continue;
            };
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            for (i, m) in msgs[..n].iter().enumerate() {
                let len = usize::try_from(m.msg_len).unwrap_or(0);
                rep.stats.packets += 1;
                rep.stats.bytes += u64_of(len);
                if m.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                    rep.truncated += 1;
                    continue;
                }
                let payload = &bufs[i * bs..i * bs + len.min(bs)];
                let hdr = match cfg.verify {
                    Verify::None => continue,
                    Verify::Header => frames::read_payload_header(payload)
                        .ok_or(PayloadError::TooShort(payload.len())),
                    Verify::Full => frames::verify_payload(payload),
                };
                match hdr {
                    Ok((flow, seq)) => {
                        tracker.record(flow, seq);
                    }
                    Err(e) => {
                        rep.verify_errors += 1;
                        rep.first_verify_error.get_or_insert(e);
                    }
                }
            }
        }
        clock.finish(&mut rep.stats);
        rep.active = first.map_or(Duration::ZERO, |f| last - f);
        if cfg.verify != Verify::None {
            rep.seq = Some(tracker.summary());
            rep.flows = tracker.flows().collect();
        }
        rep.socket_drops = socket_drops(raw).saturating_sub(drops0);
        rep.rcvbuf_errors = netns::snmp_counter("Udp", "RcvbufErrors")
            .unwrap_or(0)
            .saturating_sub(rcvbuf0);
        Ok(rep)
    }
}

// ---------------------------------------------------------------------------
// UdpEcho

/// [`UdpEcho`] configuration.
#[derive(Debug, Clone)]
pub struct UdpEchoConfig {
    /// Address to bind.
    pub bind: SocketAddrV4,
    /// Messages per `recvmmsg` / `sendmmsg`.
    pub batch: usize,
    /// Receive buffer per message.
    pub buf_size: usize,
    /// Stop conditions and pinning.
    pub ctl: RunControl,
}

impl UdpEchoConfig {
    /// Defaults: batch 32, 2048-byte buffers.
    #[must_use]
    pub fn new(bind: SocketAddrV4, ctl: RunControl) -> Self {
        Self {
            bind,
            batch: 32,
            buf_size: 2048,
            ctl,
        }
    }
}

/// What a [`UdpEcho`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EchoReport {
    /// Datagrams echoed back and their payload bytes.
    pub stats: PeerStats,
    /// Datagrams received but not echoed (send failed or would block).
    pub dropped: u64,
}

/// A UDP reflector for latency measurements: every datagram goes back to its
/// source, batched with `recvmmsg` / `sendmmsg`.
#[derive(Debug)]
pub struct UdpEcho {
    fd: OwnedFd,
    local: SocketAddrV4,
    cfg: UdpEchoConfig,
}

impl UdpEcho {
    /// Creates and binds the socket in the calling thread's namespace.
    ///
    /// # Errors
    /// Socket / bind errors.
    pub fn bind(cfg: UdpEchoConfig) -> Result<Self, PeerError> {
        if cfg.batch == 0 || cfg.buf_size == 0 {
            return Err(PeerError::Config("batch and buf_size must be >= 1".into()));
        }
        let fd = udp_socket(Some(cfg.bind))?;
        set_buf(
            fd.as_raw_fd(),
            libc::SO_RCVBUFFORCE,
            libc::SO_RCVBUF,
            8 << 20,
        );
        set_buf(
            fd.as_raw_fd(),
            libc::SO_SNDBUFFORCE,
            libc::SO_SNDBUF,
            8 << 20,
        );
        set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, RECV_POLL).map_err(io_err("SO_RCVTIMEO"))?;
        let local = local_addr(fd.as_raw_fd())?;
        Ok(Self { fd, local, cfg })
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Runs the reflector on another thread.
    ///
    /// # Errors
    /// Thread spawn failure.
    pub fn spawn(self) -> Result<PeerHandle<EchoReport>, PeerError> {
        let ctl = self.cfg.ctl.clone();
        spawn_peer("udpecho", &ctl, move || self.run())
    }

    /// Runs the reflector on the calling thread.
    ///
    /// # Errors
    /// Fatal receive errors.
    pub fn run(self) -> Result<EchoReport, PeerError> {
        let cfg = &self.cfg;
        let batch = cfg.batch;
        let bs = cfg.buf_size;
        let raw = self.fd.as_raw_fd();
        let mut bufs = vec![0u8; batch * bs];
        let mut names: Vec<libc::sockaddr_in> = zeroed_vec(batch);
        let mut iovs: Vec<libc::iovec> = zeroed_vec(batch);
        let mut msgs: Vec<libc::mmsghdr> = zeroed_vec(batch);
        for (i, iov) in iovs.iter_mut().enumerate() {
            iov.iov_base = bufs[i * bs..].as_mut_ptr().cast();
        }
        let ctl = &cfg.ctl;
        let clock = Clock::start(ctl);
        let mut rep = EchoReport::default();
        while !clock.done(ctl, rep.stats.packets) {
            for i in 0..batch {
                iovs[i].iov_len = bs;
                let h = &mut msgs[i].msg_hdr;
                h.msg_iov = &raw mut iovs[i];
                h.msg_iovlen = 1;
                h.msg_name = (&raw mut names[i]).cast();
                h.msg_namelen = socklen_of::<libc::sockaddr_in>();
                h.msg_flags = 0;
            }
            // SAFETY: each mmsghdr points at its own iovec, name and disjoint
            // buffer region, all alive for the call.
            let Some(n) = (unsafe { recv_batch(raw, &mut msgs)? }) else {
                continue;
            };
            for i in 0..n {
                iovs[i].iov_len = usize::try_from(msgs[i].msg_len).unwrap_or(0).min(bs);
            }
            let mut done = 0;
            while done < n {
                // SAFETY: `msgs[done..n]` point at live iovecs (now sized to
                // the received lengths), buffers and source addresses.
                let rc = unsafe {
                    libc::sendmmsg(
                        raw,
                        msgs[done..].as_mut_ptr(),
                        c_uint(n - done),
                        libc::MSG_DONTWAIT,
                    )
                };
                if rc <= 0 {
                    let e = io::Error::last_os_error();
                    if is_backpressure(&e) {
                        rep.stats.backpressure += 1;
                    } else {
                        rep.stats.errors += 1;
                    }
                    rep.dropped += u64_of(n - done);
                    break;
                }
                let sent = count(rc);
                for iov in &iovs[done..done + sent] {
                    rep.stats.bytes += u64_of(iov.iov_len);
                }
                rep.stats.packets += u64_of(sent);
                done += sent;
            }
        }
        clock.finish(&mut rep.stats);
        Ok(rep)
    }
}

// ---------------------------------------------------------------------------
// UdpSender

/// [`UdpSender`] configuration.
#[derive(Debug, Clone)]
pub struct UdpSenderConfig {
    /// Destination (the socket is connected to it).
    pub dst: SocketAddrV4,
    /// Optional local address to bind first.
    pub bind: Option<SocketAddrV4>,
    /// UDP payload bytes per datagram (per segment with GSO); at least
    /// [`PAYLOAD_HDR_LEN`].
    pub payload_len: usize,
    /// With `Some(n)`: UDP GSO (`UDP_SEGMENT`), each send carrying `n`
    /// segments of `payload_len` bytes (total payload <= 65507 bytes).
    pub gso_segments: Option<usize>,
    /// Sends per `sendmmsg`.
    pub batch: usize,
    /// Rate limit in sends (super-datagrams) per second.
    pub rate_pps: Option<u64>,
    /// Flow id in every payload.
    pub flow: u32,
    /// First sequence number (one per segment).
    pub start_seq: u64,
    /// Per-packet payload update ([`SeqMode::Off`] sends a fixed payload).
    pub seq_mode: SeqMode,
    /// Stop conditions and pinning.
    pub ctl: RunControl,
}

impl UdpSenderConfig {
    /// Defaults: no bind, no GSO, batch 64, no rate limit, flow 0 from seq 0,
    /// [`SeqMode::Header`].
    #[must_use]
    pub fn new(dst: SocketAddrV4, payload_len: usize, ctl: RunControl) -> Self {
        Self {
            dst,
            bind: None,
            payload_len,
            gso_segments: None,
            batch: 64,
            rate_pps: None,
            flow: 0,
            start_seq: 0,
            seq_mode: SeqMode::Header,
            ctl,
        }
    }
}

/// What a [`UdpSender`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SenderReport {
    /// `packets` counts datagrams on the wire (GSO segments), `bytes` their
    /// UDP payload.
    pub stats: PeerStats,
    /// `sendmmsg` messages (super-datagrams with GSO).
    pub sends: u64,
    /// The next sequence number it would have used.
    pub next_seq: u64,
    /// The last non-backpressure error, if any.
    pub last_error: Option<String>,
}

/// A plain UDP generator through the routing stack (`sendmmsg`, optional
/// `UDP_SEGMENT` GSO).
#[derive(Debug)]
pub struct UdpSender {
    fd: OwnedFd,
    local: SocketAddrV4,
    cfg: UdpSenderConfig,
}

/// Largest UDP payload in one IPv4 datagram.
pub const MAX_UDP_PAYLOAD: usize = 65507;

impl UdpSender {
    /// Creates (and connects) the socket in the calling thread's namespace.
    ///
    /// # Errors
    /// Bad configuration, socket errors.
    pub fn new(cfg: UdpSenderConfig) -> Result<Self, PeerError> {
        let segs = cfg.gso_segments.unwrap_or(1);
        if cfg.batch == 0 || segs == 0 || cfg.payload_len < PAYLOAD_HDR_LEN {
            return Err(PeerError::Config(
                "batch, segments >= 1 and payload_len >= 12 required".into(),
            ));
        }
        if segs * cfg.payload_len > MAX_UDP_PAYLOAD {
            return Err(PeerError::Config(format!(
                "{segs} x {} bytes exceeds {MAX_UDP_PAYLOAD}",
                cfg.payload_len
            )));
        }
        let fd = udp_socket(cfg.bind)?;
        let raw = fd.as_raw_fd();
        set_buf(raw, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 8 << 20);
        set_timeout(raw, libc::SO_SNDTIMEO, RECV_POLL).map_err(io_err("SO_SNDTIMEO"))?;
        if cfg.gso_segments.is_some() {
            let sz = libc::c_int::try_from(cfg.payload_len).unwrap_or(0);
            setsockopt_int(raw, libc::SOL_UDP, libc::UDP_SEGMENT, sz)
                .map_err(io_err("UDP_SEGMENT"))?;
        }
        let sa = sockaddr_in(cfg.dst);
        // SAFETY: `sa` is a valid sockaddr_in and its size is passed.
        let rc = unsafe {
            libc::connect(
                raw,
                (&raw const sa).cast(),
                socklen_of::<libc::sockaddr_in>(),
            )
        };
        if rc != 0 {
            return Err(last_err("connect (UDP)"));
        }
        let local = local_addr(raw)?;
        Ok(Self { fd, local, cfg })
    }

    /// The local address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddrV4 {
        self.local
    }

    /// Runs the sender on another thread.
    ///
    /// # Errors
    /// Thread spawn failure.
    pub fn spawn(self) -> Result<PeerHandle<SenderReport>, PeerError> {
        let ctl = self.cfg.ctl.clone();
        spawn_peer("udpsend", &ctl, move || self.run())
    }

    /// Runs the sender on the calling thread.
    ///
    /// # Errors
    /// None after setup; send errors are counted.
    pub fn run(self) -> Result<SenderReport, PeerError> {
        let cfg = &self.cfg;
        let batch = cfg.batch;
        let segs = cfg.gso_segments.unwrap_or(1);
        let pl = cfg.payload_len;
        let msg_len = segs * pl;
        let mut bufs = vec![0u8; batch * msg_len];
        for (k, seg) in bufs.chunks_exact_mut(pl).enumerate() {
            frames::write_payload(seg, cfg.flow, cfg.start_seq + u64_of(k));
        }
        let mut iovs: Vec<libc::iovec> = zeroed_vec(batch);
        let mut msgs: Vec<libc::mmsghdr> = zeroed_vec(batch);
        for (i, iov) in iovs.iter_mut().enumerate() {
            iov.iov_base = bufs[i * msg_len..].as_mut_ptr().cast();
            iov.iov_len = msg_len;
        }
        let ctl = &cfg.ctl;
        let clock = Clock::start(ctl);
        let pacer = Pacer {
            pps: cfg.rate_pps,
            start: clock.start,
        };
        let mut rep = SenderReport::default();
        let mut seq = cfg.start_seq;
        let raw = self.fd.as_raw_fd();
        while !clock.done(ctl, rep.stats.packets) {
            let mut n = pacer.allowance(rep.sends, batch, clock.deadline);
            if let Some(m) = ctl.max_packets {
                let left =
                    usize::try_from(m.saturating_sub(rep.stats.packets)).unwrap_or(usize::MAX);
                n = n.min(left.div_ceil(segs));
            }
            if n == 0 {
                continue;
            }
            if cfg.seq_mode != SeqMode::Off {
                for (s, seg) in (seq..).zip(bufs[..n * msg_len].chunks_exact_mut(pl)) {
                    match cfg.seq_mode {
                        SeqMode::Full => frames::write_payload(seg, cfg.flow, s),
                        _ => frames::write_payload_seq(seg, s),
                    }
                }
            }
            for i in 0..n {
                let h = &mut msgs[i].msg_hdr;
                h.msg_iov = &raw mut iovs[i];
                h.msg_iovlen = 1;
            }
            // SAFETY: `msgs[..n]` point at live iovecs and buffers.
            let rc = unsafe { libc::sendmmsg(raw, msgs.as_mut_ptr(), c_uint(n), 0) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if is_backpressure(&e) {
                    rep.stats.backpressure += 1;
                } else {
                    // E.g. ECONNREFUSED from an ICMP port unreachable.
                    rep.stats.errors += 1;
                    if rep.last_error.is_none() {
                        rep.last_error = Some(e.to_string());
                    }
                }
                continue;
            }
            let sent = count(rc);
            rep.sends += u64_of(sent);
            rep.stats.packets += u64_of(sent * segs);
            rep.stats.bytes += u64_of(sent * msg_len);
            seq += u64_of(sent * segs);
            if sent < n {
                // The next batch rewrites every message from `seq` on, so the
                // unsent ones are simply resent with the right numbers.
                rep.stats.backpressure += 1;
            }
        }
        clock.finish(&mut rep.stats);
        rep.next_seq = seq;
        Ok(rep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tapir_testkit::frames::{FlowSpec, VIRTIO_NET_HDR_GSO_TCPV4};
    use tapir_testkit::netns::{
        add_addr, add_neigh, disable_ipv6, link_up, run_in_new_netns, set_mac,
    };
    use tapir_testkit::raw_tap::{open_tap, read_frame, set_offload, write_frame};

    const TAP_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

    fn spec() -> FlowSpec {
        FlowSpec {
            src_mac: TAP_MAC,
            dst_mac: GUEST_MAC,
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 0, 0, 2),
            src_port: 9000,
            dst_port: 9001,
        }
    }

    /// A TAP "tap0" with 10.0.0.1/24, MAC `TAP_MAC`, up, and a static
    /// neighbour 10.0.0.2 -> `GUEST_MAC`. Call inside a fresh namespace.
    fn setup_tap() -> OwnedFd {
        disable_ipv6().unwrap();
        let fd = open_tap("tap0").unwrap();
        set_mac("tap0", TAP_MAC).unwrap();
        add_addr("tap0", "10.0.0.1/24").unwrap();
        link_up("tap0").unwrap();
        add_neigh("10.0.0.2", "02:00:00:00:00:02", "tap0").unwrap();
        fd
    }

    #[test]
    fn seq_tracker_counts() {
        let mut t = SeqTracker::new();
        for s in [0u64, 1, 2, 4, 5, 5, 3, 6, 3] {
            t.record(7, s);
        }
        let f = t.flow(7).unwrap();
        assert_eq!(f.received, 9);
        assert_eq!(f.lost, 0); // 3 came late
        assert_eq!(f.reordered, 1);
        assert_eq!(f.duplicates, 2);
        assert_eq!(f.next_expected, 7);
        assert_eq!(t.record(7, 10), SeqEvent::Gap(3));
        assert_eq!(t.record(7, 8), SeqEvent::Reordered);
        assert_eq!(t.record(7, 8), SeqEvent::Duplicate);
        assert_eq!(t.record(7, 11), SeqEvent::InOrder);
        assert_eq!(t.flow(7).unwrap().lost, 2);
        assert_eq!(t.record(7, 100_000), SeqEvent::Gap(100_000 - 12));
        assert_eq!(t.record(7, 10), SeqEvent::TooOld);
        // Another flow, independent; window wrap keeps old bits cleared.
        assert_eq!(t.record(1, 0), SeqEvent::InOrder);
        assert_eq!(t.record(1, SEQ_WINDOW), SeqEvent::Gap(SEQ_WINDOW - 1));
        assert_eq!(t.record(1, 1), SeqEvent::Reordered);
        assert_eq!(t.record(1, 1), SeqEvent::Duplicate);
        let s = t.summary();
        assert_eq!(s.flows, 2);
        let mut b = SeqTracker::baseline_on_first();
        assert_eq!(b.record(0, 500), SeqEvent::InOrder);
        assert_eq!(b.record(0, 501), SeqEvent::InOrder);
        assert_eq!(b.flow(0).unwrap().lost, 0);
    }

    #[test]
    fn generator_to_tap_reader() {
        run_in_new_netns(|| {
            let tap = setup_tap();
            let mut buf = vec![0u8; 2048];
            let len = frames::build_udp(&mut buf, &spec(), 128, 0, 0).unwrap();
            let mut cfg = GeneratorConfig::new(
                "tap0",
                vec![Template::plain(buf[..len].to_vec())],
                RunControl::for_duration(Duration::from_secs(1)).with_max_packets(100),
            );
            cfg.flow = 42;
            cfg.start_seq = 1000;
            cfg.batch = 16;
            cfg.seq_mode = SeqMode::Full;
            let rep = PacketGenerator::new(cfg).unwrap().run().unwrap();
            assert_eq!(rep.stats.packets, 100, "{rep:?}");
            assert_eq!(rep.stats.errors, 0);
            assert_eq!(rep.next_seq, 1100);
            let mut rx = vec![0u8; 4096];
            let mut expect = 1000u64;
            while let Some(n) = read_frame(&tap, &mut rx, Duration::from_millis(200)).unwrap() {
                let hdr = VnetHdr::parse(&rx[..n]).unwrap();
                let f = &rx[VNET_HDR_LEN..n];
                let Some(u) = frames::parse_udp(f) else {
                    continue; // e.g. stray ARP
                };
                assert_eq!(hdr.gso_type, 0);
                assert_eq!(f.len(), 128);
                assert!(frames::l4_checksum_ok(f));
                assert_eq!(frames::verify_payload(u.payload), Ok((42, expect)));
                expect += 1;
            }
            assert_eq!(expect, 1100);
        })
        .unwrap();
    }

    #[test]
    fn tso_superframe_arrives_whole() {
        run_in_new_netns(|| {
            let tap = setup_tap();
            set_offload(&tap, libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6).unwrap();
            let mut buf = vec![0u8; frames::MAX_FRAME];
            let p = frames::build_tcp_tso(&mut buf, &spec(), frames::MAX_GSO_FRAME, 1448, 1, 5, 0)
                .unwrap();
            let tpl = Template {
                vnet: p.vnet,
                frame: buf[..p.len].to_vec(),
            };
            let mut cfg = GeneratorConfig::new(
                "tap0",
                vec![tpl],
                RunControl::for_duration(Duration::from_secs(1)).with_max_packets(3),
            );
            cfg.vnet_hdr = true;
            cfg.batch = 1;
            cfg.flow = 5;
            cfg.seq_mode = SeqMode::Full;
            let rep = PacketGenerator::new(cfg).unwrap().run().unwrap();
            assert_eq!(rep.stats.packets, 3, "{rep:?}");
            let mut rx = vec![0u8; 65562 + 64];
            let mut got = 0u64;
            while let Some(n) = read_frame(&tap, &mut rx, Duration::from_millis(200)).unwrap() {
                let hdr = VnetHdr::parse(&rx[..n]).unwrap();
                let f = &rx[VNET_HDR_LEN..n];
                if frames::parse_ipv4(f).is_none_or(|ip| ip.proto != frames::IPPROTO_TCP) {
                    continue;
                }
                assert_eq!(n, VNET_HDR_LEN + frames::MAX_GSO_FRAME);
                assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_TCPV4, "{hdr:?}");
                assert_eq!(hdr.gso_size, 1448);
                assert_eq!(hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, 1);
                assert_eq!(
                    frames::verify_payload(&f[frames::TCP_PAYLOAD_OFF..]),
                    Ok((5, got))
                );
                got += 1;
            }
            assert_eq!(got, 3);
        })
        .unwrap();
    }

    #[test]
    fn sink_receives_tap_writes_and_tracks_seq() {
        run_in_new_netns(|| {
            let tap = setup_tap();
            let sink = UdpSink::bind(UdpSinkConfig {
                verify: Verify::Full,
                ..UdpSinkConfig::new(
                    SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 9000),
                    RunControl::for_duration(Duration::from_secs(1)).with_max_packets(6),
                )
            })
            .unwrap();
            let h = sink.spawn().unwrap();
            // Guest -> host frames: 0, 1, 3 (2 skipped), 3 (duplicate), 4, 5.
            let g = spec().reversed();
            let mut buf = vec![0u8; 2048];
            for seq in [0u64, 1, 3, 3, 4, 5] {
                let n = frames::build_udp_vnet(&mut buf, &g, 200, 9, seq).unwrap();
                assert_eq!(write_frame(&tap, &buf[..n]).unwrap(), n);
            }
            let rep = h.join().unwrap();
            assert_eq!(rep.stats.packets, 6, "{rep:?}");
            assert_eq!(rep.verify_errors, 0);
            let s = rep.seq.unwrap();
            assert_eq!((s.lost, s.duplicates, s.reordered), (1, 1, 0));
            assert_eq!(rep.flows[0].flow, 9);
            assert_eq!(rep.socket_drops, 0);
        })
        .unwrap();
    }

    #[test]
    fn udp_sender_echo_sink_over_loopback() {
        run_in_new_netns(|| {
            let lo = Ipv4Addr::LOCALHOST;
            // Sender (with GSO) -> sink.
            let sink = UdpSink::bind(UdpSinkConfig {
                verify: Verify::Full,
                ..UdpSinkConfig::new(
                    SocketAddrV4::new(lo, 0),
                    RunControl::for_duration(Duration::from_secs(1)).with_max_packets(400),
                )
            })
            .unwrap();
            let dst = sink.local_addr();
            let h = sink.spawn().unwrap();
            let mut cfg = UdpSenderConfig::new(
                dst,
                1000,
                RunControl::for_duration(Duration::from_secs(1)).with_max_packets(400),
            );
            cfg.gso_segments = Some(20);
            cfg.batch = 4;
            cfg.flow = 3;
            cfg.rate_pps = Some(400);
            cfg.seq_mode = SeqMode::Full;
            let srep = UdpSender::new(cfg).unwrap().run().unwrap();
            let rep = h.join().unwrap();
            assert_eq!(srep.stats.packets, 400, "{srep:?}");
            assert_eq!(rep.stats.packets, 400, "{rep:?}");
            assert_eq!(rep.verify_errors, 0, "{:?}", rep.first_verify_error);
            let s = rep.seq.unwrap();
            assert_eq!((s.lost, s.duplicates), (0, 0));

            // Echo: send 10 datagrams, get 10 back.
            let echo = UdpEcho::bind(UdpEchoConfig::new(
                SocketAddrV4::new(lo, 0),
                RunControl::for_duration(Duration::from_secs(1)).with_max_packets(10),
            ))
            .unwrap();
            let eaddr = echo.local_addr();
            let eh = echo.spawn().unwrap();
            let sock = std::net::UdpSocket::bind((lo, 0)).unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut b = [0u8; 64];
            for i in 0..10u8 {
                sock.send_to(&[i; 33], eaddr).unwrap();
                let (n, from) = sock.recv_from(&mut b).unwrap();
                assert_eq!((n, b[0], from), (33, i, std::net::SocketAddr::V4(eaddr)));
            }
            let erep = eh.join().unwrap();
            assert_eq!(erep.stats.packets, 10);
            assert_eq!(erep.dropped, 0);
        })
        .unwrap();
    }

    #[test]
    fn udp_sender_to_tap_reader_and_stop_flag() {
        run_in_new_netns(|| {
            let tap = setup_tap();
            let stop = Arc::new(AtomicBool::new(false));
            let cfg = UdpSenderConfig::new(
                SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 7000),
                100,
                RunControl::new(Arc::clone(&stop)),
            );
            let h = UdpSender::new(cfg).unwrap().spawn().unwrap();
            let mut rx = vec![0u8; 4096];
            let mut seen = 0;
            while seen < 10 {
                let n = read_frame(&tap, &mut rx, Duration::from_millis(500))
                    .unwrap()
                    .unwrap();
                if let Some(u) = frames::parse_udp(&rx[VNET_HDR_LEN..n]) {
                    assert_eq!(u.dst_port, 7000);
                    assert_eq!(u.dst_mac, GUEST_MAC);
                    assert!(frames::read_payload_header(u.payload).is_some());
                    seen += 1;
                }
            }
            let rep = h.stop_and_join().unwrap();
            assert!(rep.stats.packets >= 10);
            assert!(rep.stats.elapsed < Duration::from_secs(2));
        })
        .unwrap();
    }
}
