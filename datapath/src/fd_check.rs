//! What an fd handed to tapir really is. Frontends and handoff peers pass fds that tapir then
//! maps, reads, writes or polls; an fd of the wrong kind (a pipe where an eventfd belongs, a
//! file shorter than the region it is said to back) must be refused when it arrives, before a
//! worker blocks on it or a mapping faults on it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// Errors of checking an fd.
#[derive(Debug, thiserror::Error)]
pub enum FdCheckError {
    /// The fd is not of the kind its role needs.
    #[error("{what}: expected {expected}, got {got}")]
    WrongKind {
        /// The fd's role (e.g. "kick fd of vring 3").
        what: String,
        /// What it should be.
        expected: &'static str,
        /// What it is (`/proc/self/fd` link target or file type).
        got: String,
    },
    /// The file is shorter than the range that is to be mapped from it.
    #[error("{what}: {offset:#x}+{len:#x} reaches past the end of its file ({file_len:#x} bytes)")]
    TooShort {
        /// The fd's role.
        what: String,
        /// Offset of the range in the file.
        offset: u64,
        /// Length of the range.
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The fd could not be inspected.
    #[error("{what}: cannot inspect the fd: {source}")]
    Io {
        /// The fd's role.
        what: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &str) -> impl FnOnce(io::Error) -> FdCheckError + '_ {
    move |source| FdCheckError::Io {
        what: what.to_string(),
        source,
    }
}

/// The target of the fd's `/proc/self/fd` link (`anon_inode:[eventfd]`, `socket:[123]`,
/// `/memfd:guest (deleted)`, ...).
pub fn link_target(fd: BorrowedFd<'_>) -> io::Result<String> {
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(std::fs::read_link(path)?.to_string_lossy().into_owned())
}

/// Checks that `fd` is an eventfd (kick, call and error fds): a pipe or socket there could
/// block a worker's write or report end-of-file forever.
pub fn expect_eventfd(fd: BorrowedFd<'_>, what: &str) -> Result<(), FdCheckError> {
    let target = link_target(fd).map_err(io_err(what))?;
    if target == "anon_inode:[eventfd]" {
        return Ok(());
    }
    Err(FdCheckError::WrongKind {
        what: what.to_string(),
        expected: "an eventfd",
        got: target,
    })
}

fn fstat(fd: BorrowedFd<'_>, what: &str) -> Result<libc::stat, FdCheckError> {
    // SAFETY: `stat` is plain data that fstat fills in; the fd is valid for the borrow.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is an open fd and `st` a writable stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(io_err(what)(io::Error::last_os_error()));
    }
    Ok(st)
}

/// Checks that `[offset, offset + len)` of the file behind `fd` exists: the fd is a regular
/// file (memfd, tmpfs, hugetlbfs) at least `offset + len` bytes long. A mapping past the end
/// of its file raises SIGBUS on first touch, so this is checked before anything is mapped.
/// (A file that can still shrink afterwards is another matter: see [`GuestMemory::from_regions`](crate::GuestMemory::from_regions).)
pub fn expect_file_range(
    fd: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    what: &str,
) -> Result<(), FdCheckError> {
    let st = fstat(fd, what)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(FdCheckError::WrongKind {
            what: what.to_string(),
            expected: "a regular file (memfd, tmpfs or hugetlbfs)",
            got: link_target(fd).unwrap_or_else(|_| format!("mode {:#o}", st.st_mode)),
        });
    }
    let file_len = u64::try_from(st.st_size).unwrap_or(0);
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(FdCheckError::TooShort {
            what: what.to_string(),
            offset,
            len,
            file_len,
        }),
    }
}

/// True when `fd` is a socket in the listening state (`SO_ACCEPTCONN`).
pub fn is_listening_socket(fd: BorrowedFd<'_>) -> bool {
    let mut val: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `val` and `len` are valid for writes of an int and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut val as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && val != 0
}

/// Checks that `fd` is a listening socket (a listener handed to a successor).
pub fn expect_listening_socket(fd: BorrowedFd<'_>, what: &str) -> Result<(), FdCheckError> {
    if is_listening_socket(fd) {
        return Ok(());
    }
    Err(FdCheckError::WrongKind {
        what: what.to_string(),
        expected: "a listening socket",
        got: link_target(fd).unwrap_or_else(|e| e.to_string()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, OwnedFd};

    fn memfd(len: u64) -> OwnedFd {
        let fd = nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        let file = std::fs::File::from(fd);
        file.set_len(len).expect("set_len");
        file.into()
    }

    #[test]
    fn eventfds_pass_and_pipes_do_not() {
        let efd = nix::sys::eventfd::EventFd::new().expect("eventfd");
        expect_eventfd(efd.as_fd(), "kick").expect("an eventfd");
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let err = expect_eventfd(r.as_fd(), "kick").expect_err("a pipe");
        assert!(err.to_string().contains("pipe:"), "{err}");
    }

    #[test]
    fn file_ranges_must_lie_inside_the_file() {
        let f = memfd(0x2000);
        expect_file_range(f.as_fd(), 0, 0x2000, "region").expect("whole file");
        expect_file_range(f.as_fd(), 0x1000, 0x1000, "region").expect("tail");
        assert!(matches!(
            expect_file_range(f.as_fd(), 0x1000, 0x1001, "region"),
            Err(FdCheckError::TooShort { .. })
        ));
        assert!(matches!(
            expect_file_range(f.as_fd(), u64::MAX, 2, "region"),
            Err(FdCheckError::TooShort { .. })
        ));
        let efd = nix::sys::eventfd::EventFd::new().expect("eventfd");
        assert!(matches!(
            expect_file_range(efd.as_fd(), 0, 1, "region"),
            Err(FdCheckError::WrongKind { .. })
        ));
    }

    #[test]
    fn listening_sockets_are_told_apart_from_connected_ones() {
        let dir = std::env::temp_dir().join(format!("tapir-fdcheck-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let l = std::os::unix::net::UnixListener::bind(&dir).expect("bind");
        let c = std::os::unix::net::UnixStream::connect(&dir).expect("connect");
        let _ = std::fs::remove_file(&dir);
        expect_listening_socket(l.as_fd(), "listener").expect("listening");
        assert!(expect_listening_socket(c.as_fd(), "listener").is_err());
    }
}
