//! The subcommands of the `tether` binary: argument parsing and wiring only; the work is done by
//! the `tether-migrator` and `tether-proxy` libraries.

pub mod agent;
pub mod calibrate;
pub mod certs;
pub mod dirty_rate;
pub mod migrate;
pub mod plan;
pub mod precopy_args;
pub mod proxy;
pub mod proxyctl;
pub mod units;

/// The async runtime the subcommands run on.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}
