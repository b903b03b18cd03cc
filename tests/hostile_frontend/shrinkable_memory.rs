//! Guest memory behind the two kinds of fd issue 9 item 3 names: a hugetlbfs file (as DPDK's
//! virtio-user backs its memory: it can shrink, so the SIGBUS guard must catch the daemon's
//! next touch once it is truncated after SET_MEM_TABLE) and a memfd sealed against shrinking
//! (QEMU's memfd backend: taken as it is, it cannot shrink). The rings live in that memory
//! (empty: all zero), so a kick makes a worker read them.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use super::{on_both_engines, Serve};

const HUGE_PAGE: u64 = 2 << 20;
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
const QUEUE_SIZE: u16 = 256;
const F_VERSION_1: u64 = 1 << 32;

/// A hugetlbfs mount in a temporary directory with `pages` huge pages reserved for it; drop
/// unmounts it and puts `nr_hugepages` back, also when the test fails.
struct Hugetlbfs {
    dir: PathBuf,
    old_pages: String,
}

impl Hugetlbfs {
    /// None when the kernel has no hugetlbfs (the caller skips, saying so).
    fn mount(pages: u64) -> Option<Hugetlbfs> {
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap();
        if !filesystems
            .lines()
            .any(|l| l.trim_end().ends_with("hugetlbfs"))
        {
            return None;
        }
        let old_pages = std::fs::read_to_string(NR_HUGEPAGES)
            .unwrap()
            .trim()
            .to_owned();
        let old: u64 = old_pages.parse().unwrap();
        let dir = std::env::temp_dir().join(format!("tapir-hugetlbfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // From here on `Drop` restores whatever was changed.
        let fs = Hugetlbfs { dir, old_pages };
        std::fs::write(NR_HUGEPAGES, (old + pages).to_string()).unwrap();
        let free = meminfo("HugePages_Free:");
        assert!(
            free >= pages,
            "only {free} huge pages free after reserving {pages}"
        );
        let target = std::ffi::CString::new(fs.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mount(2) with valid C strings; no memory is shared with the kernel after.
        let rc = unsafe {
            libc::mount(
                c"tapir-test".as_ptr(),
                target.as_ptr(),
                c"hugetlbfs".as_ptr(),
                0,
                c"pagesize=2M".as_ptr().cast(),
            )
        };
        assert_eq!(
            rc,
            0,
            "mount hugetlbfs: {}",
            std::io::Error::last_os_error()
        );
        Some(fs)
    }

    /// A file of `len` bytes (a multiple of the huge page size) in the mount.
    fn file(&self, name: &str, len: u64) -> File {
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join(name))
            .unwrap();
        f.set_len(len).unwrap();
        f
    }
}

impl Drop for Hugetlbfs {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let target = std::ffi::CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: umount2(2) of the mount made in `mount`, by path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
        let _ = std::fs::write(NR_HUGEPAGES, &self.old_pages);
    }
}

fn meminfo(key: &str) -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Queue `i`'s rings: RX at 0, 0x1000, 0x2000; TX at 0x4000, 0x5000, 0x6000.
fn ring_addrs(i: u64) -> (u64, u64, u64) {
    let base = i * 0x4000;
    (base, base + 0x1000, base + 0x2000)
}

/// Attaches one region of `len` bytes of `fd` at guest address 0 with both rings of pair 0
/// in it; returns the kick eventfds.
fn attach_rings(fe: &mut Frontend, fd: &impl AsRawFd, len: u64) -> Vec<EventFd> {
    let offered = fe.get_features().unwrap();
    fe.set_features((offered & F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
        .unwrap();
    fe.get_protocol_features().unwrap();
    fe.set_protocol_features(
        VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    )
    .unwrap();
    fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.set_owner().unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: len,
        // Ring addresses are frontend addresses: the same as guest addresses here.
        userspace_addr: 0,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    }])
    .unwrap();
    let mut kicks = Vec::new();
    for i in 0..2usize {
        let (desc, avail, used) = ring_addrs(i as u64);
        fe.set_vring_num(i, QUEUE_SIZE).unwrap();
        fe.set_vring_addr(
            i,
            &VringConfigData {
                queue_max_size: QUEUE_SIZE,
                queue_size: QUEUE_SIZE,
                flags: 0,
                desc_table_addr: desc,
                used_ring_addr: used,
                avail_ring_addr: avail,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(i, 0).unwrap();
        let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        fe.set_vring_call(i, &call).unwrap();
        fe.set_vring_kick(i, &kick).unwrap();
        fe.set_vring_enable(i, true).unwrap();
        kicks.push(kick);
    }
    kicks
}

/// Kicks both rings until the daemon reports a session whose memory broke (None after 10 s).
fn kick_until_broken(serve: &mut Serve, kicks: &[EventFd]) -> Option<String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        for k in kicks {
            k.write(1).unwrap();
        }
        if let Ok(l) = serve.events.recv_timeout(Duration::from_millis(20)) {
            if l.contains("memory_broken") {
                return Some(l);
            }
        }
    }
    None
}

