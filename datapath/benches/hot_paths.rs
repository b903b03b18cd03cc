//! Micro-benchmarks of the per-packet hot paths: a descriptor chain to iovecs, and a used-ring
//! update with its interrupt decision. `cargo bench -p tapir-datapath`.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use nix::sys::eventfd::{EfdFlags, EventFd};
use tapir_datapath::testing::chain::{self, Access, DescTable, Segments};
use tapir_datapath::{GuestMemory, MemoryRegionSpec};
use tapir_datapath::{QueueConfig, Virtqueue};
use vm_memory::{Bytes, GuestAddress};

const SIZE: u16 = 256;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;

fn memory() -> GuestMemory {
    let fd = nix::sys::memfd::memfd_create(c"bench", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd");
    let file = File::from(fd);
    file.set_len(0x100_000).expect("size");
    GuestMemory::from_regions(vec![MemoryRegionSpec {
        guest_addr: 0,
        size: 0x100_000,
        fd: file.into(),
        file_offset: 0,
    }])
    .expect("map")
}

fn put_desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..].copy_from_slice(&next.to_le_bytes());
    mem.mmap()
        .write_slice(&d, GuestAddress(DESC + u64::from(i) * 16))
        .expect("descriptor");
}

fn eventfd() -> OwnedFd {
    let e = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).expect("eventfd");
    e.as_fd().try_clone_to_owned().expect("dup")
}

fn chain_to_iovecs(c: &mut Criterion) {
    let mem = memory();
    let table = DescTable {
        addr: DESC,
        size: SIZE,
    };
    // A one-descriptor TX frame and a two-descriptor one (header + data).
    put_desc(&mem, 0, 0x10_000, 76, 0, 0);
    put_desc(&mem, 1, 0x11_000, 12, 1, 2);
    put_desc(&mem, 2, 0x12_000, 1514, 0, 0);
    let mut seg = Segments::with_capacity(4);
    c.bench_function("chain walk, 1 descriptor", |b| {
        b.iter(|| {
            seg.clear();
            chain::walk(&mem, table, black_box(0), Access::DeviceReads, &mut seg).expect("walk");
            black_box(seg.len)
        })
    });
    c.bench_function("chain walk, 2 descriptors", |b| {
        b.iter(|| {
            seg.clear();
            chain::walk(&mem, table, black_box(1), Access::DeviceReads, &mut seg).expect("walk");
            black_box(seg.len)
        })
    });
}

fn used_ring_publish(c: &mut Criterion) {
    let mem = memory();
    let cfg = QueueConfig {
        ring: tapir_state::RingAddresses::try_from(tapir_state::RawRingAddresses {
            size: SIZE,
            desc: DESC,
            avail: AVAIL,
            used: USED,
        })
        .expect("ring addresses"),
        positions: tapir_state::RingPositions::default(),
        kick: eventfd(),
        call: eventfd(),
    };
    let mut q = Virtqueue::new(1, cfg, true, &mem).expect("queue");
    let mut head = 0u16;
    c.bench_function("used ring: add one + notification check", |b| {
        b.iter(|| {
            head = (head + 1) % SIZE;
            q.add_used(black_box(head), 0).expect("add_used");
            black_box(q.needs_notification())
        })
    });
    c.bench_function("used ring: add 32 + one notification check", |b| {
        b.iter(|| {
            for _ in 0..32 {
                head = (head + 1) % SIZE;
                q.add_used(black_box(head), 0).expect("add_used");
            }
            black_box(q.needs_notification())
        })
    });
}

criterion_group!(benches, chain_to_iovecs, used_ring_publish);
criterion_main!(benches);
