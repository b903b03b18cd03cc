//! What the machine a test runs on can do, and what a test does when something is missing.
//!
//! Outside CI a scenario asserts the one outcome right for this machine (a kernel without USO
//! on its TAPs: segmented datagrams; with it: one GSO frame). In CI (the `CI` environment
//! variable set, as `.ci/run` and CI services set it) every capability is provided, so one
//! that is missing is a failure, never a skip.

use std::io;

use crate::raw_tap;

/// A capability some scenarios need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capability {
    /// The TAP takes UDP segmentation offload (`TUN_F_USO4 | TUN_F_USO6`, Linux 6.2+).
    TapUso,
    /// hugetlbfs can be mounted and has free huge pages.
    Hugetlbfs,
    /// QEMU and the tools to build the test guest are installed.
    Qemu,
}

/// Whether a capability is there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Presence {
    /// It is.
    Present,
    /// It is not, and why.
    Absent(String),
}

/// Whether this run is CI's (`CI` set and not `false` / `0`): there nothing may be missing.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// What a missing capability means here: a panic in CI; outside it, `Absent`, for the caller
/// to assert the outcome without it (or to say SKIPPED where nothing runs without it).
pub fn absent(cap: Capability, why: String) -> Presence {
    assert!(
        !in_ci(),
        "CI must provide {cap:?} (.ci/run installs and sets up what the tests need): {why}"
    );
    Presence::Absent(why)
}

/// `TUN_F_CSUM`.
const TUN_F_CSUM: libc::c_uint = 0x01;
/// `TUN_F_USO4`.
const TUN_F_USO4: libc::c_uint = 0x20;
/// `TUN_F_USO6`.
const TUN_F_USO6: libc::c_uint = 0x40;

/// Probes the TAP's USO offload on a TAP `probe_tap` of its own (inside the caller's network
/// namespace; gone when the probe returns). In CI, absent panics ([`absent`]).
pub fn tap_uso(probe_tap: &str) -> io::Result<Presence> {
    let fd = raw_tap::open_tap(probe_tap)?;
    match raw_tap::set_offload(&fd, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6) {
        Ok(()) => Ok(Presence::Present),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(absent(
            Capability::TapUso,
            format!("TUNSETOFFLOAD with USO4 | USO6: {e}"),
        )),
        Err(e) => Err(e),
    }
}
