//! The benchmark report: JSON (the shape the issues define, plus detail), a terminal table and
//! Markdown for docs/BENCHMARKS.md.

use serde::Serialize;

/// One measured (scenario, frame, queues, engine) cell: medians over the repeats, with the
/// spread so noise is visible.
#[derive(Clone, Debug, Serialize)]
pub struct ThroughputResult {
    /// `tx` (guest to host) or `rx` (host to guest).
    pub scenario: String,
    /// Ethernet frame size in bytes (65536: a TSO/GSO super-frame).
    pub frame: usize,
    /// Queue pairs.
    pub queues: usize,
    /// `uring`, `classic`, `floor` or `vhost-user`; with a busy-poll budget of N µs,
    /// `+bpN` (`uring+bp50`).
    pub engine: String,
    /// The workers' busy-poll budget, µs (0: off; always 0 for the floor).
    pub busy_poll_us: u64,
    /// Median packets per second (`tx-drop`: frames the TAP took, its own counter).
    pub pps: f64,
    /// Median Gbit/s of Ethernet frames (no vnet header).
    pub gbps: f64,
    /// Median datapath CPU ns per packet (worker threads; for `floor`, the floor thread; for
    /// `vhost-user`, the backend process; None where it could not be read).
    pub cpu_ns_per_packet: Option<f64>,
    /// Lowest and highest pps of the repeats.
    pub pps_min: f64,
    /// Highest pps of the repeats.
    pub pps_max: f64,
    /// Every repeat's pps.
    pub pps_runs: Vec<f64>,
    /// Median rate seen by the host-side peer (sink packets/s for tx, generator packets/s for rx).
    pub peer_pps: f64,
    /// CPU share (0..1 per thread) the peer used: near 1 means the peer may be the limit.
    pub peer_cpu: f64,
    /// Datapath CPU share (0..1 per worker thread; None where unknown).
    pub datapath_cpu: Option<f64>,
    /// Frames the guest-side driver saw (rx) or pushed (tx) per second.
    pub guest_pps: f64,
    /// Dropped or refused frames counted by the datapath during the measurement (None for
    /// `vhost-user`: the backend's counters are out of reach).
    pub datapath_drops: Option<u64>,
    /// Packets moved per wait for the kernel (io_uring_enter / epoll_wait): the batch size
    /// (None for `vhost-user`).
    pub packets_per_wait: Option<f64>,
    /// Guest kicks per packet (the kick wake-ups the datapath counted; for `vhost-user`, the
    /// kicks the guest sent).
    pub kicks_per_packet: f64,
    /// Interrupts raised per packet (for `vhost-user`, as the guest received them).
    pub interrupts_per_packet: f64,
    /// Heap allocations per packet during the measurement window, whole process (the largest
    /// of the repeats; None where not counted, e.g. the floor, a vhost-user backend or a
    /// library caller).
    pub allocations_per_packet: Option<f64>,
    /// Busy-poll rounds the workers made over every repeat's window (None where the
    /// datapath's counters are out of reach: the floor, a vhost-user backend).
    pub busy_poll_rounds: Option<u64>,
    /// Warnings (peer-limited, drops, ...).
    pub notes: Vec<String>,
}

/// A whole run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// What ran, and where.
    pub meta: Meta,
    /// Throughput cells.
    pub results: Vec<ThroughputResult>,
    /// Handoff runs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub handoff: Vec<HandoffResult>,
    /// Request/response round trips.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub latency: Vec<LatencyResult>,
}

/// Round trips guest -> host echo -> guest (or, for `floor`, TAP -> host echo -> TAP).
#[derive(Clone, Debug, Serialize)]
pub struct LatencyResult {
    /// `uring`, `classic`, `floor` or `vhost-user`; with a busy-poll budget of N µs,
    /// `+bpN` (`uring+bp50`).
    pub engine: String,
    /// The workers' busy-poll budget, µs (0: off; always 0 for the floor).
    pub busy_poll_us: u64,
    /// `idle`, or `loaded` (a host->guest stream runs meanwhile).
    pub load: String,
    /// Where the worker ran: `split` (its own CPU) or `shared` (with the guest and the echo);
    /// see `--latency-placement`.
    pub placement: String,
    /// Interleaved repeats merged into this row.
    pub repeats: usize,
    /// The lowest and highest of the repeats' medians, µs.
    pub p50_spread_us: [f64; 2],
    /// Median over every repeat's round trips, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// 99.9th percentile, µs.
    pub p999_us: f64,
    /// Largest, µs.
    pub max_us: f64,
    /// Round trips measured.
    pub samples: u64,
    /// Requests given up on after 2 s, not measured, because the kernel dropped something
    /// meanwhile (the TAP's `tx_dropped`, `Udp RcvbufErrors`: a starved datapath or echo under
    /// load); an echo missing without a kernel drop fails the run.
    pub lost: u64,
    /// The distribution: (µs, fraction of round trips at or below it), for CDF charts.
    pub cdf: Vec<(f64, f64)>,
}

