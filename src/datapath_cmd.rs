//! `tapir datapath`: run a datapath taken over from a predecessor (or from the process that
//! launched it), and hand it to the next successor that connects to `--listen`.
//!
//! Events go to stdout as JSON lines (`running`, `first_service`, `committed`, `rolled_back`)
//! so a supervisor (the handoff benchmark, the tests) can follow and time each handoff.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use tapir_datapath::EngineKind;
use tapir_migrate::{
    hand_off, take_over, Channel, DeviceSource, Listener, Outcome, SuccessorOptions, Timeouts,
};

#[derive(Args)]
pub struct DatapathArgs {
    /// Take the device over from the handoff socket at PATH.
    #[arg(long, conflicts_with = "channel_fd")]
    take_over: Option<PathBuf>,
    /// Take the device over through an inherited, connected handoff socket fd.
    #[arg(long)]
    channel_fd: Option<i32>,
    /// Listen here for a successor.
    #[arg(long)]
    listen: PathBuf,
    /// Engine: uring or classic.
    #[arg(long, default_value = "uring")]
    engine: EngineKind,
    /// Pin queue pair i's worker to CPU i-th of this list.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Run the workers SCHED_FIFO at this priority (1-99).
    #[arg(long)]
    rt_priority: Option<u8>,
    /// Blackout step timeout in milliseconds.
    #[arg(long, default_value_t = 2000)]
    switch_timeout_ms: u64,
    /// Test hook: die at this point of taking over (before-fds, after-fds, after-state,
    /// before-running), to exercise the predecessor's rollback.
    #[arg(long, hide = true)]
    fail_at: Option<tapir_migrate::FailPoint>,
    #[command(flatten)]
    sandbox: crate::sandbox_args::SandboxArgs,
}

fn event(json: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let _ = out.flush();
}

pub fn run(args: DatapathArgs) -> Result<()> {
    let lockdown = args.sandbox.lockdown(args.rt_priority)?;
    lockdown.drop_privileges().context("dropping privileges")?;
    let channel = match (&args.take_over, args.channel_fd) {
        (Some(path), None) => {
            Channel::connect(path).with_context(|| format!("connecting to {}", path.display()))?
        }
        (None, Some(fd)) => {
            // SAFETY: the launcher passed this fd to us for exactly this use; nothing else in
            // this process owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            Channel::from_fd(fd)?
        }
        _ => bail!("give --take-over PATH or --channel-fd FD"),
    };
    let timeouts = Timeouts {
        switch: Duration::from_millis(args.switch_timeout_ms),
        ..Timeouts::default()
    };
    let mut opts = SuccessorOptions::new(args.engine);
    opts.cpu_affinity = args.cpus.iter().map(|&c| Some(c)).collect();
    opts.timeouts = timeouts;
    opts.fail_at = args.fail_at;
    opts.engine_config.realtime_priority = args.rt_priority;
    let listener = Listener::bind(&args.listen).context("binding the handoff socket")?;
    lockdown.confine().context("entering the sandbox")?;
    let took = take_over(&channel, &opts).context("taking the device over")?;
    drop(channel);
    let running = format!(
        "{{\"event\":\"running\",\"pid\":{},\"protocol\":{},\"generation\":{},\"quiesce_ns\":{},\"switch_ns\":{},\"ready_ns\":{},\"go_ns\":{},\"running_ns\":{}}}",
        std::process::id(),
        took.version,
        took.generation,
        took.quiesce_ns,
        took.switch_ns,
        took.ready_ns,
        took.go_ns,
        took.running_ns
    );
    let mut first = FirstService::new(&took.device, took.quiesce_ns, running);
    let mut source = DeviceSource::new(took.device, took.generation);
    install_sigterm()?;
    loop {
        if TERM.load(Ordering::Relaxed) {
            if let Some(d) = source.into_running() {
                d.stop()?;
            }
            return Ok(());
        }
        first.report();
        let wait = if first.pending() {
            FirstService::POLL
        } else {
            Duration::from_millis(100)
        };
        let ch = match listener.accept(Some(wait)) {
            Ok(ch) => ch,
            Err(tapir_migrate::ChannelError::Timeout(_)) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "refused a successor");
                continue;
            }
        };
        // A successor before the first service: say `running` first, as a supervisor expects.
        first.print_running();
        match hand_off(&mut source, &ch, timeouts)? {
            Outcome::Committed(r) => {
                // The successor runs now. Tear this process down (unmapping, closing rings,
                // exiting) at idle priority, so that it does not compete with the
                // successor's first packets for the CPUs.
                let idle = libc::sched_param { sched_priority: 0 };
                // SAFETY: plain syscall on the calling thread with a valid parameter struct.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &idle) };
                event(format!(
                    "{{\"event\":\"committed\",\"pid\":{},\"protocol\":{},\"successor\":{},\"quiesce_ns\":{},\"switch_sent_ns\":{},\"ready_ns\":{},\"running_ns\":{}}}",
                    std::process::id(),
                    r.version,
                    r.successor_pid,
                    r.quiesce_ns,
                    r.switch_sent_ns,
                    r.ready_ns,
                    r.running_ns
                ));
                source.release();
                return Ok(());
            }
            Outcome::RolledBack(e) => {
                event(format!(
                    "{{\"event\":\"rolled_back\",\"pid\":{},\"reason\":{:?}}}",
                    std::process::id(),
                    e.to_string()
                ));
            }
        }
    }
}

