//! The frontend's memory table: regions with their guest-physical and frontend-virtual
//! addresses (vring addresses arrive as frontend virtual addresses), mapped into a
//! [`GuestMemory`] for the datapath.

#![deny(clippy::indexing_slicing)]

use std::os::fd::{AsFd, OwnedFd};

use tapir_datapath::{GuestMemory, MemoryError};
use tapir_datapath::{MemoryRegionSpec, MAX_GUEST_MEMORY};

/// Most regions tapir accepts (`VHOST_USER_GET_MAX_MEM_SLOTS`).
pub const MAX_MEM_SLOTS: usize = 32;

/// One region of the frontend's memory table.
#[derive(Debug)]
pub struct Region {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Where the frontend maps it (its virtual address).
    pub user_addr: u64,
    /// Offset of the region in `fd`.
    pub mmap_offset: u64,
    /// The backing fd.
    pub fd: OwnedFd,
}

impl Region {
    fn same_place(&self, guest_addr: u64, size: u64, user_addr: u64) -> bool {
        self.guest_addr == guest_addr && self.size == size && self.user_addr == user_addr
    }
}

/// Errors of the memory table.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// More regions than [`MAX_MEM_SLOTS`].
    #[error("more than {MAX_MEM_SLOTS} memory regions")]
    TooManyRegions,
    /// A region that is empty or whose end overflows.
    #[error("invalid memory region: guest {guest:#x} size {size:#x}")]
    InvalidRegion {
        /// Guest-physical start.
        guest: u64,
        /// Size.
        size: u64,
    },
    /// Regions larger, together, than the datapath maps.
    #[error("memory regions of {0:#x} bytes in all (at most {MAX_GUEST_MEMORY:#x})")]
    TooLarge(u64),
    /// A region to remove that is not in the table.
    #[error("no memory region at guest {0:#x} to remove")]
    NoSuchRegion(u64),
    /// Mapping failed (overlapping regions, mmap errors).
    #[error(transparent)]
    Map(#[from] MemoryError),
    /// An fd could not be duplicated.
    #[error("dup: {0}")]
    Dup(#[source] std::io::Error),
}

/// The memory table.
#[derive(Debug, Default)]
pub struct MemoryTable {
    regions: Vec<Region>,
}

impl MemoryTable {
    /// The regions.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// True when no region is set.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Replaces the whole table (`SET_MEM_TABLE`) and returns its mapping (`None` for an
    /// empty table). Nothing changes if the new table is refused or cannot be mapped.
    pub fn replace(&mut self, regions: Vec<Region>) -> Result<Option<GuestMemory>, TableError> {
        check_all(&regions)?;
        let old = std::mem::replace(&mut self.regions, regions);
        self.map_or_undo(|t| t.regions = old)
    }

    /// Replaces the whole table without mapping it (a handoff successor whose device runs
    /// on memory mapped already); the regions are checked as [`MemoryTable::replace`] does.
    pub fn restore(&mut self, regions: Vec<Region>) -> Result<(), TableError> {
        check_all(&regions)?;
        self.regions = regions;
        Ok(())
    }

    /// Adds a region (`ADD_MEM_REG`) and returns the new mapping; adding one that is already
    /// there (same guest address, size and frontend address, as QEMU does per queue pair)
    /// changes nothing. A region that is refused or cannot be mapped is not kept.
    pub fn add(&mut self, region: Region) -> Result<Added, TableError> {
        check(&region)?;
        if self
            .regions
            .iter()
            .any(|r| r.same_place(region.guest_addr, region.size, region.user_addr))
        {
            return Ok(Added::Unchanged);
        }
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(TableError::TooManyRegions);
        }
        self.regions.push(region);
        if let Err(e) = check_all(&self.regions) {
            self.regions.pop();
            return Err(e);
        }
        let mapped = self.map_or_undo(|t| {
            t.regions.pop();
        })?;
        Ok(mapped.map_or(Added::Unchanged, Added::Mapped))
    }

    /// Removes the region at this place (`REM_MEM_REG`) and returns the new mapping (`None`
    /// once the table is empty).
    pub fn remove(
        &mut self,
        guest_addr: u64,
        size: u64,
        user_addr: u64,
    ) -> Result<Option<GuestMemory>, TableError> {
        let at = self
            .regions
            .iter()
            .position(|r| r.same_place(guest_addr, size, user_addr))
            .ok_or(TableError::NoSuchRegion(guest_addr))?;
        let removed = self.regions.remove(at);
        self.map_or_undo(move |t| t.regions.insert(at, removed))
    }

    /// Maps the table as it is now; if that fails, `undo` puts the previous table back.
    fn map_or_undo(
        &mut self,
        undo: impl FnOnce(&mut MemoryTable),
    ) -> Result<Option<GuestMemory>, TableError> {
        if self.regions.is_empty() {
            return Ok(None);
        }
        match self.map() {
            Ok(m) => Ok(Some(m)),
            Err(e) => {
                undo(self);
                Err(e)
            }
        }
    }

    /// Maps the table for the datapath (fds are duplicated: the table keeps its own).
    pub fn map(&self) -> Result<GuestMemory, TableError> {
        let mut specs = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            specs.push(MemoryRegionSpec {
                guest_addr: r.guest_addr,
                size: r.size,
                fd: r.fd.as_fd().try_clone_to_owned().map_err(TableError::Dup)?,
                file_offset: r.mmap_offset,
            });
        }
        Ok(GuestMemory::from_regions(specs)?)
    }

    /// Translates a frontend virtual address into a guest-physical one.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .and_then(|r| r.guest_addr.checked_add(va - r.user_addr))
    }
}

