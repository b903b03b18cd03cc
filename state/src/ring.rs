//! One vocabulary for split-ring state (issue 10, item 5): a queue's size, where its three
//! parts are ([`RingAddresses`]), where the device is in it ([`RingPositions`]) and which
//! chains it holds ([`HeldHeads`]). Defined once here and used by the datapath, the handoff
//! and the vhost-user backend; every value from outside (a frontend's request, a blob, a
//! predecessor) comes in through `TryFrom`, which checks what can be checked without guest
//! memory: the rules of virtio 1.2 §2.7 (split virtqueues).

use serde::{Deserialize, Serialize};

use crate::error::Ring;
use crate::snapshot::MAX_QUEUE_SIZE;

/// What is wrong with raw ring values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The queue size is not a power of two in `1..=32768` (virtio 1.2 §2.7).
    #[error("queue size {0} is not a power of two in 1..=32768")]
    Size(u16),
    /// A part's address is not aligned as virtio 1.2 §2.7 requires (16, 2, 4 bytes).
    #[error("{ring} at {addr:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Which part.
        ring: Ring,
        /// Its address.
        addr: u64,
        /// The alignment it needs.
        align: u64,
    },
    /// A part's end is beyond the 64-bit address space.
    #[error("{ring} at {addr:#x} (+{len:#x}) wraps the address space")]
    Wraps {
        /// Which part.
        ring: Ring,
        /// Its address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// More chains popped and not used (`next_avail - next_used`) than the queue holds.
    #[error(
        "next_avail {next_avail} is more than the queue size {size} ahead of next_used {next_used}"
    )]
    AheadOfUsed {
        /// `next_avail`.
        next_avail: u16,
        /// `next_used`.
        next_used: u16,
        /// Queue size.
        size: u16,
    },
    /// A held head is not a descriptor index.
    #[error("held head {head} (entry {position}) is not below the queue size {size}")]
    HeadOutOfRange {
        /// Position in the list.
        position: usize,
        /// The head.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A head held twice: one chain would be used twice.
    #[error("head {0} is held twice")]
    HeadTwice(u16),
    /// The held heads do not account for every chain popped and not used.
    #[error("{count} heads held, but next_avail - next_used = {outstanding}")]
    HeldCount {
        /// Heads listed.
        count: usize,
        /// `next_avail - next_used`.
        outstanding: u16,
    },
}

/// A split virtqueue's size: a power of two in `1..=32768` (virtio 1.2 §2.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueSize(u16);

impl QueueSize {
    /// The number of descriptors.
    #[must_use]
    pub fn get(self) -> u16 {
        self.0
    }

    /// The ring slot of a free-running index (`pos mod size`).
    #[must_use]
    pub fn slot(self, pos: u16) -> u16 {
        pos & self.0.wrapping_sub(1)
    }

    /// Bytes of a part of a queue this size, event fields included (virtio 1.2 §2.7.5,
    /// §2.7.6, §2.7.8: descriptor table `16 * size`, available ring `6 + 2 * size`, used
    /// ring `6 + 8 * size`; the trailing 2 bytes of each ring are used_event / avail_event,
    /// counted whether or not EVENT_IDX is on).
    #[must_use]
    pub fn part_len(self, ring: Ring) -> u64 {
        let n = u64::from(self.0);
        match ring {
            Ring::Desc => n.saturating_mul(16),
            Ring::Avail => n.saturating_mul(2).saturating_add(6),
            Ring::Used => n.saturating_mul(8).saturating_add(6),
        }
    }
}

impl TryFrom<u16> for QueueSize {
    type Error = RingError;
    fn try_from(size: u16) -> Result<Self, RingError> {
        if size.is_power_of_two() && size <= MAX_QUEUE_SIZE {
            Ok(QueueSize(size))
        } else {
            Err(RingError::Size(size))
        }
    }
}

impl From<QueueSize> for u16 {
    fn from(s: QueueSize) -> u16 {
        s.0
    }
}

