//! Least privilege for `tapir serve` and `tapir datapath` once their set-up is done (the TAP
//! and the listening sockets open): no new privileges, other user and group ids if asked,
//! every capability dropped, and a seccomp allow-list of the system calls the daemons make
//! from then on (see `docs/ARCHITECTURE.md`, "Sandbox").
//!
//! [`Sandbox::new`] does everything that may need files (resolving names, compiling the BPF
//! programs) at start; [`Sandbox::drop_privileges`] (after the TAP is open, on a process
//! still single-threaded: capabilities are per thread) and [`Sandbox::confine`] (after the
//! sockets are bound) then only make system calls.

mod caps;
mod filter;
mod sigsys;

use std::io;

pub use filter::{allowed_syscalls, Trap};

/// Errors of preparing or entering the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// A `--user` or `--group` that names nobody on this system.
    #[error("unknown {what} {name:?}")]
    UnknownId {
        /// "user" or "group".
        what: &'static str,
        /// The name given.
        name: String,
    },
    /// The user database could not be read.
    #[error("looking up {what} {name:?}: {source}")]
    Lookup {
        /// "user" or "group".
        what: &'static str,
        /// The name given.
        name: String,
        /// The error.
        #[source]
        source: nix::errno::Errno,
    },
    /// Compiling the seccomp filter failed (a bug in the allow-list).
    #[error("building the seccomp filter: {0}")]
    Filter(#[from] seccompiler::BackendError),
    /// The process has more than one thread: dropping capabilities would leave the others
    /// theirs.
    #[error("the sandbox must be entered by a single-threaded process ({0} threads run)")]
    Threads(usize),
    /// A system call of entering the sandbox failed.
    #[error("{what}: {source}")]
    Os {
        /// Which step.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Capabilities are still there after dropping them.
    #[error("capabilities left after dropping them: {0}")]
    CapsLeft(String),
    /// Installing the seccomp filter failed.
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// Ids to switch to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    /// The user id (real, effective and saved).
    pub uid: u32,
    /// The group id (real, effective and saved); supplementary groups are cleared.
    pub gid: u32,
}

impl Ids {
    /// Resolves `--user` (a name or a number) and `--group` (likewise; default: the user's
    /// primary group, or the current group with no user). None: keep the current ids.
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Ids>, SandboxError> {
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let (uid, primary) = match user {
            Some(u) => {
                let found = match u.parse::<u32>() {
                    Ok(n) => nix::unistd::User::from_uid(n.into()),
                    Err(_) => nix::unistd::User::from_name(u),
                }
                .map_err(|source| SandboxError::Lookup {
                    what: "user",
                    name: u.to_owned(),
                    source,
                })?;
                match (found, u.parse::<u32>()) {
                    (Some(user), _) => (user.uid.as_raw(), user.gid.as_raw()),
                    // A bare number need not be in the user database.
                    (None, Ok(n)) => (n, nix::unistd::getgid().as_raw()),
                    (None, Err(_)) => {
                        return Err(SandboxError::UnknownId {
                            what: "user",
                            name: u.to_owned(),
                        })
                    }
                }
            }
            None => (
                nix::unistd::getuid().as_raw(),
                nix::unistd::getgid().as_raw(),
            ),
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => nix::unistd::Group::from_name(g)
                    .map_err(|source| SandboxError::Lookup {
                        what: "group",
                        name: g.to_owned(),
                        source,
                    })?
                    .ok_or_else(|| SandboxError::UnknownId {
                        what: "group",
                        name: g.to_owned(),
                    })?
                    .gid
                    .as_raw(),
            },
        };
        Ok(Some(Ids { uid, gid }))
    }
}

/// What to prepare.
#[derive(Clone, Debug, Default)]
pub struct SandboxConfig {
    /// Switch to these ids before dropping capabilities.
    pub ids: Option<Ids>,
    /// The workers will ask for `SCHED_FIFO` at this priority: `RLIMIT_RTPRIO` is raised to
    /// it while the process may still do so, so that no capability is needed for it later.
    pub realtime_priority: Option<u8>,
    /// What a refused system call does.
    pub trap: Trap,
}

