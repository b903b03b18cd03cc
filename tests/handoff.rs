//! Handoff between real processes: the simulated guest and the TAP live in the test process,
//! the datapath in `tapir datapath` children handed from one to the next under steady
//! bidirectional traffic.

use std::path::Path;
use std::time::Duration;

use tapir_bench::handoff::{ChildOptions, HandoffRig, SteadyTraffic, TrafficReport};
use tapir_bench::netns::run_in_new_netns;
use tapir_datapath::EngineKind;
use tapir_simguest::GuestConfig;

const EXE: &str = env!("CARGO_BIN_EXE_tapir");

fn guest(pairs: u16) -> GuestConfig {
    GuestConfig {
        queue_pairs: pairs,
        ..GuestConfig::default()
    }
}

fn assert_clean(what: &str, r: &TrafficReport) {
    for (dir, d) in [
        ("guest->host", r.guest_to_host),
        ("host->guest", r.host_to_guest),
    ] {
        assert!(d.sent > 1000, "{what} {dir}: only {} sent", d.sent);
        assert_eq!(d.lost, 0, "{what} {dir}: {d:?}");
        assert_eq!(d.duplicated, 0, "{what} {dir}: {d:?}");
        assert_eq!(d.reordered, 0, "{what} {dir}: {d:?}");
        assert_eq!(d.received, d.sent, "{what} {dir}: {d:?}");
    }
}

fn handoffs_under_traffic(engine: EngineKind, pairs: u16, handoffs: usize) {
    let what = format!("{engine} {pairs}qp");
    run_in_new_netns(move || {
        let mut rig = HandoffRig::launch(
            Path::new(EXE),
            engine,
            guest(pairs),
            ChildOptions::default(),
        )
        .unwrap();
        let traffic = SteadyTraffic::start(&mut rig, 20_000).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let mut pids = vec![rig.datapath_pid()];
        for i in 0..handoffs {
            let s = rig
                .handoff()
                .unwrap_or_else(|e| panic!("{what}: handoff {i}: {e:#}"));
            assert!(
                s.downtime_us > 0.0,
                "{what}: handoff {i}: no downtime measured"
            );
            pids.push(rig.datapath_pid());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(100));
        let report = traffic.finish().unwrap();
        rig.shutdown().unwrap();
        pids.dedup();
        assert_eq!(
            pids.len(),
            handoffs + 1,
            "{what}: every handoff runs a new process"
        );
        assert_clean(&what, &report);
        println!("{what}: {report:?}");
    })
    .unwrap();
}

#[test]
fn twenty_handoffs_one_queue_pair() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        handoffs_under_traffic(engine, 1, 20);
    }
}

#[test]
fn twenty_handoffs_two_queue_pairs() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        handoffs_under_traffic(engine, 2, 20);
    }
}

/// The successor dies at each phase; the running datapath rolls back, traffic goes on, and
/// nothing is lost. Then a real handoff still works.
#[test]
fn successor_death_at_every_phase_rolls_back() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest(1), ChildOptions::default())
                    .unwrap();
            let traffic = SteadyTraffic::start(&mut rig, 20_000).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let pid = rig.datapath_pid();
            for point in ["before-fds", "after-fds", "after-state", "before-running"] {
                rig.failed_handoff(point)
                    .unwrap_or_else(|e| panic!("{engine}: successor dying {point}: {e:#}"));
                assert_eq!(rig.datapath_pid(), pid, "{engine}: {point}");
                std::thread::sleep(Duration::from_millis(30));
            }
            rig.handoff().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            assert_clean(&format!("{engine} rollbacks"), &report);
        })
        .unwrap();
    }
}
