//! Multiqueue TAP devices: create or open by name, adopt handed-in fds, offloads, queue attach.
//!
//! Every queue fd is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE`, a vnet
//! header size of 12 bytes (`virtio_net_hdr_v1`, the header a VERSION_1 guest uses, so guest
//! buffers go to the kernel untouched) and `O_NONBLOCK` (the classic engine needs it for epoll;
//! io_uring arms a poll on `EAGAIN` by itself).

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use crate::features;

/// The vnet header size every tapir TAP queue uses (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

const IFF_TAP: u16 = 0x0002;
const IFF_NO_PI: u16 = 0x1000;
const IFF_VNET_HDR: u16 = 0x4000;
const IFF_MULTI_QUEUE: u16 = 0x0100;
const IFF_ATTACH_QUEUE: u16 = 0x0200;
const IFF_DETACH_QUEUE: u16 = 0x0400;

// _IOW('T', 202, int) and friends, from <linux/if_tun.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETVNETHDRSZ: libc::c_ulong = 0x8004_54d7;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;

/// TAP offload flags (`TUN_F_*`): what the kernel may hand to the reader (the guest's RX).
pub mod offload {
    /// Partial checksums (`VIRTIO_NET_F_GUEST_CSUM`).
    pub const CSUM: u32 = 0x01;
    /// TCPv4 segmentation offload.
    pub const TSO4: u32 = 0x02;
    /// TCPv6 segmentation offload.
    pub const TSO6: u32 = 0x04;
    /// TSO with ECN bits.
    pub const TSO_ECN: u32 = 0x08;
    /// UDP fragmentation offload.
    pub const UFO: u32 = 0x10;
    /// UDP segmentation offload, IPv4.
    pub const USO4: u32 = 0x20;
    /// UDP segmentation offload, IPv6.
    pub const USO6: u32 = 0x40;
}

/// Errors of TAP set-up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] io::Error),
    /// The interface name is empty, too long or has a NUL byte.
    #[error("invalid TAP name {0:?} (1 to 15 bytes, no NUL)")]
    InvalidName(String),
    /// `TUNSETIFF` failed (no CAP_NET_ADMIN, a name in use by another kind of device, ...).
    #[error("TUNSETIFF on {name:?} failed: {source}")]
    SetIff {
        /// The interface name.
        name: String,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// An ioctl on an open queue failed.
    #[error("{what} failed: {source}")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// An adopted fd is not a TAP queue of the expected kind.
    #[error("fd {fd} is not a usable tapir TAP queue: {reason}")]
    NotATapQueue {
        /// The fd.
        fd: RawFd,
        /// Why it was refused.
        reason: String,
    },
    /// A TAP needs at least one queue.
    #[error("a TAP needs at least one queue")]
    NoQueues,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: u16,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str, flags: u16) -> Result<IfReq, TapError> {
        let bytes = name.as_bytes();
        if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
            return Err(TapError::InvalidName(name.to_owned()));
        }
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..bytes.len()].copy_from_slice(bytes);
        Ok(req)
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// One queue of a multiqueue TAP: an fd that reads and writes frames with a 12-byte vnet header.
#[derive(Debug)]
pub struct TapQueue {
    fd: OwnedFd,
}