/// A prepared sandbox: the BPF programs are compiled, the ids resolved.
#[derive(Clone, Debug)]
pub struct Sandbox {
    config: SandboxConfig,
    filters: Vec<seccompiler::BpfProgram>,
}

impl Sandbox {
    /// Compiles the filters for this architecture.
    pub fn new(config: SandboxConfig) -> Result<Sandbox, SandboxError> {
        let filters = filter::build(config.trap)?;
        Ok(Sandbox { config, filters })
    }

    /// Both steps at once, for a process whose set-up needs no sockets bound as the new
    /// user.
    pub fn enter(&self) -> Result<(), SandboxError> {
        self.drop_privileges()?;
        self.confine()
    }

    /// Step one, right after the last step that needs a capability (opening the TAP):
    /// `RLIMIT_RTPRIO` (if asked), `PR_SET_NO_NEW_PRIVS`, the bounding and ambient
    /// capability sets emptied, the ids switched (setgroups, setgid, setuid), then the
    /// effective, permitted and inheritable sets emptied and checked. Sockets bound after
    /// it belong to the new ids (their files, and the credentials a peer sees with
    /// `SO_PEERCRED`, which handoffs compare). Call it single-threaded.
    pub fn drop_privileges(&self) -> Result<(), SandboxError> {
        let threads = caps::thread_count()?;
        if threads != 1 {
            return Err(SandboxError::Threads(threads));
        }
        // Symbolizing a backtrace (a panic, an anyhow error printed at exit, with
        // RUST_BACKTRACE set) opens the executable, which the filter refuses: the process
        // would die of SIGSYS instead of reporting. No backtraces in the sandbox.
        std::env::set_var("RUST_BACKTRACE", "0");
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
        if let Some(prio) = self.config.realtime_priority {
            caps::allow_realtime(prio)?;
        }
        caps::no_new_privs()?;
        caps::drop_bounding_and_ambient()?;
        if let Some(ids) = self.config.ids {
            caps::switch_ids(ids)?;
        }
        caps::drop_all()
    }

    /// Step two, before the first frontend or peer is served: the seccomp filters, on every
    /// thread (TSYNC).
    pub fn confine(&self) -> Result<(), SandboxError> {
        if self.config.trap == Trap::Report {
            sigsys::install()?;
        }
        for f in &self.filters {
            seccompiler::apply_filter_all_threads(f)?;
        }
        tracing::info!(
            ids = ?self.config.ids,
            syscalls = filter::allowed_syscalls().len(),
            "sandbox entered: no capabilities, no new privileges, seccomp allow-list"
        );
        Ok(())
    }
}

/// `--no-sandbox` or not.
#[derive(Clone, Debug)]
pub enum Lockdown {
    /// Enter this sandbox once set-up is done.
    Sandboxed(Box<Sandbox>),
    /// Keep every privilege (debugging).
    Off,
}

impl Lockdown {
    /// [`Sandbox::drop_privileges`], if sandboxed.
    pub fn drop_privileges(&self) -> Result<(), SandboxError> {
        match self {
            Lockdown::Sandboxed(s) => s.drop_privileges(),
            Lockdown::Off => Ok(()),
        }
    }

    /// [`Sandbox::confine`], if sandboxed.
    pub fn confine(&self) -> Result<(), SandboxError> {
        match self {
            Lockdown::Sandboxed(s) => s.confine(),
            Lockdown::Off => Ok(()),
        }
    }

    /// Both, if sandboxed.
    pub fn enter(&self) -> Result<(), SandboxError> {
        self.drop_privileges()?;
        self.confine()
    }

    /// The ids [`Lockdown::drop_privileges`] switches to, if any (files made before the
    /// switch are given to them).
    pub fn ids(&self) -> Option<Ids> {
        match self {
            Lockdown::Sandboxed(s) => s.config.ids,
            Lockdown::Off => None,
        }
    }
}
