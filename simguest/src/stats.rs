//! Per-driver counters.

/// Counters of one RX or TX driver. All counts are cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DriverStats {
    /// Kick eventfd writes (including [`RawQueue::kick`](crate::RawQueue::kick)).
    pub kicks: u64,
    /// Flushes/refills that published new buffers but skipped the kick
    /// because the device suppressed notifications.
    pub kicks_suppressed: u64,
    /// Sum of the counter values read from the call eventfd.
    pub interrupts: u64,
    /// Calls to `wait`.
    pub waits: u64,
    /// `wait` calls that blocked on the call eventfd.
    pub wait_blocks: u64,
    /// Used ring entries consumed for chains the driver owns.
    pub completed: u64,
    /// Packets delivered (RX) or completed (TX).
    pub packets: u64,
    /// Sum of the `len` fields of consumed used entries.
    pub used_len_total: u64,
    /// Used entries for raw (reserved-descriptor) chains.
    pub foreign_used: u64,
    /// Device bugs detected (bogus ids, lengths, indices).
    pub device_errors: u64,
    /// Used entries (RX) for a chain other than the oldest one posted: the device used
    /// buffers out of the order they were made available. virtio allows it, but a backend
    /// that does it cannot be restarted from the used index alone (as QEMU does when a
    /// vhost-user backend reconnects after a crash: it resumes the avail ring at the used
    /// index), so tapir never should.
    pub used_out_of_order: u64,
}
