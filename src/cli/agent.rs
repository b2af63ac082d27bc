//! `tether agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tether_migrator::agent::{self, AgentConfig, LazyRestore};

/// Receive migrations on this host: accept image sets over QUIC from hosts with a certificate of
/// the same CA, restore them with CRIU, and hand the outcome back to the source.
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
    /// Where image sets are received; use tmpfs (memory images are secret: mode 0700).
    #[arg(long, value_name = "DIR", default_value = "/dev/shm/tether-agent")]
    work_dir: PathBuf,
    /// Where in-flight migrations are recorded, so a restarted agent can undo leftovers.
    #[arg(long, value_name = "DIR", default_value = "/run/tether/agent")]
    state_dir: PathBuf,
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
    };
    agent::run(cfg, super::shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
