//! `tether migrate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tether_migrator::driver::source::{self, MigrateOptions, MigrationError};
use tether_migrator::gate::ProxyOptions;
use tether_migrator::protocol::ServiceAddr;
use tether_migrator::report::{Outcome, Report};

use super::units::{parse_duration, parse_rate};

/// Move a running process tree or Podman container (and its TCP connections) to another host's
/// agent.
///
/// By default memory is pre-copied while the service runs: round 0 sends every page, later
/// rounds the pages whose content changed, until the predicted downtime is under
/// --downtime-limit (or rounds stop shrinking, or --max-rounds). Then the tree is dumped with
/// CRIU (`--tcp-established`, nftables network lock) and held frozen while the rest goes over;
/// the destination restores it stopped and unreachable.
///
/// The commit: once the destination reports its stopped copy, CRIU ends the frozen copy here
/// (its connections stay locked), and only then is the destination told to let its copy run;
/// the proxy resumes once it confirms. Any failure before that point rolls back: the frozen
/// copy is thawed and runs on, its clients intact. If `tether migrate` dies, CRIU thaws the
/// copy (before the commit point) or has ended it (after); the next `tether migrate`, or
/// `tether migrate --recover`, finishes what was left from the journal in --state-dir.
///
/// The agent is authenticated by its certificate, which must chain to the trust bundle of
/// --certs and carry the agent's name: --agent-name, or the name agents.toml in --certs gives
/// for --to. `--recover` uses the name journaled with each migration.
///
/// Exit status: 0 committed; 1 not committed (the message says which side failed, in which
/// phase, and where the service runs); 2 in doubt or no copy runs (the message says what to do).
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Root of the process tree to migrate (host pid).
    #[arg(long, required_unless_present_any = ["recover", "container"], conflicts_with = "container")]
    pid: Option<i32>,
    /// A Podman container to migrate (name or id; rootful Podman), instead of --pid. The
    /// destination agent creates it again with the same name, image and configuration (from the
    /// command line Podman recorded for it) and Podman restores it there, so that `podman ps`,
    /// `logs` and `stop` manage it as before; the source's container is removed only once the
    /// move is committed. It needs a network of its own whose address exists on both hosts'
    /// LAN (a macvlan network of the same name and subnet on both, and a static `--ip`; a
    /// static `--mac-address` moves too), the image on the destination (nothing is pulled),
    /// and its bind-mount sources there (else it is refused before anything stops). Without a
    /// terminal (-t). Its memory is restored whole (no lazy restore).
    #[arg(long, value_name = "NAME|ID")]
    container: Option<String>,
    /// The destination agent.
    #[arg(long, value_name = "ADDR:PORT", required_unless_present = "recover")]
    to: Option<SocketAddr>,
    /// This host's certificate directory (from `tether certs`).
    #[arg(long, value_name = "DIR", required_unless_present = "recover")]
    certs: Option<PathBuf>,
    /// The service's address, which moves with it.
    #[arg(long, value_name = "IP/PREFIX", required_unless_present = "recover")]
    service_addr: Option<ServiceAddr>,
    /// The name the agent's certificates were issued for (`tether certs --name`): its
    /// certificate must carry it. Required, unless --certs DIR holds agents.toml naming the
    /// --to address, e.g. `"10.78.0.3:7700" = "edge2"` (or `"10.78.0.3" = "edge2"` for any
    /// port); without either, nothing is started.
    #[arg(long, value_name = "NAME")]
    agent_name: Option<String>,
    /// Only resolve migrations an earlier `tether migrate` left unfinished (it was killed, or
    /// could not reach the agent after the commit point), from the journal in --state-dir, and
    /// exit.
    #[arg(long, conflicts_with_all = ["pid", "container", "to", "service_addr"])]
    recover: bool,
    /// Write the JSON report here (it is also printed on success with --json).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print the JSON report to stdout.
    #[arg(long)]
    json: bool,
    /// Where the dump is written, one directory per migration (removed afterwards): a tmpfs
    /// directory. If it exists it must be a real directory owned by root with mode 0700, in
    /// parents only root can change.
    #[arg(long, value_name = "DIR", default_value = "/run/tether/migrate/images")]
    work_dir: PathBuf,
    /// Where migrations in flight are journaled, so that a crash can be resolved (same checks
    /// as --work-dir).
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/run/tether/migrate/journal"
    )]
    state_dir: PathBuf,
    /// The longest the service may stay frozen (from CRIU's freeze to the destination's restore
    /// report) before the migration rolls back. With --proxy it must be below the proxy's
    /// max_hold_ms by 500 ms (checked before anything starts).
    #[arg(long, value_parser = parse_duration, default_value = "4s", value_name = "DURATION")]
    max_frozen: Duration,
    /// CRIU log level (0-4).
    #[arg(long, default_value_t = 2)]
    criu_log_level: i32,
    #[command(flatten)]
    precopy: super::precopy_args::PrecopyArgs,
    /// Control socket of the tether-proxy in front of the service: it is paused right before the
    /// freeze (no byte in flight toward the service) and resumed once the destination confirms
    /// that the service runs there (or, on a rollback, once the thawed service runs here), so
    /// clients stall for the downtime only. Needs --service.
    #[arg(long, value_name = "SOCKET", requires = "service")]
    proxy: Option<PathBuf>,
    /// The service's name in the proxy's configuration.
    #[arg(long, value_name = "NAME", requires = "proxy")]
    service: Option<String>,
    /// Where the proxy sends new connections and UDP flows after the move (default: unchanged,
    /// the service keeps its address).
    #[arg(long, value_name = "ADDR:PORT", requires = "proxy")]
    proxy_redirect: Option<SocketAddr>,
    /// How long the proxy may take to quiesce the service's flows.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pause_timeout: Duration,
    /// Cap the transfer rate, bits/s (e.g. 100M, 1G).
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    bandwidth: Option<u64>,
    /// The calibration profile: the host terms of the migration model, with which the pre-copy
    /// policy predicts the frozen phase and the report's prediction is made. Default:
    /// /etc/tether/profile.toml if it exists, else the built-in terms (see `tether calibrate`).
    #[arg(long, value_name = "FILE")]
    profile: Option<PathBuf>,
    /// Before starting, measure the service's state size and dirty rate over this window and
    /// record the model's prediction in the report, scored against what happened (as `tether
    /// plan` does; it needs --bandwidth or a profile that records the link). 0 skips it.
    #[arg(long, value_parser = parse_duration, default_value = "500ms", value_name = "DURATION")]
    predict_window: Duration,
}