/// One handoff run: many successive handoffs between processes under traffic.
#[derive(Clone, Debug, Serialize)]
pub struct HandoffResult {
    /// Queue pairs.
    pub queues: usize,
    /// Handoffs made.
    pub handoffs: usize,
    /// Engine of every process.
    pub engine: String,
    /// Median downtime: quiesce start to the successor's first used-ring update.
    pub downtime_us_p50: f64,
    /// 99th percentile downtime.
    pub downtime_us_p99: f64,
    /// Largest downtime.
    pub downtime_us_max: f64,
    /// Median quiesce start to RUNNING.
    pub switch_us_p50: f64,
    /// Largest inter-arrival gap of one flow (a queue pair's direction) at the traffic
    /// endpoints, µs.
    pub gap_us_max: f64,
    /// Largest gap of a flow that overlaps a blackout (quiesce start to the successor's
    /// first used-ring update), µs.
    pub handoff_gap_us_max: f64,
    /// Largest gap of a flow while the handoffs ran but away from every blackout (the
    /// successors' start-up and the predecessors' teardown overlap these), µs (0: none of
    /// at least 250 µs, the traffic's 100 µs ticks being the rest).
    pub between_gap_us_max: f64,
    /// Largest inter-arrival gap of a flow of the same traffic in a window without handoffs
    /// as long as the handoffs took (after the last, every predecessor gone), µs: what the
    /// loaded machine does on its own over a run of that length.
    pub baseline_gap_us_max: f64,
    /// Datagrams the kernel dropped in that window (TAP queue and host socket).
    pub baseline_kernel_drops: u64,
    /// Datagrams lost (both directions): `lost_by_tapir` + `dropped_by_kernel`.
    pub lost: u64,
    /// Sent, never received, and not dropped by the kernel (both directions).
    pub lost_by_tapir: u64,
    /// Dropped by the kernel outside tapir: `tap_tx_dropped` + `udp_rcvbuf_errors`.
    pub dropped_by_kernel: u64,
    /// Host->guest frames the kernel dropped at the TAP (its `tx_dropped`: a full TAP queue
    /// while the datapath does not read, e.g. in a blackout or starved of CPU).
    pub tap_tx_dropped: u64,
    /// Guest->host datagrams the kernel dropped at the host sink (`Udp RcvbufErrors`: a full
    /// socket buffer while the sink thread is starved of CPU).
    pub udp_rcvbuf_errors: u64,
    /// Datagrams duplicated.
    pub duplicated: u64,
    /// Datagrams out of order within their flow.
    pub reordered: u64,
    /// Offered traffic per direction, packets/s.
    pub traffic_pps: u64,
    /// Datagrams sent (both directions).
    pub sent: u64,
    /// Anonymous resident memory of the datapath process under traffic, KiB (all queue
    /// pairs; guest memory is shared with the VMM and not counted).
    pub rss_anon_kib: u64,
    /// Median of each blackout phase, µs: [quiesce + encode + send, decode + engine set-up,
    /// READY to GO, GO to RUNNING, RUNNING to the first used-ring update].
    pub phases_us_p50: [f64; 5],
    /// 99th percentile of each blackout phase, µs (same phases).
    pub phases_us_p99: [f64; 5],
    /// Every handoff's downtime.
    pub downtime_us: Vec<f64>,
}

/// Where and how the report was made.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Meta {
    /// The command line.
    pub command: String,
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    /// CPU model.
    pub cpu_model: String,
    /// Seconds measured per repeat.
    pub duration_s: f64,
    /// Repeats per cell.
    pub repeats: usize,
    /// UTC time the run started.
    pub started: String,
}

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "-".into()
    }
}

impl Report {
    fn find(&self, r: &ThroughputResult, engine: &str) -> Option<&ThroughputResult> {
        self.results.iter().find(|o| {
            o.scenario == r.scenario
                && o.frame == r.frame
                && o.queues == r.queues
                && o.engine == engine
        })
    }

