//! One queue of a TAP opened by hand, for tests and benchmarks that play the datapath
//! themselves (the raw TAP floor, peer tests): the datapath crate owns the real opener.
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Opens one queue of the multiqueue TAP `name` (created if absent) with a
/// 12-byte vnet header, non-blocking.
pub fn open_tap(name: &str) -> io::Result<OwnedFd> {
    // SAFETY: the path is a valid C string literal.
    let raw = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh fd, exclusively owned.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut ifr = crate::netns::ifreq_for(name).map_err(|e| io::Error::other(e.to_string()))?;
    let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;
    ifr.ifr_ifru.ifru_flags = i16::try_from(flags).map_err(io::Error::other)?;
    // SAFETY: TUNSETIFF takes a `struct ifreq`.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &raw mut ifr) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let sz: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ takes a pointer to an int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &raw const sz) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// `TUNSETOFFLOAD` with the given `TUN_F_*` flags.
pub fn set_offload(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes the flags by value.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD,
            libc::c_ulong::from(flags),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Non-blocking read with a deadline: polls until a frame arrives or
/// `timeout` passes. Returns the number of bytes read (incl. vnet header).
pub fn read_frame(
    fd: &OwnedFd,
    buf: &mut [u8],
    timeout: std::time::Duration,
) -> io::Result<Option<usize>> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        // SAFETY: `buf` is valid writable memory of `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(Some(usize::try_from(n).expect("non-negative")));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        let now = std::time::Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = (deadline - now).as_millis().clamp(1, 1000);
        let ms = libc::c_int::try_from(ms).unwrap_or(1000);
        // SAFETY: `pfd` is a valid pollfd array of length 1.
        unsafe { libc::poll(&raw mut pfd, 1, ms) };
    }
}

/// Writes one frame (vnet header included) to the TAP queue.
pub fn write_frame(fd: &OwnedFd, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: `frame` is valid readable memory of `frame.len()` bytes.
    let n = unsafe { libc::write(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}
