//! Network namespaces for benchmarks and tests, plus thin `ip` (iproute2) wrappers.
//!
//! Network namespaces are per *thread* on Linux: [`run_in_new_netns`] spawns a
//! thread, moves it into a fresh namespace with `unshare(CLONE_NEWNET)`, brings
//! `lo` up and runs the closure there. Threads and processes spawned from that
//! thread (including the `ip` children of [`ip`]) inherit the namespace. The
//! namespace disappears once its last user (thread, socket, TAP fd) is gone.
//!
//! Per-namespace `/proc` files must be read through `/proc/thread-self/net/...`
//! (`/proc/net` follows the *process's* main thread).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

/// Errors from namespace setup and `ip` invocations.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `unshare(CLONE_NEWNET)` failed (needs `CAP_SYS_ADMIN`).
    #[error("unshare(CLONE_NEWNET): {0}")]
    Unshare(#[source] io::Error),
    /// The namespace thread could not be spawned.
    #[error("spawning the namespace thread: {0}")]
    Spawn(#[source] io::Error),
    /// The `ip` binary could not be executed.
    #[error("running `ip {args}`: {source}")]
    Exec {
        /// The arguments, space separated.
        args: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `ip` ran and failed.
    #[error("`ip {args}` failed ({status}): {stderr}")]
    Command {
        /// The arguments, space separated.
        args: String,
        /// Exit status as printed by std.
        status: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// No interface with that name in the calling thread's namespace.
    #[error("no interface named {0:?}")]
    NoSuchInterface(String),
    /// A malformed argument (interface name, MAC address...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Other I/O errors (ioctls, /proc reads, sysctl writes).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>, source: io::Error) -> NetnsError {
    NetnsError::Io {
        context: context.into(),
        source,
    }
}

/// Moves the calling thread into a fresh network namespace and brings `lo` up.
///
/// Only do this on a thread you own (it is irreversible for that thread).
///
/// # Errors
/// [`NetnsError::Unshare`] or the error from bringing `lo` up.
pub fn enter_new_netns() -> Result<(), NetnsError> {
    // SAFETY: unshare has no memory-safety preconditions; CLONE_NEWNET only
    // affects the calling thread's nsproxy.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(NetnsError::Unshare(io::Error::last_os_error()));
    }
    link_up("lo")
}

/// Runs `f` on a new thread inside a fresh network namespace (with `lo` up) and
/// returns its result. A panic in `f` is propagated to the caller.
///
/// The namespace is gone once the thread has exited and every socket / TAP fd
/// created in it is closed.
///
/// # Errors
/// Namespace creation failures; `f`'s own errors are part of `T`.
pub fn run_in_new_netns<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NetnsError> {
    let handle = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<T, NetnsError> {
            enter_new_netns()?;
            Ok(f())
        })
        .map_err(NetnsError::Spawn)?;
    match handle.join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    }
}