/// The `running` and `first_service` events of a successor, printed from the main loop once
/// a worker has serviced a ring (the end of the blackout): nothing is printed, and no thread
/// started, inside the blackout (a pipe write wakes the supervisor's reader, a thread spawn
/// costs ~50 µs, both competing with the resuming workers on a small machine). The workers
/// stamp the times themselves, so reporting a little later changes no number.
struct FirstService {
    stats: Vec<std::sync::Arc<tapir_datapath::QueuePairStats>>,
    quiesce_ns: u64,
    /// The `running` event, until printed.
    running: Option<String>,
    since: Instant,
    done: bool,
}

impl FirstService {
    /// How often the main loop looks while the first service is pending.
    const POLL: Duration = Duration::from_millis(1);
    /// `running` is printed by then even if no ring was serviced yet (no traffic).
    const RUNNING_BY: Duration = Duration::from_millis(20);
    /// `first_service` is given up on after this.
    const GIVE_UP: Duration = Duration::from_secs(10);

    fn new(device: &tapir_datapath::Device, quiesce_ns: u64, running: String) -> FirstService {
        FirstService {
            stats: device.worker_stats(),
            quiesce_ns,
            running: Some(running),
            since: Instant::now(),
            done: false,
        }
    }

    fn pending(&self) -> bool {
        !self.done
    }

    fn print_running(&mut self) {
        if let Some(r) = self.running.take() {
            event(r);
        }
    }

    fn report(&mut self) {
        if self.done {
            return;
        }
        let served = self.stats.iter().filter_map(|s| s.first_service_ns()).min();
        let waited = self.since.elapsed();
        if served.is_some() || waited >= Self::RUNNING_BY {
            self.print_running();
        }
        if let Some(t) = served {
            let resumed = self
                .stats
                .iter()
                .filter_map(|s| s.resumed_ns())
                .min()
                .unwrap_or(0);
            let downtime = if self.quiesce_ns > 0 {
                t.saturating_sub(self.quiesce_ns)
            } else {
                0
            };
            event(format!(
                "{{\"event\":\"first_service\",\"pid\":{},\"first_service_ns\":{t},\"resumed_ns\":{resumed},\"downtime_ns\":{downtime}}}",
                std::process::id(),
            ));
            self.done = true;
        } else if waited >= Self::GIVE_UP {
            self.done = true;
        }
    }
}

/// Set by SIGTERM: stop the device cleanly and exit.
static TERM: AtomicBool = AtomicBool::new(false);

extern "C" fn on_term(_: libc::c_int) {
    TERM.store(true, Ordering::Relaxed);
}

fn install_sigterm() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_term),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGTERM, &action) }.context("installing the SIGTERM handler")?;
    Ok(())
}
