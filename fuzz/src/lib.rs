//! Shared pieces of tapir's fuzz targets: a byte reader that turns the fuzzer's input into
//! fields (and its twin writer, for the seed generator), real memfds and eventfds and a fixed
//! guest memory layout (from tapir-testkit), the process's fd count, and a TAP inside a private network namespace.
//!
//! Every target reads its input with [`Input`]; an exhausted input reads as zeros, so every
//! input is valid and short inputs are the simple cases.

mod writable;

pub use writable::Writable;

use std::os::fd::{AsRawFd, OwnedFd};

use tapir_datapath::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Reads fields off the front of the fuzzer's input; past the end everything is zero.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Input<'a> {
        Input { data }
    }

    /// True once every byte was read.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        self.data
    }

    /// Takes up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// A byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian u16.
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.array())
    }

    /// A little-endian u32.
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian u64.
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A bool (the low bit of a byte).
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A length-prefixed (u16) byte string of at most `max` bytes.
    pub fn blob(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max);
        self.bytes(n)
    }
}

/// Builds inputs in [`Input`]'s format (for the seed generator).
#[derive(Default)]
pub struct Output {
    /// The bytes so far.
    pub data: Vec<u8>,
}

impl Output {
    /// A byte.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.data.push(v);
        self
    }
    /// A little-endian u16.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.data.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u32.
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.data.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// A little-endian u64.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.data.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.data.extend_from_slice(b);
        self
    }
    /// A length-prefixed (u16) byte string.
    pub fn blob(&mut self, b: &[u8]) -> &mut Self {
        self.u16(u16::try_from(b.len()).expect("blob under 64 KiB"));
        self.bytes(b)
    }
}

/// A memfd of `len` bytes.
pub fn memfd(len: u64) -> OwnedFd {
    tapir_testkit::memfd(len).expect("memfd")
}

/// A non-blocking eventfd.
pub fn eventfd() -> OwnedFd {
    tapir_testkit::eventfd().expect("eventfd")
}

/// The fds open in this process now (entries of /proc/self/fd, minus the one reading it,
/// which stays open).
///
/// Read with `getdents64` into a buffer on the stack, from one fd of the directory kept open
/// (rewound each time): `std::fs::read_dir` allocates per entry and opens the directory, and
/// twice per input that was a sixth of the `session` target's time.
pub fn fd_count() -> usize {
    static DIR: std::sync::OnceLock<std::sync::Mutex<OwnedFd>> = std::sync::OnceLock::new();
    let dir = DIR
        .get_or_init(|| {
            let flags = nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC;
            let fd = nix::fcntl::open(c"/proc/self/fd", flags, nix::sys::stat::Mode::empty())
                .expect("/proc/self/fd");
            std::sync::Mutex::new(fd)
        })
        .lock()
        .expect("fd_count lock");
    nix::unistd::lseek(&*dir, 0, nix::unistd::Whence::SeekSet).expect("rewind /proc/self/fd");
    // u64 words: `linux_dirent64` records are 8-byte aligned.
    let mut buf = [0u64; 1024];
    let mut entries = 0usize;
    loop {
        // SAFETY: `buf` is valid for writes of its length for the duration of the call; the
        // kernel writes at most that many bytes of whole records.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                std::mem::size_of_val(&buf),
            )
        };
        let n = usize::try_from(n).expect("getdents64 on /proc/self/fd");
        if n == 0 {
            break;
        }
        // SAFETY: the first `n` bytes of `buf` were just written by the kernel; u8 has no
        // alignment or validity requirements.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), n) };
        let mut at = 0;
        // linux_dirent64: d_ino (u64), d_off (i64), d_reclen (u16), d_type (u8), d_name.
        while at + 19 < n {
            let reclen = usize::from(u16::from_ne_bytes([bytes[at + 16], bytes[at + 17]]));
            let name = &bytes[at + 19..(at + reclen).min(n)];
            let dots = matches!(name, [b'.', 0, ..] | [b'.', b'.', 0, ..]);
            if !dots {
                entries += 1;
            }
            at += reclen.max(1);
        }
    }
    entries.saturating_sub(1)
}

/// The two regions every datapath target maps: 64 KiB at 0 and 32 KiB at 0x20000 (a hole
/// between them), both from one memfd.
pub const REGIONS: [(u64, u64); 2] = [(0, 0x10000), (0x20000, 0x8000)];

/// Guest memory with [`REGIONS`] over one memfd.
pub fn guest_memory() -> GuestMemory {
    tapir_testkit::memfd_guest_memory(&REGIONS).expect("map guest memory")
}

/// True when `[addr, addr + len)` lies inside one of [`REGIONS`].
pub fn inside_regions(addr: u64, len: u64) -> bool {
    REGIONS.iter().any(|&(base, size)| {
        addr >= base && addr.checked_add(len).is_some_and(|end| end <= base + size)
    })
}

/// True when the host range `[ptr, ptr + len)` lies inside one mapped region of `mem`.
pub fn inside_mapping(mem: &GuestMemory, ptr: *const u8, len: usize) -> bool {
    let p = ptr as usize;
    mem.mmap().iter().any(|r| {
        let Ok(host) = r.get_host_address(MemoryRegionAddress(0)) else {
            return false;
        };
        let start = host as usize;
        let Ok(size) = usize::try_from(r.len()) else {
            return false;
        };
        p >= start && p.checked_add(len).is_some_and(|end| end <= start + size)
    })
}

