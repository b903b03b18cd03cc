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
    event(format!(
        "{{\"event\":\"running\",\"pid\":{},\"protocol\":{},\"generation\":{},\"quiesce_ns\":{},\"switch_ns\":{},\"ready_ns\":{},\"go_ns\":{},\"running_ns\":{}}}",
        std::process::id(),
        took.version,
        took.generation,
        took.quiesce_ns,
        took.switch_ns,
        took.ready_ns,
        took.go_ns,
        took.running_ns
    ));
    watch_first_service(&took.device, took.quiesce_ns);
    let mut source = DeviceSource::new(took.device, took.generation);
    install_sigterm()?;
    loop {
        if TERM.load(Ordering::Relaxed) {
            if let Some(d) = source.into_running() {
                d.stop()?;
            }
            return Ok(());
        }
        let ch = match listener.accept(Some(Duration::from_millis(100))) {
            Ok(ch) => ch,
            Err(tapir_migrate::ChannelError::Timeout(_)) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "refused a successor");
                continue;
            }
        };
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

/// Reports when the first worker serviced a ring (the end of the blackout).
fn watch_first_service(device: &tapir_datapath::Device, quiesce_ns: u64) {
    let stats = device.worker_stats();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(t) = stats.iter().filter_map(|s| s.first_service_ns()).min() {
                let resumed = stats
                    .iter()
                    .filter_map(|s| s.resumed_ns())
                    .min()
                    .unwrap_or(0);
                event(format!(
                    "{{\"event\":\"first_service\",\"pid\":{},\"first_service_ns\":{t},\"resumed_ns\":{resumed},\"downtime_ns\":{}}}",
                    std::process::id(),
                    if quiesce_ns > 0 { t.saturating_sub(quiesce_ns) } else { 0 }
                ));
                return;
            }
            // The worker stamps the time itself: reporting it a millisecond late costs the
            // measurement nothing, while waking every 50 µs (as this did) put 20,000 wake-ups
            // a second of the successor's own into its blackout on a 2-CPU machine.
            std::thread::sleep(Duration::from_millis(1));
        }
    });
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
