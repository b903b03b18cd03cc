//! Per-queue-pair counters: one flat struct, kept in plain integers by the worker and published
//! to atomics once per batch (no locked instruction per packet).

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[doc = $doc:literal])* $name:ident ),* $(,)?) => {
        /// A snapshot of one queue pair's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct Counters {
            $( $(#[doc = $doc])* pub $name: u64, )*
        }

        /// The published copy of a worker's [`Counters`], readable from any thread.
        #[derive(Debug, Default)]
        pub struct SharedCounters {
            $( $name: AtomicU64, )*
            tid: AtomicI32,
            first_service_ns: AtomicU64,
            resumed_ns: AtomicU64,
        }

        impl SharedCounters {
            /// Publishes the worker's current counters.
            pub fn publish(&self, c: &Counters) {
                $( self.$name.store(c.$name, Ordering::Relaxed); )*
            }

            /// Reads the last published counters.
            pub fn snapshot(&self) -> Counters {
                Counters { $( $name: self.$name.load(Ordering::Relaxed), )* }
            }
        }

        impl Counters {
            /// Field names and values, for reports.
            pub fn fields(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name), )* ]
            }

            /// Adds `other` field by field (for totals over queue pairs).
            pub fn add(&mut self, other: &Counters) {
                $( self.$name += other.$name; )*
            }

            /// `self - earlier`, field by field (saturating).
            pub fn delta(&self, earlier: &Counters) -> Counters {
                Counters { $( $name: self.$name.saturating_sub(earlier.$name), )* }
            }
        }
    };
}

counters! {
    /// Frames delivered to the guest.
    rx_packets,
    /// Bytes delivered to the guest (frames without the vnet header).
    rx_bytes,
    /// Frames larger than the posted RX buffers, dropped (never truncated).
    rx_dropped_oversize,
    /// Frames moved into older RX chains, so that chains are used in ring order (a read that
    /// got a frame while an earlier one kept chains over: one copy).
    rx_reordered,
    /// Frames that overran the posted buffers of an MRG_RXBUF read and were copied into further
    /// chains (a misprediction of the frame size; the frame is delivered).
    rx_spilled,
    /// Frames dropped because the guest had not posted enough buffers for them by the time
    /// the worker stopped (a frame waits for buffers otherwise).
    rx_dropped_no_buffers,
    /// Frames that overran their read's buffers and waited for the guest to post more.
    rx_deferred,
    /// Times the worker found no RX buffers while it wanted to post a read.
    rx_no_buffers,
    /// Frames brought by the read the io_uring engine leaves waiting on an empty TAP (armed
    /// on io_uring's own poll: the frame is in guest buffers when the worker wakes). 0 in the
    /// classic engine, and where the kernel fails such reads (the engine polls instead).
    rx_woken_reads,
    /// RX descriptor chains refused as malformed (used with length 0).
    rx_malformed,
    /// Kicks received on the RX queue.
    rx_kicks,
    /// Interrupts (call eventfd signals) raised for the RX queue.
    rx_interrupts,
    /// Frames written to the TAP.
    tx_packets,
    /// Bytes written to the TAP (frames without the vnet header).
    tx_bytes,
    /// TAP writes the kernel refused (bad GSO header, ...); the chain is still completed.
    tx_errors,
    /// TX descriptor chains refused as malformed (used with length 0).
    tx_malformed,
    /// Kicks received on the TX queue.
    tx_kicks,
    /// Interrupts raised for the TX queue.
    tx_interrupts,
    /// Worker loop iterations that waited for the kernel (io_uring_enter or epoll_wait).
    batches,
    /// Syscalls that moved packets (one per readv/writev in classic, one per submit in uring).
    io_syscalls,
    /// Rounds an idle worker polled its rings and the TAP instead of sleeping
    /// (`EngineConfig::busy_poll`).
    busy_poll_rounds,
    /// Busy-poll spells that found work before their budget ran out (the worker did not
    /// sleep).
    busy_poll_found,
    /// Queues marked broken (a ring the guest corrupted; serviced no more until reset).
    queues_broken,
    /// The queue pair was marked broken because its worker failed (an engine error, or a
    /// panic caught at the worker's edge); its queues are serviced no more.
    pairs_broken,
}

/// What a worker publishes: its counters and its thread id (for CPU accounting through
/// `/proc/self/task/TID/schedstat`).
#[derive(Debug, Default)]
pub struct QueuePairStats {
    /// The counters.
    pub counters: SharedCounters,
}

impl QueuePairStats {
    /// Records the worker's thread id.
    pub fn set_tid(&self, tid: i32) {
        self.counters.tid.store(tid, Ordering::Relaxed);
    }

    /// Records, once, when the worker first put a chain into a used ring (CLOCK_MONOTONIC ns,
    /// comparable across processes: the end of a handoff's downtime).
    pub fn mark_first_service(&self) {
        if self.counters.first_service_ns.load(Ordering::Relaxed) == 0 {
            self.counters
                .first_service_ns
                .store(monotonic_ns(), Ordering::Relaxed);
        }
    }

    /// Records when the worker left its start gate (CLOCK_MONOTONIC ns).
    pub fn mark_resumed(&self) {
        self.counters
            .resumed_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }

    /// When the worker left its start gate, if it has.
    pub fn resumed_ns(&self) -> Option<u64> {
        match self.counters.resumed_ns.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    /// When the worker first serviced a ring (CLOCK_MONOTONIC ns), if it has.
    pub fn first_service_ns(&self) -> Option<u64> {
        match self.counters.first_service_ns.load(Ordering::Relaxed) {
            0 => None,
            t => Some(t),
        }
    }

    /// The worker's thread id (0 before it started).
    pub fn tid(&self) -> i32 {
        self.counters.tid.load(Ordering::Relaxed)
    }

    /// CPU time the worker thread has used so far, from the scheduler's own accounting.
    pub fn cpu_time_ns(&self) -> Option<u64> {
        let tid = self.tid();
        if tid == 0 {
            return None;
        }
        let text = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
        text.split_whitespace().next()?.parse().ok()
    }
}

/// CLOCK_MONOTONIC in nanoseconds (the same clock in every process on the host).
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
                + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}
