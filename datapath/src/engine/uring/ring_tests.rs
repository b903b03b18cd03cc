//! The kernel enforces a worker ring's restrictions (real io_uring, real eventfds).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::types::{CancelBuilder, Fd, Fixed, Timespec};
use io_uring::{opcode, squeue, IoUring};

use super::build_ring;

fn eventfd(value: u32) -> OwnedFd {
    // SAFETY: plain syscall; a non-negative result is a new fd nothing else owns.
    let fd = unsafe { libc::eventfd(value, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: see above.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Submits one SQE and returns its result.
fn run_one(ring: &mut IoUring, entry: squeue::Entry) -> i32 {
    // SAFETY: every entry these tests submit points at buffers that outlive the wait below
    // (locals of the caller, statics).
    unsafe { ring.submission().push(&entry) }.expect("room in the SQ");
    ring.submit_and_wait(1).expect("io_uring_enter");
    let cqe = ring.completion().next().expect("a completion");
    cqe.result()
}

#[test]
fn allowed_operations_on_registered_files_run() {
    let efd = eventfd(5);
    let mut ring = build_ring(8, &[efd.as_raw_fd()]).expect("a restricted ring");
    let mut buf = 0u64;
    let read = opcode::Read::new(Fixed(0), std::ptr::from_mut(&mut buf).cast(), 8).build();
    assert_eq!(run_one(&mut ring, read), 8);
    assert_eq!(buf, 5);
    // Operations without a file carry IOSQE_FIXED_FILE too (required on every SQE).
    static SHORT: Timespec = Timespec::new().nsec(1_000);
    let timeout = opcode::Timeout::new(&SHORT)
        .build()
        .flags(squeue::Flags::FIXED_FILE);
    assert_eq!(run_one(&mut ring, timeout), -libc::ETIME);
    let cancel = opcode::AsyncCancel2::new(CancelBuilder::any())
        .build()
        .flags(squeue::Flags::FIXED_FILE);
    let res = run_one(&mut ring, cancel);
    assert!(res == 0 || res == -libc::ENOENT, "cancel: {res}");
}

#[test]
fn an_opcode_outside_the_set_is_refused() {
    let efd = eventfd(0);
    let mut ring = build_ring(8, &[efd.as_raw_fd()]).expect("a restricted ring");
    // A socket, an open and a no-op: none is in the set, even with a fixed file flag.
    let socket = opcode::Socket::new(libc::AF_INET, libc::SOCK_STREAM, 0)
        .build()
        .flags(squeue::Flags::FIXED_FILE);
    assert_eq!(run_one(&mut ring, socket), -libc::EACCES);
    let path = c"/etc/passwd";
    let open = opcode::OpenAt::new(Fd(libc::AT_FDCWD), path.as_ptr())
        .build()
        .flags(squeue::Flags::FIXED_FILE);
    assert_eq!(run_one(&mut ring, open), -libc::EACCES);
    let nop = opcode::Nop::new().build().flags(squeue::Flags::FIXED_FILE);
    assert_eq!(run_one(&mut ring, nop), -libc::EACCES);
    // An allowed opcode without IOSQE_FIXED_FILE (hence `Loop::push` sets it on every SQE).
    static SHORT: Timespec = Timespec::new().nsec(1_000);
    let timeout = opcode::Timeout::new(&SHORT).build();
    assert_eq!(run_one(&mut ring, timeout), -libc::EACCES);
}

#[test]
fn an_allowed_opcode_on_a_raw_fd_or_with_other_flags_is_refused() {
    let efd = eventfd(1);
    let mut ring = build_ring(8, &[efd.as_raw_fd()]).expect("a restricted ring");
    let mut buf = 0u64;
    // Not a registered file: any fd of the process would do, so it is refused.
    let raw =
        opcode::Read::new(Fd(efd.as_raw_fd()), std::ptr::from_mut(&mut buf).cast(), 8).build();
    assert_eq!(run_one(&mut ring, raw), -libc::EACCES);
    // A flag besides IOSQE_FIXED_FILE.
    let linked = opcode::Read::new(Fixed(0), std::ptr::from_mut(&mut buf).cast(), 8)
        .build()
        .flags(squeue::Flags::ASYNC);
    assert_eq!(run_one(&mut ring, linked), -libc::EACCES);
    assert_eq!(buf, 0, "no refused read ran");
}

#[test]
fn no_registration_once_the_ring_runs() {
    let efd = eventfd(0);
    let other = eventfd(0);
    let ring = build_ring(8, &[efd.as_raw_fd()]).expect("a restricted ring");
    let err = ring
        .submitter()
        .register_files_update(0, &[other.as_raw_fd()])
        .expect_err("registering a new file is refused");
    assert_eq!(err.raw_os_error(), Some(libc::EACCES));
}
