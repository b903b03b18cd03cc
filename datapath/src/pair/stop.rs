//! The stop request a worker looks at between chains: one flag per worker, set by the
//! device before it signals the worker's stop eventfd, so that a worker in the middle of a
//! batch stops popping at its next chain instead of after the batch (issue 10, item 2).

use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;

/// A worker's stop request, shared between the device and the worker's queue pair.
#[derive(Clone, Debug, Default)]
pub struct StopRequest(Arc<AtomicBool>);

impl StopRequest {
    /// Asks the worker to stop (before its stop eventfd is signalled).
    pub fn request(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// True once a stop was requested. A Relaxed load per chain (the common case, no stop,
    /// costs no barrier); once it is seen, the Acquire fence pairs with the Release store in
    /// [`request`](Self::request), so everything the device wrote before asking is visible.
    pub fn is_requested(&self) -> bool {
        if self.0.load(Ordering::Relaxed) {
            fence(Ordering::Acquire);
            true
        } else {
            false
        }
    }
}
