//! `--no-sandbox`, `--user`, `--group`: the sandbox options of `tapir serve` and `tapir
//! datapath` (see `tapir-sandbox`).

use anyhow::{Context, Result};
use clap::Args;
use tapir_sandbox::{Ids, Lockdown, Sandbox, SandboxConfig};

#[derive(Args, Clone, Debug)]
pub struct SandboxArgs {
    /// Keep every privilege after set-up (debugging): no capability dropped, no id change,
    /// no seccomp filter.
    #[arg(long, conflicts_with_all = ["user", "group"])]
    no_sandbox: bool,
    /// Switch to this user (name or uid) once the TAP is open, before binding sockets.
    #[arg(long)]
    user: Option<String>,
    /// Switch to this group (name or gid; default: the --user's primary group).
    #[arg(long)]
    group: Option<String>,
}

impl SandboxArgs {
    /// The sandbox to enter after set-up (workers asking for SCHED_FIFO at
    /// `realtime_priority`).
    pub fn lockdown(&self, realtime_priority: Option<u8>) -> Result<Lockdown> {
        if self.no_sandbox {
            return Ok(Lockdown::Off);
        }
        let ids = Ids::resolve(self.user.as_deref(), self.group.as_deref())?;
        let sandbox = Sandbox::new(SandboxConfig {
            ids,
            realtime_priority,
            ..SandboxConfig::default()
        })
        .context("preparing the sandbox")?;
        Ok(Lockdown::Sandboxed(Box::new(sandbox)))
    }
}
