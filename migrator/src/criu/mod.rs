//! Driving CRIU through its RPC interface (`criu swrk`).
//!
//! tether speaks CRIU's RPC itself (see [`swrk`]) rather than running the CLI: the RPC's
//! notifications let the source hold a finished dump at `post-dump`, with the tree frozen and its
//! connections locked, until the destination has restored it, and then either commit (CRIU kills
//! the tree) or roll back (CRIU unlocks and thaws it). The worker process is started before the
//! freeze, so CRIU's start-up is not part of the downtime.

pub mod eager;
pub mod images;
pub mod lazy;
pub mod pages;
pub mod pageserver;
pub mod rebuild;
pub mod rpc;
pub mod swrk;
pub mod tree;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rpc::{NetworkLockMethod, Req, ReqType, Resp};
use swrk::{Event, Worker};

/// The oldest CRIU that works on the kernels tether targets (4.1 cannot dump TCP sockets on
/// Linux >= 6.16).
pub const MIN_VERSION: (i32, i32) = (4, 2);

/// Where `scripts/setup.sh` installs the CRIU it builds; preferred over PATH.
const PREFERRED: &str = "/usr/local/sbin/criu";

/// Name of CRIU's log inside an images directory; never part of the migrated image set.
pub const DUMP_LOG: &str = "dump.log";
/// Name of CRIU's restore log inside an images directory.
pub const RESTORE_LOG: &str = "restore.log";

/// Errors from CRIU.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CriuError {
    /// No CRIU binary was found.
    #[error("no criu binary found (looked at {PREFERRED} and PATH); run scripts/setup.sh as root")]
    NotFound,
    /// CRIU is older than tether supports.
    #[error("CRIU {found} is too old: tether needs >= {}.{} (run scripts/setup.sh as root)", MIN_VERSION.0, MIN_VERSION.1)]
    TooOld {
        /// The version found.
        found: String,
    },
    /// The worker process could not be started.
    #[error("cannot start criu swrk: {0}")]
    Spawn(std::io::Error),
    /// The RPC socket failed.
    #[error("CRIU RPC socket: {0}")]
    Rpc(std::io::Error),
    /// The worker closed its socket (it exited or crashed).
    #[error("criu swrk exited unexpectedly")]
    WorkerExited,
    /// CRIU sent something tether does not understand.
    #[error("unexpected CRIU RPC message: {0}")]
    Protocol(String),
    /// CRIU reports a failed request.
    #[error("criu {op} failed{errno}: {detail}", errno = .errno.map(|e| format!(" (errno {e})")).unwrap_or_default())]
    Failed {
        /// The request, e.g. `dump`, `restore`.
        op: &'static str,
        /// CRIU's errno, if it gave one.
        errno: Option<i32>,
        /// CRIU's message and the error lines of its log.
        detail: String,
    },
}

/// A located, version-checked CRIU.
#[derive(Debug, Clone)]
pub struct Criu {
    path: PathBuf,
    log_level: i32,
}

