//! The frontend's memory table: regions with their guest-physical and frontend-virtual
//! addresses (vring addresses arrive as frontend virtual addresses), mapped into a
//! [`GuestMemory`] for the datapath.

use std::os::fd::{AsFd, OwnedFd};

use tapir_datapath::memory::MemoryRegionSpec;
use tapir_datapath::{GuestMemory, MemoryError};

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

    /// Replaces the whole table (`SET_MEM_TABLE`).
    pub fn replace(&mut self, regions: Vec<Region>) -> Result<(), TableError> {
        if regions.len() > MAX_MEM_SLOTS {
            return Err(TableError::TooManyRegions);
        }
        for r in &regions {
            check(r)?;
        }
        self.regions = regions;
        Ok(())
    }

    /// Adds a region (`ADD_MEM_REG`); adding one that is already there (same guest address,
    /// size and frontend address, as QEMU does per queue pair) changes nothing. Returns
    /// whether the table changed.
    pub fn add(&mut self, region: Region) -> Result<bool, TableError> {
        check(&region)?;
        if self
            .regions
            .iter()
            .any(|r| r.same_place(region.guest_addr, region.size, region.user_addr))
        {
            return Ok(false);
        }
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(TableError::TooManyRegions);
        }
        self.regions.push(region);
        Ok(true)
    }

    /// Removes the region at this place (`REM_MEM_REG`).
    pub fn remove(&mut self, guest_addr: u64, size: u64, user_addr: u64) -> Result<(), TableError> {
        let before = self.regions.len();
        self.regions
            .retain(|r| !r.same_place(guest_addr, size, user_addr));
        if self.regions.len() == before {
            return Err(TableError::NoSuchRegion(guest_addr));
        }
        Ok(())
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
            .map(|r| r.guest_addr + (va - r.user_addr))
    }
}

fn check(r: &Region) -> Result<(), TableError> {
    let bad = r.size == 0
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
        nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap()
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
        assert!(t.add(region(0, 0x1000, 0x1000)).unwrap());
        assert!(
            !t.add(region(0, 0x1000, 0x1000)).unwrap(),
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
