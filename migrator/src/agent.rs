//! The destination agent (`tether agent`): accepts migrations over QUIC with mutual TLS, receives
//! image sets, restores them and hands the result back to the source.
//!
//! Per migration, the agent's side of the sequence (see [`crate::wire`] for the messages):
//!
//! 1. `Hello`: check the service address is not configured here and pick its interface; refuse
//!    otherwise, changing nothing.
//! 2. `Frozen` (the source tree is frozen): add the service address, drop inbound packets to it.
//! 3. `File`s: write the images to a private tmpfs directory. `FinalPages`: the page maps are
//!    all here; start writing CRIU's pages files from the pre-copied pages (on a blocking
//!    thread, while the source compares its dump), and keep the final difference's batches.
//! 4. `ImagesDone`: patch the final difference into the pages files (a listed page nobody sent
//!    fails here), rename the block to CRIU's lock table name of this dump (so `criu restore`
//!    lifts it exactly when the connections go live), announce the address on the LAN, restore.
//!    Answer `Restored` or, after undoing everything, `Failed`.
//! 5. `Commit`: keep the service. `Abort`, a lost connection or a timeout before `Commit`: kill
//!    the restored copy and undo everything; the source keeps (or takes back) the service.
//!
//! Every change to the host is recorded in a state file first, so an agent that was killed
//! half-way undoes the leftovers when it starts again.

use std::collections::HashSet;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{error, info, info_span, warn, Instrument};

use crate::criu::lazy::LazyPages;
use crate::criu::pages::{self, MemoryImages, Owner};
use crate::criu::rebuild::PagesDraft;
use crate::criu::{self, Criu, CriuError};
use crate::hostnet::{self, Link, NetError, ServiceAddr};
use crate::metrics::{AgentMetrics, Outcome};
use crate::pagestore::{merge_ranges, PageStore};
use crate::report::CriuRestoreStats;
use crate::tls::{self, Identity};
use crate::transport::{self, Frame, FrameReceiver, FrameSender, TransportError};
use crate::wire::{self, FromAgent, MigrationId, PageBatch, ToAgent, WireError};

/// How long the agent waits for the source's `Commit` after `Restored`.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the agent waits for any other message.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Host certificate directory (`ca.pem`, `cert.pem`, `key.pem`).
    pub certs: PathBuf,
    /// Interface for service addresses; by default the one whose subnet contains the address.
    pub interface: Option<String>,
    /// Where image sets are received (should be tmpfs).
    pub work_dir: PathBuf,
    /// Where in-flight migrations are recorded for crash recovery.
    pub state_dir: PathBuf,
    /// Largest image set accepted, in bytes.
    pub max_image_bytes: u64,
    /// CRIU log level.
    pub criu_log_level: i32,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Whether to restore memory lazily (userfaultfd).
    pub lazy_restore: LazyRestore,
}

/// Whether the agent restores memory lazily: the service runs as soon as its mappings exist and
/// a local `criu lazy-pages` daemon fills them in from the received pages files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LazyRestore {
    /// Lazily when CRIU's `lazy_pages` feature check passes here, else fully.
    #[default]
    Auto,
    /// Always lazily; the agent does not start where the feature check fails.
    Always,
    /// Never: copy all memory during the restore.
    Never,
}

/// How long a lazy-pages daemon may take to listen before the restore falls back to a full one.
const LAZY_READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping agent waits for committed lazy restores to finish filling in memory.
const LAZY_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long a lazy-pages daemon may take to fill a restored service's memory.
const LAZY_FILL_TIMEOUT: Duration = Duration::from_secs(120);

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// TLS or endpoint setup.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// CRIU is unusable.
    #[error(transparent)]
    Criu(#[from] CriuError),
    /// Local setup.
    #[error("{0}")]
    Setup(String),
}

