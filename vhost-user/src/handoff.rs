//! A vhost-user session as handoff state: everything `tapir serve` knows besides the running
//! device (which `tapir-migrate` carries itself), as a postcard payload framed by tapir-state's
//! codec (magic `TAPIRVUS`, format version, length, CRC-32: `tapir_state::seal`) plus fds. It
//! rides in the handoff protocol's EXTENSION message: the successor gets the connection to
//! the frontend, the listening sockets, the TAP queues, the memory table, every vring's fds
//! and the dirty log, and carries on the session where the predecessor stopped reading it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use serde::{Deserialize, Serialize};

use tapir_state::{CarriedFrame, CarriedFrames, HeldHeads, QueueSize};

use crate::session::{Session, Vring, VringAddrs};

/// The frame's magic (tapir-state's header layout).
const MAGIC: [u8; 8] = *b"TAPIRVUS";
/// The format version [`encode`] writes when the daemon serves no report endpoints: 2, the
/// payload of version 1 in tapir-state's frame.
const VERSION: u16 = 2;
/// The format version with the report endpoints ([`ReportState`]) after the session: written
/// only when there are some, so that a successor of an earlier build still takes over a
/// daemon without them.
const VERSION_WITH_REPORT: u16 = 3;
/// The format version with carried RX frames ([`SessionState::carried`]) after the report
/// endpoints: written only when a stopped pair keeps some, for the same reason.
const VERSION_WITH_CARRIED: u16 = 4;
/// Version 1's own header (no length, no checksum), still read: a successor of this build
/// takes over from a `tapir serve` that wrote it.
const LEGACY_MAGIC: &[u8; 4] = b"TVUS";
const LEGACY_VERSION: u16 = 1;

/// Most vrings a blob may describe (256 queue pairs).
const MAX_VRINGS: usize = 512;

/// One memory region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size.
    pub size: u64,
    /// Frontend virtual address.
    pub user_addr: u64,
    /// Offset in the fd.
    pub mmap_offset: u64,
    /// Index of its fd.
    pub fd: u16,
}

/// One vring.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VringState {
    /// Size.
    pub size: u16,
    /// Addresses as the frontend gave them.
    pub addrs: Option<VringAddrs>,
    /// Base (meaningful for vrings not running).
    pub base: u16,
    /// RX heads held (vrings not running).
    pub held: Vec<u16>,
    /// Kick fd index.
    pub kick: Option<u16>,
    /// Call fd index.
    pub call: Option<u16>,
    /// Error fd index.
    pub err: Option<u16>,
    /// Enabled.
    pub enabled: bool,
    /// Started.
    pub started: bool,
}

/// The dirty log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogState {
    /// Size.
    pub mmap_size: u64,
    /// Offset.
    pub mmap_offset: u64,
    /// Index of its fd.
    pub fd: u16,
}

/// How the daemon reaches frontends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointState {
    /// The vhost-user socket path.
    pub path: String,
    /// Client mode (tapir connects) rather than server mode (tapir listens).
    pub client: bool,
    /// Index of the listening socket's fd (server mode).
    pub listener: Option<u16>,
    /// The handoff socket path and its listening fd.
    pub handoff: Option<(String, u16)>,
}

/// The report endpoints (`--control`, `--metrics`) the successor serves on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportState {
    /// The control socket's path and listening fd index.
    pub control: Option<(String, u16)>,
    /// The metrics endpoint's listening fd index (a loopback TCP socket).
    pub metrics: Option<u16>,
}

/// A serve session as handed on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionState {
    /// Queue pairs offered.
    pub queue_pairs: u16,
    /// MAC.
    pub mac: [u8; 6],
    /// Acked features.
    pub features: u64,
    /// Acked protocol features.
    pub protocol_features: u64,
    /// Memory table.
    pub regions: Vec<RegionState>,
    /// Vrings.
    pub vrings: Vec<VringState>,
    /// Dirty log.
    pub log: Option<LogState>,
    /// Pairs the handed-on device runs.
    pub running_pairs: Vec<u16>,
    /// Index of the frontend connection's fd (none between frontends).
    pub connection: Option<u16>,
    /// Handoffs so far.
    pub generation: u64,
    /// Indices of the TAP queue fds, one per queue pair.
    pub taps: Vec<u16>,
    /// The endpoint.
    pub endpoint: EndpointState,
    /// Requests handled so far.
    pub requests: u64,
    /// The report endpoints (format version 3, after the rest).
    #[serde(skip)]
    pub report: ReportState,
    /// Frames the device had read from the TAP and not delivered when its rings stopped, by
    /// queue pair (one list each, or none at all), oldest first: the successor delivers
    /// them before it reads from the TAP (format version 4, after the report endpoints).
    /// A pair the handed-on device runs has none here: its frames ride in the device
    /// snapshot.
    #[serde(skip)]
    pub carried: Vec<CarriedFrames>,
}

