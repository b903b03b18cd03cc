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

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use nix::sys::eventfd::{EfdFlags, EventFd};
use tapir_datapath::EngineConfig;
use tapir_datapath::{expect_eventfd, FdCheckError};
use tapir_datapath::{
    features, Device, DeviceConfig, EngineKind, GuestMemory, QueueConfig, QueuePairSpec, TapQueue,
};
use tapir_datapath::{used_index, Virtqueue};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserLog, VhostUserMemory, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
    VhostUserU64, VhostUserVringAddr, VhostUserVringState,
};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::ByteValued;

use crate::dirty_log::DirtyLog;
use crate::link;
use crate::memory_table::{Added, MemoryTable, Region, MAX_MEM_SLOTS};
use crate::wire::{Connection, Request, WireError};

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
        }
    }

    /// Where the session's counters are, for a reader on another thread
    /// ([`crate::report::Board`]): the stopped devices' totals and the running workers' stats
    /// (workers publish once per loop; nothing new is counted).
    pub fn counter_sources(&self) -> crate::report::CounterSources {
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

    /// Whether the dirty log must be kept.
    pub fn logging(&self) -> bool {
        self.features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0 && self.log.is_some()
    }

    /// Moves the datapath's dirty marks into the frontend's log (when logging); returns the
    /// pages moved.
    pub fn flush_log(&self) -> usize {
        if let (true, Some(log), Some(mem)) = (self.logging(), &self.log, &self.memory) {
            let pages = log.flush(mem);
            if pages > 0 {
                tracing::trace!(pages, "dirty pages moved into the frontend's log");
            }
            return pages;
        }
        0
    }

    /// Handles one request and replies as the protocol says (REPLY_ACK included). Request
    /// errors are logged and reported to the frontend; only transport errors are returned.
    pub fn handle(&mut self, conn: &Connection, req: Request) -> Result<(), WireError> {
        self.requests += 1;
        let code = req.code();
        tracing::debug!(?code, size = req.body.len(), fds = req.fds.len(), "request");
        let need_ack =
            req.header.is_need_reply() && self.has_protocol(VhostUserProtocolFeatures::REPLY_ACK);
        let result = self.dispatch(conn, &req);
        let result = result.and_then(|replied| match self.reconcile() {
            Ok(()) => Ok(replied),
            Err(e) if replied => Err(RequestError::AfterReply(Box::new(e))),
            Err(e) => Err(e),
        });
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                if need_ack {
                    conn.reply(&req.header, VhostUserU64::new(0).as_slice(), &[])?;
                }
                Ok(())
            }
            Err(e) if expects_reply(code) && !replied_already(&e) => {
                // The frontend waits for this reply; a made-up one would be a lie and none
                // would hang it: end the session instead.
                tracing::warn!(?code, error = %e, "vhost-user request that needs a reply failed");
                Err(WireError::Malformed(format!("{code:?}: {e}")))
            }
            Err(e) => {
                tracing::warn!(?code, error = %e, "vhost-user request failed");
                // A request answered with data got its reply already: no second one.
                if need_ack && !expects_reply(code) {
                    conn.reply(&req.header, VhostUserU64::new(1).as_slice(), &[])?;
                }
                Ok(())
            }
        }
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

    fn body<T: ByteValued + Default>(req: &Request) -> Result<T, RequestError> {
        req.body_as::<T>().ok_or_else(|| {
            invalid(format!(
                "{:?}: body of {} bytes, expected {}",
                req.code(),
                req.body.len(),
                std::mem::size_of::<T>()
            ))
        })
    }

    /// Marks a restart if vring `i` belongs to a running pair.
    fn touch(&mut self, i: usize) {
        if let Some(r) = &self.running {
            if r.pairs.iter().any(|&p| usize::from(p) == i / 2) {
                self.restart = true;
            }
        }
    }

    /// Handles a request; returns true if it sent its own reply.
    fn dispatch(&mut self, conn: &Connection, req: &Request) -> Result<bool, RequestError> {
        let Some(code) = req.code() else {
            return Err(invalid(format!("unknown request {}", req.header.request)));
        };
        let takes_fds = matches!(
            code,
            FrontendReq::SET_MEM_TABLE
                | FrontendReq::ADD_MEM_REG
                | FrontendReq::REM_MEM_REG
                | FrontendReq::SET_LOG_BASE
                | FrontendReq::SET_LOG_FD
                | FrontendReq::SET_VRING_KICK
                | FrontendReq::SET_VRING_CALL
                | FrontendReq::SET_VRING_ERR
        );
        if !takes_fds && !req.fds.is_empty() {
            return Err(invalid(format!("{code:?} came with fds")));
        }
        match code {
            FrontendReq::GET_FEATURES => {
                conn.reply(
                    &req.header,
                    VhostUserU64::new(offered_features()).as_slice(),
                    &[],
                )
                .map_err(wire_to_request)?;
                Ok(true)
            }
            FrontendReq::SET_FEATURES => {
                let v = Self::body::<VhostUserU64>(req)?.value;
                if v & !offered_features() != 0 {
                    return Err(invalid(format!(
                        "features {:#x} not offered",
                        v & !offered_features()
                    )));
                }
                let datapath = |f: u64| f & features::SUPPORTED;
                if datapath(v) != datapath(self.features) && self.running.is_some() {
                    self.restart = true;
                }
                if v != self.features {
                    tracing::info!(
                        acked = format_args!("{v:#x}"),
                        offered = format_args!("{:#x}", offered_features()),
                        "frontend's virtio features"
                    );
                }
                self.features = v;
                Ok(false)
            }
            FrontendReq::SET_OWNER => Ok(false),
            FrontendReq::RESET_OWNER | FrontendReq::RESET_DEVICE => {
                self.reset();
                Ok(false)
            }
            FrontendReq::GET_PROTOCOL_FEATURES => {
                conn.reply(
                    &req.header,
                    VhostUserU64::new(offered_protocol_features().bits()).as_slice(),
                    &[],
                )
                .map_err(wire_to_request)?;
                Ok(true)
            }
            FrontendReq::SET_PROTOCOL_FEATURES => {
                let v = Self::body::<VhostUserU64>(req)?.value;
                self.protocol_features = v & offered_protocol_features().bits();
                tracing::info!(
                    acked = format_args!("{v:#x}"),
                    offered = format_args!("{:#x}", offered_protocol_features().bits()),
                    "frontend's protocol features"
                );
                Ok(false)
            }
            FrontendReq::GET_QUEUE_NUM => {
                // Virtqueues, not pairs: what the spec says, and what rust-vmm frontends
                // (Cloud Hypervisor) check vring indices against. (QEMU's net device ignores it.)
                conn.reply(
                    &req.header,
                    VhostUserU64::new(2 * u64::from(self.config.queue_pairs)).as_slice(),
                    &[],
                )
                .map_err(wire_to_request)?;
                Ok(true)
            }
            FrontendReq::GET_MAX_MEM_SLOTS => {
                conn.reply(
                    &req.header,
                    VhostUserU64::new(MAX_MEM_SLOTS as u64).as_slice(),
                    &[],
                )
                .map_err(wire_to_request)?;
                Ok(true)
            }
            FrontendReq::SET_MEM_TABLE => {
                self.set_mem_table(req)?;
                Ok(false)
            }
            FrontendReq::ADD_MEM_REG => {
                let r = Self::body::<VhostUserSingleMemoryRegion>(req)?;
                let fd = single_fd(req)?;
                if let Added::Mapped(memory) = self.table.add(region_of(&r, fd))? {
                    self.set_memory(Some(memory));
                }
                Ok(false)
            }
            FrontendReq::REM_MEM_REG => {
                let r = Self::body::<VhostUserSingleMemoryRegion>(req)?;
                let memory = self
                    .table
                    .remove(r.guest_phys_addr, r.memory_size, r.user_addr)?;
                self.set_memory(memory);
                Ok(false)
            }
            FrontendReq::SET_LOG_BASE => {
                let body = Self::body::<VhostUserLog>(req)?;
                let fd = single_fd(req)?;
                // Flush what is pending into the old log before switching.
                self.flush_log();
                self.log = Some(DirtyLog::map(fd, body.mmap_size, body.mmap_offset)?);
                conn.reply(&req.header, body.as_slice(), &[])
                    .map_err(wire_to_request)?;
                Ok(true)
            }
            FrontendReq::SET_LOG_FD => Ok(false),
            FrontendReq::SET_VRING_NUM => {
                let s = Self::body::<VhostUserVringState>(req)?;
                let i = self.vring_index(s.index)?;
                let size = u16::try_from(s.num)
                    .ok()
                    .filter(|n| n.is_power_of_two() && *n <= 32768)
                    .ok_or_else(|| invalid(format!("vring {i} size {}", { s.num })))?;
                self.touch(i);
                self.vring_mut(i)?.size = size;
                Ok(false)
            }
            FrontendReq::SET_VRING_ADDR => {
                let a = Self::body::<VhostUserVringAddr>(req)?;
                let i = self.vring_index(a.index)?;
                self.touch(i);
                self.vring_mut(i)?.addrs = Some(VringAddrs {
                    desc: a.descriptor,
                    used: a.used,
                    avail: a.available,
                    log: a.log,
                    flags: a.flags,
                });
                Ok(false)
            }
            FrontendReq::SET_VRING_BASE => {
                let s = Self::body::<VhostUserVringState>(req)?;
                let i = self.vring_index(s.index)?;
                let base = u16::try_from(s.num)
                    .map_err(|_| invalid(format!("vring base {}", { s.num })))?;
                tracing::debug!(vring = i, base, used = ?self.used_idx(i), "vring base set");
                self.touch(i);
                let v = self.vring_mut(i)?;
                v.base = base;
                v.held.clear();
                Ok(false)
            }
            FrontendReq::GET_VRING_BASE => {
                let s = Self::body::<VhostUserVringState>(req)?;
                let i = self.vring_index(s.index)?;
                let base = self.stop_vring(i)?;
                let index = s.index;
                conn.reply(
                    &req.header,
                    VhostUserVringState::new(index, u32::from(base)).as_slice(),
                    &[],
                )
                .map_err(wire_to_request)?;
                Ok(true)
            }
            FrontendReq::SET_VRING_KICK
            | FrontendReq::SET_VRING_CALL
            | FrontendReq::SET_VRING_ERR => {
                let v = Self::body::<VhostUserU64>(req)?.value;
                let i = self.vring_index(u32::try_from(v & 0xff).unwrap_or(u32::MAX))?;
                let no_fd = v & 0x100 != 0;
                let fd = match (no_fd, req.fds.len()) {
                    (true, 0) => None,
                    (false, 1) => Some(single_fd(req)?),
                    _ => return Err(invalid(format!("{code:?}: flag and fds disagree"))),
                };
                // A pipe or socket here would block a worker's write or report end-of-file
                // forever (issue 9, items 7 and 8): only eventfds are taken.
                if let Some(fd) = &fd {
                    expect_eventfd(fd.as_fd(), &format!("{code:?} fd of vring {i}"))?;
                }
                match code {
                    FrontendReq::SET_VRING_KICK => {
                        let fd = fd
                            .ok_or_else(|| invalid("polling mode (no kick fd) is not supported"))?;
                        self.touch(i);
                        let no_protocol =
                            self.features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
                        let v = self.vring_mut(i)?;
                        v.kick = Some(fd);
                        v.started = true;
                        if no_protocol {
                            v.enabled = true;
                        }
                    }
                    FrontendReq::SET_VRING_CALL => {
                        self.touch(i);
                        self.vring_mut(i)?.call = fd;
                    }
                    _ => self.vring_mut(i)?.err = fd,
                }
                Ok(false)
            }
            FrontendReq::SET_VRING_ENABLE => {
                let s = Self::body::<VhostUserVringState>(req)?;
                let i = self.vring_index(s.index)?;
                self.vring_mut(i)?.enabled = match s.num {
                    0 => false,
                    1 => true,
                    n => return Err(invalid(format!("SET_VRING_ENABLE {n}"))),
                };
                Ok(false)
            }
            FrontendReq::SEND_RARP => {
                if !self.has_protocol(VhostUserProtocolFeatures::RARP) {
                    return Err(invalid("SEND_RARP without VHOST_USER_PROTOCOL_F_RARP"));
                }
                let v = Self::body::<VhostUserU64>(req)?.value;
                // QEMU copies the MAC into the first six bytes of the payload.
                let b = v.to_ne_bytes();
                let mac = [b[0], b[1], b[2], b[3], b[4], b[5]];
                link::announce(self.first_tap()?, mac)?;
                self.announcements += 1;
                tracing::info!(mac = %MacAddr(mac), "RARP announcement sent into the TAP");
                Ok(false)
            }
            FrontendReq::NET_SET_MTU => {
                if !self.has_protocol(VhostUserProtocolFeatures::MTU) {
                    return Err(invalid("NET_SET_MTU without VHOST_USER_PROTOCOL_F_NET_MTU"));
                }
                let mtu = link::checked_mtu(Self::body::<VhostUserU64>(req)?.value)?;
                link::set_mtu(self.first_tap()?, mtu)?;
                if self.mtu != Some(mtu) && self.running.is_some() {
                    self.restart = true;
                }
                self.mtu = Some(mtu);
                tracing::info!(mtu, "link MTU set");
                Ok(false)
            }
            other => Err(invalid(format!("{other:?} is not supported"))),
        }
    }

    fn set_mem_table(&mut self, req: &Request) -> Result<(), RequestError> {
        let head = std::mem::size_of::<VhostUserMemory>();
        let each = std::mem::size_of::<VhostUserMemoryRegion>();
        let mut hdr = VhostUserMemory::default();
        let (hb, rest) = req
            .body
            .split_at_checked(head)
            .ok_or_else(|| invalid("short SET_MEM_TABLE"))?;
        hdr.as_mut_slice().copy_from_slice(hb);
        let n = usize::try_from(hdr.num_regions).unwrap_or(usize::MAX);
        if n > MAX_MEM_SLOTS || rest.len() != n * each || req.fds.len() != n {
            return Err(invalid(format!(
                "SET_MEM_TABLE: {n} regions (at most {MAX_MEM_SLOTS}), {} body bytes, {} fds",
                req.body.len(),
                req.fds.len()
            )));
        }
        let mut regions = Vec::with_capacity(n);
        for (bytes, fd) in rest.chunks_exact(each).zip(&req.fds) {
            let mut r = VhostUserMemoryRegion::default();
            r.as_mut_slice().copy_from_slice(bytes);
            let fd = fd
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| RequestError::Os("dup", e))?;
            regions.push(Region {
                guest_addr: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
                fd,
            });
        }
        let memory = self.table.replace(regions)?;
        self.set_memory(memory);
        Ok(())
    }

    /// Maps the memory table anew (restarting a running device on it).
    pub fn remap(&mut self) -> Result<(), RequestError> {
        let memory = if self.table.is_empty() {
            None
        } else {
            Some(self.table.map()?)
        };
        self.set_memory(memory);
        Ok(())
    }

    /// Installs a new mapping of the memory table (restarting a running device on it).
    fn set_memory(&mut self, memory: Option<GuestMemory>) {
        // The running device keeps its own mapping until it is restarted with the new one.
        self.flush_log();
        self.memory = memory;
        if self.running.is_some() {
            self.restart = true;
        }
    }

    /// Back to the state of a new connection (vrings stopped, tables dropped).
    fn reset(&mut self) {
        self.stop_device();
        let config = self.config.clone();
        let generation = self.generation;
        let counters = std::mem::take(&mut self.stopped_counters);
        *self = Session::new(config, self.taps.clone());
        self.generation = generation;
        self.stopped_counters = counters;
    }

    /// Stops vring `i` (`GET_VRING_BASE`) and returns where the frontend resumes it. The
    /// device is quiesced first, so nothing is in flight. RX chains tapir held (popped, not
    /// filled) must go back to the guest, and a base can only give back a tail of the avail
    /// ring: see [`Session::give_back_held`].
    fn stop_vring(&mut self, i: usize) -> Result<u16, RequestError> {
        self.vring(i)?;
        self.touch(i);
        let flushed_before = self.stop_device();
        let base = self.give_back_held(i);
        let flushed = flushed_before + self.flush_log();
        if let (true, Some(log), Some(mem)) = (self.logging(), &self.log, &self.memory) {
            let guest_pages: u64 = mem.regions().iter().map(|r| r.size.div_ceil(4096)).sum();
            let all_pages = self.config.dirty_at_stop == DirtyAtStop::AllPages;
            let dirty_pages = if all_pages {
                // `--all-dirty-at-ring-stop`: QEMU's final pass then sends the guest whole,
                // which also covers pages QEMU itself lost track of (docs/QEMU.md, "Live
                // migration"), at the price of a stop-and-copy phase that grows with guest
                // memory.
                log.mark_all(mem)
            } else {
                flushed as u64
            };
            crate::daemon::event(format!(
                "{{\"event\":\"ring_stopped_logging\",\"vring\":{i},\"dirty_pages\":{dirty_pages},\"guest_pages\":{guest_pages},\"all_pages\":{all_pages}}}"
            ));
        }
        let v = self.vring_mut(i)?;
        v.started = false;
        v.base = base;
        v.held.clear();
        Ok(base)
    }

    /// Gives the RX chains held on vring `i` back to the guest (see
    /// [`Virtqueue::give_back`]) and returns the base to resume at.
    fn give_back_held(&mut self, i: usize) -> u16 {
        let Some(v) = self.vrings.get(i) else {
            return 0;
        };
        if v.held.is_empty() {
            return v.base;
        }
        let event_idx = self.features & features::F_EVENT_IDX != 0;
        let given = self.memory.clone().and_then(|mem| {
            let (config, held) = self.queue_config(i).ok()?;
            let index = u16::try_from(i).ok()?;
            let mut vq = Virtqueue::new(index, config, event_idx, &mem).ok()?;
            Some(vq.give_back(&mem, &held))
        });
        let Some(given) = given else {
            return v.base;
        };
        tracing::info!(
            vring = i,
            empty = given.emptied,
            rewound = given.rewound,
            "held RX buffers given back at a ring stop"
        );
        given.base
    }

    /// Quiesces the device, recording each pair's positions and held RX chains; returns the
    /// dirty pages it moved into the log.
    pub fn stop_device(&mut self) -> usize {
        self.restart = false;
        let Some(running) = self.running.take() else {
            return 0;
        };
        for (c, &p) in running.device.counters().iter().zip(&running.pairs) {
            if let Some(total) = self.stopped_counters.get_mut(usize::from(p)) {
                total.add(c);
            }
        }
        match running.device.quiesce() {
            Ok(q) => {
                for (qp, &p) in q.pairs.iter().zip(&running.pairs) {
                    if let Some(rx) = self.vrings.get_mut(2 * usize::from(p)) {
                        rx.base = qp.rx_positions().0;
                        rx.held = qp.rx_in_flight();
                    }
                    if let Some(tx) = self.vrings.get_mut(2 * usize::from(p) + 1) {
                        tx.base = qp.tx_positions().0;
                        tx.held.clear();
                    }
                }
            }
            Err(e) => {
                // Positions unknown: resume from the used rings (RX buffers are popped again,
                // TX chains that were in flight may be sent twice).
                tracing::error!(error = %e, "device failed while stopping; resuming from the used rings");
                for &p in &running.pairs {
                    for i in [2 * usize::from(p), 2 * usize::from(p) + 1] {
                        let used = self.used_idx(i);
                        if let Some(v) = self.vrings.get_mut(i) {
                            if let Some(used) = used {
                                v.base = used;
                            }
                            v.held.clear();
                        }
                    }
                }
            }
        }
        self.flush_log()
    }

    fn ready(&self, pair: usize) -> bool {
        let ok = |v: &Vring| v.started && v.enabled && v.size > 0 && v.addrs.is_some();
        let ok_at = |i: usize| self.vrings.get(i).is_some_and(ok);
        self.memory.is_some() && ok_at(2 * pair) && ok_at(2 * pair + 1)
    }

    fn gpa(&self, va: u64, what: &str, i: usize) -> Result<u64, RequestError> {
        self.table
            .va_to_gpa(va)
            .ok_or_else(|| invalid(format!("vring {i} {what} {va:#x} is in no memory region")))
    }

    /// The used index the guest sees in vring `i` (for a ring the frontend set up).
    fn used_idx(&self, i: usize) -> Option<u16> {
        let mem = self.memory.as_ref()?;
        let addrs = self.vrings.get(i)?.addrs?;
        used_index(mem, self.table.va_to_gpa(addrs.used)?)
    }

    fn queue_config(&self, i: usize) -> Result<(QueueConfig, Vec<u16>), RequestError> {
        let v = self.vring(i)?;
        let addrs = v
            .addrs
            .ok_or_else(|| invalid(format!("vring {i} has no addresses")))?;
        let dup = |fd: &OwnedFd| {
            fd.as_fd()
                .try_clone_to_owned()
                .map_err(|e| RequestError::Os("dup", e))
        };
        let kick = dup(v
            .kick
            .as_ref()
            .ok_or_else(|| invalid(format!("vring {i} has no kick fd")))?)?;
        let call = match &v.call {
            Some(fd) => dup(fd)?,
            None => EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map(OwnedFd::from)
                .map_err(|e| RequestError::Os("eventfd", e.into()))?,
        };
        let used = self
            .used_idx(i)
            .ok_or_else(|| invalid(format!("vring {i} used ring unreadable")))?;
        let mut next_avail = v.base;
        let mut held = v.held.clone();
        tracing::debug!(
            vring = i,
            base = next_avail,
            used,
            held = held.len(),
            "vring start"
        );
        if next_avail.wrapping_sub(used) != u16::try_from(held.len()).unwrap_or(u16::MAX) {
            // The frontend's base is ahead of the used ring with nothing held here: chains an
            // earlier backend popped and never used. Pop them again.
            tracing::warn!(
                vring = i,
                base = next_avail,
                used,
                held = held.len(),
                "base and used index disagree; resuming at the used index"
            );
            next_avail = used;
            held.clear();
        }
        Ok((
            QueueConfig {
                size: v.size,
                desc_table: self.gpa(addrs.desc, "descriptor table", i)?,
                avail_ring: self.gpa(addrs.avail, "avail ring", i)?,
                used_ring: self.gpa(addrs.used, "used ring", i)?,
                next_avail,
                next_used: used,
                kick,
                call,
            },
            held,
        ))
    }

    /// Starts, stops or restarts the device so that exactly the ready pairs run.
    pub fn reconcile(&mut self) -> Result<(), RequestError> {
        let want: Vec<u16> = (0..self.config.queue_pairs)
            .filter(|&p| self.ready(usize::from(p)))
            .collect();
        let same = self.running.as_ref().map(|r| r.pairs.as_slice()) == Some(want.as_slice());
        if same && !self.restart {
            return Ok(());
        }
        if self.running.is_none() && want.is_empty() {
            self.restart = false;
            return Ok(());
        }
        self.stop_device();
        if want.is_empty() {
            return Ok(());
        }
        self.start_device(want)
    }

    fn start_device(&mut self, pairs: Vec<u16>) -> Result<(), RequestError> {
        let memory = self
            .memory
            .clone()
            .ok_or_else(|| invalid("no memory table"))?;
        let mut specs = Vec::with_capacity(pairs.len());
        for &p in &pairs {
            let (rx, rx_in_flight) = self.queue_config(2 * usize::from(p))?;
            let (tx, _) = self.queue_config(2 * usize::from(p) + 1)?;
            specs.push((p, rx, tx, rx_in_flight));
        }
        let mut built = Vec::with_capacity(specs.len());
        for (p, rx, tx, rx_in_flight) in specs {
            let tap = self.tap_queue(p)?;
            built.push(QueuePairSpec {
                rx,
                tx,
                tap,
                rx_in_flight,
            });
        }
        let cfg = DeviceConfig {
            features: self.features & features::SUPPORTED,
            mtu: self.device_mtu(),
            mac: self.config.mac,
            engine: self.config.engine,
            engine_config: self.config.engine_config,
            cpu_affinity: pairs
                .iter()
                .map(|&p| {
                    self.config
                        .cpu_affinity
                        .get(usize::from(p))
                        .copied()
                        .flatten()
                })
                .collect(),
        };
        let device = Device::start(cfg, memory, built)?;
        tracing::info!(pairs = ?pairs, engine = %self.config.engine, features = format_args!("{:#x}", self.features), "device running");
        for &p in &pairs {
            if let Some(rx) = self.vrings.get_mut(2 * usize::from(p)) {
                rx.held.clear();
            }
        }
        self.running = Some(Running { device, pairs });
        self.restart = false;
        Ok(())
    }

    fn first_tap(&self) -> Result<&TapQueue, RequestError> {
        self.taps
            .first()
            .ok_or_else(|| invalid("the device has no TAP queue"))
    }

    /// The MTU the device runs with: the TAP's (which `NET_SET_MTU` sets), 1500 if it cannot be
    /// read.
    fn device_mtu(&self) -> u16 {
        if let Some(m) = self.mtu {
            return m;
        }
        match self.first_tap().ok().map(link::mtu) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "TAP MTU unreadable; running with 1500");
                1500
            }
            None => 1500,
        }
    }

    fn tap_queue(&self, pair: u16) -> Result<TapQueue, RequestError> {
        let fd = self
            .taps
            .get(usize::from(pair))
            .map(|q| q.as_fd().try_clone_to_owned())
            .ok_or_else(|| invalid(format!("no TAP queue for pair {pair}")))?
            .map_err(|e| RequestError::Os("dup of a TAP queue", e))?;
        Ok(TapQueue::adopt(fd)?)
    }
}

