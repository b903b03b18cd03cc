//! The privilege steps: no new privileges, capability sets, ids.

use std::io;

use crate::{Ids, SandboxError};

fn os(what: &'static str) -> impl FnOnce(io::Error) -> SandboxError {
    move |source| SandboxError::Os { what, source }
}

fn check(what: &'static str, rc: libc::c_int) -> Result<(), SandboxError> {
    if rc < 0 {
        return Err(os(what)(io::Error::last_os_error()));
    }
    Ok(())
}

/// The threads of this process.
pub(crate) fn thread_count() -> Result<usize, SandboxError> {
    Ok(std::fs::read_dir("/proc/self/task")
        .map_err(os("reading /proc/self/task"))?
        .count())
}

/// Raises `RLIMIT_RTPRIO` to `prio`, so that workers may become `SCHED_FIFO` at that
/// priority without `CAP_SYS_NICE`.
pub(crate) fn allow_realtime(prio: u8) -> Result<(), SandboxError> {
    let limit = libc::rlimit {
        rlim_cur: libc::rlim_t::from(prio),
        rlim_max: libc::rlim_t::from(prio),
    };
    // SAFETY: setrlimit reads the struct, valid for the call.
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_RTPRIO, &limit) };
    check("setrlimit(RLIMIT_RTPRIO)", rc)
}

pub(crate) fn no_new_privs() -> Result<(), SandboxError> {
    // SAFETY: plain prctl with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    check("prctl(PR_SET_NO_NEW_PRIVS)", rc)
}

/// Empties the bounding set (needs CAP_SETPCAP: without it, as for an unprivileged user,
/// the bounding set stays, which no-new-privileges and the seccomp filter, which refuses
/// execve, make moot) and the ambient set.
pub(crate) fn drop_bounding_and_ambient() -> Result<(), SandboxError> {
    // SAFETY: plain prctl with integer arguments.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    check("prctl(PR_CAP_AMBIENT_CLEAR_ALL)", rc)?;
    if current()?.effective & (1 << CAP_SETPCAP) == 0 {
        tracing::debug!("no CAP_SETPCAP: the capability bounding set stays as it is");
        return Ok(());
    }
    for cap in 0..64 {
        // SAFETY: plain prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            // EINVAL: past the last capability this kernel knows.
            if e.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(os("prctl(PR_CAPBSET_DROP)")(e));
        }
    }
    Ok(())
}

/// setgroups (none), setgid, setuid: real, effective and saved ids, in that order (the
/// group changes need the privileges the user change gives up).
pub(crate) fn switch_ids(ids: Ids) -> Result<(), SandboxError> {
    // SAFETY: setgroups with a zero count reads no memory.
    let rc = unsafe { libc::setgroups(0, std::ptr::null()) };
    check("setgroups", rc)?;
    let gid = nix::unistd::Gid::from_raw(ids.gid);
    nix::unistd::setresgid(gid, gid, gid).map_err(|e| os("setresgid")(e.into()))?;
    let uid = nix::unistd::Uid::from_raw(ids.uid);
    nix::unistd::setresuid(uid, uid, uid).map_err(|e| os("setresuid")(e.into()))?;
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_VERSION_3: u32 = 0x2008_0522;
/// From <linux/capability.h>.
const CAP_SETPCAP: u32 = 8;

/// A thread's capability sets.
#[derive(Debug)]
struct Sets {
    effective: u64,
    permitted: u64,
    inheritable: u64,
}

fn join(lo: u32, hi: u32) -> u64 {
    u64::from(lo) | (u64::from(hi) << 32)
}

/// The calling thread's sets.
fn current() -> Result<Sets, SandboxError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget writes two `CapData` (version 3) and reads the header; both live for
    // the call.
    let rc = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if rc != 0 {
        return Err(os("capget")(io::Error::last_os_error()));
    }
    let [lo, hi] = data;
    Ok(Sets {
        effective: join(lo.effective, hi.effective),
        permitted: join(lo.permitted, hi.permitted),
        inheritable: join(lo.inheritable, hi.inheritable),
    })
}

/// Empties the effective, permitted and inheritable sets and checks they are empty.
pub(crate) fn drop_all() -> Result<(), SandboxError> {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset reads the header and two `CapData` (version 3), all valid for the call.
    let rc = unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) };
    if rc != 0 {
        return Err(os("capset")(io::Error::last_os_error()));
    }
    match current()? {
        Sets {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        } => Ok(()),
        left => Err(SandboxError::CapsLeft(format!("{left:?}"))),
    }
}
