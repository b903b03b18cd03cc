//! The raw packet generator: prebuilt frames out of an interface through an `AF_PACKET`
//! socket.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, OwnedFd};

use tapir_testkit::frames::{self, PayloadLoc, VnetHdr, VIRTIO_NET_HDR_F_NEEDS_CSUM, VNET_HDR_LEN};
use tapir_testkit::netns;

use super::harness::{spawn_peer, Clock, Pacer, PeerHandle, PeerStats, RunControl};
use super::socket::{
    c_uint, count, is_backpressure, new_socket, set_buf, setsockopt_int, socklen_of, u64_of,
    zeroed_vec,
};
use super::{io_err, last_err, PeerError};

/// `PACKET_VNET_HDR_SZ` (Linux 6.2+): choose the vnet header size of a packet socket.
const PACKET_VNET_HDR_SZ: libc::c_int = 24;

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
    #[cfg(test)]
    #[must_use]
    pub fn plain(frame: Vec<u8>) -> Self {
        Self {
            vnet: VnetHdr::default(),
            frame,
        }
    }
}

/// How a sender updates the seq/flow payload per packet. The benchmark sends templates
/// unchanged or with sequence numbers; full payloads are for the peers' tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    not(test),
    allow(
        dead_code,
        reason = "full payload rewriting is used by the peers' tests only"
    )
)]
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