/// Errors of decoding a session blob.
#[derive(Debug, thiserror::Error)]
pub enum SessionStateError {
    /// Not a session blob (neither framed nor of the legacy version 1).
    #[error(
        "not a tapir vhost-user session blob (versions {LEGACY_VERSION} to {VERSION_WITH_CARRIED})"
    )]
    Header,
    /// The frame: magic, version, length or checksum.
    #[error("session blob: {0}")]
    Frame(#[from] tapir_state::StateError),
    /// postcard.
    #[error("session blob: {0}")]
    Decode(#[from] postcard::Error),
    /// The state could not be encoded (nothing is sent then: no empty payload).
    #[error("encoding the session blob: {0}")]
    Encode(#[source] postcard::Error),
    /// Fields that do not add up.
    #[error("session blob: {0}")]
    Invalid(String),
}

/// Collects fds in manifest order.
#[derive(Default)]
pub struct FdList<'a> {
    fds: Vec<BorrowedFd<'a>>,
}

impl<'a> FdList<'a> {
    /// Appends an fd; returns its index.
    pub fn push(&mut self, fd: BorrowedFd<'a>) -> u16 {
        self.fds.push(fd);
        u16::try_from(self.fds.len() - 1).unwrap_or(u16::MAX)
    }

    /// The fds.
    pub fn into_vec(self) -> Vec<BorrowedFd<'a>> {
        self.fds
    }
}

/// Describes a session (whose device was taken out to be handed on as `running_pairs`).
pub fn export<'a>(
    session: &'a Session,
    running_pairs: &[u16],
    connection: Option<BorrowedFd<'a>>,
    endpoint: impl FnOnce(&mut FdList<'a>) -> EndpointState,
    fds: &mut FdList<'a>,
) -> SessionState {
    let connection = connection.map(|c| fds.push(c));
    let taps = session.taps().iter().map(|t| fds.push(t.as_fd())).collect();
    let regions = session
        .table
        .regions()
        .iter()
        .map(|r| RegionState {
            guest_addr: r.guest_addr,
            size: r.size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            fd: fds.push(r.fd.as_fd()),
        })
        .collect();
    let vrings = session
        .vrings
        .iter()
        .map(|v| VringState {
            size: v.size,
            addrs: v.addrs,
            base: v.base,
            held: v.held.clone(),
            kick: v.kick.as_ref().map(|f| fds.push(f.as_fd())),
            call: v.call.as_ref().map(|f| fds.push(f.as_fd())),
            err: v.err.as_ref().map(|f| fds.push(f.as_fd())),
            enabled: v.enabled,
            started: v.started,
        })
        .collect();
    let log = session.log.as_ref().map(|l| LogState {
        mmap_size: l.mmap_size,
        mmap_offset: l.mmap_offset,
        fd: fds.push(l.fd.as_fd()),
    });
    let endpoint = endpoint(fds);
    SessionState {
        queue_pairs: session.config().queue_pairs,
        mac: session.config().mac,
        features: session.features,
        protocol_features: session.protocol_features,
        regions,
        vrings,
        log,
        running_pairs: running_pairs.to_vec(),
        connection,
        generation: session.generation,
        taps,
        endpoint,
        requests: session.requests,
        report: ReportState::default(),
        carried: carried_of(session),
    }
}

/// The session's kept frames as the blob carries them: none at all when no pair keeps any.
/// ([`Session`] keeps them within the blob's bounds, so nothing is lost here.)
fn carried_of(session: &Session) -> Vec<CarriedFrames> {
    let kept = session.carried();
    if kept.iter().all(Vec::is_empty) {
        return Vec::new();
    }
    kept.iter()
        .map(|frames| {
            let n = frames.len();
            CarriedFrames::try_from(frames.clone()).unwrap_or_else(|e| {
                tracing::error!(frames = n, error = %e, "carried frames over the bound: dropped");
                CarriedFrames::default()
            })
        })
        .collect()
}

