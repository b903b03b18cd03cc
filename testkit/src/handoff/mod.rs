//! The handoff rig: a simulated guest and a TAP in this process, the datapath in a child
//! process (`tapir datapath`), handed from child to fresh child on demand while traffic runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tapir_datapath::{DeviceConfig, EngineKind};
use tapir_migrate::{hand_off, LaunchSource, Listener, Outcome, Timeouts};
use tapir_simguest::{GuestConfig, RxDriver, SimGuest, TxDriver};

use crate::memory::{guest_memory, pair_resources};

/// The hidden environment variable that starts the rig's datapath children with
/// `--no-sandbox` (measurements only: on a machine where the sandbox cannot raise
/// `RLIMIT_RTPRIO`, without `CAP_SYS_RESOURCE`, `--handoff-rt-priority` needs the children's
/// own `CAP_SYS_NICE`).
pub const CHILD_NO_SANDBOX_ENV: &str = "TAPIR_HANDOFF_CHILD_NO_SANDBOX";
use crate::netns;
use crate::rig::{self, GUEST_MAC, TAP_NAME};

mod traffic;

pub use traffic::{DirectionReport, SteadyTraffic, TrafficReport};

/// One event a datapath child printed.
#[derive(Clone, Debug)]
pub struct ChildEvent {
    /// `running`, `first_service`, `committed`, `rolled_back`.
    pub event: String,
    /// The whole line, parsed.
    pub json: serde_json::Value,
}

struct DatapathChild {
    child: Child,
    events: Receiver<ChildEvent>,
    socket: PathBuf,
}

impl DatapathChild {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_event(&self, name: &str, timeout: Duration) -> Result<ChildEvent> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if e.event == name => return Ok(e),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => bail!(
                    "datapath child {}: no {name:?} within {timeout:?}",
                    self.pid()
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("datapath child {} exited before {name:?}", self.pid())
                }
            }
        }
    }
}