impl Criu {
    /// Finds CRIU (`/usr/local/sbin/criu`, then PATH) and checks its version over RPC.
    pub async fn locate() -> Result<Criu, CriuError> {
        let path = if Path::new(PREFERRED).is_file() {
            PathBuf::from(PREFERRED)
        } else {
            std::env::var_os("PATH")
                .and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|d| d.join("criu"))
                        .find(|p| p.is_file())
                })
                .ok_or(CriuError::NotFound)?
        };
        let criu = Criu { path, log_level: 2 };
        let worker = criu.worker()?;
        let resp = worker
            .call(&Req {
                r#type: ReqType::Version as i32,
                ..Default::default()
            })
            .await?;
        worker.finish().await;
        let v = resp
            .version
            .ok_or_else(|| CriuError::Protocol("VERSION answered without a version".into()))?;
        if (v.major_number, v.minor_number) < MIN_VERSION {
            return Err(CriuError::TooOld {
                found: format!("{}.{}", v.major_number, v.minor_number),
            });
        }
        Ok(criu)
    }

    /// Sets CRIU's log level (0-4; CRIU's default 2 logs errors and warnings).
    pub fn with_log_level(mut self, level: i32) -> Criu {
        self.log_level = level.clamp(0, 4);
        self
    }

    /// The CRIU binary in use.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Starts a worker process, ready for one request.
    pub fn worker(&self) -> Result<Worker, CriuError> {
        Worker::spawn(&self.path)
    }

    /// Starts dumping the tree rooted at `pid` into `images` with its TCP connections
    /// (`--tcp-established`, no network lock: the caller locks at [`DumpPoint::Frozen`]). The caller walks the dump through its
    /// [`DumpPoint`]s with [`DumpSession::next`] and ends it at [`DumpPoint::Dumped`] with
    /// [`DumpSession::commit`] (CRIU ends the tree) or, anywhere, [`DumpSession::rollback`]
    /// (CRIU unlocks and thaws it). A failure at any point leaves the tree running (CRIU rolls
    /// back by itself).
    pub async fn start_dump(
        &self,
        worker: Worker,
        pid: i32,
        images: &Path,
        scope: &DumpScope,
    ) -> Result<DumpSession, CriuError> {
        let mut opts = swrk::opts_for(images);
        opts.pid = Some(pid);
        scope.apply(&mut opts);
        opts.tcp_established = Some(true);
        // No lock of CRIU's: the caller locks the whole service address at the freeze point.
        // CRIU's nftables lock is one libnftables call per connection, in a process that by then
        // holds a descriptor per socket of the tree, and libnftables waits on its netlink socket
        // with select(): past descriptor 1023 glibc aborts CRIU ("bit out of range 0 -
        // FD_SETSIZE on fd_set"), which failed every dump of more than ~500 connections.
        opts.network_lock = Some(NetworkLockMethod::Skip as i32);
        opts.notify_scripts = Some(true);
        opts.log_file = Some(DUMP_LOG.into());
        opts.log_level = Some(self.log_level);
        worker
            .send(&Req {
                r#type: ReqType::Dump as i32,
                opts: Some(opts),
                ..Default::default()
            })
            .await?;
        Ok(DumpSession {
            worker,
            images: images.to_path_buf(),
            frozen: false,
            at: None,
            committed: false,
        })
    }

    /// Restores the image set in `images` (`--tcp-established`, as a sibling of CRIU so the
    /// restored root becomes the caller's child). With `stopped`, every restored process is
    /// left stopped (SIGSTOP) with its sockets live: it runs on SIGCONT. `on_pid` gets the
    /// restored root's pid as soon as CRIU names it, before any of the tree runs.
    ///
    /// With `lazy`, anonymous private memory is not copied in: a [`lazy::LazyPages`] daemon,
    /// which must already listen in `images`, fills it through userfaultfd.
    pub async fn restore(
        &self,
        images: &Path,
        lazy: bool,
        stopped: bool,
        on_pid: impl FnOnce(i32),
    ) -> Result<Restored, CriuError> {
        let worker = self.worker()?;
        let mut opts = swrk::opts_for(images);
        opts.lazy_pages = lazy.then_some(true);
        opts.tcp_established = Some(true);
        // The restored connections are kept unreachable by the caller (the destination's block,
        // the source's lock), which lifts that once they may go live.
        opts.network_lock = Some(NetworkLockMethod::Skip as i32);
        opts.rst_sibling = Some(true);
        opts.leave_stopped = stopped.then_some(true);
        opts.notify_scripts = Some(true);
        opts.log_file = Some(RESTORE_LOG.into());
        opts.log_level = Some(self.log_level);
        let started = Instant::now();
        let mut on_pid = Some(on_pid);
        let resp = async {
            worker
                .send(&Req {
                    r#type: ReqType::Restore as i32,
                    opts: Some(opts),
                    ..Default::default()
                })
                .await?;
            loop {
                match worker.next().await? {
                    Event::Notify { script, pid } => {
                        tracing::debug!(%script, ?pid, "criu restore notification");
                        // `setup-namespaces` names the root first, before the tree runs; if we
                        // die after it, CRIU may still finish, and the journal knows the pid.
                        if let (Some(pid), Some(f)) = (pid.filter(|p| *p > 0), on_pid.take()) {
                            f(pid);
                        }
                        worker.answer_notify(true).await?;
                    }
                    Event::Done(resp) => return Ok::<_, CriuError>(resp),
                }
            }
        }
        .await;
        let elapsed = started.elapsed();
        worker.finish().await;
        let resp = resp?;
        match (&resp.restore, resp.success) {
            (Some(r), true) if r.pid > 0 => Ok(Restored {
                pid: r.pid,
                elapsed,
            }),
            _ => Err(failure("restore", &resp, &images.join(RESTORE_LOG))),
        }
    }
}

