//! Opening the daemon's TAP: refusing one whose queues another process has attached (unless
//! sharing is asked for), and turning the kernel's terse errors into what to do about them.
//!
//! Whether a TAP has queues attached is read from sysfs, which any user can read: the TUN
//! driver turns the carrier on when the first queue attaches and off when the last detaches
//! (`carrier_up_count` then equals `carrier_down_count`, which starts at 1 for the carrier
//! a new TAP begins without), and it keeps one `queues/tx-N` entry per attached queue.
//! `/sys` shows the network namespace it was mounted in (`ip netns exec` mounts the
//! namespace's own): where its interface has another ifindex than the kernel gives this
//! process for the name, the check cannot be made and a warning says so.

use std::path::PathBuf;

use tapir_datapath::{Tap, TapError};

/// The most queues a TAP can have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: usize = 256;

/// Whether the daemon may use a TAP other processes have queues on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TapSharing {
    /// Refuse a TAP with queues attached elsewhere (another backend would get part of the
    /// host-to-guest traffic).
    #[default]
    Exclusive,
    /// Attach beside them (`--share-tap`).
    Shared,
}

/// Errors of opening the TAP, with what to do about them.
#[derive(Debug, thiserror::Error)]
pub enum TapSetupError {
    /// Another process has queues on the TAP.
    #[error(
        "TAP {name} already has queues attached by another process (another backend?): \
         refusing to take part of its traffic (--share-tap to attach anyway)"
    )]
    InUse {
        /// The TAP.
        name: String,
    },
    /// Too many queues.
    #[error(
        "TAP {name}: {asked} queues asked for, but a TAP has at most {MAX_TAP_QUEUES} \
         (counting queues other processes attached)"
    )]
    TooManyQueues {
        /// The TAP.
        name: String,
        /// Queues asked for.
        asked: usize,
    },
    /// An existing TAP without IFF_MULTI_QUEUE (or a TUN device).
    #[error(
        "TAP {name} exists but is not a multiqueue TAP: make it again with \
         `ip tuntap del {name} mode tap; ip tuntap add {name} mode tap multi_queue vnet_hdr`"
    )]
    NotMultiqueue {
        /// The TAP.
        name: String,
    },
    /// The name belongs to a device of another kind.
    #[error("{name} exists and is not a TAP (a device of another kind has that name)")]
    NotATap {
        /// The name.
        name: String,
    },
    /// No CAP_NET_ADMIN, and the TAP does not exist.
    #[error(
        "not permitted to create TAP {name}: creating a TAP needs CAP_NET_ADMIN (run as \
         root), or make it beforehand for this user: \
         `ip tuntap add {name} mode tap multi_queue vnet_hdr user {uid}`"
    )]
    CannotCreate {
        /// The TAP.
        name: String,
        /// tapir's uid.
        uid: u32,
    },
    /// No CAP_NET_ADMIN, and the TAP belongs to someone else.
    #[error(
        "not permitted to attach to TAP {name}: it belongs to {owner}, tapir runs as uid \
         {uid} gid {gid} without CAP_NET_ADMIN: run tapir as that owner, give it \
         CAP_NET_ADMIN, or make the TAP again with `ip tuntap add {name} mode tap \
         multi_queue vnet_hdr user {uid}`"
    )]
    NotOwner {
        /// The TAP.
        name: String,
        /// Its owner and group as sysfs has them.
        owner: String,
        /// tapir's uid.
        uid: u32,
        /// tapir's gid.
        gid: u32,
    },
    /// `/dev/net/tun` exists, but this uid may not open it.
    #[error(
        "cannot open /dev/net/tun: /dev/net/tun is mode {mode:04o} (owner uid {owner}) and tapir \
         runs as uid {uid}; distributions make it 0666 (udev), which this machine does not: \
         `chmod 0666 /dev/net/tun` (the TAP's owner still decides who may attach), or run \
         tapir as uid {owner}"
    )]
    TunNotPermitted {
        /// The node's permission bits.
        mode: u32,
        /// The node's owner.
        owner: u32,
        /// tapir's uid.
        uid: u32,
    },
    /// `/dev/net/tun` is missing or not accessible.
    #[error("cannot open /dev/net/tun ({0}): load the tun module (`modprobe tun`) or, in a container, pass the device in")]
    NoTunDevice(String),
    /// Anything else the TUN driver said.
    #[error(transparent)]
    Tap(TapError),
}

fn sysfs(name: &str) -> PathBuf {
    PathBuf::from("/sys/class/net").join(name)
}

