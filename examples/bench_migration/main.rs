//! Migration benchmark: stop-and-copy against iterative pre-copy, side by side in one run, on a
//! tbf-limited src-dst link, for a grid of link rates, state sizes and dirty rates.
//!
//! Per cell (link, state, dirty rate) one scenario is started (the service fills its state at
//! start-up) and the service is moved twice: src -> dst with one method, dst -> src with the
//! other; which method goes first alternates from cell to cell. After every move the service's
//! memory state is verified; a move that fails or a state that does not verify fails the cell
//! loudly (and the run's exit status), and the run goes on with the next cell.
//!
//! Each downtime is compared with its floor: the freeze (the report's `freeze_ms`) + the bytes
//! sent while frozen (final difference plus the non-memory images, `images.total_bytes`) over
//! the nominal link rate + the restore time of a minimal process (measured once per run, by moving
//! a 1 MiB service that does not write memory with stop-and-copy; the median of a few moves).
//!
//! Progress goes to stderr, the tables (Markdown) to stdout, every report's key numbers (and the
//! reports themselves) to the JSON file, rewritten after every cell.
//!
//! The migration model is checked in the same run ([`model_eval`]): a profile is calibrated per
//! link with short synthetic migrations first, every grid move runs with its link's profile
//! (so its report carries the prediction `tether migrate` made), and the run ends with the
//! predicted-vs-measured table, the errors over the grid (converging and non-converging cells
//! apart), a held-out check (fitted to the 64 MiB cells only, predicting the larger ones) and
//! SVG figures ([`plots`]).
//!
//! Run as root: `scripts/bench-migration.sh [--quick]` (runs scripts/setup.sh, builds, runs
//! this). The full grid takes 15-25 minutes on a 2-core machine, `--quick` about 5 (2-3 of them calibrating).

mod model_eval;
mod plots;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tether::scenario::{Binaries, Scenario, ScenarioConfig};
use tether::testbed::{require_prerequisites, Host};
use tether_migrator::report::Report;

/// Benchmark stop-and-copy against pre-copy over tbf-limited links.
#[derive(Debug, Parser)]
struct Args {
    /// Rates of the src-dst link, Mbit/s (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "100,1000")]
    links: Vec<u64>,
    /// Memory states of the service, MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "64,256,512,1024,2048")]
    states: Vec<u32>,
    /// Dirty rates of the service, pages/s (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000")]
    dirty: Vec<u32>,
    /// Leave out cells whose stop-and-copy would need longer than this just to send the state
    /// at the link rate (2 GiB over 100 Mbit/s: 172 s), seconds.
    #[arg(long, default_value_t = 60.0)]
    max_stop_and_copy_secs: f64,
    /// A quick grid: 64 MiB only, dirty rates 0 and 1000 (links as given).
    #[arg(long, conflicts_with_all = ["states", "dirty"])]
    quick: bool,
    /// Write the results as JSON here (rewritten after every cell).
    #[arg(long, default_value = "target/bench-migration.json")]
    json: PathBuf,
    /// Pre-copy's `--downtime-limit`.
    #[arg(long, default_value = "300ms")]
    downtime_limit: String,
    /// Seconds to let the service run before each move (so that its dirty rate is steady).
    #[arg(long, default_value_t = 1.0)]
    settle_secs: f64,
    /// Moves of the minimal service whose median restore time is the floor's restore term.
    #[arg(long, default_value_t = 3)]
    baseline_moves: u32,
    /// Restore fully on both hosts (`tether agent --lazy-restore never`), for comparison with
    /// the default lazy restore (userfaultfd), which takes copying memory out of the downtime.
    #[arg(long)]
    full_restore: bool,
    /// The agents' `--lazy-pages-from` (their default, `store`, if not given): `files` runs the
    /// earlier path that rebuilds pages files holding all of memory before the restore.
    #[arg(long, value_enum)]
    lazy_pages_from: Option<LazyFrom>,
    /// Where the SVG figures of the model against the measured moves go.
    #[arg(long, default_value = "target/bench-migration-figures")]
    figures: PathBuf,
    /// Run no migration: re-predict the moves of an earlier run's JSON with this build's model
    /// (from the inputs each move measured and the profiles that run calibrated), and print and
    /// plot the model's errors.
    #[arg(long, value_name = "JSON")]
    rescore: Option<PathBuf>,
}

/// `--lazy-pages-from` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LazyFrom {
    Store,
    Files,
}

impl LazyFrom {
    fn as_arg(self) -> &'static str {
        match self {
            LazyFrom::Store => "store",
            LazyFrom::Files => "files",
        }
    }
}

