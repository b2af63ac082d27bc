//! `tether calibrate`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use tether_migrator::calibrate::{self, Sample};
use tether_migrator::profile::{self, Profile};
use tether_migrator::report::Report;

use super::units::parse_rate;

/// Largest report file read.
const MAX_REPORT_BYTES: u64 = 64 << 20;

/// Fit the migration model's host terms to measured migrations and store them as a profile.
///
/// The inputs are the JSON reports of migrations between the host pair (`tether migrate
/// --report FILE`), files or directories of them (*.json); reports of migrations that did not
/// commit are skipped. The best calibration mixes stop-and-copy and pre-copy moves of a small
/// and a larger state (e.g. 16 and 256 MiB) over the link the pair uses; the migration
/// benchmark (`scripts/bench-migration.sh`) runs such short synthetic migrations itself and
/// writes its profile next to its results.
///
/// What is fitted: the scan throughput (reading and hashing live memory), the processing factor
/// and per-round overhead of pre-copy rounds, the fixed and memory-proportional costs of the
/// frozen phase, and the rest of a migration's time. Terms the reports cannot isolate keep the
/// base profile's values, and the output says which.
///
/// The profile goes to --out (default /etc/tether/profile.toml), where `tether plan` and `tether
/// migrate` look for it.
#[derive(Debug, clap::Args)]
pub struct CalibrateArgs {
    /// Migration reports (JSON files, or directories of them).
    #[arg(required = true, value_name = "REPORT")]
    reports: Vec<PathBuf>,
    /// The link's bandwidth between the hosts during those migrations, bits/s (e.g. 100M, 1G).
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    bandwidth: u64,
    /// Where to write the profile.
    #[arg(long, value_name = "FILE", default_value = profile::DEFAULT_PATH)]
    out: PathBuf,
    /// The profile whose terms are kept where the reports cannot isolate them. Default: the
    /// built-in one.
    #[arg(long, value_name = "FILE")]
    base: Option<PathBuf>,
    /// Print the calibration as JSON.
    #[arg(long)]
    json: bool,
}

fn report_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "json"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn read_report(path: &Path) -> anyhow::Result<Report> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_REPORT_BYTES + 1).read_to_string(&mut text))
        .with_context(|| format!("reading {}", path.display()))?;
    anyhow::ensure!(
        text.len() as u64 <= MAX_REPORT_BYTES,
        "{} is larger than {MAX_REPORT_BYTES} bytes",
        path.display()
    );
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a tether migration report", path.display()))
}

/// Runs `tether calibrate`.
pub fn run(a: CalibrateArgs) -> anyhow::Result<ExitCode> {
    let base = match &a.base {
        Some(p) => Profile::load(p)?,
        None => Profile::default(),
    };
    let files = report_files(&a.reports)?;
    let mut samples = Vec::new();
    let mut skipped = 0;
    for f in &files {
        match Sample::from_report(&read_report(f)?) {
            Some(s) => samples.push(s),
            None => skipped += 1,
        }
    }
    let source = format!(
        "calibrated from {} migration(s) at {} Mbit/s, {}",
        samples.len(),
        a.bandwidth as f64 / 1e6,
        humantime_now()
    );
    let c = calibrate::fit(&samples, a.bandwidth as f64 / 8.0, &base, &source)?;
    c.profile.save(&a.out)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&c)?);
    } else {
        print!("{}", c.profile.to_toml());
        eprintln!(
            "tether: calibrated from {} report(s) ({} pre-copy; state sizes {:?} MiB; {} skipped: \
             not committed); written to {}",
            c.samples,
            c.pre_copy_samples,
            c.state_sizes_mib,
            skipped,
            a.out.display()
        );
        if !c.kept_from_base.is_empty() {
            eprintln!(
                "tether: kept from the base profile (nothing in the reports isolates them): {}",
                c.kept_from_base.join(", ")
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Today's date, UTC.
fn humantime_now() -> String {
    time::OffsetDateTime::now_utc().date().to_string()
}
