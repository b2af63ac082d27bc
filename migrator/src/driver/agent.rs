//! `tether agent`: accepts migrations over QUIC with mutual TLS and runs one [`AgentMachine`]
//! per migration against the real world (CRIU, the host's network, the journal).
//!
//! A connection opens with `Hello` (a new migration: a task with its machine is started) or
//! `Resolve` (about a migration in doubt: routed to its task if it still runs, else answered from
//! its recorded outcome). Each task owns its machine, its connection's writer and reader, and
//! its data plane ([`super::receive::Receiver`]); ports' slow work runs in spawned tasks that
//! report back as events. On start-up the agent resumes every migration its journal holds: one
//! in doubt waits for the source's word (or its in-doubt timeout), a committed one finishes
//! going live, earlier ones are undone.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::lock;
use super::receive::Receiver;
use crate::authz::{Authorization, MemoryBudget};
use crate::container::neighbours::{self, Neighbours};
use crate::container::podman::{Podman, Staged};
use crate::criu::tree::{process_start_time, CriuTree};
use crate::criu::{Criu, CriuError};
use crate::hostnet::HostAddressMover;
use crate::journal::FileJournal;
use crate::machine::agent::{
    AgentAction, AgentConfig as MachineConfig, AgentEvent, AgentMachine, AgentOutcome, AgentPhase,
    AgentStep, AgentTimeouts,
};
use crate::machine::{ConnectionEnd, PortError};
use crate::metrics::{AgentMetrics, Outcome as MetricOutcome};
use crate::ports::{AddressMover, Checkpointer, Journal, LazyServer};
use crate::protocol::frame::Frame;
use crate::protocol::stats::CriuRestoreStats;
use crate::protocol::{
    ContainerSpec, Decision, ErrorCode, FromAgent, MigrationId, Phase, Resolution, ServiceAddr,
    ToAgent, PROTOCOL,
};
use crate::tls::{self, Identity};
use crate::transport::{self, FrameReceiver, FrameSender, TransportError};

/// How long the agent waits for the first frame of a connection.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a lazy-pages daemon may take to listen before the restore falls back to a full one.
const LAZY_READY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping agent waits for committed lazy restores to finish filling in memory.
const LAZY_SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// How long a lazy-pages daemon may take to fill a restored service's memory before it is
/// reported (it is never killed after the commit).
const LAZY_FILL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a `Resolve` waits for its migration's answer.
const RESOLVE_WAIT: Duration = Duration::from_secs(30);
/// How long a stopping agent lets migrations that are not in doubt undo themselves.
const SHUTDOWN_UNDO_WAIT: Duration = Duration::from_secs(10);

/// Agent settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Host certificate directory (`ca.pem`, `server.pem`, `server.key`, from `tether certs`).
    pub certs: PathBuf,
    /// Interface for service addresses; by default the one whose subnet contains the address.
    pub interface: Option<String>,
    /// Where image sets are received (should be tmpfs).
    pub work_dir: PathBuf,
    /// Where migrations in flight and their outcomes are journaled.
    pub state_dir: PathBuf,
    /// Largest image set accepted, in bytes.
    pub max_image_bytes: u64,
    /// CRIU log level.
    pub criu_log_level: i32,
    /// Where to serve Prometheus metrics (`/metrics`), if anywhere.
    pub metrics: Option<SocketAddr>,
    /// Whether to restore memory lazily (userfaultfd).
    pub lazy_restore: LazyRestore,
    /// How long a restored copy is kept, stopped and unreachable, for a source that does not
    /// say how its migration ended.
    pub in_doubt_timeout: Duration,
    /// Which sources may migrate which services here, and how many at once.
    pub authorization: Authorization,
    /// Memory all migrations here may hold together (image files plus page stores), in bytes.
    pub max_memory_bytes: u64,
    /// With a lazy restore, pages copied in at once, hot pages first (see
    /// [`crate::criu::eager`]); 0: none beyond CRIU's own.
    pub hot_first_pages: u64,
    /// With a lazy restore, where the lazy-pages daemon gets the rest of memory.
    pub lazy_pages_from: LazySource,
}

/// Where a lazy restore's daemon gets the pages it fills in (see [`crate::criu::lazy`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum LazySource {
    /// From the page store, through a forked page server: no pages file holding all of memory
    /// is written while the service is down.
    #[default]
    Store,
    /// From pages files rebuilt whole from the store and the final difference.
    Files,
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

/// What the agent journals about a migration in flight.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentRecord {
    /// How far it got.
    pub phase: AgentPhase,
    /// The service address.
    pub service_addr: ServiceAddr,
    /// Its interface here.
    pub dev: String,
    /// The block's table name.
    pub block_table: String,
    /// The address was (being) added and blocked here.
    pub claimed: bool,
    /// The received image set.
    pub images: PathBuf,
    /// The restored tree's root and its start time.
    pub restored: Option<(i32, u64)>,
    /// The lazy-pages daemon and its start time.
    pub lazy_daemon: Option<(i32, u64)>,
    /// The source's certificate name: only it may resolve the migration. (Records of agents
    /// before it was kept have none: any allowed source may resolve those.)
    #[serde(default)]
    pub source: String,
    /// The container the migration moves, if it moves one.
    #[serde(default)]
    pub container: Option<ContainerSpec>,
    /// The container staged here for its restore (Podman's id): removed by an undo.
    #[serde(default)]
    pub container_id: Option<String>,
    /// With a lazy restore served from the page store: the pages its daemon must get from the
    /// page server (what the pages files lack).
    #[serde(default)]
    pub served_pages: Option<u64>,
}

type AgentJournal = FileJournal<AgentRecord, AgentOutcome>;

/// A migration task's inputs.
enum TaskInput {
    /// A frame on the main connection (of generation `u64`).
    Frame(Frame),
    /// The main connection ended.
    Lost(ConnectionEnd),
    /// A `Resolve` from another connection.
    Resolve(Decision, oneshot::Sender<Resolution>),
    /// A port's result.
    Event(AgentEvent),
    /// The agent stops.
    Shutdown,
}

