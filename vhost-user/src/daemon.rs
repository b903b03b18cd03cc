//! The `tapir serve` loop: reach a frontend (listen on the vhost-user socket, or connect to
//! it in client mode), serve its session, and when it disconnects wait for the next one.
//! With a handoff socket, a successor (`tapir serve --takeover`) can take the live session
//! over, connection included: the frontend's requests wait in the socket meanwhile.
//!
//! Events go to stdout as JSON lines (`listening`, `connected`, `disconnected`,
//! `handoff_committed`, `handoff_rolled_back`, `running`, `stopped`) for supervisors and
//! tests. SIGTERM and SIGINT stop the daemon between requests ([`crate::stop_signal`]): the
//! device is quiesced, the socket files are removed, and `serve` returns `Ok`.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tapir_datapath::TapQueue;
use tapir_migrate::{
    accept_state, hand_off, hand_off_state, refuse_state, take_over_checked, Channel, DeviceSource,
    Extension, HandoffSource, Listener, MigrateError, Outcome, SuccessorOptions, Taken, Timeouts,
};
use tapir_state::DeviceSnapshot;

use crate::control::{ControlSocket, Peer};
use crate::handoff::{self, EndpointState, FdList};
use crate::report::{Board, Snapshot};
use crate::report_server::ReportServer;
use crate::session::{Running, Session, SessionConfig};
use crate::stop_signal::{StopSignal, StopSignals};
use crate::tap_setup::{open_tap, TapSetupError, TapSharing};
use crate::wire::{Connection, WireError};

/// Where the frontend is.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// tapir listens on this path (QEMU `-chardev socket,path=...` without `server=on`).
    Server(PathBuf),
    /// tapir connects to this path, retrying until the frontend listens (QEMU
    /// `-chardev socket,path=...,server=on`).
    Client(PathBuf),
}

impl Endpoint {
    fn path(&self) -> &Path {
        match self {
            Endpoint::Server(p) | Endpoint::Client(p) => p,
        }
    }
}

/// Options of `tapir serve`.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The vhost-user socket.
    pub endpoint: Endpoint,
    /// The TAP interface (created if missing).
    pub tap: String,
    /// Whether a TAP other processes have queues on is used anyway.
    pub tap_sharing: TapSharing,
    /// The version reported in the `listening` event.
    pub version: String,
    /// Devices' configuration (queue pairs, engine, ...).
    pub session: SessionConfig,
    /// Listen here for a successor.
    pub handoff: Option<PathBuf>,
    /// The control socket (`tapir ctl PATH stats`), mode 0600.
    pub control: Option<PathBuf>,
    /// The Prometheus endpoint (loopback `HOST:PORT`).
    pub metrics: Option<std::net::SocketAddr>,
    /// Handoff step timeouts.
    pub timeouts: Timeouts,
    /// How long a frontend may take to finish a message or take a reply.
    pub frontend_timeout: Duration,
    /// Who may be the frontend.
    pub access: AccessControl,
    /// Privileges dropped once the TAP is open, seccomp once the sockets are bound.
    pub lockdown: tapir_sandbox::Lockdown,
    /// The TAP's MTU, set at start while tapir may still change it (`--mtu`); a frontend's
    /// `NET_SET_MTU` for it then succeeds in the sandbox.
    pub mtu: Option<u16>,
}

/// How a successor treats the frontend (its own settings, not the predecessor's).
#[derive(Clone, Debug)]
pub struct FrontendPolicy {
    /// Who may connect (the socket mode and group stay as the predecessor made them).
    pub access: AccessControl,
    /// How long a frontend may take to finish a message or take a reply.
    pub timeout: Duration,
    /// What a ring stop reports dirty during a live migration.
    pub dirty_at_stop: crate::session::DirtyAtStop,
}

impl Default for FrontendPolicy {
    fn default() -> FrontendPolicy {
        FrontendPolicy {
            access: AccessControl::default(),
            timeout: crate::wire::DEFAULT_FRONTEND_TIMEOUT,
            dirty_at_stop: crate::session::DirtyAtStop::default(),
        }
    }
}

/// Who may talk to the daemon over the vhost-user socket.
#[derive(Clone, Debug)]
pub struct AccessControl {
    /// Mode of the socket file tapir creates (0600 by default: only its own user can
    /// connect).
    pub socket_mode: u32,
    /// Group of the socket file (with a mode of 0660, a QEMU of another user in this group
    /// can connect).
    pub socket_group: Option<u32>,
    /// Uids a peer may have (`SO_PEERCRED`), checked on accept and, in client mode, on
    /// connect.
    pub allow_uids: Vec<u32>,
}