/// The kept frames a session takes from a decoded blob, one list per queue pair.
pub fn carried_frames(state: &SessionState) -> Vec<Vec<CarriedFrame>> {
    state.carried.iter().map(|f| f.frames().to_vec()).collect()
}

/// Encodes a session state: postcard, framed by tapir-state's codec.
///
/// The oldest version that holds the state is written (2; 3 with report endpoints; 4 with
/// carried frames), so that a successor of an earlier build still takes over a daemon that
/// needs nothing newer. A blob over [`tapir_state::MAX_BLOB`] is an error, not sent.
pub fn encode(state: &SessionState) -> Result<Vec<u8>, SessionStateError> {
    let mut payload = postcard::to_allocvec(state).map_err(SessionStateError::Encode)?;
    let version = if !state.carried.is_empty() {
        VERSION_WITH_CARRIED
    } else if state.report != ReportState::default() {
        VERSION_WITH_REPORT
    } else {
        VERSION
    };
    if version >= VERSION_WITH_REPORT {
        payload.extend(postcard::to_allocvec(&state.report).map_err(SessionStateError::Encode)?);
    }
    if version >= VERSION_WITH_CARRIED {
        payload.extend(postcard::to_allocvec(&state.carried).map_err(SessionStateError::Encode)?);
    }
    let blob = tapir_state::seal(MAGIC, version, &payload);
    if blob.len() > tapir_state::MAX_BLOB {
        return Err(SessionStateError::Frame(
            tapir_state::StateError::EncodedTooLarge {
                len: blob.len(),
                max: tapir_state::MAX_BLOB,
            },
        ));
    }
    Ok(blob)
}

/// The format version and payload of a blob: checked by tapir-state's frame (versions 2 and
/// 3), or behind version 1's header (no checksum).
fn payload_of(blob: &[u8]) -> Result<(u16, &[u8]), SessionStateError> {
    if let Some(rest) = blob.strip_prefix(LEGACY_MAGIC.as_slice()) {
        return match rest.split_first_chunk::<2>() {
            Some((v, payload)) if u16::from_le_bytes(*v) == LEGACY_VERSION => {
                Ok((LEGACY_VERSION, payload))
            }
            _ => Err(SessionStateError::Header),
        };
    }
    Ok(tapir_state::unseal(
        MAGIC,
        VERSION,
        VERSION_WITH_CARRIED,
        blob,
    )?)
}

