//! The simulated guest's side of a throughput cell: one thread per queue pair and direction
//! keeping the rings busy, and what they counted.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use tapir_simguest::{RxDriver, TxDriver, VirtioNetHdr};
use tapir_testkit::cpu;

use super::traffic::{to_guest_hdr, DirFrames};
use super::Scenario;

/// What the simulated guest's threads saw, summed over them.
#[derive(Debug, Default)]
struct GuestCounters {
    /// Frames pushed (TX) plus frames received (RX): the guest's own rate.
    packets: AtomicU64,
    /// TX chains the device completed, and their frames' bytes.
    tx_completed: AtomicU64,
    tx_bytes: AtomicU64,
    /// RX frames received, and their bytes (after the virtio-net header).
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    /// Kicks the guest sent, interrupts it received.
    kicks: AtomicU64,
    interrupts: AtomicU64,
}

/// A reading of [`GuestCounters`].
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct GuestCount {
    pub(super) packets: u64,
    pub(super) tx_completed: u64,
    pub(super) tx_bytes: u64,
    pub(super) rx_packets: u64,
    pub(super) rx_bytes: u64,
    pub(super) kicks: u64,
    pub(super) interrupts: u64,
}

impl GuestCounters {
    fn read(&self) -> GuestCount {
        let r = |a: &AtomicU64| a.load(Ordering::Relaxed);
        GuestCount {
            packets: r(&self.packets),
            tx_completed: r(&self.tx_completed),
            tx_bytes: r(&self.tx_bytes),
            rx_packets: r(&self.rx_packets),
            rx_bytes: r(&self.rx_bytes),
            kicks: r(&self.kicks),
            interrupts: r(&self.interrupts),
        }
    }

    /// Adds what a driver's kick and interrupt counters moved since `last`.
    fn publish_notifications(&self, stats: &tapir_simguest::DriverStats, last: &mut (u64, u64)) {
        if stats.kicks != last.0 {
            self.kicks
                .fetch_add(stats.kicks - last.0, Ordering::Relaxed);
        }
        if stats.interrupts != last.1 {
            self.interrupts
                .fetch_add(stats.interrupts - last.1, Ordering::Relaxed);
        }
        *last = (stats.kicks, stats.interrupts);
    }
}

impl GuestCount {
    pub(super) fn delta(&self, before: &GuestCount) -> GuestCount {
        GuestCount {
            packets: self.packets - before.packets,
            tx_completed: self.tx_completed - before.tx_completed,
            tx_bytes: self.tx_bytes - before.tx_bytes,
            rx_packets: self.rx_packets - before.rx_packets,
            rx_bytes: self.rx_bytes - before.rx_bytes,
            kicks: self.kicks - before.kicks,
            interrupts: self.interrupts - before.interrupts,
        }
    }
}

/// The guest's threads of one cell.
pub(super) struct GuestLoad {
    stop: Arc<AtomicBool>,
    counters: Arc<GuestCounters>,
    threads: Vec<std::thread::JoinHandle<Result<()>>>,
}

impl GuestLoad {
    /// Frames the guest pushed and received so far.
    pub(super) fn packets(&self) -> u64 {
        self.counters.packets.load(Ordering::Relaxed)
    }

    /// What the guest's threads counted so far.
    pub(super) fn read(&self) -> GuestCount {
        self.counters.read()
    }

    pub(super) fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().map_err(|_| anyhow!("guest thread panicked"))??;
        }
        Ok(())
    }
}

/// Guest TX: small frames are copied into the ring per packet, as a guest's stack would;
/// TSO super-frames are written into every slot once and re-posted without copying, so the
/// simulated guest's 64 KiB memcpy (several µs on one core) is not what gets measured.
fn guest_tx_loop(
    mut tx: TxDriver,
    hdr: VirtioNetHdr,
    frame: Vec<u8>,
    stop: Arc<AtomicBool>,
    c: Arc<GuestCounters>,
) -> Result<()> {
    cpu::pin_current_thread(0).ok();
    let prefilled = frame.len() > 1500;
    if prefilled {
        tx.prefill(&hdr, &frame)?;
    }
    let len = u64::try_from(frame.len()).unwrap_or(0);
    let mut notified = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        let done = u64::try_from(tx.reclaim()).unwrap_or(0);
        if done > 0 {
            c.tx_completed.fetch_add(done, Ordering::Relaxed);
            c.tx_bytes.fetch_add(done * len, Ordering::Relaxed);
        }
        let mut n = 0u64;
        while n < 64 {
            let pushed = if prefilled {
                tx.push_prefilled()?
            } else {
                tx.push(&hdr, &frame)?
            };
            if !pushed {
                break;
            }
            n += 1;
        }
        if n > 0 {
            tx.flush();
            c.packets.fetch_add(n, Ordering::Relaxed);
        } else {
            tx.wait(Duration::from_millis(5))?;
        }
        c.publish_notifications(&tx.stats(), &mut notified);
    }
    Ok(())
}

fn guest_rx_loop(mut rx: RxDriver, stop: Arc<AtomicBool>, c: Arc<GuestCounters>) -> Result<()> {
    cpu::pin_current_thread(0).ok();
    let mut notified = (0, 0);
    while !stop.load(Ordering::Relaxed) {
        rx.refill();
        let mut bytes = 0usize;
        let got = rx.poll_with(|_, data| bytes += data.iter().map(|d| d.len()).sum::<usize>())?;
        if got > 0 {
            let got = u64::try_from(got).unwrap_or(0);
            c.packets.fetch_add(got, Ordering::Relaxed);
            c.rx_packets.fetch_add(got, Ordering::Relaxed);
            c.rx_bytes
                .fetch_add(u64::try_from(bytes).unwrap_or(0), Ordering::Relaxed);
        } else {
            rx.wait(Duration::from_millis(5))?;
        }
        c.publish_notifications(&rx.stats(), &mut notified);
    }
    Ok(())
}

/// Starts the guest threads of each queue pair's drivers (`drivers[i]` is pair `i`).
pub(super) fn start_guest(
    drivers: Vec<(RxDriver, TxDriver)>,
    dirs: &DirFrames,
) -> Result<GuestLoad> {
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(GuestCounters::default());
    let mut threads = Vec::new();
    for (i, (rx, tx)) in drivers.into_iter().enumerate() {
        let mut rx = Some(rx);
        let mut tx = Some(tx);
        for (dir, frames) in dirs {
            let (stop, c) = (stop.clone(), counters.clone());
            let t = match (dir, tx.take(), rx.take()) {
                (Scenario::Tx | Scenario::TxDrop, Some(tx), rx_back) => {
                    rx = rx_back;
                    let (h, f) = frames[i % frames.len()].clone();
                    std::thread::Builder::new()
                        .name(format!("guest-tx{i}"))
                        .spawn(move || guest_tx_loop(tx, to_guest_hdr(&h), f, stop, c))?
                }
                (_, tx_back, Some(rx)) => {
                    tx = tx_back;
                    std::thread::Builder::new()
                        .name(format!("guest-rx{i}"))
                        .spawn(move || guest_rx_loop(rx, stop, c))?
                }
                _ => bail!("a direction twice in one scenario"),
            };
            threads.push(t);
        }
    }
    Ok(GuestLoad {
        stop,
        counters,
        threads,
    })
}