/// Shared agent state.
#[derive(Debug)]
struct Ctx {
    cfg: AgentConfig,
    criu: Criu,
    /// Service addresses with a migration in flight here.
    busy: Mutex<HashSet<Ipv4Addr>>,
    /// Restored services this agent is the parent of, reaped when they exit.
    children: Arc<Mutex<Vec<i32>>>,
    metrics: Arc<AgentMetrics>,
    /// Restores are lazy (see [`LazyRestore`]).
    lazy: bool,
    /// Committed lazy restores whose memory is still being filled in.
    lazy_fills: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let identity = Identity::load(&cfg.certs).map_err(TransportError::from)?;
    // Restored services are created as siblings of CRIU, i.e. our children; orphans of theirs
    // come to us too and are reaped at once (PID 1 here reaps late).
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| AgentError::Setup(format!("cannot become a child subreaper: {e}")))?;
    let criu = Criu::locate().await?.with_log_level(cfg.criu_log_level);
    let lazy = match cfg.lazy_restore {
        LazyRestore::Never => false,
        LazyRestore::Auto => criu.lazy_pages_supported().await,
        LazyRestore::Always => {
            if !criu.lazy_pages_supported().await {
                return Err(AgentError::Setup(
                    "lazy restore asked for, but CRIU's lazy_pages feature check fails here \
                     (userfaultfd with non-cooperative events is needed)"
                        .into(),
                ));
            }
            true
        }
    };
    for d in [&cfg.work_dir, &cfg.state_dir] {
        create_private_dir(d).map_err(|e| AgentError::Setup(format!("{}: {e}", d.display())))?;
    }
    let metrics = Arc::new(AgentMetrics::default());
    let undone = recover_leftovers(&cfg.state_dir).await;
    metrics.leftovers_undone_total.add(undone);
    let metrics_server = match cfg.metrics {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| AgentError::Setup(format!("cannot serve metrics on {addr}: {e}")))?;
            info!(%addr, "serving metrics at /metrics");
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
            )))
        }
        None => None,
    };
    let endpoint = transport::server(&identity, cfg.listen)?;
    info!(listen = %cfg.listen, criu = %criu.path().display(), lazy_restore = lazy, "agent ready");
    let ctx = Arc::new(Ctx {
        cfg,
        criu,
        busy: Mutex::new(HashSet::new()),
        children: Arc::new(Mutex::new(Vec::new())),
        metrics,
        lazy,
        lazy_fills: Mutex::new(Vec::new()),
    });
    let reaper = tokio::spawn(reap(ctx.children.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => handle_connection(ctx, conn).await,
                        // Includes peers without a certificate from our CA.
                        Err(e) => {
                            ctx.metrics.connections_refused_total.inc();
                            warn!(%remote, "refused connection: {e}");
                        }
                    }
                });
            }
        }
    }
    endpoint.close(0u32.into(), b"agent shutting down");
    // Fills of committed lazy restores finish by themselves (their daemons are detached), but
    // their image sets are removed only by the task that waits for them: give them a moment.
    let fills: Vec<_> = std::mem::take(&mut *lock(&ctx.lazy_fills))
        .into_iter()
        .filter(|f| !f.is_finished())
        .collect();
    if !fills.is_empty() {
        info!(
            n = fills.len(),
            "waiting up to {} s for lazy restores to fill in memory",
            LAZY_SHUTDOWN_WAIT.as_secs()
        );
        let deadline = tokio::time::Instant::now() + LAZY_SHUTDOWN_WAIT;
        for f in fills {
            if tokio::time::timeout_at(deadline, f).await.is_err() {
                warn!(
                    "a lazy restore is still filling in memory; its daemon carries on, its image \
                     set stays in {}",
                    ctx.cfg.work_dir.display()
                );
            }
        }
    }
    reaper.abort();
    if let Some(m) = metrics_server {
        m.abort();
    }
    info!("agent stopped");
    Ok(())
}

/// Locks `m`, also after a panic elsewhere poisoned it: the agent's shared lists stay usable
/// (each update is a single insert, remove or retain).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn reap(children: Arc<Mutex<Vec<i32>>>) {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let mut list = lock(&children);
        list.retain(|&pid| {
            match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => true,
                Ok(status) => {
                    info!(pid, ?status, "restored service exited");
                    false
                }
                Err(_) => false,
            }
        });
    }
}

fn create_private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
}

