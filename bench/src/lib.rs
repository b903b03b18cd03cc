//! tapir-bench (being written).

pub mod alloc_count;
pub mod charts;
pub mod floor;
pub mod latency;
pub mod peers;
pub mod report;
pub mod runner;
pub mod vhost_frontend;
pub mod vhost_rig;

/// The running binary, for the child processes the bench starts (`tapir datapath`,
/// `tapir serve`): `/proc/self/exe`, which names the running build even after the file was
/// replaced by a rebuild (where `current_exe()` gives a "... (deleted)" path that no longer
/// exists).
pub fn self_exe() -> std::path::PathBuf {
    std::path::PathBuf::from("/proc/self/exe")
}