impl Args {
    /// Hosts whose agent restores fully.
    fn full_restore_on(&self) -> Vec<Host> {
        if self.full_restore {
            vec![Host::Src, Host::Dst]
        } else {
            Vec::new()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
enum Method {
    StopAndCopy,
    PreCopy,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::StopAndCopy => "stop-and-copy",
            Method::PreCopy => "pre-copy",
        }
    }
}

/// One move's key numbers (and its full report).
#[derive(Debug, Clone, Serialize)]
struct Move {
    method: Method,
    from: String,
    to: String,
    /// Wall time of `tether migrate`, ms.
    wall_ms: f64,
    downtime_ms: f64,
    total_ms: f64,
    handshake_ms: f64,
    precopy_ms: f64,
    freeze_ms: f64,
    dump_ms: f64,
    transfer_ms: f64,
    restore_ms: f64,
    commit_ms: f64,
    /// Of `transfer_ms`: the destination's rebuild of CRIU's page files from the pre-copied
    /// pages and the final difference (from its log, "page data rebuilt").
    dst_rebuild_ms: Option<f64>,
    rounds: usize,
    stop_reason: Option<String>,
    /// Bytes of the pre-copy rounds (sent while the service ran).
    precopy_bytes: u64,
    /// Bytes sent while frozen: the final difference plus the non-memory image files.
    frozen_bytes: u64,
    /// Of those, the final difference's page batches.
    final_difference_bytes: u64,
    final_pages_sent: u64,
    final_pages_dumped: u64,
    image_files: u32,
    /// Everything sent: pre-copy rounds + what was sent while frozen.
    bytes_sent: u64,
    /// The floor's terms and sum, ms.
    floor_freeze_ms: f64,
    floor_transfer_ms: f64,
    floor_restore_ms: f64,
    floor_ms: f64,
    /// downtime / floor.
    downtime_over_floor: f64,
    /// The state digest after the move (the service verified its whole state).
    state_digest: u64,
    report: Report,
}

/// One (link, state, dirty rate) cell.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    link_mbit: u64,
    state_mib: u32,
    dirty_pages_per_sec: u32,
    first: Method,
    /// Scenario start-up (topology, agents, service filling its state), s.
    startup_s: f64,
    /// /proc/loadavg before and after the cell (other work on the machine skews timings).
    loadavg_before: String,
    loadavg_after: String,
    wall_s: f64,
    stop_and_copy: Option<Move>,
    pre_copy: Option<Move>,
    /// pre-copy downtime / stop-and-copy downtime.
    precopy_over_stop_and_copy: Option<f64>,
    /// pre-copy downtime / its floor.
    precopy_over_floor: Option<f64>,
    error: Option<String>,
}

