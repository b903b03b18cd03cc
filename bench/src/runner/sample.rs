//! One measured window ([`Sample`]) and the summary of a cell's repeats.

use std::time::Duration;

use tapir_datapath::Counters;

use super::guest_load::GuestCount;
use super::{Scenario, Variant};
use crate::report::{median, ThroughputResult};

/// One measured window.
#[derive(Clone, Debug, Default)]
pub(super) struct Sample {
    pub(super) pps: f64,
    pub(super) gbps: f64,
    /// None where the CPU time is unknown (a backend process whose CPU cannot be read).
    pub(super) cpu_ns_per_packet: Option<f64>,
    pub(super) datapath_cpu: Option<f64>,
    pub(super) peer_pps: f64,
    pub(super) peer_cpu: f64,
    pub(super) guest_pps: f64,
    /// None where the datapath's counters are out of reach (a vhost-user backend).
    pub(super) drops: Option<u64>,
    /// Packets per wait for the kernel (None: unknown), kicks and interrupts per packet.
    pub(super) per_wait: Option<f64>,
    pub(super) kicks: f64,
    pub(super) interrupts: f64,
    pub(super) allocs_per_packet: Option<f64>,
    /// Busy-poll rounds the workers made (None: counters out of reach).
    pub(super) busy_poll_rounds: Option<u64>,
    pub(super) notes: Vec<String>,
}

#[allow(clippy::cast_precision_loss, reason = "rates")]
pub(super) fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64().max(1e-9)
}

impl Sample {
    #[allow(clippy::cast_precision_loss, reason = "ratios")]
    pub(super) fn with_allocations(mut self, allocs: Option<u64>, packets: u64) -> Sample {
        self.allocs_per_packet = allocs.map(|a| a as f64 / packets.max(1) as f64);
        self
    }

    #[allow(clippy::cast_precision_loss, reason = "ratios")]
    pub(super) fn with_counters(mut self, packets: u64, d: &Counters) -> Sample {
        let p = packets.max(1) as f64;
        self.per_wait = Some(p / d.batches.max(1) as f64);
        self.kicks = (d.tx_kicks + d.rx_kicks) as f64 / p;
        self.interrupts = (d.tx_interrupts + d.rx_interrupts) as f64 / p;
        self.busy_poll_rounds = Some(d.busy_poll_rounds);
        self
    }

    /// The rate of `packets` and `bytes` the TAP counted over the window `elapsed`, in place
    /// of the backend's own count (`tx-drop`); CPU per packet from the backend's CPU share
    /// (its own window: the floor counts over warm-up and window) over the TAP's rate.
    #[allow(clippy::cast_precision_loss, reason = "rates")]
    pub(super) fn counted_on_the_tap(
        mut self,
        packets: u64,
        bytes: u64,
        elapsed: Duration,
        threads: usize,
    ) -> Sample {
        self.pps = per_sec(packets, elapsed);
        self.gbps = per_sec(bytes, elapsed) * 8.0 / 1e9;
        self.cpu_ns_per_packet = self.datapath_cpu.map(|share| {
            if self.pps > 0.0 {
                share * threads.max(1) as f64 * 1e9 / self.pps
            } else {
                0.0
            }
        });
        self
    }

    /// Kicks and interrupts as the guest counted them (sent / received).
    #[allow(clippy::cast_precision_loss, reason = "ratios")]
    pub(super) fn with_guest_notifications(mut self, packets: u64, g: &GuestCount) -> Sample {
        let p = packets.max(1) as f64;
        self.kicks = g.kicks as f64 / p;
        self.interrupts = g.interrupts as f64 / p;
        self
    }
}

#[allow(
    clippy::too_many_arguments,
    clippy::cast_precision_loss,
    reason = "a plain record; rates"
)]
pub(super) fn sample(
    packets: u64,
    bytes: u64,
    cpu_ns: Option<u64>,
    elapsed: Duration,
    threads: usize,
    peer_pps: f64,
    peer_cpu: f64,
    guest_pps: f64,
    drops: Option<u64>,
) -> Sample {
    let mut s = Sample {
        pps: per_sec(packets, elapsed),
        gbps: per_sec(bytes, elapsed) * 8.0 / 1e9,
        cpu_ns_per_packet: cpu_ns.map(|c| {
            if packets > 0 {
                c as f64 / packets as f64
            } else {
                0.0
            }
        }),
        datapath_cpu: cpu_ns.map(|c| c as f64 / elapsed.as_nanos() as f64 / threads.max(1) as f64),
        peer_pps,
        peer_cpu,
        guest_pps,
        drops,
        per_wait: Some(0.0),
        kicks: 0.0,
        interrupts: 0.0,
        allocs_per_packet: None,
        busy_poll_rounds: None,
        notes: Vec::new(),
    };
    if peer_cpu > 0.95 {
        s.notes.push(format!(
            "host peer at {:.0}% CPU: may be peer-limited",
            peer_cpu * 100.0
        ));
    }
    if let Some(drops) = drops.filter(|&d| d > 0) {
        s.notes
            .push(format!("{drops} frames dropped or refused by the datapath"));
    }
    s
}

pub(super) fn summarize(
    scenario: Scenario,
    frame: usize,
    queues: usize,
    variant: Variant,
    runs: &[Sample],
) -> ThroughputResult {
    let col = |f: fn(&Sample) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    // The median of the repeats that know the value; None if none does.
    let known = |f: fn(&Sample) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(&v))
    };
    let pps: Vec<f64> = runs.iter().map(|s| s.pps).collect();
    let mut notes: Vec<String> = runs.iter().flat_map(|s| s.notes.clone()).collect();
    notes.sort();
    notes.dedup();
    ThroughputResult {
        scenario: scenario.name().into(),
        frame,
        queues,
        engine: variant.label(),
        busy_poll_us: variant.busy_poll_us,
        pps: median(&pps),
        gbps: col(|s| s.gbps),
        cpu_ns_per_packet: known(|s| s.cpu_ns_per_packet),
        pps_min: pps.iter().copied().fold(f64::INFINITY, f64::min),
        pps_max: pps.iter().copied().fold(0.0, f64::max),
        pps_runs: pps,
        peer_pps: col(|s| s.peer_pps),
        peer_cpu: col(|s| s.peer_cpu),
        datapath_cpu: known(|s| s.datapath_cpu),
        guest_pps: col(|s| s.guest_pps),
        datapath_drops: runs.iter().map(|s| s.drops).sum::<Option<u64>>(),
        packets_per_wait: known(|s| s.per_wait),
        kicks_per_packet: col(|s| s.kicks),
        interrupts_per_packet: col(|s| s.interrupts),
        allocations_per_packet: runs
            .iter()
            .filter_map(|s| s.allocs_per_packet)
            .fold(None, |m: Option<f64>, a| Some(m.map_or(a, |m| m.max(a)))),
        busy_poll_rounds: runs.iter().map(|s| s.busy_poll_rounds).sum::<Option<u64>>(),
        notes,
    }
}