/// The ports an agent works with.
#[derive(Debug)]
pub struct AgentPorts<C, N, J> {
    /// Restores (CRIU, or a fake).
    pub ckpt: Arc<C>,
    /// The host's network (or a fake).
    pub net: Arc<N>,
    /// The journal of migrations in flight and outcomes.
    pub journal: Arc<J>,
    /// The agent's metrics.
    pub metrics: Arc<AgentMetrics>,
    /// Podman, if this host has it: containers are restored through it.
    pub podman: Option<Podman>,
}

/// A migration's task, as the rest of the agent reaches it.
#[derive(Clone)]
struct TaskHandle {
    /// Its input.
    input: mpsc::UnboundedSender<TaskInput>,
    /// The source (certificate name) that started it: only it may resolve it.
    source: String,
}

/// Shared agent state.
struct Shared<C: Checkpointer, N, J> {
    cfg: AgentConfig,
    machine: MachineConfig,
    ckpt: Arc<C>,
    net: Arc<N>,
    journal: Arc<J>,
    metrics: Arc<AgentMetrics>,
    podman: Option<Podman>,
    /// Migrations with a task, by id.
    tasks: Mutex<HashMap<MigrationId, TaskHandle>>,
    /// Service addresses with a migration in flight here.
    busy: Mutex<HashSet<Ipv4Addr>>,
    /// The memory all migrations here hold.
    budget: Arc<MemoryBudget>,
    /// Restored services this agent is the parent of, reaped when they exit.
    children: Arc<Mutex<Vec<i32>>>,
    /// Committed lazy restores whose memory is still being filled in.
    lazy_fills: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl<C: Checkpointer, N, J> std::fmt::Debug for Shared<C, N, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    // First: nothing else runs if another user could reach the images or the journal.
    for d in [&cfg.work_dir, &cfg.state_dir] {
        crate::dirs::private_dir(d).map_err(|e| AgentError::Setup(e.to_string()))?;
    }
    if !crate::dirs::on_tmpfs(&cfg.work_dir) {
        warn!(
            dir = %cfg.work_dir.display(),
            "the work directory is not on tmpfs: received image sets go to disk, which slows \
             every restore (give --work-dir a tmpfs directory, e.g. under /dev/shm)"
        );
    }
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
    let journal =
        AgentJournal::open(&cfg.state_dir).map_err(|e| AgentError::Setup(e.to_string()))?;
    let net = HostAddressMover::new().map_err(|e| AgentError::Setup(e.to_string()))?;
    let metrics = Arc::new(AgentMetrics::default());
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
    info!(
        listen = %cfg.listen,
        criu = %criu.path().display(),
        lazy_restore = lazy,
        "agent ready"
    );
    let podman = match Podman::locate(criu.path()) {
        Ok(p) => Some(p),
        Err(e) => {
            info!("no container moves to this host: {e}");
            None
        }
    };
    let ports = AgentPorts {
        podman,
        ckpt: Arc::new(CriuTree::destination(criu, lazy)),
        net: Arc::new(net),
        journal: Arc::new(journal),
        metrics,
    };
    let served = serve(cfg, ports, endpoint, shutdown).await;
    if let Some(m) = metrics_server {
        m.abort();
    }
    info!("agent stopped");
    served
}

/// Serves migrations on `endpoint` with `ports` until `shutdown` completes: first resumes the
/// migrations `ports.journal` holds, then accepts connections.
pub async fn serve<C, N, J>(
    cfg: AgentConfig,
    ports: AgentPorts<C, N, J>,
    endpoint: quinn::Endpoint,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError>
where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<AgentRecord, AgentOutcome>,
{
    let shared = Arc::new(Shared {
        machine: MachineConfig {
            max_image_bytes: cfg.max_image_bytes,
            timeouts: AgentTimeouts {
                in_doubt: cfg.in_doubt_timeout,
                ..Default::default()
            },
        },
        ckpt: ports.ckpt,
        net: ports.net,
        journal: ports.journal,
        metrics: ports.metrics,
        podman: ports.podman,
        tasks: Mutex::new(HashMap::new()),
        busy: Mutex::new(HashSet::new()),
        budget: MemoryBudget::new(cfg.max_memory_bytes),
        children: Arc::new(Mutex::new(Vec::new())),
        lazy_fills: Mutex::new(Vec::new()),
        cfg,
    });
    // Migrations an earlier agent left: each gets its task back.
    let records = shared.journal.records();
    if !records.is_empty() {
        warn!(
            n = records.len(),
            "resuming migrations an earlier agent left unfinished"
        );
    }
    for (id, record) in records {
        shared.metrics.leftovers_undone_total.inc();
        // The address stays claimed by the resumed migration until it ends, as for a new one:
        // a second migration of it must be refused meanwhile.
        lock(&shared.busy).insert(record.service_addr.addr());
        let m = AgentMachine::recover(
            shared.machine,
            record.service_addr,
            record.phase,
            Instant::now(),
        );
        spawn_task(&shared, id, m, record, None);
    }
    let reaper = tokio::spawn(reap(shared.children.clone()));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let remote = incoming.remote_address();
                    match incoming.await {
                        Ok(conn) => handle_connection(shared, conn).await,
                        // Includes peers without a certificate from our CA.
                        Err(e) => {
                            shared.metrics.connections_refused_total.inc();
                            warn!(%remote, "refused connection: {e}");
                        }
                    }
                });
            }
        }
    }
    endpoint.close(0u32.into(), b"agent shutting down");
    // Migrations not in doubt undo themselves; those in doubt stay journaled for the next start.
    let tasks: Vec<_> = lock(&shared.tasks)
        .values()
        .map(|t| t.input.clone())
        .collect();
    for t in &tasks {
        let _ = t.send(TaskInput::Shutdown);
    }
    let deadline = tokio::time::Instant::now() + SHUTDOWN_UNDO_WAIT;
    while !lock(&shared.tasks).is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Fills of committed lazy restores finish by themselves (their daemons are detached), but
    // their image sets are removed only by the task that waits for them: give them a moment.
    let fills: Vec<_> = std::mem::take(&mut *lock(&shared.lazy_fills))
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
                    shared.cfg.work_dir.display()
                );
            }
        }
    }
    reaper.abort();
    Ok(())
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