/// What a dump takes as given from outside the tree: nothing for a plain process tree; for a
/// container, what its runtime set up and restores itself (the runtime's own dump does the same,
/// so that the runtime can restore the images: see `container`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DumpScope {
    /// The tree's root directory (the container's root file system), if not `/`.
    pub root: Option<String>,
    /// Mounts the restorer provides, by their path in the tree (bind mounts, cgroup mounts).
    pub external_mounts: Vec<String>,
    /// Other external resources, in CRIU's `--external` syntax (`net[<inode>]:extRootNetNS`).
    pub external: Vec<String>,
    /// The freezer cgroup that holds exactly the tree: CRIU freezes through it.
    pub freeze_cgroup: Option<String>,
    /// Dump the tree's cgroups (the restorer puts them back).
    pub manage_cgroups: bool,
}

impl DumpScope {
    fn apply(&self, opts: &mut rpc::Opts) {
        opts.root.clone_from(&self.root);
        opts.ext_mnt = self
            .external_mounts
            .iter()
            .map(|m| rpc::ExtMountMap {
                key: m.clone(),
                val: m.clone(),
            })
            .collect();
        opts.external.clone_from(&self.external);
        opts.freeze_cgroup.clone_from(&self.freeze_cgroup);
        opts.manage_cgroups = self.manage_cgroups.then_some(true);
    }
}

/// Points of a dump at which CRIU waits for tether.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DumpPoint {
    /// CRIU is set up (its kernel probing done); the tree still runs (`pre-dump`).
    PreFreeze,
    /// The tree is frozen; nothing is dumped yet (`query-ext-files`, or `network-lock` when a
    /// network namespace is dumped): the caller locks its connections here.
    Frozen,
    /// The images are complete (`post-dump`); the tree is held frozen and locked.
    Dumped,
}

impl DumpPoint {
    fn of(script: &str) -> Option<DumpPoint> {
        match script {
            "pre-dump" => Some(DumpPoint::PreFreeze),
            "network-lock" | "query-ext-files" => Some(DumpPoint::Frozen),
            "post-dump" => Some(DumpPoint::Dumped),
            _ => None,
        }
    }
}

/// A dump in progress, stopped at a [`DumpPoint`] or between points.
#[derive(Debug)]
pub struct DumpSession {
    worker: Worker,
    images: PathBuf,
    /// The freeze point was seen (CRIU may name it twice).
    frozen: bool,
    /// The point CRIU waits at for our answer, if any.
    at: Option<DumpPoint>,
    /// Post-dump was answered with success.
    committed: bool,
}

impl DumpSession {
    /// Lets CRIU go on from the point it waits at (if any) and returns at the next point.
    /// Cancel-safe: dropped while waiting, the session is between points and
    /// [`rollback`](Self::rollback) hangs up.
    pub async fn next(&mut self) -> Result<DumpPoint, CriuError> {
        if self.at.take().is_some() {
            self.worker.answer_notify(true).await?;
        }
        loop {
            match self.worker.next().await? {
                Event::Notify { script, .. } => {
                    tracing::debug!(%script, "criu dump notification");
                    match DumpPoint::of(&script) {
                        Some(DumpPoint::Frozen) if self.frozen => {}
                        Some(p) => {
                            if p == DumpPoint::Frozen {
                                self.frozen = true;
                            }
                            self.at = Some(p);
                            return Ok(p);
                        }
                        None => {}
                    }
                    self.worker.answer_notify(true).await?;
                }
                Event::Done(resp) => {
                    return Err(failure("dump", &resp, &self.images.join(DUMP_LOG)));
                }
            }
        }
    }