/// Zeroes all of guest memory (between iterations of a target that reuses it).
pub fn zero(mem: &GuestMemory) {
    static ZEROS: [u8; 0x10000] = [0; 0x10000];
    for &(base, size) in &REGIONS {
        let size = usize::try_from(size).expect("small");
        mem.mmap()
            .write_slice(&ZEROS[..size], GuestAddress(base))
            .expect("zero guest memory");
    }
    let _ = mem.take_dirty_log();
}

/// Writes `bytes` at guest address `addr`, clipped to what fits.
pub fn write_clipped(mem: &GuestMemory, addr: u64, bytes: &[u8]) {
    for (i, chunk) in bytes.chunks(256).enumerate() {
        let a = addr + 256 * i as u64;
        let _ = mem.mmap().write_slice(chunk, GuestAddress(a));
    }
}

/// Moves this process into a network namespace of its own (once), so a TAP it opens can
/// never carry traffic anywhere. Needs CAP_SYS_ADMIN (root). Panics if it cannot.
pub fn private_netns() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
            .expect("unshare(CLONE_NEWNET): the session and handoff targets need root");
    });
}

/// Opens a TAP named `name` with `queues` queues in this process's private network namespace
/// (its link stays down: frames written to it go nowhere).
pub fn private_tap(name: &str, queues: usize) -> tapir_datapath::Tap {
    private_netns();
    tapir_datapath::Tap::open(name, queues).expect("open a TAP in the private namespace")
}

/// Raw fd number (for messages in panics).
pub fn raw(fd: &OwnedFd) -> i32 {
    fd.as_raw_fd()
}

/// A valid snapshot of a small device, as the handoff targets' peers describe it: one queue
/// pair of `size` descriptors (RX rings at 0, 0x1000, 0x2000; TX at 0x4000, 0x5000, 0x6000)
/// over one 64 KiB region, and the manifest tapir-migrate lays out: region, TAP, RX kick,
/// RX call, TX kick, TX call (fd indices 0 to 5).
pub fn small_snapshot(size: u16) -> tapir_state::DeviceSnapshot {
    let mut s = tapir_state::example_snapshot();
    s.memory.truncate(1);
    s.memory[0].size = 0x10000;
    s.queue_pairs.truncate(1);
    let p = &mut s.queue_pairs[0];
    p.tap.fd = 1;
    for (q, base, kick) in [(&mut p.rx, 0u64, 2u16), (&mut p.tx, 0x4000, 4)] {
        q.size = size;
        q.desc_table = base;
        q.avail_ring = base + 0x1000;
        q.used_ring = base + 0x2000;
        q.next_avail = 0;
        q.next_used = 0;
        q.signalled_used = None;
        q.in_flight.clear();
        q.kick_fd = kick;
        q.call_fd = kick + 1;
    }
    // Region 0's fd, then pair 0's TAP, kick, call, kick, call.
    s.fds.truncate(1);
    s.fds
        .extend(tapir_state::example_snapshot().fds[2..7].iter().cloned());
    s
}

/// A file the handoff targets hand around as a kind the peer chose: 0 a 64 KiB memfd, 1 an
/// eventfd, 2 a 4 KiB memfd, 3 a duplicate of `tap` (a real TAP queue), others a pipe end.
pub fn fd_of_kind(kind: u8, tap: &OwnedFd) -> OwnedFd {
    match kind % 5 {
        0 => memfd(0x10000),
        1 => eventfd(),
        2 => memfd(0x1000),
        3 => tap.try_clone().expect("dup of the TAP queue"),
        _ => nix::unistd::pipe().expect("pipe").0,
    }
}

/// Applies up to 16 guest patches from the input: each a guest address (u16, times 4, so
/// anywhere in the first 256 KiB) and a u16-length blob of at most 2 KiB. Returns how many.
pub fn patch_guest(mem: &GuestMemory, input: &mut Input) -> usize {
    let n = usize::from(input.u8() % 17);
    for _ in 0..n {
        let addr = u64::from(input.u16()) * 4;
        let blob = input.blob(2048);
        write_clipped(mem, addr, blob);
    }
    n
}

/// `TAPIR_FUZZ_SKIP_KNOWN=1`: targets steer clear of inputs that hit crashes already found
/// and still open (fuzz/artifacts-found/), so that a campaign explores past them instead of
/// restarting on the same crash. Each target documents what it skips; CI does not set it.
pub fn skip_known() -> bool {
    static SKIP: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SKIP.get_or_init(|| std::env::var_os("TAPIR_FUZZ_SKIP_KNOWN").is_some_and(|v| v == "1"))
}

/// Tests that open fds, one at a time (the fd count test sees every fd of the process).
#[cfg(test)]
pub(crate) fn serial_fd_test() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_count_counts_what_read_dir_sees_and_follows_an_open_and_a_close() {
        let _serial = serial_fd_test();
        let by_read_dir = || {
            std::fs::read_dir("/proc/self/fd")
                .expect("/proc/self/fd")
                .count()
                - 1
        };
        let before = fd_count();
        // read_dir also sees the directory fd fd_count keeps open for itself.
        assert_eq!(before + 1, by_read_dir());
        let fds: Vec<OwnedFd> = (0..300).map(|_| eventfd()).collect();
        // More entries than one getdents64 buffer holds.
        assert_eq!(fd_count(), before + 300);
        assert_eq!(fd_count() + 1, by_read_dir());
        drop(fds);
        assert_eq!(fd_count(), before);
    }
}