async fn handle_connection<C, N, J>(shared: Arc<Shared<C, N, J>>, conn: quinn::Connection)
where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<AgentRecord, AgentOutcome>,
{
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
    let (send, recv) = match tokio::time::timeout(OPEN_TIMEOUT, conn.accept_bi()).await {
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
    let refuse = |code: ErrorCode, reason: String| FromAgent::Refused { code, reason };
    let opening: ToAgent = match rx.message_within(OPEN_TIMEOUT, "hello").await {
        Ok(m) => m,
        Err(e) => {
            warn!(%remote, "bad opening: {e}");
            shared.metrics.ended(MetricOutcome::Refused);
            let _ = tx.send(&refuse(ErrorCode::Protocol, e.to_string())).await;
            finish(tx, conn).await;
            return;
        }
    };
    // Authenticated is not authorized: a source not named by --allow-source gets nothing here,
    // neither a migration nor an answer about one.
    if let Err(r) = shared.cfg.authorization.check_source(&peer) {
        warn!(%remote, %peer, "refused {}: {r}", opening.name());
        shared.metrics.ended(MetricOutcome::Refused);
        let _ = tx.send(&refuse(ErrorCode::Refused, r.to_string())).await;
        finish(tx, conn).await;
        return;
    }
    match opening {
        ToAgent::Hello {
            protocol,
            migration_id,
            service_addr,
            container,
        } => {
            let span = info_span!("migration", id = %migration_id, service = %service_addr, %peer);
            let refused = if protocol != PROTOCOL {
                Some(refuse(
                    ErrorCode::Refused,
                    format!("protocol {protocol} not supported (this agent speaks {PROTOCOL})"),
                ))
            } else if lock(&shared.tasks).contains_key(&migration_id)
                || shared.journal.outcome(&migration_id).is_some()
                || shared
                    .journal
                    .records()
                    .iter()
                    .any(|(i, _)| *i == migration_id)
            {
                Some(refuse(
                    ErrorCode::Refused,
                    format!("migration id {migration_id} was used before; ids are never reused"),
                ))
            } else if let Some(Err(r)) = container.as_ref().map(ContainerSpec::validate) {
                Some(refuse(ErrorCode::Refused, format!("bad container: {r}")))
            } else if container.is_some() && shared.podman.is_none() {
                Some(refuse(
                    ErrorCode::Refused,
                    "this host has no podman: it cannot take a container".to_string(),
                ))
            } else if let Err(r) = shared.cfg.authorization.check_service(service_addr) {
                Some(refuse(ErrorCode::Refused, r.to_string()))
            } else if let Err(r) = shared
                .cfg
                .authorization
                .check_count(lock(&shared.tasks).len())
            {
                Some(refuse(ErrorCode::Busy, r.to_string()))
            } else if !lock(&shared.busy).insert(service_addr.addr()) {
                Some(refuse(
                    ErrorCode::Busy,
                    format!("a migration of {service_addr} is already in progress here"),
                ))
            } else {
                None
            };
            if let Some(r) = refused {
                span.in_scope(|| info!("refused: {r:?}"));
                shared.metrics.ended(MetricOutcome::Refused);
                let _ = tx.send(&r).await;
                finish(tx, conn).await;
                return;
            }
            let images = shared.cfg.work_dir.join(migration_id.as_str());
            let record = AgentRecord {
                phase: AgentPhase::Claimed,
                service_addr,
                dev: String::new(),
                block_table: format!("tether-{migration_id}"),
                claimed: false,
                images,
                restored: None,
                lazy_daemon: None,
                source: peer.clone(),
                container,
                container_id: None,
                served_pages: None,
            };
            let m = AgentMachine::new(shared.machine, service_addr, Instant::now());
            let _g = span.enter();
            spawn_task(&shared, migration_id, m, record, Some((conn, tx, rx)));
        }
        ToAgent::Resolve {
            protocol,
            migration_id,
            decision,
        } => {
            let span = info_span!("resolve", id = %migration_id, ?decision, %peer);
            async move {
                let resolution = if protocol != PROTOCOL {
                    Resolution::Aborted {
                        reason: format!("protocol {protocol} not supported"),
                    }
                } else {
                    resolve(&shared, &migration_id, decision, &peer).await
                };
                info!(?resolution, "resolve answered");
                let _ = tx.send(&FromAgent::Resolved { resolution }).await;
                finish(tx, conn).await;
            }
            .instrument(span)
            .await
        }
        other => {
            shared.metrics.ended(MetricOutcome::Refused);
            let _ = tx
                .send(&refuse(
                    ErrorCode::Protocol,
                    format!(
                        "a connection opens with hello or resolve, not {}",
                        other.name()
                    ),
                ))
                .await;
            finish(tx, conn).await;
        }
    }
}

async fn resolve<C, N, J>(
    shared: &Shared<C, N, J>,
    id: &MigrationId,
    decision: Decision,
    peer: &str,
) -> Resolution
where
    C: Checkpointer,
    J: Journal<AgentRecord, AgentOutcome>,
{
    let task = lock(&shared.tasks).get(id).cloned();
    if let Some(task) = task {
        let owner = &task.source;
        if !owner.is_empty() && owner != peer {
            warn!(%owner, "a source that did not start this migration tried to resolve it");
            return Resolution::Pending;
        }
        let task = task.input;
        let (reply, answer) = oneshot::channel();
        if task.send(TaskInput::Resolve(decision, reply)).is_ok() {
            match tokio::time::timeout(RESOLVE_WAIT, answer).await {
                Ok(Ok(r)) => return r,
                Ok(Err(_)) => {}
                Err(_) => return Resolution::Pending,
            }
        }
    }
    match shared.journal.outcome(id) {
        Some(o) => o.resolution(),
        None => Resolution::Aborted {
            reason: "this agent knows no such migration".into(),
        },
    }
}

/// Finishes the stream and gives the last message time to leave before dropping the
/// connection.
async fn finish(mut tx: FrameSender, conn: quinn::Connection) {
    let _ = tx.0.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
}

fn spawn_task<C, N, J>(
    shared: &Arc<Shared<C, N, J>>,
    id: MigrationId,
    machine: AgentMachine,
    record: AgentRecord,
    conn: Option<(quinn::Connection, FrameSender, FrameReceiver)>,
) where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<AgentRecord, AgentOutcome>,
{
    let (tx, rx) = mpsc::unbounded_channel();
    lock(&shared.tasks).insert(
        id.clone(),
        TaskHandle {
            input: tx.clone(),
            source: record.source.clone(),
        },
    );
    shared.metrics.migrations_in_progress.add(1);
    let shared = shared.clone();
    tokio::spawn(
        async move {
            let addr = record.service_addr.addr();
            let outcome =
                Task::run(shared.clone(), id.clone(), machine, record, conn, tx, rx).await;
            lock(&shared.tasks).remove(&id);
            lock(&shared.busy).remove(&addr);
            shared.metrics.migrations_in_progress.add(-1);
            if let Some(o) = outcome {
                shared.metrics.ended(o);
            }
        }
        .in_current_span(),
    );
}

/// One migration on this host.
struct Task<C: Checkpointer, N, J> {
    shared: Arc<Shared<C, N, J>>,
    id: MigrationId,
    record: AgentRecord,
    tx: mpsc::UnboundedSender<TaskInput>,
    /// The main connection's writer.
    writer: Option<mpsc::UnboundedSender<Option<FromAgent>>>,
    conn: Option<quinn::Connection>,
    receiver: Option<Receiver>,
    lazy: Option<C::Lazy>,
    replies: HashMap<u64, oneshot::Sender<Resolution>>,
    next_request: u64,
    failed: bool,
    /// The container staged here for the restore.
    staged: Option<Staged>,
    /// A container restored here and held until it goes live.
    live_container: Arc<Mutex<Option<LiveContainer>>>,
}

/// What going live needs of a container restored through Podman, found at its restore.
#[derive(Debug)]
struct LiveContainer {
    /// A netlink socket in its network namespace.
    neighbours: Neighbours,
    /// The source's neighbour table.
    entries: Vec<neighbours::Entry>,
    /// Its MAC address.
    mac: Option<[u8; 6]>,
}

impl<C, N, J> Task<C, N, J>
where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<AgentRecord, AgentOutcome>,
{
    async fn run(
        shared: Arc<Shared<C, N, J>>,
        id: MigrationId,
        mut machine: AgentMachine,
        record: AgentRecord,
        conn: Option<(quinn::Connection, FrameSender, FrameReceiver)>,
        tx: mpsc::UnboundedSender<TaskInput>,
        mut rx: mpsc::UnboundedReceiver<TaskInput>,
    ) -> Option<MetricOutcome> {
        let mut task = Task {
            shared,
            id,
            record,
            tx,
            writer: None,
            conn: None,
            receiver: None,
            lazy: None,
            replies: HashMap::new(),
            next_request: 0,
            failed: false,
            live_container: Arc::new(Mutex::new(None)),
            staged: None,
        };
        if let Some((conn, send, recv)) = conn {
            task.attach(conn, send, recv);
        }
        let mut stopping = false;
        let mut hold = super::hold::TestHold::from_env();
        loop {
            super::hold::TestHold::at(&mut hold, machine.state_name(), false).await;
            while let Some(a) = machine.poll_action() {
                task.perform(a, &mut machine).await;
                // A state entered by an action's own outcome (going live ends the migration)
                // is held before its actions too.
                super::hold::TestHold::at(&mut hold, machine.state_name(), false).await;
            }
            if machine.is_done() {
                break;
            }
            super::hold::TestHold::at(&mut hold, machine.state_name(), true).await;
            if stopping && machine.in_doubt() {
                info!("agent stopping: the migration stays in doubt, journaled for the next start");
                return None;
            }
            let sleep = super::until(machine.poll_timeout());
            tokio::select! {
                input = rx.recv() => match input {
                    Some(TaskInput::Frame(f)) => machine.handle(Instant::now(), AgentEvent::Frame(f)),
                    Some(TaskInput::Lost(end)) => {
                        task.writer = None;
                        machine.handle(Instant::now(), AgentEvent::ConnectionLost(end));
                    }
                    Some(TaskInput::Resolve(decision, reply)) => {
                        let request = task.next_request;
                        task.next_request += 1;
                        task.replies.insert(request, reply);
                        machine.handle(Instant::now(), AgentEvent::Resolve { decision, request });
                    }
                    Some(TaskInput::Event(e)) => machine.handle(Instant::now(), e),
                    Some(TaskInput::Shutdown) => {
                        stopping = true;
                        if !machine.in_doubt() {
                            // The source will not get its answer from this agent: undo.
                            task.writer = None;
                            machine.handle(Instant::now(), AgentEvent::ConnectionLost(ConnectionEnd {
                                reason: "the agent is stopping".into(),
                                by_peer: true,
                            }));
                        }
                    }
                    None => break,
                },
                () = sleep => machine.handle(Instant::now(), AgentEvent::Tick),
            }
        }
        let outcome = match machine.outcome() {
            Some(AgentOutcome::Committed { .. }) => MetricOutcome::Committed,
            Some(AgentOutcome::Refused { .. }) => MetricOutcome::Refused,
            Some(AgentOutcome::Aborted { .. }) if task.failed => MetricOutcome::Failed,
            _ => MetricOutcome::Undone,
        };
        Some(outcome)
    }

    fn attach(&mut self, conn: quinn::Connection, send: FrameSender, mut recv: FrameReceiver) {
        let (wtx, mut wrx) = mpsc::unbounded_channel::<Option<FromAgent>>();
        let mut send = send;
        let c2 = conn.clone();
        tokio::spawn(async move {
            while let Some(m) = wrx.recv().await {
                match m {
                    Some(m) => {
                        if send.send(&m).await.is_err() {
                            break;
                        }
                    }
                    None => {
                        // The last message: finish the stream, give it time to leave.
                        let _ = send.0.finish();
                        let _ = tokio::time::timeout(Duration::from_secs(2), c2.closed()).await;
                        c2.close(transport::DONE.into(), b"done");
                        break;
                    }
                }
            }
        });
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let end = loop {
                match recv.next().await {
                    Ok(Some(f)) => {
                        if tx.send(TaskInput::Frame(f)).is_err() {
                            return;
                        }
                    }
                    Ok(None) => break super::connection_end("source", None),
                    Err(e) => break super::connection_end("source", Some(e)),
                }
            };
            let _ = tx.send(TaskInput::Lost(end));
        });
        self.writer = Some(wtx);
        self.conn = Some(conn);
    }

    fn event_sender(&self) -> impl Fn(AgentEvent) + Send + Clone + 'static {
        let tx = self.tx.clone();
        move |e| {
            let _ = tx.send(TaskInput::Event(e));
        }
    }

    fn save(&self) -> Result<(), PortError> {
        self.shared.journal.save(&self.id, &self.record)
    }

    /// Whether the restore can be lazy: a lazy-pages daemon was started and serves in time
    /// (one that does not is dropped, and the restore copies all memory in). Once the pages
    /// files were written for a daemon served from the page store (`served`), it cannot be
    /// dropped: they lack what it was to serve, and a full restore from them would read zeros;
    /// that is an error.
    async fn lazy_ready(&mut self, served: bool) -> Result<bool, PortError> {
        let Some(d) = self.lazy.as_mut() else {
            return Ok(false);
        };
        match LazyServer::ready(d, LAZY_READY_TIMEOUT).await {
            Ok(()) => Ok(true),
            Err(e) if served => Err(PortError::new(
                ErrorCode::Checkpoint,
                format!(
                    "the lazy restore cannot run, and the pages files hold only its hot pages: {e}"
                ),
            )),
            Err(e) => {
                warn!("restoring fully: {e}");
                self.lazy = None;
                self.record.lazy_daemon = None;
                Ok(false)
            }
        }
    }

    /// For a container: blocks its address (and static MAC) on the LAN interface, then has
    /// Podman create it here with the source's configuration, ready for the restore. Both are
    /// journaled (an undo removes them); on a failure both are undone here and nothing is left.
    async fn stage_container(&mut self) -> Result<String, PortError> {
        let (Some(spec), Some(podman)) =
            (self.record.container.clone(), self.shared.podman.clone())
        else {
            return Err(PortError::new(ErrorCode::Internal, "no container to stage"));
        };
        let net = self.shared.net.clone();
        let svc = self.record.service_addr;
        let dev = net
            .check_free(svc, self.shared.cfg.interface.as_deref())
            .await?;
        self.record.dev = dev.clone();
        self.record.claimed = true;
        self.save()?;
        let table = self.record.block_table.clone();
        let staged = match net.block_behind(&table, svc, &dev, spec.mac_octets()).await {
            Ok(()) => {
                // Written (and read) only for a lazy restore: see `Podman::restore`.
                let conf = self
                    .record
                    .images
                    .join(crate::container::podman::CRIU_CONFIG_FILE);
                podman
                    .stage(&spec, Some(&conf))
                    .await
                    .map_err(PortError::from)
            }
            Err(e) => Err(e),
        };
        match staged {
            Ok(staged) => {
                self.record.container_id = Some(staged.id.clone());
                self.staged = Some(staged);
                self.save()?;
                Ok(dev)
            }
            Err(e) => {
                if let Err(u) = net.delete_table(&table).await {
                    error!("cannot lift the block {table}: {u}");
                }
                self.record.claimed = false;
                if let Err(f) = self.shared.journal.forget(&self.id) {
                    warn!("cannot drop the journal record of a refused migration: {f}");
                }
                Err(e)
            }
        }
    }

    fn receiver(&mut self) -> Result<&mut Receiver, PortError> {
        if self.receiver.is_none() {
            self.receiver = Some(Receiver::new(
                &self.record.images,
                self.shared.cfg.max_image_bytes,
                self.shared.budget.reserve(),
                self.shared.metrics.clone(),
            )?);
        }
        self.receiver
            .as_mut()
            .ok_or_else(|| PortError::new(ErrorCode::Internal, "no receiver"))
    }

    async fn perform(&mut self, action: AgentAction, machine: &mut AgentMachine) {
        let now = Instant::now;
        let emit = self.event_sender();
        match action {
            AgentAction::ChooseInterface if self.record.container.is_some() => {
                // Inline: the source waits for `Ready` anyway, and the record changes.
                let r = self.stage_container().await;
                machine.handle(now(), AgentEvent::InterfaceChosen(r));
            }
            AgentAction::ChooseInterface => {
                let net = self.shared.net.clone();
                let svc = self.record.service_addr;
                let explicit = self.shared.cfg.interface.clone();
                tokio::spawn(async move {
                    let r = net.check_free(svc, explicit.as_deref()).await;
                    emit(AgentEvent::InterfaceChosen(r));
                });
            }
            AgentAction::Send(m) => {
                if let FromAgent::Ready { interface } = &m {
                    self.record.dev = interface.clone();
                }
                if matches!(m, FromAgent::Failed { .. }) {
                    self.failed = true;
                }
                if let Some(w) = &self.writer {
                    let _ = w.send(Some(m));
                }
            }
            AgentAction::Close => {
                if let Some(w) = self.writer.take() {
                    let _ = w.send(None);
                }
            }
            AgentAction::Reply {
                request,
                resolution,
            } => {
                if let Some(r) = self.replies.remove(&request) {
                    let _ = r.send(resolution);
                }
            }
            AgentAction::Journal(phase) => {
                self.record.phase = phase;
                match phase {
                    AgentPhase::Claimed => self.record.claimed = true,
                    AgentPhase::Restoring { pid: Some(pid) }
                    | AgentPhase::Prepared { pid }
                    | AgentPhase::Committed { pid }
                        if self.record.restored.is_none_or(|(p, _)| p != pid) =>
                    {
                        self.record.restored = self.shared.ckpt.start_time(pid).map(|s| (pid, s));
                    }
                    _ => {}
                }
                let r = self.save();
                machine.handle(now(), AgentEvent::Completed(AgentStep::Journal, r));
            }
            AgentAction::Tombstone(outcome) => {
                let r = self.shared.journal.end(&self.id, &outcome);
                machine.handle(now(), AgentEvent::Completed(AgentStep::Tombstone, r));
            }
            AgentAction::Layout { owner, ranges } => {
                if let Err(e) = self.receiver().and_then(|r| r.layout(owner, ranges)) {
                    machine.handle(now(), AgentEvent::DataFailed(Phase::PreCopy, e));
                }
            }
            AgentAction::StorePrecopy(batch) => {
                if let Err(e) = self.receiver().and_then(|r| r.precopy(&batch)) {
                    machine.handle(now(), AgentEvent::DataFailed(Phase::PreCopy, e));
                }
            }
            AgentAction::Prepare { .. } if self.record.container.is_some() => {
                // Blocked since it was staged; Podman adds the address in the container's
                // namespace when it restores it.
                machine.handle(now(), AgentEvent::Prepared(Ok(())));
            }
            AgentAction::Prepare { dev } => {
                self.record.dev = dev.clone();
                let net = self.shared.net.clone();
                let (table, svc) = (self.record.block_table.clone(), self.record.service_addr);
                tokio::spawn(async move {
                    let r = net.claim(&table, svc, &dev).await;
                    emit(AgentEvent::Prepared(r));
                });
            }
            AgentAction::CreateFile { name, size } => {
                if let Err(e) = self.receiver().and_then(|r| r.create_file(&name, size)) {
                    machine.handle(now(), AgentEvent::DataFailed(Phase::Transfer, e));
                }
            }
            AgentAction::WriteFile(chunk) => {
                if let Err(e) = self.receiver().and_then(|r| r.write(&chunk)) {
                    machine.handle(now(), AgentEvent::DataFailed(Phase::Transfer, e));
                }
            }
            AgentAction::StartRebuild => {
                // The lazy-pages daemon reads the process tree from the image files, all here
                // now, and has its start-up done before the restore (a container's too, if it
                // was staged so that its runtime's restore can be lazy).
                let lazy = if self
                    .staged
                    .as_ref()
                    .is_some_and(|s| s.criu_config.is_none())
                {
                    Ok(None)
                } else {
                    let from_store = self.shared.cfg.lazy_pages_from == LazySource::Store;
                    self.shared.ckpt.start_lazy(&self.record.images, from_store)
                };
                match lazy {
                    Ok(Some(d)) => {
                        self.record.lazy_daemon = LazyServer::pid(&d);
                        if let Err(e) = self.save() {
                            warn!("cannot journal the lazy-pages daemon: {e}");
                        }
                        self.lazy = Some(d);
                    }
                    Ok(None) => {}
                    Err(e) => warn!("no lazy restore this time: {e}"),
                }
                let served = self.lazy.as_ref().is_some_and(LazyServer::asks_for_pages);
                if let Err(e) = self.receiver().and_then(|r| r.start_rebuild(served)) {
                    machine.handle(now(), AgentEvent::DataFailed(Phase::Transfer, e));
                }
            }
            AgentAction::StoreFinal(batch) => {
                if let Err(e) = self.receiver().and_then(|r| r.final_batch(batch)) {
                    machine.handle(now(), AgentEvent::DataFailed(Phase::Transfer, e));
                }
            }
            AgentAction::FinishRebuild => {
                // Hot pages first only where a lazy-pages daemon will fill the rest.
                let hot_first = if self.lazy.is_some() {
                    self.shared.cfg.hot_first_pages
                } else {
                    0
                };
                // A daemon that is to ask for its pages must be there to be served; if it is
                // not, it is dropped, every page is written and the restore copies them all in.
                let serve = self.lazy.as_ref().is_some_and(LazyServer::asks_for_pages)
                    && matches!(self.lazy_ready(false).await, Ok(true));
                let r = match self.receiver() {
                    Ok(r) => r.finish_rebuild(hot_first, serve).await,
                    Err(e) => Err(e),
                };
                let r = match (r, self.lazy.as_mut()) {
                    (Ok(Some(served)), Some(d)) => {
                        // Journaled before the restore (the restore's own journal write
                        // follows): a restarted agent checks the fill against it.
                        self.record.served_pages = Some(served.pages);
                        LazyServer::serve(d, served.store)
                    }
                    (Ok(Some(_)), None) => Err(PortError::new(
                        ErrorCode::Internal,
                        "a page store to serve and no lazy-pages daemon",
                    )),
                    (Ok(None), _) => Ok(()),
                    (Err(e), _) => Err(e),
                };
                machine.handle(now(), AgentEvent::Rebuilt(r));
            }
            AgentAction::Restore if self.record.container.is_some() => {
                let (Some(podman), Some(staged)) =
                    (self.shared.podman.clone(), self.staged.clone())
                else {
                    let e = PortError::new(ErrorCode::Internal, "no staged container");
                    machine.handle(now(), AgentEvent::Restored(Err(e)));
                    return;
                };
                let lazy = match self.lazy_ready(self.record.served_pages.is_some()).await {
                    Ok(l) => l,
                    Err(e) => {
                        machine.handle(now(), AgentEvent::Restored(Err(e)));
                        return;
                    }
                };
                let images = self.record.images.clone();
                let held_bytes = self.receiver.as_ref().map(Receiver::peak);
                let metrics = self.shared.metrics.clone();
                let live = self.live_container.clone();
                tokio::spawn(async move {
                    let r = restore_container(&podman, &staged, &images, lazy, &emit, &live).await;
                    if let Ok(info) = &r {
                        metrics
                            .restore_duration
                            .observe(Duration::from_secs_f64(info.criu_restore_ms / 1e3));
                    }
                    emit(AgentEvent::Restored(r.map(|info| {
                        crate::machine::agent::RestoreInfo { held_bytes, ..info }
                    })));
                });
            }
            AgentAction::Restore => {
                let lazy = match self.lazy_ready(self.record.served_pages.is_some()).await {
                    Ok(l) => l,
                    Err(e) => {
                        machine.handle(now(), AgentEvent::Restored(Err(e)));
                        return;
                    }
                };
                let ckpt = self.shared.ckpt.clone();
                let images = self.record.images.clone();
                let children = self.shared.children.clone();
                let on_pid = {
                    let emit = emit.clone();
                    move |pid: i32| emit(AgentEvent::RestoreStarted { pid })
                };
                let restore_duration = self.shared.metrics.clone();
                let held_bytes = self.receiver.as_ref().map(Receiver::peak);
                tokio::spawn(async move {
                    let t = Instant::now();
                    let r = ckpt
                        .restore_stopped(&images, lazy, on_pid)
                        .await
                        .map(|info| crate::machine::agent::RestoreInfo { held_bytes, ..info });
                    restore_duration.restore_duration.observe(t.elapsed());
                    if let Ok(info) = &r {
                        lock(&children).push(info.pid);
                    }
                    emit(AgentEvent::Restored(r));
                });
            }
            AgentAction::GoLive => {
                let Some((pid, start)) = self.record.restored else {
                    machine.handle(
                        now(),
                        AgentEvent::WentLive(Err(PortError::new(
                            ErrorCode::Internal,
                            "no restored copy is recorded",
                        ))),
                    );
                    return;
                };
                // The service is ours now: nothing may kill its lazy-pages daemon any more.
                if let Some(d) = self.lazy.as_mut() {
                    LazyServer::detach(d);
                }
                let ckpt = self.shared.ckpt.clone();
                let net = self.shared.net.clone();
                let is_container = self.record.container.is_some();
                let live = lock(&self.live_container).take().or_else(|| {
                    // Restored by an earlier agent (this one resumed its journal): found again.
                    is_container
                        .then(|| live_container(pid, &self.record.images))
                        .flatten()
                });
                let (table, addr, dev) = (
                    self.record.block_table.clone(),
                    self.record.service_addr.addr(),
                    self.record.dev.clone(),
                );
                // Inline, not in a task of its own: this is the commit's critical path.
                // The block goes first, the LAN is told, then the tree runs. The other order
                // drops whatever the service sends in between at the output hook, and a restored
                // socket retransmits after TCP's initial RTO (1 s: CRIU does not restore the RTT
                // estimate): a one-second stall, seen once in ten moves. A tree that died since
                // the restore is not unblocked.
                let r = async {
                    if !ckpt.alive(pid, start) || (is_container && kill_pending(pid)) {
                        return Err(PortError::new(
                            ErrorCode::Checkpoint,
                            format!("the restored tree (pid {pid}) is gone"),
                        ));
                    }
                    let t0 = Instant::now();
                    net.delete_table(&table).await?;
                    if let Some(l) = &live {
                        // What the container queued behind incomplete entries leaves now.
                        match l.neighbours.install(&l.entries).await {
                            Ok(n) => debug!(n, "the source's neighbour table installed"),
                            Err(e) => warn!("the container resolves its neighbours afresh: {e}"),
                        }
                    }
                    let t1 = Instant::now();
                    // A container's address is announced with its own MAC, never the host's.
                    let announced = match (is_container, live.as_ref().and_then(|l| l.mac)) {
                        (true, Some(mac)) => net.announce_as(addr, &dev, mac).await,
                        (true, None) => Err(PortError::new(
                            ErrorCode::HostNetwork,
                            "the restored container's MAC address is unknown",
                        )),
                        (false, _) => net.announce(addr, &dev).await,
                    };
                    if let Err(e) = announced {
                        warn!("cannot announce the service address: {e}");
                    }
                    let t2 = Instant::now();
                    let r = if is_container {
                        thaw_container(pid)
                    } else {
                        ckpt.resume(pid)
                    };
                    debug!(
                        unblock_ms = (t1 - t0).as_secs_f64() * 1e3,
                        announce_ms = (t2 - t1).as_secs_f64() * 1e3,
                        resume_ms = t2.elapsed().as_secs_f64() * 1e3,
                        "went live"
                    );
                    r
                }
                .await;
                let ok = r.is_ok();
                machine.handle(now(), AgentEvent::WentLive(r));
                if !ok {
                    // The undo that follows removes the images (still in the record).
                    return;
                }
                // The machine has queued `Committed`, sent once this returns: whatever removes
                // the image set runs in a task of its own, off the commit's path. That is the
                // lazy-pages daemon's watcher once it has filled the memory in, else a blocking
                // thread at once (nothing reads the images any more).
                let images = std::mem::take(&mut self.record.images);
                let fill = match (self.lazy.take(), self.record.lazy_daemon) {
                    (Some(daemon), _) => {
                        let metrics = self.shared.metrics.clone();
                        tokio::spawn(finish_lazy(daemon, images, metrics).in_current_span())
                    }
                    // A daemon an earlier agent started: watch it by its pid.
                    (None, Some((p, s))) => tokio::spawn(
                        async move {
                            let t = Instant::now();
                            while process_start_time(p) == Some(s)
                                && t.elapsed() < LAZY_FILL_TIMEOUT
                            {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            info!("the lazy-pages daemon of an earlier agent is done");
                            let _ = std::fs::remove_dir_all(&images);
                        }
                        .in_current_span(),
                    ),
                    (None, None) => {
                        tokio::task::spawn_blocking(move || {
                            let _ = std::fs::remove_dir_all(&images);
                        });
                        return;
                    }
                };
                let mut fills = lock(&self.shared.lazy_fills);
                fills.retain(|f| !f.is_finished());
                fills.push(fill);
            }
            AgentAction::Undo => {
                if let Some(r) = self.receiver.as_mut() {
                    r.settle().await;
                }
                self.receiver = None;
                let lazy = self.lazy.take();
                let record = self.record.clone();
                let ckpt = self.shared.ckpt.clone();
                let net = self.shared.net.clone();
                let podman = self.shared.podman.clone();
                tokio::spawn(async move {
                    undo(&record, ckpt.as_ref(), net.as_ref(), lazy, podman.as_ref()).await;
                    emit(AgentEvent::Undone);
                });
            }
            AgentAction::CheckCopy => {
                // A lazily restored copy whose daemon died half-way would read zeros where its
                // memory never came: it must not run (see `restored_intact`).
                let ckpt = self.shared.ckpt.clone();
                let (restored, lazy) = (self.record.restored, self.record.lazy_daemon);
                let served = self.record.served_pages;
                let images = self.record.images.clone();
                tokio::spawn(async move {
                    let intact = match restored {
                        Some((p, s)) => ckpt.restored_intact(p, s, lazy, served, &images).await,
                        None => false,
                    };
                    emit(AgentEvent::CopyAlive(intact));
                });
            }
        }
    }
}

