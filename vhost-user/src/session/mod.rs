//! One vhost-user session: the state a frontend builds up with its requests (features,
//! memory table, vrings, dirty log) and the tapir device that runs the queue pairs whose
//! rings are ready.
//!
//! A queue pair runs when both its vrings have a size, addresses and a kick fd (started) and
//! are enabled. Whenever that set changes, or something a running pair depends on changes
//! (memory table, a call or kick fd, ring addresses, features), the device is quiesced
//! (nothing in flight afterwards; its ring positions and held RX chains are recorded in the
//! vrings) and started again with the pairs that are ready. `GET_VRING_BASE` quiesces too,
//! so a ring stops with no io_uring operation in flight.

#![deny(clippy::indexing_slicing)]

mod device;
mod dispatch;
mod log;
mod memory;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use tapir_datapath::EngineConfig;
use tapir_datapath::FdCheckError;
use tapir_datapath::{features, Device, EngineKind, GuestMemory, TapQueue};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};

use crate::dirty_log::DirtyLog;
use crate::memory_table::MemoryTable;

/// Protocol features tapir offers.
pub fn offered_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::LOG_SHMFD
        | VhostUserProtocolFeatures::RARP
        | VhostUserProtocolFeatures::MTU
}

/// Virtio features tapir offers over vhost-user: what the datapath implements, minus what
/// the frontend provides itself (MAC and status live in the frontend's config space), plus
/// `VHOST_USER_F_PROTOCOL_FEATURES` and `VHOST_F_LOG_ALL`. `VIRTIO_NET_F_MTU` is offered: the
/// MTU lives in the frontend's config space too, but tapir honours one (`NET_SET_MTU` sets the
/// TAP's, and the device sizes RX reads by it), so a frontend that builds its device features
/// from the backend's may offer it. (QEMU 7.2 passes its `host_mtu` to the guest either way:
/// tested with and without the bit.)
pub fn offered_features() -> u64 {
    (features::SUPPORTED & !(features::NET_F_MAC | features::NET_F_STATUS))
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
        | VhostUserVirtioFeatures::LOG_ALL.bits()
}

/// How the daemon runs devices.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Queue pairs offered (and TAP queues open).
    pub queue_pairs: u16,
    /// Engine of the workers.
    pub engine: EngineKind,
    /// Engine tunables.
    pub engine_config: EngineConfig,
    /// MAC carried in the device config (the frontend owns the guest-visible one).
    pub mac: [u8; 6],
    /// Worker pinning by queue pair.
    pub cpu_affinity: Vec<Option<usize>>,
    /// What a ring stop reports dirty while the frontend logs (live migration).
    pub dirty_at_stop: DirtyAtStop,
}

/// What a ring stop during a live migration reports dirty in the frontend's log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DirtyAtStop {
    /// The pages tapir wrote (the default: the log holds every write of tapir's).
    #[default]
    Written,
    /// All of guest memory, so the frontend's final pass copies the guest whole. A workaround
    /// for a frontend that loses track of its own guest's writes: QEMU 7.2 under TCG does,
    /// with its own tap backend too (docs/QEMU.md, "Live migration").
    AllPages,
}

/// Ring addresses as the frontend gave them (its virtual addresses).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VringAddrs {
    /// Descriptor table.
    pub desc: u64,
    /// Used ring.
    pub used: u64,
    /// Available ring.
    pub avail: u64,
    /// Guest-physical address for used-ring logging.
    pub log: u64,
    /// `VHOST_VRING_F_LOG` and friends.
    pub flags: u32,
}

/// One vring as the frontend set it up.
#[derive(Debug, Default)]
pub struct Vring {
    /// Size (0: not set).
    pub size: u16,
    /// Addresses.
    pub addrs: Option<VringAddrs>,
    /// Next available index to process.
    pub base: u16,
    /// RX heads held across an internal restart (popped, not used, in ring order).
    pub held: Vec<u16>,
    /// Kick eventfd.
    pub kick: Option<OwnedFd>,
    /// Call eventfd.
    pub call: Option<OwnedFd>,
    /// Error eventfd (kept, unused).
    pub err: Option<OwnedFd>,
    /// `SET_VRING_ENABLE` state.
    pub enabled: bool,
    /// Started by `SET_VRING_KICK`, stopped by `GET_VRING_BASE`.
    pub started: bool,
}

/// The device running a session's ready pairs.
#[derive(Debug)]
pub struct Running {
    /// The device.
    pub device: Device,
    /// Which queue pair each of the device's pairs is.
    pub pairs: Vec<u16>,
}

