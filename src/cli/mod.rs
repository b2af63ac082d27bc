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

/// Raises the soft limit on open files to the hard limit (the proxy holds two descriptors per
/// TCP flow, the agent and CRIU one per socket of the tree they move; at the common soft limit of
/// 1024 the proxy ran out at about 500 TCP flows). Returns the limits now in force.
pub fn raise_nofile_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    getrlimit(Resource::RLIMIT_NOFILE)
}

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

/// The host pid of the init process of the running Podman container `name` (`podman inspect`).
pub fn container_pid(name: &str) -> anyhow::Result<i32> {
    let out = std::process::Command::new("podman")
        .args([
            "container",
            "inspect",
            "--format",
            "{{.State.Pid}}",
            "--",
            name,
        ])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run podman: {e} (scripts/setup.sh installs it)"))?;
    if !out.status.success() {
        anyhow::bail!(
            "podman inspect {name}: {}",
            tether_migrator::container::podman::error_of(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let pid: i32 = String::from_utf8_lossy(&out.stdout).trim().parse()?;
    anyhow::ensure!(pid > 1, "container {name:?} does not run");
    Ok(pid)
}
