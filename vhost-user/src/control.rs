//! The control socket (`tapir serve --control PATH`): a Unix socket, mode 0600, on which the
//! daemon answers `stats` with one JSON object (queue pairs, session, handoffs) and closes.
//! Its clients are served by the report server's thread ([`crate::report_server`]), beside
//! the vhost-user loop, from the report board ([`crate::report`]): a slow client delays
//! nobody, and the workers pay nothing new (the counters are those they already publish once
//! per loop).
//!
//! The reply's layout (the `stats` reply): `queue_pairs[i].rx|tx` with packets, bytes, drops by cause,
//! malformed, kicks, interrupts; per pair `batches`, `broken`; `session` (frontend pid and uid,
//! features, rings) or null; `handoffs` (count, last downtimes in ns); `daemon` counters.

use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde_json::{json, Value};
use tapir_datapath::Counters;

use crate::session::Session;

/// Takeover downtimes kept for the report.
pub const DOWNTIMES_KEPT: usize = 16;
/// The longest request line (a request is one short word).
pub const MAX_REQUEST: usize = 256;

/// The bound control socket; its file goes when it is dropped, unless it was handed on
/// ([`ControlSocket::keep_file`]).
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// The file removed on drop: none once a successor took the socket over.
    remove_on_drop: Mutex<Option<PathBuf>>,
}

impl ControlSocket {
    /// Wraps a listener bound (0600) at `path`.
    pub fn new(listener: UnixListener, path: &Path) -> std::io::Result<ControlSocket> {
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
            remove_on_drop: Mutex::new(Some(path.to_owned())),
        })
    }

    /// The listener.
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Its fd (for a successor).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.listener.as_fd()
    }

    /// Where it is bound.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A successor serves the socket now: its file stays when this one is dropped.
    pub fn keep_file(&self) {
        *self
            .remove_on_drop
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let path = self
            .remove_on_drop
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(path) = path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The reply to one request line: `stats` gets the report, anything else an error object.
pub fn reply(request: &str, report: impl FnOnce() -> Value) -> Vec<u8> {
    let reply = match request.trim() {
        "stats" => report(),
        other => json!({ "error": format!("unknown request {other:?} (stats)") }),
    };
    let mut out = reply.to_string().into_bytes();
    out.push(b'\n');
    out
}

/// One direction's counters.
fn direction(c: &Counters, rx: bool) -> Value {
    if rx {
        json!({
            "packets": c.rx_packets,
            "bytes": c.rx_bytes,
            "drops": {
                "oversize": c.rx_dropped_oversize,
                "no_buffers": c.rx_dropped_no_buffers,
            },
            "no_buffers_waits": c.rx_no_buffers,
            "woken_reads": c.rx_woken_reads,
            "deferred": c.rx_deferred,
            "spilled": c.rx_spilled,
            "reordered": c.rx_reordered,
            "malformed": c.rx_malformed,
            "kicks": c.rx_kicks,
            "interrupts": c.rx_interrupts,
        })
    } else {
        json!({
            "packets": c.tx_packets,
            "bytes": c.tx_bytes,
            "drops": { "errors": c.tx_errors },
            "malformed": c.tx_malformed,
            "kicks": c.tx_kicks,
            "interrupts": c.tx_interrupts,
        })
    }
}

/// The queue pairs' counters as the report lists them.
pub fn queue_pairs(counters: &[Counters], running: &[u16]) -> Value {
    Value::Array(
        counters
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "pair": i,
                    "running": running.iter().any(|&p| usize::from(p) == i),
                    "rx": direction(c, true),
                    "tx": direction(c, false),
                    "batches": c.batches,
                    "io_syscalls": c.io_syscalls,
                    "busy_poll": { "rounds": c.busy_poll_rounds, "found": c.busy_poll_found },
                    "broken": { "queues": c.queues_broken, "pairs": c.pairs_broken },
                })
            })
            .collect(),
    )
}

/// Who the frontend is.
#[derive(Clone, Copy, Debug)]
pub struct Peer {
    /// Its pid (0 when the connection was taken over: not known here).
    pub pid: i32,
    /// Its uid.
    pub uid: u32,
}

/// The session part of the report.
pub fn session(session: &Session, peer: Option<Peer>) -> Value {
    let rings: Vec<Value> = session
        .vrings
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "index": i,
                "size": v.size,
                "base": v.base,
                "enabled": v.enabled,
                "started": v.started,
            })
        })
        .collect();
    json!({
        "frontend_pid": peer.map(|p| p.pid),
        "frontend_uid": peer.map(|p| p.uid),
        "features": format!("{:#x}", session.features),
        "protocol_features": format!("{:#x}", session.protocol_features),
        "requests": session.requests,
        "generation": session.generation,
        "running_pairs": session.running_pairs(),
        "rings": rings,
    })
}
