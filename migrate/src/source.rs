//! The source side of a handoff: prepare while running, switch (the only blackout), commit
//! or roll back.

use std::os::fd::BorrowedFd;
use std::time::Instant;

use tapir_datapath::{Device, GuestMemory, PairResources, QuiescedDevice};
use tapir_state::DeviceSnapshot;

use crate::fence::Fence;
use crate::protocol::{self, expect, MigrateError, Timeouts, Versions};
use crate::snapshot::describe;
use crate::switch_v3::SourceWord;
use crate::transport::{deadline_after, Channel, MAX_FDS_PER_MESSAGE};

/// Something that can be handed to a successor: a running device, or a VMM (or test parent)
/// launching the first datapath process.
pub trait HandoffSource {
    /// The layout snapshot (rings at 0, nothing in flight) and the fds, in manifest order.
    fn layout(&self) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>);
    /// Stops servicing the rings; returns the final snapshot.
    fn quiesce(&mut self) -> Result<DeviceSnapshot, MigrateError>;
    /// Takes service back after a switch that failed.
    fn resume(&mut self) -> Result<(), MigrateError>;
    /// State handed on besides the device, sent at prepare time: an opaque blob for the
    /// successor's embedder and its fds (at most 250, the channel's limit). The source must not
    /// change it between prepare and commit. Default: nothing.
    fn extension(&self) -> (Vec<u8>, Vec<BorrowedFd<'_>>) {
        (Vec::new(), Vec::new())
    }
}

enum DeviceState {
    Running(Device),
    Quiesced(QuiescedDevice),
    Gone,
}

/// A running device as a handoff source.
pub struct DeviceSource {
    state: DeviceState,
    generation: u64,
}

impl DeviceSource {
    /// Wraps a running device; `generation` counts handoffs so far (the successor gets +1).
    pub fn new(device: Device, generation: u64) -> DeviceSource {
        DeviceSource {
            state: DeviceState::Running(device),
            generation,
        }
    }

    /// The device, if it is running (after a rollback, or when no handoff happened).
    pub fn into_running(self) -> Option<Device> {
        match self.state {
            DeviceState::Running(d) => Some(d),
            _ => None,
        }
    }

    /// After a committed handoff: unmaps guest memory gently (see
    /// [`GuestMemory::release_gently`]) before the process tears the rest down.
    pub fn release(self) {
        if let DeviceState::Quiesced(q) = &self.state {
            q.memory.release_gently();
        }
    }

    /// The running device.
    pub fn device(&self) -> Option<&Device> {
        match &self.state {
            DeviceState::Running(d) => Some(d),
            _ => None,
        }
    }
}

impl HandoffSource for DeviceSource {
    fn layout(&self) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>) {
        let (config, memory, resources): (_, &GuestMemory, &[PairResources]) = match &self.state {
            DeviceState::Running(d) => (d.config(), d.memory(), d.resources()),
            DeviceState::Quiesced(q) => (&q.config, &q.memory, q.resources.as_slice()),
            DeviceState::Gone => unreachable!("layout of a device that is gone"),
        };
        describe(
            config,
            memory,
            resources,
            None,
            self.generation.saturating_add(1),
        )
    }

    fn quiesce(&mut self) -> Result<DeviceSnapshot, MigrateError> {
        let state = std::mem::replace(&mut self.state, DeviceState::Gone);
        let quiesced = match state {
            DeviceState::Running(d) => d.quiesce()?,
            DeviceState::Quiesced(q) => q,
            DeviceState::Gone => return Err(MigrateError::Fds("device is gone".into())),
        };
        let (snapshot, _) = snapshot_of(&quiesced, self.generation.saturating_add(1));
        self.state = DeviceState::Quiesced(quiesced);
        Ok(snapshot)
    }

    fn resume(&mut self) -> Result<(), MigrateError> {
        let state = std::mem::replace(&mut self.state, DeviceState::Gone);
        self.state = match state {
            DeviceState::Quiesced(q) => DeviceState::Running(q.resume()?),
            other => other,
        };
        Ok(())
    }
}

/// What a committed handoff looked like.
#[derive(Clone, Copy, Debug, Default)]
pub struct HandoffReport {
    /// The successor's pid.
    pub successor_pid: i32,
    /// When the source stopped servicing (CLOCK_MONOTONIC ns).
    pub quiesce_ns: u64,
    /// When the successor said RUNNING.
    pub running_ns: u64,
    /// When the quiesce finished and SWITCH went out.
    pub switch_sent_ns: u64,
    /// When READY arrived (version 3, which has none: when SWITCH went out).
    pub ready_ns: u64,
    /// The protocol version the handoff spoke.
    pub version: u16,
}

/// How a handoff ended.
#[derive(Debug)]
pub enum Outcome {
    /// The successor runs the device; the source must close its fds and go.
    Committed(HandoffReport),
    /// The successor failed or vanished; the source runs again (or never stopped).
    RolledBack(MigrateError),
}

pub(crate) fn abort(ch: &Channel, why: &MigrateError) {
    let _ = ch.send(protocol::ABORT, why.to_string().as_bytes(), &[]);
}

