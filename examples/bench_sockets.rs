//! How the frozen phase grows with the service's connections: the example service (16 MiB of
//! state) holding N idle TCP connections, half through tether-proxy and half direct, plus N/10
//! QUIC connections, moves src -> dst -> src; for each N it prints the downtime, CRIU's dump and
//! the destination's restore, the proxy's pause (quiesce and hold) and the socket count the
//! service really held, then fits the time per socket of dump + restore (least squares over
//! all moves against a baseline of the smallest N measured in the same run) for the model's
//! `frozen_per_socket_ms`.
//!
//! Run as root after `scripts/setup.sh`: `cargo run --release --example bench_sockets --
//! [--counts 100,1000,10000]` (or `scripts/bench-sockets.sh`).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use tether::scenario::{Binaries, Scenario, ScenarioConfig};
use tether::testbed::{require_prerequisites, Host};

/// Frozen-phase cost against the number of the service's sockets.
#[derive(Debug, Parser)]
struct Args {
    /// Idle TCP connections of the service, per point (half through the proxy, half direct).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    counts: Vec<u32>,
    /// Moves per point (alternating).
    #[arg(long, default_value_t = 2)]
    moves: u32,
    /// Also write the points as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
struct Point {
    connections: u32,
    quic: u32,
    sockets: u64,
    downtime_ms: f64,
    dump_ms: f64,
    restore_ms: f64,
    quiesce_ms: f64,
    held_ms: f64,
    paused_tcp_flows: u64,
}

/// Sockets the process `pid` holds (its `/proc/PID/fd` entries that are sockets).
fn sockets_of(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
                })
                .count() as u64
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Err(missing) = require_prerequisites() {
        bail!("this machine cannot run the benchmark:\n{missing}\nRun scripts/setup.sh as root.");
    }
    let bins = Binaries::for_this_example()?;
    println!(
        "| connections | QUIC | service sockets | move | downtime ms | dump ms | restore ms | \
         pause quiesce ms | proxy hold ms | TCP flows paused |"
    );
    println!("| ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut points = Vec::new();
    for &n in &a.counts {
        let cfg = ScenarioConfig {
            proxy: true,
            state_mb: 16,
            dirty_pages_per_sec: 100,
            ..Default::default()
        };
        let mut s = Scenario::start(bins.clone(), &cfg)?;
        let half = n / 2;
        let quic = n / 10;
        let idle_p = half.to_string();
        let idle_d = (n - half).to_string();
        // Open everything (10k connects take seconds in a debug build), move, then check each
        // connection once more at the end of the run.
        let open = Duration::from_millis(3000 + u64::from(n));
        let run_for = open + Duration::from_secs(8) * a.moves;
        let proxied = s.start_clients_to(
            s.proxy_addr(),
            2,
            quic / 2,
            run_for,
            None,
            &["--idle", &idle_p, "--interval-ms", "100"],
        )?;
        let direct = s.start_clients_to(
            s.service_addr(),
            2,
            quic - quic / 2,
            run_for,
            None,
            &["--idle", &idle_d, "--interval-ms", "100"],
        )?;
        let t0 = Instant::now();
        let want = u64::from(n) + 4;
        while sockets_of(s.pid()) < want && t0.elapsed() < open {
            std::thread::sleep(Duration::from_millis(100));
        }
        let sockets = sockets_of(s.pid());
        if sockets < want {
            eprintln!("only {sockets} of {want} connections opened within {open:?}");
        }
        for _ in 0..a.moves {
            let from = s.location();
            let to = if from == Host::Src {
                Host::Dst
            } else {
                Host::Src
            };
            let args = s.proxy_args();
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let run = s.migrate_with(to, None, &args)?;
            if !run.success {
                bail!("{n} connections, {from} -> {to}: {}", run.stderr.trim());
            }
            let r = run.report.context("no report")?;
            let px = r.proxy.clone().unwrap_or_default();
            let p = Point {
                connections: n,
                quic,
                sockets,
                downtime_ms: r.timings.downtime_ms,
                dump_ms: r.timings.dump_ms,
                restore_ms: r.timings.restore_ms,
                quiesce_ms: px.quiesce_ms,
                held_ms: px.held_ms,
                paused_tcp_flows: px.tcp_flows,
            };
            println!(
                "| {} | {} | {} | {from} -> {to} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
                p.connections,
                p.quic,
                p.sockets,
                p.downtime_ms,
                p.dump_ms,
                p.restore_ms,
                p.quiesce_ms,
                p.held_ms,
                p.paused_tcp_flows
            );
            points.push(p);
            std::thread::sleep(Duration::from_millis(500));
        }
        let pr = proxied.finish()?;
        let dr = direct.finish()?;
        for (what, r) in [("proxied", &pr), ("direct", &dr)] {
            // Every connection that opened must have survived the moves; QUIC handshakes that
            // timed out while thousands of connections opened at once are reported, not fatal.
            let setup = r
                .errors
                .iter()
                .filter(|e| e.contains("connection setup failed"))
                .count();
            if r.idle.ok_connections != r.idle.connections
                || r.idle.resets + r.tcp.resets + r.quic.resets > 0
                || r.errors.len() > setup
            {
                bail!(
                    "{n} connections: {what} clients saw errors (idle {} ok of {}): {:?}",
                    r.idle.ok_connections,
                    r.idle.connections,
                    r.errors
                );
            }
            if r.quic.errors > 0 {
                println!(
                    "({n} connections, {what}: {} of {} QUIC connections could not be set up \
                     while the others opened; those that were moved, were moved intact)",
                    r.quic.errors, r.quic.connections
                );
            }
        }
    }
    // Least squares of (dump + restore) against sockets.
    let xs: Vec<f64> = points.iter().map(|p| p.sockets as f64).collect();
    let ys: Vec<f64> = points.iter().map(|p| p.dump_ms + p.restore_ms).collect();
    let n = xs.len() as f64;
    if n >= 2.0 {
        let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
        let sxy: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
        let sxx: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
        if sxx > 0.0 {
            let k = sxy / sxx;
            println!(
                "\ndump + restore grow by {:.4} ms per socket (least squares over {} moves; \
                 intercept {:.1} ms): frozen_per_socket_ms = {:.4}",
                k,
                xs.len(),
                my - k * mx,
                k
            );
        }
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)?)?;
    }
    Ok(())
}