/// Like [`run_in_new_netns`], but `f` may borrow from the caller's stack
/// (implemented with [`std::thread::scope`]).
///
/// # Errors
/// Namespace creation failures.
pub fn run_in_new_netns_scoped<'env, T: Send>(
    f: impl FnOnce() -> T + Send + 'env,
) -> Result<T, NetnsError> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, move || -> Result<T, NetnsError> {
                enter_new_netns()?;
                Ok(f())
            })
            .map_err(NetnsError::Spawn)?;
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Runs `ip ARGS...` in the calling thread's namespace and returns its stdout.
///
/// # Errors
/// [`NetnsError::Exec`] if `ip` cannot be run, [`NetnsError::Command`] (with
/// its stderr) if it fails.
pub fn ip_output(args: &[&str]) -> Result<String, NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetnsError::Exec {
            args: args.join(" "),
            source,
        })?;
    if !out.status.success() {
        return Err(NetnsError::Command {
            args: args.join(" "),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip ARGS...` in the calling thread's namespace.
///
/// # Errors
/// As [`ip_output`].
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    ip_output(args).map(drop)
}

/// `ip link set dev NAME up`.
///
/// # Errors
/// As [`ip`].
pub fn link_up(name: &str) -> Result<(), NetnsError> {
    ip(&["link", "set", "dev", name, "up"])
}

/// `ip link set dev NAME down`.
///
/// # Errors
/// As [`ip`].
pub fn link_down(name: &str) -> Result<(), NetnsError> {
    ip(&["link", "set", "dev", name, "down"])
}

/// `ip addr add CIDR dev NAME` (e.g. `add_addr("tap0", "10.0.0.1/24")`).
///
/// # Errors
/// As [`ip`].
pub fn add_addr(name: &str, cidr: &str) -> Result<(), NetnsError> {
    ip(&["addr", "add", cidr, "dev", name])
}

/// Installs a permanent neighbour (static ARP) entry: `ip neigh replace IP
/// lladdr MAC dev DEV nud permanent`.
///
/// # Errors
/// As [`ip`].
pub fn add_neigh(ip_addr: &str, mac: &str, dev: &str) -> Result<(), NetnsError> {
    ip(&[
        "neigh",
        "replace",
        ip_addr,
        "lladdr",
        mac,
        "dev",
        dev,
        "nud",
        "permanent",
    ])
}

/// `ip link set dev NAME mtu MTU`.
///
/// # Errors
/// As [`ip`].
pub fn set_mtu(name: &str, mtu: u32) -> Result<(), NetnsError> {
    ip(&["link", "set", "dev", name, "mtu", &mtu.to_string()])
}

/// `ip link set dev NAME address MAC`.
///
/// # Errors
/// As [`ip`].
pub fn set_mac(name: &str, mac: [u8; 6]) -> Result<(), NetnsError> {
    ip(&["link", "set", "dev", name, "address", &format_mac(mac)])
}

/// Interface index of `name` in the calling thread's namespace.
///
/// # Errors
/// [`NetnsError::NoSuchInterface`].
pub fn iface_index(name: &str) -> Result<u32, NetnsError> {
    let c = CString::new(name).map_err(|_| NetnsError::InvalidArgument(name.to_owned()))?;
    // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        return Err(NetnsError::NoSuchInterface(name.to_owned()));
    }
    Ok(idx)
}

pub(crate) fn ifreq_for(name: &str) -> Result<libc::ifreq, NetnsError> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(NetnsError::InvalidArgument(name.to_owned()));
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    Ok(ifr)
}

/// MAC address of interface `name` (`SIOCGIFHWADDR`).
///
/// # Errors
/// [`NetnsError::NoSuchInterface`] or an ioctl error.
pub fn iface_mac(name: &str) -> Result<[u8; 6], NetnsError> {
    let mut ifr = ifreq_for(name)?;
    // SAFETY: plain socket() call; the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io_err("socket", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a freshly created fd we exclusively own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: SIOCGIFHWADDR reads/writes a `struct ifreq`, which `ifr` is.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &raw mut ifr) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENODEV) {
            return Err(NetnsError::NoSuchInterface(name.to_owned()));
        }
        return Err(io_err(format!("SIOCGIFHWADDR {name}"), e));
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let sa = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (dst, &src) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *dst = src.to_ne_bytes()[0];
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn format_mac(mac: [u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

/// Parses `aa:bb:cc:dd:ee:ff`.
#[must_use]
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Writes `value` to the sysctl `key` (dotted, e.g. `net.ipv6.conf.all.disable_ipv6`)
/// of the calling thread's network namespace.
///
/// # Errors
/// [`NetnsError::Io`] if the file cannot be written.
pub fn sysctl_write(key: &str, value: &str) -> Result<(), NetnsError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    fs::write(&path, value).map_err(|e| io_err(format!("writing {path}"), e))
}

/// Disables IPv6 in the calling thread's namespace (all + default), so that
/// interfaces brought up later send no router solicitations / MLD / DAD frames.
/// Call it before creating interfaces.
///
/// # Errors
/// As [`sysctl_write`].
pub fn disable_ipv6() -> Result<(), NetnsError> {
    sysctl_write("net.ipv6.conf.all.disable_ipv6", "1")?;
    sysctl_write("net.ipv6.conf.default.disable_ipv6", "1")
}

/// Interface counters from `/proc/thread-self/net/dev`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct IfaceStats {
    /// Received packets.
    pub rx_packets: u64,
    /// Received bytes.
    pub rx_bytes: u64,
    /// Receive drops.
    pub rx_dropped: u64,
    /// Transmitted packets.
    pub tx_packets: u64,
    /// Transmitted bytes.
    pub tx_bytes: u64,
    /// Transmit drops (for a TAP: frames dropped because the queue's reader lagged).
    pub tx_dropped: u64,
}

/// Reads the counters of `name` in the calling thread's namespace.
///
/// # Errors
/// [`NetnsError::NoSuchInterface`] or a read error.
pub fn iface_stats(name: &str) -> Result<IfaceStats, NetnsError> {
    let text = fs::read_to_string("/proc/thread-self/net/dev")
        .map_err(|e| io_err("reading /proc/thread-self/net/dev", e))?;
    for line in text.lines().skip(2) {
        let Some((ifname, rest)) = line.split_once(':') else {
            continue;
        };
        if ifname.trim() != name {
            continue;
        }
        let v: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if v.len() < 16 {
            break;
        }
        return Ok(IfaceStats {
            rx_bytes: v[0],
            rx_packets: v[1],
            rx_dropped: v[3],
            tx_bytes: v[8],
            tx_packets: v[9],
            tx_dropped: v[11],
        });
    }
    Err(NetnsError::NoSuchInterface(name.to_owned()))
}

/// Reads a counter from `/proc/thread-self/net/snmp` (e.g. `("Udp",
/// "RcvbufErrors")`) for the calling thread's namespace.
///
/// # Errors
/// A read error, or [`NetnsError::InvalidArgument`] if the counter is absent.
pub fn snmp_counter(group: &str, field: &str) -> Result<u64, NetnsError> {
    let text = fs::read_to_string("/proc/thread-self/net/snmp")
        .map_err(|e| io_err("reading /proc/thread-self/net/snmp", e))?;
    let prefix = format!("{group}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    if let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n == field {
                return v
                    .parse()
                    .map_err(|_| NetnsError::InvalidArgument(format!("{group}:{field}={v}")));
            }
        }
    }
    Err(NetnsError::InvalidArgument(format!(
        "no snmp counter {group}:{field}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_tap_lifecycle() {
        let out = run_in_new_netns(|| {
            let tap = crate::raw_tap::open_tap("tapns0").unwrap();
            add_addr("tapns0", "10.0.0.1/24").unwrap();
            set_mac("tapns0", [0x02, 0, 0, 0, 0, 0x01]).unwrap();
            link_up("tapns0").unwrap();
            assert!(iface_index("tapns0").unwrap() > 0);
            assert_eq!(iface_mac("tapns0").unwrap(), [0x02, 0, 0, 0, 0, 0x01]);
            assert!(iface_stats("tapns0").is_ok());
            assert!(snmp_counter("Udp", "RcvbufErrors").is_ok());
            let err = ip(&["link", "set", "dev", "nonexistent0", "up"]).unwrap_err();
            assert!(matches!(err, NetnsError::Command { .. }), "{err}");
            let addrs = ip_output(&["-o", "addr", "show", "dev", "tapns0"]).unwrap();
            drop(tap);
            addrs
        })
        .unwrap();
        assert!(out.contains("10.0.0.1/24"), "{out}");
        // The namespace (and the TAP) are gone; it never existed here anyway.
        assert!(matches!(
            iface_index("tapns0"),
            Err(NetnsError::NoSuchInterface(_))
        ));
    }

    #[test]
    fn scoped_borrows_and_panics_propagate() {
        let name = String::from("lo");
        let idx = run_in_new_netns_scoped(|| iface_index(&name).unwrap()).unwrap();
        assert_eq!(idx, 1);
        let r = std::panic::catch_unwind(|| run_in_new_netns(|| panic!("boom")));
        assert!(r.is_err());
        assert_eq!(parse_mac("02:00:00:00:00:0a"), Some([2, 0, 0, 0, 0, 10]));
        assert_eq!(format_mac([2, 0, 0, 0, 0, 10]), "02:00:00:00:00:0a");
        assert_eq!(parse_mac("02:00:00"), None);
    }
}
