//! `tapir`: the command line. Thin: parsing and printing; the work lives in the crates.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tapir_bench::{BenchEngine, BenchOptions, Placement, Scenario, VhostUserBackend};

mod ctl_cmd;
mod datapath_cmd;
mod sandbox_args;
mod serve_cmd;
mod state_cmd;

/// Counts heap allocations, for `tapir bench`'s allocations-per-packet column.
#[global_allocator]
static ALLOCATOR: tapir_bench::CountingAllocator = tapir_bench::CountingAllocator;

#[derive(Parser)]
#[command(
    name = "tapir",
    version,
    about = "A performance-first userspace virtio-net datapath"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure throughput of the datapath engines against the raw TAP floor (and, with
    /// --backend, a vhost-user backend), in a private network namespace with a simulated guest
    /// (needs root: CAP_NET_ADMIN and CAP_SYS_ADMIN).
    Bench(BenchArgs),
    /// Run a datapath taken over from a predecessor (or a launcher) and hand it on to the next
    /// successor that connects to --listen (used by the handoff benchmark and tests).
    Datapath(datapath_cmd::DatapathArgs),
    /// A vhost-user-net backend: serve a frontend (QEMU, Cloud Hypervisor, DPDK) over a
    /// vhost-user socket with a multiqueue TAP; hand a live session to a successor.
    #[command(after_help = serve_cmd::SERVE_AFTER_HELP)]
    Serve(serve_cmd::ServeArgs),
    /// Ask a running `tapir serve --control PATH` for its live counters.
    Ctl(ctl_cmd::CtlArgs),
    /// Work with handoff state blobs.
    #[command(subcommand)]
    State(StateCommand),
}

#[derive(Subcommand)]
enum StateCommand {
    /// Decode and validate a state blob and print it as JSON (exit 1 with the reason if it is
    /// refused).
    Inspect {
        /// The blob.
        file: PathBuf,
    },
}

fn state(cmd: StateCommand) -> Result<()> {
    match cmd {
        StateCommand::Inspect { file } => {
            let bytes = state_cmd::read_blob(&file)?;
            let snapshot = tapir_state::decode(&bytes)
                .with_context(|| format!("{} is not a valid tapir state blob", file.display()))?;
            println!("{}", tapir_state::to_json(&snapshot));
            Ok(())
        }
    }
}

