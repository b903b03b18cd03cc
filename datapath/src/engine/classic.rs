//! The classic engine: epoll and one `readv`/`writev` per chain (QEMU, Firecracker and Cloud
//! Hypervisor work this way). The fallback where io_uring is disabled, and the baseline.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::{Engine, EngineConfig, EngineError, EngineKind, Leftovers, WorkerFault};
use crate::pair::{Direction, QueuePair, RxCompletion, RxPrep, RxRead, RxRetry, TxPop, TxWrite};
use crate::tap::TapQueue;
use crate::virtqueue::Kick;

const TOKEN_TX_KICK: u64 = 1;
const TOKEN_RX_KICK: u64 = 2;
const TOKEN_TAP: u64 = 3;
const TOKEN_STOP: u64 = 4;

/// The epoll + readv/writev engine.
#[derive(Debug)]
pub struct ClassicEngine {
    cfg: EngineConfig,
}

impl ClassicEngine {
    /// An engine with these tunables.
    pub fn new(cfg: EngineConfig) -> ClassicEngine {
        ClassicEngine { cfg }
    }
}

fn io_err(what: &'static str, source: io::Error) -> EngineError {
    EngineError::Io {
        engine: EngineKind::Classic,
        what,
        source,
    }
}

fn errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// What TX found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TxOutcome {
    /// The ring is empty and the guest's kick is armed: wait.
    Idle,
    /// The burst limit or the pass's budget: come back without waiting for a kick.
    More,
    /// The stop request was seen between chains.
    Stopped,
}

/// Writes every available TX chain to the TAP, one `writev` each, looking at the stop
/// request before each chain.
fn process_tx(pair: &mut QueuePair, tap: &TapQueue, w: &mut TxWrite, burst: usize) -> TxOutcome {
    for _ in 0..burst {
        match pair.pop_tx(w) {
            TxPop::Chain => {}
            TxPop::Yield => return TxOutcome::More,
            TxPop::Idle => return TxOutcome::Idle,
            TxPop::Stopped => return TxOutcome::Stopped,
        }
        let iovcnt = libc::c_int::try_from(w.seg.iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the iovecs point into mapped guest memory and are valid for the call.
        let rc = unsafe { libc::writev(tap.as_raw_fd(), w.seg.iov.as_ptr(), iovcnt) };
        pair.counters.io_syscalls += 1;
        let result = usize::try_from(rc).map_err(|_| errno());
        pair.complete_tx(w, result);
    }
    // Let RX and interrupts in; come back without waiting for a kick.
    TxOutcome::More
}

/// What RX found.
enum RxOutcome {
    /// The TAP has no more frames.
    TapEmpty,
    /// The guest has no more buffers.
    NoBuffers,
    /// The burst limit was reached.
    Burst,
    /// The stop request was seen between chains.
    Stopped,
}

/// The RX side of the loop: one read, and whether its frame waits for guest buffers (then
/// nothing else is read before it is in, to keep frames in order).
struct ClassicRx {
    read: RxRead,
    waiting: RxWait,
}

/// Whether the read's frame waits for guest buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RxWait {
    Free,
    Deferred,
}

impl ClassicRx {
    /// Tries the waiting frame again. None once it is in.
    fn retry(&mut self, pair: &mut QueuePair) -> Option<RxOutcome> {
        match pair.retry_deferred(&mut self.read) {
            RxRetry::Done => {
                self.waiting = RxWait::Free;
                None
            }
            RxRetry::Waiting => Some(RxOutcome::NoBuffers),
            RxRetry::Yield => Some(RxOutcome::Burst),
        }
    }
}

