//! `MemoryTable` operations (replace, add, remove, va_to_gpa, map) with arbitrary regions
//! over real fds (64 KiB and 4 KiB memfds, an eventfd), checked against a model of the table:
//! every operation's result and the table after it match the model (a refused operation
//! changes nothing), translations match, and a table that maps gives a `GuestMemory` with
//! exactly its regions, every byte of which can be read (a region longer than its file must
//! be refused by `map`, not SIGBUS the reader: issue 9 item 3).
//!
//! With `TAPIR_FUZZ_SKIP_KNOWN=1`, `map` is skipped while a region is longer than its file
//! (the open SIGBUS and bitmap-size crashes).
//!
//! Input: up to 32 operations, each an op (u8 % 5) and its fields: a region is guest
//! address, size, frontend address, offset (each a u8 choice of typical values or a raw
//! u64) and an fd kind (u8).
#![no_main]

use std::os::fd::OwnedFd;

use libfuzzer_sys::fuzz_target;
use tapir_fuzz::{eventfd, fd_count, memfd, Input};
use tapir_vhost_user::memory_table::{Added, MemoryTable, Region, TableError, MAX_MEM_SLOTS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    guest: u64,
    size: u64,
    user: u64,
    offset: u64,
}

impl Place {
    fn valid(&self) -> bool {
        self.size != 0
            && self.guest.checked_add(self.size).is_some()
            && self.user.checked_add(self.size).is_some()
            && self.offset.checked_add(self.size).is_some()
    }
    fn same(&self, o: &Place) -> bool {
        self.guest == o.guest && self.size == o.size && self.user == o.user
    }
}

fn value(input: &mut Input, typical: &[u64]) -> u64 {
    let c = usize::from(input.u8());
    match typical.get(c % (typical.len() + 2)) {
        Some(&v) => v,
        None if c % (typical.len() + 2) == typical.len() => 0x1000 * u64::from(input.u8()),
        None => input.u64(),
    }
}

fn place(input: &mut Input) -> Place {
    Place {
        guest: value(input, &[0, 0x10000, 0x20000, 0x1_0000_0000]),
        size: value(input, &[0x10000, 0x1000, 0x8000]),
        user: value(input, &[0x7f00_0000_0000, 0x7f00_0001_0000, 0]),
        offset: value(input, &[0, 0x1000, 0x8000]),
    }
}

fn fd(input: &mut Input) -> OwnedFd {
    match input.u8() % 3 {
        0 => memfd(0x10000),
        1 => memfd(0x1000),
        _ => eventfd(),
    }
}

fn region(p: Place, fd: OwnedFd) -> Region {
    Region {
        guest_addr: p.guest,
        size: p.size,
        user_addr: p.user,
        mmap_offset: p.offset,
        fd,
    }
}

/// True when the region lies within its file (and is not absurdly large).
fn backed(r: &Region) -> bool {
    let len = nix::sys::stat::fstat(&r.fd).map_or(0, |st| st.st_size);
    let len = u64::try_from(len).unwrap_or(0);
    r.mmap_offset
        .checked_add(r.size)
        .is_some_and(|end| end <= len)
        || len == 0
}

fn places(t: &MemoryTable) -> Vec<Place> {
    t.regions()
        .iter()
        .map(|r| Place {
            guest: r.guest_addr,
            size: r.size,
            user: r.user_addr,
            offset: r.mmap_offset,
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let baseline = fd_count();
    {
        let mut input = Input::new(data);
        let mut table = MemoryTable::default();
        let mut model: Vec<Place> = Vec::new();
        for _ in 0..32 {
            if input.is_empty() {
                break;
            }
            match input.u8() % 5 {
                0 => {
                    let n = usize::from(input.u8() % 5);
                    let ps: Vec<Place> = (0..n).map(|_| place(&mut input)).collect();
                    let regions = ps.iter().map(|&p| region(p, fd(&mut input))).collect();
                    let r = table.replace(regions);
                    if !ps.iter().all(Place::valid) || ps.len() > MAX_MEM_SLOTS {
                        assert!(r.is_err(), "replace took an invalid table {ps:?}");
                    }
                    // A table that maps replaces the old one; one that does not leaves it.
                    if r.is_ok() {
                        model = ps;
                    }
                }
                1 => {
                    let p = place(&mut input);
                    let r = table.add(region(p, fd(&mut input)));
                    if !p.valid() {
                        assert!(matches!(r, Err(TableError::InvalidRegion { .. })), "{r:?}");
                    } else if model.iter().any(|m| m.same(&p)) {
                        assert!(
                            matches!(r, Ok(Added::Unchanged)),
                            "re-adding changes nothing: {r:?}"
                        );
                    } else if model.len() >= MAX_MEM_SLOTS {
                        assert!(matches!(r, Err(TableError::TooManyRegions)), "{r:?}");
                    } else if matches!(r, Ok(Added::Mapped(_))) {
                        model.push(p);
                    } else {
                        // Refused (overlap, a file too short, mapping failed): not kept.
                        assert!(r.is_err(), "add of {p:?}: {r:?}");
                    }
                }
                2 => {
                    // Mostly a region that is there.
                    let pick = usize::from(input.u8());
                    let p = match model.get(pick % (model.len() + 1)) {
                        Some(&p) => p,
                        None => place(&mut input),
                    };
                    let r = table.remove(p.guest, p.size, p.user);
                    let at = model.iter().position(|m| m.same(&p));
                    match (&r, at) {
                        (Ok(_), Some(i)) => {
                            model.remove(i);
                        }
                        (Err(TableError::NoSuchRegion(_)), None) => {}
                        // The rest no longer maps: the region stays.
                        (Err(_), Some(_)) => {}
                        (r, at) => panic!("remove {p:?} at {at:?}: {r:?}"),
                    }
                }
                3 => {
                    let base = match model.get(usize::from(input.u8()) % (model.len() + 1)) {
                        Some(p) => p.user,
                        None => 0,
                    };
                    let va = base.wrapping_add(value(&mut input, &[0, 0xfff, 0x1000, 0xffff]));
                    let want = model
                        .iter()
                        .find(|m| va >= m.user && va - m.user < m.size)
                        .map(|m| m.guest + (va - m.user));
                    assert_eq!(table.va_to_gpa(va), want, "va_to_gpa({va:#x})");
                }
                _ => {
                    if tapir_fuzz::skip_known() && !table.regions().iter().all(backed) {
                        // Open: a region longer than its file SIGBUSes the reader, a huge one
                        // aborts on its bitmap (issue 9 items 3 and 4).
                        continue;
                    }
                    if let Ok(mem) = table.map() {
                        assert_eq!(
                            mem.mmap().num_regions(),
                            model.len(),
                            "one mapping per region"
                        );
                        for m in &model {
                            let r = mem
                                .mmap()
                                .find_region(GuestAddress(m.guest))
                                .expect("a mapped region is in the memory");
                            assert_eq!(r.len(), m.size, "mapped size");
                            // Every byte of a mapped region is backed by its file: touch both
                            // ends.
                            let mut b = [0u8; 1];
                            mem.mmap()
                                .read_slice(&mut b, GuestAddress(m.guest))
                                .expect("first byte");
                            mem.mmap()
                                .read_slice(&mut b, GuestAddress(m.guest + m.size - 1))
                                .expect("last byte");
                        }
                    }
                }
            }
            assert_eq!(places(&table), model, "table and model agree");
        }
    }
    assert_eq!(fd_count(), baseline, "fds leaked");
});