/// What [`MemoryTable::add`] did.
#[derive(Debug)]
pub enum Added {
    /// The region was there already.
    Unchanged,
    /// The region is in, and this is the new mapping.
    Mapped(GuestMemory),
}

fn check_all(regions: &[Region]) -> Result<(), TableError> {
    if regions.len() > MAX_MEM_SLOTS {
        return Err(TableError::TooManyRegions);
    }
    let mut total = 0u64;
    for r in regions {
        check(r)?;
        total = total.saturating_add(r.size);
    }
    if total > MAX_GUEST_MEMORY {
        return Err(TableError::TooLarge(total));
    }
    Ok(())
}

fn check(r: &Region) -> Result<(), TableError> {
    let bad = r.size == 0
        || r.size > MAX_GUEST_MEMORY
        || r.guest_addr.checked_add(r.size).is_none()
        || r.user_addr.checked_add(r.size).is_none()
        || r.mmap_offset.checked_add(r.size).is_none();
    if bad {
        return Err(TableError::InvalidRegion {
            guest: r.guest_addr,
            size: r.size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> OwnedFd {
        let fd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        nix::unistd::ftruncate(&fd, 0x10_0000).unwrap();
        fd
    }

    fn region(guest_addr: u64, size: u64, user_addr: u64) -> Region {
        Region {
            guest_addr,
            size,
            user_addr,
            mmap_offset: 0,
            fd: fd(),
        }
    }

    #[test]
    fn disjoint_regions_in_descending_order_are_taken() {
        let mut t = MemoryTable::default();
        let mem = t
            .replace(vec![
                region(0x10_0000, 0x1000, 0x7000_0010_0000),
                region(0, 0x1000, 0x7000_0000_0000),
            ])
            .expect("descending regions")
            .expect("a mapping");
        assert!(mem.contains(0, 0x1000) && mem.contains(0x10_0000, 0x1000));
        assert_eq!(t.regions().len(), 2);
        match t.add(region(0x8000, 0x1000, 0x7000_0000_8000)).unwrap() {
            Added::Mapped(m) => assert!(m.contains(0x8000, 0x1000)),
            Added::Unchanged => panic!("a new region changed nothing"),
        }
    }

    #[test]
    fn a_refused_region_is_not_kept() {
        let mut t = MemoryTable::default();
        assert!(matches!(
            t.add(region(0, 0x2000, 0x1000)).unwrap(),
            Added::Mapped(_)
        ));
        // Overlaps the first in guest space: vm-memory refuses to map it.
        assert!(t.add(region(0x1000, 0x2000, 0x10_0000)).is_err());
        assert_eq!(t.regions().len(), 1);
        assert!(matches!(
            t.remove(0x1000, 0x2000, 0x10_0000),
            Err(TableError::NoSuchRegion(0x1000))
        ));
        // Longer than its file (1 MiB).
        assert!(t.add(region(0x10_0000, 0x20_0000, 0x20_0000)).is_err());
        assert_eq!(t.regions().len(), 1);
        // A refused table leaves the old one.
        assert!(t
            .replace(vec![region(0, 0x1000, 0), region(0, 0x1000, 0x5000)])
            .is_err());
        assert_eq!(t.regions().len(), 1);
        assert_eq!(t.va_to_gpa(0x1000), Some(0));
    }

    #[test]
    fn huge_regions_are_refused_before_anything_is_mapped() {
        let mut t = MemoryTable::default();
        assert!(matches!(
            t.add(region(0, 1 << 62, 0)),
            Err(TableError::InvalidRegion { .. })
        ));
        let half = MAX_GUEST_MEMORY / 2 + 0x1000;
        assert!(matches!(
            t.replace(vec![region(0, half, 0), region(half, half, half)]),
            Err(TableError::TooLarge(_))
        ));
        assert!(t.is_empty());
    }

    #[test]
    fn translates_frontend_addresses_through_the_right_region() {
        let mut t = MemoryTable::default();
        t.replace(vec![
            region(0, 0xa0000, 0x7f00_0000_0000),
            region(0x10_0000, 0x10_0000, 0x7f00_0010_0000),
        ])
        .unwrap();
        assert_eq!(t.va_to_gpa(0x7f00_0000_1000), Some(0x1000));
        assert_eq!(t.va_to_gpa(0x7f00_0010_0010), Some(0x10_0010));
        assert_eq!(
            t.va_to_gpa(0x7f00_000a_0000),
            None,
            "the hole between regions"
        );
        assert_eq!(t.va_to_gpa(0x7f00_0020_0000), None, "one past the end");
    }

    #[test]
    fn adding_a_region_twice_changes_nothing_and_removing_an_unknown_one_fails() {
        let mut t = MemoryTable::default();
        assert!(matches!(
            t.add(region(0, 0x1000, 0x1000)).unwrap(),
            Added::Mapped(_)
        ));
        assert!(
            matches!(t.add(region(0, 0x1000, 0x1000)).unwrap(), Added::Unchanged),
            "QEMU re-adds per queue pair"
        );
        assert_eq!(t.regions().len(), 1);
        assert!(matches!(
            t.remove(0x5000, 0x1000, 0),
            Err(TableError::NoSuchRegion(0x5000))
        ));
        t.remove(0, 0x1000, 0x1000).unwrap();
        assert!(t.is_empty());
    }

    #[test]
    fn refuses_empty_and_overflowing_regions_and_too_many() {
        let mut t = MemoryTable::default();
        assert!(t.add(region(0, 0, 0)).is_err());
        assert!(t.add(region(u64::MAX - 10, 0x1000, 0)).is_err());
        let many = (0..=MAX_MEM_SLOTS as u64)
            .map(|i| region(i << 20, 0x1000, i << 20))
            .collect();
        assert!(matches!(t.replace(many), Err(TableError::TooManyRegions)));
    }
}
