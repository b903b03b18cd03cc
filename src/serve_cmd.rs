//! `tapir serve`: the vhost-user-net backend daemon (see `tapir-vhost-user`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tapir_datapath::EngineConfig;
use tapir_datapath::EngineKind;
use tapir_migrate::{SuccessorOptions, Timeouts};
use tapir_vhost_user::MAX_TAP_QUEUES;
use tapir_vhost_user::{DirtyAtStop, Endpoint, ServeOptions, SessionConfig, TapSharing};

/// `tapir serve --help`'s closing text.
pub const SERVE_AFTER_HELP: &str = "\
Output: stdout is a JSON event stream, one object per line (listening, connected, pairs,
disconnected, stopped, handoff_committed, ...); logs go to stderr, their level set with
RUST_LOG (default: info; e.g. RUST_LOG=debug). SIGTERM or SIGINT stops the daemon cleanly
(rings stopped, socket file removed, exit 0).

Examples:
  # A backend for QEMU with 2 queue pairs (root, or a TAP made for this user beforehand):
  tapir serve --socket /run/tapir/vm0.sock --tap tap-vm0 --queues 2
  # QEMU listens (-chardev socket,...,server=on), tapir connects and reconnects:
  tapir serve --client --socket /run/tapir/vm0.sock --tap tap-vm0
  # Without root: the TAP made beforehand for user U, tapir started as U:
  ip tuntap add tap-vm0 mode tap multi_queue vnet_hdr user U
  # An upgrade in place: the new binary takes the live session over:
  tapir serve --socket S --tap T --handoff-socket /run/tapir/vm0.handoff
  tapir serve --takeover /run/tapir/vm0.handoff";

#[derive(Args)]
pub struct ServeArgs {
    /// The vhost-user socket: tapir listens on it (the frontend connects), or with --client
    /// connects to it (the frontend listens, e.g. QEMU `-chardev socket,server=on`).
    #[arg(long, required_unless_present = "takeover")]
    socket: Option<PathBuf>,
    /// Connect to --socket instead of listening on it (retrying until it is there).
    #[arg(long)]
    client: bool,
    /// The TAP interface (a multiqueue TAP with this name is created if it does not exist;
    /// an existing one must be `multi_queue vnet_hdr`).
    #[arg(long, required_unless_present = "takeover")]
    tap: Option<String>,
    /// Use the TAP even if another process has queues attached to it (by default that is
    /// refused: the TAP would spread host-to-guest traffic over both).
    #[arg(long)]
    share_tap: bool,
    /// Queue pairs offered to the frontend (one TAP queue and one worker each; 1 to 256).
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// MAC address kept with the device (the guest-visible MAC is the frontend's, e.g. QEMU
    /// `-device virtio-net-pci,mac=...`). Default: 52:54:00:12:34:56.
    #[arg(long, value_parser = parse_mac)]
    mac: Option<[u8; 6]>,
    /// The TAP's MTU, set at start (default: leave it as it is, 1500 for a new TAP). A
    /// frontend may ask for the MTU (QEMU `-device virtio-net-pci,host_mtu=N`); once the
    /// sandbox dropped CAP_NET_ADMIN tapir can only agree to the MTU the TAP already has.
    #[arg(long, value_parser = parse_mtu)]
    mtu: Option<u16>,
    /// During a live migration, report all of guest memory dirty when a ring stops, so the
    /// frontend's final pass copies the guest whole. A workaround for frontends that lose
    /// their own guest's writes (QEMU 7.2 under TCG, see docs/QEMU.md); it makes the
    /// migration's downtime grow with guest memory. Default: only the pages tapir wrote.
    #[arg(long)]
    all_dirty_at_ring_stop: bool,
    /// Engine: uring or classic.
    #[arg(long, default_value = "uring")]
    engine: EngineKind,
    /// Pin queue pair i's worker to the i-th CPU of this list (e.g. --cpus 2,3; at most one
    /// per queue pair, each one this process may run on). Default: not pinned.
    #[arg(long, value_delimiter = ',')]
    cpus: Vec<usize>,
    /// Busy polling per worker, in microseconds (0: off): after its last work a worker polls
    /// its rings and the TAP this long before it sleeps, so the next packet finds it awake
    /// (lower latency, a CPU spinning meanwhile; the userspace twin of vhost-net's
    /// VHOST_SET_VRING_BUSYLOOP_TIMEOUT). Counted in `tapir ctl PATH stats` (busy_poll).
    #[arg(long, default_value_t = 0, value_name = "US")]
    busy_poll_us: u64,
    /// A control socket (mode 0600) for live counters: `tapir ctl PATH stats` (JSON) or
    /// `tapir ctl PATH status` (a summary). A successor (--takeover) serves it on.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve the same counters at http://ADDR/metrics in the Prometheus text format
    /// (a loopback address only, e.g. 127.0.0.1:9464). A successor (--takeover) serves it on.
    #[arg(long, value_name = "HOST:PORT")]
    metrics: Option<std::net::SocketAddr>,
    /// Listen here for a successor (`tapir serve --takeover PATH`).
    #[arg(long)]
    handoff_socket: Option<PathBuf>,
    /// Take over the running `tapir serve` listening on this handoff socket: its frontend
    /// connection, TAP queues and running device, at the same ring positions. The successor
    /// then listens on the same handoff socket, and serves the predecessor's --control and
    /// --metrics endpoints (the same listening sockets: no gap, no new port).
    #[arg(long, conflicts_with_all = ["socket", "tap", "client", "handoff_socket", "control", "metrics"])]
    takeover: Option<PathBuf>,
    /// Blackout step timeout of a handoff, in milliseconds.
    #[arg(long, default_value_t = 2000)]
    switch_timeout_ms: u64,
    /// Seconds a frontend may take to finish a message it started or to take a reply off the
    /// socket; a frontend slower than that loses its session.
    #[arg(long, default_value_t = 5.0)]
    frontend_timeout: f64,
    /// Mode of the vhost-user socket tapir creates (octal; 0660 with --socket-group lets a
    /// QEMU of another user in that group connect).
    #[arg(long, default_value = "0600", value_parser = parse_mode)]
    socket_mode: u32,
    /// Group of the vhost-user socket (a name or a gid).
    #[arg(long, value_parser = parse_group)]
    socket_group: Option<u32>,
    /// A uid the frontend may run as (checked with SO_PEERCRED on accept and, with --client,
    /// on connect); repeatable. Default: tapir's own uid.
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Test hook: die at this point of taking over (before-fds, after-fds, after-state,
    /// before-running).
    #[arg(long, hide = true)]
    fail_at: Option<tapir_migrate::FailPoint>,
    #[command(flatten)]
    sandbox: crate::sandbox_args::SandboxArgs,
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"));
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| format!("{s:?} is not a MAC address"))?;
    }
    Ok(mac)
}

