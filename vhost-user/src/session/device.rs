//! The device behind a session: started, stopped and restarted so that exactly the ready
//! queue pairs run; a ring stopped (`GET_VRING_BASE`) with its held RX chains given back.

use std::os::fd::{AsFd, OwnedFd};

use nix::sys::eventfd::{EfdFlags, EventFd};
use tapir_datapath::{
    features, used_index, Device, DeviceConfig, QueueConfig, QueuePairSpec, TapQueue, Virtqueue,
};

use tapir_state::{CarriedFrame, RawRingAddresses, RingAddresses, RingPositions};

use super::{invalid, RequestError, Running, Session};
use crate::link;

impl Session {
    /// Back to the state of a new connection (vrings stopped, tables dropped).
    pub(super) fn reset(&mut self) {
        self.stop_device();
        let config = self.config.clone();
        let generation = self.generation;
        // A reset guest has no use for frames read before it: dropped, and counted.
        self.discard_carried();
        let counters = std::mem::take(&mut self.stopped_counters);
        *self = Session::new(config, self.taps.clone());
        self.generation = generation;
        self.stopped_counters = counters;
    }

    /// The frames kept for each queue pair (see [`Session::keep_carried`]), oldest first.
    pub fn carried(&self) -> &[Vec<CarriedFrame>] {
        &self.carried
    }

    /// Takes a predecessor's carried frames (one list per queue pair, from a session blob).
    pub fn set_carried(&mut self, carried: Vec<Vec<CarriedFrame>>) {
        let pairs = self.carried.len();
        self.carried = carried;
        self.carried.resize_with(pairs, Vec::new);
    }

    /// Drops every kept frame, counting them (a reset, or the end of the session).
    pub fn discard_carried(&mut self) {
        for pair in 0..self.carried.len() {
            self.drop_carried(pair);
        }
    }

    /// Drops the frames kept for `pair`, counting them (`rx_dropped_no_buffers`).
    fn drop_carried(&mut self, pair: usize) {
        let Some(frames) = self.carried.get_mut(pair) else {
            return;
        };
        let n = std::mem::take(frames).len();
        if n == 0 {
            return;
        }
        tracing::warn!(
            pair,
            frames = n,
            "dropping frames that waited for RX buffers"
        );
        if let Some(total) = self.stopped_counters.get_mut(pair) {
            total.rx_dropped_no_buffers = total
                .rx_dropped_no_buffers
                .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        }
    }

    /// Keeps frames a stopped pair had read from the TAP and not delivered (oldest first),
    /// behind any it kept already, within what a session blob may carry: at most
    /// [`tapir_state::MAX_CARRIED_FRAMES`] a pair and [`tapir_state::MAX_CARRIED_BYTES`] over
    /// all pairs. The youngest beyond that are dropped and counted (`rx_dropped_no_buffers`).
    fn keep_carried(&mut self, pair: usize, frames: Vec<Vec<u8>>) {
        let mut bytes: usize = self
            .carried
            .iter()
            .flatten()
            .map(|f| f.bytes().len())
            .fold(0, usize::saturating_add);
        let mut dropped = 0u64;
        for f in frames {
            let len = f.len();
            let room = self
                .carried
                .get(pair)
                .is_some_and(|k| k.len() < tapir_state::MAX_CARRIED_FRAMES)
                && bytes.saturating_add(len) <= tapir_state::MAX_CARRIED_BYTES;
            match (room, CarriedFrame::try_from(f), self.carried.get_mut(pair)) {
                (true, Ok(frame), Some(kept)) => {
                    kept.push(frame);
                    bytes = bytes.saturating_add(len);
                }
                _ => dropped = dropped.saturating_add(1),
            }
        }
        if dropped > 0 {
            tracing::warn!(
                pair,
                frames = dropped,
                "dropping frames that waited for RX buffers at a ring stop (beyond what a session carries)"
            );
            if let Some(total) = self.stopped_counters.get_mut(pair) {
                total.rx_dropped_no_buffers = total.rx_dropped_no_buffers.saturating_add(dropped);
            }
        }
    }

    /// Stops vring `i` (`GET_VRING_BASE`) and returns where the frontend resumes it. The
    /// device is quiesced first, so nothing is in flight. RX chains tapir held (popped, not
    /// filled) must go back to the guest, and a base can only give back a tail of the avail
    /// ring: see [`Session::give_back_held`].
    pub(super) fn stop_vring(&mut self, i: usize) -> Result<u16, RequestError> {
        self.vring(i)?;
        self.touch(i);
        let flushed_before = self.stop_device();
        let base = self.give_back_held(i);
        let flushed = flushed_before + self.flush_log();
        self.report_ring_stop(i, flushed);
        let v = self.vring_mut(i)?;
        v.started = false;
        v.base = base;
        v.held.clear();
        Ok(base)
    }

