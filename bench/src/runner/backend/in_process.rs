//! tapir's in-process engines: a [`Rig`] (TAP, simulated guest, device) per cell; rates from
//! the device's own counters, CPU from its worker threads, allocations from the counting
//! allocator.

use std::sync::Arc;

use anyhow::{Context, Result};
use tapir_datapath::QueuePairStats;
use tapir_datapath::{Counters, EngineConfig, EngineKind};
use tapir_testkit::{Rig, RigConfig};

use super::{bench_guest, by_direction, worker_cpu, Backend, Window, WindowEdge};
use crate::runner::guest_load::{start_guest, GuestLoad};
use crate::runner::sample::{per_sec, sample, Sample};
use crate::runner::traffic::DirFrames;
use crate::runner::Variant;

/// A tapir engine in this process.
pub(in crate::runner) struct InProcess {
    rig: Rig,
    queues: usize,
    /// The workers' stats, fetched once (outside the window).
    workers: Vec<Arc<QueuePairStats>>,
    load: Option<GuestLoad>,
}

/// The device's counters, its workers' CPU time, the guest's packets and the allocations.
pub(in crate::runner) struct Reading {
    cpu_ns: u64,
    counters: Counters,
    guest_packets: u64,
    allocations: Option<u64>,
}

impl InProcess {
    /// Starts the rig for a cell of `queues` queue pairs, the workers at `variant`'s
    /// busy-poll budget.
    pub(in crate::runner) fn start(
        engine: EngineKind,
        queues: usize,
        variant: Variant,
    ) -> Result<InProcess> {
        let cfg = RigConfig {
            guest: bench_guest(queues)?,
            cpu_affinity: (0..queues).map(worker_cpu).collect(),
            engine_config: EngineConfig {
                busy_poll: variant.busy_poll(),
                ..EngineConfig::default()
            },
            ..RigConfig::new(engine, u16::try_from(queues)?)
        };
        let rig = Rig::start(&cfg).context("starting the rig")?;
        let workers = rig.device().worker_stats();
        Ok(InProcess {
            rig,
            queues,
            workers,
            load: None,
        })
    }
}

fn sum_counters(v: &[Counters]) -> Counters {
    let mut total = Counters::default();
    for c in v {
        total.add(c);
    }
    total
}

impl Backend for InProcess {
    type Reading = Reading;

    fn host_mac(&self) -> [u8; 6] {
        self.rig.host_mac
    }

    fn start(&mut self, dirs: &DirFrames) -> Result<()> {
        let drivers = (0..self.queues).map(|i| self.rig.take(i)).collect();
        self.load = Some(start_guest(drivers, dirs)?);
        Ok(())
    }

    fn read(&self, edge: WindowEdge) -> Reading {
        // Reading the CPU times allocates (a /proc read per worker): it stays outside the
        // window, and the allocation count is taken at the window's side of the reading.
        let cpu_ns = || -> u64 { self.workers.iter().filter_map(|s| s.cpu_time_ns()).sum() };
        let guest_packets = || self.load.as_ref().map_or(0, GuestLoad::packets);
        match edge {
            WindowEdge::Opens => {
                let cpu_ns = cpu_ns();
                let counters = sum_counters(&self.rig.device().counters());
                let guest_packets = guest_packets();
                let allocations = crate::alloc_count::allocations();
                Reading {
                    cpu_ns,
                    counters,
                    guest_packets,
                    allocations,
                }
            }
            WindowEdge::Closes => {
                let counters = sum_counters(&self.rig.device().counters());
                let guest_packets = guest_packets();
                let allocations = crate::alloc_count::allocations();
                Reading {
                    cpu_ns: cpu_ns(),
                    counters,
                    guest_packets,
                    allocations,
                }
            }
        }
    }

    fn stop(&mut self) -> Result<()> {
        self.load.take().map_or(Ok(()), GuestLoad::finish)
    }

    fn finish(self, w: Window<Reading>) -> Result<Sample> {
        self.rig.shutdown()?;
        let d = w.last.counters.delta(&w.first.counters);
        let (packets, bytes) = by_direction(
            w.scenario,
            (d.tx_packets, d.tx_bytes),
            (d.rx_packets, d.rx_bytes),
        );
        let cpu_ns = w.last.cpu_ns.saturating_sub(w.first.cpu_ns);
        let allocations = w.first.allocations.zip(w.last.allocations);
        Ok(sample(
            packets,
            bytes,
            Some(cpu_ns),
            w.elapsed,
            w.queues,
            w.peer_pps,
            w.peer_cpu,
            per_sec(w.last.guest_packets - w.first.guest_packets, w.elapsed),
            Some(
                d.rx_dropped_oversize
                    + d.rx_dropped_no_buffers
                    + d.tx_errors
                    + d.tx_malformed
                    + d.rx_malformed,
            ),
        )
        .with_counters(packets, &d)
        .with_allocations(allocations.map(|(a, b)| b - a), packets))
    }
}
