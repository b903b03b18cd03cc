//! Fencing a successor: the source pins the successor *process* with a pidfd when it says
//! HELLO, and that pidfd is what a fence signals. A pid could be reused by an unrelated
//! process once the successor died; a pidfd cannot. And once a fence fired, its outcome
//! decides the handoff: nothing that still arrives on the channel (from a dup of the dead
//! successor's fd, in another process) can make the source commit. See `docs/HANDOFF.md`,
//! "Fence and commit".

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::protocol::MigrateError;
use crate::transport::Channel;

/// `SO_PEERPIDFD` (Linux 6.5): a pidfd of the process that connected, taken at connect time.
const SO_PEERPIDFD: libc::c_int = 77;

/// What a fence can reach.
#[derive(Debug)]
enum Target {
    /// The successor process, pinned.
    Process(OwnedFd),
    /// The successor runs in this process (an embedder's thread, a test): it cannot be killed
    /// without killing the source.
    InProcess,
}

/// The successor process a handoff may have to fence.
#[derive(Debug)]
pub(crate) struct Fence {
    pid: i32,
    target: Target,
}

/// How a fence ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fenced {
    /// The successor was killed and has exited: nothing of it runs any more.
    Exited,
    /// Killed, but not yet gone within the bound (stuck in the kernel): it can run no more
    /// user code, but has not released everything yet.
    Killed,
    /// An in-process successor: not killed.
    NotKillable,
}

/// A child process a socket pair's end was given to, pinned by a pidfd when it was declared
/// ([`Channel::expect_child`](crate::Channel::expect_child)).
#[derive(Debug)]
pub(crate) struct DeclaredChild {
    pid: i32,
    pidfd: OwnedFd,
}

impl DeclaredChild {
    /// Pins `child`. The caller holds it unreaped, so its pid cannot name another process
    /// yet, and the pidfd keeps naming this one after it is reaped.
    pub(crate) fn pin(child: &std::process::Child) -> std::io::Result<DeclaredChild> {
        let pid = i32::try_from(child.id())
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
        Ok(DeclaredChild {
            pid,
            pidfd: pidfd_open(pid)?,
        })
    }
}

fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd this process owns.
    let rc = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let raw = i32::try_from(rc).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `raw` is the fresh pidfd the kernel just returned.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// The pidfd of the process at the other end of `ch`, as the kernel recorded it at connect.
fn peer_pidfd(ch: &Channel) -> Option<OwnedFd> {
    let mut fd: libc::c_int = -1;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).ok()?;
    // SAFETY: `fd` and `len` are valid for writes of an int and its length.
    let rc = unsafe {
        libc::getsockopt(
            ch.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PEERPIDFD,
            (&mut fd as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || fd < 0 {
        return None;
    }
    // SAFETY: the kernel installed a new pidfd for this process.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send_signal(pidfd: &OwnedFd, signal: libc::c_int) -> std::io::Result<()> {
    // SAFETY: plain syscall on a pidfd we own; no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// True when the process behind `pidfd` has exited (its pidfd polls readable), waiting up
/// to `timeout`.
fn exited_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = crate::transport::deadline_after(timeout);
    loop {
        let ms = deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_millis();
        let left = i32::try_from(ms)
            .ok()
            .and_then(|ms| PollTimeout::try_from(ms).ok())
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(pidfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, left) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

impl Fence {
    /// Pins the successor that said HELLO with `hello_pid` on `ch`. The pid the HELLO names
    /// must be the socket's peer (`SO_PEERCRED`). On a socket pair this process made, whose
    /// peer credentials are this process's own, the HELLO names either this process (an
    /// in-process successor, never killed) or the child the pair was declared to be given to
    /// ([`Channel::expect_child`](crate::Channel::expect_child)); any other pid is refused,
    /// so a successor cannot aim the fence at a process of its choosing. The process must be
    /// alive.
    pub(crate) fn at_hello(ch: &Channel, hello_pid: u32) -> Result<Fence, MigrateError> {
        let refuse = |why: String| Err(MigrateError::Peer(why));
        let own = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
        let Ok(named) = i32::try_from(hello_pid) else {
            return refuse(format!("HELLO names pid {hello_pid}"));
        };
        let peer = ch.peer_pid();
        if peer == own {
            if named == own {
                return Ok(Fence {
                    pid: own,
                    target: Target::InProcess,
                });
            }
            return match ch.declared_child() {
                Some(child) if child.pid == named => {
                    let pidfd = child.pidfd.try_clone().map_err(|e| {
                        MigrateError::Peer(format!("successor pid {named}: pidfd dup: {e}"))
                    })?;
                    Fence::alive(named, pidfd)
                }
                Some(child) => refuse(format!(
                    "HELLO names pid {named}, but this socket pair was given to child pid {}",
                    child.pid
                )),
                None => refuse(format!(
                    "HELLO names pid {named} on a socket pair of this process that was given \
                     to no child (Channel::expect_child declares one)"
                )),
            };
        }
        if named != peer {
            return refuse(format!(
                "HELLO names pid {named}, but the socket's peer is pid {peer}"
            ));
        }
        let pidfd = match peer_pidfd(ch) {
            Some(fd) => fd,
            None => pidfd_open(peer).map_err(|e| {
                MigrateError::Peer(format!("successor pid {peer}: pidfd_open: {e}"))
            })?,
        };
        Fence::alive(peer, pidfd)
    }

    fn alive(pid: i32, pidfd: OwnedFd) -> Result<Fence, MigrateError> {
        if let Err(e) = send_signal(&pidfd, 0) {
            return Err(MigrateError::Peer(format!(
                "successor pid {pid} is gone: {e}"
            )));
        }
        if exited_within(&pidfd, Duration::ZERO) {
            return Err(MigrateError::Peer(format!(
                "successor pid {pid} has exited"
            )));
        }
        Ok(Fence {
            pid,
            target: Target::Process(pidfd),
        })
    }

    /// The successor's pid.
    pub(crate) fn pid(&self) -> i32 {
        self.pid
    }

    /// Kills the successor (SIGKILL through its pidfd) and waits up to `bound` for it to
    /// have exited.
    pub(crate) fn fire(&self, bound: Duration) -> Fenced {
        let Target::Process(pidfd) = &self.target else {
            tracing::error!(
                "the successor runs in this process and cannot be fenced; taking the device back"
            );
            return Fenced::NotKillable;
        };
        match send_signal(pidfd, libc::SIGKILL) {
            Ok(()) => {}
            // Already gone (ESRCH): the wait below sees it.
            Err(e) => tracing::debug!(pid = self.pid, error = %e, "pidfd_send_signal"),
        }
        if exited_within(pidfd, bound) {
            Fenced::Exited
        } else {
            tracing::error!(
                pid = self.pid,
                ?bound,
                "the fenced successor was killed but has not exited yet"
            );
            Fenced::Killed
        }
    }
}
