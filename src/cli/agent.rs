//! `tether agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tether_migrator::authz::{Authorization, ServicePrefix};
use tether_migrator::driver::agent::{self, AgentConfig, LazyRestore, LazySource};

use super::units::parse_duration;

/// Receive migrations on this host and restore them with CRIU.
///
/// Accepts image sets over QUIC from the allowed sources (mutual TLS with the cluster's CA),
/// restores them, and hands the outcome back to the source.
///
/// A restored service is left stopped, its address blocked (inbound, outbound and ARP), until
/// the source, having ended its own copy, sends the commit; then it runs and the address is
/// announced. If the connection is lost in between, the migration is in doubt: the stopped copy
/// is kept until the source resolves it (`Resolve`, from a reconnecting or restarted `tether
/// migrate`) or --in-doubt-timeout passes. Every step is journaled in --state-dir first: a
/// restarted agent resumes what it finds there.
///
/// Who may migrate what here is the operator's to say: the certificate names of the sources
/// (--allow-source) and the address blocks their services may claim (--allow-service) are
/// required; the host's own addresses and gateways are always refused. Each migration may hold
/// --max-image-mib, all together --max-memory-mib, at most --max-migrations at once.
///
/// Run as root in the network namespace the services should live in.
#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// UDP address to listen on for migrations (QUIC).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// This host's certificate directory (from `tether certs`).
    #[arg(long, value_name = "DIR")]
    certs: PathBuf,
    /// Interface for service addresses (default: the one whose subnet contains the address).
    #[arg(long, value_name = "IFACE")]
    interface: Option<String>,
    /// A source that may migrate services here: the name its certificate carries (`tether
    /// certs --name`). Repeat for each. Hosts of the CA not named here are refused.
    #[arg(long = "allow-source", value_name = "NAME", required = true)]
    allow_sources: Vec<String>,
    /// An address block services may claim here, e.g. 10.77.0.0/24; a service address must
    /// lie in it and carry its prefix length, and may not be its network or broadcast address.
    /// Repeat for each block.
    #[arg(long = "allow-service", value_name = "NETWORK/PREFIX", required = true)]
    allow_services: Vec<ServicePrefix>,
    /// Most migrations in progress here at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    max_migrations: usize,
    /// Most memory all migrations here may hold together (received image files plus pre-copied
    /// pages), in MiB. Default: half of this host's memory.
    #[arg(long, value_name = "MIB")]
    max_memory_mib: Option<u64>,
    /// Where image sets are received: a tmpfs directory (memory images are secret). If it
    /// exists it must be a real directory owned by root with mode 0700, in parents only root
    /// can change; else the agent refuses to start.
    #[arg(long, value_name = "DIR", default_value = "/run/tether/agent/images")]
    work_dir: PathBuf,
    /// Where migrations in flight and their outcomes are journaled, so that a restarted agent
    /// resumes or undoes them (same checks as --work-dir).
    #[arg(long, value_name = "DIR", default_value = "/run/tether/agent/journal")]
    state_dir: PathBuf,
    /// How long a restored copy whose source went silent after the restore is kept (stopped,
    /// unreachable) for the source to say whether it committed; then it is undone (the source
    /// keeps its image set and restores the service itself if it had committed).
    #[arg(long, value_parser = parse_duration, default_value = "5m", value_name = "DURATION")]
    in_doubt_timeout: Duration,
    /// Largest image set accepted, in MiB.
    #[arg(long, value_name = "MIB", default_value_t = 16384)]
    max_image_mib: u64,
    /// CRIU log level (0-4).
    #[arg(long, default_value_t = 2)]
    criu_log_level: i32,
    /// Serve Prometheus metrics (migrations by outcome, bytes and pages received, restore and
    /// rebuild-wait times) at http://ADDR:PORT/metrics. Off by default; bind it to an address
    /// only your monitoring reaches.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// Restore memory lazily: the service runs as soon as its mappings exist and a local
    /// `criu lazy-pages` daemon fills them from the received images (userfaultfd), which takes
    /// the copy of all memory out of the downtime. `auto` does so where CRIU's feature check
    /// passes.
    #[arg(long, value_enum, default_value_t = LazyArg::Auto)]
    lazy_restore: LazyArg,
    /// With a lazy restore, memory copied in at once before the service runs, hot pages first:
    /// its smallest memory regions (thread stacks, heaps: where a reply's work happens, not the
    /// bulk of its state), then the pages it wrote since the last pre-copy round if they fit,
    /// then pages it wrote during pre-copy. Adds about 1 ms per 1-2 MiB to the restore and
    /// spares the service page faults while it answers its first requests. 0 leaves everything
    /// to the lazy fill.
    #[arg(long, value_name = "MIB", default_value_t = tether_migrator::criu::eager::DEFAULT_BUDGET_PAGES / 256)]
    hot_first_mib: u64,
    /// With a lazy restore, where the lazy-pages daemon gets the rest of memory. `store`: from
    /// the pages received (pre-copy plus the final difference) through a page server, so no
    /// file holding all of memory is written while the service is down. `files`: from pages
    /// files rebuilt whole before the restore (slower, grows with the state). Either way the
    /// fill runs in processes of their own that outlive the agent.
    #[arg(long, value_enum, default_value_t = LazyFromArg::Store)]
    lazy_pages_from: LazyFromArg,
}

/// `--lazy-pages-from` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LazyFromArg {
    /// The page store, through a page server.
    Store,
    /// Pages files rebuilt whole.
    Files,
}

/// `--lazy-restore` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LazyArg {
    /// Lazily where this kernel and CRIU support it.
    Auto,
    /// Always lazily; refuse to start where unsupported.
    Always,
    /// Never: copy all memory during the restore.
    Never,
}

/// Runs `tether agent` until SIGINT or SIGTERM.
pub async fn run(a: AgentArgs) -> anyhow::Result<ExitCode> {
    let max_memory_bytes = match a.max_memory_mib {
        Some(m) => m.saturating_mul(1 << 20),
        None => half_of_memory()?,
    };
    let cfg = AgentConfig {
        listen: a.listen,
        certs: a.certs,
        interface: a.interface,
        work_dir: a.work_dir,
        state_dir: a.state_dir,
        max_image_bytes: a.max_image_mib.saturating_mul(1 << 20),
        criu_log_level: a.criu_log_level,
        metrics: a.metrics,
        lazy_restore: match a.lazy_restore {
            LazyArg::Auto => LazyRestore::Auto,
            LazyArg::Always => LazyRestore::Always,
            LazyArg::Never => LazyRestore::Never,
        },
        in_doubt_timeout: a.in_doubt_timeout,
        hot_first_pages: a.hot_first_mib.saturating_mul(256),
        lazy_pages_from: match a.lazy_pages_from {
            LazyFromArg::Store => LazySource::Store,
            LazyFromArg::Files => LazySource::Files,
        },
        authorization: Authorization {
            sources: a.allow_sources,
            services: a.allow_services,
            max_migrations: a.max_migrations,
        },
        max_memory_bytes,
    };
    agent::run(cfg, super::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Half of this host's memory (the kernel's total RAM, as `MemTotal` in /proc/meminfo), in
/// bytes.
fn half_of_memory() -> anyhow::Result<u64> {
    let info = nix::sys::sysinfo::sysinfo().map_err(|e| {
        anyhow::anyhow!("cannot read this host's memory ({e}): give --max-memory-mib")
    })?;
    Ok(info.ram_total() / 2)
}
