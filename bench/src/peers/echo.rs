//! The UDP reflector of the latency runs.

use std::io;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, OwnedFd};

use super::harness::{spawn_peer, Clock, PeerHandle, PeerStats, RunControl, RECV_POLL};
use super::socket::{
    c_uint, count, is_backpressure, recv_batch, set_buf, set_timeout, socklen_of, u64_of,
    udp_socket, zeroed_vec,
};
use super::{io_err, PeerError};

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
        Ok(Self { fd, cfg })
    }

    /// The bound address.
    #[cfg(test)]
    pub(super) fn local_addr(&self) -> SocketAddrV4 {
        super::socket::local_addr(self.fd.as_raw_fd()).expect("getsockname")
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
