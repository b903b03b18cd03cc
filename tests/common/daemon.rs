//! `tapir serve` as a test runs it: the real binary in a network namespace of the test's own
//! (`ip netns exec`, so that /sys is the namespace's), its events on a channel.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use std::os::unix::net::UnixStream;

use tapir_simguest::SimGuest;
use tapir_testkit::vhost_frontend::{self, FrontendSession, Negotiation, UserAddresses};
use vhost::vhost_user::{Frontend, VhostUserProtocolFeatures};

pub const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

pub fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace and a scratch directory of this test, both gone on drop.
pub struct Netns {
    pub name: String,
    pub dir: PathBuf,
}

impl Netns {
    pub fn new() -> Netns {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "tdl{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        sh(&["ip", "netns", "add", &name]);
        let dir = std::env::temp_dir().join(format!("{name}-dir"));
        std::fs::create_dir_all(&dir).unwrap();
        Netns { name, dir }
    }

    pub fn socket(&self, what: &str) -> PathBuf {
        self.dir.join(format!("{what}.sock"))
    }

    /// A prefix for [`Netns::spawn`] and [`Netns::serve_output`] (before `setpriv`) that gives
    /// the daemon a `/dev/net/tun` of `mode`: a device node made in the test's directory and
    /// bind-mounted over `/dev/net/tun` in the mount namespace `ip netns exec` makes for the
    /// command, so the host's node is untouched. Distributions make it 0666 (udev); a machine
    /// without udev has the kernel's 0600, which no unprivileged daemon can open.
    pub fn tun_of_mode(&self, mode: u32) -> Vec<String> {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        let node = self.dir.join(format!("tun-{mode:o}"));
        if !node.exists() {
            mknod(
                &node,
                SFlag::S_IFCHR,
                Mode::from_bits_truncate(mode),
                makedev(10, 200),
            )
            .unwrap();
        }
        std::fs::set_permissions(&node, std::os::unix::fs::PermissionsExt::from_mode(mode))
            .unwrap();
        vec![
            "sh".into(),
            "-c".into(),
            "mount --bind \"$0\" /dev/net/tun && exec \"$@\"".into(),
            node.display().to_string(),
        ]
    }

    /// Runs `f` on a thread inside the namespace (its loopback, its TAPs).
    pub fn thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        use std::os::fd::AsFd;
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }

    /// `ip -n NS ARGS`.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip", "-n", &self.name];
        all.extend_from_slice(args);
        sh(&all);
    }

    /// `tapir serve ARGS` in the namespace (as `prefix`, e.g. setpriv), not yet spawned.
    pub fn serve_cmd(&self, prefix: &[&str], args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name])
            .args(prefix)
            .args([TAPIR, "serve"])
            .args(args)
            .env_remove("RUST_LOG");
        cmd
    }

    /// Runs `tapir serve ARGS` to its end (for the refusals).
    pub fn serve_output(&self, prefix: &[&str], args: &[&str]) -> Output {
        self.serve_cmd(prefix, args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn spawn(&self, prefix: &[&str], args: &[&str]) -> Daemon {
        let mut child = self
            .serve_cmd(prefix, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, events) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (etx, errors) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = etx.send(line);
            }
        });
        Daemon {
            child: Some(child),
            events,
            errors,
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A running `tapir serve`, killed (by pid) and reaped on drop if the test did not end it.
pub struct Daemon {
    child: Option<Child>,
    events: Receiver<String>,
    errors: Receiver<String>,
}

impl Daemon {
    /// The next event containing `what`, parsed.
    pub fn event(&self, what: &str) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(l) if l.contains(what) => return serde_json::from_str(&l).unwrap(),
                Ok(_) => continue,
                Err(_) => {
                    let log: Vec<String> = self.errors.try_iter().collect();
                    panic!(
                        "tapir serve never said {what:?}; its log:\n{}",
                        log.join("\n")
                    )
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    /// The pid of the `tapir serve` process itself (`ip netns exec` execs it, so the same).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the exit (at most 10 s) and returns its status and stderr.
    pub fn wait_exit(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tapir serve did not exit within 10 s of the signal");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut log = String::new();
        while let Ok(l) = self.errors.recv_timeout(Duration::from_millis(500)) {
            log.push_str(&l);
            log.push('\n');
        }
        (status, log)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

// ---- the frontend: the testkit's, on the simulated guest --------------------------------

/// What the tests negotiate with `tapir serve`: MQ, REPLY_ACK (every request acknowledged, so
/// a refusal is an error at its step), LOG_SHMFD and CONFIGURE_MEM_SLOTS; the guest's features
/// and `extra_features`; guest-physical addresses as the frontend's own.
pub fn negotiation(extra_features: u64) -> Negotiation {
    Negotiation {
        protocol_features: VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::LOG_SHMFD
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
        extra_features,
        addresses: UserAddresses::GuestPhysical,
        ..Negotiation::default()
    }
}

/// Connects to `tapir serve` at `socket` (retrying for 10 s while it starts) and attaches
/// `guest` with [`negotiation`]`(extra_features)`: memory table, every vring, enabled. Returns
/// the rust-vmm frontend for the test's further requests.
pub fn attach(socket: &Path, guest: &SimGuest, extra_features: u64) -> Frontend {
    let stream = vhost_frontend::connect(socket, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connecting to tapir serve: {e:?}"));
    attach_on(stream, guest, &negotiation(extra_features))
}

/// Attaches `guest` over an open connection to `tapir serve`, negotiating `negotiation`; every
/// protocol feature asked for must be granted and `GET_QUEUE_NUM` must count virtqueues.
pub fn attach_on(stream: UnixStream, guest: &SimGuest, negotiation: &Negotiation) -> Frontend {
    let session = FrontendSession::start_with(stream, guest, negotiation)
        .unwrap_or_else(|e| panic!("attaching the simulated guest to tapir serve: {e:?}"));
    assert!(
        session
            .protocol_features()
            .contains(negotiation.protocol_features),
        "protocol features {:?}, asked for {:?}",
        session.protocol_features(),
        negotiation.protocol_features
    );
    assert_eq!(
        session.queue_num(),
        Some(2 * u64::from(guest.queue_pairs())),
        "GET_QUEUE_NUM"
    );
    session.into_frontend()
}
