//! The seccomp filter of `tapir serve` and `tapir datapath`, in a forked child that enters
//! the same sandbox: a system call outside the allow-list ends the process with a log line
//! naming it, while the calls tapir makes (threads, Unix sockets) go through.
//!
//! One test in a binary of its own: it forks, and a fork while other test threads hold
//! locks (the allocator's, stderr's) can leave the child waiting on them forever.

use std::io::Read;

use tapir_sandbox::{Lockdown, Sandbox, SandboxConfig};

/// What the sandboxed child tries.
#[derive(Clone, Copy, Debug)]
enum Attempt {
    /// What tapir does: a worker thread, a Unix socket, an eventfd. Exits 0.
    Allowed,
    /// socket(AF_INET): no network sockets.
    InetSocket,
    /// openat: no files opened after set-up.
    Open,
    /// ptrace.
    Ptrace,
    /// execve.
    Exec,
    /// mmap with PROT_EXEC.
    ExecutableMemory,
}

/// Forks; the child (single-threaded, as `tapir serve` is at that point) enters the same
/// sandbox `tapir serve` enters and makes the attempt. Returns the child's exit status and
/// what it wrote to stderr.
fn in_sandboxed_child(attempt: Attempt) -> (i32, String) {
    let mut pipe = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    let rc = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0);
    let sandbox = Lockdown::Sandboxed(Box::new(
        Sandbox::new(SandboxConfig::default()).expect("the filter compiles"),
    ));
    // SAFETY: the child only makes system calls and plain Rust calls before _exit; the
    // parent waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: stderr becomes the pipe's write end (dup2 on valid fds).
        unsafe { libc::dup2(pipe[1], 2) };
        let code = match sandbox.enter() {
            Ok(()) => attempt_in_child(attempt),
            Err(e) => {
                eprintln!("enter: {e}");
                3
            }
        };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    // SAFETY: closes our copy of the write end.
    unsafe { libc::close(pipe[1]) };
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    let mut err = String::new();
    // SAFETY: the read end is ours; File takes it over.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(pipe[0]) };
    f.read_to_string(&mut err).unwrap();
    assert!(
        libc::WIFEXITED(status),
        "{attempt:?}: child status {status:#x}, {err}"
    );
    (libc::WEXITSTATUS(status), err)
}

fn attempt_in_child(attempt: Attempt) -> i32 {
    // SAFETY: plain system calls with valid (or null) arguments; refused ones never return.
    unsafe {
        match attempt {
            Attempt::Allowed => {
                let t = std::thread::spawn(|| libc::eventfd(0, libc::EFD_CLOEXEC));
                let efd = t.join().unwrap_or(-1);
                let unix = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
                if efd < 0 || unix < 0 {
                    return 4;
                }
                0
            }
            Attempt::InetSocket => {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                5
            }
            Attempt::Open => {
                libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY);
                5
            }
            Attempt::Ptrace => {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                5
            }
            Attempt::Exec => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execv(c"/bin/true".as_ptr(), argv.as_ptr());
                5
            }
            Attempt::ExecutableMemory => {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                5
            }
        }
    }
}

#[test]
fn the_filter_lets_tapirs_calls_through_and_ends_a_process_on_any_other() {
    let (code, err) = in_sandboxed_child(Attempt::Allowed);
    assert_eq!(code, 0, "{err}");
    for (attempt, nr) in [
        (Attempt::InetSocket, libc::SYS_socket),
        (Attempt::Open, libc::SYS_openat),
        (Attempt::Ptrace, libc::SYS_ptrace),
        (Attempt::Exec, libc::SYS_execve),
        (Attempt::ExecutableMemory, libc::SYS_mmap),
    ] {
        let (code, err) = in_sandboxed_child(attempt);
        assert_eq!(code, 159, "{attempt:?}: {err}");
        assert!(
            err.contains(&format!("seccomp refused system call {nr}\n")),
            "{attempt:?}: {err:?}"
        );
    }
}
