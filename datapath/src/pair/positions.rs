//! Where a queue pair resumes: ring positions and the RX heads a predecessor held.

use tapir_state::{HeldHeads, QueueSize, RingPositions};

use super::{bump, Direction, QueuePair};
use crate::virtqueue::QueueError;

/// Most frames a pair carries over a stop (a uring worker holds at most its RX depth, 64 by
/// default, of reads waiting for guest buffers; tapir-state's `MAX_CARRIED_FRAMES`): more
/// are dropped and counted (`rx_dropped_no_buffers`).
pub const MAX_CARRIED_FRAMES: usize = 64;

/// Where a queue pair resumes: each queue's positions, the RX heads a predecessor held, in
/// ring order, and the frames it had read and not yet delivered. (The one form of a pair's
/// position: the datapath's stop, the handoff's snapshot and switch, and the vhost-user
/// session's ring stop all use it.)
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairPositions {
    /// RX positions.
    pub rx: RingPositions,
    /// TX positions.
    pub tx: RingPositions,
    /// RX heads popped and not used, in ring order.
    pub rx_in_flight: Vec<u16>,
    /// Frames read from the TAP and not yet in guest buffers (vnet header included), oldest
    /// first: delivered before anything else is read.
    pub rx_carried: Vec<Vec<u8>>,
}
impl PairPositions {
    /// Checks positions against a queue size: as many RX heads held as the ring positions
    /// say are outstanding, each below the size and listed once, no TX chain outstanding.
    pub fn check(&self, size_rx: u16, size_tx: u16) -> Result<(), String> {
        let rx_size = QueueSize::try_from(size_rx).map_err(|e| format!("RX: {e}"))?;
        let tx_size = QueueSize::try_from(size_tx).map_err(|e| format!("TX: {e}"))?;
        HeldHeads::at(rx_size, self.rx, self.rx_in_flight.clone())
            .map_err(|e| format!("RX: {e}"))?;
        self.tx.check(tx_size).map_err(|e| format!("TX: {e}"))?;
        if self.tx.outstanding() != 0 {
            return Err("TX chains outstanding at a switch".into());
        }
        if self.rx_carried.len() > MAX_CARRIED_FRAMES {
            return Err(format!(
                "{} carried RX frames, at most {MAX_CARRIED_FRAMES}",
                self.rx_carried.len()
            ));
        }
        Ok(())
    }
}

impl QueuePair {
    /// Moves the pair to where a predecessor stopped (before its worker services anything).
    pub fn reposition(&mut self, p: &PairPositions) -> Result<(), QueueError> {
        self.rx.set_positions(p.rx);
        self.tx.set_positions(p.tx);
        self.restore_rx_in_flight(&p.rx_in_flight)?;
        self.set_carried(p.rx_carried.clone());
        Ok(())
    }

    /// Replaces the frames the pair delivers before it reads from the TAP (oldest first).
    /// Bounded like a stop's carry: beyond [`MAX_CARRIED_FRAMES`] the youngest are dropped
    /// and counted (`rx_dropped_no_buffers`); a frame the pair cannot take is dropped and
    /// counted when it is delivered.
    pub fn set_carried(&mut self, frames: Vec<Vec<u8>>) {
        let over = frames.len().saturating_sub(MAX_CARRIED_FRAMES);
        self.counters.rx_dropped_no_buffers = self
            .counters
            .rx_dropped_no_buffers
            .saturating_add(u64::try_from(over).unwrap_or(u64::MAX));
        self.rx_carried = frames.into_iter().take(MAX_CARRIED_FRAMES).collect();
    }

    /// Frames read from the TAP and not yet in guest buffers, oldest first (what a handoff
    /// carries to the successor).
    pub fn rx_carried(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.rx_carried.iter().map(Vec::as_slice)
    }

    /// Takes over RX heads a predecessor popped and did not use (in ring order). Each must be
    /// below the queue size and listed once, and there must be exactly as many as the ring
    /// positions say are outstanding (`next_avail - next_used`).
    pub fn restore_rx_in_flight(&mut self, heads: &[u16]) -> Result<(), QueueError> {
        let outstanding = usize::from(self.rx.positions().outstanding());
        let size = usize::from(self.rx.table().size);
        let mut seen = vec![false; size];
        let bad = |reason: String| QueueError::InvalidConfig {
            index: self.rx.index,
            reason,
        };
        if heads.len() != outstanding {
            return Err(bad(format!(
                "{} in-flight heads, but the ring positions say {outstanding}",
                heads.len()
            )));
        }
        for &h in heads {
            match seen.get_mut(usize::from(h)) {
                Some(s) if !*s => *s = true,
                Some(_) => return Err(bad(format!("in-flight head {h} listed twice"))),
                None => return Err(bad(format!("in-flight head {h} >= queue size {size}"))),
            }
        }
        self.rx_pool.clear();
        for &h in heads {
            self.rx_pool.note_popped(h);
            // Checked above: in range and listed once.
            let _ = self.rx.hold(h);
            match self.rx_pool.walk(&self.mem, self.rx.view(), h) {
                Ok(c) => self.rx_pool.push_back(c),
                Err(e) => {
                    bump(&mut self.counters.rx_malformed);
                    tracing::warn!(queue = self.rx.index, head = h, error = %e, "dropping malformed RX chain");
                    self.complete_used(Direction::Rx, h, 0);
                }
            }
        }
        Ok(())
    }
}
