//! [`ContainerSource`]: the source's [`Checkpointer`] for a Podman container. The dump is a
//! process tree's ([`CriuTree`], with the container's [`scope`](super::scope)); what is added:
//! the runtime's `descriptors.json` and the container's log go with the images, Podman removes
//! the container once it is committed away, and the way back after a failed destination is
//! Podman's own restore of the images here.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::podman::{self, Inspected, Podman};
use super::{scope, ContainerError};
use crate::criu::lazy::LazyPages;
use crate::criu::tree::{CriuTree, TreeDump};
use crate::criu::Criu;
use crate::hostnet::HostAddressMover;
use crate::machine::agent::RestoreInfo;
use crate::machine::source::DumpEnd;
use crate::machine::PortError;
use crate::ports::{AddressMover, Checkpointer, Dump, DumpPoint};
use crate::protocol::{ContainerSpec, ErrorCode, ServiceAddr};

impl From<ContainerError> for PortError {
    fn from(e: ContainerError) -> PortError {
        let code = match &e {
            ContainerError::MissingMount(_)
            | ContainerError::MissingVolume(_)
            | ContainerError::NameTaken(_) => ErrorCode::Refused,
            _ => ErrorCode::Checkpoint,
        };
        PortError::caused(code, "the container", e)
    }
}

/// A running container on the source, checked movable.
#[derive(Debug, Clone)]
pub struct ContainerSource {
    tree: CriuTree,
    podman: Podman,
    container: Inspected,
    spec: ContainerSpec,
}

impl ContainerSource {
    /// Looks `name` up and checks that tether can move it: it runs, has no terminal, has its
    /// own network namespace and a recorded command line; its dump scope is read here.
    pub async fn open(criu: &Criu, name: &str) -> Result<ContainerSource, ContainerError> {
        let podman = Podman::locate(criu.path())?;
        let c = podman.inspect(name).await?;
        if !c.running || c.pid <= 1 {
            return Err(ContainerError::NotRunning(c.name));
        }
        if c.tty {
            return Err(ContainerError::Terminal(c.name));
        }
        let create_args = podman::create_args(&c.create_command)
            .ok_or_else(|| ContainerError::NoCreateCommand(c.name.clone()))?;
        let static_mac = create_args
            .iter()
            .any(|a| a == "--mac-address" || a.starts_with("--mac-address="));
        let spec = ContainerSpec {
            name: c.name.clone(),
            create_args,
            bind_sources: c.binds.iter().map(|(s, _)| s.clone()).collect(),
            volumes: c.volumes.clone(),
            mac: c.mac.clone().filter(|_| static_mac),
        };
        spec.validate()
            .map_err(|detail| ContainerError::Unsupported {
                name: c.name.clone(),
                detail,
            })?;
        let scope = scope::of(&c)?;
        let start = crate::criu::tree::process_start_time(c.pid)
            .ok_or_else(|| ContainerError::NotRunning(c.name.clone()))?;
        info!(container = %c.name, id = %c.id, pid = c.pid, "container to move");
        Ok(ContainerSource {
            tree: CriuTree::recorded(criu.clone(), c.pid, start).with_scope(scope),
            podman,
            container: c,
            spec,
        })
    }

    /// What the destination needs to create it again.
    pub fn spec(&self) -> &ContainerSpec {
        &self.spec
    }

    /// Its init process here.
    pub fn pid(&self) -> i32 {
        self.container.pid
    }

    /// Its id.
    pub fn id(&self) -> &str {
        &self.container.id
    }

    /// The start time of its init process (journaled with the pid).
    pub fn pid_start(&self) -> Option<u64> {
        self.tree.root_start()
    }
}

/// A container's dump in progress.
#[derive(Debug)]
pub struct ContainerDump {
    inner: TreeDump,
    images: PathBuf,
    source: ContainerSource,
    /// Bytes of the container's log copied before the freeze.
    log_copied: u64,
}

