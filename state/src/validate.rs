//! [`DeviceSnapshot::validate`]: every field checked against the memory map, the queue sizes
//! and the fd manifest, so that a successor can trust what it resumes from.
//!
//! Checks run in a fixed order (device, memory, queue pairs, fd manifest) and the first
//! failure is returned. Nothing here indexes, casts or adds unchecked: a snapshot is input.

use crate::error::{Direction, FdUser, QueueRef, StateError};
use crate::ring::{HeldHeads, RingAddresses, RingError};
use crate::snapshot::{
    DeviceSnapshot, FdEntry, FdKind, InFlightAction, MemoryRegionState, VirtqueueState,
    F_EVENT_IDX, F_VERSION_1, MAX_CARRIED_BYTES, MAX_FDS, MAX_QUEUE_PAIRS, MAX_REGIONS,
    MAX_VERSION_LEN, TUN_F_KNOWN, VNET_HDR_LEN, VNET_HDR_LEN_LEGACY,
};

impl DeviceSnapshot {
    /// Checks every rule a snapshot must satisfy before a successor resumes from it:
    ///
    /// - device: `VIRTIO_F_VERSION_1` negotiated; source version string at most 64 bytes;
    /// - memory: 1 to 64 regions, each non-empty, neither `guest_addr + size` nor
    ///   `file_offset + size` overflowing, no two overlapping;
    /// - queue pairs: 1 to 256; pair `i` holds virtqueues `2i` (RX) and `2i + 1` (TX);
    /// - each virtqueue: size a power of two up to 32768; descriptor table, available ring
    ///   and used ring aligned (16, 2, 4) and each entirely inside one region; `event_idx`
    ///   as negotiated; at most `size` chains popped and not used
    ///   (`next_avail - next_used`, wrapping), and exactly those in `in_flight`: every popped
    ///   chain is either in the used ring or in flight, so the list must account for each,
    ///   no more and no fewer; every head a descriptor index, none twice; RX entries
    ///   `RepostRx`, TX entries `CompleteTx`;
    /// - each TAP queue: vnet header 12 or 10 bytes, only known `TUN_F_*` offloads;
    /// - carried RX frames: at most 512 KiB over all pairs (each frame's length and each
    ///   pair's count are checked as they are decoded, by `TryFrom`);
    /// - fd manifest: at most [`MAX_FDS`] (1408) entries; every fd a region or queue refers to exists, has
    ///   the right kind and names its user (`region` / `queue_pair`); every entry is used
    ///   exactly once, except `VhostUserConnection` and `Other` entries, which nothing in
    ///   the snapshot refers to.
    ///
    /// # Errors
    ///
    /// The first rule broken, as its own [`StateError`] variant.
    pub fn validate(&self) -> Result<(), StateError> {
        self.validate_device()?;
        self.validate_memory()?;
        self.validate_queue_pairs()?;
        self.validate_fds()
    }

    fn validate_device(&self) -> Result<(), StateError> {
        if self.features & F_VERSION_1 == 0 {
            return Err(StateError::MissingVersion1 {
                features: self.features,
            });
        }
        let len = self.source.version.len();
        if len > MAX_VERSION_LEN {
            return Err(StateError::SourceVersionTooLong {
                len,
                max: MAX_VERSION_LEN,
            });
        }
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), StateError> {
        let count = self.memory.len();
        if count == 0 {
            return Err(StateError::NoMemory);
        }
        if count > MAX_REGIONS {
            return Err(StateError::TooManyRegions {
                count,
                max: MAX_REGIONS,
            });
        }
        for (region, r) in self.memory.iter().enumerate() {
            if r.size == 0 {
                return Err(StateError::EmptyRegion { region });
            }
            if r.guest_addr.checked_add(r.size).is_none() {
                return Err(StateError::RegionWraps {
                    region,
                    guest_addr: r.guest_addr,
                    size: r.size,
                });
            }
            if r.file_offset.checked_add(r.size).is_none() {
                return Err(StateError::FileOffsetWraps {
                    region,
                    file_offset: r.file_offset,
                    size: r.size,
                });
            }
        }
        // At most 64 regions: the quadratic scan is cheaper than sorting.
        for (first, a) in self.memory.iter().enumerate() {
            for (second, b) in self.memory.iter().enumerate().skip(first.saturating_add(1)) {
                if overlaps(a, b) {
                    return Err(StateError::RegionsOverlap { first, second });
                }
            }
        }
        Ok(())
    }