    /// Answers post-dump with success, on a dump held at [`DumpPoint::Dumped`]: CRIU kills the
    /// tree. From here on it cannot come back: CRIU unlocks the network only on a failed answer,
    /// so its connections stay locked (CRIU's nftables table remains until the caller removes
    /// it) whatever CRIU does next.
    pub async fn answer_commit(&mut self) -> Result<(), CriuError> {
        if self.at.take() != Some(DumpPoint::Dumped) {
            return Err(CriuError::Protocol(
                "commit of a dump that is not held at post-dump".into(),
            ));
        }
        self.committed = true;
        self.worker.answer_notify(true).await
    }

    /// After [`answer_commit`](Self::answer_commit): waits until CRIU has ended the tree.
    pub async fn commit(self) -> Result<(), CriuError> {
        if !self.committed {
            return Err(CriuError::Protocol(
                "commit before the commit answer".into(),
            ));
        }
        let resp = wait_done(&self.worker).await;
        self.worker.finish().await;
        let resp = resp?;
        if resp.success {
            Ok(())
        } else {
            Err(failure("dump (commit)", &resp, &self.images.join(DUMP_LOG)))
        }
    }

    /// Abandons the dump: CRIU unlocks the network and thaws the tree (or never froze it),
    /// which runs on as if nothing happened. At a point, CRIU is answered "failed"; between
    /// points, its socket is closed, which it takes the same way at its next point. Returns
    /// once CRIU has finished.
    pub async fn rollback(mut self) -> Result<(), CriuError> {
        if self.at.take().is_none() {
            self.worker.hang_up().await;
            return Ok(());
        }
        self.worker.answer_notify(false).await?;
        // CRIU answers with a failed dump response after it has resumed the tree.
        let resp = wait_done(&self.worker).await;
        self.worker.finish().await;
        match resp {
            Ok(r) if !r.success => Ok(()),
            Ok(_) => Err(CriuError::Protocol(
                "CRIU reported success after a refused notification".into(),
            )),
            Err(e) => Err(e),
        }
    }
}

async fn wait_done(worker: &Worker) -> Result<Resp, CriuError> {
    loop {
        match worker.next().await? {
            Event::Notify { .. } => worker.answer_notify(true).await?,
            Event::Done(resp) => return Ok(resp),
        }
    }
}

/// A restored tree.
#[derive(Debug, Clone, Copy)]
pub struct Restored {
    /// Host pid of the restored root.
    pub pid: i32,
    /// Wall time of the restore request.
    pub elapsed: Duration,
}

fn failure(op: &'static str, resp: &Resp, log: &Path) -> CriuError {
    // CRIU's errmsg is its first logged error, often the harmless RLIMIT_NOFILE one on machines
    // without CAP_SYS_RESOURCE.
    let mut detail = resp
        .cr_errmsg
        .clone()
        .filter(|m| !m.contains("RLIMIT_NOFILE"))
        .unwrap_or_default()
        .trim()
        .to_string();
    let errors = log_errors(log);
    if !errors.is_empty() {
        if !detail.is_empty() {
            detail.push_str("; ");
        }
        detail.push_str(&errors);
    }
    if detail.is_empty() {
        detail = format!("no message (see {})", log.display());
    }
    CriuError::Failed {
        op,
        errno: resp.cr_errno,
        detail,
    }
}

/// The error lines of a CRIU log (the last few), joined.
pub fn log_errors(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("Error") && !l.contains("RLIMIT_NOFILE"))
        .collect();
    let tail = &lines[lines.len().saturating_sub(4)..];
    tail.iter()
        .map(|l| l.trim())
        .collect::<Vec<_>>()
        .join(" | ")
}