impl ContainerDump {
    /// Before the freeze: what runc's restore needs beside CRIU's images (the tree's standard
    /// descriptors, as runc records them; they do not change), and the container's log so far,
    /// so that only what it writes from here on is copied while it is frozen. Returns how many
    /// bytes of the log were copied.
    fn add_files_before_freeze(source: &ContainerSource, images: &Path) -> Result<u64, PortError> {
        let pid = source.container.pid;
        let fds: Vec<String> = (0..3)
            .map(|fd| {
                std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "/dev/null".to_string())
            })
            .collect();
        let json = serde_json::to_vec(&fds)
            .map_err(|e| PortError::caused(ErrorCode::Internal, "descriptors.json", e))?;
        std::fs::write(images.join(podman::DESCRIPTORS_FILE), json)
            .map_err(|e| PortError::caused(ErrorCode::Storage, "writing descriptors.json", e))?;
        let Some(log) = &source.container.log_path else {
            return Ok(0);
        };
        std::fs::copy(log, images.join(podman::LOG_FILE)).or_else(|e| {
            warn!("the container's log {} stays here: {e}", log.display());
            Ok(0)
        })
    }

    /// Frozen, dumped: its neighbour table, and the rest of its log (it only grows).
    fn add_files_while_frozen(&self) {
        let pid = self.source.container.pid;
        match super::neighbours::read(pid) {
            Ok(n) => {
                if let Err(e) = super::neighbours::write(&self.images, &n) {
                    warn!("the container's neighbour table stays here: {e}");
                }
            }
            Err(e) => warn!("{e}"),
        }
        if let Some(log) = &self.source.container.log_path {
            let tail = || -> std::io::Result<u64> {
                use std::io::Seek as _;
                let mut from = std::fs::File::open(log)?;
                from.seek(std::io::SeekFrom::Start(self.log_copied))?;
                let mut to = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(self.images.join(podman::LOG_FILE))?;
                std::io::copy(&mut from, &mut to)
            };
            if let Err(e) = tail() {
                warn!(
                    "the end of the container's log {} stays here: {e}",
                    log.display()
                );
            }
        }
    }
}

impl Dump for ContainerDump {
    async fn proceed(&mut self) -> Result<DumpPoint, PortError> {
        let p = self.inner.proceed().await?;
        if p == DumpPoint::Held {
            self.add_files_while_frozen();
        }
        Ok(p)
    }

    async fn answer_commit(&mut self) -> Result<(), PortError> {
        self.inner.answer_commit().await
    }

    async fn commit(self) -> Result<DumpEnd, PortError> {
        // CRIU ends the tree; Podman keeps the container (exited) with its network namespace,
        // where the kept lock is, until the address is removed ([`ContainerNet`]): until then
        // the images can still be restored into it here.
        self.inner.commit().await
    }

    async fn rollback(self) -> Result<(), PortError> {
        self.inner.rollback().await
    }

    fn worker(&self) -> Option<(i32, u64)> {
        self.inner.worker()
    }
}

impl Checkpointer for ContainerSource {
    type Dump = ContainerDump;
    type Lazy = LazyPages;

    fn start_lazy(
        &self,
        _images: &Path,
        _from_store: bool,
    ) -> Result<Option<LazyPages>, PortError> {
        Ok(None)
    }

    fn root_pid(&self) -> i32 {
        self.tree.root_pid()
    }

    async fn start_dump(&self, images: &Path) -> Result<ContainerDump, PortError> {
        let inner = self.tree.start_dump(images).await?;
        let log_copied = ContainerDump::add_files_before_freeze(self, images)?;
        Ok(ContainerDump {
            inner,
            images: images.to_path_buf(),
            source: self.clone(),
            log_copied,
        })
    }

    async fn source_copy_exists(&self, worker: Option<(i32, u64)>) -> Result<bool, PortError> {
        self.tree.source_copy_exists(worker).await
    }

    async fn kill_source_copy(&self) -> Result<(), PortError> {
        self.tree.kill_source_copy().await
    }

    async fn restore_here(&self, images: &Path) -> Result<i32, PortError> {
        // CRIU ended the tree at the commit; the container is still Podman's (exited), and
        // Podman restores it from these images as after a checkpoint of its own.
        let c = &self.container;
        let staged = podman::Staged {
            id: c.id.clone(),
            bundle: c
                .oci_config
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            log_path: None,
            criu_config: None,
            pid_file: c.pid_file.clone().ok_or_else(|| {
                PortError::new(
                    ErrorCode::Checkpoint,
                    "Podman names no pid file for the container",
                )
            })?,
        };
        let (pid, _, _) = self.podman.restore(&staged, images, false).await?;
        info!(pid, "restored the container here from the image set");
        Ok(pid)
    }

