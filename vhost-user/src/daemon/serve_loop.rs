//! The serve loop: reach a frontend (accept or connect), serve its session until it
//! disconnects, is handed on or a signal stops the daemon.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::sockets::{connect_without_blocking, is_exhaustion, peer_uid, wait};
use super::{event, Daemon, Endpoint, Reached, ServeError, SessionEnd};
use crate::control::Peer;
use crate::session::Session;
use crate::stop_signal::StopSignal;
use crate::wire::{Connection, WireError};

/// How long the daemon waits before accepting again when it is out of fds, and between
/// connection attempts in client mode after a refused peer.
const BACKOFF: Duration = Duration::from_millis(200);
/// How often a session with mapped memory is checked for broken memory.
const MEMORY_CHECK: Duration = Duration::from_millis(100);
impl Daemon {
    pub(super) fn run(
        mut self,
        mut current: Option<(Connection, Session)>,
    ) -> Result<(), ServeError> {
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
                    session.discard_carried();
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
    pub(super) fn stopped(&mut self, signal: StopSignal, session: Option<&mut Session>) {
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

    /// After a committed handoff: the successor listens on the handoff and control sockets
    /// and serves the metrics now, so their files must stay and this process answers no more.
    pub(super) fn handed_on(&mut self) {
        if let Some(l) = self.handoff.take() {
            let _ = l.into_fd();
        }
        if let Some(r) = self.report.take() {
            r.hand_over();
        }
    }

    /// The frontend connection, if its peer's uid is allowed; a refused peer is logged,
    /// counted and closed.
    pub(super) fn admit(&mut self, stream: UnixStream) -> Option<Connection> {
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
    pub(super) fn reach_frontend(&mut self) -> Result<Reached, ServeError> {
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

    pub(super) fn session_loop(
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
}
