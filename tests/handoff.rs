//! Handoff between real processes: the simulated guest and the TAP live in the test process,
//! the datapath in `tapir datapath` children handed from one to the next under steady
//! bidirectional traffic.

use std::path::Path;
use std::time::Duration;

use tapir_datapath::EngineKind;
use tapir_simguest::GuestConfig;
use tapir_testkit::netns::run_in_new_netns;
use tapir_testkit::{ChildOptions, HandoffRig, SteadyTraffic, TrafficReport};

const EXE: &str = env!("CARGO_BIN_EXE_tapir");

fn guest(pairs: u16) -> GuestConfig {
    GuestConfig {
        queue_pairs: pairs,
        ..GuestConfig::default()
    }
}

/// Nothing lost, duplicated or reordered. With `kernel_drops_allowed` (a machine driven past
/// what its CPUs can carry), losses are accepted only where the kernel counted them itself:
/// a full TAP queue or socket buffer, never inside tapir.
fn assert_clean(what: &str, r: &TrafficReport, kernel_drops_allowed: bool) {
    for (dir, d) in [
        ("guest->host", &r.guest_to_host),
        ("host->guest", &r.host_to_guest),
    ] {
        assert!(d.sent > 1000, "{what} {dir}: only {} sent", d.sent);
        assert_eq!(d.duplicated, 0, "{what} {dir}: {d:?}");
        assert_eq!(d.reordered, 0, "{what} {dir}: {d:?}");
        if kernel_drops_allowed {
            assert!(
                d.lost <= d.dropped_by_kernel,
                "{what} {dir}: lost beyond what the kernel dropped: {d:?}"
            );
        } else {
            assert_eq!(d.lost, 0, "{what} {dir}: {d:?}");
            assert_eq!(d.received, d.sent, "{what} {dir}: {d:?}");
        }
    }
}

fn handoffs_under_traffic(engine: EngineKind, pairs: u16, handoffs: usize) {
    handoffs_at_rate(engine, pairs, handoffs, 20_000);
}

/// The traffic tests take turns: each drives both CPUs of a 2-core machine (datapath workers,
/// the generator, the sink), and two at once made the kernel drop frames in the blackout
/// (a full TAP queue behind a starved worker: seen in CI with 61 ms gaps, never alone).
static TRAFFIC: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn handoffs_at_rate(engine: EngineKind, pairs: u16, handoffs: usize, pps: u64) {
    let _turn = TRAFFIC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let what = format!("{engine} {pairs}qp {pps}pps");
    run_in_new_netns(move || {
        let mut rig = HandoffRig::launch(
            Path::new(EXE),
            engine,
            guest(pairs),
            ChildOptions::default(),
        )
        .unwrap();
        let traffic = SteadyTraffic::start(&mut rig, pps).unwrap();
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
        assert_clean(&what, &report, pps > 20_000);
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

/// At a high rate every switch finds TX chains queued and RX chains held by the source:
/// each is used exactly once across the switch (the simulated guest refuses a used entry it
/// did not post, or a chain that never comes back; the traffic counts every datagram).
#[test]
fn handoffs_with_descriptors_in_flight() {
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        handoffs_at_rate(engine, 1, 10, 100_000);
    }
}

/// The successor dies at each phase; the running datapath rolls back, traffic goes on, and
/// nothing is lost. Then a real handoff still works.
#[test]
fn successor_death_at_every_phase_rolls_back() {
    let _turn = TRAFFIC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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
            assert_clean(&format!("{engine} rollbacks"), &report, false);
        })
        .unwrap();
    }
}

/// Version negotiation (issue 10, item 4), both directions, under traffic, between real
/// processes of this build: a successor capped at version 2 takes over from a version-3
/// source (they speak 2); a version-3 successor takes over from that version-2 source (the
/// upgrade: they speak 2); the next pair, both version 3, speaks 3.
#[test]
fn successors_of_either_version_take_over_from_either() {
    let _turn = TRAFFIC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest(1), ChildOptions::default())
                    .unwrap();
            let traffic = SteadyTraffic::start(&mut rig, 20_000).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let down = rig.handoff_speaking(2).unwrap();
            assert_eq!(down.protocol, 2, "{engine}: v3 source, v2 successor");
            std::thread::sleep(Duration::from_millis(30));
            let up = rig.handoff().unwrap();
            assert_eq!(up.protocol, 2, "{engine}: v2 source, v3 successor");
            std::thread::sleep(Duration::from_millis(30));
            let both = rig.handoff().unwrap();
            assert_eq!(both.protocol, 3, "{engine}: v3 source, v3 successor");
            std::thread::sleep(Duration::from_millis(50));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            assert_clean(&format!("{engine} versions"), &report, false);
        })
        .unwrap();
    }
}

/// Version 3: a successor that claims the device and runs but never acknowledges (never
/// sends RUNNING) is the owner: the source commits when the switch timeout passes (it reads
/// the claim in the ownership word) and exits; traffic goes on through the successor.
#[test]
fn a_successor_that_never_acknowledges_but_claimed_owns_the_device() {
    let _turn = TRAFFIC
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for engine in [EngineKind::Uring, EngineKind::Classic] {
        run_in_new_netns(move || {
            let mut rig =
                HandoffRig::launch(Path::new(EXE), engine, guest(1), ChildOptions::default())
                    .unwrap();
            let traffic = SteadyTraffic::start(&mut rig, 5_000).unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let old = rig.datapath_pid();
            let s = rig.handoff_without_ack().unwrap();
            assert_eq!(s.protocol, 3, "{engine}");
            assert_ne!(rig.datapath_pid(), old, "{engine}: the successor runs");
            std::thread::sleep(Duration::from_millis(50));
            // And it hands on as usual.
            rig.handoff().unwrap();
            std::thread::sleep(Duration::from_millis(50));
            let report = traffic.finish().unwrap();
            rig.shutdown().unwrap();
            // The source waited out the switch timeout before it exited, but the successor
            // served all along: nothing lost.
            assert_clean(&format!("{engine} no ack"), &report, false);
        })
        .unwrap();
    }
}