    async fn restore_stopped(
        &self,
        images: &Path,
        lazy: bool,
        on_pid: impl FnOnce(i32) + Send + 'static,
    ) -> Result<RestoreInfo, PortError> {
        self.tree.restore_stopped(images, lazy, on_pid).await
    }

    fn resume(&self, pid: i32) -> Result<(), PortError> {
        self.tree.resume(pid)
    }

    fn kill(&self, pid: i32, start: u64) -> bool {
        self.tree.kill(pid, start)
    }

    fn alive(&self, pid: i32, start: u64) -> bool {
        self.tree.alive(pid, start)
    }

    fn start_time(&self, pid: i32) -> Option<u64> {
        self.tree.start_time(pid)
    }

    async fn restored_intact(
        &self,
        pid: i32,
        start: u64,
        lazy: Option<(i32, u64)>,
        served: Option<u64>,
        images: &Path,
    ) -> bool {
        self.tree
            .restored_intact(pid, start, lazy, served, images)
            .await
    }
}

/// The source's [`AddressMover`] for a container: the host mover of the container's own network
/// namespace (its address, its interface, the source's locks are all there), except that the
/// address leaves this host with the container: removing it removes the container from Podman
/// (its namespace, and the kept lock in it, go with it).
#[derive(Debug, Clone)]
pub struct ContainerNet {
    inner: HostAddressMover,
    podman: Podman,
    id: String,
}

impl ContainerNet {
    /// The mover of `source`'s network namespace (sockets opened there on a thread of their own;
    /// they keep working from any thread).
    pub fn open(source: &ContainerSource) -> Result<ContainerNet, ContainerError> {
        let inner = super::in_netns_of(source.pid(), || {
            HostAddressMover::new().map_err(|e| e.to_string())
        })?;
        Ok(ContainerNet {
            inner,
            podman: source.podman.clone(),
            id: source.container.id.clone(),
        })
    }
}

impl AddressMover for ContainerNet {
    async fn check_free(
        &self,
        svc: ServiceAddr,
        explicit: Option<&str>,
    ) -> Result<String, PortError> {
        self.inner.check_free(svc, explicit).await
    }

    async fn interface_of(&self, addr: Ipv4Addr) -> Result<Option<String>, PortError> {
        self.inner.interface_of(addr).await
    }

    async fn claim(&self, table: &str, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        self.inner.claim(table, svc, dev).await
    }

    async fn add(&self, _svc: ServiceAddr, _dev: &str) -> Result<(), PortError> {
        // The address comes back with the container: Podman's restore (the way back after a
        // failed destination) makes a new namespace with it. This one may be gone by then.
        Ok(())
    }

    async fn remove(&self, _svc: ServiceAddr, _dev: &str) -> Result<(), PortError> {
        self.podman.remove(&self.id).await.map_err(PortError::from)
    }

    async fn delete_table(&self, table: &str) -> Result<(), PortError> {
        self.inner.delete_table(table).await
    }

    async fn lock(&self, table: &str, addr: Ipv4Addr, owned: bool) -> Result<(), PortError> {
        self.inner.lock(table, addr, owned).await
    }

    async fn unlock(&self, tables: &[(String, bool)]) -> Result<(), PortError> {
        self.inner.unlock(tables).await
    }

    async fn announce(&self, addr: Ipv4Addr, dev: &str) -> Result<(), PortError> {
        self.inner.announce(addr, dev).await
    }

    async fn block_behind(
        &self,
        table: &str,
        svc: ServiceAddr,
        dev: &str,
        mac: Option<[u8; 6]>,
    ) -> Result<(), PortError> {
        self.inner.block_behind(table, svc, dev, mac).await
    }

    async fn announce_as(&self, addr: Ipv4Addr, dev: &str, mac: [u8; 6]) -> Result<(), PortError> {
        self.inner.announce_as(addr, dev, mac).await
    }
}
