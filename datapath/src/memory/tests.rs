//! Mapping, translation and the dirty log against real memfds.

use super::*;
use std::io::Write;
use vm_memory::Bytes;

fn memfd(size: u64) -> OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"tapir-test", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .unwrap();
    let file = File::from(fd);
    file.set_len(size).unwrap();
    file.into()
}

#[test]
fn translate_splits_and_refuses_holes() {
    let fd = memfd(0x4000);
    let fd2 = fd.try_clone().unwrap();
    // Two regions, contiguous in guest space, at different file offsets.
    let mem = GuestMemory::from_regions(vec![
        MemoryRegionSpec {
            guest_addr: 0,
            size: 0x2000,
            fd,
            file_offset: 0,
        },
        MemoryRegionSpec {
            guest_addr: 0x2000,
            size: 0x2000,
            fd: fd2,
            file_offset: 0x2000,
        },
    ])
    .unwrap();
    let mut pieces = Vec::new();
    mem.translate(0x1ff0, 0x20, |p, l| pieces.push((p as usize, l)))
        .unwrap();
    assert_eq!(
        pieces.iter().map(|p| p.1).collect::<Vec<_>>(),
        vec![0x10, 0x10]
    );
    assert!(mem.translate(0x3ff0, 0x20, |_, _| {}).is_err());
    assert!(mem.translate(u64::MAX - 4, 8, |_, _| {}).is_err());
    let _ = File::from(memfd(1)).write(b"x");
}

#[test]
fn write_bytes_writes_and_logs_within_and_across_regions() {
    let mem = GuestMemory::from_regions(vec![
        spec(0, 0x2000, memfd(0x2000), 0),
        spec(0x2000, 0x2000, memfd(0x2000), 0),
    ])
    .unwrap();
    let _ = mem.take_dirty_log();
    let here = DirtyLogging::Here;
    mem.write_bytes(0x10, &[1, 2], here).unwrap();
    mem.write_bytes(0x1fff, &[3, 4], here).unwrap();
    let got: [u8; 2] = mem.mmap().read_obj(GuestAddress(0x1fff)).unwrap();
    assert_eq!(got, [3, 4]);
    assert_eq!(mem.take_dirty_log(), vec![0, 0x1000, 0x2000]);
    mem.write_bytes(0x3000, &[7], DirtyLogging::ByCaller)
        .unwrap();
    assert!(mem.take_dirty_log().is_empty(), "left to the caller");
    assert!(mem.write_bytes(0x3fff, &[5, 6], here).is_err());
    assert!(mem.write_bytes(u64::MAX, &[5], here).is_err());
}

#[test]
fn dirty_log_collects_pages() {
    let mem = GuestMemory::from_regions(vec![MemoryRegionSpec {
        guest_addr: 0x10_0000,
        size: 0x10000,
        fd: memfd(0x10000),
        file_offset: 0,
    }])
    .unwrap();
    mem.mark_dirty(0x10_0ff0, 0x20);
    assert_eq!(mem.take_dirty_log(), vec![0x10_0000, 0x10_1000]);
    assert!(mem.take_dirty_log().is_empty());
}

#[test]
fn a_dirty_range_that_starts_in_a_hole_marks_the_region_after_it() {
    // dirty_log fuzz finding 10: bytes outside guest memory are skipped, not the rest of
    // the range.
    let mem = GuestMemory::from_regions(vec![
        spec(0x1000, 0x1000, memfd(0x1000), 0),
        spec(0x8000, 0x2000, memfd(0x2000), 0),
    ])
    .unwrap();
    mem.mark_dirty(0x3000, 0x5800);
    assert_eq!(mem.take_dirty_log(), vec![0x8000]);
    mem.mark_dirty(0, 0x10000);
    assert_eq!(mem.take_dirty_log(), vec![0x1000, 0x8000, 0x9000]);
    mem.mark_dirty(0x3000, 0x1000);
    mem.mark_dirty(u64::MAX - 0x10, 0x100);
    assert!(mem.take_dirty_log().is_empty());
}

