//! The sandbox of `tapir serve` and `tapir datapath`: a sandboxed `tapir serve` runs with no
//! capability, no new privileges and a seccomp filter (read from /proc/PID/status), with
//! other ids under --user/--group, and keeps them under --no-sandbox; a system call outside
//! the allow-list ends a sandboxed process (tests/sandbox_filter.rs, which forks and so runs
//! alone in its own test binary).

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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