/// The alignment each part needs (virtio 1.2 §2.7: 16, 2 and 4 bytes).
#[must_use]
pub fn part_align(ring: Ring) -> u64 {
    match ring {
        Ring::Desc => 16,
        Ring::Avail => 2,
        Ring::Used => 4,
    }
}

/// Where a queue's rings are, as given from outside: not checked yet (see [`RingAddresses`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRingAddresses {
    /// Number of descriptors.
    pub size: u16,
    /// Address of the descriptor table.
    pub desc: u64,
    /// Address of the available ring.
    pub avail: u64,
    /// Address of the used ring.
    pub used: u64,
}

/// Where a queue's rings are: a valid size, each part aligned and not wrapping the address
/// space. (Whether the parts lie in guest memory is for whoever holds the memory map:
/// [`crate::DeviceSnapshot::validate`], the datapath's ring view.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RingAddresses {
    size: QueueSize,
    desc: u64,
    avail: u64,
    used: u64,
}

impl RingAddresses {
    /// The queue size.
    #[must_use]
    pub fn size(&self) -> QueueSize {
        self.size
    }
    /// Address of the descriptor table.
    #[must_use]
    pub fn desc(&self) -> u64 {
        self.desc
    }
    /// Address of the available ring.
    #[must_use]
    pub fn avail(&self) -> u64 {
        self.avail
    }
    /// Address of the used ring.
    #[must_use]
    pub fn used(&self) -> u64 {
        self.used
    }
    /// Address of a part.
    #[must_use]
    pub fn of(&self, ring: Ring) -> u64 {
        match ring {
            Ring::Desc => self.desc,
            Ring::Avail => self.avail,
            Ring::Used => self.used,
        }
    }
    /// The three parts as (part, address, length), in that order.
    #[must_use]
    pub fn parts(&self) -> [(Ring, u64, u64); 3] {
        [Ring::Desc, Ring::Avail, Ring::Used].map(|r| (r, self.of(r), self.size.part_len(r)))
    }
    /// The raw values (for a wire format).
    #[must_use]
    pub fn raw(&self) -> RawRingAddresses {
        RawRingAddresses {
            size: self.size.get(),
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }
}

impl TryFrom<RawRingAddresses> for RingAddresses {
    type Error = RingError;
    fn try_from(raw: RawRingAddresses) -> Result<Self, RingError> {
        let size = QueueSize::try_from(raw.size)?;
        let addrs = RingAddresses {
            size,
            desc: raw.desc,
            avail: raw.avail,
            used: raw.used,
        };
        for (ring, addr, len) in addrs.parts() {
            let align = part_align(ring);
            // align is a power of two: the low bits of an aligned address are zero.
            if addr & align.wrapping_sub(1) != 0 {
                return Err(RingError::Misaligned { ring, addr, align });
            }
            if addr.checked_add(len).is_none() {
                return Err(RingError::Wraps { ring, addr, len });
            }
        }
        Ok(addrs)
    }
}

impl From<RingAddresses> for RawRingAddresses {
    fn from(a: RingAddresses) -> RawRingAddresses {
        a.raw()
    }
}

/// Where the device is in a split ring: its next index into the available ring and into
/// the used ring, both free-running (they wrap at 2^16, not at the queue size).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RingPositions {
    /// The device's next index into the available ring.
    pub next_avail: u16,
    /// The device's next index into the used ring.
    pub next_used: u16,
}

impl RingPositions {
    /// Positions at these indices.
    #[must_use]
    pub fn new(next_avail: u16, next_used: u16) -> RingPositions {
        RingPositions {
            next_avail,
            next_used,
        }
    }

    /// Chains popped and not used: `next_avail - next_used` (wrapping).
    #[must_use]
    pub fn outstanding(self) -> u16 {
        self.next_avail.wrapping_sub(self.next_used)
    }

