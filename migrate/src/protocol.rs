//! Message kinds, timeouts and errors of the handoff protocol (see `docs/HANDOFF.md`).

use std::time::Duration;

use crate::transport::ChannelError;

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u16 = 2;

/// Successor -> source: version (u16 LE), pid (u32 LE).
pub const HELLO: u8 = 1;
/// Source -> successor: the layout snapshot (rings at 0, nothing in flight).
pub const PREPARE: u8 = 2;
/// Source -> successor: a chunk of fds in manifest order; payload: index of the first (u32 LE).
pub const FDS: u8 = 3;
/// Successor -> source: memory mapped, fds adopted.
pub const PREPARED: u8 = 4;
/// Source -> successor: quiesce start (u64 LE, CLOCK_MONOTONIC ns), then the final snapshot.
pub const SWITCH: u8 = 5;
/// Successor -> source: engines set up, rings untouched.
pub const READY: u8 = 6;
/// Source -> successor: the source will not resume; run.
pub const GO: u8 = 7;
/// Successor -> source: sent before the successor touches a ring.
pub const RUNNING: u8 = 8;
/// Either way: give up; payload: a UTF-8 reason.
pub const ABORT: u8 = 9;
/// Source -> successor, after the FDS chunks: state the embedder hands on besides the
/// device (an opaque blob, possibly empty) and its fds (e.g. a vhost-user session).
pub const EXTENSION: u8 = 10;
/// Source -> successor, instead of PREPARE: no device runs, only the embedder's state is
/// handed on (blob and fds, as in EXTENSION). The successor answers RUNNING once it has taken
/// it, or ABORT.
pub const STATE_ONLY: u8 = 11;

/// Timeouts of each step.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From connection to HELLO, and for PREPARED (mapping memory can take a while).
    pub prepare: Duration,
    /// For READY after SWITCH, and RUNNING after GO: the blackout steps.
    pub switch: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            prepare: Duration::from_secs(10),
            switch: Duration::from_secs(2),
        }
    }
}

/// Errors of a handoff.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The channel.
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The peer sent something else than the protocol expects next.
    #[error("protocol: expected {expected}, got message kind {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: u8,
    },
    /// The peer speaks another protocol version.
    #[error("peer speaks handoff protocol {0}, this build speaks {PROTOCOL_VERSION}")]
    Version(u16),
    /// The peer called the handoff off.
    #[error("peer aborted the handoff: {0}")]
    Aborted(String),
    /// A snapshot failed to decode or validate.
    #[error("snapshot: {0}")]
    State(#[from] tapir_state::StateError),
    /// The switch-time snapshot describes another device than the prepared one.
    #[error("the final snapshot does not match the prepared layout")]
    LayoutChanged,
    /// The fds that came do not match the manifest.
    #[error("fd manifest: {0}")]
    Fds(String),
    /// The datapath.
    #[error(transparent)]
    Device(#[from] tapir_datapath::DeviceError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] tapir_datapath::MemoryError),
    /// A TAP queue fd.
    #[error(transparent)]
    Tap(#[from] tapir_datapath::TapError),
    /// Ring positions that do not add up (checked before READY).
    #[error("ring positions: {0}")]
    Positions(String),
    /// The embedder refused the state handed on besides the device.
    #[error("embedder state: {0}")]
    Extension(String),
    /// A peer that is not what it says (its HELLO names another process, or it is gone).
    #[error("peer: {0}")]
    Peer(String),
    /// A payload too short for its fields.
    #[error("message kind {0} too short")]
    Short(u8),
}

/// Expects a message of `kind`; turns ABORT into [`MigrateError::Aborted`].
pub fn expect(
    msg: &crate::transport::Message,
    kind: u8,
    name: &'static str,
) -> Result<(), MigrateError> {
    if msg.kind == kind {
        return Ok(());
    }
    if msg.kind == ABORT {
        return Err(MigrateError::Aborted(
            String::from_utf8_lossy(&msg.payload).into_owned(),
        ));
    }
    Err(MigrateError::Unexpected {
        expected: name,
        got: msg.kind,
    })
}
