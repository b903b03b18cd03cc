//! The handoff channel: a Unix `SOCK_SEQPACKET` socket (reliable, message boundaries kept),
//! the peer's credentials checked with `SO_PEERCRED`, fds passed with `SCM_RIGHTS`.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, recvmsg, sendmsg, socket, sockopt, AddressFamily,
    Backlog, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// Largest message (payload + 1 kind byte) the channel carries.
pub const MAX_MESSAGE: usize = 1 << 20;
/// How long [`Channel::recv_spinning`] polls before it sleeps.
pub const SPIN: Duration = Duration::from_micros(0);
/// Most fds in one message (the kernel's `SCM_MAX_FD` is 253).
pub const MAX_FDS_PER_MESSAGE: usize = 250;

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// A socket call failed.
    #[error("{what}: {source}")]
    Os {
        /// The call.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The peer runs as another user.
    #[error("peer pid {pid} runs as uid {uid}, expected uid {expected}: refused")]
    ForeignPeer {
        /// Its pid.
        pid: i32,
        /// Its uid.
        uid: u32,
        /// Ours.
        expected: u32,
    },
    /// Nothing arrived in time.
    #[error("no message within {0:?}")]
    Timeout(Duration),
    /// The peer closed the connection (or died).
    #[error("the peer closed the connection")]
    Closed,
    /// A message too large, truncated, or carrying more fds than it may.
    #[error("malformed message: {0}")]
    Malformed(String),
}

fn os(what: &'static str) -> impl FnOnce(nix::errno::Errno) -> ChannelError {
    move |e| ChannelError::Os {
        what,
        source: e.into(),
    }
}

fn seqpacket_socket() -> Result<OwnedFd, ChannelError> {
    socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(os("socket"))
}

/// A listening handoff socket; the socket file is removed when it is dropped.
#[derive(Debug)]
pub struct Listener {
    fd: OwnedFd,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (replacing a stale socket file) with mode 0600.
    pub fn bind(path: &Path) -> Result<Listener, ChannelError> {
        let fd = seqpacket_socket()?;
        if path.exists() {
            std::fs::remove_file(path).map_err(|source| ChannelError::Os {
                what: "removing a stale socket file",
                source,
            })?;
        }
        let addr = UnixAddr::new(path).map_err(os("socket path"))?;
        bind(fd.as_raw_fd(), &addr).map_err(os("bind"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(
            |source| ChannelError::Os {
                what: "chmod 0600",
                source,
            },
        )?;
        listen(&fd, Backlog::new(4).map_err(os("listen"))?).map_err(os("listen"))?;
        Ok(Listener {
            fd,
            path: path.to_owned(),
        })
    }

    /// Adopts a listening SEQPACKET socket (handed over by a predecessor) bound at `path`.
    pub fn from_fd(fd: OwnedFd, path: &Path) -> Listener {
        Listener {
            fd,
            path: path.to_owned(),
        }
    }

    /// Gives up the listening socket without removing its file (to hand it on): a duplicate
    /// of the fd.
    pub fn into_fd(mut self) -> Result<OwnedFd, ChannelError> {
        let fd = self.fd.try_clone().map_err(|source| ChannelError::Os {
            what: "dup of the listening socket",
            source,
        })?;
        // Nothing to remove on drop any more.
        self.path = PathBuf::new();
        Ok(fd)
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening fd (to poll for a successor while doing other work).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Waits up to `timeout` (forever: None) for a peer and checks its credentials.
    pub fn accept(&self, timeout: Option<Duration>) -> Result<Channel, ChannelError> {
        if !wait_readable(self.fd.as_fd(), timeout)? {
            return Err(ChannelError::Timeout(timeout.unwrap_or_default()));
        }
        let raw = accept4(self.fd.as_raw_fd(), SockFlag::SOCK_CLOEXEC).map_err(os("accept"))?;
        // SAFETY: accept4 returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Channel::checked(fd)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if self.path.as_os_str().is_empty() {
            return;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Returns true when `fd` is readable within `timeout`.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool, ChannelError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let left = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let ms = d.saturating_duration_since(Instant::now()).as_millis();
                i32::try_from(ms)
                    .ok()
                    .and_then(|ms| PollTimeout::try_from(ms).ok())
                    .unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, left) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(os("poll")(e)),
        }
    }
}

/// A connected handoff channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    peer_pid: i32,
    /// Receive buffer, allocated once: a fresh 1 MiB buffer per message would cost page
    /// faults inside a handoff's blackout.
    buf: std::sync::Mutex<Vec<u8>>,
}

/// One received message.
#[derive(Debug)]
pub struct Message {
    /// Its kind byte.
    pub kind: u8,
    /// Its payload.
    pub payload: Vec<u8>,
    /// The fds that came with it.
    pub fds: Vec<OwnedFd>,
}

