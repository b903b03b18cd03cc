//! The handoff scenario: successive handoffs between datapath processes under steady
//! bidirectional traffic.

use std::time::{Duration, Instant};

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
    let handoffs_start = Instant::now();
    let mut blackouts = Vec::with_capacity(opts.handoffs);
    let mut downtime = Vec::with_capacity(opts.handoffs);
    let mut switch = Vec::with_capacity(opts.handoffs);
    let mut phases = Vec::with_capacity(opts.handoffs);
    for _ in 0..opts.handoffs {
        let s = rig.handoff()?;
        downtime.push(s.downtime_us);
        switch.push(s.switch_us);
        phases.push(s.phases_us);
        blackouts.push(s.blackout_ns);
        std::thread::sleep(Duration::from_millis(20));
    }
    // The same traffic as long again without handoffs (every predecessor gone): what the
    // machine's own scheduling does to it over a run of that length.
    let handoffs_took = handoffs_start.elapsed();
    let handoffs_end_ns = tapir_datapath::monotonic_ns();
    rig.reap_all()?;
    std::thread::sleep(Duration::from_millis(200));
    let drops0 = traffic.kernel_drops_so_far();
    traffic.start_window();
    std::thread::sleep(handoffs_took);
    let baseline_gap = traffic.end_window();
    let baseline_drops = traffic.kernel_drops_so_far().saturating_sub(drops0);
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
    // Gaps of the handoff phase only (the baseline window's are its own column).
    let (handoff_gap, between_gap) = split_gaps(
        g.gaps
            .0
            .iter()
            .chain(&h.gaps.0)
            .filter(|gap| gap.0 <= handoffs_end_ns),
        &mut blackouts,
    );
    Ok(HandoffResult {
        queues,
        handoffs: opts.handoffs,
        engine: engine.to_string(),
        downtime_us_p50: pct(&downtime, 50.0),
        downtime_us_p99: pct(&downtime, 99.0),
        downtime_us_max: pct(&downtime, 100.0),
        switch_us_p50: pct(&switch, 50.0),
        gap_us_max: g.max_gap_us.max(h.max_gap_us),
        handoff_gap_us_max: handoff_gap,
        between_gap_us_max: between_gap,
        baseline_gap_us_max: baseline_gap,
        baseline_kernel_drops: baseline_drops,
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

/// The largest gap (µs) that overlaps a blackout, and the largest that overlaps none. Gaps are
/// (end, length) in CLOCK_MONOTONIC ns, blackouts (start, end) in the same clock.
fn split_gaps<'a>(
    gaps: impl Iterator<Item = &'a (u64, u64)>,
    blackouts: &mut [(u64, u64)],
) -> (f64, f64) {
    blackouts.sort_unstable();
    let (mut during, mut between) = (0u64, 0u64);
    for &(end, len) in gaps {
        let start = end.saturating_sub(len);
        // Blackouts are disjoint (one handoff after another): of those starting before the
        // gap ends, only the last can reach into it.
        let before = blackouts.partition_point(|b| b.0 <= end);
        let overlaps = blackouts[..before].last().is_some_and(|b| b.1 >= start);
        if overlaps {
            during = during.max(len);
        } else {
            between = between.max(len);
        }
    }
    #[allow(clippy::cast_precision_loss, reason = "microseconds")]
    let us = |ns: u64| ns as f64 / 1e3;
    (us(during), us(between))
}

#[cfg(test)]
mod tests {
    use super::split_gaps;

    #[test]
    fn gaps_are_told_apart_by_whether_they_overlap_a_blackout() {
        let mut blackouts = vec![(10_000, 12_000), (1_000, 2_000)];
        // (end, length): 1_500..2_500 overlaps the first blackout; 3_000..5_000 overlaps
        // none; 9_000..10_000 touches the second at its start; 12_500..13_000 is after it.
        let gaps = [
            (2_500, 1_000),
            (5_000, 2_000),
            (10_000, 1_000),
            (13_000, 500),
        ];
        let (during, between) = split_gaps(gaps.iter(), &mut blackouts);
        assert_eq!((during, between), (1.0, 2.0));
    }
}
