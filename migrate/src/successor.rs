//! The successor side of a handoff: receive the layout and fds, map and adopt them, then on
//! the switch rebuild the rings at the source's positions and run.

use std::os::fd::{AsFd, OwnedFd};
use std::time::Instant;

use tapir_datapath::{expect_eventfd, expect_file_range};

use tapir_datapath::EngineConfig;
use tapir_datapath::MemoryRegionSpec;
use tapir_datapath::{
    Device, DeviceConfig, EngineKind, GuestMemory, PairPositions, PausedDevice, QueueConfig,
    QueuePairSpec, TapQueue,
};
use tapir_state::{DeviceSnapshot, FdKind, RingAddresses, RingPositions, VirtqueueState};

use crate::ownership::OwnershipWord;
use crate::protocol::{self, expect, MigrateError, Timeouts, Versions};
use crate::snapshot::{same_layout, take_fd};
use crate::transport::Channel;

/// How the successor runs the device it takes over.
#[derive(Clone, Debug)]
pub struct SuccessorOptions {
    /// Engine.
    pub engine: EngineKind,
    /// Engine tunables.
    pub engine_config: EngineConfig,
    /// Worker pinning.
    pub cpu_affinity: Vec<Option<usize>>,
    /// Step timeouts.
    pub timeouts: Timeouts,
    /// Test hook: exit the process abruptly at this point of the protocol (to test that the
    /// source rolls back).
    pub fail_at: Option<FailPoint>,
}

/// Where a successor can be made to die (tests of the source's rollback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailPoint {
    /// After HELLO, before any fd arrived.
    BeforeFds,
    /// With the fds received and memory mapped, before PREPARED.
    AfterFds,
    /// With the final snapshot received, before READY.
    AfterState,
    /// Version 2: after GO, before RUNNING. Version 3: with the switch validated, before the
    /// claim of the ownership word.
    BeforeRunning,
    /// Version 3 only: claims the word and runs, but never acknowledges (never sends
    /// RUNNING); the process carries on serving.
    NoAck,
}

impl std::str::FromStr for FailPoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "before-fds" => Ok(FailPoint::BeforeFds),
            "after-fds" => Ok(FailPoint::AfterFds),
            "after-state" => Ok(FailPoint::AfterState),
            "before-running" => Ok(FailPoint::BeforeRunning),
            "no-ack" => Ok(FailPoint::NoAck),
            o => Err(format!(
                "unknown fail point {o:?} (before-fds, after-fds, after-state, before-running, no-ack)"
            )),
        }
    }
}

pub(crate) fn fail_here(opts: &SuccessorOptions, point: FailPoint) {
    if opts.fail_at == Some(point) {
        tracing::error!(?point, "test hook: dying at this point of the handoff");
        // SAFETY: _exit ends the process at once; no Rust state is used afterwards.
        unsafe { libc::_exit(86) };
    }
}

impl SuccessorOptions {
    /// Defaults for `engine`.
    pub fn new(engine: EngineKind) -> SuccessorOptions {
        SuccessorOptions {
            engine,
            engine_config: EngineConfig::default(),
            cpu_affinity: Vec::new(),
            timeouts: Timeouts::default(),
            fail_at: None,
        }
    }
}

/// A device taken over.
#[derive(Debug)]
pub struct TakeOver {
    /// The running device.
    pub device: Device,
    /// When the source stopped servicing (CLOCK_MONOTONIC ns; 0 for a first launch).
    pub quiesce_ns: u64,
    /// When this side sent RUNNING.
    pub running_ns: u64,
    /// When SWITCH arrived.
    pub switch_ns: u64,
    /// When the engines were set up (READY sent).
    pub ready_ns: u64,
    /// When GO arrived.
    pub go_ns: u64,
    /// Handoffs this device has been through.
    pub generation: u64,
    /// The protocol version the handoff spoke.
    pub version: u16,
    /// What the source's embedder handed on besides the device.
    pub extension: Extension,
}

/// State a source hands on besides the device (see `HandoffSource::extension`).
#[derive(Debug, Default)]
pub struct Extension {
    /// The embedder's opaque blob (empty if none).
    pub blob: Vec<u8>,
    /// Its fds, in the order the source listed them.
    pub fds: Vec<OwnedFd>,
}