#[test]
fn a_region_not_page_aligned_logs_every_guest_page_a_write_touches() {
    // A region at 0x800: its first bitmap page holds guest bytes 0x800..0x1800, which lie
    // in guest pages 0 and 1; the log is kept in guest pages.
    let mem = GuestMemory::from_regions(vec![spec(0x800, 0x2000, memfd(0x2000), 0)]).unwrap();
    mem.mark_dirty(0x17f0, 0x8);
    assert_eq!(mem.take_dirty_log(), vec![0, 0x1000]);
    mem.mark_dirty(0x27f0, 0x10);
    assert_eq!(mem.take_dirty_log(), vec![0x1000, 0x2000]);
    mem.mark_dirty(0x800, 0x2000);
    assert_eq!(mem.take_dirty_log(), vec![0, 0x1000, 0x2000]);
}

#[test]
fn two_regions_off_a_page_boundary_report_the_guest_page_they_share_once() {
    // dirty_log fuzz finding 11 (the target's model counted it once per region).
    let mem = GuestMemory::from_regions(vec![
        spec(0x800, 0x1000, memfd(0x1000), 0),
        spec(0x1800, 0x1000, memfd(0x1000), 0),
    ])
    .unwrap();
    mem.mark_dirty(0x800, 0x2000);
    assert_eq!(mem.take_dirty_log(), vec![0, 0x1000, 0x2000]);
}

fn spec(guest_addr: u64, size: u64, fd: OwnedFd, file_offset: u64) -> MemoryRegionSpec {
    MemoryRegionSpec {
        guest_addr,
        size,
        fd,
        file_offset,
    }
}

#[test]
fn regions_in_descending_order_are_mapped() {
    let fd = memfd(0x4000);
    let fd2 = fd.try_clone().unwrap();
    let mem = GuestMemory::from_regions(vec![
        spec(0x10_0000, 0x2000, fd, 0x2000),
        spec(0, 0x2000, fd2, 0),
    ])
    .unwrap();
    assert!(mem.contains(0, 0x2000) && mem.contains(0x10_0000, 0x2000));
}

#[test]
fn regions_beyond_their_file_or_too_large_are_refused() {
    let short = GuestMemory::from_regions(vec![spec(0, 0x2000, memfd(0x1000), 0)]);
    assert!(matches!(short, Err(MemoryError::Fd(_))), "{short:?}");
    let past = GuestMemory::from_regions(vec![spec(0, 0x1000, memfd(0x1000), 0x1000)]);
    assert!(matches!(past, Err(MemoryError::Fd(_))), "{past:?}");
    let huge = GuestMemory::from_regions(vec![spec(0, 1 << 62, memfd(1 << 62), 0)]);
    assert!(
        matches!(huge, Err(MemoryError::TooLarge { .. })),
        "{huge:?}"
    );
    let half = MAX_GUEST_MEMORY / 2 + 0x1000;
    let fd = memfd(2 * half);
    let fd2 = fd.try_clone().unwrap();
    let sum = GuestMemory::from_regions(vec![spec(0, half, fd, 0), spec(half, half, fd2, half)]);
    assert!(matches!(sum, Err(MemoryError::TooLarge { .. })), "{sum:?}");
}

#[test]
fn a_file_truncated_under_the_mapping_breaks_the_memory_not_the_process() {
    let fd = memfd(0x4000);
    let keep = fd.try_clone().unwrap();
    let mem = GuestMemory::from_regions(vec![spec(0, 0x4000, fd, 0)]).unwrap();
    mem.mmap().write_obj(7u32, GuestAddress(0x3000)).unwrap();
    assert!(!mem.is_broken());
    nix::unistd::ftruncate(&keep, 0).unwrap();
    let v: u32 = mem.mmap().read_obj(GuestAddress(0x3000)).unwrap();
    assert_eq!(v, 0, "the lost page reads as zeroes");
    assert!(mem.is_broken());
}
