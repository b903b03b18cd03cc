//! A successor's side: taking a running `tapir serve` over and rebuilding the daemon (and
//! its session) from the predecessor's blob and fds.

use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tapir_datapath::TapQueue;
use tapir_migrate::{
    accept_state, refuse_state, take_over_checked, Channel, Extension, Listener, SuccessorOptions,
    Taken,
};

use super::{event, Daemon, DaemonCounters, Endpoint, FrontendPolicy, HandoffLog, ServeError};
use crate::control::ControlSocket;
use crate::handoff;
use crate::report::Board;
use crate::report_server::ReportServer;
use crate::session::{Session, SessionConfig};
use crate::stop_signal::StopSignals;
use crate::wire::Connection;

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
            session.set_carried(handoff::carried_frames(&state));
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
