//! tapir-state: the snapshot of a running device that a handoff carries.
//!
//! Will hold plain-data, versioned snapshot types (features, MAC, MTU, per-queue ring
//! positions and in-flight heads, TAP queue settings, the fd manifest) and their
//! checksummed binary codec, validated field by field on decode. No I/O, no fds.
//! Tracked by the handoff issue; empty until then.
