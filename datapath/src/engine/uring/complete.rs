//! What each completion does to the loop and the queue pair.

use super::{EventRead, Loop, Op, Phase, RxGate, RxWait};
use crate::engine::{EngineError, EngineKind, WorkerFault};
use crate::pair::{Direction, QueuePair};

impl Loop {
    pub(super) fn complete(
        &mut self,
        pair: &mut QueuePair,
        op: Op,
        res: i32,
    ) -> Result<(), EngineError> {
        match op {
            Op::Tx(slot) => {
                let result = usize::try_from(res).map_err(|_| -res);
                pair.complete_tx(&self.tx[slot], result);
                self.tx_free.push(slot);
                self.tx_inflight -= 1;
                self.tx_pending = true;
            }
            Op::Rx(slot) => {
                self.rx_posted -= 1;
                // The one read waiting in the kernel (`RxGate::Waiting`) is back.
                let waited = self.rx_gate == RxGate::Waiting;
                match usize::try_from(res) {
                    Ok(n) if n > 0 => {
                        if waited {
                            self.rx_gate = RxGate::Open;
                            pair.counters.rx_woken_reads += 1;
                        }
                        // Frames complete in order: behind a frame waiting for guest buffers,
                        // the next ones wait too.
                        self.rx[slot].set_frame(n);
                        self.rx_waiting.push_back(slot);
                        self.drain_rx_waiting(pair);
                        self.rx_burst = (self.rx_burst + 1).min(self.rx_depth);
                        self.rx_pending = true;
                        return Ok(());
                    }
                    _ => {
                        pair.return_rx(&mut self.rx[slot]);
                        if res == -libc::EAGAIN {
                            self.rx_burst = (self.rx_burst / 2).max(1);
                            if waited {
                                // This kernel does not wait in such a read: poll instead.
                                self.rx_wait = RxWait::Poll;
                            }
                            if self.rx_gate != RxGate::Paused {
                                self.rx_gate = RxGate::Empty;
                            }
                        } else if res == -libc::ECANCELED {
                            if waited {
                                self.rx_gate = RxGate::Empty;
                            }
                        } else if self.phase == Phase::Running && self.rx_gate != RxGate::Paused {
                            self.pause_rx(pair, res)?;
                        }
                    }
                }
                self.rx_free.push(slot);
                self.rx_pending = true;
            }
            Op::Kick(dir) => {
                // End of file, a short read or an error other than EAGAIN: the fd is not an
                // eventfd and will never kick; re-posting the read would spin.
                let dead = (0..8).contains(&res)
                    || (res < 0 && ![-libc::EAGAIN, -libc::EINTR, -libc::ECANCELED].contains(&res));
                let running = self.phase == Phase::Running;
                if dead && running {
                    pair.kick_failed(dir);
                    return Ok(());
                }
                if res == 8 {
                    match dir {
                        Direction::Tx => {
                            pair.counters.tx_kicks += 1;
                            self.tx_pending = true;
                        }
                        Direction::Rx => {
                            pair.counters.rx_kicks += 1;
                            self.rx_pending = true;
                        }
                    }
                }
                if running && res != -libc::ECANCELED {
                    self.post_event_read(EventRead::Kick(dir))?;
                }
            }
            Op::Stop => {
                if res == 8 {
                    if let Some(fault) = WorkerFault::from_stop_value(self.event_buf[2]) {
                        return inject(fault);
                    }
                }
                if res != -libc::ECANCELED && self.phase == Phase::Running {
                    self.phase = Phase::Stopping;
                }
            }
            Op::Call(dir) if res == -libc::EOPNOTSUPP || res == -libc::EINVAL => {
                // This kernel's eventfd takes no RWF_NOWAIT: plain non-blocking writes from
                // now on, and this interrupt again.
                self.call_nowait = false;
                pair.signal(dir);
            }
            Op::RxRetry => {
                self.rx_gate = RxGate::Open;
                self.rx_pending = true;
            }
            Op::Call(_) | Op::Cancel | Op::WarmUp => {}
        }
        Ok(())
    }
}

/// Fails as a test asked ([`crate::Device::inject_fault`]).
fn inject(fault: WorkerFault) -> Result<(), EngineError> {
    match fault {
        WorkerFault::Panic => panic!("uring engine: injected panic (a test's fault)"),
        WorkerFault::Error => Err(EngineError::Io {
            engine: EngineKind::Uring,
            what: "an injected fault",
            source: std::io::Error::other("a test's fault"),
        }),
    }
}
