//! The raw TAP floor: no virtqueue, prebuilt frames written to / read from the TAP queues with
//! batched io_uring I/O, one thread per queue and direction. The floor runs flat out from its
//! start and counts over warm-up + window itself.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tapir_datapath::Tap;
use tapir_testkit::{cpu, host_tap, netns, wait_tap_gone, TAP_NAME};

use super::{worker_cpu, Backend, Window, WindowEdge};
use crate::floor::{floor_rx, floor_tx, FloorResult};
use crate::runner::sample::{sample, Sample};
use crate::runner::traffic::DirFrames;
use crate::runner::{bench_features, BenchOptions, Scenario};

/// Distinct frame buffers the TX floor cycles through: the simulated guest's TX slots.
const FLOOR_TX_BUFFERS: usize = 248;

/// The TAP and the floor's threads.
pub(in crate::runner) struct Floor {
    tap: Arc<Tap>,
    host_mac: [u8; 6],
    /// Warm-up + window: how long each floor thread runs.
    window: Duration,
    threads: Vec<JoinHandle<Result<FloorResult>>>,
    results: Vec<FloorResult>,
}

impl Floor {
    /// Creates the TAP (`queues` queues, offloads as the bench guest's) for a cell.
    pub(in crate::runner) fn start(queues: usize, opts: &BenchOptions) -> Result<Floor> {
        let tap = host_tap(queues, 1500)?;
        let host_mac = netns::iface_mac(TAP_NAME)?;
        for q in tap.queues() {
            q.set_offload_from_features(bench_features())?;
        }
        Ok(Floor {
            tap: Arc::new(tap),
            host_mac,
            window: opts.warmup + opts.duration,
            threads: Vec::new(),
            results: Vec::new(),
        })
    }
}

/// One floor thread: queue `i`, direction `dir`, for `window`.
fn floor_thread(
    tap: &Tap,
    i: usize,
    dir: Scenario,
    frames: &[(tapir_testkit::frames::VnetHdr, Vec<u8>)],
    window: Duration,
) -> Result<FloorResult> {
    if let Some(c) = worker_cpu(i) {
        cpu::pin_current_thread(c).ok();
    }
    let q = tap
        .queues()
        .get(i)
        .ok_or_else(|| anyhow!("no TAP queue {i}"))?;
    let r = match dir {
        Scenario::Tx | Scenario::TxDrop => {
            // As many distinct buffers as the guest has TX slots, so the floor copies from the
            // same memory footprint (a 64 KiB frame from a cold 16 MiB pool costs twice what
            // it does from L2).
            let bufs: Vec<Vec<u8>> = (0..FLOOR_TX_BUFFERS)
                .map(|i| {
                    let (h, f) = &frames[i % frames.len()];
                    let mut v = h.to_bytes().to_vec();
                    v.extend_from_slice(f);
                    v
                })
                .collect();
            floor_tx(q.as_fd(), &bufs, 64, window)
        }
        Scenario::Rx | Scenario::Bidir => floor_rx(q.as_fd(), 65_562 + 64, 64, window),
    };
    Ok(r?)
}

impl Backend for Floor {
    /// The floor counts for its whole run, not between readings.
    type Reading = ();

    fn host_mac(&self) -> [u8; 6] {
        self.host_mac
    }

    fn start(&mut self, dirs: &DirFrames) -> Result<()> {
        for i in 0..self.tap.queues().len() {
            for (dir, frames) in dirs {
                let (tap, dir, frames, window) =
                    (self.tap.clone(), *dir, frames.clone(), self.window);
                self.threads.push(std::thread::spawn(move || {
                    floor_thread(&tap, i, dir, &frames, window)
                }));
            }
        }
        Ok(())
    }

    fn read(&self, _: WindowEdge) {}

    fn stop(&mut self) -> Result<()> {
        for t in self.threads.drain(..) {
            let r = t.join().map_err(|_| anyhow!("floor thread panicked"))??;
            self.results.push(r);
        }
        Ok(())
    }

    fn finish(self, w: Window<()>) -> Result<Sample> {
        drop(self.tap);
        wait_tap_gone()?;
        let results = self.results;
        let packets: u64 = results.iter().map(|r| r.packets).sum();
        let bytes: u64 = results.iter().map(|r| r.bytes).sum();
        let cpu_ns: u64 = results.iter().map(|r| r.cpu_ns).sum();
        let elapsed = results
            .iter()
            .map(|r| r.elapsed)
            .max()
            .unwrap_or(self.window);
        let errors: u64 = results.iter().map(|r| r.errors).sum();
        Ok(sample(
            packets,
            bytes,
            Some(cpu_ns),
            elapsed,
            w.queues,
            w.peer_pps,
            w.peer_cpu,
            0.0,
            Some(errors),
        ))
    }
}
