//! The raw TAP "floor": how fast one thread can push frames into / pull frames
//! out of a TAP queue with io_uring, with no virtqueue in between.
//!
//! Both directions use one ring (`SINGLE_ISSUER | DEFER_TASKRUN` when the
//! kernel has them, else `COOP_TASKRUN`, else plain), the TAP queue fd
//! registered as fixed file 0, and preallocated buffers. `cpu_ns` is the
//! calling thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`) over the run, which
//! with `DEFER_TASKRUN` includes the kernel work of the reads/writes.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use tapir_testkit::cpu;
use tapir_testkit::frames::VNET_HDR_LEN;

/// Errors from the floor runs.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// A ring operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Invalid arguments.
    #[error("invalid arguments: {0}")]
    Config(String),
}

fn io_err(context: &'static str) -> impl FnOnce(io::Error) -> FloorError {
    move |source| FloorError::Io { context, source }
}

/// Outcome of a floor run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FloorResult {
    /// Frames moved.
    pub packets: u64,
    /// Frame bytes moved (vnet headers excluded).
    pub bytes: u64,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// CPU time of the calling thread during the run, in nanoseconds.
    pub cpu_ns: u64,
    /// Failed completions (other than `EAGAIN`).
    pub errors: u64,
    /// `EAGAIN` completions (rx: nothing to read; tx: queue full).
    pub eagain: u64,
    /// The first error's errno, if any.
    pub first_errno: Option<i32>,
    /// rx: reads that filled the whole buffer (possibly truncated frames).
    pub full_reads: u64,
    /// `io_uring_enter` calls made.
    pub submits: u64,
    /// Which ring setup was used: 2 = `SINGLE_ISSUER|DEFER_TASKRUN`,
    /// 1 = `COOP_TASKRUN`, 0 = plain.
    pub ring_mode: u8,
}

impl FloorResult {
    fn record_error(&mut self, res: i32) {
        if res == -libc::EAGAIN {
            self.eagain += 1;
        } else {
            self.errors += 1;
            self.first_errno.get_or_insert(-res);
        }
    }
}

/// Builds the ring, preferring `SINGLE_ISSUER | DEFER_TASKRUN`.
fn build_ring(entries: u32) -> Result<(IoUring, u8), FloorError> {
    if let Ok(r) = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(entries)
    {
        return Ok((r, 2));
    }
    if let Ok(r) = IoUring::builder().setup_coop_taskrun().build(entries) {
        return Ok((r, 1));
    }
    IoUring::new(entries)
        .map(|r| (r, 0))
        .map_err(io_err("io_uring_setup"))
}

