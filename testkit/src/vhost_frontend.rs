//! A vhost-user frontend for the simulated guest: it does what a VMM (QEMU, Cloud Hypervisor)
//! does for a vhost-user-net device, with the rust-vmm `vhost` crate's frontend, so that any
//! vhost-user-net backend can be driven by [`SimGuest`] and measured with the same guest and
//! peers as tapir's in-process engines.
//!
//! Set-up, in QEMU's order: `GET_FEATURES`; if the backend offers
//! `VHOST_USER_F_PROTOCOL_FEATURES`: `GET_PROTOCOL_FEATURES`, `SET_PROTOCOL_FEATURES` (MQ and
//! REPLY_ACK where offered), `GET_QUEUE_NUM`; `SET_OWNER`; `SET_FEATURES` (the guest's
//! features, all of which the backend must offer, plus MQ for several pairs and
//! PROTOCOL_FEATURES); `SET_MEM_TABLE` with the guest's memfd regions; per vring
//! `SET_VRING_NUM`, `SET_VRING_BASE` 0, `SET_VRING_ADDR`, `SET_VRING_CALL`, `SET_VRING_KICK`;
//! then `SET_VRING_ENABLE` 1 for every vring. With REPLY_ACK every request without a reply of
//! its own asks for an acknowledgement, so a refusal is reported at the step that failed.
//!
//! Addresses are what a VMM sends: each region's `user_addr` is where this process maps it,
//! and ring addresses are those virtual addresses (the backend translates them through the
//! memory table).
//!
//! Teardown ([`FrontendSession::stop`]): `GET_VRING_BASE` for each vring (which stops it),
//! then the connection is closed.

use std::io::{Read, Write};
use std::os::fd::{BorrowedFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tapir_simguest::{features as gf, SimGuest, VirtqueueInfo};
use vhost::vhost_user::message::{FrontendReq, VhostUserHeaderFlag};
use vhost::vhost_user::{
    Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

/// What went wrong, and at which step.
#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    /// The backend's socket did not accept a connection in time.
    #[error("connecting to the vhost-user socket {} (tried for {waited:?})", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// How long it was retried.
        waited: Duration,
        /// The last error.
        #[source]
        source: std::io::Error,
    },
    /// A request failed or was refused by the backend.
    #[error("vhost-user {step} failed")]
    Request {
        /// The request (and vring).
        step: String,
        /// The `vhost` crate's error (a refused REPLY_ACK is "backend internal error").
        #[source]
        source: vhost::Error,
    },
    /// `GET_QUEUE_NUM` failed on the wire or got a malformed reply.
    #[error("vhost-user GET_QUEUE_NUM failed: {0}")]
    QueueNum(String),
    /// The backend does not offer a feature the simulated guest's driver uses.
    #[error(
        "the backend does not offer virtio features {missing:#x} that the simulated guest \
         uses (backend offers {offered:#x})"
    )]
    MissingFeatures {
        /// Guest features not offered.
        missing: u64,
        /// What the backend offered.
        offered: u64,
    },
    /// Several queue pairs need the MQ protocol feature.
    #[error("{pairs} queue pairs need the backend to offer the vhost-user MQ protocol feature")]
    NoMultiqueue {
        /// Queue pairs the guest has.
        pairs: u16,
    },
    /// The backend has fewer queues than the guest.
    #[error(
        "the backend supports {supported} queues (GET_QUEUE_NUM), the guest has {pairs} pairs"
    )]
    TooFewQueues {
        /// What GET_QUEUE_NUM said.
        supported: u64,
        /// Queue pairs the guest has.
        pairs: u16,
    },
    /// A guest address this process has no mapping for.
    #[error("guest address {gpa:#x} (+{len}) is not mapped by the simulated guest")]
    Unmapped {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// Duplicating one of the guest's eventfds, or cloning the socket.
    #[error("{0}")]
    Os(&'static str, #[source] std::io::Error),
}

/// Where the frontend says guest memory lies in its own address space: each region's
/// `user_addr` and the ring addresses of `SET_VRING_ADDR` (the backend translates the latter
/// through the former).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UserAddresses {
    /// Where this process maps the guest's memory: what a VMM sends.
    #[default]
    Mapped,
    /// The guest-physical addresses themselves: a frontend that maps nothing (tests that
    /// compute addresses from the guest's layout).
    GuestPhysical,
}

/// The order of the regions in `SET_MEM_TABLE`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RegionOrder {
    /// By guest address, lowest first.
    #[default]
    Ascending,
    /// By guest address, highest first (the protocol allows any order).
    Descending,
}

/// What the frontend asks for besides the simulated guest's own features.
#[derive(Clone, Debug)]
pub struct Negotiation {
    /// Protocol features asked for (those the backend offers are negotiated); REPLY_ACK makes
    /// every request without a reply of its own ask for an acknowledgement.
    pub protocol_features: VhostUserProtocolFeatures,
    /// Virtio features acked besides the guest's (`VHOST_F_LOG_ALL` for a migration).
    pub extra_features: u64,
    /// The addresses the frontend sends.
    pub addresses: UserAddresses,
    /// The order of the memory table's regions.
    pub region_order: RegionOrder,
}