/// The minimal process's moves, for the floor's restore term.
#[derive(Debug, Clone, Default, Serialize)]
struct Baseline {
    state_mib: u32,
    restore_ms: Vec<f64>,
    freeze_ms: Vec<f64>,
    downtime_ms: Vec<f64>,
    /// Median of `restore_ms`: the floor's restore term.
    median_restore_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
struct Target {
    what: String,
    value: Option<f64>,
    limit: f64,
    met: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Output<'a> {
    started_unix: u64,
    elapsed_s: f64,
    complete: bool,
    cpus: usize,
    links_mbit: &'a [u64],
    states_mib: &'a [u32],
    dirty_pages_per_sec: &'a [u32],
    downtime_limit: &'a str,
    /// Restores were full on both hosts (`--full-restore`), else lazy where supported.
    full_restore: bool,
    baseline: &'a Baseline,
    /// The profile calibrated per link at the start of the run.
    profiles: &'a BTreeMap<u64, model_eval::LinkProfile>,
    cells: &'a [Cell],
    targets: Vec<Target>,
    /// The model against the grid (once the grid is done).
    model: Option<&'a Evaluation>,
}

/// The model against the grid.
#[derive(Debug, Serialize)]
struct Evaluation {
    /// Every move against the prediction its report carries.
    moves: Vec<model_eval::Scored>,
    summary: model_eval::Summary,
    /// Fitted to the 64 MiB cells only, predicting the larger ones.
    held_out: Vec<model_eval::Scored>,
    held_out_summary: model_eval::Summary,
    figures: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.states = vec![64];
        args.dirty = vec![0, 1000];
    }
    if let Some(path) = args.rescore.clone() {
        return rescore(&args, &path);
    }
    if args.links.contains(&0) {
        bail!("--links: a link rate must be positive (Mbit/s)");
    }
    if let Err(missing) = require_prerequisites() {
        bail!("this machine cannot run the benchmark:\n{missing}\nRun scripts/setup.sh as root.");
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench_migration -> target/<profile>/tether
    let tether = exe
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("tether"))
        .context("cannot find the tether binary")?;
    let bins = Binaries::beside(&tether)?;
    let stop = stop_flag()?;
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }

    let started = Instant::now();
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut grid: Vec<(u64, u32, u32)> = Vec::new();
    for &l in &args.links {
        for &s in &args.states {
            let send_s = f64::from(s) * 8.0 * 1.048_576 / l as f64;
            if send_s > args.max_stop_and_copy_secs {
                eprintln!(
                    "leaving out {s} MiB over {l} Mbit/s: stop-and-copy would send for {send_s:.0} s \
                     (--max-stop-and-copy-secs {})",
                    args.max_stop_and_copy_secs
                );
                continue;
            }
            for &d in &args.dirty {
                grid.push((l, s, d));
            }
        }
    }
    eprintln!(
        "bench-migration: {} cells (links {:?} Mbit/s, states {:?} MiB, dirty {:?} pages/s), \
         stop-and-copy vs pre-copy (--downtime-limit {}), {} restores, on {} CPUs",
        grid.len(),
        args.links,
        args.states,
        args.dirty,
        args.downtime_limit,
        if args.full_restore {
            "full"
        } else {
            "lazy (where supported)"
        },
        cpus()
    );

    let baseline = measure_baseline(&bins, &args)?;
    eprintln!(
        "floor restore term: {:.1} ms (median restore of a {} MiB service; restores {} ms, \
         freezes {} ms, downtimes {} ms)",
        baseline.median_restore_ms,
        baseline.state_mib,
        list(&baseline.restore_ms),
        list(&baseline.freeze_ms),
        list(&baseline.downtime_ms)
    );

    let json_dir = args
        .json
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    eprintln!(
        "calibrating the model per link ({:?} MiB services, short synthetic migrations)",
        model_eval::CALIBRATION_STATES
    );
    let profiles = model_eval::calibrate_links(
        &bins,
        &args.links,
        &args.full_restore_on(),
        &json_dir,
        &stop,
    )?;

    let run = Run {
        args: &args,
        started_unix,
        started,
        baseline: &baseline,
        profiles: &profiles,
    };
    let mut cells: Vec<Cell> = Vec::new();
    let mut complete = true;
    for (i, &(link, state, dirty)) in grid.iter().enumerate() {
        if stop.load(Ordering::SeqCst) {
            complete = false;
            eprintln!("interrupted: skipping the remaining cells");
            break;
        }
        let first = if i % 2 == 0 {
            Method::StopAndCopy
        } else {
            Method::PreCopy
        };
        eprintln!(
            "[{}/{}] link {link} Mbit/s, state {state} MiB, dirty {dirty} pages/s ({} first; {:.0} s elapsed)",
            i + 1,
            grid.len(),
            first.name(),
            started.elapsed().as_secs_f64()
        );
        let profile = &profiles[&link].path;
        let cell = run_cell(
            &bins,
            &args,
            &baseline,
            profile,
            (link, state, dirty),
            first,
            &stop,
        );
        if let Some(e) = &cell.error {
            eprintln!("  !!! CELL FAILED: link {link} Mbit/s, state {state} MiB, dirty {dirty} pages/s: {e:#}");
        } else {
            eprintln!(
                "  cell done in {:.1} s: pre-copy/stop-and-copy downtime {}, pre-copy/floor {}",
                cell.wall_s,
                ratio(cell.precopy_over_stop_and_copy),
                ratio(cell.precopy_over_floor)
            );
        }
        cells.push(cell);
        write_json(&run, false, &cells, None)?;
    }
    if cells.len() < grid.len() {
        complete = false;
    }
    write_json(&run, complete, &cells, None)?;
    print_tables(&args, &baseline, &cells);
    let eval = evaluate(&args, &cells, &profiles)?;
    write_json(&run, complete, &cells, Some(&eval))?;
    eprintln!(
        "bench-migration: {} cells in {:.1} s; results in {}",
        cells.len(),
        started.elapsed().as_secs_f64(),
        args.json.display()
    );
    let failed = cells.iter().filter(|c| c.error.is_some()).count();
    if failed > 0 {
        bail!("{failed} cell(s) FAILED (see above)");
    }
    if !complete {
        bail!("interrupted: the grid is incomplete");
    }
    Ok(())
}

/// A flag set by SIGINT or SIGTERM: the run stops after the current move and cleans up.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Register the handlers here, so that they are in place before the first scenario.
    let (mut int, mut term) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        anyhow::Ok((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let f = Arc::clone(&flag);
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(async {
                loop {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                    eprintln!("signal received: finishing the current move, then cleaning up");
                    f.store(true, Ordering::SeqCst);
                }
            });
        })?;
    Ok(flag)
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

