//! The vhost-user dirty log: `DirtyLog::map` of a memfd with arbitrary file length, log size
//! and offset, then `mark`, `mark_all` (over guest memory with arbitrary region placement,
//! up to the top of the address space) and `flush` (of datapath marks at arbitrary ranges),
//! checked against a model bitmap: each call never panics, never loops without end, counts
//! what it did, and afterwards the log file holds exactly the model's bits (a bit beyond the
//! log is dropped, not written elsewhere). A log longer than its file must be refused by
//! `map` rather than SIGBUS a later mark (issue 9 item 3).
//!
//! With `TAPIR_FUZZ_SKIP_KNOWN=1`, logs longer than their file are skipped (the open SIGBUS).
//!
//! Input: file length (u8 choice), log size (u8 choice or u64), log offset (u8 choice or
//! u64), two guest regions (guest address choice or u64, size in pages u8), then up to 32
//! operations: op (u8 % 3) and its address/length fields.
#![no_main]

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;

use libfuzzer_sys::fuzz_target;
use tapir_datapath::GuestMemory;
use tapir_datapath::MemoryRegionSpec;
use tapir_fuzz::{fd_count, memfd, Input};
use tapir_vhost_user::dirty_log::{DirtyLog, LOG_PAGE};

fn guest_addr(input: &mut Input) -> u64 {
    match input.u8() % 4 {
        0 => 0,
        1 => 0x10_0000 * u64::from(input.u8()),
        2 => u64::MAX - 0x1000 * u64::from(input.u8()),
        _ => input.u64(),
    }
}

/// Bits the log records for page `page` given its length in bytes.
fn recorded(page: u64, log_len: u64) -> bool {
    (page / 64 + 1)
        .checked_mul(8)
        .is_some_and(|end| end <= log_len)
}