    /// Gives the RX chains held on vring `i` back to the guest (see
    /// [`Virtqueue::give_back`]) and returns the base to resume at.
    pub(super) fn give_back_held(&mut self, i: usize) -> u16 {
        let Some(v) = self.vrings.get(i) else {
            return 0;
        };
        if v.held.is_empty() {
            return v.base;
        }
        let event_idx = self.features & features::F_EVENT_IDX != 0;
        let given = self.memory.clone().and_then(|mem| {
            let (config, held) = self.queue_config(i).ok()?;
            let index = u16::try_from(i).ok()?;
            let mut vq = Virtqueue::new(index, config, event_idx, &mem).ok()?;
            Some(vq.give_back(&mem, &held))
        });
        let Some(given) = given else {
            return v.base;
        };
        tracing::info!(
            vring = i,
            empty = given.emptied,
            rewound = given.rewound,
            "held RX buffers given back at a ring stop"
        );
        given.base
    }

    /// Quiesces the device, recording each pair's positions and held RX chains; returns the
    /// dirty pages it moved into the log.
    pub fn stop_device(&mut self) -> usize {
        self.restart = false;
        let Some(running) = self.running.take() else {
            return 0;
        };
        for (c, &p) in running.device.counters().iter().zip(&running.pairs) {
            if let Some(total) = self.stopped_counters.get_mut(usize::from(p)) {
                total.add(c);
            }
        }
        match running.device.quiesce() {
            Ok(q) => {
                for (qp, &p) in q.pairs.iter().zip(&running.pairs) {
                    if let Some(rx) = self.vrings.get_mut(2 * usize::from(p)) {
                        rx.base = qp.rx_positions().next_avail;
                        rx.held = qp.rx_in_flight();
                    }
                    // Frames that waited for guest buffers at the stop stay with the
                    // session: the next device that runs the pair (this daemon's, or a
                    // successor's: the session blob carries them) delivers them first.
                    self.keep_carried(usize::from(p), qp.rx_carried());
                    if let Some(tx) = self.vrings.get_mut(2 * usize::from(p) + 1) {
                        tx.base = qp.tx_positions().next_avail;
                        tx.held.clear();
                    }
                }
            }
            Err(e) => {
                // Positions unknown: resume from the used rings (RX buffers are popped again,
                // TX chains that were in flight may be sent twice).
                tracing::error!(error = %e, "device failed while stopping; resuming from the used rings");
                for &p in &running.pairs {
                    for i in [2 * usize::from(p), 2 * usize::from(p) + 1] {
                        let used = self.used_idx(i);
                        if let Some(v) = self.vrings.get_mut(i) {
                            if let Some(used) = used {
                                v.base = used;
                            }
                            v.held.clear();
                        }
                    }
                }
            }
        }
        self.flush_log()
    }

    pub(super) fn gpa(&self, va: u64, what: &str, i: usize) -> Result<u64, RequestError> {
        self.table
            .va_to_gpa(va)
            .ok_or_else(|| invalid(format!("vring {i} {what} {va:#x} is in no memory region")))
    }

    /// The used index the guest sees in vring `i` (for a ring the frontend set up).
    pub(super) fn used_idx(&self, i: usize) -> Option<u16> {
        let mem = self.memory.as_ref()?;
        let addrs = self.vrings.get(i)?.addrs?;
        used_index(mem, self.table.va_to_gpa(addrs.used)?)
    }

