//! The UDP sender through the routing stack (`sendmmsg`, optional `UDP_SEGMENT`).

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};

use tapir_testkit::frames::{self, PAYLOAD_HDR_LEN};

use super::generator::SeqMode;
use super::harness::{spawn_peer, Clock, Pacer, PeerHandle, PeerStats, RunControl, RECV_POLL};
use super::socket::{
    c_uint, count, is_backpressure, set_buf, set_timeout, setsockopt_int, sockaddr_in, socklen_of,
    u64_of, udp_socket, zeroed_vec,
};
use super::{io_err, last_err, PeerError};

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
        Ok(Self { fd, cfg })
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
