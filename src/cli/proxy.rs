//! `tether proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use tether_proxy::{control, Config, Proxy, ServiceConfig};

/// Run the L4 proxy in front of migratable services.
///
/// Relays TCP connections and UDP (QUIC) flows to each service's backend, and pauses, redirects
/// and resumes them on command (`tether proxyctl`, or `tether migrate --proxy`), so that clients
/// keep their connections while the service moves. Either `--config FILE` for any number of
/// services, or `--name`, `--backend` and listen addresses for one.
///
/// The proxy raises its open-files limit to the hard limit. Flow limits left at their defaults
/// (16,384 TCP flows; 4,096 UDP flows per listener) are lowered to fit it, and the log says so;
/// flow limits set in the configuration that cannot fit are refused, naming what they need.
#[derive(Debug, clap::Args)]
pub struct ProxyArgs {
    /// TOML configuration: `[[service]]` tables with `name`, `tcp_listen`, `udp_listen`,
    /// `backend` and optional `[service.limits]`; optional top-level `control` and `metrics`.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["name", "tcp_listen", "udp_listen", "backend", "max_hold_ms"])]
    config: Option<PathBuf>,
    /// Name of the one service (without --config).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// TCP address(es) to accept clients on (repeat or separate with commas).
    #[arg(long, value_name = "ADDR:PORT", value_delimiter = ',')]
    tcp_listen: Vec<SocketAddr>,
    /// UDP address(es) to receive client datagrams on (repeat or separate with commas).
    #[arg(long, value_name = "ADDR:PORT", value_delimiter = ',')]
    udp_listen: Vec<SocketAddr>,
    /// The service's address (TCP and UDP).
    #[arg(long, value_name = "IP:PORT")]
    backend: Option<SocketAddr>,
    /// A pause not resumed within this many milliseconds resumes by itself toward the old
    /// backend (default 5000).
    #[arg(long, value_name = "MS")]
    max_hold_ms: Option<u64>,
    /// Control socket (created fresh, mode 0600); overrides the configuration's `control`.
    /// Default: /run/tether/proxy.sock.
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics; overrides the configuration's
    /// `metrics`.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
}

fn config_from(a: &ProxyArgs) -> anyhow::Result<Config> {
    let mut config = match &a.config {
        Some(path) => Config::load(path)?,
        None => {
            let (Some(name), Some(backend)) = (&a.name, a.backend) else {
                anyhow::bail!(
                    "give --config FILE, or --name, --backend and --tcp-listen/--udp-listen for one service"
                );
            };
            let mut s = ServiceConfig::new(name.clone(), backend);
            s.tcp_listen = a.tcp_listen.clone();
            s.udp_listen = a.udp_listen.clone();
            if let Some(ms) = a.max_hold_ms {
                s.limits.max_hold_ms = ms;
            }
            Config {
                control: None,
                metrics: None,
                services: vec![s],
            }
        }
    };
    if let Some(c) = &a.control {
        config.control = Some(c.clone());
    } else if config.control.is_none() {
        config.control = Some(PathBuf::from(control::DEFAULT_SOCKET));
    }
    if let Some(m) = a.metrics {
        config.metrics = Some(m);
    }
    config.validate()?;
    Ok(config)
}

/// Fits the flow limits to the open-files limit (raised to the hard limit at start): limits left
/// at their defaults are lowered to fit, and said so; set ones that cannot fit are refused,
/// naming what they need. Flows past the descriptor limit would otherwise fail to open (accept
/// or socket errors) instead of being refused by the flow limit.
fn fit_descriptors(config: &mut Config) -> anyhow::Result<()> {
    let (soft, _hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_err(|e| anyhow::anyhow!("cannot read the open files limit: {e}"))?;
    for what in config.fit_open_files(soft)? {
        tracing::info!(
            open_files = soft,
            "{what}: the default flow limits do not fit in this process's open files; set \
             max_tcp_flows/udp_max_flows, or raise the hard limit (ulimit -Hn, LimitNOFILE=), \
             to choose"
        );
    }
    Ok(())
}

/// Runs `tether proxy` until SIGINT or SIGTERM.
pub async fn run(a: ProxyArgs) -> anyhow::Result<ExitCode> {
    let mut config = config_from(&a)?;
    fit_descriptors(&mut config)?;
    let proxy = Proxy::start(&config).await?;
    if let Some(p) = proxy.control_path() {
        tracing::info!("control socket {}", p.display());
    }
    if let Some(m) = proxy.metrics_addr() {
        tracing::info!("metrics at http://{m}/metrics");
    }
    proxy.run_until(super::shutdown_signal()).await;
    Ok(ExitCode::SUCCESS)
}