    pub(super) fn queue_config(&self, i: usize) -> Result<(QueueConfig, Vec<u16>), RequestError> {
        let v = self.vring(i)?;
        let addrs = v
            .addrs
            .ok_or_else(|| invalid(format!("vring {i} has no addresses")))?;
        let dup = |fd: &OwnedFd| {
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|e| RequestError::Os("dup", e))
        };
        let kick = dup(v
            .kick
            .as_ref()
            .ok_or_else(|| invalid(format!("vring {i} has no kick fd")))?)?;
        let call = match &v.call {
            Some(fd) => dup(fd)?,
            None => EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map(OwnedFd::from)
                .map_err(|e| RequestError::Os("eventfd", e.into()))?,
        };
        let used = self
            .used_idx(i)
            .ok_or_else(|| invalid(format!("vring {i} used ring unreadable")))?;
        let mut next_avail = v.base;
        let mut held = v.held.clone();
        tracing::debug!(
            vring = i,
            base = next_avail,
            used,
            held = held.len(),
            "vring start"
        );
        if next_avail.wrapping_sub(used) != u16::try_from(held.len()).unwrap_or(u16::MAX) {
            // The frontend's base is ahead of the used ring with nothing held here: chains an
            // earlier backend popped and never used. Pop them again.
            tracing::warn!(
                vring = i,
                base = next_avail,
                used,
                held = held.len(),
                "base and used index disagree; resuming at the used index"
            );
            next_avail = used;
            held.clear();
        }
        // The frontend's size and addresses, translated, as a split ring must have them.
        let ring = RingAddresses::try_from(RawRingAddresses {
            size: v.size,
            desc: self.gpa(addrs.desc, "descriptor table", i)?,
            avail: self.gpa(addrs.avail, "avail ring", i)?,
            used: self.gpa(addrs.used, "used ring", i)?,
        })
        .map_err(|e| invalid(format!("vring {i}: {e}")))?;
        Ok((
            QueueConfig {
                ring,
                positions: RingPositions::new(next_avail, used),
                kick,
                call,
            },
            held,
        ))
    }

    /// Starts, stops or restarts the device so that exactly the ready pairs run.
    pub fn reconcile(&mut self) -> Result<(), RequestError> {
        let want: Vec<u16> = (0..self.config.queue_pairs)
            .filter(|&p| self.ready(usize::from(p)))
            .collect();
        let same = self.running.as_ref().map(|r| r.pairs.as_slice()) == Some(want.as_slice());
        if same && !self.restart {
            return Ok(());
        }
        if self.running.is_none() && want.is_empty() {
            self.restart = false;
            return Ok(());
        }
        self.stop_device();
        if want.is_empty() {
            return Ok(());
        }
        self.start_device(want)
    }

    pub(super) fn start_device(&mut self, pairs: Vec<u16>) -> Result<(), RequestError> {
        let memory = self
            .memory
            .clone()
            .ok_or_else(|| invalid("no memory table"))?;
        let mut specs = Vec::with_capacity(pairs.len());
        for &p in &pairs {
            let (rx, rx_in_flight) = self.queue_config(2 * usize::from(p))?;
            let (tx, _) = self.queue_config(2 * usize::from(p) + 1)?;
            specs.push((p, rx, tx, rx_in_flight));
        }
        let mut built = Vec::with_capacity(specs.len());
        for (p, rx, tx, rx_in_flight) in specs {
            let tap = self.tap_queue(p)?;
            // Copies: the frames stay kept until the device runs.
            let rx_carried = self
                .carried
                .get(usize::from(p))
                .map(|k| k.iter().map(|f| f.bytes().to_vec()).collect())
                .unwrap_or_default();
            built.push(QueuePairSpec {
                rx,
                tx,
                tap,
                rx_in_flight,
                rx_carried,
            });
        }
        let cfg = DeviceConfig {
            features: self.features & features::SUPPORTED,
            mtu: self.device_mtu(),
            mac: self.config.mac,
            engine: self.config.engine,
            engine_config: self.config.engine_config,
            cpu_affinity: pairs
                .iter()
                .map(|&p| {
                    self.config
                        .cpu_affinity
                        .get(usize::from(p))
                        .copied()
                        .flatten()
                })
                .collect(),
        };
        let device = Device::start(cfg, memory, built)?;
        tracing::info!(pairs = ?pairs, engine = %self.config.engine, features = format_args!("{:#x}", self.features), "device running");
        for &p in &pairs {
            if let Some(rx) = self.vrings.get_mut(2 * usize::from(p)) {
                rx.held.clear();
            }
            if let Some(kept) = self.carried.get_mut(usize::from(p)) {
                kept.clear();
            }
        }
        self.running = Some(Running { device, pairs });
        self.restart = false;
        Ok(())
    }

    pub(super) fn first_tap(&self) -> Result<&TapQueue, RequestError> {
        self.taps
            .first()
            .ok_or_else(|| invalid("the device has no TAP queue"))
    }

    /// The MTU the device runs with: the TAP's (which `NET_SET_MTU` sets), 1500 if it cannot be
    /// read.
    pub(super) fn device_mtu(&self) -> u16 {
        if let Some(m) = self.mtu {
            return m;
        }
        match self.first_tap().ok().map(link::mtu) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "TAP MTU unreadable; running with 1500");
                1500
            }
            None => 1500,
        }
    }

    pub(super) fn tap_queue(&self, pair: u16) -> Result<TapQueue, RequestError> {
        let fd = self
            .taps
            .get(usize::from(pair))
            .map(|q| q.as_fd().try_clone_to_owned())
            .ok_or_else(|| invalid(format!("no TAP queue for pair {pair}")))?
            .map_err(|e| RequestError::Os("dup of a TAP queue", e))?;
        Ok(TapQueue::adopt(fd)?)
    }
}
