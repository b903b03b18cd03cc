//! Which guest bytes a device may write, and the check that it wrote no others: a byte map
//! over [`REGIONS`] and a snapshot of guest memory to compare against. The queue-pair targets
//! keep one [`Writable`] for the whole process ([`Writable::start`] per input): fresh 96 KiB
//! buffers per input were a tenth of `rx_pair`'s time (allocation, page faults,
//! AddressSanitizer's poisoning on free).

use tapir_datapath::testing::chain::{walk, Access, DescTable, Segments};
use tapir_datapath::GuestMemory;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::REGIONS;

/// Bytes of guest memory compared at once when looking for a change.
const CHUNK: usize = 4096;
/// Inside a changed chunk, bytes compared at once before looking at single bytes.
const BLOCK: usize = 64;

/// Which guest bytes the device may write (a byte map over [`REGIONS`]: region 0's bytes,
/// then region 1's), and guest memory as it was after the last check.
///
/// Every change of guest memory must be seen by this: the device's through
/// [`first_forbidden_write`](Self::first_forbidden_write) after each device action, the
/// guest's announced with [`guest_wrote`](Self::guest_wrote). That is what lets
/// [`allow_chains`](Self::allow_chains) skip walking bytes it walked before.
pub struct Writable {
    map: Vec<bool>,
    snapshot: Vec<u8>,
    /// The table the chains were last walked from, `None` when memory changed since.
    walked: Option<(u64, u16)>,
}

impl Default for Writable {
    fn default() -> Self {
        Writable {
            map: vec![false; total_len()],
            snapshot: Vec::new(),
            walked: None,
        }
    }
}

/// Guest memory's size ([`REGIONS`] added up).
fn total_len() -> usize {
    usize::try_from(REGIONS.iter().map(|r| r.1).sum::<u64>()).expect("small")
}

/// Each region of [`REGIONS`] as guest address, offset in the flattened image, and its bytes
/// in `mem`'s mapping.
///
/// The slices alias guest memory: only read them while nothing writes guest memory (the
/// targets drive the pair on their own thread; no workers run).
fn regions(mem: &GuestMemory) -> impl Iterator<Item = (u64, usize, &[u8])> {
    let mut flat = 0usize;
    REGIONS.iter().map(move |&(base, size)| {
        let size = usize::try_from(size).expect("small");
        let host = mem
            .mmap()
            .get_host_address(GuestAddress(base))
            .expect("a mapped region");
        // SAFETY: `host..host + size` is one region of `mem`'s mapping, alive as long as
        // `mem` (which the slice borrows); the targets read it only while nothing writes
        // guest memory (see above).
        let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), size) };
        let at = flat;
        flat += size;
        (base, at, bytes)
    })
}

impl Writable {
    /// Allows nothing, and takes guest memory as it is now (for a new input; the buffers are
    /// kept).
    pub fn start(&mut self, mem: &GuestMemory) {
        self.map.fill(false);
        self.guest_wrote(mem);
    }

    /// The guest changed its memory (not the device): takes it as it is now.
    pub fn guest_wrote(&mut self, mem: &GuestMemory) {
        self.snapshot.clear();
        for (_, _, now) in regions(mem) {
            self.snapshot.extend_from_slice(now);
        }
        self.walked = None;
    }

    /// Allows `[addr, addr + len)` (the parts inside guest memory).
    pub fn allow(&mut self, addr: u64, len: u64) {
        let end = addr.saturating_add(len);
        let mut flat = 0u64;
        for &(base, size) in &REGIONS {
            let start = addr.max(base);
            let stop = end.min(base + size);
            if start < stop {
                let from = usize::try_from(flat + start - base).expect("small");
                let to = usize::try_from(flat + stop - base).expect("small");
                self.map[from..to].fill(true);
            }
            flat += size;
        }
    }

    /// Allows every buffer of every chain a device-writes walk accepts from the table. A
    /// walk reads only guest memory and the table, so when neither changed since the last
    /// call, the walks would allow exactly what they allowed then: they are skipped.
    pub fn allow_chains(&mut self, mem: &GuestMemory, table: DescTable) {
        if self.walked == Some((table.addr, table.size)) {
            return;
        }
        self.walked = Some((table.addr, table.size));
        let mut seg = Segments::default();
        for head in 0..table.size {
            seg.clear();
            if walk(mem, table, head, Access::DeviceWrites, &mut seg).is_ok() {
                for &(gpa, len) in &seg.gpa {
                    self.allow(gpa, u64::from(len));
                }
            }
        }
    }