fn other(h: Host) -> Host {
    if h == Host::Src {
        Host::Dst
    } else {
        Host::Src
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn list(v: &[f64]) -> String {
    let v: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
    v.join(", ")
}

fn ratio(r: Option<f64>) -> String {
    r.map_or("-".into(), |r| format!("{r:.2}x"))
}

/// Moves a minimal service (1 MiB, no writes) with stop-and-copy a few times; the median
/// restore time is the floor's restore term.
fn measure_baseline(bins: &Binaries, args: &Args) -> anyhow::Result<Baseline> {
    let state_mib = 1;
    eprintln!(
        "baseline: moving a minimal service ({state_mib} MiB, no writes, stop-and-copy) {} times",
        args.baseline_moves
    );
    let mut b = Baseline {
        state_mib,
        ..Baseline::default()
    };
    let mut s = Scenario::start(
        bins.clone(),
        &ScenarioConfig {
            link_rate: None,
            state_mb: state_mib,
            dirty_pages_per_sec: 0,
            proxy: false,
            full_restore_on: args.full_restore_on(),
            proxy_max_hold_ms: None,
            hot_first_mib: None,
            interpreted: false,
            container: false,
            container_args: Vec::new(),
            workers: 0,
            lazy_pages_from: args.lazy_pages_from.map(LazyFrom::as_arg),
        },
    )
    .context("starting the baseline scenario")?;
    for _ in 0..args.baseline_moves.max(1) {
        let to = other(s.location());
        let run = s.migrate_with(to, None, &["--stop-and-copy"])?;
        if !run.success {
            bail!("baseline move to {to} failed:\n{}", run.stderr.trim());
        }
        let r = run.report.context("baseline move wrote no report")?;
        s.verify_state().context("baseline: state after the move")?;
        b.restore_ms.push(r.timings.restore_ms);
        b.freeze_ms.push(r.timings.freeze_ms);
        b.downtime_ms.push(r.timings.downtime_ms);
    }
    drop(s);
    b.median_restore_ms = median(&b.restore_ms);
    Ok(b)
}

fn run_cell(
    bins: &Binaries,
    args: &Args,
    baseline: &Baseline,
    profile: &Path,
    (link, state, dirty): (u64, u32, u32),
    first: Method,
    stop: &AtomicBool,
) -> Cell {
    let t0 = Instant::now();
    let mut cell = Cell {
        link_mbit: link,
        state_mib: state,
        dirty_pages_per_sec: dirty,
        first,
        startup_s: 0.0,
        loadavg_before: loadavg(),
        loadavg_after: String::new(),
        wall_s: 0.0,
        stop_and_copy: None,
        pre_copy: None,
        precopy_over_stop_and_copy: None,
        precopy_over_floor: None,
        error: None,
    };
    if let Err(e) = fill_cell(bins, args, baseline, profile, &mut cell, stop) {
        cell.error = Some(format!("{e:#}"));
    }
    if let (Some(s), Some(p)) = (&cell.stop_and_copy, &cell.pre_copy) {
        if s.downtime_ms > 0.0 {
            cell.precopy_over_stop_and_copy = Some(p.downtime_ms / s.downtime_ms);
        }
    }
    cell.precopy_over_floor = cell.pre_copy.as_ref().map(|p| p.downtime_over_floor);
    cell.wall_s = t0.elapsed().as_secs_f64();
    cell.loadavg_after = loadavg();
    cell
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The `ms` field of the last "page data rebuilt" line an agent logged after byte `from`.
fn rebuild_ms(log: &std::path::Path, from: usize) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text
        .get(from..)?
        .lines()
        .rfind(|l| l.contains("page data rebuilt"))?;
    // Drop ANSI colour sequences (ESC [ ... letter).
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let rest = &plain[plain.find(" ms=")? + 4..];
    let end = rest
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Starts the cell's scenario, moves the service with both methods and drops the scenario (its
/// namespaces, processes and tmpfs directories) before returning.
fn fill_cell(
    bins: &Binaries,
    args: &Args,
    baseline: &Baseline,
    profile: &Path,
    cell: &mut Cell,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let link_bps = cell.link_mbit * 1_000_000;
    let t0 = Instant::now();
    let mut s = Scenario::start(
        bins.clone(),
        &ScenarioConfig {
            link_rate: Some(link_bps),
            state_mb: cell.state_mib,
            dirty_pages_per_sec: cell.dirty_pages_per_sec,
            proxy: false,
            full_restore_on: args.full_restore_on(),
            proxy_max_hold_ms: None,
            hot_first_mib: None,
            interpreted: false,
            container: false,
            container_args: Vec::new(),
            workers: 0,
            lazy_pages_from: args.lazy_pages_from.map(LazyFrom::as_arg),
        },
    )
    .context("starting the scenario")?;
    cell.startup_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "  scenario up in {:.1} s (service pid {})",
        cell.startup_s,
        s.pid()
    );
    let second = match cell.first {
        Method::StopAndCopy => Method::PreCopy,
        Method::PreCopy => Method::StopAndCopy,
    };
    let settle = Duration::from_secs_f64(args.settle_secs.max(0.0));
    for method in [cell.first, second] {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        std::thread::sleep(settle);
        let m = one_move(
            &mut s,
            method,
            args,
            profile,
            link_bps,
            baseline.median_restore_ms,
        )?;
        match method {
            Method::StopAndCopy => cell.stop_and_copy = Some(m),
            Method::PreCopy => cell.pre_copy = Some(m),
        }
    }
    drop(s);
    Ok(())
}

fn one_move(
    s: &mut Scenario,
    method: Method,
    args: &Args,
    profile: &Path,
    link_bps: u64,
    floor_restore_ms: f64,
) -> anyhow::Result<Move> {
    let from = s.location();
    let to = other(from);
    // The grid's slowest stop-and-copy (512 MiB over 100 Mbit/s) stays frozen ~47 s: the
    // benchmark measures it rather than letting --max-frozen roll it back.
    // With the link's profile, `tether migrate` measures the service and predicts the move.
    let profile = profile.display().to_string();
    let mut extra: Vec<&str> = vec!["--max-frozen", "180s", "--profile", &profile];
    match method {
        Method::StopAndCopy => extra.push("--stop-and-copy"),
        Method::PreCopy => extra.extend(["--downtime-limit", args.downtime_limit.as_str()]),
    }
    let dst_log = s.agent_log(to);
    let log_from = std::fs::metadata(&dst_log).map_or(0, |m| m.len() as usize);
    let run = s.migrate_with(to, None, &extra)?;
    let dst_rebuild_ms = rebuild_ms(&dst_log, log_from);
    if !run.success {
        bail!(
            "{} {from} -> {to} failed after {:.1} s:\n{}",
            method.name(),
            run.elapsed.as_secs_f64(),
            run.stderr.trim()
        );
    }
    let r = run
        .report
        .with_context(|| format!("{} {from} -> {to}: no report", method.name()))?;
    let digest = s.verify_state().with_context(|| {
        format!(
            "{} {from} -> {to}: THE SERVICE'S STATE DOES NOT VERIFY after the move",
            method.name()
        )
    })?;
    let t = &r.timings;
    let p = &r.precopy;
    let precopy_bytes: u64 = p.rounds.iter().map(|x| x.bytes).sum();
    let fin = p.final_difference.unwrap_or_default();
    let frozen_bytes = r.images.total_bytes;
    let floor_transfer_ms = frozen_bytes as f64 * 8.0 / link_bps as f64 * 1e3;
    let floor_ms = t.freeze_ms + floor_transfer_ms + floor_restore_ms;
    let m = Move {
        method,
        from: from.to_string(),
        to: to.to_string(),
        wall_ms: run.elapsed.as_secs_f64() * 1e3,
        downtime_ms: t.downtime_ms,
        total_ms: t.total_ms,
        handshake_ms: t.handshake_ms,
        precopy_ms: p.precopy_ms,
        freeze_ms: t.freeze_ms,
        dump_ms: t.dump_ms,
        transfer_ms: t.transfer_ms,
        restore_ms: t.restore_ms,
        commit_ms: t.commit_ms,
        dst_rebuild_ms,
        rounds: p.rounds.len(),
        stop_reason: p.stop_reason.clone(),
        precopy_bytes,
        frozen_bytes,
        final_difference_bytes: fin.bytes,
        final_pages_sent: fin.pages_sent,
        final_pages_dumped: fin.pages_dumped,
        image_files: r.images.files,
        bytes_sent: precopy_bytes + frozen_bytes,
        floor_freeze_ms: t.freeze_ms,
        floor_transfer_ms,
        floor_restore_ms,
        floor_ms,
        downtime_over_floor: if floor_ms > 0.0 {
            t.downtime_ms / floor_ms
        } else {
            0.0
        },
        state_digest: digest,
        report: r.clone(),
    };
    eprintln!(
        "  {:<13} {from} -> {to}: downtime {:.1} ms (floor {:.1} ms, {:.2}x; freeze {:.1}, dump {:.1}, \
         transfer {:.1} of which rebuild {}, restore {:.1}), frozen {:.2} MiB, {} round(s){}, sent {:.1} MiB, total {:.1} s; state verified",
        method.name(),
        m.downtime_ms,
        m.floor_ms,
        m.downtime_over_floor,
        m.freeze_ms,
        m.dump_ms,
        m.transfer_ms,
        m.dst_rebuild_ms.map_or("-".into(), |v| format!("{v:.1}")),
        m.restore_ms,
        mib(m.frozen_bytes),
        m.rounds,
        m.stop_reason
            .as_deref()
            .map_or(String::new(), |s| format!(" ({s})")),
        mib(m.bytes_sent),
        m.total_ms / 1e3
    );
    Ok(m)
}

fn targets(cells: &[Cell]) -> Vec<Target> {
    let mut out = Vec::new();
    let key = cells
        .iter()
        .find(|c| c.link_mbit == 1000 && c.state_mib == 256 && c.dirty_pages_per_sec == 1000);
    if let Some(c) = key {
        let v = c.precopy_over_stop_and_copy;
        out.push(Target {
            what:
                "pre-copy downtime / stop-and-copy downtime, 256 MiB at 1,000 pages/s on 1 Gbit/s"
                    .into(),
            value: v,
            limit: 0.1,
            met: v.map(|v| v <= 0.1),
        });
    }
    for c in cells {
        let v = c.precopy_over_floor;
        out.push(Target {
            what: format!(
                "pre-copy downtime / floor, {} MiB at {} pages/s on {} Mbit/s",
                c.state_mib, c.dirty_pages_per_sec, c.link_mbit
            ),
            value: v,
            limit: 1.5,
            met: v.map(|v| v <= 1.5),
        });
    }
    out
}

/// What every JSON rewrite carries besides the cells.
struct Run<'a> {
    args: &'a Args,
    started_unix: u64,
    started: Instant,
    baseline: &'a Baseline,
    profiles: &'a BTreeMap<u64, model_eval::LinkProfile>,
}

fn write_json(
    run: &Run<'_>,
    complete: bool,
    cells: &[Cell],
    model: Option<&Evaluation>,
) -> anyhow::Result<()> {
    let args = run.args;
    let out = Output {
        started_unix: run.started_unix,
        elapsed_s: run.started.elapsed().as_secs_f64(),
        complete,
        cpus: cpus(),
        links_mbit: &args.links,
        states_mib: &args.states,
        dirty_pages_per_sec: &args.dirty,
        downtime_limit: &args.downtime_limit,
        full_restore: args.full_restore,
        baseline: run.baseline,
        profiles: run.profiles,
        cells,
        targets: targets(cells),
        model,
    };
    std::fs::write(&args.json, serde_json::to_string_pretty(&out)?)
        .with_context(|| format!("writing {}", args.json.display()))
}

/// The model against the grid: printed, and returned for the JSON.
fn evaluate(
    args: &Args,
    cells: &[Cell],
    profiles: &BTreeMap<u64, model_eval::LinkProfile>,
) -> anyhow::Result<Evaluation> {
    let mut refs = Vec::new();
    for c in cells {
        let converging = model_eval::converges(c.link_mbit, c.dirty_pages_per_sec);
        for m in c.stop_and_copy.iter().chain(&c.pre_copy) {
            refs.push(model_eval::MoveRef {
                link_mbit: c.link_mbit,
                state_mib: c.state_mib,
                dirty_pages_per_sec: c.dirty_pages_per_sec,
                converging,
                report: &m.report,
            });
        }
    }
    let by_link: BTreeMap<u64, tether_migrator::profile::Profile> = profiles
        .iter()
        .map(|(l, p)| (*l, p.calibration.profile.clone()))
        .collect();
    let moves = model_eval::score_reports(&refs);
    evaluate_moves(
        args,
        &refs,
        moves,
        &by_link,
        "The model: predicted (before each move, by `tether migrate` with the link's calibrated profile) vs measured",
    )
}

/// Scores, prints and plots `moves` (predictions of `refs`' moves), with the held-out check.
fn evaluate_moves(
    args: &Args,
    refs: &[model_eval::MoveRef<'_>],
    moves: Vec<model_eval::Scored>,
    by_link: &BTreeMap<u64, tether_migrator::profile::Profile>,
    title: &str,
) -> anyhow::Result<Evaluation> {
    model_eval::print_scored(title, &moves, table);
    let summary = model_eval::Summary::of("calibrated in this run", &moves);
    let train = 64;
    let held_out = model_eval::held_out(refs, train)?;
    model_eval::print_scored(
        &format!("Held out: fitted to the {train} MiB cells only, predicting the larger states"),
        &held_out,
        table,
    );
    let held_out_summary = model_eval::Summary::of(
        &format!("held out (fitted to the {train} MiB cells, predicting larger states)"),
        &held_out,
    );
    println!("\n## Model errors |predicted - measured| / measured\n");
    summary.print(0.15, 0.30);
    held_out_summary.print(0.20, f64::INFINITY);
    // The lines use the state each move measured: the nominal state plus the process's own.
    let overheads: Vec<f64> = refs
        .iter()
        .filter_map(|r| {
            let p = r.report.prediction.as_ref()?;
            Some(p.inputs.state_bytes as f64 - f64::from(r.state_mib) * 1_048_576.0)
        })
        .collect();
    let overhead = median(&overheads).max(0.0) as u64;
    let limit = tether_migrator::model::secs(
        refs.iter()
            .find_map(|r| r.report.prediction.as_ref())
            .map_or(0.3, |p| p.inputs.downtime_limit_ms / 1000.0),
    );
    std::fs::create_dir_all(&args.figures)?;
    let figures = plots::write_all(&args.figures, &moves, by_link, limit, overhead)?;
    println!();
    for f in &figures {
        println!("- figure: {}", f.display());
    }
    Ok(Evaluation {
        moves,
        summary,
        held_out,
        held_out_summary,
        figures,
    })
}

/// `--rescore`: the moves of an earlier run, re-predicted with this build's model.
fn rescore(args: &Args, path: &Path) -> anyhow::Result<()> {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("{} is not JSON", path.display()))?;
    let mut by_link = BTreeMap::new();
    for (link, p) in v["profiles"]
        .as_object()
        .context("no profiles in the run")?
    {
        let profile: tether_migrator::profile::Profile =
            serde_json::from_value(p["calibration"]["profile"].clone())
                .with_context(|| format!("the profile of link {link}"))?;
        by_link.insert(link.parse::<u64>()?, profile);
    }
    let mut owned: Vec<(u64, u32, u32, bool, Report)> = Vec::new();
    for c in v["cells"].as_array().context("no cells in the run")? {
        let n = |k: &str| c[k].as_u64().unwrap_or(0);
        let converging = model_eval::converges(n("link_mbit"), n("dirty_pages_per_sec") as u32);
        for k in ["stop_and_copy", "pre_copy"] {
            if c[k].is_null() {
                continue;
            }
            let r: Report = serde_json::from_value(c[k]["report"].clone())?;
            owned.push((
                n("link_mbit"),
                n("state_mib") as u32,
                n("dirty_pages_per_sec") as u32,
                converging,
                r,
            ));
        }
    }
    let refs: Vec<model_eval::MoveRef<'_>> = owned
        .iter()
        .map(|(l, s, d, c, r)| model_eval::MoveRef {
            link_mbit: *l,
            state_mib: *s,
            dirty_pages_per_sec: *d,
            converging: *c,
            report: r,
        })
        .collect();
    let moves = model_eval::rescore(&refs, &by_link)?;
    let eval = evaluate_moves(
        args,
        &refs,
        moves,
        &by_link,
        &format!(
            "The model re-predicting {} (its calibrated profiles, each move's measured inputs) vs measured",
            path.display()
        ),
    )?;
    std::fs::write(&args.json, serde_json::to_string_pretty(&eval)?)
        .with_context(|| format!("writing {}", args.json.display()))?;
    Ok(())
}

/// Prints a Markdown table with aligned columns: the columns listed in `left` are left-aligned
/// (text), the others right-aligned (numbers).
fn table(headers: &[&str], left: &[usize], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len().max(3)).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let cols: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if left.contains(&i) {
                    format!("{c:<width$}", width = w[i])
                } else {
                    format!("{c:>width$}", width = w[i])
                }
            })
            .collect();
        println!("| {} |", cols.join(" | "));
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    let sep: Vec<String> = w
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            if left.contains(&i) {
                format!(":{}", "-".repeat(n - 1))
            } else {
                format!("{}:", "-".repeat(n - 1))
            }
        })
        .collect();
    println!("| {} |", sep.join(" | "));
    for r in rows {
        line(r.clone());
    }
}

