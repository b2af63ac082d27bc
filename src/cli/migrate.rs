//! `tether migrate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tether_migrator::hostnet::ServiceAddr;
use tether_migrator::migrate::{self, MigrateOptions, PrecopyOptions, ProxyOptions};

use super::units::{parse_duration, parse_rate};

/// Move a running process tree (and its TCP connections) to another host's agent.
///
/// By default memory is pre-copied while the service runs: round 0 sends every page, later
/// rounds the pages whose content changed, until the predicted downtime is under
/// --downtime-limit (or rounds stop shrinking, or --max-rounds). Then the tree is dumped with CRIU (`--tcp-established`, nftables network lock) and kept frozen
/// until the destination has restored it; then it is killed and the service address removed here.
/// If anything fails before that, the migration is rolled back and the service keeps running
/// here. Exit status: 0 committed, 1 failed (the message says where and in what state the service
/// is).
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// Root of the process tree to migrate (host pid).
    #[arg(long)]
    pid: i32,
    /// The destination agent.
    #[arg(long, value_name = "ADDR:PORT")]
    to: SocketAddr,
    /// This host's certificate directory (from `tether certs`).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
    /// The service's address, which moves with it.
    #[arg(long, value_name = "IP/PREFIX")]
    service_addr: ServiceAddr,
    /// The name the agent's certificate must carry (default: any host of the CA).
    #[arg(long, value_name = "NAME")]
    agent_name: Option<String>,
    /// Write the JSON report here (it is also printed on success with --json).
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// Print the JSON report to stdout.
    #[arg(long)]
    json: bool,
    /// Where the dump is written; use tmpfs (mode 0700, removed afterwards).
    #[arg(long, value_name = "DIR", default_value = "/dev/shm")]
    work_dir: PathBuf,
    /// Seconds to wait for the destination's restore.
    #[arg(long, default_value_t = 120)]
    restore_timeout: u64,
    /// CRIU log level (0-4).
    #[arg(long, default_value_t = 2)]
    criu_log_level: i32,
    /// Send all memory while frozen (no pre-copy rounds).
    #[arg(long)]
    stop_and_copy: bool,
    /// Pre-copy until the predicted downtime is at most this (e.g. 300ms, 1s).
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    downtime_limit: Duration,
    /// Most pre-copy rounds (round 0, the full copy, included).
    #[arg(long, default_value_t = 10)]
    max_rounds: u32,
    /// Throttle the service's CPU (cgroup quota, stepped up each round) when it dirties memory
    /// faster than the link carries it; released before the final dump.
    #[arg(long)]
    auto_converge: bool,
    /// Auto-converge: the first CPU cut, percent of the service's CPU use.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_initial: u8,
    /// Auto-converge: added to the cut at each further round, percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    throttle_increment: u8,
    /// Control socket of the tether-proxy in front of the service: it is paused right before the
    /// freeze (no byte in flight toward the service) and resumed right after the commit, so
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
}

/// Runs `tether migrate`.
pub async fn run(a: MigrateArgs) -> anyhow::Result<ExitCode> {
    let opts = MigrateOptions {
        pid: a.pid,
        to: a.to,
        agent_name: a.agent_name,
        certs: a.certs,
        service_addr: a.service_addr,
        work_dir: a.work_dir,
        criu_log_level: a.criu_log_level,
        restore_timeout: Duration::from_secs(a.restore_timeout),
        precopy: (!a.stop_and_copy).then_some(PrecopyOptions {
            downtime_limit: a.downtime_limit,
            max_rounds: a.max_rounds,
            auto_converge: a.auto_converge,
            throttle_steps: (a.throttle_initial, a.throttle_increment),
        }),
        bandwidth: a.bandwidth,
        proxy: match (a.proxy, a.service) {
            (Some(socket), Some(service)) => Some(ProxyOptions {
                socket,
                service,
                redirect: a.proxy_redirect,
                pause_timeout: a.pause_timeout,
            }),
            _ => None,
        },
    };
    let write = |report: &tether_migrator::report::Report| -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(report)?;
        if let Some(path) = &a.report {
            std::fs::write(path, &text)?;
        }
        if a.json {
            println!("{text}");
        }
        Ok(())
    };
    match migrate::migrate(&opts, super::shutdown_signal()).await {
        Ok(report) => {
            write(&report)?;
            let rounds = report.precopy.rounds.len();
            let fin = report
                .precopy
                .final_difference
                .as_ref()
                .map_or(0, |f| f.pages_sent);
            eprintln!(
                "tether: migrated pid {} to {}: downtime {:.1} ms, total {:.1} ms, {} pre-copy round(s), final difference {} pages, {} bytes sent while frozen",
                report.source_pid,
                report.destination,
                report.timings.downtime_ms,
                report.timings.total_ms,
                rounds,
                fin,
                report.images.total_bytes
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            if let Some(report) = &e.report {
                write(report)?;
            }
            eprintln!("tether: migration failed: {e}");
            if e.retry_safe {
                eprintln!("tether: retrying is safe.");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
