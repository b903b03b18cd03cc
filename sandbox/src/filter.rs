//! The seccomp allow-list: every system call `tapir serve` and `tapir datapath` make after
//! set-up, on both engines (found by running the protocol, handoff and bench workloads under
//! `strace -f`), some narrowed by their arguments.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

/// What a system call outside the list does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Trap {
    /// `SIGSYS`: a handler writes "seccomp refused system call N" to stderr and exits with
    /// status 159 (128 + SIGSYS), so the refusal is in the daemon's log.
    #[default]
    Report,
    /// `SECCOMP_RET_KILL_PROCESS`: the kernel kills the process at once (no log line).
    Kill,
}

/// The flags glibc's `pthread_create` passes to `clone`: a new thread, never a new process.
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;

fn eq(arg: u8, value: u64) -> Cond {
    // Only argument numbers 0..=5 are used, which `new` accepts.
    Cond::new(arg, Len::Qword, Op::Eq, value).expect("valid argument index")
}

fn eq32(arg: u8, value: u64) -> Cond {
    Cond::new(arg, Len::Dword, Op::Eq, value).expect("valid argument index")
}

fn clear(arg: u8, bits: u64) -> Cond {
    Cond::new(arg, Len::Qword, Op::MaskedEq(bits), 0).expect("valid argument index")
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conds).expect("a rule has at least one condition")
}

/// One of these argument values (any of the rules).
fn any_of(arg: u8, values: &[u64], word: fn(u8, u64) -> Cond) -> Vec<SeccompRule> {
    values.iter().map(|&v| rule(vec![word(arg, v)])).collect()
}

