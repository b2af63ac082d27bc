//! `tether plan`, and the live prediction `tether migrate` records in its report.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use tether_migrator::model::{Params, PAGE_SIZE};
use tether_migrator::plan::{MethodPlan, Plan};
use tether_migrator::profile::{self, Profile};

use super::precopy_args::PrecopyArgs;
use super::units::{parse_duration, parse_rate};

/// Predict how long moving a running process tree takes and how long it is down, before moving
/// it.
///
/// Measures the tree's state size and dirty rate live (its pages are read and hashed twice,
/// --window apart, as `tether dirty-rate` does; the process is not stopped), and runs the
/// migration model with the host terms of the calibration profile (`tether calibrate`) and the
/// link's bandwidth, for stop-and-copy and for pre-copy with the given settings. Pre-copy's
/// rounds are decided by the same policy `tether migrate` runs.
///
/// How to read it: "downtime" is how long the service is stopped (clients behind the proxy
/// stall that long); "migration" is the whole command; "rounds" and "sent" are pre-copy's
/// passes over memory and all bytes sent. A pre-copy line that stops for NotShrinking does not
/// converge: the service dirties memory faster than the link carries it; the auto-converge line
/// then shows the CPU throttle that would make it converge.
///
/// Exit status: 0 the downtime limit is predicted to hold (with pre-copy, or stop-and-copy with
/// --stop-and-copy); 3 it is not; 1 an error.
#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// Root of the process tree (host pid).
    #[arg(
        long,
        required_unless_present = "container",
        conflicts_with = "container"
    )]
    pid: Option<i32>,
    /// A Podman container instead of --pid (name or id): its process tree. Its restore goes
    /// through Podman, which the model does not know: expect a longer downtime than predicted.
    #[arg(long, value_name = "NAME|ID")]
    container: Option<String>,
    /// The link's bandwidth to the destination, bits/s (e.g. 100M, 1G). Default: the link the
    /// profile was calibrated on.
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    bandwidth: Option<u64>,
    /// The calibration profile (host terms of the model). Default: /etc/tether/profile.toml if
    /// it exists, else the built-in terms measured on tether's development machines.
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Time between the two scans that measure the dirty rate.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    window: Duration,
    /// The migration's settings, as `tether migrate` takes them.
    #[command(flatten)]
    precopy: PrecopyArgs,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

/// What a live plan is computed from.
pub struct LiveInputs<'a> {
    /// The tree's root.
    pub pid: i32,
    /// Dirty-rate window.
    pub window: Duration,
    /// Bandwidth cap or link rate, bits/s, if given.
    pub bandwidth_bits: Option<u64>,
    /// The profile.
    pub profile: &'a Profile,
    /// The migration's settings (pre-copy's, and whether it would be stop-and-copy).
    pub precopy: &'a PrecopyArgs,
}

/// The bandwidth to plan with, bytes/s: the given rate, else the profile's calibrated link.
pub fn bandwidth(given_bits: Option<u64>, profile: &Profile) -> anyhow::Result<f64> {
    match (given_bits, profile.link_bandwidth()) {
        (Some(b), _) => Ok(b as f64 / 8.0),
        (None, Some(b)) => Ok(b),
        (None, None) => anyhow::bail!(
            "no link bandwidth to plan with: give --bandwidth (e.g. 100M), or calibrate the \
             host pair with `tether calibrate --bandwidth ...`, whose profile records it"
        ),
    }
}

/// Measures the tree and predicts both methods.
pub fn live_plan(i: &LiveInputs<'_>) -> anyhow::Result<Plan> {
    let bw = bandwidth(i.bandwidth_bits, i.profile)?;
    let rate = tether_migrator::procmem::measure_dirty_rate(i.pid, i.window)
        .with_context(|| format!("measuring the state and dirty rate of pid {}", i.pid))?;
    let sockets = tether_migrator::procmem::tree_sockets(i.pid)
        .with_context(|| format!("counting the sockets of pid {}", i.pid))?;
    let params = Params {
        costs: i.profile.costs(),
        sockets,
        ..Params::new(rate.pages_scanned * PAGE_SIZE, rate.pages_per_sec, bw)
    };
    Ok(Plan::new(
        &params,
        &i.precopy.precopy().policy(i.profile.costs()),
        i.precopy.stop_and_copy,
        &i.profile.source,
    )?)
}

