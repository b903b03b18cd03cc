//! SVG charts of a report (plotters): throughput by frame size per engine, latency CDF per
//! engine, handoff downtime histogram.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss,
    reason = "chart coordinates: small, non-negative values"
)]

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use crate::report::Report;

const ENGINES: [(&str, RGBColor); 4] = [
    ("uring", BLUE),
    ("classic", RED),
    ("floor", BLACK),
    ("vhost-user", GREEN),
];

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("chart: {e}")
}

/// Writes `throughput.svg`, `latency.svg` and `handoff.svg` (those with data) into `dir`.
pub fn write_all(report: &Report, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    if !report.results.is_empty() {
        let p = dir.join("throughput.svg");
        throughput(report, &p)?;
        written.push(p);
    }
    if !report.latency.is_empty() {
        let p = dir.join("latency.svg");
        latency(report, &p)?;
        written.push(p);
    }
    if !report.handoff.is_empty() {
        let p = dir.join("handoff.svg");
        handoff(report, &p)?;
        written.push(p);
    }
    Ok(written)
}

/// One panel per (direction, queue pairs): Mpps by frame size, a line per engine.
fn throughput(report: &Report, path: &Path) -> Result<()> {
    let mut panels: Vec<(String, usize)> = Vec::new();
    for r in &report.results {
        if !panels.contains(&(r.scenario.clone(), r.queues)) {
            panels.push((r.scenario.clone(), r.queues));
        }
    }
    let mut frames: Vec<usize> = report.results.iter().map(|r| r.frame).collect();
    frames.sort_unstable();
    frames.dedup();
    let cols = panels.len().clamp(1, 3);
    let rows = panels.len().div_ceil(cols);
    let root = SVGBackend::new(
        path,
        (420 * u32::try_from(cols)?, 320 * u32::try_from(rows)?),
    )
    .into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (area, (scenario, queues)) in root.split_evenly((rows, cols)).iter().zip(&panels) {
        let cell: Vec<_> = report
            .results
            .iter()
            .filter(|r| &r.scenario == scenario && r.queues == *queues)
            .collect();
        let ymax = cell.iter().map(|r| r.pps / 1e6).fold(0.0, f64::max) * 1.15 + 1e-3;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{scenario}, {queues} queue pair(s): Mpps"),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(45)
            .build_cartesian_2d(-0.3f64..(frames.len() as f64 - 0.7), 0.0..ymax)
            .map_err(err)?;
        let labels = frames.clone();
        chart
            .configure_mesh()
            .x_labels(frames.len())
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 {
                    labels
                        .get(i as usize)
                        .map(|f| format!("{f} B"))
                        .unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .draw()
            .map_err(err)?;
        for (engine, color) in ENGINES {
            let points: Vec<(f64, f64)> = frames
                .iter()
                .enumerate()
                .filter_map(|(i, f)| {
                    cell.iter()
                        .find(|r| r.engine == engine && r.frame == *f)
                        .map(|r| (i as f64, r.pps / 1e6))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(engine)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

/// Latency CDF: a line per (engine, load).
fn latency(report: &Report, path: &Path) -> Result<()> {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let xmin = report
        .latency
        .iter()
        .flat_map(|l| l.cdf.first().map(|c| c.0))
        .fold(f64::INFINITY, f64::min)
        .max(0.1)
        * 0.8;
    let xmax = report.latency.iter().map(|l| l.max_us).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "round trip guest -> host echo -> guest: CDF",
            ("sans-serif", 18),
        )
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(45)
        .build_cartesian_2d((xmin..xmax).log_scale(), 0.0..1.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("µs (log scale)")
        .y_desc("fraction")
        .draw()
        .map_err(err)?;
    for l in &report.latency {
        let color = ENGINES
            .iter()
            .find(|(e, _)| *e == l.engine)
            .map_or(BLACK, |(_, c)| *c);
        let style = if l.load == "idle" {
            color.stroke_width(2)
        } else {
            color.mix(0.5).stroke_width(2)
        };
        let points: Vec<(f64, f64)> = l.cdf.iter().map(|&(us, q)| (us.max(xmin), q)).collect();
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(err)?
            .label(format!("{} {}", l.engine, l.load))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Handoff downtime histograms: one panel per run.
fn handoff(report: &Report, path: &Path) -> Result<()> {
    let n = report.handoff.len();
    let cols = n.clamp(1, 2);
    let rows = n.div_ceil(cols);
    let root = SVGBackend::new(
        path,
        (480 * u32::try_from(cols)?, 300 * u32::try_from(rows)?),
    )
    .into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    for (area, h) in root.split_evenly((rows, cols)).iter().zip(&report.handoff) {
        let bucket = 100.0;
        let max = h.downtime_us.iter().copied().fold(0.0, f64::max);
        let buckets = (max / bucket).ceil() as usize + 1;
        let mut counts = vec![0u32; buckets];
        for &d in &h.downtime_us {
            if let Some(c) = counts.get_mut((d.max(0.0) / bucket) as usize) {
                *c += 1;
            }
        }
        let ymax = counts.iter().copied().max().unwrap_or(1) + 1;
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!(
                    "handoff downtime: {} {} pair(s), {} handoffs",
                    h.engine, h.queues, h.handoffs
                ),
                ("sans-serif", 15),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(35)
            .build_cartesian_2d(0.0..(buckets as f64 * bucket), 0u32..ymax)
            .map_err(err)?;
        chart.configure_mesh().x_desc("µs").draw().map_err(err)?;
        chart
            .draw_series(counts.iter().enumerate().map(|(i, &c)| {
                let x0 = i as f64 * bucket;
                Rectangle::new([(x0, 0), (x0 + bucket * 0.9, c)], BLUE.mix(0.6).filled())
            }))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}