impl Channel {
    /// Connects to a handoff socket and checks the peer's credentials.
    pub fn connect(path: &Path) -> Result<Channel, ChannelError> {
        let fd = seqpacket_socket()?;
        let addr = UnixAddr::new(path).map_err(os("socket path"))?;
        connect(fd.as_raw_fd(), &addr).map_err(os("connect"))?;
        Channel::checked(fd)
    }

    /// A connected pair (for a parent handing a datapath to a child it spawns).
    pub fn pair() -> Result<(Channel, Channel), ChannelError> {
        let (a, b) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(os("socketpair"))?;
        Ok((Channel::checked(a)?, Channel::checked(b)?))
    }

    /// Wraps an inherited, connected fd (a child given one end of [`Channel::pair`]).
    pub fn from_fd(fd: OwnedFd) -> Result<Channel, ChannelError> {
        Channel::checked(fd)
    }

    /// Refuses a peer running as another user: the fds of a datapath (guest memory, TAP
    /// queues) go only to a process of the same user, root included.
    fn checked(fd: OwnedFd) -> Result<Channel, ChannelError> {
        let cred = getsockopt(&fd, sockopt::PeerCredentials).map_err(os("SO_PEERCRED"))?;
        let me = nix::unistd::geteuid().as_raw();
        if cred.uid() != me {
            return Err(ChannelError::ForeignPeer {
                pid: cred.pid(),
                uid: cred.uid(),
                expected: me,
            });
        }
        Ok(Channel {
            fd,
            peer_pid: cred.pid(),
            buf: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The peer's pid (from `SO_PEERCRED`).
    pub fn peer_pid(&self) -> i32 {
        self.peer_pid
    }

    /// The raw fd (for a child to inherit).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Gives up the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Sends one message with up to [`MAX_FDS_PER_MESSAGE`] fds.
    pub fn send(
        &self,
        kind: u8,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        if payload.len() + 1 > MAX_MESSAGE {
            return Err(ChannelError::Malformed(format!(
                "payload of {} bytes",
                payload.len()
            )));
        }
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(ChannelError::Malformed(format!(
                "{} fds in one message",
                fds.len()
            )));
        }
        let kind_buf = [kind];
        let iov = [IoSlice::new(&kind_buf), IoSlice::new(payload)];
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        loop {
            match sendmsg::<()>(
                self.fd.as_raw_fd(),
                &iov,
                &cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET) => {
                    return Err(ChannelError::Closed)
                }
                Err(e) => return Err(os("sendmsg")(e)),
            }
        }
    }

    /// Receives one message, waiting up to `timeout` (forever: None).
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Message, ChannelError> {
        if !wait_readable(self.fd.as_fd(), timeout)? {
            return Err(ChannelError::Timeout(timeout.unwrap_or_default()));
        }
        match self.recv_now(MsgFlags::empty())? {
            Some(m) => Ok(m),
            None => Err(ChannelError::Timeout(timeout.unwrap_or_default())),
        }
    }

    /// Like [`recv`](Self::recv), but first polls the socket without sleeping for up to
    /// [`SPIN`]: during a handoff's blackout each side answers the other within
    /// microseconds, and a sleep/wake-up per message would cost more than the work.
    pub fn recv_spinning(&self, timeout: Option<Duration>) -> Result<Message, ChannelError> {
        let spin_until = Instant::now() + SPIN;
        while Instant::now() < spin_until {
            if let Some(m) = self.recv_now(MsgFlags::MSG_DONTWAIT)? {
                return Ok(m);
            }
            std::hint::spin_loop();
        }
        self.recv(timeout)
    }

    /// One `recvmsg`; `None` when nothing is there (with `MSG_DONTWAIT`).
    fn recv_now(&self, flags: MsgFlags) -> Result<Option<Message>, ChannelError> {
        let mut guard = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        if guard.len() < MAX_MESSAGE {
            guard.resize(MAX_MESSAGE, 0);
        }
        let buf: &mut [u8] = &mut guard;
        let mut cmsg = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
        let (n, msg_flags, mut fds) = loop {
            let mut iov = [IoSliceMut::new(&mut *buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                flags | MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().map_err(os("recvmsg control data"))? {
                        if let ControlMessageOwned::ScmRights(list) = c {
                            for raw in list {
                                // SAFETY: the kernel just installed this fd for us.
                                fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                            }
                        }
                    }
                    break (msg.bytes, msg.flags, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Ok(None),
                Err(nix::errno::Errno::ECONNRESET) => return Err(ChannelError::Closed),
                Err(e) => return Err(os("recvmsg")(e)),
            }
        };
        if msg_flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            return Err(ChannelError::Malformed(
                "message or its fds truncated".into(),
            ));
        }
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        let kind = buf[0];
        let payload = buf[1..n].to_vec();
        fds.shrink_to_fit();
        Ok(Some(Message { kind, payload, fds }))
    }
}
