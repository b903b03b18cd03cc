//! Message kinds, timeouts and errors of the handoff protocol (see `docs/HANDOFF.md`).

use std::time::Duration;

use crate::transport::ChannelError;

/// The newest protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 3;
/// The oldest protocol version this build still speaks (a successor of this build takes over
/// from a source that speaks only this one, and the other way round).
pub const OLDEST_PROTOCOL_VERSION: u16 = 2;

/// Hidden test knob: the newest protocol version this process speaks (e.g. `2`, to play a
/// build from before version 3). Read once per process.
pub const NEWEST_VERSION_ENV: &str = "TAPIR_HANDOFF_PROTOCOL";

/// Successor -> source: the oldest version it speaks (u16 LE), pid (u32 LE), the newest
/// version it speaks (u16 LE; missing: the same as the oldest, a build from before version
/// negotiation).
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

/// Source -> successor, right after HELLO, when the pair agreed on version 3 or newer: the
/// agreed version (u16 LE). A version-2 source sends no VERSION (PREPARE or STATE_ONLY come
/// first), so a successor that sees none speaks version 2.
pub const VERSION: u8 = 12;

/// Source -> successor (version 3), after EXTENSION: the ownership word's sealed memfd (one
/// fd) and the source's attempt number (u32 LE).
pub const OWNERSHIP: u8 = 13;

/// The protocol versions a process speaks, oldest to newest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Versions {
    /// The oldest.
    pub oldest: u16,
    /// The newest.
    pub newest: u16,
}

impl Versions {
    /// What this process speaks: [`OLDEST_PROTOCOL_VERSION`] to [`PROTOCOL_VERSION`], or less
    /// at the newest end when [`NEWEST_VERSION_ENV`] says so (never outside that range).
    pub fn spoken() -> Versions {
        static SPOKEN: std::sync::OnceLock<Versions> = std::sync::OnceLock::new();
        *SPOKEN.get_or_init(|| {
            let newest = std::env::var(NEWEST_VERSION_ENV)
                .ok()
                .and_then(|v| v.trim().parse::<u16>().ok())
                .map_or(PROTOCOL_VERSION, |v| {
                    v.clamp(OLDEST_PROTOCOL_VERSION, PROTOCOL_VERSION)
                });
            Versions {
                oldest: OLDEST_PROTOCOL_VERSION,
                newest,
            }
        })
    }

    /// The HELLO payload of a successor with pid `pid` speaking these versions.
    pub fn hello(self, pid: u32) -> Vec<u8> {
        let mut p = self.oldest.to_le_bytes().to_vec();
        p.extend_from_slice(&pid.to_le_bytes());
        p.extend_from_slice(&self.newest.to_le_bytes());
        p
    }

    /// Parses a HELLO payload: the successor's versions and pid.
    pub fn of_hello(payload: &[u8]) -> Result<(Versions, u32), MigrateError> {
        match payload {
            [o0, o1, p0, p1, p2, p3, rest @ ..] => {
                let oldest = u16::from_le_bytes([*o0, *o1]);
                let pid = u32::from_le_bytes([*p0, *p1, *p2, *p3]);
                let newest = match rest {
                    [n0, n1, ..] => u16::from_le_bytes([*n0, *n1]),
                    // A build from before negotiation: exactly one version.
                    _ => oldest,
                };
                Ok((Versions { oldest, newest }, pid))
            }
            _ => Err(MigrateError::Short(HELLO)),
        }
    }

    /// The highest version both speak.
    pub fn agree(self, peer: Versions) -> Result<u16, MigrateError> {
        let newest = self.newest.min(peer.newest);
        if newest < self.oldest.max(peer.oldest) || peer.oldest > peer.newest {
            return Err(MigrateError::Version { peer, ours: self });
        }
        Ok(newest)
    }
}

impl std::fmt::Display for Versions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.oldest == self.newest {
            write!(f, "{}", self.oldest)
        } else {
            write!(f, "{} to {}", self.oldest, self.newest)
        }
    }
}

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
    /// The peer speaks no protocol version this process speaks.
    #[error("peer speaks handoff protocol {peer}, this process speaks {ours}")]
    Version {
        /// What the peer speaks.
        peer: Versions,
        /// What this process speaks.
        ours: Versions,
    },
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
    /// The ownership word (version 3): it cannot be set up, or it says what it must not.
    #[error("ownership word: {0}")]
    Ownership(String),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn v(oldest: u16, newest: u16) -> Versions {
        Versions { oldest, newest }
    }

    #[test]
    fn the_highest_common_version_is_agreed() {
        assert_eq!(v(2, 3).agree(v(2, 3)).unwrap(), 3);
        assert_eq!(v(2, 3).agree(v(2, 2)).unwrap(), 2);
        assert_eq!(v(2, 2).agree(v(2, 3)).unwrap(), 2);
        assert_eq!(v(2, 4).agree(v(3, 9)).unwrap(), 4);
    }

    #[test]
    fn no_common_version_is_refused() {
        assert!(matches!(
            v(2, 3).agree(v(4, 5)),
            Err(MigrateError::Version { .. })
        ));
        assert!(v(3, 3).agree(v(2, 2)).is_err());
        // A range upside down is no range.
        assert!(v(2, 3).agree(v(3, 2)).is_err());
    }

    #[test]
    fn a_hello_without_a_newest_version_is_a_single_version() {
        let mut old = 2u16.to_le_bytes().to_vec();
        old.extend_from_slice(&77u32.to_le_bytes());
        assert_eq!(Versions::of_hello(&old).unwrap(), (v(2, 2), 77));
        assert_eq!(
            Versions::of_hello(&v(2, 3).hello(78)).unwrap(),
            (v(2, 3), 78)
        );
        assert!(Versions::of_hello(old.get(..5).unwrap()).is_err());
    }
}
