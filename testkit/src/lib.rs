//! tapir-testkit: what tapir's integration tests, its benchmark (`tapir bench`) and its fuzz
//! targets share, so that each drives the datapath the same way.
//!
//! - [`netns`]: a fresh network namespace per scenario ([`netns::run_in_new_netns`]) and thin
//!   `ip` / sysctl / interface-counter helpers inside it.
//! - The rigs: [`Rig`] (a multiqueue TAP with a host address, a simulated guest and a tapir
//!   device in this process between them) and [`HandoffRig`] (the device in `tapir datapath`
//!   child processes, handed from child to child while [`SteadyTraffic`] runs).
//! - Guest-memory fixtures: a simulated guest's memory, queues and handoff resources as a VMM
//!   hands them over ([`guest_memory`], [`queue_config`], [`pair_resources`]), bare
//!   [`memfd`]s and [`eventfd`]s.
//! - [`frames`]: Ethernet / IPv4 / UDP / TCP / ICMP / ARP frames built and parsed on smoltcp's
//!   `wire` views, with a payload a receiver can verify byte for byte.
//! - [`host_sockets`]: the host side of a test or peer: a UDP socket with large buffers,
//!   `UDP_SEGMENT`, an AF_PACKET injector with a `virtio_net_hdr`, an AF_PACKET listener.
//! - [`vhost_frontend`]: what a VMM does to start a vhost-user-net backend for a simulated
//!   guest (the rust-vmm `vhost` frontend), so any backend can be driven by the same guest;
//!   what it negotiates ([`vhost_frontend::Negotiation`]) can be changed for protocol tests.
//! - [`raw_tap`]: one TAP queue opened by hand, for code that plays the datapath itself;
//!   [`cpu`]: pinning and per-thread CPU time.
//!
//! - [`capability`]: what this machine can do (the TAP's USO, hugetlbfs, QEMU); in CI a
//!   missing capability is a failure, outside it a test asserts the outcome without it.
//!
//! Everything that touches interfaces must run inside a namespace the caller made (root:
//! `CAP_NET_ADMIN`, `CAP_SYS_ADMIN`). Nothing here asserts (but
//! [`capability::absent`], in CI); errors are returned with context.

pub mod capability;
pub mod cpu;
pub mod frames;
pub mod host_sockets;
pub mod netns;
pub mod raw_tap;
pub mod vhost_frontend;

mod handoff;
mod memory;
mod rig;

pub use handoff::{
    ChildEvent, ChildOptions, DirectionReport, HandoffRig, HandoffSample, SteadyTraffic,
    TrafficReport,
};
pub use memory::{
    dup_guest_fd, eventfd, guest_memory, memfd, memfd_guest_memory, pair_resources, queue_config,
    ring_addrs, FixtureError,
};
pub use rig::{
    configure_host_tap, host_tap, linux_guest_features, wait_tap_gone, Rig, RigConfig, RigError,
    GUEST_IP, GUEST_MAC, HOST_IP, TAP_NAME,
};
