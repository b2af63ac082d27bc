//! The soak benchmark: the example service moves src -> dst -> src ... `--moves` times behind
//! tether-proxy while `--tcp` TCP and `--quic` QUIC clients through the proxy, and as many direct,
//! verify every reply byte for byte. Prints a row per move (downtime, the proxy's pause, stall
//! p50/p99/max per path and protocol, the proxy's memory and CPU) and, with `--json FILE`, the
//! whole run. Exit status 1 if a move failed or a client saw an error.
//!
//! Run as root after `scripts/setup.sh` (or `scripts/soak.sh`, which builds and runs it):
//! `cargo run --release --example soak -- --tcp 1000 --quic 200 --moves 20`

use std::path::PathBuf;

use anyhow::bail;
use clap::Parser;
use tether::scenario::Binaries;
use tether::soak::{self, SoakConfig};
use tether::testbed::require_prerequisites;

/// Move the example service many times under load and report each move.
#[derive(Debug, Parser)]
struct Args {
    /// TCP connections per path (through the proxy, and as many direct).
    #[arg(long, default_value_t = 1000)]
    tcp: u32,
    /// QUIC connections per path.
    #[arg(long, default_value_t = 200)]
    quic: u32,
    /// Moves, alternating (each from where the service runs).
    #[arg(long, default_value_t = 20)]
    moves: u32,
    /// The service's memory state, MiB.
    #[arg(long, default_value_t = 64)]
    state_mb: u32,
    /// Pages the service rewrites per second.
    #[arg(long, default_value_t = 1000)]
    dirty_pages_per_sec: u32,
    /// src-dst link rate, Mbit/s (0: unlimited).
    #[arg(long, default_value_t = 1000)]
    link_mbit: u64,
    /// Pause between a reply and the next request of a connection, ms. The default keeps 2,400
    /// connections within what two cores serve (at 10 ms the clients, the proxy and the service
    /// saturate them and stall for CPU alone).
    #[arg(long, default_value_t = 50)]
    interval_ms: u64,
    /// Restore with all memory in place before the service runs (`--lazy-restore never`)
    /// instead of lazily.
    #[arg(long)]
    full_restore: bool,
    /// The agents' `--hot-first-mib` (memory a lazy restore copies in at once, hot pages
    /// first; 0: none); their default if not given.
    #[arg(long, value_name = "MIB")]
    hot_first_mib: Option<u64>,
    /// Move examples/interpreted_service.py (CPython, TCP only; needs --quic 0) instead of the
    /// example service.
    #[arg(long)]
    interpreted: bool,
    /// Also write the run as JSON here.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Err(missing) = require_prerequisites() {
        bail!("this machine cannot run the soak:\n{missing}\nRun scripts/setup.sh as root.");
    }
    let cfg = SoakConfig {
        tcp: a.tcp,
        quic: a.quic,
        moves: a.moves,
        state_mb: a.state_mb,
        dirty_pages_per_sec: a.dirty_pages_per_sec,
        link_mbit: a.link_mbit,
        interval_ms: a.interval_ms,
        full_restore: a.full_restore,
        hot_first_mib: a.hot_first_mib,
        interpreted: a.interpreted,
    };
    if cfg.interpreted && cfg.quic > 0 {
        bail!("the interpreted service speaks TCP only: add --quic 0");
    }
    println!(
        "tether soak: {} TCP + {} QUIC clients through the proxy and as many direct, {} moves, \
         {} MiB state rewriting {} pages/s, link {} Mbit/s, a request every {} ms per connection",
        a.tcp, a.quic, a.moves, a.state_mb, a.dirty_pages_per_sec, a.link_mbit, a.interval_ms
    );
    let summary = soak::run(Binaries::for_this_example()?, &cfg, &mut std::io::stdout())?;
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&summary)?)?;
    }
    if summary.committed != a.moves || summary.client_errors > 0 {
        bail!(
            "{} of {} moves committed, {} client errors",
            summary.committed,
            a.moves,
            summary.client_errors
        );
    }
    Ok(())
}
