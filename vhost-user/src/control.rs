//! The control socket (`tapir serve --control PATH`): a Unix socket, mode 0600, on which the
//! daemon answers `stats` with one JSON object (queue pairs, session, handoffs) and closes.
//! It is served from the daemon's own loop between vhost-user requests: no thread, and the
//! workers pay nothing new (the counters are those they already publish once per loop).
//!
//! The reply's layout ([`stats`]): `queue_pairs[i].rx|tx` with packets, bytes, drops by cause,
//! malformed, kicks, interrupts; per pair `batches`, `broken`; `session` (frontend pid and uid,
//! features, rings) or null; `handoffs` (count, last downtimes in ns); `daemon` counters.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use tapir_datapath::Counters;

use crate::session::Session;

/// How long a control client may take to send its request or take the reply.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(1);
/// Takeover downtimes kept for the report.
pub const DOWNTIMES_KEPT: usize = 16;

/// The bound control socket; its file goes when it is dropped.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlSocket {
    /// Wraps a listener bound (0600) at `path`.
    pub fn new(listener: UnixListener, path: &Path) -> std::io::Result<ControlSocket> {
        listener.set_nonblocking(true)?;
        Ok(ControlSocket {
            listener,
            path: path.to_owned(),
        })
    }

    /// The listener (for polling).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accepts the waiting clients and answers each (errors are logged: a client cannot hurt
    /// the daemon).
    pub fn serve(&self, report: &dyn Fn() -> Value) {
        while let Ok((stream, _)) = self.listener.accept() {
            if let Err(e) = answer(stream, report) {
                tracing::debug!(error = %e, "control client");
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn answer(stream: UnixStream, report: &dyn Fn() -> Value) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new((&stream).take_limited()).read_line(&mut line)?;
    let mut out = &stream;
    let reply = match line.trim() {
        "stats" => report(),
        other => json!({ "error": format!("unknown request {other:?} (stats)") }),
    };
    writeln!(out, "{reply}")?;
    out.flush()
}

/// A reader of at most 256 bytes (a request is one short line).
trait TakeLimited: std::io::Read + Sized {
    fn take_limited(self) -> std::io::Take<Self> {
        self.take(256)
    }
}

impl<R: std::io::Read> TakeLimited for R {}

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
            "deferred": c.rx_deferred,
            "spilled": c.rx_spilled,
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
