//! The TAP link as a frontend sees it: the announcement after a live migration
//! (`VHOST_USER_PROTOCOL_F_RARP`, `SEND_RARP`) and the link MTU (`VHOST_USER_PROTOCOL_F_NET_MTU`,
//! `NET_SET_MTU`).
//!
//! **Announce.** On the destination of a live migration QEMU asks the backend to tell the
//! network where the guest's MAC now lives (when the guest cannot announce itself, i.e. without
//! `VIRTIO_NET_F_GUEST_ANNOUNCE`). tapir writes the same frame QEMU's own `qemu_announce_self`
//! sends, a broadcast RARP request for the MAC, into a TAP queue as if the guest had sent it: a
//! bridge behind the TAP learns the MAC on this port and floods the broadcast onwards.
//!
//! **MTU.** `NET_SET_MTU` sets the TAP's MTU, which is what bounds the frames the host hands the
//! guest. Changing it takes `CAP_NET_ADMIN`, which a sandboxed tapir dropped after set-up; so a
//! request for the MTU the TAP already has (`tapir serve --mtu N` sets it before privileges are
//! dropped) always succeeds, and a different one succeeds only where the kernel lets tapir change
//! it. A refusal says which command fixes it; QEMU then reports that the backend does not
//! support the MTU and does not start the device, rather than running with a mismatch.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use tapir_datapath::TapQueue;

/// Smallest MTU a virtio-net device may report (the virtio spec's 68, IPv4's minimum).
pub const MIN_MTU: u16 = 68;

/// An Ethernet frame of the minimum size (without FCS): what the RARP announcement is padded to.
const MIN_FRAME: usize = 60;

/// `ETH_P_RARP`.
const ETHERTYPE_RARP: u16 = 0x8035;

/// Errors of the link operations.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The TAP queue's interface could not be named.
    #[error(transparent)]
    Tap(#[from] tapir_datapath::TapError),
    /// Writing the announcement into the TAP failed.
    #[error("writing the RARP announcement into TAP {tap}: {source}")]
    Announce {
        /// The TAP.
        tap: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The MTU is outside what a virtio-net device may have.
    #[error("MTU {0} is out of range ({MIN_MTU} to 65535)")]
    MtuOutOfRange(u64),
    /// Reading or setting the TAP's MTU failed.
    #[error("{op} on TAP {tap}: {source}")]
    Mtu {
        /// `SIOCGIFMTU` or `SIOCSIFMTU`.
        op: &'static str,
        /// The TAP.
        tap: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The TAP has another MTU and tapir may not change it.
    #[error(
        "the frontend asks for MTU {want} but TAP {tap} has {have}, and tapir may not change it \
         (no CAP_NET_ADMIN once the sandbox dropped it): start tapir serve with --mtu {want}, or \
         run `ip link set dev {tap} mtu {want}` before the frontend connects"
    )]
    MtuNotPermitted {
        /// The TAP.
        tap: String,
        /// Its MTU.
        have: u16,
        /// The frontend's.
        want: u16,
    },
}

/// The announcement QEMU sends for `mac` after a migration (`qemu_announce_self`): a broadcast
/// RARP "request reverse" (opcode 3) with the MAC as sender and target hardware address and
/// zero protocol addresses, padded to the minimum frame size.
pub fn rarp_frame(mac: [u8; 6]) -> [u8; MIN_FRAME] {
    let mut f = [0u8; MIN_FRAME];
    let mut fields: Vec<u8> = Vec::with_capacity(42);
    fields.extend_from_slice(&[0xff; 6]); // destination: broadcast
    fields.extend_from_slice(&mac); // source
    fields.extend_from_slice(&ETHERTYPE_RARP.to_be_bytes());
    fields.extend_from_slice(&1u16.to_be_bytes()); // hardware type: Ethernet
    fields.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol type: IPv4
    fields.extend_from_slice(&[6, 4]); // address lengths
    fields.extend_from_slice(&3u16.to_be_bytes()); // opcode: request reverse
    fields.extend_from_slice(&mac); // sender hardware address
    fields.extend_from_slice(&[0; 4]); // sender protocol address
    fields.extend_from_slice(&mac); // target hardware address
    fields.extend_from_slice(&[0; 4]); // target protocol address
    for (dst, src) in f.iter_mut().zip(&fields) {
        *dst = *src;
    }
    f
}

