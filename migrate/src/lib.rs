//! tapir-migrate: hands a running datapath to a successor process over a Unix socket, with
//! its fds (TAP queues, guest memory, kick/call eventfds), so that the successor resumes the
//! rings at the same positions. The protocol is written down in `docs/HANDOFF.md`.

pub mod transport;

pub use transport::{Channel, ChannelError, Listener, Message};