/// Decodes and checks a session state against the number of fds that came with it.
pub fn decode(blob: &[u8], fd_count: usize) -> Result<SessionState, SessionStateError> {
    let (version, payload) = payload_of(blob)?;
    let (mut state, rest): (SessionState, _) = postcard::take_from_bytes(payload)?;
    let rest = if version >= VERSION_WITH_REPORT {
        let (report, rest) = postcard::take_from_bytes(rest)?;
        state.report = report;
        rest
    } else {
        rest
    };
    let rest = if version >= VERSION_WITH_CARRIED {
        // Each frame's length and each pair's count are checked as they are decoded.
        let (carried, rest) = postcard::take_from_bytes(rest)?;
        state.carried = carried;
        rest
    } else {
        rest
    };
    if !rest.is_empty() {
        return Err(SessionStateError::Invalid(format!(
            "{} bytes after the session state",
            rest.len()
        )));
    }
    let bad = |s: String| Err(SessionStateError::Invalid(s));
    let pairs = usize::from(state.queue_pairs);
    if !state.carried.is_empty() && state.carried.len() != pairs {
        return bad(format!(
            "carried frames for {} queue pairs, the session has {pairs}",
            state.carried.len()
        ));
    }
    let carried_bytes = state
        .carried
        .iter()
        .map(CarriedFrames::total_bytes)
        .fold(0usize, usize::saturating_add);
    if carried_bytes > tapir_state::MAX_CARRIED_BYTES {
        return bad(format!(
            "{carried_bytes} bytes of carried frames, at most {}",
            tapir_state::MAX_CARRIED_BYTES
        ));
    }
    if state
        .carried
        .iter()
        .zip(0u16..)
        .any(|(f, p)| !f.is_empty() && state.running_pairs.contains(&p))
    {
        return bad("carried frames for a pair the handed-on device runs".into());
    }
    if pairs == 0 || state.vrings.len() != 2 * pairs || state.vrings.len() > MAX_VRINGS {
        return bad(format!(
            "{} vrings for {} queue pairs",
            state.vrings.len(),
            state.queue_pairs
        ));
    }
    if state.taps.len() != pairs {
        return bad(format!("{} TAP queues for {pairs} pairs", state.taps.len()));
    }
    if state.running_pairs.iter().any(|&p| usize::from(p) >= pairs) {
        return bad("a running pair beyond the queue pairs".into());
    }
    let mut running = vec![false; pairs];
    for &p in &state.running_pairs {
        match running.get_mut(usize::from(p)) {
            Some(seen) if !*seen => *seen = true,
            _ => return bad(format!("running pair {p} listed twice")),
        }
    }
    if state.connection.is_none() && !state.running_pairs.is_empty() {
        return bad("running pairs without a frontend connection".into());
    }
    let mut seen = vec![false; fd_count];
    let mut claim = |i: u16| -> Result<(), SessionStateError> {
        match seen.get_mut(usize::from(i)) {
            Some(s) if !*s => {
                *s = true;
                Ok(())
            }
            _ => Err(SessionStateError::Invalid(format!(
                "fd index {i} out of range or used twice"
            ))),
        }
    };
    if let Some(c) = state.connection {
        claim(c)?;
    }
    for &t in &state.taps {
        claim(t)?;
    }
    for r in &state.regions {
        claim(r.fd)?;
    }
    for v in &state.vrings {
        for f in [v.kick, v.call, v.err].into_iter().flatten() {
            claim(f)?;
        }
        // Size 0: not set yet (nothing may be held then).
        if v.size == 0 {
            if !v.held.is_empty() {
                return bad("held heads on a vring without a size".into());
            }
            continue;
        }
        // Each head below the size and held once (a head posted twice is a chain used twice):
        // the ring vocabulary's checks.
        QueueSize::try_from(v.size)
            .and_then(|size| HeldHeads::try_from((size, v.held.clone())))
            .map_err(|e| SessionStateError::Invalid(format!("vring: {e}")))?;
    }
    if let Some(l) = &state.log {
        claim(l.fd)?;
    }
    if let Some(l) = state.endpoint.listener {
        claim(l)?;
    }
    if let Some((_, l)) = &state.endpoint.handoff {
        claim(*l)?;
    }
    if let Some((_, l)) = &state.report.control {
        claim(*l)?;
    }
    if let Some(l) = state.report.metrics {
        claim(l)?;
    }
    Ok(state)
}

