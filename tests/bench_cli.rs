//! `tapir bench --quick` end to end: the README's main command in its short form produces a
//! complete report (every engine side by side, latency, the handoff section) with sane numbers.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_tapir");

/// One bench at a time: benches running side by side starve each other's windows (the
/// harness's own allocations then count over fewer packets: 64 KiB RX measured 0.0012
/// allocations/packet with three at once).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn quick_bench_reports_every_engine_latency_and_the_handoff() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("tapir-bench-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let md = dir.join("bench.md");
    let out = Command::new(EXE)
        .args([
            "bench",
            "--quick",
            "--frame",
            "64,65536",
            "--handoffs",
            "5",
            "--latency-placement",
            "split,shared",
            "--json",
        ])
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tapir bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("vs floor") && table.contains("downtime"),
        "{table}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    for scenario in ["tx", "tx-drop", "rx", "bidir"] {
        for frame in [64, 65536] {
            for engine in ["uring", "classic", "floor"] {
                let r = results
                    .iter()
                    .find(|r| {
                        r["scenario"] == scenario && r["frame"] == frame && r["engine"] == engine
                    })
                    .unwrap_or_else(|| panic!("no {scenario} {frame} {engine} in {report}"));
                assert_eq!(r["queues"], 1);
                assert!(r["pps"].as_f64().unwrap() > 1000.0, "{r}");
                assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["cpu_ns_per_packet"].as_f64().unwrap() > 0.0, "{r}");
                if engine != "floor" {
                    // No heap allocation per packet in steady state (process-wide count).
                    let allocs = r["allocations_per_packet"].as_f64().unwrap();
                    assert!(
                        allocs < 0.001,
                        "{scenario} {frame} {engine}: {allocs} allocations/packet"
                    );
                }
            }
        }
    }
    let latency = report["latency"].as_array().unwrap();
    assert_eq!(
        latency.len(),
        14,
        "(uring, classic, floor x idle, loaded; wake idle) x split, shared: {report}"
    );
    for placement in ["split", "shared"] {
        let rows: Vec<String> = latency
            .iter()
            .filter(|l| l["placement"] == placement)
            .map(latency_row)
            .collect();
        assert_eq!(
            rows,
            [
                "uring idle",
                "classic idle",
                "floor idle",
                "wake idle",
                "uring loaded",
                "classic loaded",
                "floor loaded"
            ],
            "{placement}"
        );
    }
    for l in latency {
        let spread = l["p50_spread_us"].as_array().unwrap();
        let p50 = l["p50_us"].as_f64().unwrap();
        // One repeat (--quick): its median is the row's.
        assert_eq!(l["repeats"], 1, "{l}");
        assert!(
            (spread[0].as_f64().unwrap() - p50).abs() < 0.01 * p50 + 0.01,
            "{l}"
        );
        let (p50, p99, max) = (
            l["p50_us"].as_f64().unwrap(),
            l["p99_us"].as_f64().unwrap(),
            l["max_us"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= max, "{l}");
        assert_eq!(l["samples"], 500);
    }
    let handoff = report["handoff"].as_array().unwrap();
    assert_eq!(handoff.len(), 2, "{report}");
    for h in handoff {
        assert_eq!(h["handoffs"], 5);
        // What the kernel drops on a loaded machine is its own (a full TAP queue or socket
        // buffer); tapir loses nothing.
        assert_eq!(
            h["lost"].as_u64().unwrap(),
            h["lost_by_tapir"].as_u64().unwrap() + h["dropped_by_kernel"].as_u64().unwrap(),
            "{h}"
        );
        assert_eq!(h["duplicated"], 0, "{h}");
        assert!(h["downtime_us_p50"].as_f64().unwrap() > 0.0, "{h}");
        // Losses split by cause, the machine's own gaps beside the handoffs', phase tails.
        assert_eq!(h["lost_by_tapir"], 0, "{h}");
        assert_eq!(
            h["dropped_by_kernel"].as_u64().unwrap(),
            h["tap_tx_dropped"].as_u64().unwrap() + h["udp_rcvbuf_errors"].as_u64().unwrap(),
            "{h}"
        );
        assert!(h["baseline_gap_us_max"].as_f64().unwrap() > 0.0, "{h}");
        assert_eq!(h["phases_us_p99"].as_array().unwrap().len(), 5, "{h}");
    }
    assert!(std::fs::read_to_string(&md)
        .unwrap()
        .contains("| vs floor |"));
    assert!(std::fs::read_to_string(&md)
        .unwrap()
        .contains("Handoff phases, p50/p99"));
    std::fs::remove_dir_all(dir).ok();
}

