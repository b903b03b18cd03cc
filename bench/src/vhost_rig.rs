//! The vhost-user rig: a vhost-user-net backend process (by default this binary's
//! `tapir serve`) started inside the benchmark's network namespace, where it creates its TAP,
//! and the simulated guest connected to it through [`FrontendSession`]. The host side of the
//! TAP is then configured as [`tapir_testkit::host_tap`] does for a TAP of its own, so the same peers and
//! frames work unchanged.
//!
//! The backend is a child process in its own process group, started per measurement and
//! ended by its pid (SIGTERM to its group, SIGKILL after 3 s); its CPU time is its process
//! tree's (every thread of the child and its descendants, from the scheduler's accounting, as
//! for the in-process workers).

use std::collections::VecDeque;
use std::io::BufRead;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tapir_simguest::{GuestConfig, RxDriver, SimGuest, TxDriver};

use tapir_testkit::netns;
use tapir_testkit::vhost_frontend::{self, FrontendSession};
use tapir_testkit::{self as rig, TAP_NAME};

/// How long a backend may take to accept its first connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the session is set up its TAP may take to appear.
const TAP_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of the backend's output kept for error messages.
const OUTPUT_LINES: usize = 40;

/// How the bench starts the backend, once per measurement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BackendCommand {
    /// This binary's `tapir serve --socket {socket} --tap {tap} --queues {queues}` (with
    /// `--cpus {cpus}`, the CPUs the in-process engines' workers get, and
    /// `--busy-poll-us {busy_poll_us}` for a budget).
    TapirServe,
    /// A shell command (`sh -c`), with `{socket}`, `{tap}`, `{queues}`, `{cpus}` (a comma
    /// list, empty without pinning) and `{busy_poll_us}` (0: off) replaced by shell-quoted
    /// values.
    Shell(String),
}

/// A vhost-user-net backend to measure next to the in-process engines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserBackend {
    /// The socket the backend listens on (the bench connects as the frontend).
    pub socket: PathBuf,
    /// How to start it.
    pub command: BackendCommand,
}

impl VhostUserBackend {
    /// Parses `vhost-user:SOCKET`, with an optional command template (None: `tapir serve`).
    pub fn parse(spec: &str, command: Option<String>) -> Result<VhostUserBackend, String> {
        let socket = spec
            .strip_prefix("vhost-user:")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| format!("--backend {spec:?}: expected vhost-user:SOCKET"))?;
        let command = match command {
            None => BackendCommand::TapirServe,
            Some(c) if c.trim().is_empty() => return Err("--backend-cmd is empty".into()),
            Some(c) => BackendCommand::Shell(c),
        };
        Ok(VhostUserBackend {
            socket: PathBuf::from(socket),
            command,
        })
    }

    /// The command line for `queues` pairs with workers on `cpus`, busy polling for
    /// `busy_poll_us` (0: off).
    fn command(&self, queues: usize, cpus: &[Option<usize>], busy_poll_us: u64) -> Result<Command> {
        let cpu_list: Option<Vec<String>> = cpus.iter().map(|c| c.map(|c| c.to_string())).collect();
        let cpu_list = cpu_list.map(|v| v.join(",")).unwrap_or_default();
        match &self.command {
            BackendCommand::TapirServe => {
                let mut cmd = Command::new(crate::self_exe());
                cmd.arg("serve").arg("--socket").arg(&self.socket).args([
                    "--tap",
                    TAP_NAME,
                    "--queues",
                    &queues.to_string(),
                ]);
                if !cpu_list.is_empty() {
                    cmd.args(["--cpus", &cpu_list]);
                }
                if busy_poll_us > 0 {
                    cmd.args(["--busy-poll-us", &busy_poll_us.to_string()]);
                }
                Ok(cmd)
            }
            BackendCommand::Shell(template) => {
                let line = template
                    .replace("{socket}", &shell_quote(&self.socket.display().to_string()))
                    .replace("{tap}", &shell_quote(TAP_NAME))
                    .replace("{queues}", &shell_quote(&queues.to_string()))
                    .replace("{cpus}", &shell_quote(&cpu_list))
                    .replace("{busy_poll_us}", &shell_quote(&busy_poll_us.to_string()));
                let mut cmd = Command::new("sh");
                cmd.arg("-c").arg(line);
                Ok(cmd)
            }
        }
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Removes a socket left at `path` by an earlier backend; refuses to remove anything else.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display())),
        Ok(_) => bail!(
            "{} exists and is not a socket: not using it as the vhost-user socket",
            path.display()
        ),
        Err(_) => Ok(()),
    }
}

