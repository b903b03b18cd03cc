//! Property test of the descriptor-chain walker against arbitrary guest-written descriptor
//! tables (direct and indirect): it never panics, never yields a byte outside guest memory, and
//! what it yields adds up.

use std::fs::File;

use proptest::prelude::*;
use tapir_datapath::testing::chain::{self, Access, DescTable, Segments};
use tapir_datapath::{GuestMemory, MemoryRegionSpec};
use vm_memory::{Bytes, GuestAddress};

const REGION0: (u64, u64) = (0, 0x10000);
const REGION1: (u64, u64) = (0x20000, 0x8000);
const TABLE: u64 = 0x1000;
const INDIRECT: u64 = 0x2000;

fn memory() -> GuestMemory {
    let fd = nix::sys::memfd::memfd_create(c"fuzz", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .expect("memfd");
    let file = File::from(fd);
    file.set_len(REGION0.1 + REGION1.1).expect("size");
    let fd2 = file.try_clone().expect("dup");
    GuestMemory::from_regions(vec![
        MemoryRegionSpec {
            guest_addr: REGION0.0,
            size: REGION0.1,
            fd: file.into(),
            file_offset: 0,
        },
        MemoryRegionSpec {
            guest_addr: REGION1.0,
            size: REGION1.1,
            fd: fd2.into(),
            file_offset: REGION0.1,
        },
    ])
    .expect("map")
}

fn inside(addr: u64, len: u64) -> bool {
    [REGION0, REGION1].iter().any(|&(base, size)| {
        addr >= base && addr.checked_add(len).is_some_and(|end| end <= base + size)
    })
}

/// Descriptor addresses biased towards interesting values: in memory, at region ends, in the
/// hole, the indirect table, anything.
fn addr() -> impl Strategy<Value = u64> {
    prop_oneof![
        0u64..0x30000,
        Just(0xfff0u64),
        Just(0x1fff0u64),
        Just(0x27ff0u64),
        Just(INDIRECT),
        any::<u64>(),
    ]
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..0x2000,
        Just(16u32),
        Just(32u32),
        Just(0xffff_fff0u32),
        any::<u32>()
    ]
}

fn desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (addr(), len(), 0u16..8, prop_oneof![0u16..16, any::<u16>()])
}

fn write_desc(mem: &GuestMemory, base: u64, i: u64, d: (u64, u32, u16, u16)) {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&d.0.to_le_bytes());
    b[8..12].copy_from_slice(&d.1.to_le_bytes());
    b[12..14].copy_from_slice(&d.2.to_le_bytes());
    b[14..].copy_from_slice(&d.3.to_le_bytes());
    mem.mmap()
        .write_slice(&b, GuestAddress(base + 16 * i))
        .expect("write descriptor");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn walker_is_total_and_stays_in_memory(
        table in proptest::collection::vec(desc(), 16),
        indirect in proptest::collection::vec(desc(), 8),
        head in prop_oneof![0u16..16, any::<u16>()],
        writes in any::<bool>(),
    ) {
        let mem = memory();
        for (i, d) in (0u64..).zip(&table) {
            write_desc(&mem, TABLE, i, *d);
        }
        for (i, d) in (0u64..).zip(&indirect) {
            write_desc(&mem, INDIRECT, i, *d);
        }
        let access = if writes { Access::DeviceWrites } else { Access::DeviceReads };
        let mut seg = Segments::default();
        let result = chain::walk(&mem, DescTable { addr: TABLE, size: 16 }, head, access, &mut seg);
        match result {
            Ok(()) => {
                prop_assert!(seg.len > 0);
                prop_assert_eq!(seg.iov.len(), seg.gpa.len());
                let mut total = 0u64;
                for (iov, &(gpa, l)) in seg.iov.iter().zip(&seg.gpa) {
                    prop_assert_eq!(u64::try_from(iov.iov_len).ok(), Some(u64::from(l)));
                    prop_assert!(inside(gpa, u64::from(l)), "piece {:#x}+{:#x} outside memory", gpa, l);
                    total += u64::from(l);
                }
                prop_assert_eq!(total, u64::from(seg.len));
            }
            Err(_) => {
                // A refused chain leaves nothing behind.
                prop_assert!(seg.iov.is_empty() && seg.gpa.is_empty() && seg.len == 0);
            }
        }
    }
}