/// Per-queue-pair fds received at prepare time.
struct PairFds {
    tap: TapQueue,
    rx_kick: OwnedFd,
    rx_call: OwnedFd,
    tx_kick: OwnedFd,
    tx_call: OwnedFd,
}

struct Prepared {
    layout: DeviceSnapshot,
    memory: GuestMemory,
    pairs: Vec<PairFds>,
    extension: Extension,
    /// Version 3: the ownership word and the source's attempt.
    word: Option<(OwnershipWord, u32)>,
}

/// Takes over the device offered at the other end of `ch`.
pub fn take_over(ch: &Channel, opts: &SuccessorOptions) -> Result<TakeOver, MigrateError> {
    match take_over_any(ch, opts)? {
        Taken::Device(t) => Ok(t),
        Taken::StateOnly(_) => {
            let e = MigrateError::Unexpected {
                expected: "PREPARE",
                got: protocol::STATE_ONLY,
            };
            let _ = ch.send(protocol::ABORT, e.to_string().as_bytes(), &[]);
            Err(e)
        }
    }
}

/// What a successor got.
#[derive(Debug)]
pub enum Taken {
    /// A running device (and the embedder's extension).
    Device(TakeOver),
    /// No device, only the embedder's state: adopt it, then say so with [`accept_state`]
    /// (or turn it down with [`refuse_state`]); until then the source holds on to it.
    StateOnly(Extension),
}

/// Takes over whatever the source offers: a running device, or embedder state alone.
pub fn take_over_any(ch: &Channel, opts: &SuccessorOptions) -> Result<Taken, MigrateError> {
    take_over_checked(ch, opts, &|_| Ok(()))
}

/// [`take_over_any`], with the embedder's state checked by `check` as soon as it arrives,
/// before this side says PREPARED (or, for state alone, before anything is taken): a state
/// the embedder cannot use aborts the handoff while the source still owns everything.
pub fn take_over_checked(
    ch: &Channel,
    opts: &SuccessorOptions,
    check: &dyn Fn(&Extension) -> Result<(), String>,
) -> Result<Taken, MigrateError> {
    let result = take_over_inner(ch, opts, check);
    if let Err(e) = &result {
        let _ = ch.send(protocol::ABORT, e.to_string().as_bytes(), &[]);
    }
    result
}

/// Tells the source that state handed on alone ([`Taken::StateOnly`]) is taken: from now on
/// this process owns it.
pub fn accept_state(ch: &Channel) -> Result<(), MigrateError> {
    ch.send(protocol::RUNNING, &[], &[])?;
    Ok(())
}

/// Turns state handed on alone down: the source keeps it.
pub fn refuse_state(ch: &Channel, why: &str) {
    let _ = ch.send(protocol::ABORT, why.as_bytes(), &[]);
}

fn take_over_inner(
    ch: &Channel,
    opts: &SuccessorOptions,
    check: &dyn Fn(&Extension) -> Result<(), String>,
) -> Result<Taken, MigrateError> {
    let t = opts.timeouts;
    let ours = Versions::spoken();
    ch.send(protocol::HELLO, &ours.hello(std::process::id()), &[])?;
    fail_here(opts, FailPoint::BeforeFds);
    // One deadline for the whole prepare phase (PREPARE, every FDS chunk, EXTENSION): a source
    // feeding its fds one at a time does not get the timeout once per message.
    let deadline = crate::transport::deadline_after(t.prepare);
    let (version, first) = agreed_version(ch, ours, deadline)?;
    if first.kind == protocol::STATE_ONLY {
        let extension = Extension {
            blob: first.payload,
            fds: first.fds,
        };
        check(&extension).map_err(MigrateError::Extension)?;
        return Ok(Taken::StateOnly(extension));
    }
    let mut prepared = prepare(first, ch, deadline, version)?;
    let word = prepared.word.take();
    check(&prepared.extension).map_err(MigrateError::Extension)?;
    fail_here(opts, FailPoint::AfterFds);
    let extension = std::mem::take(&mut prepared.extension);
    // Everything that does not depend on the ring positions happens before the switch, while
    // the source still runs: rings checked against memory, engines (io_uring, registered
    // files, buffers) and worker threads set up and parked.
    let (layout, paused) = start_parked(prepared, opts)?;
    let mut took = match word {
        Some(word) => crate::switch_v3::claim_and_run(ch, opts, &layout, paused, word)?,
        None => switch_v2(ch, opts, &layout, paused)?,
    };
    took.extension = extension;
    Ok(Taken::Device(took))
}