impl Drop for DatapathChild {
    fn drop(&mut self) {
        // A child this rig started and no longer tracks (a failed handoff): end it.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What one handoff measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandoffSample {
    /// Quiesce start to the successor's first used-ring update.
    pub downtime_us: f64,
    /// Quiesce start to the successor's RUNNING.
    pub switch_us: f64,
    /// Successor spawn to the predecessor's commit (the whole handoff, prepare included; the
    /// predecessor's teardown goes on afterwards and is reaped later).
    pub total_ms: f64,
    /// Blackout phases in µs: quiesce + encode + send (quiesce start to SWITCH received),
    /// decode + engine set-up (to READY; version 3: decode and claim), READY to GO, GO to
    /// RUNNING (both 0 in version 3), RUNNING (version 3: the claim) to the first used-ring
    /// update.
    pub phases_us: [f64; 5],
    /// The handoff protocol version the two processes agreed on.
    pub protocol: u16,
    /// The downtime's span: the quiesce start and the successor's first used-ring update,
    /// CLOCK_MONOTONIC ns (the traffic's gaps carry the same clock).
    pub blackout_ns: (u64, u64),
}

/// How datapath children run.
#[derive(Clone, Debug, Default)]
pub struct ChildOptions {
    /// Pin queue pair i's worker to `cpus[i]`.
    pub cpus: Vec<usize>,
    /// Run workers SCHED_FIFO at this priority.
    pub rt_priority: Option<u8>,
}

/// A guest in this process, its datapath in a child process.
pub struct HandoffRig {
    exe: PathBuf,
    dir: PathBuf,
    engine: EngineKind,
    child: ChildOptions,
    /// The simulated guest.
    pub guest: SimGuest,
    /// Each pair's drivers, for the caller to take.
    pub drivers: Vec<Option<(RxDriver, TxDriver)>>,
    /// The TAP's MAC.
    pub host_mac: [u8; 6],
    current: Option<DatapathChild>,
    /// Predecessors that committed and are tearing down (at `SCHED_IDLE`, which on a busy
    /// machine takes seconds), at most `retire_limit`: see [`HandoffRig::defer_teardown`].
    retiring: std::collections::VecDeque<DatapathChild>,
    retire_limit: usize,
    counter: u64,
}

impl HandoffRig {
    /// Creates the TAP and the guest (in the calling thread's namespace) and launches the
    /// first datapath child with the `tapir` binary at `exe`.
    pub fn launch(
        exe: &Path,
        engine: EngineKind,
        guest_cfg: GuestConfig,
        child: ChildOptions,
    ) -> Result<HandoffRig> {
        let pairs = guest_cfg.queue_pairs;
        let tap = rig::host_tap(usize::from(pairs), 1500)?;
        let host_mac = netns::iface_mac(TAP_NAME)?;
        let mut guest = SimGuest::new(guest_cfg)?;
        let memory = guest_memory(&guest)?;
        let mut resources = Vec::new();
        for (i, q) in tap.into_queues().into_iter().enumerate() {
            resources.push(pair_resources(&guest, u16::try_from(i)?, q.into_fd())?);
        }
        let config = DeviceConfig {
            mac: GUEST_MAC,
            ..DeviceConfig::new(guest.features(), engine)
        };
        let dir = std::env::temp_dir().join(
            format!(
                "tapir-handoff-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            )
            .replace(['(', ')'], ""),
        );
        std::fs::create_dir_all(&dir)?;
        let drivers = (0..pairs).map(|i| Some(guest.take_pair(i))).collect();
        let mut rig = HandoffRig {
            exe: exe.to_owned(),
            dir,
            engine,
            child,
            guest,
            drivers,
            host_mac,
            current: None,
            retiring: std::collections::VecDeque::new(),
            retire_limit: 0,
            counter: 0,
        };
        // The launch: this process plays the source.
        let launch_sock = rig.dir.join("launch.sock");
        let listener = Listener::bind(&launch_sock)?;
        let child = rig.spawn(&launch_sock)?;
        let ch = listener
            .accept(Some(Duration::from_secs(10)))
            .context("the first datapath child did not connect")?;
        let mut source = LaunchSource::new(config, memory, resources);
        match hand_off(&mut source, &ch, Timeouts::default())? {
            Outcome::Committed(_) => {}
            Outcome::RolledBack(e) => return Err(anyhow!("launching the datapath failed: {e}")),
        }
        child.wait_event("running", Duration::from_secs(10))?;
        rig.current = Some(child);
        Ok(rig)
    }

    fn spawn(&mut self, take_over: &Path) -> Result<DatapathChild> {
        self.spawn_with(take_over, &[])
    }

    fn spawn_with(&mut self, take_over: &Path, extra: &[&str]) -> Result<DatapathChild> {
        self.spawn_speaking(take_over, extra, None)
    }

    fn spawn_speaking(
        &mut self,
        take_over: &Path,
        extra: &[&str],
        newest: Option<u16>,
    ) -> Result<DatapathChild> {
        self.counter += 1;
        let socket = self.dir.join(format!("dp{}.sock", self.counter));
        let mut cmd = Command::new(&self.exe);
        cmd.arg("datapath")
            .arg("--take-over")
            .arg(take_over)
            .arg("--listen")
            .arg(&socket)
            .arg("--engine")
            .arg(self.engine.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .args(extra);
        if let Some(v) = newest {
            cmd.env(tapir_migrate::protocol::NEWEST_VERSION_ENV, v.to_string());
        }
        if !self.child.cpus.is_empty() {
            let list: Vec<String> = self.child.cpus.iter().map(ToString::to_string).collect();
            cmd.arg("--cpus").arg(list.join(","));
        }
        if let Some(p) = self.child.rt_priority {
            cmd.arg("--rt-priority").arg(p.to_string());
        }
        if std::env::var_os(CHILD_NO_SANDBOX_ENV).is_some() {
            cmd.arg("--no-sandbox");
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", self.exe.display()))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(json) = serde_json::from_str::<serde_json::Value>(&line) {
                    let event = json["event"].as_str().unwrap_or_default().to_owned();
                    if tx.send(ChildEvent { event, json }).is_err() {
                        return;
                    }
                }
            }
        });
        Ok(DatapathChild {
            child,
            events: rx,
            socket,
        })
    }

    /// Takes queue pair `i`'s drivers (once).
    pub fn take(&mut self, i: usize) -> (RxDriver, TxDriver) {
        self.drivers[i].take().expect("drivers taken twice")
    }