/// A hugetlbfs file truncated after SET_MEM_TABLE: the worker's next read of the rings
/// faults, the guard maps zeroes there, the session ends; the daemon serves the next
/// frontend, and its fd count is back at the baseline.
#[test]
fn a_hugetlbfs_file_truncated_after_set_mem_table_ends_the_session_not_the_daemon() {
    let Some(fs) = Hugetlbfs::mount(4) else {
        // In CI this fails: the capability must be there.
        let _ = tapir_testkit::capability::absent(
            tapir_testkit::capability::Capability::Hugetlbfs,
            "no hugetlbfs or no free huge pages".into(),
        );
        eprintln!("SKIPPED: this kernel has no hugetlbfs");
        return;
    };
    on_both_engines(&[], |serve, engine| {
        let file = fs.file(&format!("guest-{engine}"), HUGE_PAGE);
        let mut fe = serve.connect();
        let kicks = attach_rings(&mut fe, &file, HUGE_PAGE);
        serve.wait_event("\"running\":[0]");
        file.set_len(0).unwrap();
        let line = kick_until_broken(serve, &kicks).unwrap_or_else(|| {
            serve.assert_alive(engine);
            panic!("{engine}: the session on the truncated hugetlbfs file never ended")
        });
        assert!(line.contains("\"faults\""), "{line}");
        serve.wait_event("disconnected");
        serve.assert_alive(engine);
        drop(fe);
        drop(file);
        serve.still_serves(engine);
    });
    drop(fs);
}

/// A memfd sealed against shrinking (F_SEAL_SHRINK, as QEMU's memfd backend seals) is taken
/// as it is: the session runs, nobody can truncate it, kicks break nothing.
#[test]
fn a_memfd_sealed_against_shrinking_is_accepted_as_it_is() {
    on_both_engines(&[], |serve, engine| {
        let fd: OwnedFd = nix::sys::memfd::memfd_create(
            c"tapir-sealed",
            nix::sys::memfd::MFdFlags::MFD_CLOEXEC | nix::sys::memfd::MFdFlags::MFD_ALLOW_SEALING,
        )
        .unwrap();
        nix::unistd::ftruncate(&fd, 0x10_0000).unwrap();
        // SAFETY: F_ADD_SEALS on a memfd we own.
        let rc = unsafe {
            libc::fcntl(
                fd.as_fd().as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let mut fe = serve.connect();
        let kicks = attach_rings(&mut fe, &fd, 0x10_0000);
        serve.wait_event("\"running\":[0]");
        assert_eq!(
            nix::unistd::ftruncate(&fd, 0),
            Err(nix::errno::Errno::EPERM),
            "{engine}: the seal holds"
        );
        for k in &kicks {
            k.write(1).unwrap();
        }
        let quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(500) {
            if let Ok(l) = serve.events.recv_timeout(Duration::from_millis(50)) {
                assert!(
                    !l.contains("memory_broken") && !l.contains("disconnected"),
                    "{engine}: {l}"
                );
            }
        }
        serve.assert_alive(engine);
        drop(fe);
        serve.wait_event("disconnected");
        serve.still_serves(engine);
    });
}