fn parse_mtu(s: &str) -> Result<u16, String> {
    let v: u64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    tapir_vhost_user::checked_mtu(v).map_err(|e| e.to_string())
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not a file mode (octal, e.g. 0660)"))
}

fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        _ => Err(format!("no group {s:?}")),
    }
}

/// Checks `--cpus` against the queue pairs and the CPUs this process may run on.
fn check_cpus(cpus: &[usize], queues: u16) -> Result<()> {
    if cpus.len() > usize::from(queues) {
        bail!(
            "--cpus lists {} CPUs for {queues} queue pairs (one per pair, in pair order)",
            cpus.len()
        );
    }
    let allowed = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .context("reading this process's CPU affinity")?;
    let usable: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&c| allowed.is_set(c).unwrap_or(false))
        .collect();
    if let Some(bad) = cpus.iter().find(|c| !usable.contains(c)) {
        bail!("--cpus {bad}: CPU {bad} is not available (this process may run on CPUs {usable:?})");
    }
    Ok(())
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.queues == 0 || usize::from(args.queues) > MAX_TAP_QUEUES {
        bail!(
            "--queues {}: between 1 and {MAX_TAP_QUEUES} queue pairs (a TAP has at most {MAX_TAP_QUEUES} queues)",
            args.queues
        );
    }
    check_cpus(&args.cpus, args.queues)?;
    let timeouts = Timeouts {
        switch: Duration::from_millis(args.switch_timeout_ms),
        ..Timeouts::default()
    };
    let cpu_affinity: Vec<Option<usize>> = args.cpus.iter().map(|&c| Some(c)).collect();
    let engine_config = EngineConfig {
        busy_poll: (args.busy_poll_us > 0).then(|| Duration::from_micros(args.busy_poll_us)),
        ..EngineConfig::default()
    };
    let dirty_at_stop = if args.all_dirty_at_ring_stop {
        DirtyAtStop::AllPages
    } else {
        DirtyAtStop::Written
    };
    let lockdown = args.sandbox.lockdown(None)?;
    let frontend_timeout = Duration::try_from_secs_f64(args.frontend_timeout)
        .ok()
        .filter(|d| !d.is_zero())
        .context("--frontend-timeout must be a positive number of seconds")?;
    let mut access = tapir_vhost_user::AccessControl {
        socket_mode: args.socket_mode,
        socket_group: args.socket_group,
        ..Default::default()
    };
    if !args.allow_uids.is_empty() {
        access.allow_uids = args.allow_uids;
    } else if let Some(ids) = lockdown.ids() {
        // The default is the daemon's own uid: the one it runs as after `--user`.
        access.allow_uids = vec![ids.uid];
    }
    if let Some(path) = &args.takeover {
        // SIGTERM and SIGINT blocked before any thread starts; the signalfd made before the
        // sandbox, whose allow-list has no signalfd4.
        let stop = tapir_vhost_user::StopSignals::block().context("blocking SIGTERM and SIGINT")?;
        // A successor opens nothing privileged: everything comes over the handoff socket.
        lockdown.enter().context("entering the sandbox")?;
        let mut opts = SuccessorOptions::new(args.engine);
        opts.cpu_affinity = cpu_affinity;
        opts.engine_config = engine_config;
        opts.timeouts = timeouts;
        opts.fail_at = args.fail_at;
        let frontend = tapir_vhost_user::FrontendPolicy {
            access,
            timeout: frontend_timeout,
            dirty_at_stop,
        };
        return tapir_vhost_user::take_over_daemon(path, &opts, &frontend, stop)
            .with_context(|| format!("taking over the tapir serve at {}", path.display()));
    }
    let (Some(socket), Some(tap)) = (args.socket, args.tap) else {
        bail!("--socket and --tap are required");
    };
    let endpoint = if args.client {
        Endpoint::Client(socket)
    } else {
        Endpoint::Server(socket)
    };
    let opts = ServeOptions {
        endpoint,
        tap,
        tap_sharing: if args.share_tap {
            TapSharing::Shared
        } else {
            TapSharing::Exclusive
        },
        version: env!("CARGO_PKG_VERSION").to_owned(),
        session: SessionConfig {
            queue_pairs: args.queues,
            engine: args.engine,
            engine_config,
            mac: args.mac.unwrap_or([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]),
            cpu_affinity,
            dirty_at_stop,
        },
        handoff: args.handoff_socket,
        control: args.control,
        metrics: args.metrics,
        timeouts,
        frontend_timeout,
        access,
        lockdown,
        mtu: args.mtu,
    };
    tapir_vhost_user::serve(opts).context("tapir serve")
}
