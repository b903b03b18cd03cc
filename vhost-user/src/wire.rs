//! The vhost-user byte stream: a 12-byte header (request, flags, size), a body of `size`
//! bytes, and fds as `SCM_RIGHTS` on the header. Message layouts are the `vhost` crate's
//! (`vhost::vhost_user::message`); this module only moves them over the socket, so that
//! tapir owns the dispatch (and can hand the connection to a successor mid-session).

#![deny(clippy::indexing_slicing)]

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use vhost::vhost_user::message::FrontendReq;
use vm_memory::ByteValued;

/// Most fds one message may carry (the protocol's limit).
pub const MAX_FDS: usize = 32;
/// Largest body tapir accepts (a memory table of 32 regions is 776 bytes; config space
/// messages are at most 256 bytes of payload).
pub const MAX_BODY: usize = 4096;

/// Errors of the vhost-user transport.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frontend closed the connection.
    #[error("the frontend closed the connection")]
    Closed,
    /// A socket call failed.
    #[error("vhost-user socket: {0}")]
    Io(#[from] std::io::Error),
    /// The header is not a valid request.
    #[error("malformed vhost-user message: {0}")]
    Malformed(String),
    /// The frontend did not finish a message, or take a reply, in time.
    #[error("the frontend stalled mid-message for {0:?}")]
    TimedOut(Duration),
}

/// `VHOST_USER_VERSION` in the flags.
const VERSION: u32 = 0x1;
/// The reply flag.
const FLAG_REPLY: u32 = 0x4;
/// The need-reply flag (REPLY_ACK).
const FLAG_NEED_REPLY: u32 = 0x8;

/// The message header (the `vhost` crate keeps its own private).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Header {
    /// Request code.
    pub request: u32,
    /// Version and flags.
    pub flags: u32,
    /// Body size.
    pub size: u32,
}

// SAFETY: three u32s, no padding; every bit pattern is valid.
unsafe impl ByteValued for Header {}

impl Header {
    /// The request, if known.
    pub fn code(&self) -> Option<FrontendReq> {
        FrontendReq::try_from(self.request).ok()
    }

    /// Whether the frontend asks for an ack (REPLY_ACK).
    pub fn is_need_reply(&self) -> bool {
        self.flags & FLAG_NEED_REPLY != 0
    }
}

/// One request from the frontend.
#[derive(Debug)]
pub struct Request {
    /// Its header.
    pub header: Header,
    /// Its body (`header.get_size()` bytes).
    pub body: Vec<u8>,
    /// The fds that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Request {
    /// The request code, if known.
    pub fn code(&self) -> Option<FrontendReq> {
        self.header.code()
    }

    /// The body as a `T`, if it has exactly that size.
    pub fn body_as<T: ByteValued + Default>(&self) -> Option<T> {
        let mut v = T::default();
        if self.body.len() != std::mem::size_of::<T>() {
            return None;
        }
        v.as_mut_slice().copy_from_slice(&self.body);
        Some(v)
    }
}

/// How long a frontend may take to finish a message it started, or to take a reply off the
/// socket, before its session ends (`tapir serve --frontend-timeout`).
pub const DEFAULT_FRONTEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected vhost-user socket, backend side.
///
/// Every message has a deadline: once its first byte is there, the rest (header, body, fds)
/// must arrive within the connection's timeout, and a reply must leave within it. A frontend
/// that stops mid-message or never reads its replies cannot stall the daemon's single serve
/// loop (handoffs, dirty-log flushes, the next frontend): its session ends instead.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    timeout: Duration,
}

/// Which way a deadline wait goes.
#[derive(Clone, Copy, Debug)]
enum Direction {
    In,
    Out,
}

impl Connection {
    /// Wraps a connected stream socket, with [`DEFAULT_FRONTEND_TIMEOUT`].
    pub fn new(stream: UnixStream) -> Connection {
        Connection::with_timeout(stream, DEFAULT_FRONTEND_TIMEOUT)
    }

    /// Wraps a connected stream socket with this per-message timeout.
    pub fn with_timeout(stream: UnixStream, timeout: Duration) -> Connection {
        Connection { stream, timeout }
    }

