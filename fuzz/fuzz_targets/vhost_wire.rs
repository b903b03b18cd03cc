//! vhost-user wire parsing with fds: arbitrary bytes, in fuzzer-chosen pieces each carrying
//! a fuzzer-chosen number of real fds (`SCM_RIGHTS`, up to 64: more than the 32 a message
//! may carry, to reach `MSG_CTRUNC`), written into one end of a `UnixStream` socketpair;
//! `Connection::recv` on the other end until it fails. It never panics, every request it
//! returns is well formed (version 1, not a reply, body at most `MAX_BODY`), and no fd
//! leaks: the process's fd count is back where it was once both ends are closed.
//!
//! With `TAPIR_FUZZ_SKIP_KNOWN=1` a piece carries at most 32 fds (the open CTRUNC leak).
//!
//! Input: a list of pieces, each `nfds` (u8, % 65), `len` (u16, at most 8 KiB), `len`
//! bytes; the writer closes its end after the last piece.
#![no_main]

use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tapir_fuzz::{eventfd, fd_count, memfd, Input};
use tapir_vhost_user::wire::{Connection, MAX_BODY, MAX_FDS};

/// An eventfd and a 4 KiB memfd, made once: a piece sends them as many times as it carries
/// fds (each `SCM_RIGHTS` entry becomes a new fd in the receiver, as with distinct files),
/// so an input costs no fd creation.
fn pool() -> &'static [OwnedFd; 2] {
    static POOL: OnceLock<[OwnedFd; 2]> = OnceLock::new();
    POOL.get_or_init(|| [eventfd(), memfd(4096)])
}

fuzz_target!(|data: &[u8]| {
    let pool = pool();
    let baseline = fd_count();
    {
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        // The reader must never block on a frontend that stopped: the writer end closes
        // after the last piece (and the socket buffer holds all of a small input).
        theirs.set_nonblocking(true).expect("nonblocking writer");
        let mut input = Input::new(data);
        let mut pieces = 0;
        while !input.is_empty() && pieces < 16 {
            pieces += 1;
            let mut nfds = usize::from(input.u8() % 65);
            if tapir_fuzz::skip_known() {
                // Open: more fds than the control buffer holds leak (issue 9 item 6).
                nfds = nfds.min(MAX_FDS);
            }
            let bytes = input.blob(8192);
            let raw: Vec<RawFd> = (0..nfds).map(|i| pool[i % 2].as_raw_fd()).collect();
            let cmsg = [ControlMessage::ScmRights(&raw)];
            let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
            // A piece without bytes cannot carry fds on a stream socket; send a zero byte.
            let payload: &[u8] = if bytes.is_empty() { &[0] } else { bytes };
            let iov = [IoSlice::new(payload)];
            if sendmsg::<()>(
                theirs.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .is_err()
            {
                break;
            }
            // The kernel holds its own references to the ones in flight.
        }
        drop(theirs);
        let conn = Connection::new(ours);
        let mut received = 0;
        while let Ok(req) = conn.recv() {
            received += 1;
            assert_eq!(req.header.flags & 0x3, 1, "version 1");
            assert_eq!(req.header.flags & 0x4, 0, "not a reply");
            assert!(req.body.len() <= MAX_BODY, "body within MAX_BODY");
            assert_eq!(
                req.body.len(),
                req.header.size as usize,
                "body as announced"
            );
            assert!(req.fds.len() <= 16 * MAX_FDS, "fds bounded");
            assert!(
                received <= data.len() / 12 + 1,
                "a request needs a 12-byte header"
            );
        }
    }
    assert_eq!(fd_count(), baseline, "fds leaked");
});
