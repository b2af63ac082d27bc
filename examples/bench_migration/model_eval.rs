//! The migration model against the benchmark: calibration in the same run, predicted against
//! measured per move, the errors over the grid, and a held-out check.
//!
//! Calibration: per link rate, short synthetic migrations (16, 64 and 192 MiB services, 500
//! pages/s, two stop-and-copy and two pre-copy moves each) are fitted into a profile
//! (`tether_migrator::calibrate`), written beside the results; every grid move then runs with
//! `--profile` of its link, so `tether migrate` itself measures the service (state size, dirty
//! rate), predicts, and scores its prediction in the report.
//!
//! Held-out: per link, a profile fitted to the 64 MiB cells' moves only predicts the 256 and
//! 512 MiB moves from the same measured inputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Serialize;
use tether::scenario::{Binaries, Scenario, ScenarioConfig};
use tether_migrator::calibrate::{self, Calibration, Sample};
use tether_migrator::driver::source::PrecopyOptions;
use tether_migrator::model::Params;
use tether_migrator::plan::Plan;
use tether_migrator::profile::Profile;
use tether_migrator::report::Report;

/// State sizes (MiB) of the calibration's synthetic services.
pub const CALIBRATION_STATES: [u32; 3] = [16, 64, 192];
/// Their dirty rate, pages/s.
const CALIBRATION_DIRTY: u32 = 500;

/// Whether pre-copy converges in the model: the dirty rate, in bytes/s, below the link's.
pub fn converges(link_mbit: u64, dirty_pages_per_sec: u32) -> bool {
    f64::from(dirty_pages_per_sec) * 4096.0 < link_mbit as f64 * 1e6 / 8.0
}

/// A link's calibration.
#[derive(Debug, Clone, Serialize)]
pub struct LinkProfile {
    /// The link, Mbit/s.
    pub link_mbit: u64,
    /// Where the profile was written.
    pub path: PathBuf,
    /// The fit.
    pub calibration: Calibration,
    /// Wall time of the calibration, s.
    pub wall_s: f64,
    /// The calibration moves' figures, for studying the fit afterwards.
    pub samples: Vec<Sample>,
}

/// Calibrates a profile per link with short synthetic migrations.
pub fn calibrate_links(
    bins: &Binaries,
    links: &[u64],
    full_restore_on: &[tether::testbed::Host],
    dir: &Path,
    stop: &AtomicBool,
) -> anyhow::Result<BTreeMap<u64, LinkProfile>> {
    let mut out = BTreeMap::new();
    for &link in links {
        let t0 = std::time::Instant::now();
        let mut samples = Vec::new();
        for state in CALIBRATION_STATES {
            if stop.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            let mut s = Scenario::start(
                bins.clone(),
                &ScenarioConfig {
                    link_rate: Some(link * 1_000_000),
                    state_mb: state,
                    dirty_pages_per_sec: CALIBRATION_DIRTY,
                    proxy: false,
                    full_restore_on: full_restore_on.to_vec(),
                    proxy_max_hold_ms: None,
                    hot_first_mib: None,
                    interpreted: false,
                    container: false,
                    container_args: Vec::new(),
                    workers: 0,
                    lazy_pages_from: None,
                },
            )
            .context("starting a calibration scenario")?;
            // Each method twice: a calibration has few samples, and single moves are noisy.
            let methods = [&["--stop-and-copy"][..], &[][..]];
            for extra in methods.iter().chain(&methods).copied() {
                std::thread::sleep(Duration::from_millis(500));
                let to = if s.location() == tether::testbed::Host::Src {
                    tether::testbed::Host::Dst
                } else {
                    tether::testbed::Host::Src
                };
                let mut args = vec!["--max-frozen", "180s", "--predict-window", "0"];
                args.extend_from_slice(extra);
                let run = s.migrate_with(to, None, &args)?;
                if !run.success {
                    bail!("calibration move failed:\n{}", run.stderr.trim());
                }
                let r = run.report.context("calibration move wrote no report")?;
                s.verify_state()
                    .context("calibration: state after the move")?;
                samples.extend(Sample::from_report(&r));
            }
        }
        let source = format!(
            "bench-migration calibration: {} moves at {link} Mbit/s ({:?} MiB, {CALIBRATION_DIRTY} pages/s)",
            samples.len(),
            CALIBRATION_STATES
        );
        let c = calibrate::fit(
            &samples,
            link as f64 * 1e6 / 8.0,
            &Profile::default(),
            &source,
        )?;
        for s in &samples {
            eprintln!(
                "  calibration move: {:.0} MiB, {}: downtime {:.1} ms, total {:.1} ms, {:.2} MiB sent while frozen",
                s.state_bytes as f64 / 1_048_576.0,
                if s.rounds.is_empty() { "stop-and-copy" } else { "pre-copy" },
                s.downtime_ms,
                s.total_ms,
                s.final_bytes as f64 / 1_048_576.0
            );
        }
        let path = dir.join(format!("bench-migration-profile-{link}.toml"));
        c.profile.save(&path)?;
        eprintln!(
            "calibrated {link} Mbit/s in {:.1} s -> {}:\n{}",
            t0.elapsed().as_secs_f64(),
            path.display(),
            c.profile.to_toml().trim_end()
        );
        out.insert(
            link,
            LinkProfile {
                link_mbit: link,
                path,
                calibration: c,
                wall_s: t0.elapsed().as_secs_f64(),
                samples,
            },
        );
    }
    Ok(out)
}

