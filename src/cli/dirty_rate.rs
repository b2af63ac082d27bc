//! `tether dirty-rate`.

use std::process::ExitCode;
use std::time::Duration;

use super::units::parse_duration;

/// Measure how fast a running process tree writes memory, without soft-dirty bits: its pages
/// are read and hashed, twice, `--window` apart (the process is not stopped or changed).
#[derive(Debug, clap::Args)]
pub struct DirtyRateArgs {
    /// Root of the process tree (host pid).
    #[arg(long)]
    pid: i32,
    /// Time between the two scans (e.g. 1s, 500ms).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    window: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `tether dirty-rate`.
pub fn run(a: DirtyRateArgs) -> anyhow::Result<ExitCode> {
    let r = tether_migrator::procmem::measure_dirty_rate(a.pid, a.window)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "pid {}: {:.0} pages/s ({:.2} MB/s) dirtied; {} pages scanned, {} changed in {:?}; one scan takes {:?}",
            a.pid,
            r.pages_per_sec,
            r.mb_per_sec,
            r.pages_scanned,
            r.pages_changed,
            r.window,
            r.scan_time
        );
    }
    Ok(ExitCode::SUCCESS)
}