async fn handle_connection(ctx: Arc<Ctx>, conn: quinn::Connection) {
    let peer = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| chain.first().map(tls::peer_name))
        .unwrap_or_else(|| "unknown".into());
    let remote = conn.remote_address();
    info!(%remote, %peer, "authenticated peer connected");
    let (send, recv) = match tokio::time::timeout(MESSAGE_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(%remote, "peer left: {e}");
            return;
        }
        Err(_) => {
            warn!(%remote, "peer opened no stream");
            return;
        }
    };
    let mut tx = FrameSender(send);
    let mut rx = FrameReceiver(recv);
    let hello: ToAgent = match rx.message_within(MESSAGE_TIMEOUT, "hello").await {
        Ok(m) => m,
        Err(e) => {
            warn!(%remote, "bad opening: {e}");
            ctx.metrics.ended(Outcome::Refused);
            let _ = tx
                .send(&FromAgent::Refused {
                    reason: e.to_string(),
                })
                .await;
            return;
        }
    };
    let ToAgent::Hello {
        protocol,
        migration_id,
        service_addr,
    } = hello
    else {
        ctx.metrics.ended(Outcome::Refused);
        let _ = tx
            .send(&FromAgent::Refused {
                reason: "expected hello".into(),
            })
            .await;
        return;
    };
    let span = info_span!("migration", id = %migration_id, service = %service_addr, %peer);
    async move {
        if protocol != wire::PROTOCOL {
            let reason = format!(
                "protocol {protocol} not supported (this agent speaks {})",
                wire::PROTOCOL
            );
            ctx.metrics.ended(Outcome::Refused);
            let _ = tx.send(&FromAgent::Refused { reason }).await;
            return;
        }
        let claimed = lock(&ctx.busy).insert(service_addr.addr());
        if !claimed {
            let reason = format!("a migration of {service_addr} is already in progress here");
            ctx.metrics.ended(Outcome::Refused);
            let _ = tx.send(&FromAgent::Refused { reason }).await;
            return;
        }
        let in_flight = InFlight::new(&ctx, service_addr.addr());
        let outcome = migration(&ctx, &migration_id, service_addr, &mut tx, &mut rx).await;
        ctx.metrics.ended(outcome);
        drop(in_flight);
        let _ = tx.0.finish();
        // Give the last message time to leave before the connection is dropped.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    }
    .instrument(span)
    .await
}

/// A migration in flight here: counted in the metrics and holding its service address in
/// `busy`, until dropped (also when the migration's task unwinds from a panic).
struct InFlight<'a> {
    ctx: &'a Ctx,
    addr: Ipv4Addr,
}

impl<'a> InFlight<'a> {
    /// Counts a migration of `addr`, whose address the caller has claimed in `busy`.
    fn new(ctx: &'a Ctx, addr: Ipv4Addr) -> InFlight<'a> {
        ctx.metrics.migrations_in_progress.add(1);
        InFlight { ctx, addr }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.ctx.metrics.migrations_in_progress.add(-1);
        lock(&self.ctx.busy).remove(&self.addr);
    }
}

/// What this agent has changed on the host for one migration, in order to undo it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Provision {
    migration_id: String,
    service_addr: ServiceAddr,
    dev: String,
    address_added: bool,
    tables: Vec<String>,
    restored: Option<(i32, u64)>,
    /// The lazy-pages daemon serving this image set, until the commit.
    #[serde(default)]
    lazy_daemon: Option<(i32, u64)>,
    images: PathBuf,
    #[serde(skip)]
    record: PathBuf,
}

impl Provision {
    fn save(&self) {
        let write = || -> std::io::Result<()> {
            let tmp = self.record.with_extension("tmp");
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&serde_json::to_vec(self).unwrap_or_default())?;
            // No fsync: the record guards against an agent crash (the page cache survives it);
            // a machine crash takes the restored processes with it. It is on the critical path.
            std::fs::rename(&tmp, &self.record)
        };
        if let Err(e) = write() {
            warn!(
                "cannot record migration state in {}: {e}",
                self.record.display()
            );
        }
    }

    fn forget(&self) {
        let _ = std::fs::remove_file(&self.record);
        let _ = std::fs::remove_dir_all(&self.images);
    }

    /// Kills the restored copy, if it is still the process that was restored.
    fn kill_restored(&mut self) {
        if let Some((pid, start)) = self.restored.take() {
            if kill_if_same(pid, start) {
                info!(pid, "killed the restored copy");
            }
        }
    }

    /// Undoes everything: kills a restored copy, then its lazy-pages daemon (in that order: a
    /// live copy whose daemon is gone reads zeros where its memory has not come yet), removes the
    /// address, lifts blocks, removes the images.
    ///
    /// The address goes before the blocks: once the gratuitous ARP before the restore has pulled
    /// the clients' packets here, a block lifted while the address is still local lets them reach
    /// whatever else listens on the service's port on this host (or no socket at all), which
    /// answers with a reset and kills the very connections the rollback keeps on the source.
    /// Without the address, this host drops them and they are retransmitted toward the source.
    async fn undo(&mut self) {
        self.kill_restored();
        if let Some((pid, start)) = self.lazy_daemon.take() {
            if kill_if_same(pid, start) {
                info!(pid, "killed the lazy-pages daemon");
            }
        }
        if self.address_added {
            if let Err(e) = hostnet::remove_address(self.service_addr, &self.dev).await {
                error!("cannot remove {} from {}: {e}", self.service_addr, self.dev);
            }
            self.address_added = false;
        }
        for t in std::mem::take(&mut self.tables) {
            if let Err(e) = hostnet::delete_table(&t).await {
                error!("cannot remove block table {t}: {e}");
            }
        }
        self.forget();
        info!("destination side undone");
    }
}

