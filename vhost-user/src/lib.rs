//! tapir-vhost-user: a vhost-user-net backend over tapir-datapath (`tapir serve`).
//!
//! The `vhost` crate supplies the message layouts; tapir does its own dispatch (a
//! [`Session`] per frontend) so that it can run its io_uring workers, accept requests in the
//! order real frontends send them, and hand a live session (connection included) to a
//! successor ([`handoff`]).
//!
//! Entry points:
//! - [`serve`]: the serve loop (server or client mode, [`ServeOptions`]), and
//!   [`take_over_daemon`], a successor taking over a running daemon;
//! - [`Session`]: one frontend's state and the device running its ready queue pairs
//!   ([`SessionConfig`], [`offered_features`]);
//! - for the daemon's command line: [`TapSharing`], [`MAX_TAP_QUEUES`], [`checked_mtu`],
//!   [`StopSignals`] (SIGTERM and SIGINT through a signalfd).
//!
//! Public for the fuzz targets and the handoff tests, the parsers a frontend or a predecessor
//! feeds: [`wire`] (the vhost-user socket: header, body, `SCM_RIGHTS`), [`memory_table`]
//! (the frontend's memory regions and address translation), [`dirty_log`] (the shared dirty
//! log for the frontend's live migration) and [`handoff`] (a session as handoff state, out
//! and back in).
//!
//! Inside: `link` (RARP announcement, MTU), `control` (the control socket's counters report),
//! `metrics` (the report as Prometheus text over loopback HTTP), `report` (the live report),
//! `report_server` (the thread that answers control and metrics clients), `daemon`,
//! `session`, `stop_signal`, `tap_setup`.

mod control;
mod daemon;
pub mod dirty_log;
pub mod handoff;
mod link;
pub mod memory_table;
mod metrics;
mod report;
mod report_server;
mod session;
mod stop_signal;
mod tap_setup;
pub mod wire;

pub use daemon::{
    serve, take_over_daemon, AccessControl, Endpoint, FrontendPolicy, ServeError, ServeOptions,
};
pub use link::{checked_mtu, LinkError};
pub use session::{
    offered_features, offered_protocol_features, DirtyAtStop, Session, SessionConfig,
};
pub use stop_signal::{StopSignal, StopSignals};
pub use tap_setup::{TapSetupError, TapSharing, MAX_TAP_QUEUES};
