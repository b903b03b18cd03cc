//! A vhost-user backend process (by default `tapir serve`), started for each cell and driven
//! by the same simulated guest through the vhost-user protocol. Its counters are out of reach:
//! packets and bytes are what the guest counted, CPU is the backend process's.

use anyhow::{anyhow, Context, Result};

use super::{bench_guest, by_direction, worker_cpu, Backend, Window, WindowEdge};
use crate::runner::guest_load::{start_guest, GuestCount, GuestLoad};
use crate::runner::sample::{per_sec, sample, Sample};
use crate::runner::traffic::DirFrames;
use crate::runner::{BenchOptions, Variant};
use crate::vhost_rig::VhostUserRig;

/// The backend of [`BenchOptions::backend`].
pub(in crate::runner) struct VhostUser {
    rig: VhostUserRig,
    queues: usize,
    load: Option<GuestLoad>,
}

/// The backend process's CPU time (None: unreadable) and the guest's counts.
pub(in crate::runner) struct Reading {
    cpu_ns: Option<u64>,
    guest: GuestCount,
}

impl VhostUser {
    /// Starts the backend process for a cell of `queues` queue pairs, at `variant`'s
    /// busy-poll budget.
    pub(in crate::runner) fn start(
        queues: usize,
        opts: &BenchOptions,
        variant: Variant,
    ) -> Result<VhostUser> {
        let backend = opts
            .backend
            .as_ref()
            .ok_or_else(|| anyhow!("the vhost-user engine needs a backend (--backend)"))?;
        let cpus: Vec<Option<usize>> = (0..queues).map(worker_cpu).collect();
        let rig = VhostUserRig::start(
            backend,
            bench_guest(queues)?,
            1500,
            &cpus,
            variant.busy_poll_us,
        )
        .context("starting the vhost-user backend")?;
        Ok(VhostUser {
            rig,
            queues,
            load: None,
        })
    }
}

impl Backend for VhostUser {
    type Reading = Reading;

    fn host_mac(&self) -> [u8; 6] {
        self.rig.host_mac
    }

    fn start(&mut self, dirs: &DirFrames) -> Result<()> {
        let drivers = (0..self.queues).map(|i| self.rig.take(i)).collect();
        self.load = Some(start_guest(drivers, dirs)?);
        Ok(())
    }

    fn read(&self, _: WindowEdge) -> Reading {
        Reading {
            cpu_ns: self.rig.backend_cpu_ns(),
            guest: self.load.as_ref().map(GuestLoad::read).unwrap_or_default(),
        }
    }

    fn stop(&mut self) -> Result<()> {
        self.load.take().map_or(Ok(()), GuestLoad::finish)
    }

    fn finish(self, w: Window<Reading>) -> Result<Sample> {
        let notes = self.rig.shutdown()?;
        let g = w.last.guest.delta(&w.first.guest);
        let (packets, bytes) = by_direction(
            w.scenario,
            (g.tx_completed, g.tx_bytes),
            (g.rx_packets, g.rx_bytes),
        );
        let cpu_ns = w
            .first
            .cpu_ns
            .zip(w.last.cpu_ns)
            .map(|(a, b)| b.saturating_sub(a));
        let mut s = sample(
            packets,
            bytes,
            cpu_ns,
            w.elapsed,
            w.queues,
            w.peer_pps,
            w.peer_cpu,
            per_sec(g.packets, w.elapsed),
            None,
        )
        .with_guest_notifications(packets, &g);
        s.per_wait = None;
        s.notes.extend(notes);
        Ok(s)
    }
}
