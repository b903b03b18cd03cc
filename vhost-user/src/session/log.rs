//! The frontend's dirty log during a live migration: whether it is kept, and the
//! datapath's dirty marks moved into it.

use vhost::vhost_user::VhostUserVirtioFeatures;

use super::{DirtyAtStop, Session};

impl Session {
    /// Whether the dirty log must be kept.
    pub fn logging(&self) -> bool {
        self.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0 && self.log.is_some()
    }

    /// Moves the datapath's dirty marks into the frontend's log (when logging); returns the
    /// pages moved.
    pub fn flush_log(&self) -> usize {
        if let (true, Some(log), Some(mem)) = (self.logging(), &self.log, &self.memory) {
            let pages = log.flush(mem);
            if pages > 0 {
                tracing::trace!(pages, "dirty pages moved into the frontend's log");
            }
            return pages;
        }
        0
    }

    /// Reports a ring stop while the frontend logs (the `ring_stopped_logging` event): the pages
    /// reported dirty (`flushed`, the pages tapir wrote, or all of guest memory with
    /// [`DirtyAtStop::AllPages`]).
    pub(super) fn report_ring_stop(&self, i: usize, flushed: usize) {
        if let (true, Some(log), Some(mem)) = (self.logging(), &self.log, &self.memory) {
            let guest_pages: u64 = mem.regions().iter().map(|r| r.size.div_ceil(4096)).sum();
            let all_pages = self.config.dirty_at_stop == DirtyAtStop::AllPages;
            let dirty_pages = if all_pages {
                // `--all-dirty-at-ring-stop`: QEMU's final pass then sends the guest whole,
                // which also covers pages QEMU itself lost track of (docs/QEMU.md, "Live
                // migration"), at the price of a stop-and-copy phase that grows with guest
                // memory.
                log.mark_all(mem)
            } else {
                flushed as u64
            };
            crate::daemon::event(format!(
            "{{\"event\":\"ring_stopped_logging\",\"vring\":{i},\"dirty_pages\":{dirty_pages},\"guest_pages\":{guest_pages},\"all_pages\":{all_pages}}}"
        ));
        }
    }
}
