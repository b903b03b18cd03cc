//! The handoff channel: a Unix `SOCK_SEQPACKET` socket (reliable, message boundaries kept),
//! the peer's credentials checked with `SO_PEERCRED`, fds passed with `SCM_RIGHTS`.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    accept4, bind, connect, getsockopt, listen, sendmsg, socket, sockopt, AddressFamily, Backlog,
    ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr,
};

/// Largest message (payload + 1 kind byte) the channel carries.
pub const MAX_MESSAGE: usize = 1 << 20;
/// How long [`Channel::recv_spinning`] polls before it sleeps, unless [`SPIN_ENV`] says
/// otherwise.
pub const SPIN: Duration = Duration::from_micros(0);
/// The hidden environment variable that sets [`Channel::recv_spinning`]'s spin in
/// microseconds (for A/B measurements of the blackout: 200 us measured no better than none
/// on 2 CPUs under handoff traffic, docs/HANDOFF.md).
pub const SPIN_ENV: &str = "TAPIR_HANDOFF_SPIN_US";

fn spin_budget() -> Duration {
    static BUDGET: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        std::env::var(SPIN_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(SPIN, Duration::from_micros)
    })
}
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
    /// The socket path is taken by a live socket or by something that is not a socket.
    #[error("socket path: {0}")]
    PathInUse(String),
}

/// Messages refused because they were truncated or carried too many fds (their fds closed).
static REFUSED_MESSAGES: AtomicU64 = AtomicU64::new(0);

/// How many messages this process refused as truncated or carrying too many fds.
pub fn refused_messages() -> u64 {
    REFUSED_MESSAGES.load(Ordering::Relaxed)
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
    /// Binds `path` with mode 0600. A socket file already there is replaced only when it is
    /// stale (nobody listens on it: a connect is refused); a live socket (of any type) or a
    /// path that is not a socket is refused and left alone.
    pub fn bind(path: &Path) -> Result<Listener, ChannelError> {
        let fd = seqpacket_socket()?;
        remove_stale_socket(path)?;
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

/// Removes the socket file at `path` if it is stale; refuses a live socket or a non-socket.
fn remove_stale_socket(path: &Path) -> Result<(), ChannelError> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ChannelError::Os {
                what: "looking at the socket path",
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ChannelError::PathInUse(format!(
            "{} exists and is not a socket: refused",
            path.display()
        )));
    }
    // Probe: a listener of any socket type answers a connect (or refuses it as another
    // type); only ECONNREFUSED means nobody is there.
    let probe = seqpacket_socket()?;
    let addr = UnixAddr::new(path).map_err(os("socket path"))?;
    match connect(probe.as_raw_fd(), &addr) {
        Err(nix::errno::Errno::ECONNREFUSED) => {}
        Err(nix::errno::Errno::ENOENT) => return Ok(()),
        Ok(()) => {
            return Err(ChannelError::PathInUse(format!(
                "{} is in use by a running process: refused",
                path.display()
            )))
        }
        Err(e) => {
            return Err(ChannelError::PathInUse(format!(
                "{} is in use (connect probe: {e}): refused",
                path.display()
            )))
        }
    }
    std::fs::remove_file(path).map_err(|source| ChannelError::Os {
        what: "removing a stale socket file",
        source,
    })
}

/// The instant `d` from now (far in the future if that does not fit an `Instant`).
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Returns true when `fd` is readable within `timeout`.
fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> Result<bool, ChannelError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = timeout.map(deadline_after);
    loop {
        let left = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                // Rounded up: poll(2) counts whole milliseconds, and 0.9 ms left rounded
                // down is a poll that returns at once (a busy loop for a caller that waits
                // 1 ms at a time).
                let left = d.saturating_duration_since(Instant::now());
                let ms = left.as_nanos().div_ceil(1_000_000);
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
    buf: std::sync::Mutex<RecvBuf>,
    /// On an end of [`Channel::pair`]: the child the other end was given to, if declared.
    child: Option<crate::fence::DeclaredChild>,
}

/// Receive buffers of dropped channels, for the next channel of this process (at most
/// [`SPARE_BUFFERS`]).
static SPARE: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// How many receive buffers [`SPARE`] keeps.
const SPARE_BUFFERS: usize = 2;
/// How much of a cloned channel's receive buffer is faulted in at once (a switch with a few
/// carried frames fits).
const WARM_BYTES: usize = 256 * 1024;

/// A channel's receive buffer: on first use one a dropped channel left (its pages already
/// faulted in) or a new one; given back when the channel is dropped. A process that hands
/// off or takes over again reuses it instead of allocating, touching and freeing 1 MiB
/// each time (under AddressSanitizer, freeing it was a third of the handoff fuzz targets'
/// time). Only the bytes a `recvmsg` just wrote are ever read from it.
#[derive(Debug, Default)]
struct RecvBuf(Vec<u8>);

