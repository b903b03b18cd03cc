//! `tapir serve` as a daemon, the real binary in namespaces of its own (`ip netns exec`, so
//! that /sys is the namespace's): SIGTERM and SIGINT stop it cleanly (exit 0, rings stopped,
//! socket file gone); the startup event says what runs; a second daemon on a TAP in use is
//! refused unless --share-tap; the kernel's TAP errors and a bad --cpus come out as what to do,
//! on one line, each cause once, with no colour codes in a log that is not a terminal; and
//! without root, as uid 65534 with a TAP made for it, frames cross.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::daemon::{attach, Netns};
use common::{arp_round_trip, one_pair_guest, HOST_IP};

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sigterm_with_a_running_pair_and_sigint_when_idle_stop_cleanly() {
    for (engine, signal) in [
        ("uring", nix::sys::signal::Signal::SIGTERM),
        ("classic", nix::sys::signal::Signal::SIGINT),
    ] {
        let ns = Netns::new();
        let socket = ns.socket("vu");
        let tap = format!("{}t", ns.name);
        let mut d = ns.spawn(
            &[],
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                &tap,
                "--engine",
                engine,
            ],
        );
        let up = d.event("listening");
        assert_eq!(up["version"], env!("CARGO_PKG_VERSION"), "{up}");
        assert_eq!(up["pid"].as_i64(), Some(i64::from(d.pid())), "{up}");
        assert_eq!(up["socket"], socket.to_str().unwrap(), "{up}");
        assert_eq!(up["tap"], tap.as_str(), "{up}");
        assert_eq!(up["queues"], 1, "{up}");
        assert_eq!(up["engine"], engine, "{up}");
        assert!(up["features"].as_str().unwrap().starts_with("0x"), "{up}");
        // With SIGTERM, a frontend has a pair running when the signal comes.
        let mut guest = one_pair_guest();
        let fe = (signal == nix::sys::signal::Signal::SIGTERM).then(|| {
            let fe = attach(&socket, &guest, 0);
            d.event("\"running\":[0]");
            ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
            ns.ip(&["link", "set", &tap, "up"]);
            arp_round_trip(&mut guest, engine);
            fe
        });
        d.signal(signal);
        let stopped = d.event("stopped");
        assert_eq!(stopped["signal"], format!("{signal:?}"), "{stopped}");
        let want_pairs: &[u64] = if fe.is_some() { &[0] } else { &[] };
        let pairs: Vec<u64> = stopped["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_u64().unwrap())
            .collect();
        assert_eq!(pairs, want_pairs, "{stopped}");
        let (status, log) = d.wait_exit();
        assert_eq!(
            status.code(),
            Some(0),
            "{engine} {signal:?}: {status}\n{log}"
        );
        assert!(
            !socket.exists(),
            "{engine}: the socket file stayed after {signal:?}"
        );
        assert!(log.contains("stopping"), "no log line of the stop:\n{log}");
        assert!(
            !log.contains('\x1b'),
            "colour codes in a log that is not a terminal:\n{log}"
        );
        drop(fe);
    }
}

#[test]
fn a_second_daemon_on_a_tap_in_use_is_refused_unless_share_tap() {
    let ns = Netns::new();
    let tap = format!("{}t", ns.name);
    let first_socket = ns.socket("first");
    let args = |socket: &Path| {
        vec![
            "--socket".to_owned(),
            socket.to_str().unwrap().to_owned(),
            "--tap".to_owned(),
            tap.clone(),
            "--queues".to_owned(),
            "2".to_owned(),
        ]
    };
    let first_args = args(&first_socket);
    let first_args: Vec<&str> = first_args.iter().map(String::as_str).collect();
    let first = ns.spawn(&[], &first_args);
    first.event("listening");
    let second_args = args(&ns.socket("second"));
    let second_args: Vec<&str> = second_args.iter().map(String::as_str).collect();
    let out = ns.serve_output(&[], &second_args);
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("already has queues attached by another process")
            && err.contains("--share-tap"),
        "{err}"
    );
    assert!(
        !ns.socket("second").exists(),
        "the refused daemon left its socket"
    );
    // With --share-tap it attaches beside the first (4 queues now).
    let mut shared = second_args.clone();
    shared.push("--share-tap");
    let second = ns.spawn(&[], &shared);
    let up = second.event("listening");
    assert_eq!(up["share_tap"], true, "{up}");
    // This process's /sys is the host's: count through the namespace's.
    let listed = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg(format!("ls /sys/class/net/{tap}/queues | grep -c tx-"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&listed.stdout).trim(), "4");
    // Once both are gone, a new exclusive daemon gets the TAP (nothing attached any more):
    // the first one's TAP went with its last queue, so this is a fresh TAP.
    drop(second);
    drop(first);
    let third = ns.spawn(&[], &first_args);
    third.event("listening");
}

