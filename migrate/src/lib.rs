//! tapir-migrate: hands a running datapath to a successor process over a Unix socket.
//!
//! Will hold the prepare / switch / commit protocol with SCM_RIGHTS fd passing and
//! rollback (see `docs/HANDOFF.md` once written). Tracked by the handoff issue; empty
//! until then.