impl Default for AccessControl {
    /// 0600, the daemon's own group, and only the daemon's own uid.
    fn default() -> AccessControl {
        AccessControl {
            socket_mode: 0o600,
            socket_group: None,
            allow_uids: vec![nix::unistd::geteuid().as_raw()],
        }
    }
}

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

/// How long the daemon waits before accepting again when it is out of fds, and between
/// connection attempts in client mode after a refused peer.
const BACKOFF: Duration = Duration::from_millis(200);
/// How often a session with mapped memory is checked for broken memory.
const MEMORY_CHECK: Duration = Duration::from_millis(100);
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

/// Removes a socket file a previous daemon left at `path`; refuses to touch anything else,
/// and a socket something still listens on.
fn remove_stale_socket(path: &Path) -> Result<(), ServeError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let fail = |what: &str| {
        ServeError::Socket(
            format!("{} {what}", path.display()),
            std::io::Error::from(std::io::ErrorKind::AlreadyExists),
        )
    };
    if !meta.file_type().is_socket() {
        return Err(fail("exists and is not a socket"));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(fail("is in use by a running backend"));
    }
    std::fs::remove_file(path)
        .map_err(|e| ServeError::Socket(format!("removing stale {}", path.display()), e))
}

/// Binds the vhost-user socket with no access for anyone but the owner from the start (umask
/// 0177 around bind), then gives it the group and mode asked for.
fn bind_private(
    path: &Path,
    access: &AccessControl,
    owner: Option<tapir_sandbox::Ids>,
) -> Result<UnixListener, ServeError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |what: &str, e| ServeError::Socket(format!("{what} {}", path.display()), e);
    // SAFETY: umask only changes this process's file-creation mask; restored right after.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    let listener = bound.map_err(|e| fail("binding", e))?;
    let uid = owner.map(|ids| ids.uid);
    let gid = access.socket_group.or(owner.map(|ids| ids.gid));
    if uid.is_some() || gid.is_some() {
        std::os::unix::fs::chown(path, uid, gid).map_err(|e| fail("chown of", e))?;
    }
    std::fs::set_permissions(
        path,
        std::fs::Permissions::from_mode(access.socket_mode & 0o777),
    )
    .map_err(|e| fail("chmod of", e))?;
    Ok(listener)
}

/// Connects to the frontend's socket (client mode) without blocking: a listener whose backlog
/// is full (one that never accepts) makes a blocking `connect` wait forever, and the daemon
/// would serve nothing else (its handoff socket) meanwhile. `EAGAIN` is retried by the caller.
fn connect_without_blocking(path: &Path) -> Result<UnixStream, std::io::Error> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    let stream = UnixStream::from(fd);
    // Connected (a unix stream connect completes at once or fails): back to blocking mode,
    // which the wire layer overrides per call with its deadlines.
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// The uid of the process at the other end of `stream`.
fn peer_uid(stream: &UnixStream) -> Result<u32, std::io::Error> {
    nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.uid())
        .map_err(std::io::Error::from)
}

/// True for accept errors that mean "out of fds or memory": accepting again at once would
/// fail the same way (the connection stays queued), so the daemon backs off.
fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
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