    fn validate_queue_pairs(&self) -> Result<(), StateError> {
        let count = self.queue_pairs.len();
        if count == 0 {
            return Err(StateError::NoQueuePairs);
        }
        if count > MAX_QUEUE_PAIRS {
            return Err(StateError::TooManyQueuePairs {
                count,
                max: MAX_QUEUE_PAIRS,
            });
        }
        let event_idx = self.features & F_EVENT_IDX != 0;
        // Each frame and each pair's count were checked as they were decoded; the bytes of
        // all pairs together are bounded here.
        let carried = self
            .queue_pairs
            .iter()
            .map(|qp| qp.rx_carried.total_bytes())
            .fold(0usize, usize::saturating_add);
        if carried > MAX_CARRIED_BYTES {
            return Err(StateError::CarriedBytes {
                total: carried,
                max: MAX_CARRIED_BYTES,
            });
        }
        for (pair, qp) in self.queue_pairs.iter().enumerate() {
            for (dir, q) in [(Direction::Rx, &qp.rx), (Direction::Tx, &qp.tx)] {
                self.validate_queue(QueueRef { pair, dir }, q, event_idx)?;
            }
            let tap = &qp.tap;
            if tap.vnet_hdr_len != VNET_HDR_LEN && tap.vnet_hdr_len != VNET_HDR_LEN_LEGACY {
                return Err(StateError::VnetHdrLen {
                    pair,
                    len: tap.vnet_hdr_len,
                });
            }
            let unknown = tap.offloads & !TUN_F_KNOWN;
            if unknown != 0 {
                return Err(StateError::UnknownOffloads {
                    pair,
                    offloads: tap.offloads,
                    unknown,
                });
            }
        }
        Ok(())
    }

    fn validate_queue(
        &self,
        queue: QueueRef,
        q: &VirtqueueState,
        event_idx: bool,
    ) -> Result<(), StateError> {
        // Pair indices are below MAX_QUEUE_PAIRS here, so none of this can overflow; u64
        // keeps that obvious without a cast.
        let pair = u64::try_from(queue.pair).unwrap_or(u64::MAX);
        let expected = pair.saturating_mul(2).saturating_add(match queue.dir {
            Direction::Rx => 0,
            Direction::Tx => 1,
        });
        if u64::from(q.index) != expected {
            return Err(StateError::QueueIndex {
                queue,
                expected: u32::try_from(expected).unwrap_or(u32::MAX),
                found: q.index,
            });
        }
        // Size, alignment and the address space: the ring vocabulary's own checks.
        let addrs = RingAddresses::try_from(q.addresses()).map_err(|e| at(queue, e))?;
        for (ring, addr, len) in addrs.parts() {
            if !self.memory.iter().any(|r| contains(r, addr, len)) {
                return Err(StateError::RingOutsideMemory {
                    queue,
                    ring,
                    addr,
                    len,
                });
            }
        }
        if q.event_idx != event_idx {
            return Err(StateError::EventIdxMismatch {
                queue,
                event_idx: q.event_idx,
                negotiated: event_idx,
            });
        }
        let positions = q
            .positions()
            .check(addrs.size())
            .map_err(|e| at(queue, e))?;
        let count = q.in_flight.len();
        if count > usize::from(q.size) {
            return Err(StateError::TooManyInFlight {
                queue,
                count,
                size: q.size,
            });
        }
        // Each chain is popped once (next_avail += 1) and used once (next_used += 1), and
        // a quiesced device holds every popped, unused chain: the in-flight list is exactly
        // those, no more (a head the guest never offered) and no fewer (a chain lost).
        if count != usize::from(positions.outstanding()) {
            return Err(StateError::InFlightCount {
                queue,
                count,
                popped: positions.outstanding(),
            });
        }
        HeldHeads::at(addrs.size(), positions, q.held_heads()).map_err(|e| at(queue, e))?;
        let wanted = match queue.dir {
            Direction::Rx => InFlightAction::RepostRx,
            Direction::Tx => InFlightAction::CompleteTx,
        };
        if let Some(f) = q.in_flight.iter().find(|f| f.action != wanted) {
            return Err(StateError::WrongInFlightAction {
                queue,
                head: f.head,
                action: f.action,
            });
        }
        Ok(())
    }

