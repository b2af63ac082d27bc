//! Podman containers as the unit of a migration.
//!
//! The source dumps the container's process tree with tether's own CRIU worker (pre-copy, the
//! hold point at `post-dump`, the commit protocol: all as for a process tree), told what runc
//! itself tells CRIU about a container ([`scope`]): its root file system, the mounts and the
//! network namespace its runtime provides, its cgroups. The images are therefore the ones runc's
//! restore expects, and the destination restores them through Podman ([`podman`]) into a
//! container it created beforehand with the source's configuration, so that Podman manages it
//! afterwards (`podman ps`, `logs`, `stop`). [`unit::ContainerSource`] is the source's
//! [`Checkpointer`](crate::ports::Checkpointer).
//!
//! The container's address lives in its own network namespace (a macvlan on the hosts' LAN),
//! not on the host: the source's locks go into that namespace, and the destination blocks the
//! address (and the container's MAC) on the LAN interface itself, in nftables' `netdev` family,
//! before Podman brings the namespace up.

pub mod neighbours;
pub mod podman;
pub mod scope;
pub mod unit;

/// Errors of the container adapter.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ContainerError {
    /// No `podman` in PATH.
    #[error("no podman found in PATH (run scripts/setup.sh as root)")]
    NoPodman,
    /// No container of that name or id.
    #[error("no container {0:?} here (see `podman ps -a`)")]
    NoSuchContainer(String),
    /// The container does not run.
    #[error(
        "container {0:?} does not run (paused, created or exited): only a running container moves"
    )]
    NotRunning(String),
    /// The container has a terminal.
    #[error("container {0:?} has a terminal (-t): tether moves containers without one")]
    Terminal(String),
    /// Podman has no record of how the container was made.
    #[error("Podman has no command line recorded for container {0:?} (made through its API?): tether recreates a container on the destination from it")]
    NoCreateCommand(String),
    /// A bind mount's source is missing here.
    #[error("bind mount source {0} does not exist on this host: create it (with the data the container needs) before moving the container here")]
    MissingMount(String),
    /// A named volume is missing here.
    #[error("volume {0:?} does not exist on this host: create it (with the data the container needs, e.g. `podman volume export` / `import`) before moving the container here")]
    MissingVolume(String),
    /// A container of that name exists here already.
    #[error("a container named {0:?} exists on this host already")]
    NameTaken(String),
    /// A Podman command failed.
    #[error("podman failed {what}: {detail}")]
    Podman {
        /// What it was doing.
        what: String,
        /// Its message.
        detail: String,
    },
    /// A file or process of the container could not be read.
    #[error("{what}: {source}")]
    Io {
        /// What failed.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// Something the container's runtime set up is not what tether understands.
    #[error("container {name:?}: {detail}")]
    Unsupported {
        /// The container.
        name: String,
        /// What is unsupported.
        detail: String,
    },
}

impl ContainerError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ContainerError {
        let what = what.into();
        move |source| ContainerError::Io { what, source }
    }
}

/// Runs `f` on a thread of its own in the network namespace of process `pid`, inside the
/// current tokio runtime: the sockets `f` opens stay in that namespace, whichever thread uses
/// them afterwards.
pub(crate) fn in_netns_of<T: Send + 'static>(
    pid: i32,
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, ContainerError> {
    let path = format!("/proc/{pid}/ns/net");
    let ns = std::fs::File::open(&path).map_err(ContainerError::io(format!(
        "opening the container's network namespace {path}"
    )))?;
    let handle = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        let _rt = handle.enter();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("entering the container's network namespace: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| "the thread in the container's network namespace panicked".to_string())
    .and_then(|r| r)
    .map_err(|detail| ContainerError::Unsupported {
        name: format!("pid {pid}"),
        detail,
    })
}