/// The error line: one `error: ` line, each cause once, no colours.
fn error_line(out: &Output) -> String {
    let err = stderr_of(out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains('\x1b'), "colour codes: {err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line in {err}"))
        .to_owned();
    // No cause twice ("...: Operation not permitted: Operation not permitted").
    let parts: Vec<&str> = line.split(": ").collect();
    for w in parts.windows(2) {
        assert_ne!(w[0], w[1], "a doubled cause in {line}");
    }
    for errno in [
        "Operation not permitted",
        "Invalid argument",
        "Argument list too long",
    ] {
        assert!(line.matches(errno).count() <= 1, "{errno} twice in {line}");
    }
    line
}

#[test]
fn kernel_errors_and_bad_cpus_say_what_to_do() {
    let ns = Netns::new();
    let socket = ns.socket("vu");
    let s = socket.to_str().unwrap();
    let setpriv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ];
    // As nobody, with a /dev/net/tun everyone may open (as distributions make it).
    let tun = ns.tun_of_mode(0o666);
    let nobody: Vec<&str> = tun.iter().map(String::as_str).chain(setpriv).collect();
    // Too many queues.
    let line =
        error_line(&ns.serve_output(&[], &["--socket", s, "--tap", "tq0", "--queues", "300"]));
    assert!(line.contains("at most 256"), "{line}");
    // An existing TAP without multi_queue (the kernel says EINVAL).
    ns.ip(&["tuntap", "add", "tsingle", "mode", "tap"]);
    let line = error_line(&ns.serve_output(&[], &["--socket", s, "--tap", "tsingle"]));
    assert!(
        line.contains("not a multiqueue TAP")
            && line.contains("ip tuntap add tsingle mode tap multi_queue vnet_hdr"),
        "{line}"
    );
    // A name taken by another kind of device.
    let line = error_line(&ns.serve_output(&[], &["--socket", s, "--tap", "lo"]));
    assert!(line.contains("lo exists and is not a TAP"), "{line}");
    // No capability to create a TAP (EPERM).
    std::os::unix::fs::chown(&ns.dir, Some(65534), Some(65534)).unwrap();
    let line = error_line(&ns.serve_output(&nobody, &["--socket", s, "--tap", "tnew"]));
    assert!(
        line.contains("needs CAP_NET_ADMIN")
            && line.contains("ip tuntap add tnew mode tap multi_queue vnet_hdr user 65534"),
        "{line}"
    );
    // A /dev/net/tun only root may open (the kernel's mode without udev): EACCES, which
    // no module loading fixes.
    let closed = ns.tun_of_mode(0o600);
    let closed: Vec<&str> = closed.iter().map(String::as_str).chain(setpriv).collect();
    let line = error_line(&ns.serve_output(&closed, &["--socket", s, "--tap", "tnew"]));
    assert!(
        line.contains("/dev/net/tun is mode 0600")
            && line.contains("uid 65534")
            && line.contains("chmod 0666 /dev/net/tun"),
        "{line}"
    );
    // A TAP of another user (EPERM).
    ns.ip(&[
        "tuntap",
        "add",
        "towned",
        "mode",
        "tap",
        "multi_queue",
        "vnet_hdr",
        "user",
        "0",
    ]);
    let line = error_line(&ns.serve_output(&nobody, &["--socket", s, "--tap", "towned"]));
    assert!(
        line.contains("not permitted to attach to TAP towned")
            && line.contains("uid 0")
            && line.contains("uid 65534"),
        "{line}"
    );
    // --cpus: a CPU this process may not run on, and more CPUs than pairs.
    let line =
        error_line(&ns.serve_output(&[], &["--socket", s, "--tap", "tq1", "--cpus", "4095"]));
    assert!(line.contains("CPU 4095 is not available"), "{line}");
    let line = error_line(&ns.serve_output(&[], &["--socket", s, "--tap", "tq1", "--cpus", "0,0"]));
    assert!(line.contains("2 CPUs for 1 queue pairs"), "{line}");
    assert!(!socket.exists(), "a refused daemon left its socket");
}

#[test]
fn without_root_as_nobody_with_a_tap_made_for_it_frames_cross() {
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        let tap = format!("{}t", ns.name);
        ns.ip(&[
            "tuntap",
            "add",
            &tap,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
            "user",
            "65534",
        ]);
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        std::os::unix::fs::chown(&ns.dir, Some(65534), Some(65534)).unwrap();
        let socket = ns.socket("vu");
        let tun = ns.tun_of_mode(0o666);
        let prefix: Vec<&str> = tun
            .iter()
            .map(String::as_str)
            .chain([
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "--inh-caps=-all",
                "--bounding-set=-all",
            ])
            .collect();
        let d = ns.spawn(
            &prefix,
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                &tap,
                "--engine",
                engine,
                // The test's frontend runs as root.
                "--allow-uid",
                "0",
            ],
        );
        d.event("listening");
        let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(field("Uid:"), "65534 65534 65534 65534", "{engine}");
        assert_eq!(field("CapEff:"), "0000000000000000", "{engine}");
        assert_eq!(field("CapPrm:"), "0000000000000000", "{engine}");
        let mut guest = one_pair_guest();
        let fe = attach(&socket, &guest, 0);
        d.event("\"running\":[0]");
        arp_round_trip(&mut guest, engine);
        drop(fe);
    }
}