/// Writes the announcement for `mac` into `tap` as a frame from the guest (a zero virtio-net
/// header in front: no offload).
pub fn announce(tap: &TapQueue, mac: [u8; 6]) -> Result<(), LinkError> {
    let name = tap.interface_name()?;
    let hdr_len = tap.vnet_hdr_len()?;
    let mut frame = vec![0u8; hdr_len];
    frame.extend_from_slice(&rarp_frame(mac));
    // SAFETY: writes `frame.len()` bytes from a live buffer to an fd the queue owns.
    let n = unsafe { libc::write(tap.as_fd().as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
    match usize::try_from(n) {
        Ok(n) if n == frame.len() => Ok(()),
        Ok(n) => Err(LinkError::Announce {
            tap: name,
            source: io::Error::other(format!("short write: {n} of {} bytes", frame.len())),
        }),
        Err(_) => Err(LinkError::Announce {
            tap: name,
            source: io::Error::last_os_error(),
        }),
    }
}

/// The MTU a frontend asked for, checked against what a virtio-net device may have.
pub fn checked_mtu(value: u64) -> Result<u16, LinkError> {
    u16::try_from(value)
        .ok()
        .filter(|&m| m >= MIN_MTU)
        .ok_or(LinkError::MtuOutOfRange(value))
}

/// The MTU of the TAP `tap` belongs to.
pub fn mtu(tap: &TapQueue) -> Result<u16, LinkError> {
    let name = tap.interface_name()?;
    let mut req = IfReqMtu::new(&name);
    ifreq_ioctl(libc::SIOCGIFMTU, &mut req).map_err(|source| LinkError::Mtu {
        op: "SIOCGIFMTU",
        tap: name.clone(),
        source,
    })?;
    u16::try_from(req.mtu).map_err(|_| LinkError::Mtu {
        op: "SIOCGIFMTU",
        tap: name,
        source: io::Error::other(format!("MTU {} does not fit virtio-net's 16 bits", req.mtu)),
    })
}

/// Makes the TAP's MTU `want` (nothing to do if it has it already).
pub fn set_mtu(tap: &TapQueue, want: u16) -> Result<(), LinkError> {
    let have = mtu(tap)?;
    if have == want {
        return Ok(());
    }
    let name = tap.interface_name()?;
    let mut req = IfReqMtu::new(&name);
    req.mtu = i32::from(want);
    match ifreq_ioctl(libc::SIOCSIFMTU, &mut req) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => Err(LinkError::MtuNotPermitted {
            tap: name,
            have,
            want,
        }),
        Err(source) => Err(LinkError::Mtu {
            op: "SIOCSIFMTU",
            tap: name,
            source,
        }),
    }
}

/// `struct ifreq` with its `ifr_mtu` member.
#[repr(C)]
struct IfReqMtu {
    name: [u8; libc::IFNAMSIZ],
    mtu: i32,
    _pad: [u8; 20],
}

impl IfReqMtu {
    fn new(name: &str) -> IfReqMtu {
        let mut req = IfReqMtu {
            name: [0; libc::IFNAMSIZ],
            mtu: 0,
            _pad: [0; 20],
        };
        // Leave the last byte NUL: interface names are at most IFNAMSIZ - 1 bytes.
        for (dst, src) in req
            .name
            .iter_mut()
            .take(libc::IFNAMSIZ - 1)
            .zip(name.as_bytes())
        {
            *dst = *src;
        }
        req
    }
}

/// An interface ioctl through a Unix datagram socket: the kernel serves `SIOC[GS]IFMTU` on any
/// socket, and the sandbox lets tapir open Unix sockets only.
fn ifreq_ioctl(op: libc::c_ulong, req: &mut IfReqMtu) -> io::Result<()> {
    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket nobody else owns.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: SIOCGIFMTU/SIOCSIFMTU read or write a `struct ifreq`, which `IfReqMtu` lays out
    // (name, then the `ifr_mtu` int of the union, padded to the union's size); valid for the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), op, std::ptr::from_mut(req)) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_qemus_rarp() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let f = rarp_frame(mac);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3]);
        assert_eq!(&f[22..28], &mac);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &mac);
        assert_eq!(&f[38..], &[0; 22]);
    }

    #[test]
    fn mtus_outside_virtio_nets_range_are_refused() {
        assert!(checked_mtu(67).is_err());
        assert!(checked_mtu(65536).is_err());
        assert!(checked_mtu(u64::MAX).is_err());
        assert_eq!(checked_mtu(68).unwrap(), 68);
        assert_eq!(checked_mtu(9000).unwrap(), 9000);
    }

    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReqMtu>(), 40);
    }
}