/// Sends SIGKILL to `pid` if it is still the process that started at `start`; returns whether.
fn kill_if_same(pid: i32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
}

/// The start time of a process (field 22 of /proc/PID/stat), to tell it from a later process
/// that reuses its pid.
fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Undoes every migration an earlier agent left unfinished in `state_dir`; returns how many.
async fn recover_leftovers(state_dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return 0;
    };
    let mut undone = 0;
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("json") {
            continue;
        }
        match std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Provision>(&b).ok())
        {
            Some(mut p) => {
                warn!(id = %p.migration_id, "undoing a migration left unfinished by an earlier agent");
                p.record = path.clone();
                p.undo().await;
                undone += 1;
            }
            None => {
                warn!("removing unreadable state file {}", path.display());
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    undone
}

/// A failure on the destination, reported to the source.
struct Failure {
    phase: &'static str,
    reason: String,
}

fn fail(phase: &'static str) -> impl FnOnce(String) -> Failure {
    move |reason| Failure { phase, reason }
}

async fn migration(
    ctx: &Ctx,
    id: &MigrationId,
    svc: ServiceAddr,
    tx: &mut FrameSender,
    rx: &mut FrameReceiver,
) -> Outcome {
    // 1. Hello: nothing is changed until the source is frozen.
    let dev = match hostnet::choose_interface(svc, ctx.cfg.interface.as_deref()).await {
        Ok(d) => d,
        Err(e) => {
            info!("refused: {e}");
            let _ = tx
                .send(&FromAgent::Refused {
                    reason: e.to_string(),
                })
                .await;
            return Outcome::Refused;
        }
    };
    let link = match Link::lookup(&dev) {
        Ok(l) => l,
        Err(e) => {
            let _ = tx
                .send(&FromAgent::Refused {
                    reason: e.to_string(),
                })
                .await;
            return Outcome::Refused;
        }
    };
    let images = ctx.cfg.work_dir.join(id.as_str());
    if let Err(e) = create_private_dir(&images) {
        let reason = format!("cannot create {}: {e}", images.display());
        let _ = tx.send(&FromAgent::Refused { reason }).await;
        return Outcome::Refused;
    }
    let mut prov = Provision {
        migration_id: id.to_string(),
        service_addr: svc,
        dev: dev.clone(),
        address_added: false,
        tables: Vec::new(),
        restored: None,
        lazy_daemon: None,
        images: images.clone(),
        record: ctx.cfg.state_dir.join(format!("{id}.json")),
    };
    if tx
        .send(&FromAgent::Ready {
            interface: dev.clone(),
        })
        .await
        .is_err()
    {
        // The source left before it heard us; nothing here changed.
        prov.forget();
        return Outcome::Failed;
    }
    info!(%dev, "accepted");

    let lazy = match receive_and_restore(ctx, id, &mut prov, link, tx, rx).await {
        Ok(lazy) => lazy,
        Err(Failure { phase, reason }) => {
            error!(phase, "migration failed: {reason}");
            prov.undo().await;
            let _ = tx
                .send(&FromAgent::Failed {
                    phase: phase.to_string(),
                    reason,
                })
                .await;
            return Outcome::Failed;
        }
    };

    // 5. Wait for the source's decision.
    let decision: Result<ToAgent, TransportError> =
        rx.message_within(COMMIT_TIMEOUT, "commit").await;
    match decision {
        Ok(ToAgent::Commit) => {
            // The service is ours now: nothing may kill its lazy-pages daemon any more.
            let mut lazy = lazy;
            if let Some(d) = lazy.as_mut() {
                d.detach();
            }
            // Answer first: the source resumes the clients' traffic on this answer.
            let _ = tx.send(&FromAgent::Committed).await;
            let pid = prov.restored.map(|(p, _)| p).unwrap_or(-1);
            info!(pid, "committed: the service runs here");
            match lazy {
                // The daemon still reads the pages files: they go when it is done.
                Some(daemon) => {
                    let _ = std::fs::remove_file(&prov.record);
                    let fill = tokio::spawn(
                        finish_lazy(daemon, prov.images.clone(), ctx.metrics.clone())
                            .in_current_span(),
                    );
                    let mut fills = lock(&ctx.lazy_fills);
                    fills.retain(|f| !f.is_finished());
                    fills.push(fill);
                }
                None => prov.forget(),
            }
            Outcome::Committed
        }
        undecided => {
            match undecided {
                Ok(ToAgent::Abort { reason }) => {
                    warn!("source aborted after the restore: {reason}")
                }
                Ok(other) => warn!("unexpected {other:?} instead of commit; undoing"),
                Err(e) => {
                    warn!("no commit from the source ({e}); undoing, the source keeps the service")
                }
            }
            // The restored copy goes before its daemon (undo kills both, in that order).
            prov.undo().await;
            drop(lazy);
            Outcome::Undone
        }
    }
}

async fn receive_and_restore(
    ctx: &Ctx,
    id: &MigrationId,
    prov: &mut Provision,
    link: Link,
    tx: &mut FrameSender,
    rx: &mut FrameReceiver,
) -> Result<Option<LazyPages>, Failure> {
    let svc = prov.service_addr;
    let own_table = format!("tether-{id}");
    let mut store = PageStore::new(ctx.cfg.max_image_bytes);
    let mut frozen = false;
    let mut files: u32 = 0;
    let mut bytes: u64 = 0;
    let mut final_pages: u64 = 0;
    let mut precopy_pages: u64 = 0;
    let transfer = fail("transfer");
    // The rebuild of CRIU's pages files starts once the page maps are here (FinalPages) and
    // runs while the source compares its dump; a failure waits for it before anything is
    // undone, so that it does not write into a directory being removed.
    let mut draft: Option<DraftTask> = None;
    // The lazy-pages daemon (lazy restores) starts with the rebuild: it reads the process tree
    // from the image files, all here by then, and has its start-up done before the restore.
    let mut lazy: Option<LazyPages> = None;
    let received: Result<(), Failure> = async {
        loop {
            let frame = tokio::time::timeout(MESSAGE_TIMEOUT, rx.next())
                .await
                .map_err(|_| fail("transfer")("no message from the source in time".into()))?
                .map_err(|e| match e {
                    TransportError::PeerAborted(why) => {
                        fail("transfer")(format!("source aborted: {why}"))
                    }
                    other => fail("transfer")(other.to_string()),
                })?;
            let msg: ToAgent = match frame {
                Some(Frame::Control(body)) => {
                    wire::decode(&body).map_err(|e| fail("transfer")(e.to_string()))?
                }
                Some(Frame::Pages(body)) => {
                    // Pre-copy pages (checked against the announced layout) or, after FinalPages,
                    // the final difference (checked against the dump's page maps).
                    let batch =
                        PageBatch::decode(&body).map_err(|e| fail("transfer")(e.to_string()))?;
                    ctx.metrics.received_bytes_total.add(body.len() as u64);
                    match draft.as_mut() {
                        None if !frozen => {
                            precopy_pages += batch.pages.len() as u64;
                            ctx.metrics
                                .precopy_pages_total
                                .add(batch.pages.len() as u64);
                        }
                        None => {
                            return Err(fail("transfer")(
                                "pages after the freeze but before the final difference".into(),
                            ))
                        }
                        Some(d) => {
                            let owner = Owner::from_code(batch.owner).ok_or_else(|| {
                                fail("transfer")(format!("bad page owner {:#x}", batch.owner))
                            })?;
                            if let Some((a, _)) = batch
                                .pages
                                .iter()
                                .find(|(a, _)| !d.images.has_data_at(owner, *a))
                            {
                                return Err(fail("transfer")(format!(
                                    "final page {a:#x} of {owner} is not in the dump's page map"
                                )));
                            }
                            final_pages += batch.pages.len() as u64;
                            ctx.metrics.final_pages_total.add(batch.pages.len() as u64);
                            d.bytes = d.bytes.saturating_add(body.len() as u64);
                            if d.bytes > ctx.cfg.max_image_bytes {
                                return Err(fail("transfer")(format!(
                                    "the final difference exceeds {} bytes",
                                    ctx.cfg.max_image_bytes
                                )));
                            }
                            d.pages.push((owner, batch));
                            continue;
                        }
                    }
                    store
                        .apply(&batch)
                        .map_err(|e| fail("transfer")(e.to_string()))?;
                    continue;
                }
                Some(Frame::Data(_)) => {
                    return Err(fail("transfer")("file data without a file".into()));
                }
                None => return Err(fail("transfer")("the source closed the stream".into())),
            };
            match msg {
                ToAgent::Layout { owner, ranges } if !frozen => {
                    store
                        .announce(owner, ranges)
                        .map_err(|e| fail("transfer")(e.to_string()))?;
                }
                ToAgent::RoundEnd { round } if !frozen => {
                    info!(
                        round,
                        pages_held = store.len(),
                        precopy_pages,
                        "pre-copy round stored"
                    );
                    tx.send(&FromAgent::RoundAck {
                        round,
                        pages_held: store.len() as u64,
                    })
                    .await
                    .map_err(|e| fail("transfer")(e.to_string()))?;
                }
                ToAgent::Frozen if !frozen => {
                    // 2. The source is frozen: take the address, but drop its packets for now.
                    frozen = true;
                    prov.tables.push(own_table.clone());
                    prov.address_added = true;
                    prov.save();
                    hostnet::block_inbound(&own_table, svc.addr(), &prov.dev)
                        .await
                        .map_err(|e| fail("prepare")(e.to_string()))?;
                    hostnet::add_address(svc, &prov.dev)
                        .await
                        .map_err(|e| fail("prepare")(e.to_string()))?;
                    info!(
                        precopy_pages,
                        pages_held = store.len(),
                        "service address added and blocked"
                    );
                }
                ToAgent::File { name, size } if frozen && draft.is_none() => {
                    // 3. An image file (page data comes as the final difference, never as a file).
                    wire::check_file_name(&name).map_err(|e| fail("transfer")(e.to_string()))?;
                    if pages::is_pages_file(&name) {
                        return Err(fail("transfer")(format!(
                            "page data file {name} sent as a file"
                        )));
                    }
                    if criu::lazy::is_daemon_file(&name) {
                        return Err(fail("transfer")(format!(
                            "{name} is the lazy-pages daemon's own file, not an image"
                        )));
                    }
                    files += 1;
                    bytes = bytes.saturating_add(size);
                    if files > wire::MAX_FILES || bytes > ctx.cfg.max_image_bytes {
                        return Err(fail("transfer")(format!(
                            "image set exceeds the limits ({files} files, {bytes} bytes; at most {} files, {} bytes)",
                            wire::MAX_FILES,
                            ctx.cfg.max_image_bytes
                        )));
                    }
                    receive_file(rx, &prov.images.join(&name), size)
                        .await
                        .map_err(fail("transfer"))?;
                    ctx.metrics.received_bytes_total.add(size);
                }
                ToAgent::FinalPages if frozen && draft.is_none() => {
                    // The dump's page maps define what the final difference may carry; pre-copied
                    // pages outside them are not needed.
                    let images = MemoryImages::load(&prov.images)
                        .map_err(|e| fail("transfer")(format!("the dump's page maps: {e}")))?;
                    for map in &images.maps {
                        let ranges = merge_ranges(
                            map.entries
                                .iter()
                                .filter(|e| e.has_data())
                                .map(|e| (e.vaddr, e.end())),
                        );
                        store
                            .announce(map.owner.code(), ranges)
                            .map_err(|e| fail("transfer")(e.to_string()))?;
                    }
                    // Write what is held now; the final difference patches it.
                    let held = std::mem::replace(&mut store, PageStore::new(0));
                    let (maps, dir) = (images.clone(), prov.images.clone());
                    let task = tokio::task::spawn_blocking(move || {
                        let t = Instant::now();
                        let d = maps
                            .draft_pages(&dir, |owner, vaddr| held.get(owner.code(), vaddr));
                        (d, t.elapsed())
                    });
                    draft = Some(DraftTask {
                        task,
                        images,
                        pages: Vec::new(),
                        bytes: 0,
                    });
                    if ctx.lazy {
                        match ctx.criu.start_lazy_pages(&prov.images) {
                            Ok(d) => {
                                // Recorded, so that an agent restarted after a crash kills it.
                                prov.lazy_daemon = d
                                    .pid()
                                    .and_then(|p| i32::try_from(p).ok())
                                    .and_then(|p| process_start_time(p).map(|t| (p, t)));
                                prov.save();
                                lazy = Some(d);
                            }
                            Err(e) => warn!("no lazy restore this time: {e}"),
                        }
                    }
                }
                ToAgent::ImagesDone {
                    files: n,
                    bytes: b,
                    final_pages: p,
                } => {
                    if n != files || b != bytes || p != final_pages {
                        return Err(fail("transfer")(format!(
                            "source announced {n} files / {b} bytes / {p} final pages, received {files} / {bytes} / {final_pages}"
                        )));
                    }
                    let Some(d) = draft.take() else {
                        return Err(fail("transfer")(
                            "images done before the final difference".into(),
                        ));
                    };
                    // Complete CRIU's page data files with the final difference; a page the dump
                    // needs and nobody sent fails the migration here.
                    let t = Instant::now();
                    let (pages, task) = (d.pages, d.task);
                    let (drafted, draft_time) = task
                        .await
                        .map_err(|e| fail("rebuild")(format!("the rebuild thread failed: {e}")))?;
                    let mut drafted = drafted.map_err(|e| fail("rebuild")(e.to_string()))?;
                    let waited = t.elapsed();
                    ctx.metrics.rebuild_wait_duration.observe(waited);
                    let totals = tokio::task::block_in_place(|| {
                        for (owner, b) in &pages {
                            drafted.patch(*owner, b.pages.iter().map(|(a, p)| (*a, p.as_deref())))?;
                        }
                        drafted.finish()
                    })
                    .map_err(|e| fail("rebuild")(e.to_string()))?;
                    info!(
                        ?totals,
                        draft_ms = draft_time.as_secs_f64() * 1e3,
                        waited_ms = waited.as_secs_f64() * 1e3,
                        ms = t.elapsed().as_secs_f64() * 1e3,
                        "page data rebuilt"
                    );
                    break;
                }
                ToAgent::Abort { reason } => {
                    return Err(transfer(format!("source aborted: {reason}")));
                }
                other => {
                    return Err(fail("transfer")(
                        WireError::Unexpected {
                            got: format!("{other:?}"),
                            expected: "the next message of the migration sequence",
                        }
                        .to_string(),
                    ));
                }
            }
        }
        Ok(())
    }
    .await;
    if let Err(f) = received {
        if let Some(d) = draft.take() {
            let _ = d.task.await;
        }
        return Err(f);
    }
    info!(files, bytes, "image set received");

    // 4. Restore. The block moves to the name CRIU's restore deletes as connections go live.
    let t0 = Instant::now();
    let lock_table =
        criu::images::lock_table_name(&prov.images).map_err(|e| fail("restore")(e.to_string()))?;
    prov.tables.push(lock_table.clone());
    prov.save();
    hostnet::move_block(&own_table, &lock_table, svc.addr(), &prov.dev)
        .await
        .map_err(|e| fail("restore")(e.to_string()))?;
    prov.tables.retain(|t| *t != own_table);
    // Peers' packets must take the new path before the restored sockets go live.
    link.announce(svc.addr())
        .map_err(|e: NetError| fail("restore")(e.to_string()))?;
    if let Some(d) = lazy.as_mut() {
        if let Err(e) = d.ready(LAZY_READY_TIMEOUT).await {
            warn!("restoring fully: {e}");
            lazy = None;
            prov.lazy_daemon = None;
        }
    }
    let restored = ctx
        .criu
        .restore(&prov.images, lazy.is_some())
        .await
        .map_err(|e| fail("restore")(e.to_string()))?;
    let restore_time = t0.elapsed();
    ctx.metrics.restore_duration.observe(restore_time);
    let restore_ms = restore_time.as_secs_f64() * 1e3;
    if let Ok(mut c) = ctx.children.lock() {
        c.push(restored.pid);
    }
    prov.restored = process_start_time(restored.pid).map(|s| (restored.pid, s));
    prov.tables.clear();
    prov.save();
    // Zeros where CRIU wrote no statistics (the source reports those as zeros too).
    let mut stats = criu::images::stats(&prov.images.join("stats-restore"))
        .ok()
        .flatten()
        .and_then(|s| s.restore)
        .map(|r| CriuRestoreStats {
            forking_time_us: r.forking_time,
            restore_time_us: r.restore_time,
            pages_restored: r.pages_restored.unwrap_or(0),
            ..Default::default()
        })
        .unwrap_or_default();
    stats.lazy = lazy.is_some();
    info!(
        pid = restored.pid,
        restore_ms,
        lazy = lazy.is_some(),
        "restored"
    );
    // Answer first: the source resumes the clients' traffic on this message.
    tx.send(&FromAgent::Restored {
        pid: restored.pid,
        restore_ms,
        criu_restore_ms: restored.elapsed.as_secs_f64() * 1e3,
        stats: Some(stats),
    })
    .await
    .map_err(|e| {
        // The restored copy goes before its lazy-pages daemon (dropped on return).
        prov.kill_restored();
        fail("restore")(e.to_string())
    })?;
    // CRIU deleted the lock table when the connections went live; if it did not (a CRIU that
    // names its table differently), the block must still go, or the service stays unreachable.
    if hostnet::inet_tables()
        .await
        .map(|t| t.contains(&lock_table))
        .unwrap_or(false)
    {
        warn!(table = %lock_table, "CRIU did not lift the block as the connections went live; lifting it now");
        if let Err(e) = hostnet::delete_table(&lock_table).await {
            error!("cannot lift the block {lock_table}: {e}");
        }
    }
    Ok(lazy)
}

/// After a lazily restored service is committed: waits for its (detached) lazy-pages daemon to
/// put every page in place, then removes the image set it read from. A daemon that takes longer
/// than [`LAZY_FILL_TIMEOUT`] is reported and waited for, never killed.
async fn finish_lazy(mut daemon: LazyPages, images: PathBuf, metrics: Arc<AgentMetrics>) {
    let result = match tokio::time::timeout(LAZY_FILL_TIMEOUT, daemon.wait()).await {
        Ok(r) => r,
        Err(_) => {
            metrics.lazy_failures_total.inc();
            error!(
                "lazy restore still filling memory after {} s; waiting on",
                LAZY_FILL_TIMEOUT.as_secs()
            );
            daemon.wait().await
        }
    };
    match result {
        Ok(took) => {
            metrics.lazy_fill_duration.observe(took);
            info!(
                ms = took.as_secs_f64() * 1e3,
                "lazy restore done: all memory in place"
            );
        }
        Err(e) => {
            metrics.lazy_failures_total.inc();
            // The service may now read zeros where its memory never came: say so loudly.
            error!("lazy restore did not complete; the restored service may be broken: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&images);
}

/// The final phase, from `FinalPages` on: the dump's page maps, the rebuild of the pages files
/// started then, and the final difference received since (bounded by the image limit), to patch
/// in once the rebuild has written the held pages.
struct DraftTask {
    task: tokio::task::JoinHandle<(Result<PagesDraft, pages::PagesError>, Duration)>,
    /// The dump's page maps: what the final difference may carry.
    images: MemoryImages,
    /// Batches of the final difference, checked against the page maps on arrival.
    pages: Vec<(Owner, PageBatch)>,
    bytes: u64,
}

async fn receive_file(rx: &mut FrameReceiver, path: &Path, size: u64) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut left = size;
    while left > 0 {
        match rx.next().await.map_err(|e| e.to_string())? {
            Some(Frame::Data(chunk)) => {
                if chunk.len() as u64 > left {
                    return Err(format!(
                        "{}: more data than the announced {size} bytes",
                        path.display()
                    ));
                }
                left -= chunk.len() as u64;
                // The images directory is on tmpfs: a write is a memory copy.
                f.write_all(&chunk)
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
            }
            Some(Frame::Control(_) | Frame::Pages(_)) => {
                return Err(format!("{}: other frame inside file data", path.display()));
            }
            None => return Err("source closed the stream mid-file".into()),
        }
    }
    Ok(())
}