impl RecvBuf {
    /// The buffer, [`MAX_MESSAGE`] bytes.
    fn full(&mut self) -> &mut [u8] {
        if self.0.len() < MAX_MESSAGE {
            let spare = SPARE.lock().unwrap_or_else(|e| e.into_inner()).pop();
            // A new one comes zeroed from the allocator (calloc: fresh pages, no memset), so
            // a channel that only ever receives small messages touches only the pages they
            // fill.
            self.0 = spare
                .filter(|b| b.len() == MAX_MESSAGE)
                .unwrap_or_else(|| vec![0u8; MAX_MESSAGE]);
        }
        &mut self.0
    }
}

impl Drop for RecvBuf {
    fn drop(&mut self) {
        if self.0.len() == MAX_MESSAGE {
            let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
            if spare.len() < SPARE_BUFFERS {
                spare.push(std::mem::take(&mut self.0));
            }
        }
    }
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

    /// Declares the child process the other end of this [`Channel::pair`] was given to: the
    /// one process whose HELLO a source accepts on this end (besides its own, for a successor
    /// in this process), and the one a fence may kill. Call it right after spawning, while
    /// `child` is not yet reaped. On a connected socket it has no effect: there the kernel's
    /// peer credentials name the successor.
    pub fn expect_child(&mut self, child: &std::process::Child) -> Result<(), ChannelError> {
        let pinned =
            crate::fence::DeclaredChild::pin(child).map_err(|source| ChannelError::Os {
                what: "pidfd_open of the declared child",
                source,
            })?;
        self.child = Some(pinned);
        Ok(())
    }

