//! A worker's ring: created disabled, its files registered, restricted to the engine's
//! opcodes on registered files, then enabled.

use io_uring::{opcode, squeue, IoUring};

/// The opcodes the engine submits: TAP reads and writes (Readv/Writev), eventfd reads and
/// writes (Read/Write), a poll on the TAP, the RX retry timeout, and the cancel at quiesce.
const RING_OPCODES: [u8; 7] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Read::CODE,
    opcode::Write::CODE,
    opcode::PollAdd::CODE,
    opcode::Timeout::CODE,
    opcode::AsyncCancel::CODE,
];

/// What an SQE on a worker's ring may do, since seccomp cannot see SQEs: only
/// `RING_OPCODES`, only on registered files (IOSQE_FIXED_FILE required, no other flag), and
/// no io_uring_register operation once the ring runs.
fn ring_restrictions() -> Vec<io_uring::register::Restriction> {
    use io_uring::register::Restriction;
    let mut r: Vec<Restriction> = RING_OPCODES
        .iter()
        .map(|&op| Restriction::sqe_op(op))
        .collect();
    r.push(Restriction::sqe_flags_required(
        squeue::Flags::FIXED_FILE.bits(),
    ));
    r
}

/// A ring for one worker, with `files` registered (slot i: `files[i]`), created disabled,
/// restricted (`ring_restrictions`), then enabled. The restrictions are part of the engine,
/// not of the process sandbox: `--no-sandbox` leaves them on.
pub(super) fn build_ring(entries: u32, files: &[std::os::fd::RawFd]) -> std::io::Result<IoUring> {
    // DEFER_TASKRUN runs completions only when we enter the kernel to wait, on this thread:
    // no IPIs, no task-work interrupting the loop. Older kernels fall back. TASKRUN_FLAG
    // (as old as COOP_TASKRUN, older than DEFER_TASKRUN) has the kernel say in the SQ flags
    // when task work waits, so a busy-polling loop enters the kernel only then.
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled()
        .build(entries)
        .or_else(|_| {
            IoUring::builder()
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled()
                .build(entries)
        })
        .or_else(|_| IoUring::builder().setup_r_disabled().build(entries))?;
    // The kernel takes registrations and the (single) restriction set only while the ring
    // is disabled; the restrictions bind from IORING_REGISTER_ENABLE_RINGS on.
    let submitter = ring.submitter();
    submitter.register_files(files)?;
    submitter.register_restrictions(&mut ring_restrictions())?;
    submitter.register_enable_rings()?;
    Ok(ring)
}
