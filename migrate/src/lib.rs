//! tapir-migrate: hands a running datapath to a successor process over a Unix socket, with
//! its fds (TAP queues, guest memory, kick/call eventfds), so that the successor resumes the
//! rings at the same positions. The protocol is written down in `docs/HANDOFF.md`.
//!
//! - [`transport`]: the SEQPACKET channel, peer credentials, fd passing;
//! - [`protocol`]: message kinds, timeouts, errors;
//! - [`snapshot`]: a device as a `tapir-state` snapshot plus its fds;
//! - [`source`]: prepare / switch / commit or roll back, for a running device
//!   ([`DeviceSource`]) or anything else that implements [`HandoffSource`];
//! - [`successor`]: the other side, [`take_over`].

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

mod fence;
pub mod ownership;
pub mod protocol;
pub mod snapshot;
pub mod source;
pub mod successor;
mod switch_v3;
pub mod transport;

pub use protocol::{MigrateError, Timeouts};
pub use source::{
    hand_off, hand_off_state, snapshot_of, DeviceSource, HandoffReport, HandoffSource,
    LaunchSource, Outcome,
};
pub use successor::{
    accept_state, refuse_state, restore, take_over, take_over_any, take_over_checked, Extension,
    FailPoint, SuccessorOptions, TakeOver, Taken,
};
pub use transport::{refused_messages, Channel, ChannelError, Listener, Message};