impl TapQueue {
    fn open(name: &str) -> Result<TapQueue, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq::new(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE)?;
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its layout and size
        // (40 bytes) and lives for the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::SetIff {
                name: name.to_owned(),
                source: io::Error::last_os_error(),
            });
        }
        let queue = TapQueue { fd: file.into() };
        queue.set_vnet_hdr_len()?;
        Ok(queue)
    }

    /// Adopts a TAP queue fd handed in by a VMM or a predecessor, checking with `TUNGETIFF` that
    /// it is a multiqueue TAP with vnet headers, and setting the vnet header size and
    /// `O_NONBLOCK`.
    pub fn adopt(fd: OwnedFd) -> Result<TapQueue, TapError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which has its layout and size.
        let rc = unsafe { libc::ioctl(raw, TUNGETIFF, &mut req) };
        if rc < 0 {
            return Err(TapError::NotATapQueue {
                fd: raw,
                reason: format!("TUNGETIFF: {}", io::Error::last_os_error()),
            });
        }
        let want = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
        if req.flags & want != want {
            return Err(TapError::NotATapQueue {
                fd: raw,
                reason: format!("flags {:#x} lack IFF_TAP|IFF_NO_PI|IFF_VNET_HDR", req.flags),
            });
        }
        let queue = TapQueue { fd };
        queue.set_vnet_hdr_len()?;
        let flags = nix::fcntl::fcntl(&queue.fd, nix::fcntl::FcntlArg::F_GETFL)
            .map_err(|e| ioctl_err("F_GETFL", e.into()))?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&queue.fd, nix::fcntl::FcntlArg::F_SETFL(flags))
            .map_err(|e| ioctl_err("F_SETFL", e.into()))?;
        Ok(queue)
    }

    /// The interface this queue belongs to.
    pub fn interface_name(&self) -> Result<String, TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, which has its layout and size.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNGETIFF, &mut req) };
        if rc < 0 {
            return Err(ioctl_err("TUNGETIFF", io::Error::last_os_error()));
        }
        Ok(req.name())
    }

    fn set_vnet_hdr_len(&self) -> Result<(), TapError> {
        let len: libc::c_int = 12; // VNET_HDR_LEN
                                   // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer, valid for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETVNETHDRSZ, &len) };
        if rc < 0 {
            return Err(ioctl_err("TUNSETVNETHDRSZ", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The vnet header size the kernel uses on this queue.
    pub fn vnet_hdr_len(&self) -> Result<usize, TapError> {
        let mut len: libc::c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one `int` through the pointer, valid for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNGETVNETHDRSZ, &mut len) };
        if rc < 0 {
            return Err(ioctl_err("TUNGETVNETHDRSZ", io::Error::last_os_error()));
        }
        usize::try_from(len)
            .map_err(|_| ioctl_err("TUNGETVNETHDRSZ", io::ErrorKind::InvalidData.into()))
    }

    /// Sets the offloads (`offload::*` flags) the kernel may use on frames it hands to readers.
    /// The flags are device-wide (shared by all queues of the TAP).
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(ioctl_err("TUNSETOFFLOAD", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Sets the offloads derived from the negotiated virtio features, dropping the UDP
    /// segmentation flags when the kernel refuses them. Returns the flags in force.
    pub fn set_offload_from_features(&self, features: u64) -> Result<u32, TapError> {
        let wanted = features::tap_offload_flags(features);
        match self.set_offload(wanted) {
            Ok(()) => Ok(wanted),
            Err(_) if wanted & (offload::USO4 | offload::USO6) != 0 => {
                let fallback = wanted & !(offload::USO4 | offload::USO6);
                self.set_offload(fallback)?;
                tracing::warn!(wanted, fallback, "kernel refused USO offloads on the TAP");
                Ok(fallback)
            }
            Err(e) => Err(e),
        }
    }

    /// Attaches (enables) this queue: the kernel steers packets to it again.
    pub fn attach(&self) -> Result<(), TapError> {
        self.set_queue(IFF_ATTACH_QUEUE)
    }

    /// Detaches (disables) this queue: the kernel steers no packets to it.
    pub fn detach(&self) -> Result<(), TapError> {
        self.set_queue(IFF_DETACH_QUEUE)
    }

    fn set_queue(&self, flags: u16) -> Result<(), TapError> {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETQUEUE reads a `struct ifreq`; `req` has its layout and lives for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), TUNSETQUEUE, &mut req) };
        if rc < 0 {
            return Err(ioctl_err("TUNSETQUEUE", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Gives up ownership of the fd (for handing it to another process).
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsRawFd for TapQueue {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for TapQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn ioctl_err(what: &'static str, source: io::Error) -> TapError {
    TapError::Ioctl { what, source }
}

/// A multiqueue TAP interface and its open queues.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<TapQueue>,
}

impl Tap {
    /// Creates the TAP `name` (or opens it, if a multiqueue TAP of that name exists) with
    /// `num_queues` queues. A non-persistent TAP disappears when its last queue fd closes.
    pub fn open(name: &str, num_queues: usize) -> Result<Tap, TapError> {
        if num_queues == 0 {
            return Err(TapError::NoQueues);
        }
        let mut queues = Vec::with_capacity(num_queues);
        for _ in 0..num_queues {
            queues.push(TapQueue::open(name)?);
        }
        // The kernel may have completed a name pattern such as "tap%d".
        let name = queues[0].interface_name()?;
        Ok(Tap { name, queues })
    }

    /// Adopts queue fds handed in by a VMM or a predecessor (see [`TapQueue::adopt`]); all must
    /// belong to the same interface.
    pub fn adopt(fds: Vec<OwnedFd>) -> Result<Tap, TapError> {
        let queues = fds
            .into_iter()
            .map(TapQueue::adopt)
            .collect::<Result<Vec<_>, _>>()?;
        let first = queues.first().ok_or(TapError::NoQueues)?;
        let name = first.interface_name()?;
        for q in &queues[1..] {
            let other = q.interface_name()?;
            if other != name {
                return Err(TapError::NotATapQueue {
                    fd: q.as_raw_fd(),
                    reason: format!("belongs to {other:?}, not {name:?}"),
                });
            }
        }
        Ok(Tap { name, queues })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The open queues.
    pub fn queues(&self) -> &[TapQueue] {
        &self.queues
    }

    /// Splits the TAP into its queues (one per worker).
    pub fn into_queues(self) -> Vec<TapQueue> {
        self.queues
    }
}