impl Default for Negotiation {
    /// What a VMM asks for: MQ and REPLY_ACK, the guest's features, its own mapping's
    /// addresses.
    fn default() -> Negotiation {
        Negotiation {
            protocol_features: VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK,
            extra_features: 0,
            addresses: UserAddresses::Mapped,
            region_order: RegionOrder::Ascending,
        }
    }
}

fn step<T>(what: impl Into<String>, r: vhost::Result<T>) -> Result<T, FrontendError> {
    r.map_err(|source| FrontendError::Request {
        step: what.into(),
        source,
    })
}

/// Connects to `path`, retrying while it does not exist or refuses connections (a backend
/// that is still starting), for up to `timeout`.
pub fn connect(path: &Path, timeout: Duration) -> Result<UnixStream, FrontendError> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && start.elapsed() < timeout =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => {
                return Err(FrontendError::Connect {
                    path: path.to_owned(),
                    waited: start.elapsed(),
                    source,
                })
            }
        }
    }
}

/// `GET_QUEUE_NUM` by hand: the `vhost` crate's `get_queue_num` keeps the answer as its bound
/// on vring indices, but backends differ in what they count (virtqueues: the spec, rust-vmm,
/// tapir serve; queue pairs: DPDK), so the bench only checks that there are at least as many
/// as the guest has pairs and leaves the vring bound alone.
fn get_queue_num(sock: &UnixStream) -> Result<u64, FrontendError> {
    let err = |m: String| FrontendError::QueueNum(m);
    let code: u32 = FrontendReq::GET_QUEUE_NUM.into();
    let mut req = [0u8; 12];
    req[..4].copy_from_slice(&code.to_le_bytes());
    req[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1, no NEED_REPLY
    let mut s = sock;
    s.write_all(&req).map_err(|e| err(e.to_string()))?;
    let mut reply = [0u8; 20];
    s.read_exact(&mut reply).map_err(|e| err(e.to_string()))?;
    let word = |i: usize| u32::from_le_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
    let (request, flags, size) = (word(0), word(4), word(8));
    if request != code || flags & VhostUserHeaderFlag::REPLY.bits() == 0 || size != 8 {
        return Err(err(format!(
            "malformed reply (request {request}, flags {flags:#x}, size {size})"
        )));
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(&reply[12..20]);
    Ok(u64::from_le_bytes(v))
}

/// A vmm-sys-util `EventFd` owning a duplicate of one of the guest's eventfds (the `vhost`
/// crate sends it with `SCM_RIGHTS`; the guest keeps its own).
pub fn guest_eventfd(fd: RawFd) -> Result<EventFd, FrontendError> {
    // SAFETY: `fd` is an eventfd owned by the SimGuest, which outlives this call.
    let owned = unsafe { BorrowedFd::borrow_raw(fd) }
        .try_clone_to_owned()
        .map_err(|e| FrontendError::Os("dup of a guest eventfd", e))?;
    // SAFETY: `owned` is a fresh duplicate nothing else refers to; the EventFd takes it over
    // and closes it on drop.
    Ok(unsafe { EventFd::from_raw_fd(owned.into_raw_fd()) })
}

/// A connected, running vhost-user session for one [`SimGuest`].
pub struct FrontendSession {
    frontend: Frontend,
    vrings: usize,
    acked_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    queue_num: Option<u64>,
}

impl std::fmt::Debug for FrontendSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrontendSession")
            .field("vrings", &self.vrings)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("protocol_features", &self.protocol_features)
            .field("queue_num", &self.queue_num)
            .finish_non_exhaustive()
    }
}

impl FrontendSession {
    /// Connects to the backend at `path` (retrying for up to `timeout` while it starts) and
    /// starts every queue pair of `guest`.
    pub fn start(
        path: &Path,
        guest: &SimGuest,
        timeout: Duration,
    ) -> Result<FrontendSession, FrontendError> {
        Self::start_on(connect(path, timeout)?, guest)
    }

    /// Starts every queue pair of `guest` over an open connection to a backend, negotiating
    /// what a VMM does ([`Negotiation::default`]).
    pub fn start_on(sock: UnixStream, guest: &SimGuest) -> Result<FrontendSession, FrontendError> {
        Self::start_with(sock, guest, &Negotiation::default())
    }

