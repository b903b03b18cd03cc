//! Descriptor chains to host iovecs, once for both directions (virtio 1.2 §2.7.5).
//!
//! A guest can write anything into its descriptor table. The walker never panics and never
//! produces an iovec outside guest memory: every descriptor is read with a checked load
//! (through the queue's [`RingView`] for its own table, through the memory map for an
//! indirect one), every buffer is translated through the memory map, and each rule below is
//! a [`ChainError`].
//! Guest values never index, slice or overflow unchecked here (the lints below insist).

#![deny(clippy::indexing_slicing, clippy::arithmetic_side_effects)]

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use crate::ring_view::RingView;

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;
const DESC_SIZE_U32: u32 = 16;

/// Which way the device moves bytes through a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// The device reads (TX): every descriptor must be device-readable.
    DeviceReads,
    /// The device writes (RX): every descriptor must be device-writable.
    DeviceWrites,
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index past the queue (or indirect table) size.
    #[error("descriptor index {index} out of range (table size {size})")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// The table size.
        size: u16,
    },
    /// More descriptors than the table holds: the chain loops.
    #[error("descriptor chain loops or exceeds its table")]
    Loop,
    /// A descriptor in the wrong direction (a write-only TX buffer, a read-only RX buffer).
    #[error("descriptor {index} has the wrong direction for this queue")]
    WrongDirection {
        /// The offending descriptor.
        index: u16,
    },
    /// A buffer or table not backed by guest memory.
    #[error("descriptor {index} points outside guest memory ({addr:#x}+{len:#x})")]
    OutOfMemory {
        /// The offending descriptor.
        index: u16,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The total length exceeds 4 GiB (virtio 1.2 §2.7.5.2 forbids it).
    #[error("descriptor chain longer than 4 GiB")]
    LengthOverflow,
    /// An indirect table inside an indirect table, both INDIRECT and NEXT set, or a table whose
    /// length is zero or not a multiple of 16.
    #[error("invalid indirect descriptor: {0}")]
    Indirect(&'static str),
    /// More buffers than the kernel accepts in one readv/writev.
    #[error("descriptor chain has more than {0} buffers")]
    TooManySegments(usize),
    /// No bytes at all.
    #[error("empty descriptor chain")]
    Empty,
    /// A TX chain shorter than the 12-byte virtio-net header.
    #[error("TX chain of {0} bytes is shorter than the virtio-net header")]
    ShorterThanHeader(u32),
    /// A TX chain longer than the header plus the largest frame a TAP takes
    /// ([`MAX_GSO_FRAME`](crate::features::MAX_GSO_FRAME)).
    #[error("TX chain of {0} bytes is longer than the header and the largest frame")]
    LongerThanFrame(u32),
}

/// Host buffers of one chain (reused across chains: no per-packet allocation).
#[derive(Debug, Default)]
pub struct Segments {
    /// Host iovecs, in chain order.
    pub iov: Vec<libc::iovec>,
    /// Guest-physical address and length of each iovec (for dirty logging).
    pub gpa: Vec<(u64, u32)>,
    /// Total bytes.
    pub len: u32,
}

// SAFETY: the iovecs point into the process-wide guest mapping (or buffers owned next to
// them), which mean the same on every thread; `Segments` has no thread affinity.
unsafe impl Send for Segments {}

impl Segments {
    /// Empty segments with room for `cap` buffers.
    pub fn with_capacity(cap: usize) -> Segments {
        Segments {
            iov: Vec::with_capacity(cap),
            gpa: Vec::with_capacity(cap),
            len: 0,
        }
    }

    /// Forgets all buffers.
    pub fn clear(&mut self) {
        self.iov.clear();
        self.gpa.clear();
        self.len = 0;
    }
}

/// The most buffers one chain may have (the kernel's `UIO_MAXIOV`).
pub const MAX_SEGMENTS: usize = 1024;

/// Where a queue's descriptor table is.
#[derive(Clone, Copy, Debug)]
pub struct DescTable {
    /// Guest-physical address.
    pub addr: u64,
    /// Number of descriptors.
    pub size: u16,
}

/// Where descriptors are read from: a queue's own table through its host view, or a table
/// (an indirect one, or any, for tests and fuzzing) through the memory map.
#[derive(Clone, Copy)]
enum Table<'a> {
    Ring(&'a RingView),
    Guest(DescTable),
}

impl Table<'_> {
    fn size(&self) -> u16 {
        match self {
            Table::Ring(v) => v.size(),
            Table::Guest(t) => t.size,
        }
    }

    /// Descriptor `index` (below `size()`: checked by the caller).
    fn read(&self, mem: &GuestMemory, index: u16) -> Result<Descriptor, ChainError> {
        match self {
            Table::Ring(v) => v.descriptor(index).ok_or(ChainError::IndexOutOfRange {
                index,
                size: v.size(),
            }),
            Table::Guest(t) => {
                // A table address is the guest's (an indirect one) or the frontend's: checked.
                let desc_addr = u64::from(index)
                    .checked_mul(DESC_SIZE)
                    .and_then(|off| t.addr.checked_add(off))
                    .ok_or(ChainError::OutOfMemory {
                        index,
                        addr: t.addr,
                        len: DESC_SIZE_U32,
                    })?;
                mem.mmap()
                    .read_obj(GuestAddress(desc_addr))
                    .map_err(|_| ChainError::OutOfMemory {
                        index,
                        addr: desc_addr,
                        len: DESC_SIZE_U32,
                    })
            }
        }
    }
}

