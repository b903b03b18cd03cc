//! `tapir bench --quick` end to end: the README's main command in its short form produces a
//! complete report (every engine side by side, latency, the handoff section) with sane numbers.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_tapir");

#[test]
fn quick_bench_reports_every_engine_latency_and_the_handoff() {
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
    for scenario in ["tx", "rx", "bidir"] {
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
        6,
        "uring, classic, floor x idle, loaded: {report}"
    );
    for l in latency {
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
        assert_eq!(h["lost"], 0, "{h}");
        assert_eq!(h["duplicated"], 0, "{h}");
        assert!(h["downtime_us_p50"].as_f64().unwrap() > 0.0, "{h}");
    }
    assert!(std::fs::read_to_string(&md)
        .unwrap()
        .contains("| vs floor |"));
    std::fs::remove_dir_all(dir).ok();
}
