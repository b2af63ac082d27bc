//! The seamless-handover demo: a stateful service with live TCP and QUIC clients is moved
//! src -> dst -> src with CRIU (iterative pre-copy, then a short stop-and-copy) while the clients
//! verify every reply. One set of clients goes through tether-proxy, which pauses the flows
//! before the freeze and releases them once the destination confirms that the service runs
//! there; another talks to the service directly, for comparison. Prints one row per move.
//!
//! Run as root after `scripts/setup.sh` (the README's `scripts/demo.sh` does both):
//! `cargo run --release --example demo -- [--state-mb N] [--dirty-pages-per-sec R] ...`

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use tether::scenario::{Binaries, Scenario, ScenarioConfig};
use tether::testbed::{require_prerequisites, Host};

/// Live-migrate the example service src -> dst -> src with TCP and QUIC clients running.
#[derive(Debug, Parser)]
struct Args {
    /// Memory state of the service, MiB.
    #[arg(long, default_value_t = 64)]
    state_mb: u32,
    /// Pages the service rewrites per second.
    #[arg(long, default_value_t = 1000)]
    dirty_pages_per_sec: u32,
    /// TCP client connections.
    #[arg(long, default_value_t = 16)]
    tcp: u32,
    /// QUIC client connections.
    #[arg(long, default_value_t = 4)]
    quic: u32,
    /// Rate of the src-dst link in Mbit/s (tbf); 0 for unlimited.
    #[arg(long, default_value_t = 1000)]
    link_mbit: u64,
    /// Number of moves (alternating src -> dst -> src ..., each from where the service runs: a
    /// failed move leaves it where it was, and the next one starts from there).
    #[arg(long, default_value_t = 2)]
    moves: u32,
    /// Send all memory while frozen instead of pre-copying.
    #[arg(long)]
    stop_and_copy: bool,
    /// The calibration profile `tether plan` and `tether migrate` use (default: theirs).
    #[arg(long, value_name = "FILE")]
    profile: Option<std::path::PathBuf>,
    /// Do not run `tether plan` before each move.
    #[arg(long)]
    no_plan: bool,
    /// Run the service as a Podman container (on two Podman hosts) and move it with
    /// `tether migrate --container`.
    #[arg(long)]
    container: bool,
}