/// `--busy-poll-us 0,50`: the latency scenario and the 64-byte tx, tx-drop and rx cells have
/// a row per engine with workers and budget (`uring+bp50`, the budget in `busy_poll_us`, the
/// workers' busy-poll rounds counted), in the JSON and the Markdown; the floor runs once, and
/// rows without a budget keep their plain names and never poll. tx-drop's rate is the TAP's.
#[test]
fn quick_bench_reports_each_busy_poll_budget_and_the_drop_early_sink() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("tapir-bench-bp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let md = dir.join("bench.md");
    let out = Command::new(EXE)
        .args([
            "bench",
            "--quick",
            "--scenario",
            "tx,tx-drop,rx,latency",
            "--frame",
            "64",
            "--busy-poll-us",
            "0,50",
            "--latency-samples",
            "100",
            "--json",
        ])
        .arg(&json)
        .arg("--markdown")
        .arg(&md)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tapir bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    for scenario in ["tx", "tx-drop", "rx"] {
        let rows: Vec<&serde_json::Value> = results
            .iter()
            .filter(|r| r["scenario"] == scenario)
            .collect();
        let names: Vec<&str> = rows.iter().map(|r| r["engine"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            ["uring", "uring+bp50", "classic", "classic+bp50", "floor"],
            "{scenario}: {report}"
        );
        for r in rows {
            let name = r["engine"].as_str().unwrap();
            assert!(r["pps"].as_f64().unwrap() > 1000.0, "{r}");
            assert!(r["cpu_ns_per_packet"].as_f64().unwrap() > 0.0, "{r}");
            let budget = r["busy_poll_us"].as_u64().unwrap();
            match name {
                "floor" => {
                    assert_eq!(budget, 0, "{r}");
                    assert!(r["busy_poll_rounds"].is_null(), "{r}");
                }
                _ if name.ends_with("+bp50") => {
                    assert_eq!(budget, 50, "{r}");
                    assert!(r["busy_poll_rounds"].as_u64().unwrap() > 0, "{r}");
                }
                _ => {
                    assert_eq!(budget, 0, "{r}");
                    assert_eq!(r["busy_poll_rounds"], 0, "{r}");
                }
            }
            if scenario == "tx-drop" {
                // Nothing on the host sees these frames: no peer rate, the TAP counted them.
                assert_eq!(r["peer_pps"], 0.0, "{r}");
            }
        }
    }
    let latency: Vec<String> = report["latency"]
        .as_array()
        .unwrap()
        .iter()
        .map(latency_row)
        .collect();
    for load in ["idle", "loaded"] {
        for engine in ["uring", "uring+bp50", "classic", "classic+bp50", "floor"] {
            let row = format!("{engine} {load}");
            assert!(latency.contains(&row), "no latency {row}: {latency:?}");
        }
    }
    assert!(latency.contains(&"wake idle".to_owned()), "{latency:?}");
    assert_eq!(latency.len(), 11, "{latency:?}");
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.contains("| tx-drop | 64 | 1 | uring+bp50 |")
            && md.contains("| uring+bp50 | split | loaded |"),
        "{md}"
    );
    std::fs::remove_dir_all(dir).ok();
}

/// Processes whose command line mentions `needle` (the test's unique socket path).
/// A latency row of the JSON report as `ENGINE LOAD` (`uring+bp50 idle`).
fn latency_row(l: &serde_json::Value) -> String {
    format!(
        "{} {}",
        l["engine"].as_str().unwrap(),
        l["load"].as_str().unwrap()
    )
}

fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                found.push(pid);
            }
        }
    }
    found
}

#[test]
fn bench_drives_tapir_serve_over_vhost_user() {
    let _serial = one_at_a_time();
    let dir = std::env::temp_dir().join(format!("tapir-bench-vu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("vu.sock");
    let json = dir.join("bench.json");
    let out = Command::new(EXE)
        .args([
            "bench",
            "--scenario",
            "tx,rx",
            "--frame",
            "64",
            "--queues",
            "1",
            "--duration",
            "0.3",
            "--repeats",
            "1",
            "--engines",
            "uring,vhost-user",
            "--backend",
        ])
        .arg(format!("vhost-user:{}", socket.display()))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    // Whatever happened, no backend may outlive the bench.
    let left = processes_mentioning(&socket.display().to_string());
    for &pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(left.is_empty(), "backend processes left behind: {left:?}");
    assert!(
        out.status.success(),
        "tapir bench --backend failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !socket.exists(),
        "the bench left its vhost-user socket behind"
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("vhost-user") && table.contains("vs uring"),
        "{table}"
    );
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let results = report["results"].as_array().unwrap();
    for scenario in ["tx", "rx"] {
        let r = results
            .iter()
            .find(|r| r["scenario"] == scenario && r["engine"] == "vhost-user")
            .unwrap_or_else(|| panic!("no {scenario} vhost-user row in {report}"));
        assert_eq!(r["frame"], 64);
        assert_eq!(r["queues"], 1);
        assert!(r["pps"].as_f64().unwrap() > 1000.0, "{r}");
        assert!(r["gbps"].as_f64().unwrap() > 0.0, "{r}");
        // The bench started the backend, so its CPU time is known.
        assert!(r["cpu_ns_per_packet"].as_f64().unwrap() > 0.0, "{r}");
        // Not measurable for a backend process: absent, not zero.
        assert!(r["allocations_per_packet"].is_null(), "{r}");
        assert!(r["datapath_drops"].is_null(), "{r}");
        assert!(r["packets_per_wait"].is_null(), "{r}");
        assert!(
            results
                .iter()
                .any(|o| o["scenario"] == scenario && o["engine"] == "uring"),
            "{report}"
        );
    }
    std::fs::remove_dir_all(dir).ok();
}