/// Hands `source` to the successor at the other end of `ch`. Errors before the switch leave
/// the source running; errors during it resume the source (rollback). Only a source that can
/// neither quiesce nor resume gives an `Err`.
pub fn hand_off(
    source: &mut dyn HandoffSource,
    ch: &Channel,
    t: Timeouts,
) -> Result<Outcome, MigrateError> {
    // Prepare: the source keeps running.
    let (fence, word) = match prepare(source, ch, t) {
        Ok(v) => v,
        Err(e) => {
            abort(ch, &e);
            return Ok(Outcome::RolledBack(e));
        }
    };
    if let Some(word) = word {
        return crate::switch_v3::hand_over(source, ch, &fence, &word, t);
    }
    switch_v2(source, ch, &fence, t)
}

/// Version 2's switch: quiesce, SWITCH, READY, GO, RUNNING.
fn switch_v2(
    source: &mut dyn HandoffSource,
    ch: &Channel,
    fence: &Fence,
    t: Timeouts,
) -> Result<Outcome, MigrateError> {
    // Switch: the blackout starts here.
    let quiesce_ns = tapir_datapath::monotonic_ns();
    let snapshot = source.quiesce()?;
    let quiesced_ns = tapir_datapath::monotonic_ns();
    let mut payload = quiesce_ns.to_le_bytes().to_vec();
    payload.extend_from_slice(&tapir_state::encode(&snapshot));
    let ready = ch
        .send(protocol::SWITCH, &payload, &[])
        .map_err(MigrateError::from)
        .and_then(|()| {
            let msg = ch.recv_spinning(Some(t.switch))?;
            expect(&msg, protocol::READY, "READY")
        });
    if let Err(e) = ready {
        // The successor has not touched a ring (it only does after GO): resume.
        abort(ch, &e);
        source.resume()?;
        return Ok(Outcome::RolledBack(e));
    }
    let ready_ns = tapir_datapath::monotonic_ns();
    ch.send(protocol::GO, &[], &[]).ok();
    // Ownership is decided here, once: a RUNNING within the switch timeout commits (and
    // nothing fences the successor afterwards); anything else fires the fence, and from then
    // on nothing the channel says counts (see HANDOFF.md, "Fence and commit").
    match after_go(ch, fence, t) {
        Ok(()) => Ok(Outcome::Committed(HandoffReport {
            successor_pid: fence.pid(),
            quiesce_ns,
            running_ns: tapir_datapath::monotonic_ns(),
            switch_sent_ns: quiesced_ns,
            ready_ns,
            version: 2,
        })),
        Err(e) => {
            source.resume()?;
            Ok(Outcome::RolledBack(e))
        }
    }
}

/// Waits for RUNNING after GO (or after STATE_ONLY): `Ok` commits; an ABORT rolls back. Any
/// other outcome (a timeout, a closed or broken channel, another message) fences the
/// successor first: it is killed
/// through its pidfd and waited for, and the channel is not read again, so that a RUNNING
/// sent later through a dup of its fd cannot make the source commit to a dead process.
fn after_go(ch: &Channel, fence: &Fence, t: Timeouts) -> Result<(), MigrateError> {
    let got = ch
        .recv_spinning(Some(t.switch))
        .map_err(MigrateError::from)
        .and_then(|msg| expect(&msg, protocol::RUNNING, "RUNNING"));
    let e = match got {
        Ok(()) => return Ok(()),
        // It says it will not run (it did not touch a ring: RUNNING goes out first).
        Err(e @ MigrateError::Aborted(_)) => return Err(e),
        Err(e) => e,
    };
    tracing::error!(pid = fence.pid(), error = %e, "no RUNNING from the successor; fencing it");
    let fenced = fence.fire(t.prepare);
    tracing::warn!(
        pid = fence.pid(),
        ?fenced,
        "successor fenced; the source takes the device back"
    );
    Err(e)
}

