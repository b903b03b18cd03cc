//! A `tapir serve` killed with SIGKILL and started again on the same socket and TAP (as
//! `systemd Restart=always` would), the frontend reconnecting: frames the guest queued while
//! the backend was dead, whose kick the dead backend took with it, are sent without a new
//! kick (tapir checks every ring when it starts a device), and traffic resumes.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{attach, Netns};
use common::{arp_request, arp_round_trip_on, one_pair_guest, VirtioNetHdr, HOST_IP};

fn serve_args<'a>(socket: &'a str, tap: &'a str, engine: &'a str) -> Vec<&'a str> {
    vec!["--socket", socket, "--tap", tap, "--engine", engine]
}

/// Reads the eventfd's count away (what a backend that read the kick and died did).
fn drain_eventfd(raw: i32) {
    let fd = tapir_testkit::vhost_frontend::guest_eventfd(raw).expect("dup of a guest eventfd");
    // SAFETY: F_SETFL on an fd this function owns (a dup; the flag is shared with the
    // original, which the simulated guest only writes).
    let flags = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&fd), libc::F_GETFL) };
    // SAFETY: as above.
    unsafe {
        libc::fcntl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::F_SETFL,
            flags | libc::O_NONBLOCK,
        )
    };
    let _ = fd.read();
}

#[test]
fn frames_queued_while_the_backend_was_dead_go_out_after_a_restart_without_a_kick() {
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        let tap = format!("{}t", ns.name);
        // A persistent TAP keeps its address across the backend's death.
        ns.ip(&[
            "tuntap",
            "add",
            &tap,
            "mode",
            "tap",
            "multi_queue",
            "vnet_hdr",
        ]);
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        let socket = ns.socket("vu");
        let s = socket.to_str().unwrap();
        let first = ns.spawn(&[], &serve_args(s, &tap, engine));
        first.event("listening");
        let mut guest = one_pair_guest();
        let kick_tx = guest.queues()[1].kick_fd;
        let (mut rx, mut tx) = guest.take_pair(0);
        let fe = attach(&socket, &guest, 0);
        first.event("\"running\":[0]");
        arp_round_trip_on(&mut rx, &mut tx, engine);
        // The backend dies (its socket file stays behind, as after a crash).
        first.signal(nix::sys::signal::Signal::SIGKILL);
        drop(first);
        drop(fe);
        // Meanwhile the guest queues frames; their kick is gone with the dead backend.
        let request = arp_request();
        for _ in 0..4 {
            assert!(tx.push(&VirtioNetHdr::default(), &request).unwrap());
        }
        tx.flush();
        drain_eventfd(kick_tx);
        // Restarted on the same socket and TAP; the frontend reconnects and sets up again.
        let second = ns.spawn(&[], &serve_args(s, &tap, engine));
        second.event("listening");
        let fe = attach(&socket, &guest, 0);
        second.event("\"running\":[0]");
        // No flush, no kick: the queued chains must complete anyway.
        let deadline = Instant::now() + Duration::from_secs(5);
        while tx.in_flight() > 0 {
            tx.reclaim();
            assert!(
                Instant::now() < deadline,
                "{engine}: {} TX chains queued before the restart never completed (a restarted \
                 backend waiting for a kick)",
                tx.in_flight()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // And traffic resumes both ways.
        arp_round_trip_on(&mut rx, &mut tx, engine);
        drop(fe);
    }
}