/// Reads frames from the TAP into guest buffers, one `readv` each.
fn process_rx(pair: &mut QueuePair, tap: &TapQueue, rx: &mut ClassicRx, burst: usize) -> RxOutcome {
    if rx.waiting == RxWait::Deferred {
        if let Some(outcome) = rx.retry(pair) {
            return outcome;
        }
    }
    for _ in 0..burst {
        match pair.prepare_rx(&mut rx.read, false) {
            RxPrep::Ready => {}
            RxPrep::Withheld => return RxOutcome::Burst,
            RxPrep::NoBuffers => return RxOutcome::NoBuffers,
            RxPrep::Stopped => return RxOutcome::Stopped,
        }
        let r = &mut rx.read;
        let iovcnt = libc::c_int::try_from(r.seg.iov.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the iovecs point into mapped guest memory and the read's spill area, both
        // valid for the call.
        let rc = unsafe { libc::readv(tap.as_raw_fd(), r.seg.iov.as_ptr(), iovcnt) };
        pair.counters.io_syscalls += 1;
        match usize::try_from(rc) {
            Ok(n) if n > 0 => {
                if pair.complete_rx(r, n) == RxCompletion::Deferred {
                    rx.waiting = RxWait::Deferred;
                    if let Some(outcome) = rx.retry(pair) {
                        return outcome;
                    }
                }
            }
            _ => {
                let e = errno();
                pair.return_rx(r);
                if e != libc::EAGAIN {
                    tracing::warn!(pair = pair.index, errno = e, "TAP read failed");
                }
                return RxOutcome::TapEmpty;
            }
        }
    }
    RxOutcome::Burst
}

/// What a busy-poll spell found.
enum Polled {
    /// Ready fds (in the events array).
    Events(usize),
    /// Chains on a ring the device waits on.
    GuestPosted,
    /// Nothing within the budget (or no busy polling): sleep in `epoll_wait`.
    Sleep,
}

/// Busy polling ([`EngineConfig::busy_poll`]): instead of sleeping at once, look for up to
/// `budget` for ready fds (a zero-timeout `epoll_wait`: the TAP, kicks, the stop) and for
/// chains on a ring the device waits on. The guest's kicks stay armed meanwhile.
fn poll_busily(
    epoll: &Epoll,
    events: &mut [EpollEvent],
    pair: &mut QueuePair,
    budget: std::time::Duration,
) -> Result<Polled, EngineError> {
    let deadline = std::time::Instant::now() + budget;
    loop {
        pair.counters.busy_poll_rounds += 1;
        match epoll.wait(events, EpollTimeout::ZERO) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            Ok(n) => {
                pair.counters.busy_poll_found += 1;
                return Ok(Polled::Events(n));
            }
            Err(e) => return Err(io_err("epoll_wait", e.into())),
        }
        if pair.guest_posted() {
            pair.counters.busy_poll_found += 1;
            return Ok(Polled::GuestPosted);
        }
        if std::time::Instant::now() >= deadline {
            // What the spell counted is visible while the worker sleeps.
            pair.publish();
            return Ok(Polled::Sleep);
        }
        std::hint::spin_loop();
    }
}

/// Reads the stop eventfd: a test's injected fault, or a plain stop.
fn read_fault(stop: &OwnedFd) -> Option<WorkerFault> {
    let mut buf = [0u8; 8];
    match nix::unistd::read(stop, &mut buf) {
        Ok(8) => WorkerFault::from_stop_value(u64::from_ne_bytes(buf)),
        _ => None,
    }
}

/// Fails as a test asked ([`crate::Device::inject_fault`]).
fn inject(fault: WorkerFault) -> Result<Leftovers, EngineError> {
    match fault {
        WorkerFault::Panic => panic!("classic engine: injected panic (a test's fault)"),
        WorkerFault::Error => Err(io_err(
            "an injected fault",
            io::Error::other("a test's fault"),
        )),
    }
}

impl Engine for ClassicEngine {
    fn kind(&self) -> EngineKind {
        EngineKind::Classic
    }

