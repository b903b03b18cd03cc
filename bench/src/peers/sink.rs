//! The UDP sink: counts (and optionally verifies) what arrives, with `recvmmsg`.

use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tapir_testkit::frames::{self, PayloadError};
use tapir_testkit::netns;

use super::harness::{rate, spawn_peer, Clock, PeerHandle, PeerStats, RunControl, RECV_POLL};
use super::seq::{FlowSeqStats, SeqSummary, SeqTracker};
use super::socket::{
    recv_batch, set_buf, set_timeout, socket_drops, u64_of, udp_socket, zeroed_vec,
};
use super::{io_err, PeerError};

/// How much of each received payload a [`UdpSink`] checks. The benchmark's scenarios only
/// count; the peers' tests verify (sequence tracking and every byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "verifying sinks are used by the peers' tests only"
    )
)]
pub enum Verify {
    /// Count only.
    #[default]
    None,
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
    cfg: UdpSinkConfig,
}

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
        Ok(Self { fd, cfg })
    }

    /// The bound address (with the actual port if 0 was requested).
    #[cfg(test)]
    pub(super) fn local_addr(&self) -> SocketAddrV4 {
        super::socket::local_addr(self.fd.as_raw_fd()).expect("getsockname")
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