/// `tapir serve --takeover PATH`: takes a running `tapir serve` over (its session, running
/// device and sockets, or just its sockets and TAP between frontends) and carries on serving.
///
/// `frontend` is this process's own policy for the frontend (allowed uids, timeout): the
/// handoff blob does not carry the predecessor's, and the socket file keeps its mode.
/// `stop` must be made ([`StopSignals::block`]) before any thread starts and before the
/// sandbox is entered (the allow-list has no `signalfd4`).
pub fn take_over_daemon(
    path: &Path,
    opts: &SuccessorOptions,
    frontend: &FrontendPolicy,
    stop: StopSignals,
) -> Result<(), ServeError> {
    let ch = Channel::connect(path)?;
    // The session blob is checked before this side commits to anything.
    let check = |ext: &Extension| {
        handoff::decode(&ext.blob, ext.fds.len())
            .and_then(|state| handoff::check_fds(&state, &ext.fds))
            .map_err(|e| e.to_string())
    };
    match take_over_checked(&ch, opts, &check)? {
        Taken::Device(took) => {
            drop(ch);
            let generation = took.generation;
            let (quiesce_ns, running_ns) = (took.quiesce_ns, took.running_ns);
            let (daemon, current) = restore(
                took.extension,
                opts,
                frontend,
                Some(took.device),
                generation,
                stop,
            )?;
            running_event(&current, generation, quiesce_ns, running_ns, false);
            let mut daemon = daemon;
            daemon
                .handoffs
                .record(running_ns.saturating_sub(quiesce_ns));
            daemon.run(current)
        }
        Taken::StateOnly(ext) => match restore(ext, opts, frontend, None, 0, stop) {
            Ok((daemon, mut current)) => {
                accept_state(&ch)?;
                drop(ch);
                let now = tapir_datapath::monotonic_ns();
                if let Some((_, session)) = &mut current {
                    session.generation += 1;
                    if let Err(e) = session.reconcile() {
                        tracing::warn!(error = %e, "the taken-over session's rings do not start yet");
                    }
                }
                let generation = current.as_ref().map_or(0, |(_, s)| s.generation);
                running_event(&current, generation, now, now, true);
                daemon.run(current)
            }
            Err(e) => {
                refuse_state(&ch, &e.to_string());
                Err(e)
            }
        },
    }
}

fn running_event(
    current: &Option<(Connection, Session)>,
    generation: u64,
    quiesce_ns: u64,
    running_ns: u64,
    state_only: bool,
) {
    let pairs = current
        .as_ref()
        .map(|(_, s)| s.running_pairs())
        .unwrap_or_default();
    event(format!(
        "{{\"event\":\"running\",\"pid\":{},\"generation\":{generation},\"pairs\":{pairs:?},\"frontend\":{},\"state_only\":{state_only},\"quiesce_ns\":{quiesce_ns},\"running_ns\":{running_ns}}}",
        std::process::id(),
        current.is_some(),
    ));
}

/// Rebuilds a daemon (and its session, if a frontend was connected) from a predecessor's
/// session blob and fds, with the device it handed on, if any.
fn restore(
    ext: Extension,
    opts: &SuccessorOptions,
    frontend: &FrontendPolicy,
    device: Option<tapir_datapath::Device>,
    generation: u64,
    stop: StopSignals,
) -> Result<(Daemon, Option<(Connection, Session)>), ServeError> {
    let state = handoff::decode(&ext.blob, ext.fds.len())?;
    let mut fds: Vec<Option<OwnedFd>> = ext.fds.into_iter().map(Some).collect();
    let mut taps = Vec::with_capacity(state.taps.len());
    for &t in &state.taps {
        taps.push(
            TapQueue::adopt(handoff::take(&mut fds, t)?)
                .map_err(|e| ServeError::Restore(e.to_string()))?,
        );
    }
    let config = SessionConfig {
        queue_pairs: state.queue_pairs,
        engine: opts.engine,
        engine_config: opts.engine_config,
        mac: state.mac,
        cpu_affinity: opts.cpu_affinity.clone(),
        dirty_at_stop: frontend.dirty_at_stop,
    };
    let taps = Arc::new(taps);
    let current = match state.connection {
        None => None,
        Some(c) => {
            let mut session = Session::new(config.clone(), taps.clone());
            session.features = state.features;
            session.protocol_features = state.protocol_features;
            session.requests = state.requests;
            session.generation = generation.max(state.generation);
            let mut regions = Vec::with_capacity(state.regions.len());
            for r in &state.regions {
                regions.push(crate::memory_table::Region {
                    guest_addr: r.guest_addr,
                    size: r.size,
                    user_addr: r.user_addr,
                    mmap_offset: r.mmap_offset,
                    fd: handoff::take(&mut fds, r.fd)?,
                });
            }
            session
                .table
                .restore(regions)
                .map_err(|e| ServeError::Restore(e.to_string()))?;
            for (v, s) in session.vrings.iter_mut().zip(&state.vrings) {
                *v = handoff::vring_of(s, &mut fds)?;
            }
            if let Some(l) = &state.log {
                let fd = handoff::take(&mut fds, l.fd)?;
                session.log = Some(
                    crate::dirty_log::DirtyLog::map(fd, l.mmap_size, l.mmap_offset)
                        .map_err(|e| ServeError::Restore(e.to_string()))?,
                );
            }
            match device {
                Some(device) => session.adopt_running(device, state.running_pairs.clone()),
                None => session
                    .remap()
                    .map_err(|e| ServeError::Restore(e.to_string()))?,
            }
            let connection = Connection::with_timeout(
                UnixStream::from(handoff::take(&mut fds, c)?),
                frontend.timeout,
            );
            Some((connection, session))
        }
    };
    let path = PathBuf::from(&state.endpoint.path);
    let endpoint = if state.endpoint.client {
        Endpoint::Client(path)
    } else {
        Endpoint::Server(path)
    };
    let vhost_listener = match state.endpoint.listener {
        Some(i) => Some(UnixListener::from(handoff::take(&mut fds, i)?)),
        None => None,
    };
    let handoff = match &state.endpoint.handoff {
        Some((p, i)) => Some(Listener::from_fd(
            handoff::take(&mut fds, *i)?,
            Path::new(p),
        )),
        None => None,
    };
    let control = match &state.report.control {
        Some((p, i)) => Some(
            ControlSocket::new(
                UnixListener::from(handoff::take(&mut fds, *i)?),
                Path::new(p),
            )
            .map_err(|e| ServeError::Socket(format!("control socket {p}"), e))?,
        ),
        None => None,
    };
    let metrics = match state.report.metrics {
        Some(i) => Some(
            crate::metrics::MetricsEndpoint::from_listener(std::net::TcpListener::from(
                handoff::take(&mut fds, i)?,
            ))
            .map_err(|e| ServeError::Socket("metrics endpoint".into(), e))?,
        ),
        None => None,
    };
    let board = Board::default();
    let report = ReportServer::start(control, metrics, board.clone())
        .map_err(|e| ServeError::Socket("starting the report server".into(), e))?;
    let daemon = Daemon {
        endpoint,
        vhost_listener,
        handoff,
        taps,
        config,
        timeouts: opts.timeouts,
        frontend_timeout: frontend.timeout,
        access: frontend.access.clone(),
        counters: DaemonCounters::default(),
        stop,
        report,
        board,
        peer: None,
        handoffs: HandoffLog {
            taken_over: generation,
            ..HandoffLog::default()
        },
    };
    Ok((daemon, current))
}

