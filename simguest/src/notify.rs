//! Notification handling on a [`RawQueue`]: the kick decision after
//! publishing buffers (virtio 1.2 §2.7.10) and interrupt arming plus blocking
//! on the call eventfd (§2.7.7).

use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};
use std::time::Duration;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::Error;
use crate::ring::{RawQueue, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY};

/// `vring_need_event` from the spec (§2.7.10): true if `event_idx` lies in
/// `[old, new)` in wrapping u16 arithmetic.
#[must_use]
pub fn vring_need_event(event_idx: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event_idx).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Milliseconds for `poll`, rounded up so short timeouts do not spin.
fn poll_timeout(timeout: Duration) -> PollTimeout {
    let ms = timeout.as_nanos().div_ceil(1_000_000);
    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
}

impl RawQueue {
    /// Publishes the shadow avail index and kicks the device if it asked
    /// for it. Returns whether it kicked.
    pub(crate) fn flush_and_kick(&mut self) -> bool {
        let old = self.last_kick_avail;
        let new = self.publish();
        self.last_kick_avail = new;
        if new == old {
            return false;
        }
        // virtio 1.2 §2.7.10 (and Linux's virtqueue_kick_prepare): the idx
        // store must be visible before we read the device's suppression
        // state, otherwise the device may check avail.idx, see nothing new
        // and re-enable notifications just after we read them as disabled —
        // a lost wakeup. Store→load ordering needs a full SeqCst fence.
        fence(Ordering::SeqCst);
        let kick = if self.event_idx {
            vring_need_event(self.avail_event(), new, old)
        } else {
            self.used_flags() & VIRTQ_USED_F_NO_NOTIFY == 0
        };
        if kick {
            self.kick();
        } else {
            self.stats.kicks_suppressed += 1;
        }
        kick
    }

    /// Asks the device for an interrupt once it writes the used entry at
    /// position `event` (i.e. used.idx moves past it).
    fn arm_interrupt(&self, event: u16) {
        if self.event_idx {
            self.set_used_event(event);
        } else {
            self.set_avail_flags(self.avail_flags() & !VIRTQ_AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Suppresses interrupts again after a wait (like NAPI). With EVENT_IDX
    /// `used_event` is simply left behind; it only fires again on wrap.
    fn disarm_interrupt(&self) {
        if !self.event_idx {
            self.set_avail_flags(self.avail_flags() | VIRTQ_AVAIL_F_NO_INTERRUPT);
        }
    }

    /// Arms the interrupt, re-checks the used ring, and otherwise blocks on
    /// the call eventfd for up to `timeout`. Returns true if an interrupt
    /// arrived or at least `need` (>= 1) used entries beyond `last_used` are
    /// available (RX waits for the rest of a partially used packet).
    pub(crate) fn wait_used(
        &mut self,
        last_used: u16,
        need: u16,
        timeout: Duration,
    ) -> Result<bool, Error> {
        self.stats.waits += 1;
        let need = need.max(1);
        let ready = |q: &Self| q.used_idx().wrapping_sub(last_used) >= need;
        self.arm_interrupt(last_used.wrapping_add(need - 1));
        // virtio 1.2 §2.7.7: after enabling interrupts (store to used_event
        // or avail.flags) the driver must re-check the used ring, and that
        // load must not be reordered before the store, or a completion that
        // the device saw as "no interrupt wanted" is missed. Full fence.
        fence(Ordering::SeqCst);
        let result = if ready(self) {
            Ok(true)
        } else {
            self.stats.wait_blocks += 1;
            self.block_on_call(timeout)
                .map(|woken| woken || ready(self))
        };
        self.disarm_interrupt();
        result
    }

    /// Polls the call eventfd; drains it if readable.
    fn block_on_call(&mut self, timeout: Duration) -> Result<bool, Error> {
        let readable = {
            let mut fds = [PollFd::new(self.call_eventfd().as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, poll_timeout(timeout)) {
                Ok(n) => n > 0,
                // A signal: report "maybe work" and let the caller re-poll.
                Err(Errno::EINTR) => false,
                Err(e) => return Err(e.into()),
            }
        };
        if readable {
            self.read_call();
        }
        Ok(readable)
    }
}

#[cfg(test)]
mod tests {
    use super::vring_need_event;

    #[test]
    fn need_event_matches_spec() {
        // Event at 0, moving 0 -> 1 crosses it.
        assert!(vring_need_event(0, 1, 0));
        // Event at 0, moving 1 -> 2 does not.
        assert!(!vring_need_event(0, 2, 1));
        // Event at 5 inside [3, 8).
        assert!(vring_need_event(5, 8, 3));
        assert!(!vring_need_event(8, 8, 3));
        // Wrapping.
        assert!(vring_need_event(0xffff, 2, 0xfffe));
        assert!(vring_need_event(1, 2, 0xfffe));
    }
}