/// Walks the chain starting at `head` of the table at `table` (read through the memory
/// map), appending its buffers to `out` (which is not cleared, so several chains can be
/// gathered into one read). Zero-length descriptors are skipped. (The datapath walks a
/// queue's own table through its view; this is for tests and fuzz targets.)
#[cfg(any(test, feature = "test-utils"))]
pub fn walk(
    mem: &GuestMemory,
    table: DescTable,
    head: u16,
    access: Access,
    out: &mut Segments,
) -> Result<(), ChainError> {
    walk_from(mem, Table::Guest(table), head, access, out)
}

/// [`walk`], reading the queue's own descriptor table through its host view.
pub(crate) fn walk_ring(
    mem: &GuestMemory,
    ring: &RingView,
    head: u16,
    access: Access,
    out: &mut Segments,
) -> Result<(), ChainError> {
    walk_from(mem, Table::Ring(ring), head, access, out)
}

fn walk_from(
    mem: &GuestMemory,
    table: Table<'_>,
    head: u16,
    access: Access,
    out: &mut Segments,
) -> Result<(), ChainError> {
    let start = out.iov.len();
    let result = walk_inner(mem, table, head, access, out);
    if result.is_err() {
        // A refused chain leaves `out` as it found it.
        out.iov.truncate(start);
        out.gpa.truncate(start);
    }
    result
}

fn walk_inner(
    mem: &GuestMemory,
    table: Table<'_>,
    head: u16,
    access: Access,
    out: &mut Segments,
) -> Result<(), ChainError> {
    let mut table = table;
    let mut index = head;
    let mut budget = u32::from(table.size());
    let mut indirect = false;
    let mut total = 0u32;
    let start_segments = out.iov.len();
    loop {
        if index >= table.size() {
            return Err(ChainError::IndexOutOfRange {
                index,
                size: table.size(),
            });
        }
        if budget == 0 {
            return Err(ChainError::Loop);
        }
        budget = budget.saturating_sub(1);
        let desc = table.read(mem, index)?;
        if desc.refers_to_indirect_table() {
            if indirect {
                return Err(ChainError::Indirect("nested indirect table"));
            }
            if desc.has_next() {
                return Err(ChainError::Indirect("INDIRECT together with NEXT"));
            }
            let len = desc.len();
            if len == 0 || u64::from(len) % DESC_SIZE != 0 || u64::from(len) / DESC_SIZE > 0xffff {
                return Err(ChainError::Indirect(
                    "table length not a non-zero multiple of 16",
                ));
            }
            let table_addr = desc.addr().0;
            if !mem.contains(table_addr, u64::from(len)) {
                return Err(ChainError::OutOfMemory {
                    index,
                    addr: table_addr,
                    len,
                });
            }
            indirect = true;
            let entries = u16::try_from(u64::from(len) / DESC_SIZE)
                .map_err(|_| ChainError::Indirect("table longer than 65535 entries"))?;
            table = Table::Guest(DescTable {
                addr: table_addr,
                size: entries,
            });
            budget = u32::from(entries);
            index = 0;
            continue;
        }
        let writable = desc.is_write_only();
        if writable != (access == Access::DeviceWrites) {
            return Err(ChainError::WrongDirection { index });
        }
        let len = desc.len();
        if len > 0 {
            total = total.checked_add(len).ok_or(ChainError::LengthOverflow)?;
            push_buffer(mem, index, desc.addr().0, len, out)?;
            if out.iov.len().saturating_sub(start_segments) > MAX_SEGMENTS {
                return Err(ChainError::TooManySegments(MAX_SEGMENTS));
            }
        }
        if !desc.has_next() {
            break;
        }
        index = desc.next();
    }
    if total == 0 {
        return Err(ChainError::Empty);
    }
    out.len = out
        .len
        .checked_add(total)
        .ok_or(ChainError::LengthOverflow)?;
    Ok(())
}