#[derive(Args)]
struct BenchArgs {
    /// Scenarios: tx (guest to host, to a host UDP sink), tx-drop (guest to host, to a MAC
    /// nobody owns: the host drops the frames right after the TAP, which counts them), rx
    /// (host to guest), bidir (both at once), latency (request/response round trips, idle and
    /// loaded), handoff (successive handoffs between datapath processes under bidirectional
    /// traffic).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tx,tx-drop,rx,bidir,latency,handoff"
    )]
    scenario: Vec<String>,
    /// Busy-poll budgets in microseconds (0: off), comma-separated: the latency scenario and
    /// the 64-byte tx, tx-drop and rx cells run each engine with workers (uring, classic,
    /// vhost-user) at every budget, a row each (`uring+bp50`); the floor runs once.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0",
        value_name = "US,..."
    )]
    busy_poll_us: Vec<u64>,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 5000)]
    latency_samples: u64,
    /// Where the latency scenario's datapath workers run, comma-separated, a set of rows
    /// each: split (on a CPU of their own, as in the throughput cells), shared (on the
    /// guest's and the echo's CPU). A `wake` row beside them measures the machine's two
    /// wake-ups per round trip alone.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "split",
        value_name = "PLACEMENT,..."
    )]
    latency_placement: Vec<Placement>,
    /// Handoffs per handoff run.
    #[arg(long, default_value_t = 50)]
    handoffs: usize,
    /// Traffic per direction during handoff runs, packets/s.
    #[arg(long, default_value_t = 20_000)]
    handoff_pps: u64,
    /// SCHED_FIFO priority for the datapath workers in handoff runs (0: ordinary
    /// scheduling). Realtime workers resume within microseconds of the switch even when
    /// every CPU is busy, as on this 2-core machine with guest and traffic threads.
    #[arg(long, default_value_t = 0)]
    handoff_rt_priority: u8,
    /// Ethernet frame sizes in bytes (65536: a TSO super-frame).
    #[arg(long, value_delimiter = ',', default_value = "64,1500,65536")]
    frame: Vec<usize>,
    /// Queue pair counts (default: 1 and the number of CPUs).
    #[arg(long, value_delimiter = ',')]
    queues: Vec<usize>,
    /// Engines side by side: uring, classic, floor, vhost-user (default: uring,classic,floor,
    /// plus vhost-user with --backend).
    #[arg(long, value_delimiter = ',')]
    engines: Vec<BenchEngine>,
    /// Also measure a vhost-user-net backend (engine `vhost-user`): the simulated guest drives
    /// it through the vhost-user protocol on SOCKET, with the same frames and peers. The bench
    /// starts the backend for every measurement inside its network namespace: this binary's
    /// `tapir serve` unless --backend-cmd says otherwise.
    #[arg(long, value_name = "vhost-user:SOCKET")]
    backend: Option<String>,
    /// Shell command that starts the --backend for one measurement, listening on SOCKET and
    /// creating the TAP; {socket}, {tap}, {queues} and {cpus} (the CPUs the in-process
    /// workers get, comma-separated) are replaced. Default: `tapir serve --socket {socket}
    /// --tap {tap} --queues {queues} --cpus {cpus}`.
    #[arg(long, requires = "backend", value_name = "CMD")]
    backend_cmd: Option<String>,
    /// Seconds measured per repeat.
    #[arg(long, default_value_t = 2.0)]
    duration: f64,
    /// Repeats per cell (the report gives medians and min..max).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Short run for CI smoke tests: 0.5 s windows, one repeat, 1 queue pair.
    #[arg(long)]
    quick: bool,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the report as Markdown.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// Write SVG charts (throughput by frame size, latency CDF, handoff downtime) into DIR.
    #[arg(long)]
    svg: Option<PathBuf>,
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.duration <= 0.0 || !args.duration.is_finite() {
        bail!("--duration must be a positive number of seconds");
    }
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    if let Some(bad) = args.frame.iter().find(|&&f| !(64..=65_536).contains(&f)) {
        bail!("--frame {bad}: frame sizes go from 64 to 65536 bytes");
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut queues = args.queues.clone();
    if queues.is_empty() {
        queues = if args.quick || cpus == 1 {
            vec![1]
        } else {
            vec![1, cpus]
        };
    }
    if let Some(bad) = queues.iter().find(|&&q| q == 0 || q > 16) {
        bail!("--queues {bad}: between 1 and 16 queue pairs");
    }
    let (duration, repeats) = if args.quick {
        (Duration::from_millis(500), 1)
    } else {
        (Duration::from_secs_f64(args.duration), args.repeats)
    };
    let mut scenarios = Vec::new();
    let mut handoff = false;
    let mut latency = false;
    for s in &args.scenario {
        if s == "handoff" {
            handoff = true;
        } else if s == "latency" {
            latency = true;
        } else {
            scenarios.push(s.parse::<Scenario>().map_err(anyhow::Error::msg)?);
        }
    }
    let handoffs = match (handoff, args.quick) {
        (false, _) => 0,
        (true, true) => args.handoffs.min(10),
        (true, false) => args.handoffs,
    };
    let backend = args
        .backend
        .as_deref()
        .map(|b| VhostUserBackend::parse(b, args.backend_cmd.clone()))
        .transpose()
        .map_err(anyhow::Error::msg)?;
    let mut engines = args.engines.clone();
    if engines.is_empty() {
        engines = vec![
            BenchEngine::Datapath(tapir_datapath::EngineKind::Uring),
            BenchEngine::Datapath(tapir_datapath::EngineKind::Classic),
            BenchEngine::Floor,
        ];
        if backend.is_some() {
            engines.push(BenchEngine::VhostUser);
        }
    }
    match (engines.contains(&BenchEngine::VhostUser), backend.is_some()) {
        (true, false) => bail!("--engines vhost-user needs --backend vhost-user:SOCKET"),
        (false, true) => bail!("--backend is given but --engines does not include vhost-user"),
        _ => {}
    }
    let mut busy_poll_us = args.busy_poll_us.clone();
    busy_poll_us.dedup();
    let mut latency_placements = args.latency_placement.clone();
    latency_placements.dedup();
    let opts = BenchOptions {
        latency_placements,
        busy_poll_us,
        backend,
        scenarios,
        handoffs,
        handoff_pps: args.handoff_pps,
        latency_samples: match (latency, args.quick) {
            (false, _) => 0,
            (true, true) => args.latency_samples.min(500),
            (true, false) => args.latency_samples,
        },
        handoff_rt_priority: (args.handoff_rt_priority > 0).then_some(args.handoff_rt_priority),
        frames: args.frame,
        queues,
        engines,
        duration,
        warmup: duration.mul_f64(0.25).max(Duration::from_millis(200)),
        repeats,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let bar = indicatif::ProgressBar::new(opts.steps());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let mut started = 0u64;
    let mut progress = |msg: &str| {
        bar.set_position(started);
        started += 1;
        bar.set_message(msg.to_owned());
    };
    let report = tapir_bench::run(&opts, &mut progress).context("benchmark failed");
    bar.finish_and_clear();
    let report = report?;
    print!("{}", report.table());
    if let Some(path) = &args.json {
        let mut text = serde_json::to_string_pretty(&report)?;
        text.push('\n');
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &args.svg {
        for p in tapir_bench::write_charts(&report, dir).context("writing charts")? {
            eprintln!("wrote {}", p.display());
        }
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, report.markdown())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// An error and its causes on one line, each cause once: a library error whose message
/// already ends with its source's (`TUNSETIFF failed: Operation not permitted`) does not get
/// it repeated.
fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if line.ends_with(&msg) || line.contains(&format!("{msg}: ")) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}

fn main() -> std::process::ExitCode {
    use std::io::IsTerminal;
    let cli = Cli::parse();
    // A daemon's log says what it does (device started, stopped); the other commands only
    // warn. RUST_LOG overrides both.
    let default_level = match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Bench(args) => bench(args),
        Command::Datapath(args) => datapath_cmd::run(args),
        Command::Serve(args) => serve_cmd::run(args),
        Command::Ctl(args) => ctl_cmd::run(args),
        Command::State(cmd) => state(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}