    /// Checks the positions against a queue size: at most `size` chains outstanding.
    ///
    /// # Errors
    ///
    /// [`RingError::AheadOfUsed`].
    pub fn check(self, size: QueueSize) -> Result<RingPositions, RingError> {
        if self.outstanding() > size.get() {
            return Err(RingError::AheadOfUsed {
                next_avail: self.next_avail,
                next_used: self.next_used,
                size: size.get(),
            });
        }
        Ok(self)
    }
}

/// The chains a device popped and has not used (RX buffers it holds), by head, in ring
/// order: each below the queue size, none twice.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct HeldHeads(Vec<u16>);

impl HeldHeads {
    /// No heads.
    #[must_use]
    pub fn none() -> HeldHeads {
        HeldHeads(Vec::new())
    }
    /// The heads, in ring order.
    #[must_use]
    pub fn heads(&self) -> &[u16] {
        &self.0
    }
    /// The heads, owned.
    #[must_use]
    pub fn into_vec(self) -> Vec<u16> {
        self.0
    }
    /// How many.
    #[must_use]
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// True when there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Heads a quiesced device holds at `positions`: valid heads (see `TryFrom`), exactly as
    /// many as the positions say are outstanding (each chain is popped once, `next_avail +=
    /// 1`, and used once, `next_used += 1`; a quiesced device holds every popped, unused
    /// one: no fewer, a chain lost, and no more, a head the guest never offered).
    ///
    /// # Errors
    ///
    /// As `TryFrom`, [`RingError::AheadOfUsed`] or [`RingError::HeldCount`].
    pub fn at(
        size: QueueSize,
        positions: RingPositions,
        heads: Vec<u16>,
    ) -> Result<HeldHeads, RingError> {
        let outstanding = positions.check(size)?.outstanding();
        let held = HeldHeads::try_from((size, heads))?;
        if held.len() != usize::from(outstanding) {
            return Err(RingError::HeldCount {
                count: held.len(),
                outstanding,
            });
        }
        Ok(held)
    }
}

impl TryFrom<(QueueSize, Vec<u16>)> for HeldHeads {
    type Error = RingError;
    fn try_from((size, heads): (QueueSize, Vec<u16>)) -> Result<Self, RingError> {
        // Linear in the queue size, whatever the list holds (it is bounded by the size as
        // soon as a head repeats or leaves the range).
        let mut seen = vec![false; usize::from(size.get())];
        for (position, &head) in heads.iter().enumerate() {
            let Some(slot) = seen.get_mut(usize::from(head)) else {
                return Err(RingError::HeadOutOfRange {
                    position,
                    head,
                    size: size.get(),
                });
            };
            if std::mem::replace(slot, true) {
                return Err(RingError::HeadTwice(head));
            }
        }
        Ok(HeldHeads(heads))
    }
}