    /// The socket (to poll it, or to hand it to a successor).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Unwraps the socket.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Waits until the socket is readable or writable, or the deadline passes.
    fn wait(&self, direction: Direction, deadline: Instant) -> Result<(), WireError> {
        let flags = match direction {
            Direction::In => PollFlags::POLLIN,
            Direction::Out => PollFlags::POLLOUT,
        };
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(WireError::TimedOut(self.timeout));
            }
            let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
            let mut fds = [PollFd::new(self.stream.as_fd(), flags)];
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Err(WireError::TimedOut(self.timeout)),
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
    }

    /// One `recvmsg` (non-blocking, after waiting for input until `deadline`). Every fd the
    /// kernel installed is owned by `fds` before anything can fail, so that none leaks: with
    /// `MSG_CTRUNC` (more fds than the control buffer holds) the kernel still installs those
    /// that fit.
    fn recv_some(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
    ) -> Result<usize, WireError> {
        // Room for MAX_FDS fds in one SCM_RIGHTS message, as u64s for the cmsghdr alignment.
        const SPACE: usize = cmsg_space(MAX_FDS * std::mem::size_of::<RawFd>());
        let mut cmsg = [0u64; SPACE.div_ceil(8)];
        loop {
            self.wait(Direction::In, deadline)?;
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; zero is a valid (empty) value for every field.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
            // SAFETY: `msg` points at `iov` (valid for `buf.len()` bytes of `buf`) and at the
            // control buffer, both alive for the call.
            let n = unsafe {
                libc::recvmsg(
                    self.stream.as_raw_fd(),
                    &mut msg,
                    libc::MSG_CMSG_CLOEXEC | libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.kind() {
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => continue,
                    _ => return Err(WireError::Io(e)),
                }
            }
            take_fds(&msg, fds);
            if msg.msg_flags & libc::MSG_CTRUNC != 0 {
                return Err(WireError::Malformed(format!(
                    "more fds than the protocol allows ({MAX_FDS})"
                )));
            }
            if fds.len() > MAX_FDS {
                return Err(WireError::Malformed(format!(
                    "{} fds with one message (at most {MAX_FDS})",
                    fds.len()
                )));
            }
            return usize::try_from(n).map_err(|_| WireError::Malformed("recvmsg".into()));
        }
    }

    fn recv_exact(
        &self,
        buf: &mut [u8],
        fds: &mut Vec<OwnedFd>,
        deadline: Instant,
    ) -> Result<(), WireError> {
        let mut got = 0;
        while let Some(rest) = buf.get_mut(got..).filter(|r| !r.is_empty()) {
            let n = self.recv_some(rest, fds, deadline)?;
            if n == 0 {
                return Err(WireError::Closed);
            }
            got += n;
        }
        Ok(())
    }

    /// Receives one request, which must be complete within the timeout from this call. Call
    /// it once the socket is readable: a frontend may stay idle between requests as long as
    /// it likes, but not stop in the middle of one.
    pub fn recv(&self) -> Result<Request, WireError> {
        let mut header = Header::default();
        let mut fds = Vec::new();
        let deadline = Instant::now() + self.timeout;
        self.recv_exact(header.as_mut_slice(), &mut fds, deadline)?;
        if header.flags & 0x3 != VERSION || header.flags & FLAG_REPLY != 0 {
            return Err(WireError::Malformed(format!(
                "flags {:#x} (version 1, not a reply, expected)",
                header.flags
            )));
        }
        let size = usize::try_from(header.size).unwrap_or(usize::MAX);
        if size > MAX_BODY {
            return Err(WireError::Malformed(format!(
                "body of {size} bytes (at most {MAX_BODY})"
            )));
        }
        let mut body = vec![0u8; size];
        self.recv_exact(&mut body, &mut fds, deadline)?;
        Ok(Request { header, body, fds })
    }

    /// Sends the reply to `req` with `body` and fds; it must leave within the timeout.
    pub fn reply(
        &self,
        req: &Header,
        body: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), WireError> {
        let size = u32::try_from(body.len())
            .map_err(|_| WireError::Malformed("reply too large".into()))?;
        let header = Header {
            request: req.request,
            flags: VERSION | FLAG_REPLY,
            size,
        };
        let mut all = header.as_slice().to_vec();
        all.extend_from_slice(body);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let deadline = Instant::now() + self.timeout;
        let mut sent = 0;
        while let Some(rest) = all.get(sent..).filter(|r| !r.is_empty()) {
            // The fds go with the first byte.
            let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() || sent > 0 {
                &[]
            } else {
                &cmsg
            };
            let iov = [IoSlice::new(rest)];
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
                None,
            ) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => self.wait(Direction::Out, deadline)?,
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        Ok(())
    }
}

/// `CMSG_SPACE(len)`, as a constant.
const fn cmsg_space(len: usize) -> usize {
    const fn round(n: usize) -> usize {
        let align = std::mem::size_of::<usize>();
        n.div_ceil(align) * align
    }
    round(std::mem::size_of::<libc::cmsghdr>()) + round(len)
}

/// Takes ownership of every fd in the `SCM_RIGHTS` messages of `msg`'s control buffer.
fn take_fds(msg: &libc::msghdr, fds: &mut Vec<OwnedFd>) {
    // SAFETY: `msg` was filled in by recvmsg; CMSG_FIRSTHDR/NXTHDR walk its control buffer
    // within `msg_controllen`, which the kernel set to what it wrote.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !c.is_null() {
        // SAFETY: `c` points at a complete cmsghdr inside the control buffer.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: a zero-length CMSG_LEN is the header size.
            let head = unsafe { libc::CMSG_LEN(0) } as usize;
            let n = hdr.cmsg_len.saturating_sub(head) / std::mem::size_of::<RawFd>();
            // SAFETY: the data of this cmsghdr holds `n` fds (the kernel wrote them).
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for k in 0..n {
                // SAFETY: `k < n`, inside the data; it may be unaligned, hence read_unaligned.
                let fd = unsafe { data.add(k).read_unaligned() };
                if fd >= 0 {
                    // SAFETY: the kernel just installed this fd for us; nothing else owns it.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
        }
        // SAFETY: as above; returns null after the last header.
        c = unsafe { libc::CMSG_NXTHDR(msg, c) };
    }
}