/// Test hook: when set in the agent's environment, Podman's restore of a container fails (its
/// images lack the runtime's `descriptors.json`), as a real restore failure on the destination.
pub const BREAK_RESTORE_VAR: &str = "TETHER_TEST_BREAK_CONTAINER_RESTORE";

/// Restores a staged container through Podman and holds it frozen (its freezer cgroup) until
/// it goes live, as a restored tree is held stopped: Podman's restore lets it run at once.
async fn restore_container(
    podman: &Podman,
    staged: &Staged,
    images: &Path,
    lazy: bool,
    emit: &(impl Fn(AgentEvent) + Send),
    live: &Mutex<Option<LiveContainer>>,
) -> Result<crate::machine::agent::RestoreInfo, PortError> {
    if std::env::var_os(BREAK_RESTORE_VAR).is_some() {
        // Test hook: runc's restore cannot do without the runtime's record of the descriptors.
        let _ = std::fs::remove_file(images.join(crate::container::podman::DESCRIPTORS_FILE));
    }
    let (pid, elapsed, lazy) = podman.restore(staged, images, lazy).await?;
    emit(AgentEvent::RestoreStarted { pid });
    set_container_frozen(pid, true)?;
    *lock(live) = Some(LiveContainer {
        neighbours: Neighbours::open(pid)?,
        entries: neighbours::load(images),
        mac: container_mac(pid),
    });
    info!(
        pid,
        lazy,
        ms = elapsed.as_millis() as u64,
        "container restored through Podman"
    );
    Ok(crate::machine::agent::RestoreInfo {
        pid,
        criu_restore_ms: elapsed.as_secs_f64() * 1e3,
        stats: Some(CriuRestoreStats {
            lazy,
            ..Default::default()
        }),
        held_bytes: None,
    })
}