    /// The child declared with [`Channel::expect_child`].
    pub(crate) fn declared_child(&self) -> Option<&crate::fence::DeclaredChild> {
        self.child.as_ref()
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
            buf: std::sync::Mutex::new(RecvBuf::default()),
            child: None,
        })
    }

    /// A second handle on the same connection: a dup of its fd, with its own receive
    /// buffer, whose first pages are touched now (not when a message lands in them). For a
    /// thread that receives one message while this one waits: the successor's SWITCH,
    /// received on the worker that runs first. Only one of the two may receive at a time.
    pub(crate) fn try_clone(&self) -> Result<Channel, ChannelError> {
        let fd = self.fd.try_clone().map_err(|source| ChannelError::Os {
            what: "dup",
            source,
        })?;
        let mut buf = RecvBuf::default();
        for page in buf.full().iter_mut().take(WARM_BYTES).step_by(4096) {
            // SAFETY: a valid, aligned pointer into the buffer; the volatile write makes
            // sure the page is faulted in now.
            unsafe { std::ptr::write_volatile(page, 0) };
        }
        Ok(Channel {
            fd,
            peer_pid: self.peer_pid,
            buf: std::sync::Mutex::new(buf),
            child: None,
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

    /// Sends one message with up to `MAX_FDS_PER_MESSAGE` (250) fds.
    pub fn send(
        &self,
        kind: u8,
        payload: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        if payload.len().saturating_add(1) > MAX_MESSAGE {
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

    /// Receives one message by `deadline` (the end of a phase: a peer that sends its
    /// messages one at a time gets the phase's time in all, not a timeout per message).
    pub fn recv_by(&self, deadline: Instant) -> Result<Message, ChannelError> {
        self.recv(Some(deadline.saturating_duration_since(Instant::now())))
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
    /// `SPIN`: during a handoff's blackout each side answers the other within
    /// microseconds, and a sleep/wake-up per message would cost more than the work.
    pub fn recv_spinning(&self, timeout: Option<Duration>) -> Result<Message, ChannelError> {
        let spin_until = deadline_after(spin_budget());
        while Instant::now() < spin_until {
            if let Some(m) = self.recv_now(MsgFlags::MSG_DONTWAIT)? {
                return Ok(m);
            }
            std::hint::spin_loop();
        }
        self.recv(timeout)
    }

    /// One `recvmsg`; `None` when nothing is there (with `MSG_DONTWAIT`). Every fd the
    /// kernel installed is owned before anything is checked, so a refused message (truncated,
    /// or with more fds than [`MAX_FDS_PER_MESSAGE`]: `MSG_CTRUNC`) closes them all.
    fn recv_now(&self, flags: MsgFlags) -> Result<Option<Message>, ChannelError> {
        let mut guard = self.buf.lock().unwrap_or_else(|e| e.into_inner());
        let buf: &mut [u8] = guard.full();
        // u64 words: the control buffer must be aligned for `cmsghdr`.
        let mut control = [0u64; CONTROL_WORDS];
        let (n, msg_flags, fds) = loop {
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; all-zero is a valid empty header.
            let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
            mh.msg_iov = &mut iov;
            mh.msg_iovlen = 1;
            mh.msg_control = control.as_mut_ptr().cast();
            mh.msg_controllen = control_len();
            let rflags = (flags | MsgFlags::MSG_CMSG_CLOEXEC).bits();
            // SAFETY: `mh` points at a live iovec over `buf` and at `control`, both valid
            // for writes of the lengths given, for the duration of the call.
            let rc = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut mh, rflags) };
            if rc < 0 {
                match nix::errno::Errno::last() {
                    nix::errno::Errno::EINTR => continue,
                    nix::errno::Errno::EAGAIN => return Ok(None),
                    nix::errno::Errno::ECONNRESET => return Err(ChannelError::Closed),
                    e => return Err(os("recvmsg")(e)),
                }
            }
            // SAFETY: the kernel filled `control` (up to mh.msg_controllen) for this call.
            let fds = unsafe { installed_fds(&mh) };
            break (
                usize::try_from(rc).unwrap_or(0),
                MsgFlags::from_bits_truncate(mh.msg_flags),
                fds,
            );
        };
        if msg_flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
            REFUSED_MESSAGES.fetch_add(1, Ordering::Relaxed);
            let why = if msg_flags.contains(MsgFlags::MSG_CTRUNC) {
                format!(
                    "message carries more than {MAX_FDS_PER_MESSAGE} fds (control data truncated; \
                     the {} that arrived are closed)",
                    fds.len()
                )
            } else {
                format!("message longer than {MAX_MESSAGE} bytes")
            };
            tracing::warn!(peer = self.peer_pid, "refused a handoff message: {why}");
            drop(fds);
            return Err(ChannelError::Malformed(why));
        }
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        let Some((&kind, rest)) = buf.get(..n).and_then(<[u8]>::split_first) else {
            return Err(ChannelError::Closed);
        };
        let payload = rest.to_vec();
        Ok(Some(Message { kind, payload, fds }))
    }
}

/// Control buffer words: room for one `SCM_RIGHTS` message of [`MAX_FDS_PER_MESSAGE`] fds.
const CONTROL_WORDS: usize = (MAX_FDS_PER_MESSAGE * std::mem::size_of::<RawFd>() + 64) / 8;

/// The control length handed to `recvmsg`: exactly one `SCM_RIGHTS` of
/// [`MAX_FDS_PER_MESSAGE`] fds, so that one more fd sets `MSG_CTRUNC`.
fn control_len() -> usize {
    let payload = u32::try_from(MAX_FDS_PER_MESSAGE.saturating_mul(std::mem::size_of::<RawFd>()))
        .unwrap_or(0);
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = usize::try_from(unsafe { libc::CMSG_SPACE(payload) }).unwrap_or(0);
    space.min(CONTROL_WORDS * 8)
}

/// Takes ownership of every fd in the `SCM_RIGHTS` messages of `mh`'s control data (also of
/// a truncated one: the kernel installed the fds it reports there).
///
/// # Safety
///
/// `mh` must be the header of a `recvmsg` that just returned, its control buffer still live.
unsafe fn installed_fds(mh: &libc::msghdr) -> Vec<OwnedFd> {
    let mut fds = Vec::new();
    // SAFETY: per the contract, `mh` describes a control buffer the kernel filled.
    let mut c = unsafe { libc::CMSG_FIRSTHDR(mh) };
    while !c.is_null() {
        // SAFETY: CMSG_FIRSTHDR/NXTHDR return headers inside the control buffer.
        let hdr = unsafe { &*c };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: CMSG_LEN(0) is arithmetic.
            let head = usize::try_from(unsafe { libc::CMSG_LEN(0) }).unwrap_or(usize::MAX);
            let bytes = hdr.cmsg_len.saturating_sub(head);
            let count = bytes.checked_div(std::mem::size_of::<RawFd>()).unwrap_or(0);
            // SAFETY: the data of this header follows it inside the control buffer.
            let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
            for i in 0..count {
                // SAFETY: `i < count`, within the header's data (possibly unaligned).
                let raw = unsafe { data.add(i).read_unaligned() };
                if raw >= 0 {
                    // SAFETY: the kernel just installed this fd for this process.
                    fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                }
            }
        }
        // SAFETY: `c` is a header of `mh`'s control buffer.
        c = unsafe { libc::CMSG_NXTHDR(mh, c) };
    }
    fds
}

#[cfg(test)]
mod tests;
