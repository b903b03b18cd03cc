//! Guest-memory fixtures: what a VMM hands a device, made from a simulated guest (its memfd
//! regions, its rings, its kick and call eventfds, each duplicated so the device owns its
//! copy), and bare memfds and eventfds for tests that build guest memory by hand.

use std::fs::File;
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd, RawFd};

use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::memfd::{memfd_create, MFdFlags};
use tapir_datapath::{GuestMemory, MemoryRegionSpec, PairResources, QueueConfig};
use tapir_simguest::{SimGuest, VirtqueueInfo};
use tapir_state::{RawRingAddresses, RingAddresses};

/// Errors of building guest-memory fixtures.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// Duplicating one of the guest's fds, creating a memfd or an eventfd.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Mapping the guest's memory.
    #[error(transparent)]
    Memory(#[from] tapir_datapath::MemoryError),
    /// The guest's rings are not where a split ring may be (size, alignment).
    #[error("guest rings: {0}")]
    Ring(#[from] tapir_state::RingError),
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> FixtureError {
    move |source| FixtureError::Io { context, source }
}

/// A memfd of `len` bytes (sparse: nothing is allocated until written).
///
/// # Errors
/// `memfd_create` or `ftruncate` failed.
pub fn memfd(len: u64) -> Result<OwnedFd, FixtureError> {
    let fd =
        memfd_create(c"tapir-testkit", MFdFlags::MFD_CLOEXEC).map_err(|e| FixtureError::Io {
            context: "memfd_create",
            source: e.into(),
        })?;
    let file = File::from(fd);
    file.set_len(len).map_err(io_err("ftruncate of a memfd"))?;
    Ok(file.into())
}

/// A non-blocking eventfd.
///
/// # Errors
/// `eventfd` failed.
pub fn eventfd() -> Result<OwnedFd, FixtureError> {
    EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map(OwnedFd::from)
        .map_err(|e| FixtureError::Io {
            context: "eventfd",
            source: e.into(),
        })
}

/// A duplicate of one of a simulated guest's fds (a region's memfd, a kick or call eventfd),
/// owned by the caller. `fd` must come from a [`SimGuest`] that is alive for the call (the
/// guest's region and queue descriptions carry raw fds the guest owns).
///
/// # Errors
/// `dup` failed.
pub fn dup_guest_fd(fd: RawFd) -> Result<OwnedFd, FixtureError> {
    // SAFETY: by this function's contract `fd` is owned by a live SimGuest for the duration
    // of the call; we only duplicate it.
    unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .map_err(io_err("dup of a guest fd"))
}

/// The guest's memory mapped as a VMM would hand it over (each region's fd duplicated).
///
/// # Errors
/// A `dup` or the mapping failed.
pub fn guest_memory(guest: &SimGuest) -> Result<GuestMemory, FixtureError> {
    let specs = guest
        .regions()
        .iter()
        .map(|r| {
            Ok(MemoryRegionSpec {
                guest_addr: r.guest_addr,
                size: r.size,
                fd: dup_guest_fd(r.fd)?,
                file_offset: r.file_offset,
            })
        })
        .collect::<Result<Vec<_>, FixtureError>>()?;
    Ok(GuestMemory::from_regions(specs)?)
}

/// Guest memory over one memfd: `regions` (guest address, size) laid out one after the other
/// in the file, as a VMM maps a guest with holes between its RAM regions.
///
/// # Errors
/// The memfd, a `dup` or the mapping failed.
pub fn memfd_guest_memory(regions: &[(u64, u64)]) -> Result<GuestMemory, FixtureError> {
    let fd = memfd(regions.iter().map(|&(_, size)| size).sum())?;
    let mut specs = Vec::with_capacity(regions.len());
    let mut file_offset = 0;
    for &(guest_addr, size) in regions {
        specs.push(MemoryRegionSpec {
            guest_addr,
            size,
            fd: fd.try_clone().map_err(io_err("dup of a memfd"))?,
            file_offset,
        });
        file_offset += size;
    }
    Ok(GuestMemory::from_regions(specs)?)
}

/// A queue's rings as the device gets them.
///
/// # Errors
/// The simulated guest put them where a split ring may not be (size, alignment).
pub fn ring_addrs(q: &VirtqueueInfo) -> Result<RingAddresses, FixtureError> {
    Ok(RingAddresses::try_from(RawRingAddresses {
        size: q.size,
        desc: q.desc_table,
        avail: q.avail_ring,
        used: q.used_ring,
    })?)
}

/// A fresh queue's configuration (rings, positions 0, duplicated kick and call fds). `q` must
/// describe a queue of a live [`SimGuest`] (see [`dup_guest_fd`]).
///
/// # Errors
/// The rings are not where a split ring may be (see [`ring_addrs`]), or a `dup` failed.
pub fn queue_config(q: &VirtqueueInfo) -> Result<QueueConfig, FixtureError> {
    Ok(QueueConfig {
        ring: ring_addrs(q)?,
        positions: tapir_state::RingPositions::default(),
        kick: dup_guest_fd(q.kick_fd)?,
        call: dup_guest_fd(q.call_fd)?,
    })
}

/// What a datapath process is handed for queue pair `pair` of `guest`: the rings, the TAP
/// queue `tap` and duplicates of the four eventfds.
///
/// # Errors
/// A `dup` failed.
pub fn pair_resources(
    guest: &SimGuest,
    pair: u16,
    tap: OwnedFd,
) -> Result<PairResources, FixtureError> {
    let (rx, tx) = (guest.rx_queue(pair), guest.tx_queue(pair));
    Ok(PairResources {
        rx: ring_addrs(&rx)?,
        tx: ring_addrs(&tx)?,
        tap,
        rx_kick: dup_guest_fd(rx.kick_fd)?,
        rx_call: dup_guest_fd(rx.call_fd)?,
        tx_kick: dup_guest_fd(tx.kick_fd)?,
        tx_call: dup_guest_fd(tx.call_fd)?,
    })
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    #[test]
    fn a_guests_memory_and_queues_are_handed_over_as_duplicates() {
        let guest = SimGuest::new(tapir_simguest::GuestConfig::default()).unwrap();
        guest_memory(&guest).unwrap();
        let rx = guest.rx_queue(0);
        let q = queue_config(&rx).unwrap();
        assert_eq!(
            (q.ring.size().get(), q.ring.desc(), q.positions.next_avail),
            (rx.size, rx.desc_table, 0)
        );
        assert_ne!(
            q.kick.as_raw_fd(),
            rx.kick_fd,
            "a duplicate, not the guest's own fd"
        );
        let r = pair_resources(&guest, 0, memfd(4096).unwrap()).unwrap();
        assert_eq!(r.tx, ring_addrs(&guest.tx_queue(0)).unwrap());
    }

    #[test]
    fn memfd_guest_memory_maps_each_region_at_its_address() {
        let mem = memfd_guest_memory(&[(0, 0x10000), (0x20000, 0x8000)]).unwrap();
        assert!(mem.contains(0xfff0, 0x10));
        assert!(mem.contains(0x20000, 0x8000));
        assert!(
            !mem.contains(0x10000, 1),
            "the hole between the regions is not memory"
        );
        assert!(!mem.contains(0x28000, 1), "nothing past the last region");
        assert_eq!(mem.regions().len(), 2);
    }

    #[test]
    fn memfds_have_their_length_and_eventfds_do_not_block() {
        let fd = memfd(0x3000).unwrap();
        assert_eq!(File::from(fd).metadata().unwrap().len(), 0x3000);
        let e = eventfd().unwrap();
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a live buffer from an fd we own.
        let rc = unsafe { libc::read(e.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        assert_eq!(rc, -1);
        assert_eq!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN)
        );
    }
}