/// Version 2's switch: PREPARED, SWITCH, READY, GO, RUNNING, then run.
fn switch_v2(
    ch: &Channel,
    opts: &SuccessorOptions,
    layout: &DeviceSnapshot,
    paused: PausedDevice,
) -> Result<TakeOver, MigrateError> {
    let t = opts.timeouts;
    ch.send(protocol::PREPARED, &[], &[])?;
    let switched = ch
        .recv_spinning(Some(t.prepare))
        .map_err(MigrateError::from)
        .and_then(|msg| final_positions(&msg, opts, layout));
    let (switch_ns, sw) = match switched {
        Ok(v) => v,
        Err(e) => {
            let _ = paused.abort();
            return Err(e);
        }
    };
    let ready_ns = tapir_datapath::monotonic_ns();
    paused.arm();
    let go = ch
        .send(protocol::READY, &[], &[])
        .map_err(MigrateError::from)
        .and_then(|()| ch.recv_spinning(Some(t.switch)).map_err(MigrateError::from))
        .and_then(|m| expect(&m, protocol::GO, "GO"));
    if let Err(e) = go {
        let _ = paused.abort();
        return Err(e);
    }
    let go_ns = tapir_datapath::monotonic_ns();
    fail_here(opts, FailPoint::BeforeRunning);
    // RUNNING goes out before any ring is touched: if this process dies in between, the
    // source knows it never ran (see hand_off).
    let running_ns = tapir_datapath::monotonic_ns();
    if let Err(e) = ch.send(protocol::RUNNING, &[], &[]) {
        let _ = paused.abort();
        return Err(e.into());
    }
    Ok(TakeOver {
        device: paused.go_at(sw.positions),
        quiesce_ns: sw.quiesce_ns,
        running_ns,
        switch_ns,
        ready_ns,
        go_ns,
        generation: sw.generation,
        version: 2,
        extension: Extension::default(),
    })
}

