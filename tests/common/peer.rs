//! A successor played by the test itself, through a helper process: the helper (this test
//! binary, re-executed) connects to a handoff socket, so that the source's `SO_PEERCRED` and
//! pidfd name the helper, passes the connected fd back on fd 3, then sits there. The test
//! speaks the protocol through that fd; a fence kills the helper, not the test.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tapir_migrate::Channel;

/// Set in a re-executed copy of a test binary: connect to this handoff socket.
const HELPER_ENV: &str = "TAPIR_HOSTILE_HELPER_CONNECT";

/// The helper's body, called from a `#[test]` of the binary; does nothing unless this
/// process is a helper.
pub fn run_helper_if_asked() {
    let Some(path) = std::env::var_os(HELPER_ENV) else {
        return;
    };
    let ch = Channel::connect(Path::new(&path)).expect("helper: connect");
    let raw = [ch.as_raw_fd()];
    let byte = [0u8];
    sendmsg::<()>(
        3,
        &[IoSlice::new(&byte)],
        &[ControlMessage::ScmRights(&raw)],
        MsgFlags::empty(),
        None,
    )
    .expect("helper: pass the channel");
    // Silent from here on, as a hung successor.
    std::thread::sleep(Duration::from_secs(60));
    std::process::exit(0);
}

/// Starts a helper process (the test named `helper_test`, which calls
/// [`run_helper_if_asked`]) that connects to `socket` and hands the connected fd to this
/// process: returns the helper and the channel.
pub fn spawn_connector(socket: &Path, helper_test: &str) -> (Child, Channel) {
    let (mine, theirs) = UnixStream::pair().unwrap();
    let theirs_raw = theirs.as_raw_fd();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([helper_test, "--exact", "--nocapture", "--test-threads=1"])
        .env(HELPER_ENV, socket)
        .stdout(Stdio::null());
    // SAFETY: dup2 is async-signal-safe; the child gets the stream as fd 3 (without CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(theirs_raw, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    mine.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut byte = [0u8];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        mine.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .expect("the helper's channel");
    let mut fd = None;
    for c in msg.cmsgs().unwrap() {
        if let ControlMessageOwned::ScmRights(list) = c {
            for raw in list {
                // SAFETY: the kernel installed this fd for us just now.
                fd = Some(unsafe { OwnedFd::from_raw_fd(raw) });
            }
        }
    }
    let ch = Channel::from_fd(fd.expect("no fd from the helper")).unwrap();
    (child, ch)
}
