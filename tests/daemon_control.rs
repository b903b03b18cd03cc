//! Live counters of `tapir serve --control PATH` while frames cross (the real binary, sandbox
//! on, in a namespace of the test's own): `tapir ctl PATH stats` is one JSON object whose
//! packet counts follow the traffic, the session part names the frontend (this process),
//! `tapir ctl PATH status` summarises, and the socket is 0600 and gone after SIGTERM;
//! `--metrics 127.0.0.1:PORT` serves the same counters in the Prometheus text format (and
//! refuses a non-loopback address).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use common::daemon::{connect, Netns, TAPIR};
use common::vhost::{arp_round_trip_on, attach, one_pair_guest};
use common::HOST_IP;

fn ctl(control: &Path, what: &str) -> String {
    let out = Command::new(TAPIR)
        .arg("ctl")
        .arg(control)
        .arg(what)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tapir ctl {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn stats(control: &Path) -> serde_json::Value {
    let text = ctl(control, "stats");
    assert_eq!(text.lines().count(), 1, "stats is one JSON line: {text}");
    serde_json::from_str(&text).unwrap()
}

/// `GET /metrics` from inside the namespace (where the daemon's loopback is).
fn scrape(ns: &Netns, port: u16) -> String {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let path = format!("/run/netns/{}", ns.name);
    std::thread::spawn(move || {
        let f = std::fs::File::open(&path).unwrap();
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .join()
    .unwrap()
}

/// The value of the sample line starting with `series`.
fn sample(text: &str, series: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in\n{text}"))
}

fn count(v: &serde_json::Value, dir: &str) -> u64 {
    v["queue_pairs"][0][dir]["packets"].as_u64().unwrap()
}

#[test]
fn ctl_stats_and_status_follow_the_traffic_on_both_engines() {
    for engine in ["uring", "classic"] {
        let ns = Netns::new();
        let tap = format!("{}t", ns.name);
        let socket = ns.socket("vu");
        let control = ns.socket("control");
        let mut d = ns.spawn(
            &[],
            &[
                "--socket",
                socket.to_str().unwrap(),
                "--tap",
                &tap,
                "--engine",
                engine,
                "--control",
                control.to_str().unwrap(),
                "--metrics",
                "127.0.0.1:9464",
            ],
        );
        d.event("listening");
        ns.ip(&["link", "set", "lo", "up"]);
        let mode = std::fs::metadata(&control).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "{engine}: control socket mode {mode:o}"
        );
        let idle = stats(&control);
        assert!(idle["session"].is_null(), "{engine}: {idle}");
        assert_eq!(count(&idle, "tx"), 0, "{engine}: {idle}");
        ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", &tap]);
        ns.ip(&["link", "set", &tap, "up"]);
        let mut guest = one_pair_guest();
        let (mut rx, mut txq) = guest.take_pair(0);
        let mut fe = connect(&socket);
        attach(&mut fe, &guest, 0);
        d.event("\"running\":[0]");
        let mut last = (0, 0);
        for round in 1..=3u64 {
            for _ in 0..5 {
                arp_round_trip_on(&mut rx, &mut txq, engine);
            }
            // Counters are published once per worker loop: wait for them to catch up.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            let v = loop {
                let v = stats(&control);
                if count(&v, "tx") >= 5 * round || std::time::Instant::now() > deadline {
                    break v;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            };
            let (tx, rx) = (count(&v, "tx"), count(&v, "rx"));
            assert!(tx >= 5 * round, "{engine} round {round}: tx {tx}: {v}");
            assert!(rx >= 5 * round, "{engine} round {round}: rx {rx}: {v}");
            assert!(
                tx > last.0 && rx > last.1,
                "{engine}: counters did not move: {v}"
            );
            last = (tx, rx);
            let bytes = v["queue_pairs"][0]["tx"]["bytes"].as_u64().unwrap();
            assert!(
                bytes >= 42 * tx,
                "{engine}: tx bytes {bytes} for {tx} ARP frames"
            );
            assert!(
                v["queue_pairs"][0]["tx"]["kicks"].as_u64().unwrap() > 0,
                "{v}"
            );
            assert!(v["queue_pairs"][0]["batches"].as_u64().unwrap() > 0, "{v}");
            assert_eq!(v["queue_pairs"][0]["running"], true, "{v}");
            let s = &v["session"];
            assert_eq!(s["frontend_uid"], 0, "{v}");
            assert_eq!(
                s["frontend_pid"].as_u64(),
                Some(u64::from(std::process::id())),
                "{v}"
            );
            assert_eq!(s["rings"].as_array().unwrap().len(), 2, "{v}");
            assert_eq!(v["handoffs"]["count"], 0, "{v}");
        }
        let text = scrape(&ns, 9464);
        assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
        assert!(text.contains("# HELP tapir_packets "), "{text}");
        assert!(text.contains("# TYPE tapir_packets counter"), "{text}");
        let tx = sample(&text, "tapir_packets_total{pair=\"0\",direction=\"tx\"}");
        assert!(
            tx >= last.0,
            "{engine}: metrics tx {tx} behind ctl {}",
            last.0
        );
        assert_eq!(sample(&text, "tapir_pair_running{pair=\"0\"}"), 1, "{text}");
        assert_eq!(sample(&text, "tapir_frontend_connected"), 1, "{text}");
        let status = ctl(&control, "status");
        assert!(
            status.contains(&format!("engine {engine}")) && status.contains("pair 0: rx "),
            "{engine}: {status}"
        );
        drop(fe);
        d.signal(nix::sys::signal::Signal::SIGTERM);
        let (st, log) = d.wait_exit();
        assert_eq!(st.code(), Some(0), "{log}");
        assert!(!control.exists(), "{engine}: the control socket stayed");
    }
}

#[test]
fn metrics_on_a_non_loopback_address_is_refused() {
    let ns = Netns::new();
    let out = ns.serve_output(
        &[],
        &[
            "--socket",
            ns.socket("vu").to_str().unwrap(),
            "--tap",
            "tm0",
            "--metrics",
            "0.0.0.0:9464",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("only a loopback address"), "{err}");
}
