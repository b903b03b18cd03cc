//! tapir-migrate: hands a running datapath to a successor process over a Unix socket, with
//! its fds (TAP queues, guest memory, kick/call eventfds), so that the successor resumes the
//! rings at the same positions. The protocol is written down in `docs/HANDOFF.md`.
//!
//! Entry points:
//! - the source side: [`hand_off`] a running device ([`DeviceSource`]) or anything else that
//!   implements [`HandoffSource`] (prepare / switch / commit or roll back), [`hand_off_state`]
//!   for a handoff state of one's own, [`LaunchSource`] for a device not started yet;
//! - the successor side: [`take_over`] (and [`take_over_checked`], [`accept_state`],
//!   [`refuse_state`] for a successor that checks the state first), [`restore`];
//! - the channel between them: [`Listener`] and [`Channel`] (SEQPACKET, peer credentials,
//!   fd passing);
//! - [`protocol`]: the message kinds, versions and timeouts, for a peer written elsewhere;
//! - [`ownership`]: the word in shared memory that says which process owns the rings.
//!
//! Inside: `snapshot` (a device as a `tapir-state` snapshot plus its fds), `source`,
//! `successor`, `transport`, `fence` and `switch_v3`.

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

mod fence;
pub mod ownership;
pub mod protocol;
mod snapshot;
mod source;
mod successor;
mod switch_v3;
mod transport;

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