/// Per link and dirty rate, pre-copy's downtime against the state size, with what each part
/// adds per extra GiB of state: flat means the frozen phase does not grow with the state.
fn print_state_size_table(cells: &[Cell]) {
    let f1 = |v: f64| format!("{v:.1}");
    let mut rows = Vec::new();
    let mut keys: Vec<(u64, u32)> = cells
        .iter()
        .map(|c| (c.link_mbit, c.dirty_pages_per_sec))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    for (link, dirty) in keys {
        let mut line: Vec<(u32, &Move)> = cells
            .iter()
            .filter(|c| c.link_mbit == link && c.dirty_pages_per_sec == dirty)
            .filter_map(|c| Some((c.state_mib, c.pre_copy.as_ref()?)))
            .collect();
        if line.len() < 2 {
            continue;
        }
        line.sort_by_key(|(s, _)| *s);
        let mut prev: Option<(u32, &Move)> = None;
        for (state, m) in line {
            let per_gib = |f: &dyn Fn(&Move) -> f64| match prev {
                Some((ps, pm)) if state > ps => f1((f(m) - f(pm)) / f64::from(state - ps) * 1024.0),
                _ => "-".into(),
            };
            rows.push(vec![
                link.to_string(),
                dirty.to_string(),
                state.to_string(),
                f1(m.downtime_ms),
                format!("{:.2}x", m.downtime_over_floor),
                per_gib(&|m| m.downtime_ms),
                per_gib(&|m| m.dump_ms),
                per_gib(&|m| m.transfer_ms),
                per_gib(&|m| m.restore_ms),
            ]);
            prev = Some((state, m));
        }
    }
    if rows.is_empty() {
        return;
    }
    println!("\n## Pre-copy downtime against the state size\n");
    table(
        &[
            "link Mbit/s",
            "dirty pages/s",
            "state MiB",
            "downtime ms",
            "/floor",
            "downtime ms per extra GiB",
            "dump",
            "transfer",
            "restore",
        ],
        &[],
        &rows,
    );
    println!(
        "\nper extra GiB: the change from the next smaller state, scaled to 1 GiB; what still grows \
         with the state is CRIU's dump of all memory to tmpfs and the source's read-back of it."
    );
}

