//! The `tapir serve` loop: reach a frontend (listen on the vhost-user socket, or connect to
//! it in client mode), serve its session, and when it disconnects wait for the next one.
//! With a handoff socket, a successor (`tapir serve --takeover`) can take the live session
//! over, connection included: the frontend's requests wait in the socket meanwhile.
//!
//! Events go to stdout as JSON lines (`listening`, `connected`, `disconnected`,
//! `handoff_committed`, `handoff_rolled_back`, `running`, `stopped`) for supervisors and
//! tests. SIGTERM and SIGINT stop the daemon between requests ([`crate::stop_signal`]): the
//! device is quiesced, the socket files are removed, and `serve` returns `Ok`.

mod hand_on;
mod options;
mod serve_loop;
mod sockets;
mod takeover;

pub use options::{AccessControl, Endpoint, FrontendPolicy, ServeOptions};
pub use takeover::take_over_daemon;

use std::io::Write;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use tapir_datapath::TapQueue;
use tapir_migrate::{Listener, MigrateError, Timeouts};

use crate::control::{ControlSocket, Peer};
use crate::handoff;
use crate::report::{Board, Snapshot};
use crate::report_server::ReportServer;
use crate::session::{Session, SessionConfig};
use crate::stop_signal::{StopSignal, StopSignals};
use crate::tap_setup::{open_tap, TapSetupError, TapSharing};
use crate::wire::Connection;
use sockets::{bind_private, remove_stale_socket};

/// What the daemon counts across sessions (reported in its events).
#[derive(Debug, Default)]
struct DaemonCounters {
    /// Sessions ended because their memory shrank under its mapping.
    memory_broken: u64,
    /// Peers refused for their uid.
    peers_refused: u64,
    /// Times `accept` ran out of fds and the daemon backed off.
    accept_backoffs: u64,
}