    /// Anonymous resident memory of the datapath process now running, KiB (`RssAnon`: its
    /// own heap and buffers; guest memory is shared and not counted).
    pub fn datapath_rss_anon_kib(&self) -> Option<u64> {
        let pid = self.datapath_pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssAnon:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// The handoff socket the running datapath listens on.
    fn current_socket(&self) -> Result<PathBuf> {
        Ok(self
            .current
            .as_ref()
            .ok_or_else(|| anyhow!("no datapath running"))?
            .socket
            .clone())
    }

    /// The handoff socket the datapath now running listens on (for tests that play a
    /// successor of their own).
    pub fn handoff_socket(&self) -> Option<PathBuf> {
        self.current.as_ref().map(|c| c.socket.clone())
    }

    /// The pid of the datapath process now running.
    pub fn datapath_pid(&self) -> Option<u32> {
        self.current.as_ref().map(DatapathChild::pid)
    }

    /// Lets up to `limit` predecessors finish their teardown while the next handoffs run
    /// (default 0: each handoff waits until its predecessor has exited). A run of 1000
    /// handoffs on a busy 2-CPU machine then takes ~4 min a row instead of ~12 (a
    /// predecessor's teardown at `SCHED_IDLE` took 1-2 s there). Whether the overlapping
    /// teardowns cost the traffic anything is not measured yet (the machine was too loaded
    /// to tell); `tests/handoff.rs` keeps the default. Exits are still checked, later.
    pub fn defer_teardown(&mut self, limit: usize) {
        self.retire_limit = limit;
    }

    /// Hands the datapath to a fresh child process and waits until the old one committed
    /// and (unless [`defer_teardown`](Self::defer_teardown)) has exited.
    pub fn handoff(&mut self) -> Result<HandoffSample> {
        self.handoff_to(None, &[])
    }

    /// [`handoff`](Self::handoff) to a successor that claims the device and runs but never
    /// acknowledges the switch (`--fail-at no-ack`, version 3): the source must commit on
    /// the claim it reads in the ownership word.
    pub fn handoff_without_ack(&mut self) -> Result<HandoffSample> {
        self.handoff_to(None, &["--fail-at", "no-ack"])
    }

    /// [`handoff`](Self::handoff) to a successor that speaks protocol versions up to
    /// `newest` only (`TAPIR_HANDOFF_PROTOCOL`; it keeps that cap as a source later).
    pub fn handoff_speaking(&mut self, newest: u16) -> Result<HandoffSample> {
        self.handoff_to(Some(newest), &[])
    }

    fn handoff_to(&mut self, newest: Option<u16>, extra: &[&str]) -> Result<HandoffSample> {
        let start = Instant::now();
        let old_socket = self.current_socket()?;
        let new = self.spawn_speaking(&old_socket, extra, newest)?;
        let running = new.wait_event("running", Duration::from_secs(10))?;
        let first = new.wait_event("first_service", Duration::from_secs(10))?;
        let mut old = self
            .current
            .take()
            .ok_or_else(|| anyhow!("no datapath running"))?;
        let committed = old.wait_event("committed", Duration::from_secs(10));
        let committed = match committed {
            Ok(c) => c,
            Err(e) => {
                let status = old.child.wait()?;
                return Err(e.context(format!("the old datapath exited with {status}")));
            }
        };
        if std::env::var_os("TAPIR_HANDOFF_TRACE").is_some() {
            let c = |k: &str| committed.json[k].as_u64().unwrap_or(0);
            let r = |k: &str| running.json[k].as_u64().unwrap_or(0);
            let q = c("quiesce_ns");
            let resumed = first.json["resumed_ns"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(q)
                / 1000;
            let served = first.json["first_service_ns"]
                .as_u64()
                .unwrap_or(0)
                .saturating_sub(q)
                / 1000;
            if r("protocol") >= 3 {
                eprintln!(
                    "handoff trace v3 (µs from quiesce): switch sent {} | successor got switch {} | claimed {} | worker resumed {} | first service {} | ack sent {} | source got ack {} | quiesce at {q} ns (CLOCK_MONOTONIC) | source pid {} successor pid {}",
                    c("switch_sent_ns").saturating_sub(q) / 1000,
                    r("switch_ns").saturating_sub(q) / 1000,
                    r("go_ns").saturating_sub(q) / 1000,
                    resumed,
                    served,
                    r("running_ns").saturating_sub(q) / 1000,
                    c("running_ns").saturating_sub(q) / 1000,
                    old.pid(),
                    new.pid(),
                );
            } else {
                eprintln!(
                    "handoff trace (µs from quiesce): switch sent {} | successor got switch {} | ready sent {} | source got ready {} | successor got go {} | running {} | source got running {} | worker resumed {} | first service {}",
                    c("switch_sent_ns").saturating_sub(q) / 1000,
                    r("switch_ns").saturating_sub(q) / 1000,
                    r("ready_ns").saturating_sub(q) / 1000,
                    c("ready_ns").saturating_sub(q) / 1000,
                    r("go_ns").saturating_sub(q) / 1000,
                    r("running_ns").saturating_sub(q) / 1000,
                    c("running_ns").saturating_sub(q) / 1000,
                    resumed,
                    served,
                );
            }
        }
        self.retiring.push_back(old);
        self.reap(self.retire_limit)?;
        let total_ms = start.elapsed().as_secs_f64() * 1e3;
        self.current = Some(new);
        let at = |k: &str| running.json[k].as_u64().unwrap_or(0);
        let protocol = u16::try_from(at("protocol")).unwrap_or(0);
        // Version 3 runs before it acknowledges: its "running" is the claim (go_ns), and its
        // READY-to-GO and GO-to-RUNNING phases do not exist (0).
        let (q, r) = if protocol >= 3 {
            (at("quiesce_ns"), at("go_ns"))
        } else {
            (at("quiesce_ns"), at("running_ns"))
        };
        let f = first.json["first_service_ns"].as_u64().unwrap_or(0);
        let d = first.json["downtime_ns"].as_u64().unwrap_or(0);
        #[allow(clippy::cast_precision_loss, reason = "microseconds")]
        let us = |a: u64, b: u64| b.saturating_sub(a) as f64 / 1e3;
        Ok(HandoffSample {
            downtime_us: us(0, d),
            switch_us: us(q, r),
            total_ms,
            phases_us: [
                us(q, at("switch_ns")),
                us(at("switch_ns"), at("ready_ns")),
                us(at("ready_ns"), at("go_ns")),
                us(at("go_ns"), r),
                us(r, f),
            ],
            protocol,
            blackout_ns: (at("quiesce_ns"), f),
        })
    }

    /// Starts a successor that dies at `fail_at` (`before-fds`, `after-fds`, `after-state`,
    /// `before-running`) and checks that the running datapath rolled back and still runs.
    pub fn failed_handoff(&mut self, fail_at: &str) -> Result<()> {
        let old_socket = self.current_socket()?;
        let mut doomed = self.spawn_with(&old_socket, &["--fail-at", fail_at])?;
        let status = doomed.child.wait()?;
        if status.code() != Some(86) {
            bail!("the failing successor exited with {status}, not by its test hook");
        }
        let current = self
            .current
            .as_mut()
            .ok_or_else(|| anyhow!("no datapath running"))?;
        current.wait_event("rolled_back", Duration::from_secs(10))?;
        if current.child.try_wait()?.is_some() {
            bail!("the datapath exited after a failed handoff");
        }
        Ok(())
    }

    /// Stops the datapath child (SIGTERM, then waits) and waits until the TAP is gone.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop_child()?;
        drop(self.drivers.drain(..));
        rig::wait_tap_gone()?;
        Ok(())
    }

    /// Reaps predecessors that have exited, and waits for the oldest while more than `keep`
    /// are left; each must have exited cleanly.
    /// Waits until every predecessor has finished its teardown (see
    /// [`defer_teardown`](Self::defer_teardown)) and checks how each exited.
    pub fn reap_all(&mut self) -> Result<()> {
        self.reap(0)
    }

    fn reap(&mut self, keep: usize) -> Result<()> {
        let mut left = std::collections::VecDeque::new();
        let mut failed = None;
        while let Some(mut c) = self.retiring.pop_front() {
            let status = if self.retiring.len() + left.len() >= keep {
                c.child.wait().map(Some)
            } else {
                c.child.try_wait()
            };
            match status {
                Ok(Some(s)) if !s.success() => {
                    failed.get_or_insert_with(|| anyhow!("an old datapath exited with {s}"));
                }
                Ok(Some(_)) => {}
                Ok(None) => left.push_back(c),
                Err(e) => {
                    failed.get_or_insert_with(|| anyhow!("waiting for an old datapath: {e}"));
                }
            }
        }
        self.retiring = left;
        failed.map_or(Ok(()), Err)
    }

    fn stop_child(&mut self) -> Result<()> {
        let reaped = self.stop_current();
        self.reap(0).and(reaped)
    }

    fn stop_current(&mut self) -> Result<()> {
        if let Some(mut c) = self.current.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.pid())?);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if c.child.try_wait()?.is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.child.kill();
                    let _ = c.child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    }
}

impl Drop for HandoffRig {
    fn drop(&mut self) {
        let _ = self.stop_child();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
