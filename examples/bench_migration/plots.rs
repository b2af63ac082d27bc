//! SVG figures of the benchmark, like the research's: downtime and migration time against the
//! dirty rate and against the state size, measured moves as points, the model (with each link's
//! calibrated profile) as lines, for pre-copy and stop-and-copy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plotters::prelude::*;
use tether_migrator::driver::source::PrecopyOptions;
use tether_migrator::model::Params;
use tether_migrator::plan::Plan;
use tether_migrator::profile::Profile;

use crate::model_eval::Scored;

const MIB: u64 = 1 << 20;
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
];

/// Which quantity a figure shows.
#[derive(Clone, Copy)]
enum Metric {
    Downtime,
    Total,
}

/// What the x axis is.
#[derive(Clone, Copy)]
enum Axis {
    /// Dirty rate at a fixed state size (MiB).
    Dirty { state_mib: u32 },
    /// State size at a fixed dirty rate (pages/s).
    State { dirty: u32 },
}

/// Writes the four figures into `dir`; returns their paths.
pub fn write_all(
    dir: &Path,
    moves: &[Scored],
    profiles: &BTreeMap<u64, Profile>,
    downtime_limit: Duration,
    overhead_bytes: u64,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut states: Vec<u32> = moves.iter().map(|m| m.state_mib).collect();
    states.sort_unstable();
    states.dedup();
    let mut dirties: Vec<u32> = moves.iter().map(|m| m.dirty_pages_per_sec).collect();
    dirties.sort_unstable();
    dirties.dedup();
    let (Some(&state), Some(&dirty)) = (
        states.get(states.len() / 2),
        dirties.iter().find(|d| **d > 0).or(dirties.first()),
    ) else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (metric, mname) in [
        (Metric::Downtime, "downtime"),
        (Metric::Total, "migration-time"),
    ] {
        for (axis, aname) in [
            (Axis::Dirty { state_mib: state }, "vs-dirty-rate"),
            (Axis::State { dirty }, "vs-state-size"),
        ] {
            let path = dir.join(format!("model-{mname}-{aname}.svg"));
            figure(
                &path,
                metric,
                axis,
                moves,
                profiles,
                downtime_limit,
                overhead_bytes,
            )
            .map_err(|e| anyhow::anyhow!("plotting {}: {e}", path.display()))?;
            out.push(path);
        }
    }
    Ok(out)
}

fn predict(
    profile: &Profile,
    link_mbit: u64,
    state_bytes: u64,
    dirty: f64,
    limit: Duration,
) -> Option<Plan> {
    let params = Params {
        costs: profile.costs(),
        ..Params::new(state_bytes, dirty, link_mbit as f64 * 1e6 / 8.0)
    };
    let pc = PrecopyOptions {
        downtime_limit: limit,
        ..PrecopyOptions::default()
    };
    Plan::new(&params, &pc.policy(profile.costs()), false, "").ok()
}

/// A model line: the link (Mbit/s), whether pre-copy, and its points.
type ModelLine = (u64, bool, Vec<(f64, f64)>);

#[allow(clippy::too_many_arguments)]
fn figure(
    path: &Path,
    metric: Metric,
    axis: Axis,
    moves: &[Scored],
    profiles: &BTreeMap<u64, Profile>,
    limit: Duration,
    overhead: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let secs = |ms: f64| (ms / 1000.0).max(1e-3);
    let value = |m: &Scored| match metric {
        Metric::Downtime => secs(m.measured_downtime_ms),
        Metric::Total => secs(m.measured_total_ms),
    };
    let points: Vec<&Scored> = moves
        .iter()
        .filter(|m| match axis {
            Axis::Dirty { state_mib } => m.state_mib == state_mib,
            Axis::State { dirty } => m.dirty_pages_per_sec == dirty,
        })
        .collect();
    let x_of = |m: &Scored| match axis {
        Axis::Dirty { .. } => f64::from(m.dirty_pages_per_sec),
        Axis::State { .. } => f64::from(m.state_mib),
    };
    let x_max = points.iter().map(|m| x_of(m)).fold(1.0, f64::max) * 1.1;
    let xs: Vec<f64> = (0..=60).map(|i| x_max * f64::from(i) / 60.0).collect();
    // Model lines per link and method.
    let mut lines: Vec<ModelLine> = Vec::new();
    for (&link, profile) in profiles {
        let mut pre = Vec::new();
        let mut sc = Vec::new();
        for &x in &xs {
            let (m_bytes, r) = match axis {
                Axis::Dirty { state_mib } => (u64::from(state_mib) * MIB + overhead, x),
                Axis::State { dirty } => (
                    ((x.max(1.0)) * MIB as f64) as u64 + overhead,
                    f64::from(dirty),
                ),
            };
            if let Some(p) = predict(profile, link, m_bytes, r, limit) {
                let pick = |m: &tether_migrator::plan::MethodPlan| match metric {
                    Metric::Downtime => secs(m.downtime_ms),
                    Metric::Total => secs(m.total_ms),
                };
                pre.push((x, pick(&p.pre_copy)));
                sc.push((x, pick(&p.stop_and_copy)));
            }
        }
        lines.push((link, true, pre));
        lines.push((link, false, sc));
    }
    let all_y = points
        .iter()
        .map(|m| value(m))
        .chain(lines.iter().flat_map(|l| l.2.iter().map(|p| p.1)));
    let (y_min, y_max) = all_y.fold((f64::MAX, 1e-3f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    let y_min = (y_min * 0.7).max(1e-3);
    let y_max = y_max * 1.5;

    let root = SVGBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let (what, unit) = match metric {
        Metric::Downtime => ("Downtime", "downtime, s (log)"),
        Metric::Total => ("Migration time", "migration time, s (log)"),
    };
    let (caption, x_label) = match axis {
        Axis::Dirty { state_mib } => (
            format!("{what} against dirty rate ({state_mib} MiB state)"),
            "dirty rate, pages/s",
        ),
        Axis::State { dirty } => (
            format!("{what} against state size ({dirty} pages/s)"),
            "state, MiB",
        ),
    };
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(unit)
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    for (i, (link, pre, line)) in lines.iter().enumerate() {
        let color = COLORS[(i / 2) % COLORS.len()];
        let style = if *pre {
            color.stroke_width(2)
        } else {
            color.mix(0.6).stroke_width(1)
        };
        let label = format!(
            "model, {} at {link} Mbit/s",
            if *pre { "pre-copy" } else { "stop-and-copy" }
        );
        chart
            .draw_series(LineSeries::new(line.iter().copied(), style))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    let links: Vec<u64> = profiles.keys().copied().collect();
    for (method, pre) in [("pre-copy", true), ("stop-and-copy", false)] {
        for (li, link) in links.iter().enumerate() {
            let color = COLORS[li % COLORS.len()];
            let pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|m| m.link_mbit == *link && (m.method == "pre-copy") == pre)
                .map(|m| (x_of(m), value(m)))
                .collect();
            if pts.is_empty() {
                continue;
            }
            let label = format!("measured, {method} at {link} Mbit/s");
            if pre {
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 5, color.filled())))?
                    .label(label)
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
            } else {
                chart
                    .draw_series(pts.iter().map(|&p| TriangleMarker::new(p, 6, color)))?
                    .label(label)
                    .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 6, color));
            }
        }
    }
    chart
        .configure_series_labels()
        .position(match axis {
            // Against the dirty rate measured points sit at both ends: the legend goes between.
            Axis::Dirty { .. } => SeriesLabelPosition::UpperMiddle,
            Axis::State { .. } => SeriesLabelPosition::LowerRight,
        })
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
