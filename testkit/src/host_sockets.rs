//! Host-side sockets a test or peer talks to the TAP with: a UDP socket with large buffers,
//! `UDP_SEGMENT` (GSO sends), an AF_PACKET injector that hands the TAP frames with a
//! `virtio_net_hdr` (TSO super-frames), and an AF_PACKET listener on an interface.
//!
//! Errors are returned, never panicked on; every socket is opened `CLOEXEC`.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::frames::VnetHdr;

/// `SOL_UDP`.
pub const SOL_UDP: i32 = 17;
/// `UDP_SEGMENT` (Linux 4.18+): the socket sends one GSO datagram of `gso_size` segments.
pub const UDP_SEGMENT: i32 = 103;

/// The bytes of `virtio_net_hdr` an AF_PACKET socket with `PACKET_VNET_HDR` carries (no
/// `num_buffers`).
const PACKET_VNET_HDR_LEN: usize = 10;

fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// `setsockopt` of an `int` option.
pub fn setsockopt_int(fd: RawFd, level: i32, name: i32, val: i32) -> io::Result<()> {
    // SAFETY: `val` lives for the call and its size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            std::ptr::from_ref(&val).cast(),
            socklen_of::<i32>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `SO_RCVTIMEO` or `SO_SNDTIMEO` (`opt`) to `d`.
pub fn set_timeout(fd: RawFd, opt: i32, d: Duration) -> io::Result<()> {
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
            std::ptr::from_ref(&tv).cast(),
            socklen_of::<libc::timeval>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn with_context(what: String) -> impl FnOnce(io::Error) -> io::Error {
    move |e| io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// A UDP socket bound to `ip:port` with 8 MiB send and receive buffers (`SO_RCVBUFFORCE`,
/// `SO_SNDBUFFORCE`: root, so the kernel drops nothing for lack of socket memory) and a 50 ms
/// read timeout (for [`udp_recv`]'s deadline loop).
pub fn udp(ip: Ipv4Addr, port: u16) -> io::Result<UdpSocket> {
    let s = UdpSocket::bind(SocketAddrV4::new(ip, port))
        .map_err(with_context(format!("bind {ip}:{port}")))?;
    let fd = s.as_raw_fd();
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 8 << 20)
        .map_err(with_context("SO_RCVBUFFORCE".into()))?;
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 8 << 20)
        .map_err(with_context("SO_SNDBUFFORCE".into()))?;
    s.set_read_timeout(Some(Duration::from_millis(50)))?;
    Ok(s)
}

/// Receives one datagram into `buf`, waiting up to `timeout`; `Ok(None)` if none came.
pub fn udp_recv(sock: &UdpSocket, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
    let deadline = Instant::now() + timeout;
    loop {
        match sock.recv_from(buf) {
            Ok((n, _)) => return Ok(Some(n)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if Instant::now() >= deadline {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Turns on `UDP_SEGMENT` with `gso_size` on a UDP socket.
pub fn set_udp_segment(sock: &UdpSocket, gso_size: u16) -> io::Result<()> {
    setsockopt_int(sock.as_raw_fd(), SOL_UDP, UDP_SEGMENT, i32::from(gso_size))
}

/// An AF_PACKET socket bound to `ifname` for frames of `ethertype` (host order; `ETH_P_ALL`
/// for every frame).
fn bound_packet_socket(ifname: &str, ethertype: u16) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let index = crate::netns::iface_index(ifname).map_err(io::Error::other)?;
    // SAFETY: an all-zero sockaddr_ll is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(u16::MAX);
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = i32::try_from(index).map_err(io::Error::other)?;
    // SAFETY: `sll` is a valid sockaddr_ll of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            socklen_of::<libc::sockaddr_ll>(),
        )
    };
    if rc < 0 {
        return Err(with_context(format!("bind AF_PACKET to {ifname}"))(
            io::Error::last_os_error(),
        ));
    }
    Ok(fd)
}

/// An AF_PACKET socket on an interface with `PACKET_VNET_HDR` (the 10-byte
/// `virtio_net_hdr`): frames sent through it may carry GSO metadata, so the host can hand a
/// TSO super-frame to the TAP.
#[derive(Debug)]
pub struct PacketInjector {
    fd: OwnedFd,
}

impl PacketInjector {
    /// Opens the socket and binds it to `ifname`.
    pub fn new(ifname: &str) -> io::Result<PacketInjector> {
        let all = u16::try_from(libc::ETH_P_ALL).map_err(io::Error::other)?;
        let fd = bound_packet_socket(ifname, all)?;
        setsockopt_int(fd.as_raw_fd(), libc::SOL_PACKET, libc::PACKET_VNET_HDR, 1)
            .map_err(with_context("PACKET_VNET_HDR".into()))?;
        Ok(PacketInjector { fd })
    }

    /// Sends `frame` with the first 10 bytes of `vnet` as its `virtio_net_hdr`.
    pub fn send(&self, vnet: &VnetHdr, frame: &[u8]) -> io::Result<()> {
        let hdr = vnet.to_bytes();
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr().cast_mut().cast(),
                iov_len: PACKET_VNET_HDR_LEN,
            },
            libc::iovec {
                iov_base: frame.as_ptr().cast_mut().cast(),
                iov_len: frame.len(),
            },
        ];
        // SAFETY: both iovecs point at live buffers of the given lengths (the header is at
        // least 10 bytes); the kernel only reads them.
        let rc = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), 2) };
        let n = usize::try_from(rc).map_err(|_| io::Error::last_os_error())?;
        if n != PACKET_VNET_HDR_LEN + frame.len() {
            return Err(io::Error::other(format!(
                "short AF_PACKET write: {n} of {}",
                PACKET_VNET_HDR_LEN + frame.len()
            )));
        }
        Ok(())
    }
}

/// A packet socket bound to interface `ifname` that receives its frames of `ethertype`
/// (host order; `ETH_P_ALL` for every frame), each read waiting at most `timeout`.
pub fn packet_listener(
    ifname: &str,
    ethertype: u16,
    timeout: Duration,
) -> io::Result<std::fs::File> {
    let fd = bound_packet_socket(ifname, ethertype)?;
    set_timeout(fd.as_raw_fd(), libc::SO_RCVTIMEO, timeout)
        .map_err(with_context("SO_RCVTIMEO".into()))?;
    Ok(std::fs::File::from(fd))
}