    fn validate_fds(&self) -> Result<(), StateError> {
        let count = self.fds.len();
        if count > MAX_FDS {
            return Err(StateError::TooManyFds {
                count,
                max: MAX_FDS,
            });
        }
        let mut users: Vec<Option<FdUser>> = vec![None; count];
        for (region, r) in self.memory.iter().enumerate() {
            let owner = u16::try_from(region).ok();
            let user = FdUser::Region(region);
            claim(
                &self.fds,
                &mut users,
                user,
                r.fd,
                FdKind::MemoryRegion,
                None,
                owner,
            )?;
        }
        for (pair, qp) in self.queue_pairs.iter().enumerate() {
            let owner = u16::try_from(pair).ok();
            let tap = FdUser::Tap(pair);
            claim(
                &self.fds,
                &mut users,
                tap,
                qp.tap.fd,
                FdKind::TapQueue,
                owner,
                None,
            )?;
            for (dir, q) in [(Direction::Rx, &qp.rx), (Direction::Tx, &qp.tx)] {
                let queue = QueueRef { pair, dir };
                let kick = FdUser::Kick(queue);
                claim(
                    &self.fds,
                    &mut users,
                    kick,
                    q.kick_fd,
                    FdKind::Kick,
                    owner,
                    None,
                )?;
                let call = FdUser::Call(queue);
                claim(
                    &self.fds,
                    &mut users,
                    call,
                    q.call_fd,
                    FdKind::Call,
                    owner,
                    None,
                )?;
            }
        }
        for (index, (entry, user)) in self.fds.iter().zip(&users).enumerate() {
            let unowned = matches!(entry.kind, FdKind::VhostUserConnection | FdKind::Other);
            if user.is_none() && !unowned {
                return Err(StateError::FdUnreferenced {
                    index,
                    kind: entry.kind,
                });
            }
        }
        Ok(())
    }
}

/// Records that `user` refers to manifest entry `index`, which must exist, be of kind
/// `kind`, name `queue_pair`/`region` as its owner and not be used by anything else.
fn claim(
    fds: &[FdEntry],
    users: &mut [Option<FdUser>],
    user: FdUser,
    index: u16,
    kind: FdKind,
    queue_pair: Option<u16>,
    region: Option<u16>,
) -> Result<(), StateError> {
    let i = usize::from(index);
    let (Some(entry), Some(slot)) = (fds.get(i), users.get_mut(i)) else {
        return Err(StateError::FdIndexOutOfRange {
            user,
            index,
            count: fds.len(),
        });
    };
    if entry.kind != kind {
        return Err(StateError::FdKindMismatch {
            user,
            index,
            expected: kind,
            found: entry.kind,
        });
    }
    if entry.queue_pair != queue_pair || entry.region != region {
        return Err(StateError::FdOwnerMismatch {
            user,
            index,
            queue_pair: entry.queue_pair,
            region: entry.region,
        });
    }
    if let Some(first) = *slot {
        return Err(StateError::FdSharedBy {
            index,
            first,
            second: user,
        });
    }
    *slot = Some(user);
    Ok(())
}

/// A ring rule broken by queue `queue`, as the snapshot's own error.
fn at(queue: QueueRef, e: RingError) -> StateError {
    match e {
        RingError::Size(size) => StateError::QueueSize { queue, size },
        RingError::Misaligned { ring, addr, align } => StateError::RingMisaligned {
            queue,
            ring,
            addr,
            align,
        },
        RingError::Wraps { ring, addr, len } => StateError::RingOutsideMemory {
            queue,
            ring,
            addr,
            len,
        },
        RingError::AheadOfUsed {
            next_avail,
            next_used,
            size,
        } => StateError::AvailAheadOfUsed {
            queue,
            next_avail,
            next_used,
            size,
        },
        RingError::HeadOutOfRange {
            position,
            head,
            size,
        } => StateError::InFlightHeadOutOfRange {
            queue,
            position,
            head,
            size,
        },
        RingError::HeadTwice(head) => StateError::DuplicateInFlightHead { queue, head },
        RingError::HeldCount { count, outstanding } => StateError::InFlightCount {
            queue,
            count,
            popped: outstanding,
        },
    }
}

/// Whether two regions share a guest address (both already known not to wrap).
fn overlaps(a: &MemoryRegionState, b: &MemoryRegionState) -> bool {
    let a_end = a.guest_addr.saturating_add(a.size);
    let b_end = b.guest_addr.saturating_add(b.size);
    a.guest_addr < b_end && b.guest_addr < a_end
}

/// Whether `[addr, addr + len)` lies inside `r` (a range that wraps lies nowhere).
fn contains(r: &MemoryRegionState, addr: u64, len: u64) -> bool {
    let (Some(end), Some(r_end)) = (addr.checked_add(len), r.guest_addr.checked_add(r.size)) else {
        return false;
    };
    addr >= r.guest_addr && end <= r_end
}