    /// Starts every queue pair of `guest` over an open connection to a backend, negotiating
    /// `negotiation`.
    pub fn start_with(
        sock: UnixStream,
        guest: &SimGuest,
        negotiation: &Negotiation,
    ) -> Result<FrontendSession, FrontendError> {
        let pairs = guest.queue_pairs();
        let vrings = 2 * usize::from(pairs);
        let raw = sock
            .try_clone()
            .map_err(|e| FrontendError::Os("cloning the socket", e))?;
        let mut fe = Frontend::from_stream(sock, u64::try_from(vrings).unwrap_or(u64::MAX));

        let offered = step("GET_FEATURES", fe.get_features())?;
        let proto_bit = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mut protocol_features = VhostUserProtocolFeatures::empty();
        let mut queue_num = None;
        if offered & proto_bit != 0 {
            let theirs = step("GET_PROTOCOL_FEATURES", fe.get_protocol_features())?;
            protocol_features = theirs & negotiation.protocol_features;
            step(
                "SET_PROTOCOL_FEATURES",
                fe.set_protocol_features(protocol_features),
            )?;
            if protocol_features.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol_features.contains(VhostUserProtocolFeatures::MQ) {
                let n = get_queue_num(&raw)?;
                if n < u64::from(pairs) {
                    return Err(FrontendError::TooFewQueues {
                        supported: n,
                        pairs,
                    });
                }
                queue_num = Some(n);
            }
        }
        if pairs > 1 && !protocol_features.contains(VhostUserProtocolFeatures::MQ) {
            return Err(FrontendError::NoMultiqueue { pairs });
        }
        step("SET_OWNER", fe.set_owner())?;

        let wanted = guest.features();
        let missing = wanted & !offered;
        if missing != 0 {
            return Err(FrontendError::MissingFeatures { missing, offered });
        }
        let mq = if pairs > 1 { gf::VIRTIO_NET_F_MQ } else { 0 };
        let acked = wanted | (offered & (mq | proto_bit)) | negotiation.extra_features;
        step("SET_FEATURES", fe.set_features(acked))?;

        let mem = guest.memory();
        let va = |gpa: u64, len: u64| -> Result<u64, FrontendError> {
            let p = mem
                .host_ptr(gpa, len)
                .map_err(|_| FrontendError::Unmapped { gpa, len })?;
            Ok(match negotiation.addresses {
                UserAddresses::Mapped => u64::try_from(p.addr()).unwrap_or(u64::MAX),
                UserAddresses::GuestPhysical => gpa,
            })
        };
        let mut regions = guest
            .regions()
            .iter()
            .map(|r| {
                Ok(VhostUserMemoryRegionInfo {
                    guest_phys_addr: r.guest_addr,
                    memory_size: r.size,
                    userspace_addr: va(r.guest_addr, r.size)?,
                    mmap_offset: r.file_offset,
                    mmap_handle: r.fd,
                })
            })
            .collect::<Result<Vec<_>, FrontendError>>()?;
        regions.sort_by_key(|r| r.guest_phys_addr);
        if negotiation.region_order == RegionOrder::Descending {
            regions.reverse();
        }
        step("SET_MEM_TABLE", fe.set_mem_table(&regions))?;

        for q in guest.queues() {
            Self::set_up_vring(&fe, &q, &va)?;
        }
        if acked & proto_bit != 0 {
            // Rings start disabled when PROTOCOL_FEATURES is negotiated.
            for i in 0..vrings {
                step(
                    format!("SET_VRING_ENABLE (vring {i})"),
                    fe.set_vring_enable(i, true),
                )?;
            }
        }
        Ok(FrontendSession {
            frontend: fe,
            vrings,
            acked_features: acked,
            protocol_features,
            queue_num,
        })
    }

    fn set_up_vring(
        fe: &Frontend,
        q: &VirtqueueInfo,
        va: &dyn Fn(u64, u64) -> Result<u64, FrontendError>,
    ) -> Result<(), FrontendError> {
        let i = usize::from(q.index);
        let size = u64::from(q.size);
        let at = |what: &str| format!("{what} (vring {i})");
        step(at("SET_VRING_NUM"), fe.set_vring_num(i, q.size))?;
        step(at("SET_VRING_BASE"), fe.set_vring_base(i, 0))?;
        let config = VringConfigData {
            queue_max_size: q.size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: va(q.desc_table, 16 * size)?,
            used_ring_addr: va(q.used_ring, 6 + 8 * size)?,
            avail_ring_addr: va(q.avail_ring, 6 + 2 * size)?,
            log_addr: None,
        };
        step(at("SET_VRING_ADDR"), fe.set_vring_addr(i, &config))?;
        step(
            at("SET_VRING_CALL"),
            fe.set_vring_call(i, &guest_eventfd(q.call_fd)?),
        )?;
        step(
            at("SET_VRING_KICK"),
            fe.set_vring_kick(i, &guest_eventfd(q.kick_fd)?),
        )?;
        Ok(())
    }

    /// The virtio features acked to the backend.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The protocol features negotiated.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The `vhost` crate's frontend, for requests after the set-up.
    pub fn frontend(&mut self) -> &mut Frontend {
        &mut self.frontend
    }

    /// The `vhost` crate's frontend, the session left to the caller (no teardown).
    pub fn into_frontend(self) -> Frontend {
        self.frontend
    }

    /// What `GET_QUEUE_NUM` answered (None without the MQ protocol feature).
    pub fn queue_num(&self) -> Option<u64> {
        self.queue_num
    }

    /// Stops every vring (`GET_VRING_BASE`, in index order) and closes the connection;
    /// returns where each vring would resume.
    pub fn stop(self) -> Result<Vec<u32>, FrontendError> {
        (0..self.vrings)
            .map(|i| {
                step(
                    format!("GET_VRING_BASE (vring {i})"),
                    self.frontend.get_vring_base(i),
                )
            })
            .collect()
    }
}