/// Hands on embedder state when no device runs (a vhost-user daemon between frontends, or
/// before the guest started its rings): HELLO, STATE_ONLY with the blob and fds, RUNNING. The
/// caller must not change or use the state meanwhile; on `RolledBack` it carries on as if
/// nothing happened, on `Committed` the successor owns it.
pub fn hand_off_state(
    ch: &Channel,
    blob: &[u8],
    fds: &[BorrowedFd<'_>],
    t: Timeouts,
) -> Result<Outcome, MigrateError> {
    let deadline = deadline_after(t.prepare);
    let offered = (|| {
        let (fence, version) = check_hello(ch, deadline)?;
        if fds.len() > MAX_FDS_PER_MESSAGE {
            return Err(MigrateError::Fds(format!(
                "{} fds, at most {MAX_FDS_PER_MESSAGE}",
                fds.len()
            )));
        }
        ch.send(protocol::STATE_ONLY, blob, fds)?;
        Ok((fence, version, tapir_datapath::monotonic_ns()))
    })();
    let (fence, version, sent_ns) = match offered {
        Ok(v) => v,
        Err(e) => {
            abort(ch, &e);
            return Ok(Outcome::RolledBack(e));
        }
    };
    // The successor answers once it has taken the state: give it the prepare time.
    let t_state = Timeouts {
        switch: t.prepare,
        ..t
    };
    match after_go(ch, &fence, t_state) {
        Ok(()) => Ok(Outcome::Committed(HandoffReport {
            successor_pid: fence.pid(),
            quiesce_ns: sent_ns,
            running_ns: tapir_datapath::monotonic_ns(),
            switch_sent_ns: sent_ns,
            ready_ns: sent_ns,
            version,
        })),
        Err(e) => Ok(Outcome::RolledBack(e)),
    }
}

/// Receives HELLO by `deadline`, agrees on a protocol version (the highest both speak; the
/// successor learns it from a VERSION message, unless it is version 2, which has none) and
/// pins the process the HELLO names.
fn check_hello(ch: &Channel, deadline: Instant) -> Result<(Fence, u16), MigrateError> {
    let hello = ch.recv_by(deadline)?;
    expect(&hello, protocol::HELLO, "HELLO")?;
    let (theirs, pid) = Versions::of_hello(&hello.payload)?;
    let version = Versions::spoken().agree(theirs)?;
    if !hello.fds.is_empty() {
        return Err(MigrateError::Fds(format!(
            "HELLO carries {} fds",
            hello.fds.len()
        )));
    }
    let fence = Fence::at_hello(ch, pid)?;
    if version > 2 {
        ch.send(protocol::VERSION, &version.to_le_bytes(), &[])?;
    }
    tracing::debug!(version, successor = %theirs, "handoff protocol agreed");
    Ok((fence, version))
}

/// The prepare phase, under one deadline: HELLO, (VERSION,) PREPARE, FDS, EXTENSION,
/// (OWNERSHIP,) PREPARED. Returns the fence and, for version 3, the ownership word.
fn prepare(
    source: &mut dyn HandoffSource,
    ch: &Channel,
    t: Timeouts,
) -> Result<(Fence, Option<SourceWord>), MigrateError> {
    let (fence, version) = check_hello(ch, deadline_after(t.prepare))?;
    let (layout, fds) = source.layout();
    ch.send(protocol::PREPARE, &tapir_state::encode(&layout), &[])?;
    for (i, chunk) in fds.chunks(MAX_FDS_PER_MESSAGE).enumerate() {
        let first = u32::try_from(i.saturating_mul(MAX_FDS_PER_MESSAGE)).unwrap_or(u32::MAX);
        ch.send(protocol::FDS, &first.to_le_bytes(), chunk)?;
    }
    let (blob, extension_fds) = source.extension();
    if extension_fds.len() > MAX_FDS_PER_MESSAGE {
        return Err(MigrateError::Fds(format!(
            "{} extension fds, at most {MAX_FDS_PER_MESSAGE}",
            extension_fds.len()
        )));
    }
    ch.send(protocol::EXTENSION, &blob, &extension_fds)?;
    let word = if version >= 3 {
        Some(SourceWord::offer(ch)?)
    } else {
        None
    };
    // Mapping and pre-faulting guest memory is the successor's slow part: its own time.
    let msg = ch.recv_by(deadline_after(t.prepare))?;
    expect(&msg, protocol::PREPARED, "PREPARED")?;
    Ok((fence, word))
}

/// Describes a quiesced device for a successor in this process (the embedding API's
/// snapshot): the snapshot, and its fds in manifest order (duplicate them to hand them on).
pub fn snapshot_of(q: &QuiescedDevice, generation: u64) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>) {
    let positions: Vec<_> = q
        .pairs
        .iter()
        .map(tapir_datapath::QuiescedPair::positions)
        .collect();
    describe(
        &q.config,
        &q.memory,
        &q.resources,
        Some(&positions),
        generation,
    )
}

/// A device that is described but not running: a VMM (or a test) launching the first datapath
/// process hands it over with the same protocol. Its rings are at 0 with nothing in flight;
/// quiescing and resuming are no-ops.
pub struct LaunchSource {
    config: tapir_datapath::DeviceConfig,
    memory: GuestMemory,
    resources: Vec<PairResources>,
}

impl LaunchSource {
    /// Describes a fresh device: its configuration, guest memory, and each queue pair's ring
    /// addresses and fds.
    pub fn new(
        config: tapir_datapath::DeviceConfig,
        memory: GuestMemory,
        resources: Vec<PairResources>,
    ) -> LaunchSource {
        LaunchSource {
            config,
            memory,
            resources,
        }
    }
}

impl HandoffSource for LaunchSource {
    fn layout(&self) -> (DeviceSnapshot, Vec<BorrowedFd<'_>>) {
        describe(&self.config, &self.memory, &self.resources, None, 1)
    }

    fn quiesce(&mut self) -> Result<DeviceSnapshot, MigrateError> {
        Ok(self.layout().0)
    }

    fn resume(&mut self) -> Result<(), MigrateError> {
        Ok(())
    }
}
