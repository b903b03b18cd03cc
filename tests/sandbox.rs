//! The sandbox of `tapir serve` and `tapir datapath`: a sandboxed `tapir serve` runs with no
//! capability, no new privileges and a seccomp filter (read from /proc/PID/status), with
//! other ids under --user/--group, and keeps them under --no-sandbox; a system call outside
//! the allow-list ends a sandboxed process with a log line naming it, while the calls tapir
//! makes (threads, Unix sockets) go through.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tapir_sandbox::{Lockdown, Sandbox, SandboxConfig};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

/// `tapir serve` in the calling thread's namespace, killed (by pid) on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
}

impl Serve {
    fn start(engine: &str, extra: &[&str]) -> Serve {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let socket = std::env::temp_dir().join(format!(
            "tapir-sandbox-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let mut child = Command::new(TAPIR)
            .arg("serve")
            .args(["--socket", socket.to_str().unwrap()])
            .args([
                "--tap",
                common::TAP_NAME,
                "--queues",
                "2",
                "--engine",
                engine,
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let serve = Serve { child, socket };
        let mut lines = BufReader::new(out).lines();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                Instant::now() < deadline,
                "tapir serve never said listening"
            );
            match lines.next() {
                Some(Ok(l)) if l.contains("listening") => break,
                Some(Ok(_)) => {}
                _ => panic!("tapir serve ended before listening"),
            }
        }
        // Keep the pipe drained so that later events never block the daemon.
        std::thread::spawn(move || lines.for_each(drop));
        serve
    }

    fn status(&self) -> Status {
        Status::of(self.child.id())
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// The lines of /proc/PID/status.
struct Status(String);

impl Status {
    fn of(pid: u32) -> Status {
        Status(std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap())
    }

    fn field(&self, name: &str) -> &str {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
            .trim()
    }
}

#[test]
fn serve_runs_with_no_capability_no_new_privileges_and_a_seccomp_filter() {
    common::for_each_engine(|engine| {
        common::in_netns("sandboxed serve", || {
            let serve = Serve::start(&engine.to_string(), &[]);
            let s = serve.status();
            for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
                assert_eq!(s.field(set), "0000000000000000", "{engine} {set}");
            }
            assert_eq!(s.field("NoNewPrivs"), "1", "{engine}");
            assert_eq!(s.field("Seccomp"), "2", "{engine}: filter mode");
            assert_eq!(s.field("Seccomp_filters"), "2", "{engine}");
            // The TAP queues stay open.
            let taps = std::fs::read_dir(format!("/proc/{}/fd", serve.child.id()))
                .unwrap()
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.as_os_str() == "/dev/net/tun")
                .count();
            assert_eq!(taps, 2, "{engine}: TAP queue fds");
        });
    });
}

#[test]
fn no_sandbox_keeps_the_privileges() {
    common::in_netns("unsandboxed serve", || {
        let serve = Serve::start("uring", &["--no-sandbox"]);
        let s = serve.status();
        assert_ne!(s.field("CapEff"), "0000000000000000");
        assert_eq!(s.field("NoNewPrivs"), "0");
        assert_eq!(s.field("Seccomp"), "0");
    });
}

#[test]
fn user_and_group_switch_the_ids_before_the_sockets_are_bound() {
    common::in_netns("serve --user", || {
        let serve = Serve::start("classic", &["--user", "65534", "--group", "65534"]);
        let s = serve.status();
        assert_eq!(s.field("Uid"), "65534\t65534\t65534\t65534");
        assert_eq!(s.field("Gid"), "65534\t65534\t65534\t65534");
        assert_eq!(s.field("Groups"), "");
        assert_eq!(s.field("CapEff"), "0000000000000000");
        assert_eq!(s.field("CapBnd"), "0000000000000000");
        let meta = std::fs::metadata(&serve.socket).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (65534, 65534),
            "socket file owner"
        );
    });
}

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
fn what_tapir_does_goes_through_the_filter() {
    let (code, err) = in_sandboxed_child(Attempt::Allowed);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_system_call_outside_the_list_ends_the_process_with_a_log_line() {
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
