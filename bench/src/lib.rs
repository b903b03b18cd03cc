//! tapir-bench (being written).

pub mod alloc_count;
pub mod charts;
pub mod cpu;
pub mod floor;
pub mod frames;
pub mod handoff;
pub mod latency;
pub mod netns;
pub mod peers;
pub mod report;
pub mod rig;
pub mod runner;