fuzz_target!(|data: &[u8]| {
    let baseline = fd_count();
    {
        let mut input = Input::new(data);
        let file_len = match input.u8() % 4 {
            0 => 0x1000,
            1 => 0x2000,
            2 => 8,
            _ => u64::from(input.u16()),
        };
        let log_len = match input.u8() % 4 {
            0 => file_len,
            1 => 0x1000,
            2 => u64::from(input.u16()),
            _ => input.u64(),
        };
        let log_offset = match input.u8() % 3 {
            0 => 0,
            1 => 0x1000,
            _ => input.u64(),
        };
        if tapir_fuzz::skip_known()
            && log_offset
                .checked_add(log_len)
                .is_none_or(|end| end > file_len)
        {
            // Open: a log longer than its file SIGBUSes the first mark (issue 9 item 3).
            return;
        }
        let fd = memfd(file_len);
        let file_fd = fd.try_clone().expect("dup");
        let Ok(log) = DirtyLog::map(fd, log_len, log_offset) else {
            return;
        };
        // Guest memory: up to two regions anywhere (each of its own memfd).
        let mut specs = Vec::new();
        for _ in 0..(1 + input.u8() % 2) {
            let guest = guest_addr(&mut input);
            let size = LOG_PAGE * u64::from(1 + input.u8() % 16);
            specs.push(MemoryRegionSpec {
                guest_addr: guest,
                size,
                fd: memfd(size),
                file_offset: 0,
            });
        }
        let placed: Vec<(u64, u64)> = specs.iter().map(|s| (s.guest_addr, s.size)).collect();
        let mem = GuestMemory::from_regions(specs).ok();
        let mut bits: BTreeSet<u64> = BTreeSet::new();
        for _ in 0..32 {
            if input.is_empty() {
                break;
            }
            match input.u8() % 3 {
                0 => {
                    let gpa = match input.u8() % 3 {
                        0 => u64::from(input.u16()) * LOG_PAGE,
                        1 => u64::from(input.u32()),
                        _ => input.u64(),
                    };
                    log.mark(gpa);
                    bits.insert(gpa / LOG_PAGE);
                }
                1 => {
                    let Some(mem) = &mem else { continue };
                    let n = log.mark_all(mem);
                    let mut want = 0;
                    // The model: every page number the region touches, up to the log's end.
                    let pages = log_len.saturating_mul(8);
                    for &(base, size) in &placed {
                        let Some(last) = size.checked_sub(1).and_then(|s| base.checked_add(s))
                        else {
                            continue;
                        };
                        let first = base / LOG_PAGE;
                        let last = (last / LOG_PAGE).min(pages.saturating_sub(1));
                        if first >= pages {
                            continue;
                        }
                        for page in first..=last {
                            bits.insert(page);
                        }
                        want += last - first + 1;
                    }
                    assert_eq!(
                        n, want,
                        "mark_all counts every page of guest memory the log covers"
                    );
                }
                _ => {
                    let Some(mem) = &mem else { continue };
                    let addr = match input.u8() % 2 {
                        0 => placed[0].0.wrapping_add(u64::from(input.u16())),
                        _ => input.u64(),
                    };
                    let len = usize::from(input.u16());
                    mem.mark_dirty(addr, len);
                    // The model: the bytes of the range inside each region (a hole before
                    // or between regions is skipped, not the end of the range), tracked
                    // as the region's bitmap does, a page per 4 KiB from the region's start;
                    // each such page is flushed as every guest page it overlaps (two when
                    // the region is not page aligned), so no written guest page is lost.
                    // Counted once per guest page: two regions off a page boundary can
                    // share one (their pages come sorted, a repeat is dropped).
                    let mut flushed = BTreeSet::new();
                    for &(base, size) in &placed {
                        let start = addr.max(base);
                        let end = addr
                            .saturating_add(len as u64)
                            .min(base.saturating_add(size));
                        if start < end {
                            let region_end = base.saturating_add(size);
                            let first = (start - base) / LOG_PAGE;
                            let last = (end - 1 - base) / LOG_PAGE;
                            let mut guest = BTreeSet::new();
                            for page in first..=last {
                                let lo = base + page * LOG_PAGE;
                                let hi = lo.saturating_add(LOG_PAGE).min(region_end) - 1;
                                guest.insert(lo / LOG_PAGE);
                                guest.insert(hi / LOG_PAGE);
                            }
                            // Soundness, independent of the bitmap's granularity: the guest
                            // pages of the first and last byte written are among them.
                            assert!(guest.contains(&(start / LOG_PAGE)));
                            assert!(guest.contains(&((end - 1) / LOG_PAGE)));
                            bits.extend(guest.iter().copied());
                            flushed.extend(guest);
                        }
                    }
                    assert_eq!(
                        log.flush(mem),
                        flushed.len(),
                        "flush moves each dirty page once"
                    );
                }
            }
        }
        // The file holds exactly the recorded bits.
        let readable = file_len.saturating_sub(log_offset).min(log_len);
        let mut content = vec![0u8; usize::try_from(readable).unwrap_or(0)];
        if !content.is_empty() {
            let off = libc::off_t::try_from(log_offset).expect("offset within the file");
            let n = nix::sys::uio::pread(&file_fd, &mut content, off).expect("pread");
            content.truncate(n);
        }
        let _ = file_fd.as_raw_fd();
        // The model's bits as bytes (built from the set: a bit per page it holds), compared
        // whole; a difference is then found bit by bit for the message.
        let mut want = vec![0u8; content.len()];
        for &page in &bits {
            let Some(byte) = usize::try_from(page / 8).ok().and_then(|i| want.get_mut(i)) else {
                break;
            };
            if recorded(page, log_len) {
                *byte |= 1 << (page % 8);
            }
        }
        if content != want {
            for (i, (got, want)) in content.iter().zip(&want).enumerate() {
                for b in 0..8 {
                    let page = i as u64 * 8 + b;
                    assert_eq!(got >> b & 1, want >> b & 1, "log bit of page {page}");
                }
            }
        }
    }
    assert_eq!(fd_count(), baseline, "fds leaked");
});
