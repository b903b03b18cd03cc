//! What `tapir serve` is told: where the frontend is, the TAP, the sockets, who may connect.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tapir_migrate::Timeouts;

use crate::session::SessionConfig;
use crate::tap_setup::TapSharing;

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
    pub(super) fn path(&self) -> &Path {
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