    fn run(
        &mut self,
        pair: &mut QueuePair,
        tap: &TapQueue,
        stop: &OwnedFd,
        ready: &mut dyn FnMut(&mut QueuePair) -> bool,
    ) -> Result<Leftovers, EngineError> {
        let epoll =
            Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| EngineError::Setup {
                engine: EngineKind::Classic,
                source: e.into(),
            })?;
        let add = |fd: std::os::fd::BorrowedFd<'_>, token: u64| {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(|e| io_err("epoll_ctl", e.into()))
        };
        add(pair.tx.kick.as_fd(), TOKEN_TX_KICK)?;
        add(pair.rx.kick.as_fd(), TOKEN_RX_KICK)?;
        add(stop.as_fd(), TOKEN_STOP)?;
        add(tap.as_fd(), TOKEN_TAP)?;
        // Allocated before the start gate, not after it: the read's spill area is a fresh
        // mapping, and a successor paid for it inside the blackout (mark_resumed -> loop
        // start 14 µs p50, 42 µs p90 under the handoff bench's traffic; 3 and 5 after).
        let mut w = TxWrite::new();
        let mut rx = ClassicRx {
            read: RxRead::new(pair.rx_read_chains()),
            waiting: RxWait::Free,
        };
        if !ready(pair) {
            return Ok(Leftovers(None));
        }
        let mut tap_armed = true;
        let burst = self.cfg.tx_depth.max(1);
        let rx_burst = self.cfg.rx_depth.max(1);
        let mut events = [EpollEvent::empty(); 8];
        let mut tx_more = true;
        let mut rx_more = true;
        loop {
            let timeout = if tx_more || rx_more {
                EpollTimeout::ZERO
            } else {
                EpollTimeout::NONE
            };
            let polled = match (timeout == EpollTimeout::NONE, self.cfg.busy_poll) {
                (true, Some(budget)) if !budget.is_zero() => {
                    poll_busily(&epoll, &mut events, pair, budget)?
                }
                _ => Polled::Sleep,
            };
            let n = match polled {
                Polled::Events(n) => n,
                Polled::GuestPosted => {
                    tx_more = true;
                    rx_more = true;
                    0
                }
                Polled::Sleep => match epoll.wait(&mut events, timeout) {
                    Ok(n) => n,
                    Err(nix::errno::Errno::EINTR) => 0,
                    Err(e) => return Err(io_err("epoll_wait", e.into())),
                },
            };
            pair.counters.batches += 1;
            pair.begin_pass();
            let mut stopping = pair.stop_requested();
            for ev in events.iter().take(n) {
                match ev.data() {
                    TOKEN_TX_KICK => {
                        match pair.tx.drain_kick() {
                            Kick::Kicked(_) => pair.counters.tx_kicks += 1,
                            Kick::None => {}
                            Kick::Dead => {
                                pair.kick_failed(Direction::Tx);
                                let _ = epoll.delete(pair.tx.kick.as_fd());
                            }
                        }
                        tx_more = true;
                    }
                    TOKEN_RX_KICK => {
                        match pair.rx.drain_kick() {
                            Kick::Kicked(_) => pair.counters.rx_kicks += 1,
                            Kick::None => {}
                            Kick::Dead => {
                                pair.kick_failed(Direction::Rx);
                                let _ = epoll.delete(pair.rx.kick.as_fd());
                            }
                        }
                        rx_more = true;
                    }
                    TOKEN_TAP => rx_more = true,
                    TOKEN_STOP => {
                        if let Some(fault) = read_fault(stop) {
                            return inject(fault);
                        }
                        stopping = true;
                    }
                    _ => {}
                }
            }
            if !stopping && tx_more {
                let outcome = process_tx(pair, tap, &mut w, burst);
                tx_more = outcome == TxOutcome::More;
                stopping = outcome == TxOutcome::Stopped;
            }
            if !stopping && rx_more {
                let outcome = process_rx(pair, tap, &mut rx, rx_burst);
                rx_more = matches!(outcome, RxOutcome::Burst);
                stopping = matches!(outcome, RxOutcome::Stopped);
                // Without guest buffers, stop listening to the TAP (it would wake us for
                // nothing); the RX kick re-arms it.
                let want_tap = !matches!(outcome, RxOutcome::NoBuffers);
                if !stopping && want_tap != tap_armed {
                    let flags = if want_tap {
                        EpollFlags::EPOLLIN
                    } else {
                        EpollFlags::empty()
                    };
                    epoll
                        .modify(tap.as_fd(), &mut EpollEvent::new(flags, TOKEN_TAP))
                        .map_err(|e| io_err("epoll_ctl", e.into()))?;
                    tap_armed = want_tap;
                }
            }
            if stopping {
                // Nothing is in flight between syscalls: quiescing is just stopping here
                // (the stop request is seen before every chain, so at most one chain's
                // syscall after it); a frame still waiting for guest buffers is kept in the
                // pair (a handoff carries it, a resumed worker delivers it first).
                if rx.waiting == RxWait::Deferred
                    && pair.retry_rx(&mut rx.read) == RxCompletion::Deferred
                {
                    pair.carry_deferred(&mut rx.read);
                }
                break;
            }
            pair.raise_interrupts();
            pair.publish();
        }
        pair.raise_interrupts();
        pair.publish();
        Ok(Leftovers(Some(Box::new((epoll, w, rx.read)))))
    }
}