/// The version the source chose (its VERSION message; none: a version-2 source) and the
/// first message after it.
fn agreed_version(
    ch: &Channel,
    ours: Versions,
    deadline: Instant,
) -> Result<(u16, crate::transport::Message), MigrateError> {
    let first = ch.recv_by(deadline)?;
    if first.kind != protocol::VERSION {
        let v2 = Versions {
            oldest: 2,
            newest: 2,
        };
        return Ok((ours.agree(v2)?, first));
    }
    let version = first
        .payload
        .get(..2)
        .and_then(|b| b.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or(MigrateError::Short(protocol::VERSION))?;
    let chosen = Versions {
        oldest: version,
        newest: version,
    };
    // The source must pick one this side offered, and one newer than 2 (2 has no VERSION).
    if version <= 2 || ours.agree(chosen)? != version || !first.fds.is_empty() {
        return Err(MigrateError::Version { peer: chosen, ours });
    }
    Ok((version, ch.recv_by(deadline)?))
}

/// Starts the workers of a prepared device, parked before their first ring access (the
/// rings are set up at position 0; the real positions come with the switch).
fn start_parked(
    prepared: Prepared,
    opts: &SuccessorOptions,
) -> Result<(DeviceSnapshot, PausedDevice), MigrateError> {
    let layout = prepared.layout;
    let specs = prepared
        .pairs
        .into_iter()
        .zip(&layout.queue_pairs)
        .map(|(fds, state)| {
            Ok(QueuePairSpec {
                rx: queue_config(&state.rx, fds.rx_kick, fds.rx_call)?,
                tx: queue_config(&state.tx, fds.tx_kick, fds.tx_call)?,
                tap: fds.tap,
                rx_in_flight: Vec::new(),
                rx_carried: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, MigrateError>>()?;
    let config = DeviceConfig {
        features: layout.features,
        mtu: layout.mtu,
        mac: layout.mac,
        engine: opts.engine,
        engine_config: opts.engine_config,
        cpu_affinity: opts.cpu_affinity.clone(),
    };
    let paused = Device::start_paused(config, prepared.memory, specs)?;
    Ok((layout, paused))
}

/// The positions each pair of a (validated) snapshot resumes at.
fn positions(snapshot: &DeviceSnapshot) -> Result<Vec<PairPositions>, MigrateError> {
    let mut positions = Vec::with_capacity(snapshot.queue_pairs.len());
    for p in &snapshot.queue_pairs {
        let pos = PairPositions {
            rx: p.rx.positions(),
            tx: p.tx.positions(),
            rx_in_flight: p.rx.held_heads(),
            rx_carried: p
                .rx_carried
                .frames()
                .iter()
                .map(|f| f.bytes().to_vec())
                .collect(),
        };
        pos.check(p.rx.size, p.tx.size)
            .map_err(|e| MigrateError::Positions(format!("queue pair {}: {e}", p.rx.index / 2)))?;
        positions.push(pos);
    }
    Ok(positions)
}

/// Restores a device from a snapshot and the fds its manifest lists, in this process,
/// without the socket protocol (a VMM that embeds tapir and moves the device itself). The
/// snapshot comes from [`snapshot_of`](crate::snapshot_of) a quiesced device (or was decoded
/// with `tapir_state::decode`, which validates it).
pub fn restore(
    snapshot: DeviceSnapshot,
    fds: Vec<OwnedFd>,
    opts: &SuccessorOptions,
) -> Result<Device, MigrateError> {
    snapshot.validate()?;
    let positions = positions(&snapshot)?;
    let prepared = adopt(snapshot, fds)?;
    let (_, paused) = start_parked(prepared, opts)?;
    Ok(paused.go_at(positions))
}

/// What a SWITCH says.
pub(crate) struct Switch {
    /// Where each pair resumes.
    pub(crate) positions: Vec<PairPositions>,
    /// When the source stopped servicing.
    pub(crate) quiesce_ns: u64,
    /// The source's generation.
    pub(crate) generation: u64,
}

/// Reads a SWITCH: the final snapshot, checked against the prepared layout, as the positions
/// each pair resumes at. Returns when it arrived too.
pub(crate) fn final_positions(
    msg: &crate::transport::Message,
    opts: &SuccessorOptions,
    layout: &DeviceSnapshot,
) -> Result<(u64, Switch), MigrateError> {
    let switch_ns = tapir_datapath::monotonic_ns();
    expect(msg, protocol::SWITCH, "SWITCH")?;
    let quiesce_ns = msg
        .payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or(MigrateError::Short(protocol::SWITCH))?;
    let blob = msg
        .payload
        .get(8..)
        .ok_or(MigrateError::Short(protocol::SWITCH))?;
    let snapshot = tapir_state::decode(blob)?;
    fail_here(opts, FailPoint::AfterState);
    if !same_layout(&snapshot, layout) {
        return Err(MigrateError::LayoutChanged);
    }
    Ok((
        switch_ns,
        Switch {
            positions: positions(&snapshot)?,
            quiesce_ns,
            generation: snapshot.source.generation,
        },
    ))
}

/// A queue at position 0: the real positions (and the RX heads held at them) come with
/// `go_at`. (Taking the snapshot's positions here made [`restore`] of a snapshot with held
/// RX heads fail: the heads are not in the spec.)
fn queue_config(
    q: &VirtqueueState,
    kick: OwnedFd,
    call: OwnedFd,
) -> Result<QueueConfig, MigrateError> {
    // The layout was validated: the addresses pass (checked again, as a type).
    let ring = RingAddresses::try_from(q.addresses())
        .map_err(|e| MigrateError::Positions(format!("virtqueue {}: {e}", q.index)))?;
    Ok(QueueConfig {
        ring,
        positions: RingPositions::default(),
        kick,
        call,
    })
}

/// PREPARE, the FDS chunks, EXTENSION and (version 3) OWNERSHIP, all received before any
/// is checked (a source still sending when this side refuses would see a closed channel
/// instead of the ABORT); then the fds are adopted.
fn prepare(
    msg: crate::transport::Message,
    ch: &Channel,
    deadline: Instant,
    version: u16,
) -> Result<Prepared, MigrateError> {
    expect(&msg, protocol::PREPARE, "PREPARE")?;
    let layout = tapir_state::decode(&msg.payload)?;
    let mut fds: Vec<Option<OwnedFd>> = Vec::with_capacity(layout.fds.len());
    while fds.len() < layout.fds.len() {
        let msg = ch.recv_by(deadline)?;
        expect(&msg, protocol::FDS, "FDS")?;
        let first = msg
            .payload
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or(MigrateError::Short(protocol::FDS))?;
        if usize::try_from(first).ok() != Some(fds.len()) || msg.fds.is_empty() {
            return Err(MigrateError::Fds(format!(
                "chunk starts at {first}, expected {}",
                fds.len()
            )));
        }
        if msg.fds.len() > layout.fds.len().saturating_sub(fds.len()) {
            return Err(MigrateError::Fds(format!(
                "a chunk of {} fds at {first}: more than the manifest's {}",
                msg.fds.len(),
                layout.fds.len()
            )));
        }
        fds.extend(msg.fds.into_iter().map(Some));
    }
    let msg = ch.recv_by(deadline)?;
    expect(&msg, protocol::EXTENSION, "EXTENSION")?;
    let word = if version >= 3 {
        Some(crate::switch_v3::receive_word(ch, deadline)?)
    } else {
        None
    };
    let mut prepared = adopt(layout, fds.into_iter().flatten().collect())?;
    prepared.extension = Extension {
        blob: msg.payload,
        fds: msg.fds,
    };
    prepared.word = word;
    Ok(prepared)
}

/// Maps the memory and adopts the TAP queues and eventfds a snapshot's manifest lists.
fn adopt(layout: DeviceSnapshot, fds: Vec<OwnedFd>) -> Result<Prepared, MigrateError> {
    if fds.len() != layout.fds.len() {
        return Err(MigrateError::Fds(format!(
            "{} fds received, the manifest lists {}",
            fds.len(),
            layout.fds.len()
        )));
    }
    let mut fds: Vec<Option<OwnedFd>> = fds.into_iter().map(Some).collect();
    let missing =
        |what: &str, i: u16| MigrateError::Fds(format!("{what} fd {i} missing or used twice"));
    let mut regions = Vec::new();
    for (i, r) in layout.memory.iter().enumerate() {
        let fd = take_fd(&mut fds, r.fd).ok_or_else(|| missing("memory", r.fd))?;
        // Before anything is mapped: a mapping past the end of its file raises SIGBUS on
        // first touch (the pre-fault below, or a worker after RUNNING).
        expect_file_range(
            fd.as_fd(),
            r.file_offset,
            r.size,
            &format!("memory region {i} (fd {})", r.fd),
        )
        .map_err(|e| MigrateError::Fds(e.to_string()))?;
        regions.push(MemoryRegionSpec {
            guest_addr: r.guest_addr,
            size: r.size,
            fd,
            file_offset: r.file_offset,
        });
    }
    let memory = GuestMemory::from_regions(regions)?;
    // Fault the mapping in now, while the source still runs, not on the first packets.
    memory.populate();
    let mut pairs = Vec::new();
    for p in &layout.queue_pairs {
        if layout.fds.get(usize::from(p.tap.fd)).map(|e| e.kind) != Some(FdKind::TapQueue) {
            return Err(missing("TAP", p.tap.fd));
        }
        let tap =
            TapQueue::adopt(take_fd(&mut fds, p.tap.fd).ok_or_else(|| missing("TAP", p.tap.fd))?)?;
        // Kick and call fds are eventfds: a pipe or socket there could block a worker's
        // write or report end-of-file forever.
        let mut eventfd = |what: &str, i: u16| -> Result<OwnedFd, MigrateError> {
            let fd = take_fd(&mut fds, i).ok_or_else(|| missing(what, i))?;
            expect_eventfd(fd.as_fd(), &format!("{what} fd {i}"))
                .map_err(|e| MigrateError::Fds(e.to_string()))?;
            Ok(fd)
        };
        pairs.push(PairFds {
            tap,
            rx_kick: eventfd("kick", p.rx.kick_fd)?,
            rx_call: eventfd("call", p.rx.call_fd)?,
            tx_kick: eventfd("kick", p.tx.kick_fd)?,
            tx_call: eventfd("call", p.tx.call_fd)?,
        });
    }
    Ok(Prepared {
        layout,
        memory,
        pairs,
        extension: Extension::default(),
        word: None,
    })
}