/// Appends the host pieces of descriptor `index`'s buffer `[addr, addr + len)` to `out`.
fn push_buffer(
    mem: &GuestMemory,
    index: u16,
    addr: u64,
    len: u32,
    out: &mut Segments,
) -> Result<(), ChainError> {
    if let Some(ptr) = mem.host_range(addr, len) {
        // The common case: the buffer lies in one region.
        out.iov.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: len as usize,
        });
        out.gpa.push((addr, len));
        return Ok(());
    }
    let before = out.iov.len();
    let pushed = mem.translate(addr, len, |ptr, l| {
        out.iov.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: l,
        });
    });
    if pushed.is_err() {
        return Err(ChainError::OutOfMemory { index, addr, len });
    }
    // Record the guest address of each piece (a buffer spanning two regions gives two).
    let mut piece_addr = addr;
    for iov in out.iov.get(before..).unwrap_or_default() {
        // Each piece is at most `len` (a u32) long.
        let piece_len = u32::try_from(iov.iov_len).unwrap_or(len);
        out.gpa.push((piece_addr, piece_len));
        // Inside guest memory (translate succeeded): cannot wrap.
        piece_addr = piece_addr.wrapping_add(iov.iov_len as u64);
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegionSpec;
    use std::fs::File;

    const TABLE: u64 = 0x1000;

    fn mem() -> GuestMemory {
        let fd =
            nix::sys::memfd::memfd_create(c"t", nix::sys::memfd::MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(0x10000).unwrap();
        GuestMemory::from_regions(vec![MemoryRegionSpec {
            guest_addr: 0,
            size: 0x10000,
            fd: file.into(),
            file_offset: 0,
        }])
        .unwrap()
    }

    fn put(mem: &GuestMemory, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.mmap()
            .write_obj(d, GuestAddress(table + u64::from(i) * 16))
            .unwrap();
    }

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    const T: DescTable = DescTable {
        addr: TABLE,
        size: 8,
    };

    #[test]
    fn walks_a_two_descriptor_chain() {
        let m = mem();
        put(&m, TABLE, 0, 0x4000, 12, NEXT, 3);
        put(&m, TABLE, 3, 0x5000, 100, 0, 0);
        let mut s = Segments::default();
        walk(&m, T, 0, Access::DeviceReads, &mut s).unwrap();
        assert_eq!(s.len, 112);
        assert_eq!(s.gpa, vec![(0x4000, 12), (0x5000, 100)]);
    }

    #[test]
    fn refuses_malformed_chains() {
        let m = mem();
        let mut s = Segments::default();
        // A loop.
        put(&m, TABLE, 0, 0x4000, 10, NEXT, 1);
        put(&m, TABLE, 1, 0x4000, 10, NEXT, 0);
        assert_eq!(
            walk(&m, T, 0, Access::DeviceReads, &mut s),
            Err(ChainError::Loop)
        );
        // Out of guest memory.
        put(&m, TABLE, 0, 0xfff0, 0x20, 0, 0);
        assert!(matches!(
            walk(&m, T, 0, Access::DeviceReads, &mut s),
            Err(ChainError::OutOfMemory { .. })
        ));
        // Address overflow.
        put(&m, TABLE, 0, u64::MAX - 8, 0x20, 0, 0);
        assert!(walk(&m, T, 0, Access::DeviceReads, &mut s).is_err());
        // Write-only TX buffer.
        put(&m, TABLE, 0, 0x4000, 10, WRITE, 0);
        assert_eq!(
            walk(&m, T, 0, Access::DeviceReads, &mut s),
            Err(ChainError::WrongDirection { index: 0 })
        );
        // next out of range.
        put(&m, TABLE, 0, 0x4000, 10, NEXT, 200);
        assert!(matches!(
            walk(&m, T, 0, Access::DeviceReads, &mut s),
            Err(ChainError::IndexOutOfRange { index: 200, .. })
        ));
        // Lengths that overflow 4 GiB.
        put(&m, TABLE, 0, 0x4000, u32::MAX, NEXT, 1);
        put(&m, TABLE, 1, 0x4000, 2, 0, 0);
        assert!(walk(&m, T, 0, Access::DeviceReads, &mut s).is_err());
        // Empty.
        put(&m, TABLE, 0, 0x4000, 0, 0, 0);
        assert_eq!(
            walk(&m, T, 0, Access::DeviceReads, &mut s),
            Err(ChainError::Empty)
        );
        assert!(s.iov.is_empty() && s.gpa.is_empty() && s.len == 0);
    }

    #[test]
    fn indirect_tables() {
        let m = mem();
        let ind = 0x2000;
        put(&m, ind, 0, 0x4000, 12, WRITE | NEXT, 1);
        put(&m, ind, 1, 0x5000, 1500, WRITE, 0);
        put(&m, TABLE, 0, ind, 32, INDIRECT, 0);
        let mut s = Segments::default();
        walk(&m, T, 0, Access::DeviceWrites, &mut s).unwrap();
        assert_eq!(s.len, 1512);
        // Nested indirect.
        put(&m, ind, 1, ind, 32, INDIRECT, 0);
        assert!(matches!(
            walk(&m, T, 0, Access::DeviceWrites, &mut Segments::default()),
            Err(ChainError::Indirect(_))
        ));
        // Bad table length.
        put(&m, TABLE, 0, ind, 33, INDIRECT, 0);
        assert!(matches!(
            walk(&m, T, 0, Access::DeviceWrites, &mut Segments::default()),
            Err(ChainError::Indirect(_))
        ));
    }
}
