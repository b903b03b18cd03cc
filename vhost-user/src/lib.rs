//! tapir-vhost-user: a vhost-user-net backend over tapir-datapath.
//!
//! Will dispatch vhost-user requests (QEMU, Cloud Hypervisor, DPDK virtio-user) onto
//! tapir's own workers. Tracked by the vhost-user issue; empty until then.