    /// Whether rows other than uring / classic / floor are there (they get a "vs uring"
    /// column).
    fn has_other_engines(&self) -> bool {
        self.results
            .iter()
            .any(|r| !matches!(r.engine.as_str(), "uring" | "classic" | "floor"))
    }

    /// The cells of one row, shared by the table and the Markdown.
    fn row(&self, r: &ThroughputResult) -> Vec<String> {
        let vs = |engine: &str| {
            self.find(r, engine)
                .map(|o| ratio(r.pps, o.pps))
                .unwrap_or_default()
        };
        let opt = |v: Option<f64>, f: fn(f64) -> String| v.map_or_else(|| "-".to_owned(), f);
        let mut row = vec![
            r.scenario.clone(),
            r.frame.to_string(),
            r.queues.to_string(),
            r.engine.clone(),
            format!("{:.3}", r.pps / 1e6),
            format!("{:.3}..{:.3}", r.pps_min / 1e6, r.pps_max / 1e6),
            format!("{:.2}", r.gbps),
            opt(r.cpu_ns_per_packet, |v| format!("{v:.0}")),
            opt(r.packets_per_wait, |v| format!("{v:.1}")),
            format!("{:.3}", r.kicks_per_packet),
            format!("{:.3}", r.interrupts_per_packet),
            r.allocations_per_packet
                .map_or_else(|| "-".to_owned(), |a| format!("{a:.4}")),
            format!("{:.3}", r.peer_pps / 1e6),
        ];
        if self.has_other_engines() {
            row.push(vs("uring"));
        }
        row.push(vs("classic"));
        row.push(vs("floor"));
        row
    }

    fn header(&self) -> Vec<String> {
        let mut h: Vec<String> = Self::HEADER.iter().map(|s| (*s).to_owned()).collect();
        if self.has_other_engines() {
            h.insert(h.len() - 2, "vs uring".into());
        }
        h
    }

    const HEADER: [&'static str; 15] = [
        "dir",
        "frame",
        "q",
        "engine",
        "Mpps",
        "min..max",
        "Gbit/s",
        "CPU ns/pkt",
        "pkts/wait",
        "kicks/pkt",
        "irqs/pkt",
        "allocs/pkt",
        "peer Mpps",
        "vs classic",
        "vs floor",
    ];

    fn notes(&self) -> Vec<String> {
        self.results
            .iter()
            .flat_map(|r| {
                r.notes.iter().map(move |n| {
                    format!("{} {} q{} {}: {n}", r.scenario, r.frame, r.queues, r.engine)
                })
            })
            .collect()
    }