/// Checks that every fd a (decoded) session state refers to is what the state says it is,
/// before anything is adopted or mapped: TAP queues are TAP queues (`TUNGETIFF`), the frontend
/// connection is a connected socket, the listeners are listening sockets, memory regions and
/// the dirty log lie inside their files, kick/call/err fds are eventfds. A predecessor that
/// lies is refused while it still owns everything.
pub fn check_fds(state: &SessionState, fds: &[OwnedFd]) -> Result<(), SessionStateError> {
    use tapir_datapath::{
        expect_eventfd, expect_file_range, expect_listening_socket, is_listening_socket,
        link_target, FdCheckError,
    };
    let fd = |i: u16| {
        fds.get(usize::from(i))
            .map(AsFd::as_fd)
            .ok_or_else(|| SessionStateError::Invalid(format!("fd {i} missing")))
    };
    let bad = |e: FdCheckError| SessionStateError::Invalid(e.to_string());
    for (pair, &t) in state.taps.iter().enumerate() {
        let dup = fd(t)?
            .try_clone_to_owned()
            .map_err(|e| SessionStateError::Invalid(format!("TAP fd {t}: {e}")))?;
        tapir_datapath::TapQueue::adopt(dup)
            .map_err(|e| SessionStateError::Invalid(format!("TAP queue {pair} (fd {t}): {e}")))?;
    }
    if let Some(c) = state.connection {
        let f = fd(c)?;
        let target = link_target(f).unwrap_or_default();
        if !target.starts_with("socket:") || is_listening_socket(f) {
            return Err(SessionStateError::Invalid(format!(
                "frontend connection (fd {c}): expected a connected socket, got {target}"
            )));
        }
    }
    // A listener is a listening socket bound at the path the blob names: the successor
    // removes that path when it stops listening, so a path the fd is not bound at would let
    // the predecessor make it delete any file of the user's.
    if let Some(l) = state.endpoint.listener {
        let what = format!("vhost-user listener (fd {l})");
        expect_listening_socket(fd(l)?, &what).map_err(bad)?;
        expect_bound_at(fd(l)?, &state.endpoint.path, &what)?;
    }
    if let Some((path, l)) = &state.endpoint.handoff {
        let what = format!("handoff listener (fd {l})");
        expect_listening_socket(fd(*l)?, &what).map_err(bad)?;
        expect_bound_at(fd(*l)?, path, &what)?;
    }
    if let Some((path, l)) = &state.report.control {
        let what = format!("control socket listener (fd {l})");
        expect_listening_socket(fd(*l)?, &what).map_err(bad)?;
        expect_bound_at(fd(*l)?, path, &what)?;
    }
    if let Some(l) = state.report.metrics {
        let what = format!("metrics listener (fd {l})");
        expect_listening_socket(fd(l)?, &what).map_err(bad)?;
        expect_loopback_tcp(fd(l)?, &what)?;
    }
    for (i, r) in state.regions.iter().enumerate() {
        let what = format!("memory region {i} (fd {})", r.fd);
        expect_file_range(fd(r.fd)?, r.mmap_offset, r.size, &what).map_err(bad)?;
    }
    if let Some(l) = &state.log {
        let what = format!("dirty log (fd {})", l.fd);
        expect_file_range(fd(l.fd)?, l.mmap_offset, l.mmap_size, &what).map_err(bad)?;
    }
    for (n, v) in state.vrings.iter().enumerate() {
        for (role, i) in [("kick", v.kick), ("call", v.call), ("err", v.err)] {
            if let Some(i) = i {
                let what = format!("{role} fd of vring {n} (fd {i})");
                expect_eventfd(fd(i)?, &what).map_err(bad)?;
            }
        }
    }
    Ok(())
}

/// Checks that the Unix socket `fd` is bound at `path`.
fn expect_bound_at(fd: BorrowedFd<'_>, path: &str, what: &str) -> Result<(), SessionStateError> {
    use std::os::fd::AsRawFd;
    let bound = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.path().map(std::path::Path::to_path_buf));
    if bound.as_deref() == Some(std::path::Path::new(path)) {
        return Ok(());
    }
    Err(SessionStateError::Invalid(format!(
        "{what}: the blob says it is bound at {path}, it is bound at {bound:?}"
    )))
}

/// Checks that the socket `fd` is bound to a loopback IP address (the metrics endpoint is
/// served on loopback only).
fn expect_loopback_tcp(fd: BorrowedFd<'_>, what: &str) -> Result<(), SessionStateError> {
    use std::os::fd::AsRawFd;
    let addr =
        nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(fd.as_raw_fd()).ok();
    let ip: Option<std::net::IpAddr> = addr.as_ref().and_then(|a| {
        a.as_sockaddr_in()
            .map(|v4| std::net::IpAddr::V4(v4.ip()))
            .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
    });
    match ip {
        Some(ip) if ip.is_loopback() => Ok(()),
        _ => Err(SessionStateError::Invalid(format!(
            "{what}: expected a TCP socket bound to a loopback address, got {addr:?}"
        ))),
    }
}

/// Takes fd `i` out of the received list.
pub fn take(fds: &mut [Option<OwnedFd>], i: u16) -> Result<OwnedFd, SessionStateError> {
    fds.get_mut(usize::from(i))
        .and_then(Option::take)
        .ok_or_else(|| SessionStateError::Invalid(format!("fd {i} missing")))
}

/// Rebuilds a vring from its state and the received fds.
pub fn vring_of(v: &VringState, fds: &mut [Option<OwnedFd>]) -> Result<Vring, SessionStateError> {
    let mut opt = |i: Option<u16>| i.map(|i| take(fds, i)).transpose();
    Ok(Vring {
        size: v.size,
        addrs: v.addrs,
        base: v.base,
        held: v.held.clone(),
        kick: opt(v.kick)?,
        call: opt(v.call)?,
        err: opt(v.err)?,
        enabled: v.enabled,
        started: v.started,
    })
}

#[cfg(test)]
mod tests;
