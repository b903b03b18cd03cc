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
    /// `uring`, `classic` or `floor`.
    pub engine: String,
    /// Median packets per second.
    pub pps: f64,
    /// Median Gbit/s of Ethernet frames (no vnet header).
    pub gbps: f64,
    /// Median datapath CPU ns per packet (worker threads; for `floor`, the floor thread).
    pub cpu_ns_per_packet: f64,
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
    /// Datapath CPU share (0..1 per worker thread).
    pub datapath_cpu: f64,
    /// Frames the guest-side driver saw (rx) or pushed (tx) per second.
    pub guest_pps: f64,
    /// Dropped or refused frames counted by the datapath during the measurement.
    pub datapath_drops: u64,
    /// Packets moved per wait for the kernel (io_uring_enter / epoll_wait): the batch size.
    pub packets_per_wait: f64,
    /// Guest kicks per packet.
    pub kicks_per_packet: f64,
    /// Interrupts raised per packet.
    pub interrupts_per_packet: f64,
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

    /// The cells of one row, shared by the table and the Markdown.
    fn row(&self, r: &ThroughputResult) -> Vec<String> {
        let vs = |engine: &str| {
            self.find(r, engine)
                .map(|o| ratio(r.pps, o.pps))
                .unwrap_or_default()
        };
        vec![
            r.scenario.clone(),
            r.frame.to_string(),
            r.queues.to_string(),
            r.engine.clone(),
            format!("{:.3}", r.pps / 1e6),
            format!("{:.3}..{:.3}", r.pps_min / 1e6, r.pps_max / 1e6),
            format!("{:.2}", r.gbps),
            format!("{:.0}", r.cpu_ns_per_packet),
            format!("{:.1}", r.packets_per_wait),
            format!("{:.3}", r.kicks_per_packet),
            format!("{:.3}", r.interrupts_per_packet),
            format!("{:.3}", r.peer_pps / 1e6),
            vs("classic"),
            vs("floor"),
        ]
    }

    const HEADER: [&'static str; 14] = [
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

    /// A readable table: one row per cell, with ratios to classic and to the floor.
    pub fn table(&self) -> String {
        let rows: Vec<Vec<String>> =
            std::iter::once(Self::HEADER.iter().map(|h| (*h).to_owned()).collect())
                .chain(self.results.iter().map(|r| self.row(r)))
                .collect();
        let widths: Vec<usize> = (0..Self::HEADER.len())
            .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        for row in &rows {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(c, (cell, w))| {
                    if c < 4 {
                        format!("{cell:<w$}")
                    } else {
                        format!("{cell:>w$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
        }
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
        out.push_str(&format!("| {} |\n", Self::HEADER.join(" | ")));
        out.push_str("|---|---:|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
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
        out
    }
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