/// Loads the profile named, or the default one.
pub fn load_profile(path: Option<&Path>) -> anyhow::Result<Profile> {
    Profile::resolve(path).with_context(|| {
        format!(
            "loading the calibration profile (default {}, written by `tether calibrate`)",
            profile::DEFAULT_PATH
        )
    })
}

/// Runs `tether plan`.
pub fn run(a: PlanArgs) -> anyhow::Result<ExitCode> {
    let profile = load_profile(a.profile.as_deref())?;
    let pid = match (&a.container, a.pid) {
        (Some(name), _) => super::container_pid(name)?,
        (None, Some(pid)) => pid,
        (None, None) => anyhow::bail!("--pid or --container is required"),
    };
    let plan = live_plan(&LiveInputs {
        pid,
        window: a.window,
        bandwidth_bits: a.bandwidth,
        profile: &profile,
        precopy: &a.precopy,
    })?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
    } else {
        print!("{}", render(pid, &plan));
    }
    Ok(if plan.limit_holds {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// The plan as a table.
pub fn render(pid: i32, p: &Plan) -> String {
    let i = &p.inputs;
    let mib = |b: u64| b as f64 / 1_048_576.0;
    let mut out = format!(
        "pid {pid}: state {:.1} MiB, dirtying {:.0} pages/s ({:.1} MB/s), {} socket(s); link \
         {:.0} Mbit/s; downtime limit {:.0} ms\nhost terms: {}\n\n",
        mib(i.state_bytes),
        i.dirty_rate,
        i.dirty_rate * PAGE_SIZE as f64 / 1e6,
        i.sockets,
        i.bandwidth * 8.0 / 1e6,
        i.downtime_limit_ms,
        i.profile
    );
    out += &format!(
        "{:<26} {:>6} {:>10} {:>12} {:>12}  {}\n",
        "method", "rounds", "sent MiB", "migration", "downtime", "within limit"
    );
    let line = |name: &str, m: &MethodPlan| {
        let verdict = match (&m.stop_reason, m.within_limit) {
            (Some(r), true) => format!("yes ({r})"),
            (Some(r), false) => format!("no ({r})"),
            (None, ok) => (if ok { "yes" } else { "no" }).to_string(),
        };
        let throttle = m
            .max_throttle
            .map(|t| format!(", CPU throttle up to {t}%"))
            .unwrap_or_default();
        format!(
            "{name:<26} {:>6} {:>10.1} {:>10.2} s {:>9.0} ms  {verdict}{throttle}\n",
            m.rounds,
            mib(m.bytes_sent),
            m.total_ms / 1000.0,
            m.downtime_ms
        )
    };
    out += &line("stop-and-copy", &p.stop_and_copy);
    let name = if i.auto_converge {
        "pre-copy (auto-converge)"
    } else {
        "pre-copy"
    };
    out += &line(name, &p.pre_copy);
    if let Some(ac) = &p.with_auto_converge {
        out += &line("pre-copy + auto-converge", ac);
    }
    if p.frozen_cost_ms > i.downtime_limit_ms {
        out += &format!(
            "\nThe frozen phase alone is predicted to take {:.0} ms (dump and restore of this state \
             with nothing left to send): no pre-copy setting meets a lower limit.\n",
            p.frozen_cost_ms
        );
    }
    out += if p.limit_holds {
        "\nThe downtime limit is predicted to hold.\n"
    } else {
        "\nThe downtime limit is predicted NOT to hold.\n"
    };
    out
}