/// One move, predicted against measured.
#[derive(Debug, Clone, Serialize)]
pub struct Scored {
    pub link_mbit: u64,
    pub state_mib: u32,
    pub dirty_pages_per_sec: u32,
    pub method: &'static str,
    /// The cell is on the converging side of the model's boundary: it dirties bytes more slowly
    /// than the link carries them (`R sigma < B`).
    pub converging: bool,
    pub predicted_downtime_ms: f64,
    pub measured_downtime_ms: f64,
    pub downtime_error: f64,
    pub predicted_total_ms: f64,
    pub measured_total_ms: f64,
    pub total_error: f64,
    pub predicted_rounds: u32,
    pub measured_rounds: usize,
}

/// Median and maximum of absolute relative errors.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ErrorStats {
    pub moves: usize,
    pub median_abs: f64,
    pub max_abs: f64,
}

impl ErrorStats {
    pub fn of(errors: impl Iterator<Item = f64>) -> ErrorStats {
        let v: Vec<f64> = errors.map(f64::abs).filter(|e| e.is_finite()).collect();
        if v.is_empty() {
            return ErrorStats::default();
        }
        ErrorStats {
            moves: v.len(),
            median_abs: crate::median(&v),
            max_abs: v.iter().copied().fold(0.0, f64::max),
        }
    }

    pub fn show(&self) -> String {
        if self.moves == 0 {
            return "no moves".into();
        }
        format!(
            "median {:.1}%, max {:.1}% ({} moves)",
            self.median_abs * 100.0,
            self.max_abs * 100.0,
            self.moves
        )
    }
}

/// The errors over a set of scored moves, by class.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub label: String,
    pub downtime_all: ErrorStats,
    pub total_all: ErrorStats,
    pub downtime_converging: ErrorStats,
    pub total_converging: ErrorStats,
    pub downtime_non_converging: ErrorStats,
    pub total_non_converging: ErrorStats,
}

impl Summary {
    pub fn of(label: &str, moves: &[Scored]) -> Summary {
        let d = |f: &dyn Fn(&Scored) -> bool| {
            ErrorStats::of(moves.iter().filter(|m| f(m)).map(|m| m.downtime_error))
        };
        let t = |f: &dyn Fn(&Scored) -> bool| {
            ErrorStats::of(moves.iter().filter(|m| f(m)).map(|m| m.total_error))
        };
        Summary {
            label: label.to_string(),
            downtime_all: d(&|_| true),
            total_all: t(&|_| true),
            downtime_converging: d(&|m| m.converging),
            total_converging: t(&|m| m.converging),
            downtime_non_converging: d(&|m| !m.converging),
            total_non_converging: t(&|m| !m.converging),
        }
    }

    pub fn print(&self, median_target: f64, max_target: f64) {
        let verdict = |s: &ErrorStats| {
            if s.moves == 0 {
                "n/a"
            } else if s.median_abs <= median_target && s.max_abs <= max_target {
                "met"
            } else {
                "MISSED"
            }
        };
        let max = if max_target.is_finite() {
            format!(", max <= {:.0}%", max_target * 100.0)
        } else {
            String::new()
        };
        println!(
            "- {} (targets: median <= {:.0}%{max}):",
            self.label,
            median_target * 100.0
        );
        for (what, s) in [
            ("downtime, all moves", &self.downtime_all),
            ("migration time, all moves", &self.total_all),
            ("downtime, converging cells", &self.downtime_converging),
            ("migration time, converging cells", &self.total_converging),
            (
                "downtime, non-converging cells",
                &self.downtime_non_converging,
            ),
            (
                "migration time, non-converging cells",
                &self.total_non_converging,
            ),
        ] {
            println!("  - {what}: {}: {}", s.show(), verdict(s));
        }
    }
}

/// What a cell's move contributes: its report, and the cell's coordinates.
pub struct MoveRef<'a> {
    pub link_mbit: u64,
    pub state_mib: u32,
    pub dirty_pages_per_sec: u32,
    pub converging: bool,
    pub report: &'a Report,
}

fn rel(p: f64, m: f64) -> f64 {
    tether_migrator::report::relative_error(p, m).unwrap_or(f64::NAN)
}