/// Runs `tether migrate`.
pub async fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let write = |report: &Report| -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(report)?;
        if let Some(path) = &a.report {
            std::fs::write(path, &text)?;
        }
        if a.json {
            println!("{text}");
        }
        Ok(())
    };
    if a.recover {
        let results = source::recover(&a.state_dir).await?;
        if results.is_empty() {
            eprintln!(
                "tether: nothing to recover in {}: no migration was left unfinished",
                a.state_dir.display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        // 0 when every migration was resolved to a running service, wherever it runs.
        let mut code = ExitCode::SUCCESS;
        for (id, r) in results {
            match r {
                Ok(report) => {
                    write(&report)?;
                    eprintln!(
                        "tether: migration {id} resolved: committed. The service runs on {} (pid \
                         {}); the source's address, lock table and image set are removed.",
                        report.destination,
                        report.destination_pid.unwrap_or(-1)
                    );
                }
                Err(e) if e.outcome.service_runs() => {
                    if let Some(report) = &e.report {
                        write(report)?;
                    }
                    eprintln!("tether: migration {id} resolved: {}", e.state);
                    eprintln!("tether:   it had failed: {}", e.failure);
                }
                Err(e) => code = report_failure(&id.to_string(), &e, &write)?,
            }
        }
        return Ok(code);
    }
    let (Some(to), Some(certs), Some(service_addr)) = (a.to, a.certs.clone(), a.service_addr)
    else {
        anyhow::bail!("--pid or --container, --to, --certs and --service-addr are required");
    };
    let pid = match (&a.container, a.pid) {
        (Some(name), _) => super::container_pid(name)?,
        (None, Some(pid)) => pid,
        (None, None) => anyhow::bail!("--pid or --container is required"),
    };
    let profile = super::plan::load_profile(a.profile.as_deref())?;
    let precopy = a.precopy.options();
    // Two scans and a sleep: off the runtime's worker (the runtime is multi-threaded).
    let prediction = tokio::task::block_in_place(|| predict(&a, pid, &profile));
    let opts = MigrateOptions {
        pid,
        container: a.container.clone(),
        to,
        agent_name: a.agent_name.clone(),
        certs,
        service_addr,
        work_dir: a.work_dir.clone(),
        state_dir: a.state_dir.clone(),
        criu_log_level: a.criu_log_level,
        max_frozen: a.max_frozen,
        precopy,
        bandwidth: a.bandwidth,
        costs: profile.costs(),
        prediction,
        proxy: match (a.proxy.clone(), a.service.clone()) {
            (Some(socket), Some(service)) => Some(ProxyOptions {
                socket,
                service,
                redirect: a.proxy_redirect,
                pause_timeout: a.pause_timeout,
            }),
            _ => None,
        },
    };
    match source::migrate(&opts, super::shutdown_signal()).await {
        Ok(report) => {
            write(&report)?;
            let rounds = report.precopy.rounds.len();
            let fin = report
                .precopy
                .final_difference
                .as_ref()
                .map_or(0, |f| f.pages_sent);
            eprintln!(
                "tether: migrated {} to {}: downtime {:.1} ms (commit {:.1} ms), total {:.1} ms, {} pre-copy round(s), final difference {} pages, {} bytes sent while frozen",
                match &report.container {
                    Some(c) => format!("container {c} (pid {})", report.source_pid),
                    None => format!("pid {}", report.source_pid),
                },
                report.destination,
                report.timings.downtime_ms,
                report.timings.commit_ms,
                report.timings.total_ms,
                rounds,
                fin,
                report.images.total_bytes
            );
            let m = &report.memory;
            let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
            eprintln!(
                "tether: memory beyond the service: source {:.1} MiB (CRIU's dump {:.1}, tether \
                 {:.1}, CRIU {:.1} at their peaks), destination {}",
                mib(m.source_dump_bytes + m.source_tether_rss_bytes + m.source_criu_rss_bytes),
                mib(m.source_dump_bytes),
                mib(m.source_tether_rss_bytes),
                mib(m.source_criu_rss_bytes),
                m.destination_held_bytes
                    .map_or("not reported".to_string(), |b| format!(
                        "{:.1} MiB held before the restore",
                        mib(b)
                    ))
            );
            if let (Some(a), Some(p)) = (report.timings.answered_ms, &report.proxy) {
                let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
                eprintln!(
                    "tether: the service answered through the proxy {a:.1} ms after the freeze \
                     (first answer after the resume: TCP {}, UDP {})",
                    ms(p.first_tcp_answer_ms),
                    ms(p.first_udp_answer_ms)
                );
            }
            if let (Some(m), Some(e)) = (report.predicted_method(), &report.prediction_error) {
                eprintln!(
                    "tether: predicted downtime {:.1} ms ({:+.0}%), total {:.1} ms ({:+.0}%), {} round(s)",
                    m.downtime_ms,
                    e.downtime.unwrap_or(0.0) * 100.0,
                    m.total_ms,
                    e.total.unwrap_or(0.0) * 100.0,
                    m.rounds
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let id = e
                .report
                .as_ref()
                .map_or_else(|| "-".to_string(), |r| r.migration_id.clone());
            report_failure(&id, &e, &write)
        }
    }
}

/// The model's prediction for this migration, measured live (`None`, with a note, when it
/// cannot be made: nothing depends on it).
fn predict(
    a: &MigrateArgs,
    pid: i32,
    profile: &tether_migrator::profile::Profile,
) -> Option<tether_migrator::plan::Plan> {
    if a.predict_window.is_zero() {
        return None;
    }
    let inputs = super::plan::LiveInputs {
        pid,
        window: a.predict_window,
        bandwidth_bits: a.bandwidth,
        profile,
        precopy: &a.precopy,
    };
    match super::plan::live_plan(&inputs) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::info!("no prediction for the report: {e:#}");
            None
        }
    }
}

fn report_failure(
    id: &str,
    e: &MigrationError,
    write: &dyn Fn(&Report) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    if let Some(report) = &e.report {
        write(report)?;
    }
    eprintln!("tether: migration {id} failed: {e}");
    let mut cause = std::error::Error::source(&e.failure);
    while let Some(c) = cause {
        eprintln!("tether:   caused by: {c}");
        cause = c.source();
    }
    if e.retry_safe {
        eprintln!("tether: retrying is safe.");
    }
    Ok(match e.outcome {
        Outcome::InDoubt | Outcome::Failed => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    })
}