    /// The handoff runs as a table.
    fn handoff_table(&self) -> Vec<Vec<String>> {
        let mut rows = vec![[
            "queues",
            "engine",
            "handoffs",
            "downtime p50 µs",
            "p99 µs",
            "max µs",
            "gap max µs (handoff/between)",
            "baseline gap µs (drops)",
            "lost by tapir",
            "kernel drops (TAP/sock)",
            "dup",
            "reordered",
            "sent",
            "RSS KiB/pair",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>()];
        for h in &self.handoff {
            rows.push(vec![
                h.queues.to_string(),
                h.engine.clone(),
                h.handoffs.to_string(),
                format!("{:.0}", h.downtime_us_p50),
                format!("{:.0}", h.downtime_us_p99),
                format!("{:.0}", h.downtime_us_max),
                format!(
                    "{:.0} ({:.0}/{})",
                    h.gap_us_max,
                    h.handoff_gap_us_max,
                    if h.between_gap_us_max > 0.0 {
                        format!("{:.0}", h.between_gap_us_max)
                    } else {
                        "<250".to_owned()
                    }
                ),
                format!("{:.0} ({})", h.baseline_gap_us_max, h.baseline_kernel_drops),
                h.lost_by_tapir.to_string(),
                format!(
                    "{} ({}/{})",
                    h.dropped_by_kernel, h.tap_tx_dropped, h.udp_rcvbuf_errors
                ),
                h.duplicated.to_string(),
                h.reordered.to_string(),
                h.sent.to_string(),
                (h.rss_anon_kib / u64::try_from(h.queues.max(1)).unwrap_or(1)).to_string(),
            ]);
        }
        rows
    }

    /// Each handoff row's blackout phases, p50/p99 µs.
    fn phase_table(&self) -> Vec<Vec<String>> {
        let mut rows = vec![[
            "queues",
            "engine",
            "quiesce+send p50/p99",
            "decode+set-up (v3: +claim)",
            "READY->GO",
            "GO->RUNNING",
            "RUNNING (v3: claim)->first used",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>()];
        for h in &self.handoff {
            let mut row = vec![h.queues.to_string(), h.engine.clone()];
            row.extend(
                h.phases_us_p50
                    .iter()
                    .zip(&h.phases_us_p99)
                    .map(|(a, b)| format!("{a:.0}/{b:.0}")),
            );
            rows.push(row);
        }
        rows
    }

    fn latency_table(&self) -> Vec<Vec<String>> {
        let mut rows = vec![[
            "engine",
            "cpus",
            "load",
            "p50 µs",
            "p50 spread",
            "p99 µs",
            "p99.9 µs",
            "max µs",
            "samples",
            "lost",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect::<Vec<_>>()];
        for l in &self.latency {
            rows.push(vec![
                l.engine.clone(),
                l.placement.clone(),
                l.load.clone(),
                format!("{:.1}", l.p50_us),
                format!("{:.1}-{:.1}", l.p50_spread_us[0], l.p50_spread_us[1]),
                format!("{:.1}", l.p99_us),
                format!("{:.1}", l.p999_us),
                format!("{:.1}", l.max_us),
                l.samples.to_string(),
                l.lost.to_string(),
            ]);
        }
        rows
    }

    /// A readable table: one row per cell, with ratios to classic and to the floor.
    pub fn table(&self) -> String {
        let mut out = self.throughput_table();
        if !self.latency.is_empty() {
            out.push('\n');
            out.push_str(&align(&self.latency_table(), 2));
        }
        if !self.handoff.is_empty() {
            out.push('\n');
            out.push_str(&align(&self.handoff_table(), 2));
            out.push('\n');
            out.push_str(&align(&self.phase_table(), 2));
        }
        out
    }

    fn throughput_table(&self) -> String {
        if self.results.is_empty() {
            return String::new();
        }
        let rows: Vec<Vec<String>> = std::iter::once(self.header())
            .chain(self.results.iter().map(|r| self.row(r)))
            .collect();
        let mut out = align(&rows, 4);
        for n in self.notes() {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }

    /// The same as Markdown.
    pub fn markdown(&self) -> String {
        let m = &self.meta;
        let mut out = format!(
            "Run `{}` on {} CPUs ({}), kernel {}, {} s x {} repeats per cell, started {}.\n\n",
            m.command, m.cpus, m.cpu_model, m.kernel, m.duration_s, m.repeats, m.started
        );
        let header = self.header();
        out.push_str(&format!("| {} |\n", header.join(" | ")));
        out.push_str(&format!(
            "|---|---:|---:|---|---:|---|{}\n",
            "---:|".repeat(header.len() - 6)
        ));
        for r in &self.results {
            out.push_str(&format!("| {} |\n", self.row(r).join(" | ")));
        }
        let notes = self.notes();
        if !notes.is_empty() {
            out.push_str("\nNotes:\n");
            for n in notes {
                out.push_str(&format!("- {n}\n"));
            }
        }
        if !self.latency.is_empty() {
            out.push_str(
                "\nRound trips guest -> host UDP echo -> guest (floor: TAP -> echo -> TAP):\n\n",
            );
            for (i, r) in self.latency_table().iter().enumerate() {
                out.push_str(&format!("| {} |\n", r.join(" | ")));
                if i == 0 {
                    out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
                }
            }
        }
        if !self.handoff.is_empty() {
            let rows = self.handoff_table();
            out.push_str("\nHandoffs (downtime: quiesce start to the successor's first used-ring update):\n\n");
            for (i, r) in rows.iter().enumerate() {
                out.push_str(&format!("| {} |\n", r.join(" | ")));
                if i == 0 {
                    out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
                }
            }
            out.push_str("\nHandoff phases, p50/p99 µs:\n\n");
            for (i, r) in self.phase_table().iter().enumerate() {
                out.push_str(&format!("| {} |\n", r.join(" | ")));
                if i == 0 {
                    out.push_str(&format!("|{}\n", "---|".repeat(r.len())));
                }
            }
        }
        out
    }
}

/// Aligns rows into columns: the first `left` columns left-aligned, the rest right-aligned.
fn align(rows: &[Vec<String>], left: usize) -> String {
    let cols = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (cell, w))| {
                if c < left {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The median of `v` (0 for an empty slice).
pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let mid = s.len() / 2;
    if s.len() % 2 == 1 {
        s[mid]
    } else {
        (s[mid - 1] + s[mid]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }
}