/// Before a backend is started on `path`: refuses a socket something listens on (a backend
/// the bench did not start, whose socket it must not take), removes a stale one.
fn claim_socket(path: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        bail!(
            "something already listens on {}: the bench starts its own backend there per \
             measurement (choose a free path)",
            path.display()
        );
    }
    remove_stale_socket(path)
}

/// CPU time (ns) of `root` and its descendants: every thread's `schedstat` run time. None if
/// `root` is gone.
fn tree_cpu_ns(root: u32) -> Option<u64> {
    let mut total = 0u64;
    let mut pending = vec![root];
    let mut is_root = true;
    while let Some(pid) = pending.pop() {
        let tasks = match std::fs::read_dir(format!("/proc/{pid}/task")) {
            Ok(t) => t,
            Err(_) if is_root => return None,
            Err(_) => continue,
        };
        is_root = false;
        for task in tasks.flatten() {
            let dir = task.path();
            if let Some(ns) = std::fs::read_to_string(dir.join("schedstat"))
                .ok()
                .and_then(|t| t.split_whitespace().next()?.parse::<u64>().ok())
            {
                total += ns;
            }
            if let Ok(children) = std::fs::read_to_string(dir.join("children")) {
                pending.extend(
                    children
                        .split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    Some(total)
}

/// The backend process.
struct BackendProcess {
    child: Child,
    /// Its last lines of output (stdout and stderr).
    output: Arc<Mutex<VecDeque<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    socket: PathBuf,
    command: String,
    ended: bool,
}

impl BackendProcess {
    fn spawn(
        backend: &VhostUserBackend,
        queues: usize,
        cpus: &[Option<usize>],
        busy_poll_us: u64,
    ) -> Result<Self> {
        claim_socket(&backend.socket)?;
        let mut cmd = backend.command(queues, cpus, busy_poll_us)?;
        let command = format!("{cmd:?}");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe; it touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                // Die with the bench's namespace thread (the one that spawned it).
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting the backend: {command}"))?;
        let output = Arc::new(Mutex::new(VecDeque::new()));
        let mut readers = Vec::new();
        let pipes: [Option<Box<dyn std::io::Read + Send>>; 2] = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let output = output.clone();
            readers.push(
                std::thread::Builder::new()
                    .name("backend-output".into())
                    .spawn(move || {
                        for line in std::io::BufReader::new(pipe).lines() {
                            let Ok(line) = line else { break };
                            let mut o = output.lock().unwrap_or_else(PoisonError::into_inner);
                            if o.len() == OUTPUT_LINES {
                                o.pop_front();
                            }
                            o.push_back(line);
                        }
                    })?,
            );
        }
        Ok(BackendProcess {
            child,
            output,
            readers,
            socket: backend.socket.clone(),
            command,
            ended: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn output_tail(&self) -> String {
        let o = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        if o.is_empty() {
            "(no output)".into()
        } else {
            o.iter().cloned().collect::<Vec<_>>().join("\n")
        }
    }

    /// Whether the backend has exited; it stays unreaped (a zombie still holding its pid, so
    /// its process group id cannot be reused) until [`Self::end`].
    fn has_exited(&self) -> bool {
        let Ok(pid) = i32::try_from(self.pid()) else {
            return true;
        };
        !matches!(
            waitid(
                Id::Pid(Pid::from_raw(pid)),
                WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
            ),
            Ok(WaitStatus::StillAlive)
        )
    }

    /// An error (with its last output) if the backend has exited.
    fn check_alive(&mut self) -> Result<()> {
        if self.ended || !self.has_exited() {
            return Ok(());
        }
        let status = self.end();
        Err(anyhow!(
            "the backend ({}) exited ({}); its last output:\n{}",
            self.command,
            status.map_or_else(|| "status unknown".to_owned(), |s| s.to_string()),
            self.output_tail()
        ))
    }

    fn signal_group(&self, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.pid()) {
            // The child leads its own process group (process_group(0)), and is not reaped
            // before this: the group id is still its pid.
            let _ = killpg(Pid::from_raw(pid), signal);
        }
    }

    /// Kills what is left of the backend's process group (a shell's children), reaps the
    /// backend and collects its output.
    fn end(&mut self) -> Option<std::process::ExitStatus> {
        if self.ended {
            return None;
        }
        self.signal_group(Signal::SIGKILL);
        let status = self.child.wait().ok();
        self.ended = true;
        // The readers end when the pipes close; give them a moment to take the last lines, but
        // do not wait for a process that escaped the group (a daemon) and still holds a pipe.
        let deadline = Instant::now() + Duration::from_millis(500);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for r in self.readers.drain(..) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
        status
    }

    /// Ends the backend: SIGTERM to its process group, SIGKILL after 3 s.
    fn terminate(&mut self) {
        if !self.ended {
            self.signal_group(Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            while !self.has_exited() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            self.end();
        }
        remove_stale_socket(&self.socket).ok();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.end();
        remove_stale_socket(&self.socket).ok();
    }
}

/// A backend process, the simulated guest connected to it, and the TAP the backend made,
/// configured on the host side.
pub struct VhostUserRig {
    /// Each queue pair's drivers, taken by the benchmark.
    pub drivers: Vec<Option<(RxDriver, TxDriver)>>,
    /// The TAP's MAC (the host side).
    pub host_mac: [u8; 6],
    frontend: Option<FrontendSession>,
    // Dropped after the frontend (field order): the guest's memory outlives the session.
    guest: SimGuest,
    backend: BackendProcess,
}

impl VhostUserRig {
    /// Starts the backend for the guest's queue pairs (workers on `cpus`, busy polling for
    /// `busy_poll_us`, 0: off), connects the guest and configures the TAP. Must run inside
    /// the benchmark's namespace.
    pub fn start(
        backend: &VhostUserBackend,
        guest: GuestConfig,
        mtu: u16,
        cpus: &[Option<usize>],
        busy_poll_us: u64,
    ) -> Result<VhostUserRig> {
        let queues = usize::from(guest.queue_pairs);
        let mut guest = SimGuest::new(guest).context("simulated guest")?;
        let mut process = BackendProcess::spawn(backend, queues, cpus, busy_poll_us)?;
        let with_output = |p: &BackendProcess, e: anyhow::Error| {
            e.context(format!(
                "backend {} (pid {}); its last output:\n{}",
                p.command,
                p.pid(),
                p.output_tail()
            ))
        };
        let started = Instant::now();
        let stream = loop {
            process.check_alive()?;
            match vhost_frontend::connect(&backend.socket, Duration::from_millis(50)) {
                Ok(s) => break s,
                Err(e) if started.elapsed() > CONNECT_TIMEOUT => {
                    let e = match e {
                        vhost_frontend::FrontendError::Connect { source, .. } => source.into(),
                        other => anyhow::Error::from(other),
                    };
                    let e = e.context(format!(
                        "the backend accepted no connection on {} within {CONNECT_TIMEOUT:?}",
                        backend.socket.display()
                    ));
                    return Err(with_output(&process, e));
                }
                Err(_) => {}
            }
        };
        let frontend = match FrontendSession::start_on(stream, &guest) {
            Ok(f) => f,
            Err(e) => {
                let e = process.check_alive().err().unwrap_or_else(|| e.into());
                return Err(with_output(&process, e));
            }
        };
        tracing::debug!(?frontend, "vhost-user session running");
        let deadline = Instant::now() + TAP_TIMEOUT;
        while netns::iface_index(TAP_NAME).is_err() {
            process.check_alive()?;
            if Instant::now() > deadline {
                return Err(with_output(
                    &process,
                    anyhow!(
                        "the backend did not create the TAP {TAP_NAME} in the bench's namespace"
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        rig::configure_host_tap(mtu).context("configuring the backend's TAP")?;
        let host_mac = netns::iface_mac(TAP_NAME)?;
        let drivers = (0..guest.queue_pairs())
            .map(|i| Some(guest.take_pair(i)))
            .collect();
        Ok(VhostUserRig {
            drivers,
            host_mac,
            frontend: Some(frontend),
            guest,
            backend: process,
        })
    }

    /// Takes queue pair `i`'s drivers (once).
    pub fn take(&mut self, i: usize) -> (RxDriver, TxDriver) {
        self.drivers[i].take().expect("drivers taken twice")
    }

    /// CPU time the backend (its process tree) has used so far; None if it cannot be read.
    pub fn backend_cpu_ns(&self) -> Option<u64> {
        tree_cpu_ns(self.backend.pid())
    }

    /// Stops the vrings (`GET_VRING_BASE`), disconnects, ends the backend and waits until its
    /// TAP is gone. Returns notes on anything odd (a vring base that does not match the used
    /// index: chains the backend popped and did not complete).
    pub fn shutdown(mut self) -> Result<Vec<String>> {
        self.backend.check_alive()?;
        let mut notes = Vec::new();
        if let Some(frontend) = self.frontend.take() {
            let bases = frontend.stop().map_err(|e| {
                anyhow::Error::from(e).context(format!(
                    "stopping the vrings; the backend's last output:\n{}",
                    self.backend.output_tail()
                ))
            })?;
            let mem = self.guest.memory();
            for (q, base) in self.guest.queues().iter().zip(bases) {
                let used = mem.read_u16(q.used_ring + 2).map_err(|e| anyhow!("{e}"))?;
                if base != u32::from(used) {
                    notes.push(format!(
                        "vring {}: GET_VRING_BASE {base}, used index {used}",
                        q.index
                    ));
                }
            }
        }
        self.backend.terminate();
        rig::wait_tap_gone()?;
        Ok(notes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_backend_specs_and_quotes_templates() {
        let b = VhostUserBackend::parse("vhost-user:/tmp/a b.sock", None).unwrap();
        assert_eq!(b.socket, PathBuf::from("/tmp/a b.sock"));
        assert_eq!(b.command, BackendCommand::TapirServe);
        assert!(VhostUserBackend::parse("vhost-user:", None).is_err());
        assert!(VhostUserBackend::parse("/tmp/x.sock", None).is_err());
        assert!(VhostUserBackend::parse("vhost-user:/x", Some(" ".into())).is_err());
        let b = VhostUserBackend::parse(
            "vhost-user:/tmp/it's.sock",
            Some(
                "backend --socket {socket} --if {tap} -q {queues} -c {cpus} -b {busy_poll_us}"
                    .into(),
            ),
        )
        .unwrap();
        let cmd = b.command(2, &[Some(1), Some(0)], 50).unwrap();
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-c",
                r"backend --socket '/tmp/it'\''s.sock' --if 'tapir0' -q '2' -c '1,0' -b '50'"
            ]
        );
    }

    #[test]
    fn process_tree_cpu_time() {
        let mine = tree_cpu_ns(std::process::id()).unwrap();
        assert!(mine > 0);
        assert!(tree_cpu_ns(u32::MAX).is_none());
    }
}
