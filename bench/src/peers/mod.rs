//! Host-side traffic peers: a raw packet generator on an interface
//! ([`PacketGenerator`]), a UDP sink ([`UdpSink`]), a UDP reflector
//! ([`UdpEcho`]) and a UDP sender through the routing stack ([`UdpSender`]),
//! plus the per-flow [`SeqTracker`].
//!
//! Every peer creates its socket in its constructor — in the *calling
//! thread's* network namespace — and then runs either on the calling thread
//! (`run`) or on its own thread (`spawn`, optionally pinned) until the stop
//! flag is set, the duration elapses or a packet budget is reached (see
//! [`RunControl`]). Each reports packets, bytes, wall time and its own thread
//! CPU time ([`PeerStats`]) so a benchmark can tell when a peer is the
//! bottleneck. The hot loops do not allocate.

mod echo;
mod generator;
mod harness;
mod sender;
mod seq;
mod sink;
mod socket;
#[cfg(test)]
mod tests;

use std::io;

use tapir_testkit::netns::NetnsError;

pub use echo::{EchoReport, UdpEcho, UdpEchoConfig};
pub use generator::{GeneratorConfig, GeneratorReport, PacketGenerator, SeqMode, Template};
pub use harness::{PeerHandle, RunControl};
pub use sender::{SenderReport, UdpSender, UdpSenderConfig};
pub use sink::{SinkReport, UdpSink, UdpSinkConfig};

/// Errors from peers.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// A system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Interface lookup etc.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// An invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The peer thread panicked.
    #[error("peer thread panicked")]
    Panicked,
}

pub(super) fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> PeerError {
    move |source| PeerError::Io { context, source }
}

pub(super) fn last_err(context: &'static str) -> PeerError {
    PeerError::Io {
        context,
        source: io::Error::last_os_error(),
    }
}