/// Errors of handling a request; the frontend gets a failure reply and the session goes on.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The request is unknown, not negotiated, or its body has the wrong size.
    #[error("{0}")]
    Invalid(String),
    /// The memory table.
    #[error(transparent)]
    Table(#[from] crate::memory_table::TableError),
    /// The dirty log.
    #[error(transparent)]
    Log(#[from] crate::dirty_log::LogError),
    /// The device could not be started or stopped.
    #[error("device: {0}")]
    Device(#[from] tapir_datapath::DeviceError),
    /// A TAP queue.
    #[error(transparent)]
    Tap(#[from] tapir_datapath::TapError),
    /// An fd of the wrong kind (a pipe as a kick fd, ...).
    #[error(transparent)]
    Fd(#[from] FdCheckError),
    /// The TAP link (announcement, MTU).
    #[error(transparent)]
    Link(#[from] crate::link::LinkError),
    /// An fd or eventfd.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
    /// Restarting the device failed after the request itself was answered.
    #[error("after the reply: {0}")]
    AfterReply(#[source] Box<RequestError>),
}

fn invalid(s: impl Into<String>) -> RequestError {
    RequestError::Invalid(s.into())
}

/// A session with one frontend.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    taps: Arc<Vec<TapQueue>>,
    /// Acked virtio features.
    pub features: u64,
    /// Acked protocol features.
    pub protocol_features: u64,
    /// The memory table.
    pub table: MemoryTable,
    memory: Option<GuestMemory>,
    /// Vrings `0..2 * queue_pairs`.
    pub vrings: Vec<Vring>,
    /// The dirty log, once the frontend set one.
    pub log: Option<DirtyLog>,
    /// The running device.
    pub running: Option<Running>,
    restart: bool,
    /// Handoffs this session has been through.
    pub generation: u64,
    /// Requests handled.
    pub requests: u64,
    /// RARP announcements written into the TAP (`SEND_RARP`).
    pub announcements: u64,
    /// The MTU the frontend set with `NET_SET_MTU` (the TAP has it).
    pub mtu: Option<u16>,
    /// Counters of the devices this session stopped, by queue pair (a device's workers
    /// count from zero; see [`Session::counter_sources`]).
    stopped_counters: Vec<tapir_datapath::Counters>,
    /// Frames the device had read from the TAP and not yet delivered when it stopped, by
    /// queue pair, oldest first: the next device that runs the pair delivers them first, a
    /// successor gets them in the session blob ([`Session::carried`]).
    carried: Vec<Vec<tapir_state::CarriedFrame>>,
}

impl Session {
    /// A fresh session.
    pub fn new(config: SessionConfig, taps: Arc<Vec<TapQueue>>) -> Session {
        let pairs = usize::from(config.queue_pairs);
        let vrings = (0..2 * pairs).map(|_| Vring::default()).collect();
        Session {
            config,
            taps,
            features: 0,
            protocol_features: 0,
            table: MemoryTable::default(),
            memory: None,
            vrings,
            log: None,
            running: None,
            restart: false,
            generation: 0,
            requests: 0,
            announcements: 0,
            mtu: None,
            stopped_counters: vec![tapir_datapath::Counters::default(); pairs],
            carried: vec![Vec::new(); pairs],
        }
    }

    /// Where the session's counters are, for a reader on another thread
    /// ([`crate::report::Board`]): the stopped devices' totals and the running workers' stats
    /// (workers publish once per loop; nothing new is counted).
    pub(crate) fn counter_sources(&self) -> crate::report::CounterSources {
        crate::report::CounterSources {
            stopped: self.stopped_counters.clone(),
            live: self
                .running
                .as_ref()
                .map(|r| {
                    r.pairs
                        .iter()
                        .copied()
                        .zip(r.device.worker_stats())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SessionConfig {
        &self.config
    }

    /// The TAP queues (one per queue pair).
    pub fn taps(&self) -> &Arc<Vec<TapQueue>> {
        &self.taps
    }

    /// The mapped guest memory, if a table is set.
    pub fn memory(&self) -> Option<&GuestMemory> {
        self.memory.as_ref()
    }

    /// Installs a device started elsewhere (a handoff successor) as running these pairs.
    pub fn adopt_running(&mut self, device: Device, pairs: Vec<u16>) {
        self.memory = Some(device.memory().clone());
        self.running = Some(Running { device, pairs });
    }

    /// The queue pairs the device runs now.
    pub fn running_pairs(&self) -> Vec<u16> {
        self.running
            .as_ref()
            .map(|r| r.pairs.clone())
            .unwrap_or_default()
    }

    fn has_protocol(&self, f: VhostUserProtocolFeatures) -> bool {
        self.protocol_features & f.bits() != 0
    }

    fn vring_index(&self, index: u32) -> Result<usize, RequestError> {
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.vrings.len())
            .ok_or_else(|| {
                invalid(format!(
                    "vring {index} (the device has {})",
                    self.vrings.len()
                ))
            })
    }

    /// Vring `i` (checked against the device's vrings).
    fn vring(&self, i: usize) -> Result<&Vring, RequestError> {
        self.vrings
            .get(i)
            .ok_or_else(|| invalid(format!("vring {i} (the device has {})", self.vrings.len())))
    }

    fn vring_mut(&mut self, i: usize) -> Result<&mut Vring, RequestError> {
        let n = self.vrings.len();
        self.vrings
            .get_mut(i)
            .ok_or_else(|| invalid(format!("vring {i} (the device has {n})")))
    }

    /// True when the mapped memory (the session's, the running device's) or the dirty log
    /// lost pages under its mapping: the frontend shrank a file it passed (see
    /// [`tapir_datapath::guard_mapping`]). The session must end.
    pub fn memory_broken(&self) -> bool {
        self.memory.as_ref().is_some_and(GuestMemory::is_broken)
            || self
                .running
                .as_ref()
                .is_some_and(|r| r.device.memory().is_broken())
            || self.log.as_ref().is_some_and(DirtyLog::is_broken)
    }

    /// Marks a restart if vring `i` belongs to a running pair.
    fn touch(&mut self, i: usize) {
        if let Some(r) = &self.running {
            if r.pairs.iter().any(|&p| usize::from(p) == i / 2) {
                self.restart = true;
            }
        }
    }

    fn ready(&self, pair: usize) -> bool {
        let ok = |v: &Vring| v.started && v.enabled && v.size > 0 && v.addrs.is_some();
        let ok_at = |i: usize| self.vrings.get(i).is_some_and(ok);
        self.memory.is_some() && ok_at(2 * pair) && ok_at(2 * pair + 1)
    }
}