/// What going live needs of the restored container `pid`, from its namespace and `images`.
fn live_container(pid: i32, images: &Path) -> Option<LiveContainer> {
    match Neighbours::open(pid) {
        Ok(neighbours) => Some(LiveContainer {
            neighbours,
            entries: neighbours::load(images),
            mac: container_mac(pid),
        }),
        Err(e) => {
            warn!("the restored container's namespace cannot be reached: {e}");
            None
        }
    }
}

/// Freezes or thaws the container whose init is `pid`, through its freezer cgroup.
fn set_container_frozen(pid: i32, frozen: bool) -> Result<(), PortError> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| {
        PortError::caused(
            ErrorCode::Checkpoint,
            "reading the restored container's cgroups",
            e,
        )
    })?;
    let dir = crate::container::scope::freezer(&cgroups).ok_or_else(|| {
        PortError::new(
            ErrorCode::Checkpoint,
            "the restored container has no freezer cgroup",
        )
    })?;
    crate::container::scope::set_frozen(&dir, frozen).map_err(PortError::from)
}

/// Whether process `pid` has a SIGKILL pending (a frozen process dies only once it is thawed:
/// until then it looks alive).
fn kill_pending(pid: i32) -> bool {
    const SIGKILL_BIT: u64 = 1 << (9 - 1);
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|st| {
        st.lines()
            .filter_map(|l| {
                l.strip_prefix("ShdPnd:")
                    .or_else(|| l.strip_prefix("SigPnd:"))
            })
            .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
            .any(|mask| mask & SIGKILL_BIT != 0)
    })
}