fn scored(m: &MoveRef<'_>, plan: &Plan) -> Scored {
    let r = m.report;
    let pre = !r.precopy.rounds.is_empty();
    let method = if pre {
        &plan.pre_copy
    } else {
        &plan.stop_and_copy
    };
    Scored {
        link_mbit: m.link_mbit,
        state_mib: m.state_mib,
        dirty_pages_per_sec: m.dirty_pages_per_sec,
        method: if pre { "pre-copy" } else { "stop-and-copy" },
        converging: m.converging,
        predicted_downtime_ms: method.downtime_ms,
        measured_downtime_ms: r.timings.downtime_ms,
        downtime_error: rel(method.downtime_ms, r.timings.downtime_ms),
        predicted_total_ms: method.total_ms,
        measured_total_ms: r.timings.total_ms,
        total_error: rel(method.total_ms, r.timings.total_ms),
        predicted_rounds: method.rounds,
        measured_rounds: r.precopy.rounds.len(),
    }
}

/// The moves scored against the prediction their own report carries (made by `tether migrate`
/// with the link's profile).
pub fn score_reports(moves: &[MoveRef<'_>]) -> Vec<Scored> {
    moves
        .iter()
        .filter_map(|m| m.report.prediction.as_ref().map(|p| scored(m, p)))
        .collect()
}

/// The moves re-predicted with each link's profile from the inputs their reports measured (for
/// scoring a newer model against an earlier run's moves: `bench_migration --rescore`).
pub fn rescore(
    moves: &[MoveRef<'_>],
    profiles: &BTreeMap<u64, Profile>,
) -> anyhow::Result<Vec<Scored>> {
    let mut out = Vec::new();
    for m in moves {
        let Some(profile) = profiles.get(&m.link_mbit) else {
            continue;
        };
        if let Some(plan) = repredict(m.report, profile)? {
            out.push(scored(m, &plan));
        }
    }
    Ok(out)
}

/// Re-predicts a move with another profile, from the inputs its report's prediction measured.
fn repredict(report: &Report, profile: &Profile) -> anyhow::Result<Option<Plan>> {
    let Some(p) = &report.prediction else {
        return Ok(None);
    };
    let i = &p.inputs;
    let params = Params {
        costs: profile.costs(),
        ..Params::new(i.state_bytes, i.dirty_rate, i.bandwidth)
    };
    let pc = PrecopyOptions {
        downtime_limit: Duration::from_secs_f64(i.downtime_limit_ms / 1000.0),
        auto_converge: i.auto_converge,
        ..PrecopyOptions::default()
    };
    Ok(Some(Plan::new(
        &params,
        &pc.policy(profile.costs()),
        false,
        &profile.source,
    )?))
}

/// The held-out check: per link, fit to the moves of `train_state` MiB only, predict the moves
/// of larger states.
pub fn held_out(moves: &[MoveRef<'_>], train_state: u32) -> anyhow::Result<Vec<Scored>> {
    let mut out = Vec::new();
    let mut links: Vec<u64> = moves.iter().map(|m| m.link_mbit).collect();
    links.sort_unstable();
    links.dedup();
    for link in links {
        let train: Vec<Sample> = moves
            .iter()
            .filter(|m| m.link_mbit == link && m.state_mib == train_state)
            .filter_map(|m| Sample::from_report(m.report))
            .collect();
        if train.is_empty() {
            continue;
        }
        let c = calibrate::fit(
            &train,
            link as f64 * 1e6 / 8.0,
            &Profile::default(),
            "held-out fit",
        )?;
        for m in moves
            .iter()
            .filter(|m| m.link_mbit == link && m.state_mib > train_state)
        {
            if let Some(plan) = repredict(m.report, &c.profile)? {
                out.push(scored(m, &plan));
            }
        }
    }
    Ok(out)
}

/// Prints the per-move comparison as a Markdown table.
pub fn print_scored(
    title: &str,
    moves: &[Scored],
    table: impl Fn(&[&str], &[usize], &[Vec<String>]),
) {
    println!("\n## {title}\n");
    let pct = |e: f64| {
        if e.is_finite() {
            format!("{:+.1}%", e * 100.0)
        } else {
            "-".into()
        }
    };
    let rows: Vec<Vec<String>> = moves
        .iter()
        .map(|m| {
            vec![
                m.link_mbit.to_string(),
                m.state_mib.to_string(),
                m.dirty_pages_per_sec.to_string(),
                m.method.to_string(),
                if m.converging { "yes" } else { "no" }.into(),
                format!("{}/{}", m.predicted_rounds, m.measured_rounds),
                format!("{:.0}", m.predicted_downtime_ms),
                format!("{:.0}", m.measured_downtime_ms),
                pct(m.downtime_error),
                format!("{:.2}", m.predicted_total_ms / 1e3),
                format!("{:.2}", m.measured_total_ms / 1e3),
                pct(m.total_error),
            ]
        })
        .collect();
    table(
        &[
            "link Mbit/s",
            "state MiB",
            "dirty pages/s",
            "method",
            "converging",
            "rounds pred/meas",
            "downtime pred ms",
            "downtime meas ms",
            "error",
            "total pred s",
            "total meas s",
            "error",
        ],
        &[3, 4],
        &rows,
    );
}
