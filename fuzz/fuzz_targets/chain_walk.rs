//! The descriptor-chain walker (`tapir_datapath::testing::chain::walk`) over a guest-written memory
//! image, direct and indirect tables: it never panics, every iovec lies inside guest memory
//! (both as a guest range and as a host range of the mapping), lengths add up, and a refused
//! chain leaves the caller's segments exactly as they were.
//!
//! Input: head (u16), flags (u8: bit 0 device writes, bit 1 the table elsewhere in memory,
//! bit 2 a non-empty `out` to append to, bit 3 an unvalidated table address, only with
//! `TAPIR_FUZZ_RAW_TABLE=1`), table size (u8, 0 means 16), table address (u64, bits 1 and
//! 3), then the image, written at 0x1000 (the table; 0x2000 is a good place for an
//! indirect one). Memory: 64 KiB at 0, a hole, 32 KiB at 0x20000.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tapir_datapath::testing::chain::{self, Access, DescTable, Segments};
use tapir_datapath::GuestMemory;
use tapir_fuzz::{guest_memory, inside_mapping, inside_regions, write_clipped, Input, REGIONS};

const TABLE: u64 = 0x1000;

/// `TAPIR_FUZZ_RAW_TABLE=1` lets flag bit 3 pass a table address `Virtqueue::new` never
/// validated (anything, up to `u64::MAX`): off by default, since it finds the open overflow
/// at chain.rs:161 at once (fuzz/artifacts-found/chain_walk/).
fn raw_tables() -> bool {
    static RAW: OnceLock<bool> = OnceLock::new();
    *RAW.get_or_init(|| std::env::var_os("TAPIR_FUZZ_RAW_TABLE").is_some_and(|v| v == "1"))
}

fn memory() -> &'static GuestMemory {
    static MEM: OnceLock<GuestMemory> = OnceLock::new();
    MEM.get_or_init(guest_memory)
}

fuzz_target!(|data: &[u8]| {
    let mem = memory();
    let mut input = Input::new(data);
    let head = input.u16();
    let flags = input.u8();
    let size = match input.u8() {
        0 => 16,
        n => u16::from(n),
    };
    let far_table = input.u64();
    let image = input.rest();
    write_clipped(mem, TABLE, image);

    let access = if flags & 1 == 1 {
        Access::DeviceWrites
    } else {
        Access::DeviceReads
    };
    let addr = if flags & 8 == 8 && raw_tables() {
        // A table nobody validated (see raw_tables).
        far_table
    } else if flags & 2 == 2 {
        // Anywhere in memory, as `Virtqueue::new` guarantees a table is.
        let span = REGIONS[0].1 - u64::from(size) * 16;
        far_table % span
    } else {
        TABLE
    };
    let mut seg = Segments::default();
    if flags & 4 == 4 {
        // Something a previous chain left: a walk appends, a refusal keeps it.
        seg.iov.push(libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 7,
        });
        seg.gpa.push((0xdead_0000, 7));
        seg.len = 7;
    }
    let before = (seg.iov.len(), seg.gpa.clone(), seg.len);
    let result = chain::walk(mem, DescTable { addr, size }, head, access, &mut seg);
    match result {
        Ok(()) => {
            assert_eq!(seg.iov.len(), seg.gpa.len(), "one gpa per iovec");
            assert!(seg.iov.len() > before.0, "an accepted chain has a buffer");
            assert!(
                seg.iov.len() - before.0 <= chain::MAX_SEGMENTS,
                "segment limit"
            );
            let mut total = 0u64;
            for (iov, &(gpa, l)) in seg.iov[before.0..].iter().zip(&seg.gpa[before.0..]) {
                assert_eq!(iov.iov_len as u64, u64::from(l), "iovec and gpa lengths");
                assert!(l > 0, "zero-length pieces are skipped");
                assert!(
                    inside_regions(gpa, u64::from(l)),
                    "piece {gpa:#x}+{l:#x} outside guest memory"
                );
                assert!(
                    inside_mapping(mem, iov.iov_base.cast(), iov.iov_len),
                    "iovec outside the mapping"
                );
                total += u64::from(l);
            }
            assert_eq!(
                u64::from(seg.len),
                u64::from(before.2) + total,
                "lengths add up"
            );
        }
        Err(_) => {
            assert_eq!(seg.iov.len(), before.0, "a refusal leaves no iovec behind");
            assert_eq!(seg.gpa, before.1, "a refusal leaves no gpa behind");
            assert_eq!(seg.len, before.2, "a refusal leaves the length");
        }
    }
    // Next input starts from zeroed memory.
    write_clipped(mem, TABLE, &vec![0u8; image.len()]);
});
