//! `tether proxyctl`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use tether_proxy::control::{self, Client, ControlError};

/// Control a running `tether proxy` through its control socket.
///
/// Prints the proxy's answer as JSON on stdout. Exit status: 0 done, 2 the proxy refused or
/// failed the command (the message says why; for a pause that did not quiesce, which flows),
/// 1 the proxy could not be reached.
#[derive(Debug, clap::Args)]
pub struct ProxyctlArgs {
    /// The proxy's control socket.
    #[arg(long, value_name = "PATH", env = "TETHER_PROXY_CONTROL", default_value = control::DEFAULT_SOCKET)]
    control: PathBuf,
    #[command(subcommand)]
    command: ProxyctlCommand,
}

#[derive(Debug, clap::Subcommand)]
enum ProxyctlCommand {
    /// Every service's phase, backend, maximum hold (`max_hold_ms`: how long a pause lasts
    /// unless resumed), flow counts, held data and drops.
    Status,
    /// The flows of a service, with byte counters and upstream queue state.
    Flows {
        /// The service's name.
        service: String,
    },
    /// Stop client-to-service data and wait until every upstream socket is quiet; the pause is
    /// undone if that takes longer than the timeout.
    Pause {
        /// The service's name.
        service: String,
        /// How long to wait for quiescence, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Send new connections and UDP flows to another backend.
    Redirect {
        /// The service's name.
        service: String,
        /// The new backend.
        #[arg(value_name = "IP:PORT")]
        backend: SocketAddr,
    },
    /// Release held data, in order.
    Resume {
        /// The service's name.
        service: String,
    },
}

fn print(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs `tether proxyctl`.
pub async fn run(a: ProxyctlArgs) -> anyhow::Result<ExitCode> {
    let mut c = Client::connect(&a.control).await?;
    let r = match a.command {
        ProxyctlCommand::Status => c.status().await.map(|v| print(&v)),
        ProxyctlCommand::Flows { service } => c.flows(&service).await.map(|v| print(&v)),
        ProxyctlCommand::Pause {
            service,
            timeout_ms,
        } => c
            .pause(&service, Duration::from_millis(timeout_ms))
            .await
            .map(|v| print(&v)),
        ProxyctlCommand::Redirect { service, backend } => {
            c.redirect(&service, backend).await.map(|v| print(&v))
        }
        ProxyctlCommand::Resume { service } => c.resume(&service).await.map(|v| print(&v)),
    };
    match r {
        Ok(printed) => {
            printed?;
            Ok(ExitCode::SUCCESS)
        }
        Err(ControlError::Rejected {
            message,
            unquiesced,
            ..
        }) => {
            eprintln!("tether proxyctl: {message}");
            for f in unquiesced {
                let outq = f
                    .upstream_outq
                    .map(|n| format!(" ({n} bytes queued upstream)"))
                    .unwrap_or_default();
                eprintln!(
                    "  {} flow {} from {}: {}{outq}",
                    f.proto, f.id, f.client, f.reason
                );
            }
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}
