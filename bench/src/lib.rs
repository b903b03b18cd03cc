//! tapir-bench: `tapir bench`, throughput, latency and handoff measurements of tapir's engines
//! against the raw TAP floor and, optionally, a vhost-user backend, all driven by the same
//! simulated guest and host peers in a private network namespace.
//!
//! The door: [`run`] measures what [`BenchOptions`] asks for and returns a [`Report`] (a
//! table, Markdown, JSON through serde, and SVG charts with [`write_charts`]);
//! [`VhostUserBackend`] names the backend the `vhost-user` engine starts per measurement;
//! [`CountingAllocator`] is the global allocator behind allocations per packet. The rigs,
//! namespaces and frames the bench shares with the tests live in `tapir-testkit`.

mod alloc_count;
mod charts;
mod floor;
mod latency;
mod peers;
mod report;
mod runner;
mod vhost_rig;

pub use alloc_count::Counting as CountingAllocator;
pub use charts::write_all as write_charts;
pub use latency::Placement;
pub use report::{HandoffResult, LatencyResult, Meta, Report, ThroughputResult};
pub use runner::{run, BenchEngine, BenchOptions, Scenario};
pub use vhost_rig::{BackendCommand, VhostUserBackend};

/// The running binary, for the child processes the bench starts (`tapir datapath`,
/// `tapir serve`): `/proc/self/exe`, which names the running build even after the file was
/// replaced by a rebuild (where `current_exe()` gives a "... (deleted)" path that no longer
/// exists).
fn self_exe() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}