    /// The first byte of guest memory that changed since the last check (or
    /// [`start`](Self::start), [`guest_wrote`](Self::guest_wrote)) and is not allowed; the
    /// snapshot is brought up to date (the chunks that changed).
    pub fn first_forbidden_write(&mut self, mem: &GuestMemory) -> Option<u64> {
        let mut found = None;
        for (base, flat, now) in regions(mem) {
            let old = &mut self.snapshot[flat..flat + now.len()];
            for (c, (o, n)) in old.chunks_mut(CHUNK).zip(now.chunks(CHUNK)).enumerate() {
                if o == n {
                    continue;
                }
                self.walked = None;
                if found.is_none() {
                    let start = flat + c * CHUNK;
                    found = first_forbidden_in(o, n, &self.map[start..start + n.len()])
                        .map(|i| base + (c * CHUNK + i) as u64);
                }
                o.copy_from_slice(n);
            }
        }
        found
    }
}

/// The first position where `old` and `new` differ and `ok` does not allow it: blocks of
/// [`BLOCK`] bytes that are equal are skipped whole, the others looked at byte by byte.
fn first_forbidden_in(old: &[u8], new: &[u8], ok: &[bool]) -> Option<usize> {
    old.chunks(BLOCK)
        .zip(new.chunks(BLOCK))
        .enumerate()
        .filter(|(_, (o, n))| o != n)
        .find_map(|(b, (o, n))| {
            let ok = ok.get(b * BLOCK..)?;
            o.iter()
                .zip(n)
                .zip(ok)
                .position(|((x, y), ok)| x != y && !ok)
                .map(|i| b * BLOCK + i)
        })
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;
    use crate::guest_memory;

    #[test]
    fn a_write_to_an_allowed_byte_passes_and_one_beside_it_is_found() {
        let _serial = crate::serial_fd_test();
        let mem = guest_memory();
        let mut w = Writable::default();
        w.start(&mem);
        w.allow(0x100, 4);
        mem.mmap()
            .write_slice(&[1; 4], GuestAddress(0x100))
            .unwrap();
        assert_eq!(w.first_forbidden_write(&mem), None);
        mem.mmap().write_slice(&[1], GuestAddress(0x104)).unwrap();
        assert_eq!(w.first_forbidden_write(&mem), Some(0x104));
        // Seen once: the snapshot is up to date.
        assert_eq!(w.first_forbidden_write(&mem), None);
        mem.mmap().write_slice(&[7], GuestAddress(0x20041)).unwrap();
        assert_eq!(w.first_forbidden_write(&mem), Some(0x20041));
        // The guest's own writes are not the device's.
        mem.mmap().write_slice(&[9], GuestAddress(0x3000)).unwrap();
        w.guest_wrote(&mem);
        assert_eq!(w.first_forbidden_write(&mem), None);
    }

    /// Writes descriptor `i` of the table at `table`.
    fn put(mem: &GuestMemory, table: u64, i: u64, addr: u64, len: u32, flags: u16) {
        let at = table + 16 * i;
        let m = mem.mmap();
        m.write_obj(addr.to_le(), GuestAddress(at)).unwrap();
        m.write_obj(len.to_le(), GuestAddress(at + 8)).unwrap();
        m.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    }

    #[test]
    fn chains_are_walked_again_when_an_indirect_table_changes() {
        const WRITE: u16 = 2;
        const INDIRECT: u16 = 4;
        let _serial = crate::serial_fd_test();
        let mem = guest_memory();
        let table = DescTable { addr: 0, size: 2 };
        put(&mem, 0, 0, 0x8000, 16, INDIRECT);
        put(&mem, 0x8000, 0, 0x9000, 16, WRITE);
        let mut w = Writable::default();
        w.start(&mem);
        w.allow_chains(&mem, table);
        mem.mmap()
            .write_slice(&[1; 16], GuestAddress(0x9000))
            .unwrap();
        assert_eq!(w.first_forbidden_write(&mem), None);
        // The indirect table (far from the descriptor table) now points elsewhere.
        put(&mem, 0x8000, 0, 0xa000, 16, WRITE);
        // (Its first changed byte: 0x9000 -> 0xa000.)
        assert_eq!(w.first_forbidden_write(&mem), Some(0x8001));
        w.allow_chains(&mem, table);
        mem.mmap()
            .write_slice(&[1; 16], GuestAddress(0xa000))
            .unwrap();
        assert_eq!(w.first_forbidden_write(&mem), None);
        // A change no chain points at allows nothing new.
        mem.mmap()
            .write_slice(&[2; 4], GuestAddress(0xc000))
            .unwrap();
        assert_eq!(w.first_forbidden_write(&mem), Some(0xc000));
        w.allow_chains(&mem, table);
        mem.mmap()
            .write_slice(&[3; 4], GuestAddress(0xc000))
            .unwrap();
        assert_eq!(w.first_forbidden_write(&mem), Some(0xc000));
    }
}
