//! The predecessor's side of a handoff: offering the session (running device included) or
//! the idle daemon to a successor, and taking the device back when it is refused.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use tapir_migrate::{
    hand_off, hand_off_state, Channel, DeviceSource, HandoffSource, MigrateError, Outcome,
};
use tapir_state::DeviceSnapshot;

use super::{event, Daemon, Endpoint, ServeError};
use crate::handoff::{self, EndpointState, FdList};
use crate::session::{Running, Session};
use crate::wire::Connection;

impl Daemon {
    /// Offers the session to a successor that connected to the handoff socket; true if it
    /// took it.
    pub(super) fn hand_off(
        &mut self,
        conn: &Connection,
        session: &mut Session,
    ) -> Result<bool, ServeError> {
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
    pub(super) fn hand_off_state(
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

    pub(super) fn hand_off_state_on(
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
    pub(super) fn export<'a>(
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

    pub(super) fn take_back(&self, session: &mut Session, source: DeviceSource, pairs: Vec<u16>) {
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