/// Polls `fds` for input; returns which are readable (or hung up).
fn wait(
    fds: &[Option<BorrowedFd<'_>>],
    timeout: Option<Duration>,
) -> Result<Vec<bool>, ServeError> {
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .flatten()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    let t = match timeout {
        None => PollTimeout::NONE,
        Some(d) => {
            PollTimeout::try_from(d.as_millis().min(60_000) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    match poll(&mut polled, t) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
        Err(e) => return Err(ServeError::Socket("poll".into(), e.into())),
    }
    let mut it = polled.iter();
    Ok(fds
        .iter()
        .map(|fd| match fd {
            Some(_) => it
                .next()
                .and_then(|p| p.revents())
                .is_some_and(|r| !r.is_empty()),
            None => false,
        })
        .collect())
}

impl Daemon {
    fn run(mut self, mut current: Option<(Connection, Session)>) -> Result<(), ServeError> {
        loop {
            let (conn, mut session) = match current.take() {
                Some(c) => c,
                None => match self.reach_frontend()? {
                    Reached::Frontend(conn) => {
                        event("{\"event\":\"connected\"}".into());
                        (conn, Session::new(self.config.clone(), self.taps.clone()))
                    }
                    Reached::HandedOff => {
                        self.handed_on();
                        return Ok(());
                    }
                    Reached::Stopped(signal) => {
                        self.stopped(signal, None);
                        return Ok(());
                    }
                },
            };
            match self.session_loop(&conn, &mut session)? {
                SessionEnd::HandedOff => {
                    self.handed_on();
                    return Ok(());
                }
                SessionEnd::Stopped(signal) => {
                    self.stopped(signal, Some(&mut session));
                    return Ok(());
                }
                SessionEnd::Disconnected => {
                    session.stop_device();
                    event(format!(
                        "{{\"event\":\"disconnected\",\"requests\":{}}}",
                        session.requests
                    ));
                    drop(session);
                    drop(conn);
                    self.peer = None;
                }
            }
        }
    }

    /// Stops on a signal: the device quiesced (rings stopped at known positions), the
    /// vhost-user socket file removed (the handoff socket's goes with its listener).
    fn stopped(&mut self, signal: StopSignal, session: Option<&mut Session>) {
        let pairs = session
            .as_ref()
            .map(|s| s.running_pairs())
            .unwrap_or_default();
        if let Some(session) = session {
            session.stop_device();
        }
        if let (Endpoint::Server(path), Some(_)) = (&self.endpoint, &self.vhost_listener) {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "could not remove the vhost-user socket");
            }
        }
        tracing::info!(
            signal = signal.name(),
            stopped_pairs = ?pairs,
            "stopping: rings stopped, socket removed"
        );
        event(
            serde_json::json!({
                "event": "stopped",
                "signal": signal.name(),
                "pairs": pairs,
            })
            .to_string(),
        );
    }

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

    /// After a committed handoff: the successor listens on the handoff and control sockets
    /// and serves the metrics now, so their files must stay and this process answers no more.
    fn handed_on(&mut self) {
        if let Some(l) = self.handoff.take() {
            let _ = l.into_fd();
        }
        if let Some(r) = self.report.take() {
            r.hand_over();
        }
    }

    /// The frontend connection, if its peer's uid is allowed; a refused peer is logged,
    /// counted and closed.
    fn admit(&mut self, stream: UnixStream) -> Option<Connection> {
        match peer_uid(&stream) {
            Ok(uid) if self.access.allow_uids.contains(&uid) => {
                let pid = nix::sys::socket::getsockopt(
                    &stream,
                    nix::sys::socket::sockopt::PeerCredentials,
                )
                .map_or(0, |c| c.pid());
                self.peer = Some(Peer { pid, uid });
                Some(Connection::with_timeout(stream, self.frontend_timeout))
            }
            Ok(uid) => {
                self.counters.peers_refused += 1;
                tracing::warn!(uid, allowed = ?self.access.allow_uids, "vhost-user peer of a uid not allowed: closed");
                event(format!(
                    "{{\"event\":\"peer_refused\",\"uid\":{uid},\"refused\":{}}}",
                    self.counters.peers_refused
                ));
                None
            }
            Err(e) => {
                self.counters.peers_refused += 1;
                tracing::warn!(error = %e, "cannot read the vhost-user peer's credentials: closed");
                None
            }
        }
    }

    /// Waits for a frontend, hands the idle daemon to a successor, or stops on a signal.
    fn reach_frontend(&mut self) -> Result<Reached, ServeError> {
        loop {
            if let Some(signal) = self.stop.take() {
                return Ok(Reached::Stopped(signal));
            }
            if let Endpoint::Client(path) = &self.endpoint {
                match connect_without_blocking(path) {
                    Ok(s) => match self.admit(s) {
                        Some(conn) => return Ok(Reached::Frontend(conn)),
                        None => std::thread::sleep(BACKOFF),
                    },
                    Err(e) => tracing::debug!(error = %e, "frontend not listening yet"),
                }
            }
            let listen = self.vhost_listener.as_ref().map(|l| l.as_fd());
            let handoff = self.handoff.as_ref().map(|l| l.as_fd());
            let timeout = match self.endpoint {
                Endpoint::Client(_) => Some(Duration::from_millis(100)),
                Endpoint::Server(_) => None,
            };
            self.publish(None);
            let ready = wait(&[listen, handoff, Some(self.stop.as_fd())], timeout)?;
            if ready[2] {
                continue;
            }
            if ready[1] {
                let idle = Session::new(self.config.clone(), self.taps.clone());
                if self.hand_off_state(None, &idle)? {
                    return Ok(Reached::HandedOff);
                }
            }
            if ready[0] {
                let accepted = self.vhost_listener.as_ref().map(|l| l.accept());
                match accepted {
                    Some(Ok((s, _))) => {
                        if let Some(conn) = self.admit(s) {
                            return Ok(Reached::Frontend(conn));
                        }
                    }
                    Some(Err(e)) if is_exhaustion(&e) => {
                        // The connection stays queued and the listener readable: accepting
                        // again at once would spin. Wait, still serving the handoff socket.
                        self.counters.accept_backoffs += 1;
                        tracing::warn!(error = %e, backoffs = self.counters.accept_backoffs, "accept on the vhost-user socket: out of fds, backing off");
                        let handoff = self.handoff.as_ref().map(|l| l.as_fd());
                        if wait(&[handoff], Some(BACKOFF))?.first() == Some(&true) {
                            let idle = Session::new(self.config.clone(), self.taps.clone());
                            if self.hand_off_state(None, &idle)? {
                                return Ok(Reached::HandedOff);
                            }
                        }
                    }
                    Some(Err(e)) => tracing::warn!(error = %e, "accept on the vhost-user socket"),
                    None => {}
                }
            }
        }
    }

    fn session_loop(
        &mut self,
        conn: &Connection,
        session: &mut Session,
    ) -> Result<SessionEnd, ServeError> {
        let mut pairs = session.running_pairs();
        loop {
            let timeout = if session.logging() {
                Some(Duration::from_millis(10))
            } else {
                session.memory().is_some().then_some(MEMORY_CHECK)
            };
            if session.memory_broken() {
                // The frontend shrank a file it passed (issue 9, item 3): the pages read as
                // zeroes now; this session ends, the daemon serves the next frontend.
                self.counters.memory_broken += 1;
                tracing::error!(
                    sessions = self.counters.memory_broken,
                    "guest memory shrank under its mapping: ending the session"
                );
                event(format!(
                    "{{\"event\":\"memory_broken\",\"sessions\":{},\"faults\":{}}}",
                    self.counters.memory_broken,
                    tapir_datapath::recovered_faults()
                ));
                return Ok(SessionEnd::Disconnected);
            }
            let handoff = self.handoff.as_ref().map(|l| l.as_fd());
            self.publish(Some(session));
            let ready = wait(
                &[Some(conn.as_fd()), handoff, Some(self.stop.as_fd())],
                timeout,
            )?;
            if ready[2] {
                if let Some(signal) = self.stop.take() {
                    return Ok(SessionEnd::Stopped(signal));
                }
            }
            if ready[0] {
                match conn.recv() {
                    Ok(req) => {
                        if let Err(e) = session.handle(conn, req) {
                            tracing::warn!(error = %e, "vhost-user connection lost while replying");
                            return Ok(SessionEnd::Disconnected);
                        }
                        let now = session.running_pairs();
                        if now != pairs {
                            event(format!("{{\"event\":\"pairs\",\"running\":{now:?}}}"));
                            pairs = now;
                        }
                    }
                    Err(WireError::Closed) => return Ok(SessionEnd::Disconnected),
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping the vhost-user connection");
                        return Ok(SessionEnd::Disconnected);
                    }
                }
            }
            if ready[1] && self.hand_off(conn, session)? {
                return Ok(SessionEnd::HandedOff);
            }
            session.flush_log();
        }
    }

    /// Offers the session to a successor that connected to the handoff socket; true if it
    /// took it.
    fn hand_off(&mut self, conn: &Connection, session: &mut Session) -> Result<bool, ServeError> {
        let Some(listener) = &self.handoff else {
            return Ok(false);
        };
        let ch = match listener.accept(Some(Duration::from_secs(1))) {
            Ok(ch) => ch,
            Err(e) => {
                tracing::warn!(error = %e, "handoff connection refused");
                return Ok(false);
            }
        };
        tracing::debug!(
            running = session.running.is_some(),
            generation = session.generation,
            "handoff requested"
        );
        let Some(running) = session.running.take() else {
            return self.hand_off_state_on(ch, Some(conn), session);
        };
        let pairs = running.pairs;
        let mut source = ServeSource {
            inner: DeviceSource::new(running.device, session.generation),
            blob: Vec::new(),
            fds: Vec::new(),
        };
        let mut list = FdList::default();
        let state = self.export(session, &pairs, Some(conn), &mut list);
        source.blob = match handoff::encode(&state) {
            Ok(blob) => blob,
            Err(e) => {
                // Nothing went out yet: the successor sees the channel close.
                tracing::error!(error = %e, "handoff refused");
                let ServeSource { inner, .. } = source;
                self.take_back(session, inner, pairs);
                return Ok(false);
            }
        };
        source.fds = list.into_vec();
        let outcome = hand_off(&mut source, &ch, self.timeouts);
        let ServeSource { inner, .. } = source;
        match outcome {
            Ok(Outcome::Committed(report)) => {
                event(format!(
                    "{{\"event\":\"handoff_committed\",\"successor_pid\":{},\"blackout_ns\":{}}}",
                    report.successor_pid,
                    report.running_ns.saturating_sub(report.quiesce_ns)
                ));
                inner.release();
                Ok(true)
            }
            Ok(Outcome::RolledBack(e)) => {
                self.handoffs.rolled_back += 1;
                event(format!(
                    "{{\"event\":\"handoff_rolled_back\",\"reason\":{:?}}}",
                    e.to_string()
                ));
                self.take_back(session, inner, pairs);
                Ok(false)
            }
            Err(e) => {
                tracing::error!(error = %e, "handoff failed and the device could not resume");
                self.take_back(session, inner, pairs);
                Ok(false)
            }
        }
    }

    /// Accepts a successor and hands it the daemon's state with no device running: the
    /// session (if a frontend is connected) or just the sockets and TAP.
    fn hand_off_state(
        &mut self,
        conn: Option<&Connection>,
        session: &Session,
    ) -> Result<bool, ServeError> {
        let Some(listener) = &self.handoff else {
            return Ok(false);
        };
        match listener.accept(Some(Duration::from_secs(1))) {
            Ok(ch) => self.hand_off_state_on(ch, conn, session),
            Err(e) => {
                tracing::warn!(error = %e, "handoff connection refused");
                Ok(false)
            }
        }
    }

    fn hand_off_state_on(
        &mut self,
        ch: Channel,
        conn: Option<&Connection>,
        session: &Session,
    ) -> Result<bool, ServeError> {
        let mut list = FdList::default();
        let state = self.export(session, &[], conn, &mut list);
        let blob = match handoff::encode(&state) {
            Ok(blob) => blob,
            Err(e) => {
                tracing::error!(error = %e, "handoff refused");
                return Ok(false);
            }
        };
        match hand_off_state(&ch, &blob, &list.into_vec(), self.timeouts) {
            Ok(Outcome::Committed(report)) => {
                event(format!(
                    "{{\"event\":\"handoff_committed\",\"successor_pid\":{},\"state_only\":true}}",
                    report.successor_pid
                ));
                Ok(true)
            }
            Ok(Outcome::RolledBack(e)) | Err(e) => {
                event(format!(
                    "{{\"event\":\"handoff_rolled_back\",\"reason\":{:?}}}",
                    e.to_string()
                ));
                Ok(false)
            }
        }
    }

    /// Describes the session and the daemon's sockets for a successor.
    fn export<'a>(
        &'a self,
        session: &'a Session,
        running_pairs: &[u16],
        conn: Option<&'a Connection>,
        list: &mut FdList<'a>,
    ) -> handoff::SessionState {
        let vhost_listener = self.vhost_listener.as_ref();
        let handoff_listener = self.handoff.as_ref();
        let endpoint = &self.endpoint;
        let mut state = handoff::export(
            session,
            running_pairs,
            conn.map(|c| c.as_fd()),
            |fds| EndpointState {
                path: endpoint.path().display().to_string(),
                client: matches!(endpoint, Endpoint::Client(_)),
                listener: vhost_listener.map(|l| fds.push(l.as_fd())),
                handoff: handoff_listener
                    .map(|l| (l.path().display().to_string(), fds.push(l.as_fd()))),
            },
            list,
        );
        if let Some(r) = &self.report {
            state.report = handoff::ReportState {
                control: r
                    .control()
                    .map(|c| (c.path().display().to_string(), list.push(c.fd()))),
                metrics: r.metrics().map(|m| list.push(m.fd())),
            };
        }
        state
    }

    fn take_back(&self, session: &mut Session, source: DeviceSource, pairs: Vec<u16>) {
        match source.into_running() {
            Some(device) => session.running = Some(Running { device, pairs }),
            None => {
                // The device is gone: start it again from the rings.
                if let Err(e) = session.reconcile() {
                    tracing::error!(error = %e, "could not restart the device after a failed handoff");
                }
            }
        }
    }
}

/// A running device plus the session state that goes with it.
struct ServeSource<'a> {
    inner: DeviceSource,
    blob: Vec<u8>,
    fds: Vec<BorrowedFd<'a>>,
}

impl HandoffSource for ServeSource<'_> {
    fn layout(&self) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>) {
        self.inner.layout()
    }

    fn quiesce(&mut self) -> Result<DeviceSnapshot, MigrateError> {
        self.inner.quiesce()
    }

    fn resume(&mut self) -> Result<(), MigrateError> {
        self.inner.resume()
    }

    fn extension(&self) -> (Vec<u8>, Vec<BorrowedFd<'_>>) {
        (self.blob.clone(), self.fds.clone())
    }
}
