//! Socket helpers of the peers: raw `socket(2)`, options, addresses, the batch receive.

use std::io;
use std::mem;
use std::net::SocketAddrV4;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

pub(super) use tapir_testkit::host_sockets::{set_timeout, setsockopt_int};

use super::{last_err, PeerError};

pub(super) fn new_socket(
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

pub(super) fn socklen_of<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(mem::size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// Sets a socket buffer size, trying the `*FORCE` variant (root) first.
pub(super) fn set_buf(fd: RawFd, force: libc::c_int, plain: libc::c_int, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if setsockopt_int(fd, libc::SOL_SOCKET, force, v).is_err() {
        // Best effort: the plain variant is capped by rmem_max / wmem_max.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, plain, v);
    }
}

/// The socket's kernel drop counter (`SO_MEMINFO`, `SK_MEMINFO_DROPS`).
pub(super) fn socket_drops(fd: RawFd) -> u64 {
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

pub(super) fn sockaddr_in(a: SocketAddrV4) -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    let mut sa: libc::sockaddr_in = unsafe { mem::zeroed() };
    sa.sin_family = libc::sa_family_t::try_from(libc::AF_INET).unwrap_or(2);
    sa.sin_port = a.port().to_be();
    sa.sin_addr.s_addr = u32::from(*a.ip()).to_be();
    sa
}

#[cfg(test)]
pub(super) fn from_sockaddr_in(sa: &libc::sockaddr_in) -> SocketAddrV4 {
    SocketAddrV4::new(
        std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
        u16::from_be(sa.sin_port),
    )
}

pub(super) fn udp_socket(bind: Option<SocketAddrV4>) -> Result<OwnedFd, PeerError> {
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

#[cfg(test)]
pub(super) fn local_addr(fd: RawFd) -> Result<SocketAddrV4, PeerError> {
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

pub(super) fn is_backpressure(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAGAIN | libc::ENOBUFS | libc::EINTR)
    )
}

/// Converts a non-negative syscall count to usize.
pub(super) fn count(n: libc::c_int) -> usize {
    usize::try_from(n).unwrap_or(0)
}

pub(super) fn c_uint(n: usize) -> libc::c_uint {
    libc::c_uint::try_from(n).unwrap_or(libc::c_uint::MAX)
}

pub(super) fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Zeroed mmsghdr/iovec arrays (plain old data).
/// One `recvmmsg` (`MSG_WAITFORONE`) into `msgs`: the number of messages received, or None on
/// backpressure (try again).
///
/// # Safety
/// Every header in `msgs` must point at live iovecs (and names, if set) whose buffers stay
/// valid and unaliased for the call.
pub(super) unsafe fn recv_batch(
    raw: RawFd,
    msgs: &mut [libc::mmsghdr],
) -> Result<Option<usize>, PeerError> {
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

pub(super) fn zeroed_vec<T>(n: usize) -> Vec<T> {
    // SAFETY: only used for libc iovec / mmsghdr / sockaddr types, for which
    // all-zero bytes are a valid value.
    (0..n).map(|_| unsafe { mem::zeroed() }).collect()
}
