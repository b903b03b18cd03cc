//! Request dispatch: one vhost-user request read, acted on and answered (REPLY_ACK
//! included).

use std::os::fd::{AsFd, OwnedFd};

use tapir_datapath::{expect_eventfd, features};
use vhost::vhost_user::message::{
    FrontendReq, VhostUserLog, VhostUserSingleMemoryRegion, VhostUserU64, VhostUserVringAddr,
    VhostUserVringState,
};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vm_memory::ByteValued;

use super::memory::region_of;
use super::{
    invalid, offered_features, offered_protocol_features, RequestError, Session, VringAddrs,
};
use crate::dirty_log::DirtyLog;
use crate::link;
use crate::memory_table::{Added, MAX_MEM_SLOTS};
use crate::wire::{Connection, Request, WireError};

impl Session {
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

    pub(super) fn body<T: ByteValued + Default>(req: &Request) -> Result<T, RequestError> {
        req.body_as::<T>().ok_or_else(|| {
            invalid(format!(
                "{:?}: body of {} bytes, expected {}",
                req.code(),
                req.body.len(),
                std::mem::size_of::<T>()
            ))
        })
    }

    /// Handles a request; returns true if it sent its own reply.
    pub(super) fn dispatch(
        &mut self,
        conn: &Connection,
        req: &Request,
    ) -> Result<bool, RequestError> {
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

pub(super) fn wire_to_request(e: WireError) -> RequestError {
    RequestError::Os("reply", std::io::Error::other(e.to_string()))
}

pub(super) fn single_fd(req: &Request) -> Result<OwnedFd, RequestError> {
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
