//! The daemon's socket helpers: binding the vhost-user socket privately, a stale socket
//! file removed, connecting without blocking (client mode), the peer's uid, and polling.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{AccessControl, ServeError};

/// Removes a socket file a previous daemon left at `path`; refuses to touch anything else,
/// and a socket something still listens on.
pub(super) fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let fail = |what: &str| {
        ServeError::Socket(
            format!("{} {what}", path.display()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        )
    };
    if !meta.file_type().is_socket() {
        return Err(fail("exists and is not a socket"));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(fail("is in use by a running backend"));
    }
    std::fs::remove_file(path)
        .map_err(|e| ServeError::Socket(format!("removing stale {}", path.display()), e))
}

/// Binds the vhost-user socket with no access for anyone but the owner from the start (umask
/// 0177 around bind), then gives it the group and mode asked for.
pub(super) fn bind_private(
    path: &Path,
    access: &AccessControl,
    owner: Option<tapir_sandbox::Ids>,
) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &str, e| ServeError::Socket(format!("{what} {}", path.display()), e);
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| fail("binding", e))?;
    let uid = owner.map(|ids| ids.uid);
    let gid = access.socket_group.or(owner.map(|ids| ids.gid));
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid).map_err(|e| fail("chown of", e))?;
    }
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(access.socket_mode & 0o777),
    )
    .map_err(|e| fail("chmod of", e))?;
    Ok(listener)
}

/// Connects to the frontend's socket (client mode) without blocking: a listener whose backlog
/// is full (one that never accepts) makes a blocking `connect` wait forever, and the daemon
/// would serve nothing else (its handoff socket) meanwhile. `EAGAIN` is retried by the caller.
pub(super) fn connect_without_blocking(path: &Path) -> Result<UnixStream, std::io::Error> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    let stream = UnixStream::from(fd);
    // Connected (a unix stream connect completes at once or fails): back to blocking mode,
    // which the wire layer overrides per call with its deadlines.
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The uid of the process at the other end of `stream`.
pub(super) fn peer_uid(stream: &UnixStream) -> Result<u32, std::io::Error> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(std::io::Error::from)
}

/// True for accept errors that mean "out of fds or memory": accepting again at once would
/// fail the same way (the connection stays queued), so the daemon backs off.
pub(super) fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Polls `fds` for input; returns which are readable (or hung up).
pub(super) fn wait(
    fds: &[Option<BorrowedFd<'_>>],
    timeout: Option<Duration>,
) -> Result<Vec<bool>, ServeError> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .flatten()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => {
            PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    match poll(&mut polled, t) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(ServeError::Socket("poll".into(), e.into())),
    }
    let mut it = polled.iter();
    Ok(fds
        .iter()
        .map(|fd| match fd {
            Some(_) => it
                .next()
                .and_then(|p| p.revents())
                .is_some_and(|r| !r.is_empty()),
            None => false,
        })
        .collect())
}
