//! The handoff scenario: successive handoffs between datapath processes under steady
//! bidirectional traffic.

use std::time::Duration;

use anyhow::Result;
use tapir_datapath::EngineKind;
use tapir_simguest::GuestConfig;

use super::BenchOptions;
use crate::report::HandoffResult;

/// Hands the datapath from process to process `opts.handoffs` times under steady
/// bidirectional traffic; downtime is measured inside (quiesce start to the successor's first
/// used-ring update), gaps and losses by the traffic endpoints outside.
pub(super) fn measure_handoffs(
    engine: EngineKind,
    queues: usize,
    opts: &BenchOptions,
) -> Result<HandoffResult> {
    let exe = crate::self_exe();
    let guest = GuestConfig {
        queue_pairs: u16::try_from(queues)?,
        ..GuestConfig::default()
    };
    let child = tapir_testkit::ChildOptions {
        cpus: Vec::new(),
        rt_priority: opts.handoff_rt_priority,
    };
    let mut rig = tapir_testkit::HandoffRig::launch(&exe, engine, guest, child)?;
    // Runs of many handoffs do not wait for each predecessor's idle-priority teardown.
    rig.defer_teardown(8);
    let traffic = tapir_testkit::SteadyTraffic::start(&mut rig, opts.handoff_pps)?;
    std::thread::sleep(Duration::from_millis(200));
    let rss_kib = rig.datapath_rss_anon_kib().unwrap_or(0);
    // The same traffic without handoffs: what the machine's own scheduling does to it.
    traffic.start_window();
    std::thread::sleep(Duration::from_secs(1));
    let baseline_gap = traffic.end_window();
    let mut downtime = Vec::with_capacity(opts.handoffs);
    let mut switch = Vec::with_capacity(opts.handoffs);
    let mut phases = Vec::with_capacity(opts.handoffs);
    for _ in 0..opts.handoffs {
        let s = rig.handoff()?;
        downtime.push(s.downtime_us);
        switch.push(s.switch_us);
        phases.push(s.phases_us);
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let t = traffic.finish()?;
    rig.shutdown()?;
    let pct = |v: &[f64], p: f64| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return 0.0;
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "an index into a short vector"
        )]
        let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
        s[i.min(s.len() - 1)]
    };
    let (g, h) = (t.guest_to_host, t.host_to_guest);
    Ok(HandoffResult {
        queues,
        handoffs: opts.handoffs,
        engine: engine.to_string(),
        downtime_us_p50: pct(&downtime, 50.0),
        downtime_us_p99: pct(&downtime, 99.0),
        downtime_us_max: pct(&downtime, 100.0),
        switch_us_p50: pct(&switch, 50.0),
        gap_us_max: g.max_gap_us.max(h.max_gap_us),
        baseline_gap_us_max: baseline_gap,
        lost: g.lost + h.lost,
        lost_by_tapir: g.lost.saturating_sub(g.dropped_by_kernel)
            + h.lost.saturating_sub(h.dropped_by_kernel),
        dropped_by_kernel: g.dropped_by_kernel + h.dropped_by_kernel,
        tap_tx_dropped: h.dropped_by_kernel,
        udp_rcvbuf_errors: g.dropped_by_kernel,
        duplicated: g.duplicated + h.duplicated,
        reordered: g.reordered + h.reordered,
        traffic_pps: opts.handoff_pps,
        sent: g.sent + h.sent,
        rss_anon_kib: rss_kib,
        phases_us_p50: std::array::from_fn(|i| {
            pct(&phases.iter().map(|p| p[i]).collect::<Vec<_>>(), 50.0)
        }),
        phases_us_p99: std::array::from_fn(|i| {
            pct(&phases.iter().map(|p| p[i]).collect::<Vec<_>>(), 99.0)
        }),
        downtime_us: downtime,
    })
}