fn u32_of(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn u64_of(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Submits and waits for at least `want` completions (or `timeout`).
/// Timeouts and interrupts are not errors.
fn submit_wait(ring: &IoUring, want: usize, timeout: Duration) -> Result<(), FloorError> {
    let ts = types::Timespec::from(timeout);
    let args = types::SubmitArgs::new().timespec(&ts);
    match ring.submitter().submit_with_args(want, &args) {
        Ok(_) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ETIME | libc::EINTR | libc::EBUSY)
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(FloorError::Io {
            context: "io_uring_enter",
            source: e,
        }),
    }
}

/// Writes prebuilt frames (each including its 12-byte vnet header) to the TAP
/// queue `tap_fd` for `duration`: `batch` `Write` SQEs per submit, frames
/// round-robin.
///
/// # Errors
/// Empty `frames`, `batch == 0`, or ring setup/submit failures. Failed writes
/// are counted, not returned.
pub fn floor_tx(
    tap_fd: BorrowedFd<'_>,
    frames: &[Vec<u8>],
    batch: usize,
    duration: Duration,
) -> Result<FloorResult, FloorError> {
    if frames.is_empty() || batch == 0 || batch > 4096 {
        return Err(FloorError::Config(
            "need frames and 1 <= batch <= 4096".into(),
        ));
    }
    if frames.iter().any(|f| f.len() <= VNET_HDR_LEN) {
        return Err(FloorError::Config(
            "every frame must start with a 12-byte vnet header".into(),
        ));
    }
    let (mut ring, mode) = build_ring(u32_of(batch.next_power_of_two()))?;
    ring.submitter()
        .register_files(&[tap_fd.as_raw_fd()])
        .map_err(io_err("register_files"))?;
    let fixed = types::Fixed(0);
    let mut res = FloorResult {
        ring_mode: mode,
        ..FloorResult::default()
    };
    let start = Instant::now();
    let deadline = start + duration;
    let cpu0 = cpu::thread_cpu_time();
    let mut cursor = 0usize;
    let mut inflight = 0usize;
    let mut outcome = Ok(());
    loop {
        if inflight == 0 {
            if Instant::now() >= deadline {
                break;
            }
            let mut sq = ring.submission();
            for _ in 0..batch {
                let f = &frames[cursor];
                let sqe = opcode::Write::new(fixed, f.as_ptr(), u32_of(f.len()))
                    .build()
                    .user_data(u64_of(cursor));
                // SAFETY: the frame buffers are borrowed for the whole call and
                // every submitted write is reaped before returning.
                if unsafe { sq.push(&sqe) }.is_err() {
                    break;
                }
                inflight += 1;
                cursor = (cursor + 1) % frames.len();
            }
        }
        res.submits += 1;
        if let Err(e) = submit_wait(&ring, inflight, Duration::from_millis(100)) {
            outcome = Err(e);
            break;
        }
        for cqe in ring.completion() {
            inflight -= 1;
            let r = cqe.result();
            if r >= 0 {
                res.packets += 1;
                let n = usize::try_from(r).unwrap_or(0);
                res.bytes += u64_of(n.saturating_sub(VNET_HDR_LEN));
            } else {
                res.record_error(r);
            }
        }
    }
    // On an enter failure, still reap what was submitted before returning
    // (the buffers must outlive the writes).
    drain(&mut ring, &mut inflight, &mut res);
    res.elapsed = start.elapsed();
    res.cpu_ns = cpu_ns_since(cpu0);
    outcome.map(|()| res)
}

fn cpu_ns_since(cpu0: std::time::Duration) -> u64 {
    u64::try_from(cpu::thread_cpu_time().saturating_sub(cpu0).as_nanos()).unwrap_or(u64::MAX)
}

const CANCEL_UD: u64 = u64::MAX;

/// Cancels everything in flight and reaps until nothing is.
fn drain(ring: &mut IoUring, inflight: &mut usize, res: &mut FloorResult) {
    if *inflight == 0 {
        return;
    }
    let cancel = opcode::AsyncCancel2::new(types::CancelBuilder::any())
        .build()
        .user_data(CANCEL_UD);
    // SAFETY: a cancel SQE references no user memory.
    let mut pushed = unsafe { ring.submission().push(&cancel) }.is_ok();
    while *inflight > 0 || pushed {
        // Keep trying until everything is reaped: the buffers must outlive
        // every request (only EINTR/EBUSY-like transient errors occur here).
        if ring.submit_and_wait(1).is_err() {
            std::thread::yield_now();
            continue;
        }
        for cqe in ring.completion() {
            if cqe.user_data() == CANCEL_UD {
                pushed = false;
                continue;
            }
            *inflight -= 1;
            let r = cqe.result();
            if r > 0 {
                res.packets += 1;
                let n = usize::try_from(r).unwrap_or(0);
                res.bytes += u64_of(n.saturating_sub(VNET_HDR_LEN));
            } else if r != -libc::ECANCELED {
                res.record_error(r);
            }
        }
    }
}

/// Reads frames from the TAP queue `tap_fd` for `duration`, keeping `depth`
/// `Read`s of `buf_size` bytes posted (re-posted on completion).
///
/// `buf_size` must hold the vnet header plus the largest frame: a read into a
/// smaller buffer silently truncates (counted in `full_reads`). Use at least
/// `12 + 65550` (65562) when GSO frames can arrive.
///
/// # Errors
/// `depth == 0`, `buf_size <= 12`, or ring setup/submit failures.
pub fn floor_rx(
    tap_fd: BorrowedFd<'_>,
    buf_size: usize,
    depth: usize,
    duration: Duration,
) -> Result<FloorResult, FloorError> {
    if depth == 0 || depth > 4096 || buf_size <= VNET_HDR_LEN {
        return Err(FloorError::Config(
            "need 1 <= depth <= 4096 and buf_size > 12".into(),
        ));
    }
    let (mut ring, mode) = build_ring(u32_of((depth + 1).next_power_of_two()))?;
    ring.submitter()
        .register_files(&[tap_fd.as_raw_fd()])
        .map_err(io_err("register_files"))?;
    let fixed = types::Fixed(0);
    let mut bufs = vec![0u8; depth * buf_size];
    let base = bufs.as_mut_ptr();
    let read_sqe = |slot: usize| {
        // SAFETY: `slot < depth`, so the offset stays inside `bufs`.
        let ptr = unsafe { base.add(slot * buf_size) };
        opcode::Read::new(fixed, ptr, u32_of(buf_size))
            .build()
            .user_data(u64_of(slot))
    };
    let mut res = FloorResult {
        ring_mode: mode,
        ..FloorResult::default()
    };
    let start = Instant::now();
    let deadline = start + duration;
    let cpu0 = cpu::thread_cpu_time();
    let mut inflight = 0usize;
    {
        let mut sq = ring.submission();
        for slot in 0..depth {
            // SAFETY: each read targets its own `buf_size` region of `bufs`,
            // which outlives every read (drained before returning).
            if unsafe { sq.push(&read_sqe(slot)) }.is_err() {
                break;
            }
            inflight += 1;
        }
    }
    let mut outcome = Ok(());
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        res.submits += 1;
        let wait = (deadline - now).min(Duration::from_millis(50));
        if let Err(e) = submit_wait(&ring, 1, wait) {
            outcome = Err(e);
            break;
        }
        let mut repost = [0usize; 64];
        loop {
            let mut n = 0;
            for cqe in ring.completion().take(repost.len()) {
                inflight -= 1;
                let r = cqe.result();
                let slot = usize::try_from(cqe.user_data()).unwrap_or(0);
                if r > 0 {
                    let len = usize::try_from(r).unwrap_or(0);
                    res.packets += 1;
                    res.bytes += u64_of(len.saturating_sub(VNET_HDR_LEN));
                    if len == buf_size {
                        res.full_reads += 1;
                    }
                } else {
                    res.record_error(r);
                }
                repost[n] = slot;
                n += 1;
            }
            if n == 0 {
                break;
            }
            let mut sq = ring.submission();
            for &slot in &repost[..n] {
                // SAFETY: as above; the slot's previous read has completed.
                if unsafe { sq.push(&read_sqe(slot)) }.is_ok() {
                    inflight += 1;
                }
            }
        }
    }
    drain(&mut ring, &mut inflight, &mut res);
    res.elapsed = start.elapsed();
    res.cpu_ns = cpu_ns_since(cpu0);
    drop(ring);
    drop(bufs);
    outcome.map(|()| res)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::{GeneratorConfig, PacketGenerator, RunControl, Template};
    use std::net::Ipv4Addr;
    use std::os::fd::AsFd;
    use tapir_testkit::frames::{self, FlowSpec};
    use tapir_testkit::netns::{add_addr, disable_ipv6, link_up, run_in_new_netns, set_mac};
    use tapir_testkit::raw_tap::open_tap;

    fn spec() -> FlowSpec {
        FlowSpec {
            src_mac: [0x02, 0, 0, 0, 0, 0x02],
            // Not the TAP's MAC: the stack drops these as PACKET_OTHERHOST.
            dst_mac: [0x02, 0, 0, 0, 0, 0x99],
            src_ip: Ipv4Addr::new(10, 0, 0, 2),
            dst_ip: Ipv4Addr::new(10, 0, 0, 1),
            src_port: 9001,
            dst_port: 9000,
        }
    }

    fn setup() -> std::os::fd::OwnedFd {
        disable_ipv6().unwrap();
        let fd = open_tap("tap0").unwrap();
        set_mac("tap0", [0x02, 0, 0, 0, 0, 0x01]).unwrap();
        add_addr("tap0", "10.0.0.1/24").unwrap();
        link_up("tap0").unwrap();
        fd
    }

    fn tx_frames(len: usize) -> Vec<Vec<u8>> {
        (0..8u64)
            .map(|s| {
                let mut b = vec![0u8; VNET_HDR_LEN + len];
                let n = frames::build_udp_vnet(&mut b, &spec(), len, 0, s).unwrap();
                b.truncate(n);
                b
            })
            .collect()
    }

    fn run_tx(d: Duration) -> FloorResult {
        run_in_new_netns(move || {
            let tap = setup();
            floor_tx(tap.as_fd(), &tx_frames(64), 64, d).unwrap()
        })
        .unwrap()
    }

    fn run_rx(d: Duration) -> (FloorResult, crate::peers::GeneratorReport) {
        run_in_new_netns(move || {
            let tap = setup();
            let mut b = vec![0u8; 128];
            let n = frames::build_udp(&mut b, &spec().reversed(), 64, 0, 0).unwrap();
            let mut cfg = GeneratorConfig::new(
                "tap0",
                vec![Template::plain(b[..n].to_vec())],
                RunControl::for_duration(d + Duration::from_millis(50)),
            );
            cfg.batch = 64;
            let gen = PacketGenerator::new(cfg).unwrap().spawn().unwrap();
            let r = floor_rx(tap.as_fd(), 2048, 256, d).unwrap();
            let g = gen.stop_and_join().unwrap();
            (r, g)
        })
        .unwrap()
    }

    #[test]
    fn floor_tx_moves_packets() {
        let r = run_tx(Duration::from_millis(200));
        assert!(r.packets > 0, "{r:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.bytes, r.packets * 64);
        assert!(r.cpu_ns > 0);
    }

    #[test]
    fn floor_rx_moves_packets() {
        let (r, g) = run_rx(Duration::from_millis(200));
        assert!(r.packets > 0, "{r:?} {g:?}");
        assert_eq!(r.errors, 0, "{r:?}");
        assert_eq!(r.full_reads, 0);
        assert!(r.packets <= g.stats.packets + 16, "{r:?} {g:?}");
    }

    #[test]
    fn floor_rx_idle_returns_on_time() {
        let r = run_in_new_netns(|| {
            let tap = setup();
            floor_rx(tap.as_fd(), 2048, 8, Duration::from_millis(100)).unwrap()
        })
        .unwrap();
        assert_eq!(r.errors, 0, "{r:?}");
        // Reads on the O_NONBLOCK TAP fd are poll-armed, not failed with EAGAIN.
        assert_eq!(r.eagain, 0, "{r:?}");
        assert!(r.elapsed < Duration::from_millis(500));
        assert!(floor_rx(std::io::stdin().as_fd(), 8, 1, Duration::ZERO).is_err());
    }
}