/// Errors that end the daemon.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TAP.
    #[error(transparent)]
    Tap(#[from] tapir_datapath::TapError),
    /// Opening the TAP.
    #[error(transparent)]
    TapSetup(#[from] TapSetupError),
    /// The metrics endpoint.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    /// Blocking SIGTERM and SIGINT for the stop signalfd.
    #[error("blocking SIGTERM and SIGINT")]
    Signals(#[source] std::io::Error),
    /// A socket.
    #[error("{0}: {1}")]
    Socket(String, #[source] std::io::Error),
    /// The handoff.
    #[error("handoff: {0}")]
    Handoff(#[from] MigrateError),
    /// The handoff listener.
    #[error(transparent)]
    Channel(#[from] tapir_migrate::ChannelError),
    /// The session blob a predecessor sent.
    #[error(transparent)]
    SessionState(#[from] handoff::SessionStateError),
    /// Starting the taken-over session.
    #[error("restoring the session: {0}")]
    Restore(String),
    /// Entering the sandbox.
    #[error("sandbox: {0}")]
    Sandbox(#[from] tapir_sandbox::SandboxError),
    /// Setting the TAP's MTU.
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
}

/// Writes one JSON event line to stdout.
pub(crate) fn event(json: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{json}");
    let _ = out.flush();
}

struct Daemon {
    endpoint: Endpoint,
    vhost_listener: Option<UnixListener>,
    handoff: Option<Listener>,
    taps: Arc<Vec<TapQueue>>,
    config: SessionConfig,
    timeouts: Timeouts,
    frontend_timeout: Duration,
    access: AccessControl,
    counters: DaemonCounters,
    stop: StopSignals,
    /// Serves the control socket and the metrics endpoint from `board`, on its own thread.
    report: Option<ReportServer>,
    /// What the report says; published by this loop after every wake-up.
    board: Board,
    /// The connected frontend's credentials.
    peer: Option<Peer>,
    handoffs: HandoffLog,
}

/// What the report says about handoffs.
#[derive(Debug, Default)]
struct HandoffLog {
    /// Handoffs the session went through (its generation when this process took it over).
    taken_over: u64,
    /// Downtimes (quiesce to running) of the takeovers this process made or saw committed.
    downtimes_ns: std::collections::VecDeque<u64>,
    /// Handoffs offered and rolled back.
    rolled_back: u64,
}

impl HandoffLog {
    fn record(&mut self, downtime_ns: u64) {
        if self.downtimes_ns.len() == crate::control::DOWNTIMES_KEPT {
            self.downtimes_ns.pop_front();
        }
        self.downtimes_ns.push_back(downtime_ns);
    }
}

enum SessionEnd {
    Disconnected,
    HandedOff,
    Stopped(StopSignal),
}

/// What waiting for a frontend came to.
enum Reached {
    Frontend(Connection),
    HandedOff,
    Stopped(StopSignal),
}

/// Runs `tapir serve` until it is handed off (returns `Ok`) or fails.
pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    // First, while this is the only thread: every worker started later inherits the mask.
    let stop = StopSignals::block().map_err(ServeError::Signals)?;
    let tap = open_tap(
        &opts.tap,
        usize::from(opts.session.queue_pairs),
        opts.tap_sharing,
    )?;
    if let (Some(mtu), Some(queue)) = (opts.mtu, tap.queues().first()) {
        crate::link::set_mtu(queue, mtu)?;
    }
    tracing::info!(
        tap = tap.name(),
        queues = opts.session.queue_pairs,
        "TAP open"
    );
    // Before any socket file exists: a refused address leaves none behind.
    let metrics = opts
        .metrics
        .map(crate::metrics::MetricsEndpoint::bind)
        .transpose()?;
    // The vhost-user socket is bound while the daemon may still chown it (to `--socket-group`,
    // and to the `--user` the sandbox switches to); the handoff socket after the switch, so
    // that a successor of the same user sees its own uid in the listener's credentials.
    let vhost_listener = match &opts.endpoint {
        Endpoint::Server(path) => {
            remove_stale_socket(path)?;
            Some(bind_private(path, &opts.access, opts.lockdown.ids())?)
        }
        Endpoint::Client(_) => None,
    };
    let control =
        match &opts.control {
            Some(path) => {
                remove_stale_socket(path)?;
                let private = AccessControl {
                    socket_mode: 0o600,
                    socket_group: None,
                    allow_uids: Vec::new(),
                };
                let l = bind_private(path, &private, opts.lockdown.ids())?;
                Some(ControlSocket::new(l, path).map_err(|e| {
                    ServeError::Socket(format!("control socket {}", path.display()), e)
                })?)
            }
            None => None,
        };
    opts.lockdown.drop_privileges()?;
    let handoff = opts.handoff.as_deref().map(Listener::bind).transpose()?;
    opts.lockdown.confine()?;
    let board = Board::default();
    let report = ReportServer::start(control, metrics, board.clone())
        .map_err(|e| ServeError::Socket("starting the report server".into(), e))?;
    let daemon = Daemon {
        endpoint: opts.endpoint,
        vhost_listener,
        handoff,
        taps: Arc::new(tap.into_queues()),
        config: opts.session,
        timeouts: opts.timeouts,
        frontend_timeout: opts.frontend_timeout,
        access: opts.access,
        counters: DaemonCounters::default(),
        stop,
        report,
        board,
        peer: None,
        handoffs: HandoffLog::default(),
    };
    event(
        serde_json::json!({
            "event": "listening",
            "version": opts.version,
            "pid": std::process::id(),
            "socket": daemon.endpoint.path().display().to_string(),
            "mode": match daemon.endpoint {
                Endpoint::Server(_) => "server",
                Endpoint::Client(_) => "client",
            },
            "tap": opts.tap,
            "queues": daemon.config.queue_pairs,
            "engine": daemon.config.engine.to_string(),
            "features": format!("{:#x}", crate::session::offered_features()),
            "protocol_features": format!("{:#x}", crate::session::offered_protocol_features().bits()),
            "share_tap": opts.tap_sharing == TapSharing::Shared,
        })
        .to_string(),
    );
    daemon.run(None)
}

impl Daemon {
    /// Publishes the report's current state to the board (the report server reads it).
    fn publish(&self, session: Option<&Session>) {
        let counters = session.map_or_else(
            || crate::report::CounterSources {
                stopped: vec![
                    tapir_datapath::Counters::default();
                    usize::from(self.config.queue_pairs)
                ],
                live: Vec::new(),
            },
            Session::counter_sources,
        );
        self.board.publish(Snapshot {
            base: self.report(session),
            counters,
            running: session.map(Session::running_pairs).unwrap_or_default(),
        });
    }

    /// The report without its queue pairs ([`crate::report`] adds them live).
    fn report(&self, session: Option<&Session>) -> serde_json::Value {
        serde_json::json!({
            "pid": std::process::id(),
            "engine": self.config.engine.to_string(),
            "queues": self.config.queue_pairs,
            "session": session.map(|s| crate::control::session(s, self.peer)),
            "handoffs": {
                "count": self.handoffs.taken_over.max(session.map_or(0, |s| s.generation)),
                "rolled_back": self.handoffs.rolled_back,
                "last_downtimes_ns": self.handoffs.downtimes_ns,
            },
            "daemon": {
                "memory_broken_sessions": self.counters.memory_broken,
                "peers_refused": self.counters.peers_refused,
                "accept_backoffs": self.counters.accept_backoffs,
            },
        })
    }
}
