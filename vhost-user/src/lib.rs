//! tapir-vhost-user: a vhost-user-net backend over tapir-datapath (`tapir serve`).
//!
//! The `vhost` crate supplies the message layouts; tapir does its own dispatch
//! ([`session`]) so that it can run its io_uring workers, accept requests in the order real
//! frontends send them, and hand a live session (connection included) to a successor
//! ([`handoff`]).
//!
//! - [`wire`]: the vhost-user socket (header, body, `SCM_RIGHTS`);
//! - [`memory_table`]: the frontend's memory regions and address translation;
//! - [`dirty_log`]: the shared dirty log for the frontend's live migration;
//! - [`link`]: the TAP link a frontend asks about (RARP announcement, MTU);
//! - [`session`]: one frontend's state and the device running its ready queue pairs;
//! - [`handoff`]: a session as handoff state, out and back in;
//! - [`control`]: the control socket's counters report;
//! - [`metrics`]: the report as Prometheus text over loopback HTTP;
//! - [`report`]: the live report, published by the serve loop, read beside it;
//! - [`report_server`]: the thread that answers control and metrics clients;
//! - [`daemon`]: the serve loop (server or client mode, handoffs);
//! - [`stop_signal`]: SIGTERM and SIGINT through a signalfd;
//! - [`tap_setup`]: opening the TAP (sharing refused, kernel errors explained).

pub mod control;
pub mod daemon;
pub mod dirty_log;
pub mod handoff;
pub mod link;
pub mod memory_table;
pub mod metrics;
pub mod report;
pub mod report_server;
pub mod session;
pub mod stop_signal;
pub mod tap_setup;
pub mod wire;

pub use daemon::{
    serve, take_over_daemon, AccessControl, Endpoint, FrontendPolicy, ServeError, ServeOptions,
};
pub use session::{
    offered_features, offered_protocol_features, DirtyAtStop, Session, SessionConfig,
};
pub use tap_setup::{TapSetupError, TapSharing};
