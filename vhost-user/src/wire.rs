//! The vhost-user byte stream: a 12-byte header (request, flags, size), a body of `size`
//! bytes, and fds as `SCM_RIGHTS` on the header. Message layouts are the `vhost` crate's
//! (`vhost::vhost_user::message`); this module only moves them over the socket, so that
//! tapir owns the dispatch (and can hand the connection to a successor mid-session).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
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

/// A connected vhost-user socket, backend side.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
}

impl Connection {
    /// Wraps a connected stream socket.
    pub fn new(stream: UnixStream) -> Connection {
        Connection { stream }
    }

    /// The socket (to poll it, or to hand it to a successor).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }

    /// Unwraps the socket.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    fn recv_some(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<usize, WireError> {
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS]);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = loop {
            match recvmsg::<()>(
                self.stream.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(m) => break m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(WireError::Io(e.into())),
            }
        };
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    for fd in raw {
                        // SAFETY: the kernel just installed this fd for us; nothing else
                        // owns it.
                        fds.push(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) });
                    }
                }
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(WireError::Malformed(
                "more fds than the protocol allows".into(),
            ));
        }
        Ok(n)
    }

    fn recv_exact(&self, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> Result<(), WireError> {
        let mut got = 0;
        while got < buf.len() {
            let n = self.recv_some(&mut buf[got..], fds)?;
            if n == 0 {
                return Err(WireError::Closed);
            }
            got += n;
        }
        Ok(())
    }

    /// Receives one request (blocking).
    pub fn recv(&self) -> Result<Request, WireError> {
        let mut header = Header::default();
        let mut fds = Vec::new();
        self.recv_exact(header.as_mut_slice(), &mut fds)?;
        if header.flags & 0x3 != VERSION || header.flags & FLAG_REPLY != 0 {
            return Err(WireError::Malformed(format!(
                "flags {:#x} (version 1, not a reply, expected)",
                header.flags
            )));
        }
        let size = header.size as usize;
        if size > MAX_BODY {
            return Err(WireError::Malformed(format!(
                "body of {size} bytes (at most {MAX_BODY})"
            )));
        }
        let mut body = vec![0u8; size];
        self.recv_exact(&mut body, &mut fds)?;
        Ok(Request { header, body, fds })
    }

    /// Sends the reply to `req` with `body` and fds.
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
        let iov = [IoSlice::new(header.as_slice()), IoSlice::new(body)];
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let total = header.as_slice().len() + body.len();
        let mut sent = loop {
            match sendmsg::<()>(
                self.stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(WireError::Io(e.into())),
            }
        };
        // A short write on a stream socket: send the rest (without fds).
        let mut all = header.as_slice().to_vec();
        all.extend_from_slice(body);
        while sent < total {
            match nix::sys::socket::send(
                self.stream.as_raw_fd(),
                &all[sent..],
                MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(n) => sent += n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(WireError::Io(e.into())),
            }
        }
        Ok(())
    }
}