fn print_tables(args: &Args, baseline: &Baseline, cells: &[Cell]) {
    let f1 = |v: f64| format!("{v:.1}");
    let opt = |m: &Option<Move>, f: &dyn Fn(&Move) -> String| m.as_ref().map_or("-".into(), f);
    println!(
        "\n## Stop-and-copy vs pre-copy (--downtime-limit {}, {} restores), tbf-limited src-dst link\n",
        args.downtime_limit,
        if args.full_restore { "full" } else { "lazy" }
    );
    let rows: Vec<Vec<String>> = cells
        .iter()
        .map(|c| {
            let (s, p) = (&c.stop_and_copy, &c.pre_copy);
            vec![
                c.link_mbit.to_string(),
                c.state_mib.to_string(),
                c.dirty_pages_per_sec.to_string(),
                opt(s, &|m| f1(m.downtime_ms)),
                opt(s, &|m| format!("{:.1}", m.total_ms / 1e3)),
                opt(s, &|m| f1(mib(m.bytes_sent))),
                opt(p, &|m| f1(m.downtime_ms)),
                opt(p, &|m| format!("{:.1}", m.total_ms / 1e3)),
                opt(p, &|m| f1(mib(m.bytes_sent))),
                opt(p, &|m| m.rounds.to_string()),
                opt(p, &|m| format!("{:.2}", mib(m.frozen_bytes))),
                opt(p, &|m| f1(m.floor_ms)),
                ratio(c.precopy_over_stop_and_copy),
                ratio(c.precopy_over_floor),
                if c.error.is_some() {
                    "FAILED".into()
                } else {
                    "ok".into()
                },
            ]
        })
        .collect();
    table(
        &[
            "link Mbit/s",
            "state MiB",
            "dirty pages/s",
            "S&C downtime ms",
            "S&C total s",
            "S&C sent MiB",
            "pre downtime ms",
            "pre total s",
            "pre sent MiB",
            "rounds",
            "pre frozen MiB",
            "pre floor ms",
            "pre/S&C",
            "pre/floor",
            "state",
        ],
        &[14],
        &rows,
    );

    println!("\n## Where the downtime goes (every move)\n");
    let mut rows = Vec::new();
    for c in cells {
        let mut moves: Vec<&Move> = c.stop_and_copy.iter().chain(&c.pre_copy).collect();
        moves.sort_by_key(|m| m.method != c.first);
        for m in moves {
            rows.push(vec![
                c.link_mbit.to_string(),
                c.state_mib.to_string(),
                c.dirty_pages_per_sec.to_string(),
                m.method.name().into(),
                format!("{} -> {}", m.from, m.to),
                m.rounds.to_string(),
                m.stop_reason.clone().unwrap_or_else(|| "-".into()),
                f1(m.freeze_ms),
                f1(m.dump_ms),
                f1(m.transfer_ms),
                m.dst_rebuild_ms.map_or("-".into(), f1),
                f1(m.restore_ms),
                f1(m.downtime_ms),
                format!("{:.2}", mib(m.frozen_bytes)),
                f1(m.floor_ms),
                format!("{:.2}x", m.downtime_over_floor),
                format!("{:.1}", m.precopy_ms / 1e3),
                format!("{:.1}", m.total_ms / 1e3),
                f1(mib(m.bytes_sent)),
            ]);
        }
    }
    table(
        &[
            "link",
            "state",
            "dirty",
            "method",
            "move",
            "rounds",
            "stop",
            "freeze ms",
            "dump ms",
            "transfer ms",
            "rebuild ms",
            "restore ms",
            "downtime ms",
            "frozen MiB",
            "floor ms",
            "/floor",
            "pre-copy s",
            "total s",
            "sent MiB",
        ],
        &[3, 4, 6],
        &rows,
    );

    println!(
        "\nS&C: stop-and-copy; pre: pre-copy. downtime: from letting CRIU freeze to running on the destination, as the \
         source sees it. total: the whole `tether migrate`. sent: pre-copy rounds + what was sent while \
         frozen. frozen: final difference + non-memory images (sent while frozen). floor: freeze + \
         frozen bytes at the nominal link rate + the restore time of a minimal process ({:.1} ms, \
         median of {} ms for a {} MiB service that writes no memory; its whole stop-and-copy \
         downtimes were {} ms). dump includes the freeze; transfer is from the end of the dump to \
         all images at the destination (the source's comparison of the dump with what the \
         destination holds, the wire, and the destination's rebuild of CRIU's page files, shown \
         as rebuild); restore is measured on the destination.",
        baseline.median_restore_ms,
        list(&baseline.restore_ms),
        baseline.state_mib,
        list(&baseline.downtime_ms),
    );
    for c in cells {
        if let Some(e) = &c.error {
            println!(
                "\nFAILED: {} Mbit/s, {} MiB, {} pages/s: {}",
                c.link_mbit, c.state_mib, c.dirty_pages_per_sec, e
            );
        }
    }
    print_state_size_table(cells);
    println!("\n## Targets\n");
    let ts = targets(cells);
    let met = |t: &Target| match t.met {
        Some(true) => "met",
        Some(false) => "MISSED",
        None => "n/a",
    };
    if let Some(t) = ts.first().filter(|t| t.limit == 0.1) {
        println!(
            "- {}: {} (target <= {}x): {}",
            t.what,
            ratio(t.value),
            t.limit,
            met(t)
        );
    } else {
        println!("- 256 MiB at 1,000 pages/s on 1 Gbit/s: not in this grid");
    }
    let floor: Vec<&Target> = ts.iter().filter(|t| t.limit == 1.5).collect();
    let ok = floor.iter().filter(|t| t.met == Some(true)).count();
    println!(
        "- pre-copy downtime <= 1.5x the floor: met in {ok} of {} cells",
        floor.len()
    );
    for t in floor.iter().filter(|t| t.met != Some(true)) {
        println!("  - {}: {} ({})", t.what, ratio(t.value), met(t));
    }
}