/// Lets a restored container run (it was held frozen since its restore).
fn thaw_container(pid: i32) -> Result<(), PortError> {
    set_container_frozen(pid, false)
}

/// The MAC address of the first interface but loopback in the network namespace of `pid`, read
/// from that namespace's sysfs through the process's root (no Podman call on the commit's path).
fn container_mac(pid: i32) -> Option<[u8; 6]> {
    let dir = std::fs::read_dir(format!("/proc/{pid}/root/sys/class/net")).ok()?;
    let mut names: Vec<_> = dir.flatten().map(|e| e.file_name()).collect();
    names.sort();
    names.into_iter().filter(|n| n != "lo").find_map(|n| {
        let text = std::fs::read_to_string(format!(
            "/proc/{pid}/root/sys/class/net/{}/address",
            n.to_string_lossy()
        ))
        .ok()?;
        crate::protocol::types::parse_mac(text.trim())
    })
}

/// Undoes everything of a migration on this host: kills a restored copy, then its lazy-pages
/// daemon (in that order: a live copy whose daemon is gone reads zeros where its memory has not
/// come yet), removes the address, lifts the block, removes the images.
///
/// The address goes before the block: a block lifted while the address is still local lets
/// packets reach whatever else listens on the service's port here (or no socket at all), which
/// answers with a reset and kills the very connections the rollback keeps on the source.
/// Without the address, this host drops them and they are retransmitted toward the source.
async fn undo<C: Checkpointer, N: AddressMover>(
    record: &AgentRecord,
    ckpt: &C,
    net: &N,
    lazy: Option<C::Lazy>,
    podman: Option<&Podman>,
) {
    // A staged or restored container goes through Podman (which kills it), so that no
    // container, storage or address of it is left here.
    if let (Some(id), Some(podman)) = (&record.container_id, podman) {
        match podman.remove(id).await {
            Ok(()) => info!(%id, "removed the staged container"),
            Err(e) => error!("cannot remove the staged container {id}: {e}"),
        }
    }
    if let Some((pid, start)) = record.restored {
        if ckpt.kill(pid, start) {
            info!(pid, "killed the restored copy");
        }
    }
    drop(lazy);
    if let Some((pid, start)) = record.lazy_daemon {
        if ckpt.kill(pid, start) {
            info!(pid, "killed the lazy-pages daemon");
        }
    }
    if record.claimed {
        if let Err(e) = net.remove(record.service_addr, &record.dev).await {
            error!(
                "cannot remove {} from {}: {e}",
                record.service_addr, record.dev
            );
        }
        if let Err(e) = net.delete_table(&record.block_table).await {
            error!("cannot lift the block {}: {e}", record.block_table);
        }
    }
    if !record.images.as_os_str().is_empty() {
        let _ = std::fs::remove_dir_all(&record.images);
    }
    info!("destination side undone");
}

/// After a lazily restored service is committed: waits for its (detached) lazy-pages daemon to
/// put every page in place, then removes the image set it read from. A daemon that takes longer
/// than [`LAZY_FILL_TIMEOUT`] is reported and waited for, never killed.
async fn finish_lazy<L: LazyServer>(mut daemon: L, images: PathBuf, metrics: Arc<AgentMetrics>) {
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