fn read_number(name: &str, file: &str) -> Option<i64> {
    std::fs::read_to_string(sysfs(name).join(file))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// What this process's network namespace has under a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Existing {
    /// Nothing.
    None,
    /// A TUN/TAP device, as sysfs shows it.
    Tap,
    /// A device of another kind.
    Other,
    /// A device that `/sys` (mounted for another namespace) does not show.
    Unseen,
}

fn existing(name: &str) -> Existing {
    let Ok(index) = nix::net::if_::if_nametoindex(name) else {
        return Existing::None;
    };
    if read_number(name, "ifindex") != Some(i64::from(index)) {
        return Existing::Unseen;
    }
    if sysfs(name).join("tun_flags").exists() {
        Existing::Tap
    } else {
        Existing::Other
    }
}

/// The queues attached to the existing TAP `name` (by any process), as sysfs shows them.
fn attached_queues(name: &str) -> Option<usize> {
    let up = read_number(name, "carrier_up_count")?;
    let down = read_number(name, "carrier_down_count")?;
    if up < down {
        return Some(0);
    }
    let tx = std::fs::read_dir(sysfs(name).join("queues"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("tx-"))
                .count()
        })
        .unwrap_or(1);
    Some(tx.max(1))
}

/// How long a TAP's queues may take to detach after their process died: the kernel releases
/// the files of a dead process's io_urings from a workqueue, after the exit.
const TEARDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The queues attached to `name`, waiting up to [`TEARDOWN_GRACE`] for them to go (a backend
/// restarted right after a crash finds the dead one's queues still attached for a moment).
fn attached_after_teardown(name: &str) -> usize {
    let deadline = std::time::Instant::now() + TEARDOWN_GRACE;
    loop {
        let n = attached_queues(name).unwrap_or(0);
        if n == 0 || std::time::Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `CAP_NET_ADMIN`'s bit in `/proc/self/status`'s `CapEff`.
const CAP_NET_ADMIN: u32 = 12;

fn has_net_admin() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

fn owner_of(name: &str) -> String {
    let id = |file| match read_number(name, file) {
        Some(-1) | None => None,
        Some(n) => Some(n),
    };
    match (id("owner"), id("group")) {
        (None, None) => "root only (no owner or group set)".to_owned(),
        (Some(u), None) => format!("uid {u}"),
        (None, Some(g)) => format!("group {g}"),
        (Some(u), Some(g)) => format!("uid {u} and group {g}"),
    }
}

/// Opens (or creates) the TAP `name` with `queues` queues.
pub fn open_tap(name: &str, queues: usize, sharing: TapSharing) -> Result<Tap, TapSetupError> {
    let found = existing(name);
    let exists = found != Existing::None;
    let attached = match found {
        Existing::None => 0,
        Existing::Other => return Err(TapSetupError::NotATap { name: name.into() }),
        Existing::Tap => attached_after_teardown(name),
        Existing::Unseen => {
            tracing::warn!(
                tap = name,
                "/sys is mounted for another network namespace: cannot check whether other \
                 processes have queues on this TAP"
            );
            0
        }
    };
    if attached > 0 && sharing == TapSharing::Exclusive {
        return Err(TapSetupError::InUse { name: name.into() });
    }
    if attached + queues > MAX_TAP_QUEUES {
        return Err(TapSetupError::TooManyQueues {
            name: name.into(),
            asked: queues,
        });
    }
    Tap::open(name, queues).map_err(|e| explain(e, name, queues, exists))
}

fn explain(e: TapError, name: &str, queues: usize, exists: bool) -> TapSetupError {
    let errno = match &e {
        TapError::SetIff { source, .. } => source.raw_os_error(),
        TapError::OpenTun(source) => {
            use std::os::unix::fs::MetadataExt;
            return match std::fs::metadata("/dev/net/tun") {
                Ok(m) if source.raw_os_error() == Some(libc::EACCES) => {
                    TapSetupError::TunNotPermitted {
                        mode: m.mode() & 0o7777,
                        owner: m.uid(),
                        uid: nix::unistd::geteuid().as_raw(),
                    }
                }
                _ => TapSetupError::NoTunDevice(source.to_string()),
            };
        }
        _ => None,
    };
    let uid = nix::unistd::geteuid().as_raw();
    let gid = nix::unistd::getegid().as_raw();
    match errno {
        Some(libc::E2BIG) => TapSetupError::TooManyQueues {
            name: name.into(),
            asked: queues,
        },
        Some(libc::EINVAL) if exists => TapSetupError::NotMultiqueue { name: name.into() },
        Some(libc::EPERM) if !exists || has_net_admin() => TapSetupError::CannotCreate {
            name: name.into(),
            uid,
        },
        Some(libc::EPERM) => TapSetupError::NotOwner {
            name: name.into(),
            owner: owner_of(name),
            uid,
            gid,
        },
        _ => TapSetupError::Tap(e),
    }
}