type Entry = (&'static str, i64, Vec<SeccompRule>);

/// A non-negative C constant as a seccomp argument value.
fn c(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// The allow-list: (name, number, rules; no rules: any arguments).
// `Ioctl` is c_ulong with glibc and c_int elsewhere: the casts are needed on some targets.
#[allow(clippy::unnecessary_cast, clippy::cast_sign_loss)]
fn list() -> Vec<Entry> {
    use libc::*;
    let no_exec = || vec![rule(vec![clear(2, c(PROT_EXEC))])];
    let mut l: Vec<Entry> = vec![
        // Memory: guest regions, dirty logs, ring mappings, the allocator, thread stacks.
        // Never executable.
        ("mmap", SYS_mmap, no_exec()),
        ("mprotect", SYS_mprotect, no_exec()),
        ("munmap", SYS_munmap, vec![]),
        ("mremap", SYS_mremap, vec![]),
        ("madvise", SYS_madvise, vec![]),
        ("brk", SYS_brk, vec![]),
        // Threads: workers start and stop with every ring start, resume and handoff.
        (
            "clone",
            SYS_clone,
            vec![rule(vec![eq(0, THREAD_CLONE_FLAGS)])],
        ),
        // clone3's flags are in memory, out of seccomp's sight: a second filter makes it
        // fail with ENOSYS, so glibc falls back to clone, checked above.
        ("clone3", SYS_clone3, vec![]),
        ("set_robust_list", SYS_set_robust_list, vec![]),
        ("rseq", SYS_rseq, vec![]),
        ("futex", SYS_futex, vec![]),
        ("gettid", SYS_gettid, vec![]),
        ("getpid", SYS_getpid, vec![]),
        ("exit", SYS_exit, vec![]),
        ("exit_group", SYS_exit_group, vec![]),
        ("sched_getaffinity", SYS_sched_getaffinity, vec![]),
        ("sched_setaffinity", SYS_sched_setaffinity, vec![]),
        ("sched_getscheduler", SYS_sched_getscheduler, vec![]),
        ("sched_setscheduler", SYS_sched_setscheduler, vec![]),
        ("sched_yield", SYS_sched_yield, vec![]),
        // Thread names (std sets them with PR_SET_NAME).
        ("prctl", SYS_prctl, vec![rule(vec![eq(0, c(PR_SET_NAME))])]),
        ("rt_sigprocmask", SYS_rt_sigprocmask, vec![]),
        ("rt_sigaction", SYS_rt_sigaction, vec![]),
        ("rt_sigreturn", SYS_rt_sigreturn, vec![]),
        ("sigaltstack", SYS_sigaltstack, vec![]),
        // io_uring engine (what an SQE may do is restricted on each ring).
        ("io_uring_setup", SYS_io_uring_setup, vec![]),
        ("io_uring_enter", SYS_io_uring_enter, vec![]),
        ("io_uring_register", SYS_io_uring_register, vec![]),
        // Classic engine, the serve loop, the handoff channel.
        ("eventfd2", SYS_eventfd2, vec![]),
        ("epoll_create1", SYS_epoll_create1, vec![]),
        ("epoll_ctl", SYS_epoll_ctl, vec![]),
        ("epoll_pwait", SYS_epoll_pwait, vec![]),
        ("ppoll", SYS_ppoll, vec![]),
        ("read", SYS_read, vec![]),
        ("write", SYS_write, vec![]),
        ("readv", SYS_readv, vec![]),
        ("writev", SYS_writev, vec![]),
        ("close", SYS_close, vec![]),
        ("fcntl", SYS_fcntl, vec![]),
        ("dup", SYS_dup, vec![]),
        ("dup3", SYS_dup3, vec![]),
        // fd checks of what a frontend or a predecessor handed in.
        ("fstat", SYS_fstat, vec![]),
        ("newfstatat", SYS_newfstatat, vec![]),
        ("statx", SYS_statx, vec![]),
        ("readlinkat", SYS_readlinkat, vec![]),
        ("lseek", SYS_lseek, vec![]),
        // The TUN ioctls tapir makes on open queues (adopting handed-in queues, feature
        // changes, queue attach and detach), non-blocking / close-on-exec, and the link MTU
        // (`NET_SET_MTU`; setting it still needs CAP_NET_ADMIN, which the sandbox dropped).
        (
            "ioctl",
            SYS_ioctl,
            any_of(
                1,
                &[
                    TUNGETIFF as u64,
                    TUNSETOFFLOAD as u64,
                    TUNSETVNETHDRSZ as u64,
                    TUNGETVNETHDRSZ as u64,
                    SIOCGIFMTU,
                    SIOCSIFMTU,
                    TUNSETQUEUE as u64,
                    FIONBIO as u64,
                    FIOCLEX as u64,
                ],
                eq32,
            ),
        ),
        // Unix sockets only: the vhost-user socket in client mode, handoff channels.
        ("socket", SYS_socket, vec![rule(vec![eq32(0, c(AF_UNIX))])]),
        ("connect", SYS_connect, vec![]),
        ("accept4", SYS_accept4, vec![]),
        ("sendmsg", SYS_sendmsg, vec![]),
        ("recvmsg", SYS_recvmsg, vec![]),
        ("sendto", SYS_sendto, vec![]),
        ("recvfrom", SYS_recvfrom, vec![]),
        ("getsockopt", SYS_getsockopt, vec![]),
        ("setsockopt", SYS_setsockopt, vec![]),
        ("getsockname", SYS_getsockname, vec![]),
        ("shutdown", SYS_shutdown, vec![]),
        // A listener's socket file goes when it is dropped.
        ("unlinkat", SYS_unlinkat, vec![]),
        // A version-3 handoff's ownership word: a sealed one-page memfd per handoff (only
        // close-on-exec and sealable; never executable).
        (
            "memfd_create",
            SYS_memfd_create,
            vec![rule(vec![eq32(
                1,
                u64::from(MFD_CLOEXEC | MFD_ALLOW_SEALING),
            )])],
        ),
        ("ftruncate", SYS_ftruncate, vec![]),
        // Handoff fencing of a successor.
        ("kill", SYS_kill, vec![rule(vec![eq32(1, c(SIGKILL))])]),
        ("pidfd_open", SYS_pidfd_open, vec![]),
        ("pidfd_send_signal", SYS_pidfd_send_signal, vec![]),
        ("getuid", SYS_getuid, vec![]),
        ("geteuid", SYS_geteuid, vec![]),
        ("getgid", SYS_getgid, vec![]),
        ("getegid", SYS_getegid, vec![]),
        ("getrandom", SYS_getrandom, vec![]),
        ("clock_gettime", SYS_clock_gettime, vec![]),
        ("clock_nanosleep", SYS_clock_nanosleep, vec![]),
        ("nanosleep", SYS_nanosleep, vec![]),
        ("restart_syscall", SYS_restart_syscall, vec![]),
    ];
    #[cfg(target_arch = "x86_64")]
    l.extend([
        ("poll", SYS_poll, vec![]),
        ("epoll_wait", SYS_epoll_wait, vec![]),
        ("unlink", SYS_unlink, vec![]),
        ("readlink", SYS_readlink, vec![]),
    ]);
    l
}

/// The names of the allowed system calls.
pub fn allowed_syscalls() -> Vec<&'static str> {
    list().into_iter().map(|(name, _, _)| name).collect()
}

fn arch() -> Result<TargetArch, BackendError> {
    TargetArch::try_from(std::env::consts::ARCH)
}

/// The BPF programs, in the order they are installed: clone3 -> ENOSYS, then the
/// allow-list (last, as installing a filter takes prctl and seccomp calls the allow-list
/// refuses).
pub(crate) fn build(trap: Trap) -> Result<Vec<BpfProgram>, BackendError> {
    let refused = match trap {
        Trap::Report => SeccompAction::Trap,
        Trap::Kill => SeccompAction::KillProcess,
    };
    let rules: BTreeMap<i64, Vec<SeccompRule>> =
        list().into_iter().map(|(_, nr, r)| (nr, r)).collect();
    let allow = SeccompFilter::new(rules, refused, SeccompAction::Allow, arch()?)?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
        arch()?,
    )?;
    Ok(vec![clone3.try_into()?, allow.try_into()?])
}