/// Requests whose reply carries data (not just a REPLY_ACK status).
fn expects_reply(code: Option<FrontendReq>) -> bool {
    matches!(
        code,
        Some(
            FrontendReq::GET_FEATURES
                | FrontendReq::GET_PROTOCOL_FEATURES
                | FrontendReq::GET_QUEUE_NUM
                | FrontendReq::GET_MAX_MEM_SLOTS
                | FrontendReq::GET_VRING_BASE
                | FrontendReq::SET_LOG_BASE
        )
    )
}

/// Whether the error happened after the reply went out (reconciling the device afterwards).
fn replied_already(e: &RequestError) -> bool {
    matches!(e, RequestError::AfterReply(_))
}

/// A MAC as `aa:bb:cc:dd:ee:ff`.
struct MacAddr([u8; 6]);

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

fn wire_to_request(e: WireError) -> RequestError {
    RequestError::Os("reply", std::io::Error::other(e.to_string()))
}

fn single_fd(req: &Request) -> Result<OwnedFd, RequestError> {
    match req.fds.as_slice() {
        [fd] => fd
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| RequestError::Os("dup", e)),
        other => Err(invalid(format!(
            "{:?} needs one fd, got {}",
            req.code(),
            other.len()
        ))),
    }
}

fn region_of(r: &VhostUserSingleMemoryRegion, fd: OwnedFd) -> Region {
    Region {
        guest_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        mmap_offset: r.mmap_offset,
        fd,
    }
}