impl From<HeldHeads> for Vec<u16> {
    fn from(h: HeldHeads) -> Vec<u16> {
        h.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(n: u16) -> QueueSize {
        QueueSize::try_from(n).unwrap()
    }

    fn raw(size: u16, desc: u64, avail: u64, used: u64) -> RawRingAddresses {
        RawRingAddresses {
            size,
            desc,
            avail,
            used,
        }
    }

    #[test]
    fn queue_sizes_are_powers_of_two_up_to_32768() {
        for ok in [1u16, 2, 256, 32768] {
            assert_eq!(QueueSize::try_from(ok).map(u16::from), Ok(ok));
        }
        for bad in [0u16, 3, 255, 32767, 32769, 40000, u16::MAX] {
            assert_eq!(QueueSize::try_from(bad), Err(RingError::Size(bad)), "{bad}");
        }
        assert_eq!(size(256).slot(257), 1);
        assert_eq!(size(1).slot(u16::MAX), 0);
    }

    #[test]
    fn ring_addresses_are_aligned_and_do_not_wrap() {
        let a = RingAddresses::try_from(raw(256, 0x1000, 0x2000, 0x3000)).unwrap();
        assert_eq!(
            a.parts(),
            [
                (Ring::Desc, 0x1000, 4096),
                (Ring::Avail, 0x2000, 518),
                (Ring::Used, 0x3000, 2054)
            ]
        );
        assert_eq!(a.raw(), raw(256, 0x1000, 0x2000, 0x3000));
        let cases = [
            (raw(0, 0, 0, 0), RingError::Size(0)),
            (raw(100, 0, 0, 0), RingError::Size(100)),
            (
                raw(256, 0x1008, 0x2000, 0x3000),
                RingError::Misaligned {
                    ring: Ring::Desc,
                    addr: 0x1008,
                    align: 16,
                },
            ),
            (
                raw(256, 0x1000, 0x2001, 0x3000),
                RingError::Misaligned {
                    ring: Ring::Avail,
                    addr: 0x2001,
                    align: 2,
                },
            ),
            (
                raw(256, 0x1000, 0x2000, 0x3002),
                RingError::Misaligned {
                    ring: Ring::Used,
                    addr: 0x3002,
                    align: 4,
                },
            ),
            (
                raw(256, u64::MAX - 15, 0x2000, 0x3000),
                RingError::Wraps {
                    ring: Ring::Desc,
                    addr: u64::MAX - 15,
                    len: 4096,
                },
            ),
            (
                raw(32768, 0, 0, u64::MAX - 3),
                RingError::Wraps {
                    ring: Ring::Used,
                    addr: u64::MAX - 3,
                    len: 6 + 8 * 32768,
                },
            ),
        ];
        for (r, want) in cases {
            assert_eq!(RingAddresses::try_from(r), Err(want), "{r:?}");
        }
    }

    #[test]
    fn positions_are_at_most_a_queue_ahead_across_the_wrap() {
        let s = size(16);
        assert_eq!(RingPositions::new(5, 65535).outstanding(), 6);
        assert!(RingPositions::new(5, 65535).check(s).is_ok());
        assert!(RingPositions::new(16, 0).check(s).is_ok());
        assert_eq!(
            RingPositions::new(17, 0).check(s),
            Err(RingError::AheadOfUsed {
                next_avail: 17,
                next_used: 0,
                size: 16
            })
        );
        // next_used ahead of next_avail: 2^16 - 1 outstanding, far beyond any queue.
        assert!(RingPositions::new(0, 1).check(size(32768)).is_err());
    }

    #[test]
    fn held_heads_are_below_the_size_unique_and_as_many_as_outstanding() {
        let s = size(8);
        assert_eq!(
            HeldHeads::try_from((s, vec![7, 0, 3])).map(HeldHeads::into_vec),
            Ok(vec![7, 0, 3])
        );
        assert_eq!(
            HeldHeads::try_from((s, vec![1, 8])),
            Err(RingError::HeadOutOfRange {
                position: 1,
                head: 8,
                size: 8
            })
        );
        assert_eq!(
            HeldHeads::try_from((s, vec![u16::MAX])),
            Err(RingError::HeadOutOfRange {
                position: 0,
                head: u16::MAX,
                size: 8
            })
        );
        assert_eq!(
            HeldHeads::try_from((s, vec![2, 5, 2])),
            Err(RingError::HeadTwice(2))
        );
        // A list far longer than the queue is refused at its first repeat.
        assert_eq!(
            HeldHeads::try_from((s, vec![0; 100_000])),
            Err(RingError::HeadTwice(0))
        );
        assert!(HeldHeads::at(s, RingPositions::new(12, 10), vec![4, 6]).is_ok());
        assert_eq!(
            HeldHeads::at(s, RingPositions::new(12, 10), vec![4]),
            Err(RingError::HeldCount {
                count: 1,
                outstanding: 2
            })
        );
        assert_eq!(
            HeldHeads::at(s, RingPositions::new(0, 0), vec![4]),
            Err(RingError::HeldCount {
                count: 1,
                outstanding: 0
            })
        );
        assert!(matches!(
            HeldHeads::at(s, RingPositions::new(20, 0), vec![]),
            Err(RingError::AheadOfUsed { .. })
        ));
    }
}