/// Runs `tether plan` on the service and returns its predicted downtime (ms) for the method the
/// demo uses, printing the plan.
fn plan(tether: &std::path::Path, pid: u32, args: &Args) -> anyhow::Result<f64> {
    let mut cmd = std::process::Command::new(tether);
    cmd.args(["plan", "--json", "--pid", &pid.to_string()]);
    if args.link_mbit > 0 {
        cmd.args(["--bandwidth", &format!("{}M", args.link_mbit)]);
    } else {
        // An unlimited veth pair: as fast as 10 Gbit/s for the model's purposes.
        cmd.args(["--bandwidth", "10G"]);
    }
    if let Some(p) = &args.profile {
        cmd.arg("--profile").arg(p);
    }
    let out = cmd.output()?;
    // Exit 3: the limit is predicted not to hold; the plan is printed all the same.
    if !(out.status.success() || out.status.code() == Some(3)) {
        bail!(
            "tether plan failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let plan: tether_migrator::plan::Plan = serde_json::from_slice(&out.stdout)?;
    let m = if args.stop_and_copy {
        &plan.stop_and_copy
    } else {
        &plan.pre_copy
    };
    println!(
        "  tether plan: state {:.1} MiB, {:.0} pages/s -> predicted downtime {:.0} ms, migration {:.2} s, {} round(s)",
        plan.inputs.state_bytes as f64 / 1_048_576.0,
        plan.inputs.dirty_rate,
        m.downtime_ms,
        m.total_ms / 1e3,
        m.rounds
    );
    Ok(m.downtime_ms)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(missing) = require_prerequisites() {
        bail!("this machine cannot run the demo:\n{missing}\nRun scripts/setup.sh as root.");
    }
    let bins = Binaries::for_this_example()?;
    let tether_bin = bins.tether.clone();
    let cfg = ScenarioConfig {
        link_rate: (args.link_mbit > 0).then_some(args.link_mbit * 1_000_000),
        state_mb: args.state_mb,
        dirty_pages_per_sec: args.dirty_pages_per_sec,
        proxy: true,
        full_restore_on: Vec::new(),
        proxy_max_hold_ms: None,
        hot_first_mib: None,
        interpreted: false,
        container: args.container,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
    };
    println!(
        "tether demo: {} with {} MiB state rewriting {} pages/s, {} TCP + {} QUIC clients through tether-proxy and as many direct, src-dst link {}",
        if args.container { "a Podman container (the service)" } else { "service" },
        cfg.state_mb,
        cfg.dirty_pages_per_sec,
        args.tcp,
        args.quic,
        if args.link_mbit > 0 { format!("{} Mbit/s", args.link_mbit) } else { "unlimited".into() }
    );
    let mut s = Scenario::start(bins, &cfg)?;
    println!(
        "hosts: client {}, proxy {}, src {}, dst {}; service {} (pid {} on src), via proxy {}\n",
        s.topo.lan_addr(Host::Client),
        s.topo.lan_addr(Host::Proxy),
        s.topo.lan_addr(Host::Src),
        s.topo.lan_addr(Host::Dst),
        s.service_addr(),
        s.pid(),
        s.proxy_addr()
    );
    println!(
        "{:<11} {:>6} {:>9} {:>8} {:>9} {:>8} {:>10} {:>9} {:>8} {:>9} {:>11} {:>11} {:>11} {:>11} {:>6} {:>6}",
        "move", "rounds", "precopy", "final", "downtime", "dump", "transfer", "restore", "commit", "answered", "proxy tcp", "proxy quic", "direct tcp", "direct quic", "errors", "state"
    );
    println!(
        "{:<11} {:>6} {:>9} {:>8} {:>9} {:>8} {:>10} {:>9} {:>8} {:>9} {:>11} {:>11} {:>11} {:>11} {:>6} {:>6}",
        "", "", "MiB", "MiB", "ms", "ms", "ms", "ms", "ms", "ms", "stall ms", "stall ms", "stall ms", "stall ms", "", ""
    );
    let mut failures = 0;
    let via_proxy = s.proxy_addr();
    let service = s.service_addr();
    for _ in 0..args.moves {
        // From wherever the service runs now: after a failed move that is where it was.
        let from = s.location();
        let to = if from == Host::Src {
            Host::Dst
        } else {
            Host::Src
        };
        let predicted = if args.no_plan {
            None
        } else {
            match plan(&tether_bin, s.pid(), &args) {
                Ok(d) => Some(d),
                Err(e) => {
                    println!("  tether plan: {e:#}");
                    None
                }
            }
        };
        let secs = Duration::from_secs(8);
        let proxied = s.start_clients_to(via_proxy, args.tcp, args.quic, secs, None, &[])?;
        let direct = s.start_clients_to(service, args.tcp, args.quic, secs, None, &[])?;
        std::thread::sleep(Duration::from_millis(1500));
        let mut extra = s.proxy_args();
        if args.stop_and_copy {
            extra.push("--stop-and-copy".into());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let run = s.migrate_with(to, None, &extra)?;
        let p = proxied.finish()?;
        let d = direct.finish()?;
        let report = match (run.success, run.report) {
            (true, Some(r)) => r,
            _ => {
                println!("{from} -> {to}: FAILED: {}", run.stderr.trim());
                failures += 1;
                match s.relocate() {
                    Ok((host, pid)) => println!(
                        "  the service runs on {host} (pid {pid}); the next move starts from there"
                    ),
                    Err(e) => {
                        println!("  cannot tell where the service runs ({e:#}); no more moves");
                        break;
                    }
                }
                continue;
            }
        };
        let state = match s.verify_state() {
            Ok(_) => "ok",
            Err(_) => {
                failures += 1;
                "BAD"
            }
        };
        let errors: u64 = [&p.tcp, &p.quic, &d.tcp, &d.quic]
            .iter()
            .map(|x| x.errors + x.resets)
            .sum();
        if errors > 0 || !p.ok || !d.ok {
            failures += 1;
        }
        let mib = |b: f64| b / (1 << 20) as f64;
        let pre: u64 = report.precopy.rounds.iter().map(|r| r.bytes).sum();
        let fin = report
            .precopy
            .final_difference
            .as_ref()
            .map_or(0, |f| f.bytes);
        let t = &report.timings;
        println!(
            "{:<11} {:>6} {:>9.1} {:>8.2} {:>9.1} {:>8.1} {:>10.1} {:>9.1} {:>8.1} {:>9} {:>11.1} {:>11.1} {:>11.1} {:>11.1} {:>6} {:>6}",
            format!("{from} -> {to}"),
            report.precopy.rounds.len(),
            mib(pre as f64),
            mib(fin as f64),
            t.downtime_ms,
            t.dump_ms,
            t.transfer_ms,
            t.restore_ms,
            t.commit_ms,
            t.answered_ms.map_or("-".to_string(), |a| format!("{a:.1}")),
            p.tcp.max_stall_ms,
            p.quic.max_stall_ms,
            d.tcp.max_stall_ms,
            d.quic.max_stall_ms,
            errors,
            state
        );
        if let Some(pd) = predicted {
            println!(
                "  predicted downtime {pd:.0} ms, measured {:.0} ms: error {:+.1}%",
                t.downtime_ms,
                (pd - t.downtime_ms) / t.downtime_ms * 100.0
            );
        }
        for e in p.errors.iter().chain(&d.errors) {
            println!("    client: {e}");
        }
    }
    println!(
        "\nprecopy: bytes sent while the service ran; final: bytes sent while it was frozen; downtime: \
         from letting CRIU freeze the service to the destination's confirmation that it runs there, as seen by the source; \
         restore: the destination's restore (left stopped); commit: from its report to that confirmation (the source \
         answering CRIU, the commit's round trip, the destination lifting its block, announcing the address and \
         resuming the service); answered: from the freeze to the service's first reply through the proxy after \
         the resume (the downtime its clients saw); stall: longest wait for a reply \
         on any client connection (includes the 1 ms pause between requests)."
    );
    if args.container {
        for host in [Host::Src, Host::Dst] {
            let listed = s.containers(host)?;
            println!("podman ps --all on {host}: {listed:?}");
        }
    }
    drop(s);
    if failures > 0 {
        bail!("{failures} problem(s) seen");
    }
    println!(
        "all moves clean: no resets, no lost or corrupted bytes, state intact; test bed removed."
    );
    Ok(())
}
