//! `tether migrate`: runs a [`SourceMachine`] against the real world (or fakes of it).
//!
//! The driver performs the machine's actions and feeds their results back; it decides nothing
//! about the migration. Each resource has one task that performs its actions in order: the
//! migration stream's writer (control messages, pre-copy rounds, the frozen transfer), the
//! stream's reader, CRIU's dump, and the proxy. Journal writes, the throttle and other quick
//! steps run inline, so they are done before anything that follows them.
//!
//! [`migrate`] runs a new migration; [`recover`] resolves the migrations an earlier `tether
//! migrate` left unfinished in the journal (every `migrate` calls it first).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, info_span, warn, Instrument};

use crate::container::unit::{ContainerNet, ContainerSource};
use crate::criu::tree::{process_start_time, CriuTree};
use crate::criu::Criu;
use crate::gate::{ProxyGate, ProxyOptions};
use crate::hostnet::HostAddressMover;
use crate::journal::FileJournal;
use crate::machine::source::{
    DumpEvent, GateConfig, GateEvent, SourceAction, SourceConfig, SourceEvent, SourceMachine,
    SourcePhase, SourceResult, Step, Timeouts, HOLD_MARGIN,
};
use crate::machine::{ConnectionEnd, Failure, PortError};
use crate::policy;
use crate::ports::{AddressMover, Checkpointer, Dump, DumpPoint, Journal, TrafficGate};
use crate::precopy::{self, RateLimit, Tracker};
use crate::progress::Progress;
use crate::protocol::frame::Frame;
use crate::protocol::{ErrorCode, FromAgent, MigrationId, Phase, ServiceAddr, Side, ToAgent};
use crate::report::{Outcome, Report};
use crate::tls::Identity;
use crate::transport::{self, FrameReceiver, FrameSender, TransportError};

use super::lock;

/// What the source knows of the unit it moves beyond the [`Checkpointer`]: whether it is a
/// container, and what the destination needs to create it again.
pub trait Unit {
    /// The container's description for the agent; `None` for a process tree.
    fn container_spec(&self) -> Option<crate::protocol::ContainerSpec>;
}

impl Unit for CriuTree {
    fn container_spec(&self) -> Option<crate::protocol::ContainerSpec> {
        None
    }
}

impl Unit for ContainerSource {
    fn container_spec(&self) -> Option<crate::protocol::ContainerSpec> {
        Some(self.spec().clone())
    }
}

/// What to migrate and where.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Root of the process tree (host pid); ignored when `container` is given.
    pub pid: i32,
    /// The Podman container to move (name or id), instead of the tree of `pid`.
    pub container: Option<String>,
    /// The destination agent.
    pub to: SocketAddr,
    /// The name the agent's certificate must carry. If `None`, it is looked up for `to` in
    /// `agents.toml` in `certs` ([`crate::tls::agent_name_for`]); without either the migration
    /// is refused before anything changes.
    pub agent_name: Option<String>,
    /// This host's certificate directory.
    pub certs: PathBuf,
    /// The service's address, configured on this host.
    pub service_addr: ServiceAddr,
    /// Where the dump is written (should be tmpfs).
    pub work_dir: PathBuf,
    /// Where migrations in flight are journaled.
    pub state_dir: PathBuf,
    /// CRIU log level.
    pub criu_log_level: i32,
    /// The longest the service may stay frozen before the commit point.
    pub max_frozen: Duration,
    /// Pre-copy settings; `None` for stop-and-copy.
    pub precopy: Option<PrecopyOptions>,
    /// Cap on the transfer rate, bits/s.
    pub bandwidth: Option<u64>,
    /// The tether-proxy in front of the service, if any.
    pub proxy: Option<ProxyOptions>,
    /// The model's host terms (from the calibration profile) the pre-copy policy predicts the
    /// frozen phase with.
    pub costs: crate::model::HostCosts,
    /// The prediction made before the migration, for the report.
    pub prediction: Option<crate::plan::Plan>,
}

/// Pre-copy settings.
#[derive(Debug, Clone)]
pub struct PrecopyOptions {
    /// Stop pre-copying once the predicted downtime is at most this.
    pub downtime_limit: Duration,
    /// Most rounds (round 0 included).
    pub max_rounds: u32,
    /// Throttle the service's CPU when it dirties memory faster than the link carries it.
    pub auto_converge: bool,
    /// Auto-converge throttle steps (first cut and increment, percent).
    pub throttle_steps: (u8, u8),
}

impl Default for PrecopyOptions {
    /// `tether migrate`'s defaults.
    fn default() -> PrecopyOptions {
        PrecopyOptions {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 10,
            auto_converge: false,
            throttle_steps: (20, 10),
        }
    }
}

impl PrecopyOptions {
    /// The pre-copy policy these settings make with the model's host terms `costs`: what the
    /// migration runs, and what a prediction of it must run.
    pub fn policy(&self, costs: crate::model::HostCosts) -> policy::Config {
        policy::Config {
            downtime_limit: self.downtime_limit,
            max_rounds: self.max_rounds.max(1),
            auto_converge: self.auto_converge,
            throttle: policy::ThrottleSteps {
                initial: self.throttle_steps.0,
                increment: self.throttle_steps.1,
                ..Default::default()
            },
            costs,
            ..Default::default()
        }
    }
}

/// How long `tether migrate` waits for a lazy restore of the service to finish filling in its
/// memory before it refuses.
const LAZY_FILL_WAIT: Duration = Duration::from_secs(30);

/// What the source journals about a migration in flight: everything [`recover`] needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceRecord {
    /// How far it got.
    pub phase: SourcePhase,
    /// The kept lock's table (`tether-lock-<id>`), from the freeze on.
    pub lock_table: Option<String>,
    /// The service's root pid and its start time.
    pub pid: i32,
    /// Its start time (field 22 of its stat).
    pub pid_start: u64,
    /// CRIU's worker of the dump and its start time.
    pub criu_worker: Option<(i32, u64)>,
    /// The service address and its interface here.
    pub service_addr: ServiceAddr,
    /// The interface.
    pub dev: String,
    /// The agent.
    pub agent: SocketAddr,
    /// The name its certificate must carry. Records of an older `tether migrate`, which did
    /// not always know it, read as empty: their recovery stops and says what to do.
    #[serde(default, deserialize_with = "name_or_empty")]
    pub agent_name: String,
    /// This host's certificates.
    pub certs: PathBuf,
    /// The image set of the dump (the way back after the commit point).
    pub images: PathBuf,
    /// The proxy, if any, and its backend before the migration.
    pub proxy: Option<(ProxyOptions, SocketAddr)>,
    /// CRIU's log level.
    pub criu_log_level: i32,
    /// The Podman container moved (its id), if the migration moves one.
    #[serde(default)]
    pub container: Option<String>,
}

fn name_or_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_default())
}

/// The name the agent's certificate must carry: `opts.agent_name`, or the one `agents.toml`
/// gives for `opts.to`.
fn agent_name(opts: &MigrateOptions) -> Result<String, String> {
    use crate::tls::{agent_name_for, valid_host_name, AGENTS_FILE};
    // agents.toml's names are checked as the file is read; a name given here, now.
    match &opts.agent_name {
        Some(name) if !valid_host_name(name) => Err(format!(
            "invalid agent name `{name}`: a certificate name has letters, digits, '-' and '.'"
        )),
        Some(name) => Ok(name.clone()),
        None => agent_name_for(&opts.certs, opts.to)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "the agent's name is not known, so its certificate cannot be checked: give \
                     --agent-name NAME (the --name its certificates were issued for), or add \
                     `\"{}\" = \"NAME\"` to {}",
                    opts.to,
                    opts.certs.join(AGENTS_FILE).display()
                )
            }),
    }
}

/// A migration that did not commit: where, why, and what state the service is in.
#[derive(Debug, thiserror::Error)]
#[error("{failure}. {state}")]
pub struct MigrationError {
    /// What failed.
    #[source]
    pub failure: Failure,
    /// How it ended.
    pub outcome: Outcome,
    /// What the user needs to know about the service now.
    pub state: String,
    /// Whether running the same migration again is safe.
    pub retry_safe: bool,
    /// The report, if the migration got far enough to have one.
    pub report: Option<Box<Report>>,
}

/// What `tether migrate` prints about a migration that did not start.
const NOTHING_CHANGED: &str = "Nothing was changed; the service runs on the source as before.";

impl MigrationError {
    /// A check before anything changed failed.
    fn check(message: impl ToString) -> MigrationError {
        MigrationError {
            failure: Failure::new(
                Side::Source,
                Phase::Check,
                ErrorCode::Refused,
                message.to_string(),
            ),
            outcome: Outcome::NotStarted,
            state: NOTHING_CHANGED.into(),
            retry_safe: true,
            report: None,
        }
    }

    /// Resolving a journaled migration could not begin (certificates, netlink or CRIU missing):
    /// the migration stays as the journal left it, in doubt, and `--recover` may run again.
    fn unresolved(record: &SourceRecord, message: impl ToString) -> MigrationError {
        MigrationError {
            failure: Failure::new(
                Side::Source,
                Phase::Resolve,
                ErrorCode::Internal,
                message.to_string(),
            ),
            outcome: Outcome::InDoubt,
            state: format!(
                "Not resolved: the journal still holds the migration (left at {:?}; the service \
                 had pid {} here, image set {}). Fix the cause and run `tether migrate --recover` \
                 again.",
                record.phase,
                record.pid,
                record.images.display()
            ),
            retry_safe: true,
            report: None,
        }
    }
}

/// The journal in a state directory could not be read, so nothing in it could be resolved.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the migration journal in {dir}")]
pub struct JournalUnreadable {
    /// The state directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub cause: PortError,
}

/// Runs a migration. `cancel` resolving before the commit point rolls the migration back.
///
/// Migrations an earlier `tether migrate` left unfinished in `opts.state_dir` are resolved
/// first (see [`recover`]).
pub async fn migrate(
    opts: &MigrateOptions,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<Report, MigrationError> {
    let id = MigrationId::random();
    let span = info_span!("migrate", id = %id, pid = opts.pid, to = %opts.to);
    migrate_inner(opts, id, cancel).instrument(span).await
}

async fn migrate_inner(
    opts: &MigrateOptions,
    id: MigrationId,
    cancel: impl std::future::Future<Output = ()>,
) -> Result<Report, MigrationError> {
    // ---- checks: nothing changes until all pass ----
    let agent_name = agent_name(opts).map_err(MigrationError::check)?;
    let journal: FileJournal<SourceRecord, ()> =
        FileJournal::open(&opts.state_dir).map_err(MigrationError::check)?;
    for (rid, r) in recover_all(&journal).await {
        match r {
            Ok(rep) => info!(id = %rid, outcome = ?rep.outcome, "resolved an unfinished migration"),
            Err(e) => warn!(id = %rid, "an unfinished migration could not be resolved: {e}"),
        }
    }
    if !journal.records().is_empty() {
        return Err(MigrationError::check(format!(
            "migrations left unfinished in {} are still unresolved (see the messages above); \
             run `tether migrate --recover` once the agent is reachable",
            opts.state_dir.display()
        )));
    }
    let criu = Criu::locate()
        .await
        .map_err(MigrationError::check)?
        .with_log_level(opts.criu_log_level);
    match &opts.container {
        Some(name) => {
            let c = ContainerSource::open(&criu, name)
                .await
                .map_err(MigrationError::check)?;
            let net = ContainerNet::open(&c).map_err(MigrationError::check)?;
            let pid_start = c.pid_start().ok_or_else(|| {
                MigrationError::check(format!("container {name} stopped meanwhile"))
            })?;
            let opts = MigrateOptions {
                pid: c.pid(),
                ..opts.clone()
            };
            let unit = (agent_name, journal, criu, pid_start);
            migrate_unit(&opts, id, cancel, unit, c, net).await
        }
        None => {
            let pid_start = match process_start_time(opts.pid) {
                Some(s) if opts.pid > 1 => s,
                _ => {
                    return Err(MigrationError::check(format!(
                        "no process with pid {}",
                        opts.pid
                    )))
                }
            };
            let tree = CriuTree::recorded(criu.clone(), opts.pid, pid_start);
            let net = HostAddressMover::new().map_err(MigrationError::check)?;
            let unit = (agent_name, journal, criu, pid_start);
            migrate_unit(opts, id, cancel, unit, tree, net).await
        }
    }
}

/// The agent's name, the journal, CRIU and the unit's root's start time, as checked.
type Checked = (String, FileJournal<SourceRecord, ()>, Criu, u64);

/// The rest of a migration, once the unit (`ckpt`, whose root is `opts.pid`) and the mover of
/// its address (`net`) are known.
async fn migrate_unit<C: Checkpointer + Unit, N: AddressMover>(
    opts: &MigrateOptions,
    id: MigrationId,
    cancel: impl std::future::Future<Output = ()>,
    (agent_name, journal, criu, pid_start): Checked,
    ckpt: C,
    net: N,
) -> Result<Report, MigrationError> {
    let identity = Identity::load(&opts.certs).map_err(MigrationError::check)?;
    let svc = opts.service_addr;
    let dev = match net.interface_of(svc.addr()).await {
        Ok(Some(dev)) => dev,
        Ok(None) => {
            return Err(MigrationError::check(format!(
                "service address {svc} is not configured on this host"
            )))
        }
        Err(e) => return Err(MigrationError::check(e)),
    };
    // A service restored lazily moments ago may still be receiving its memory: pages not yet
    // filled in are absent, and the scans and the dump would miss them.
    wait_for_lazy_fill(opts.pid)
        .await
        .map_err(MigrationError::check)?;
    let gate = match &opts.proxy {
        Some(p) => {
            let g = ProxyGate::open(p, None)
                .await
                .map_err(MigrationError::check)?;
            if let Some(hold) = g.max_hold().filter(|h| *h < opts.max_frozen + HOLD_MARGIN) {
                return Err(MigrationError::check(format!(
                    "the proxy holds the service's clients for at most {} ms (its max_hold_ms), \
                     shorter than --max-frozen ({} ms) + {} ms for the commit: a slow \
                     migration would be resumed under it. Lower --max-frozen or raise the \
                     proxy's max_hold_ms",
                    hold.as_millis(),
                    opts.max_frozen.as_millis(),
                    HOLD_MARGIN.as_millis()
                )));
            }
            Some(g)
        }
        None => None,
    };
    let images = opts.work_dir.join(format!("tether-{id}"));
    crate::dirs::private_dir(&images).map_err(MigrationError::check)?;
    if !crate::dirs::on_tmpfs(&images) {
        warn!(
            dir = %opts.work_dir.display(),
            "the work directory is not on tmpfs: the dump goes to disk, which lengthens the \
             frozen phase (give --work-dir a tmpfs directory, e.g. under /dev/shm)"
        );
    }

    // The frozen phase grows with the tree's sockets (`K n`): known before pre-copy starts.
    let sockets = crate::procmem::tree_sockets(opts.pid).unwrap_or_else(|e| {
        warn!("cannot count the service's sockets ({e}); the policy assumes none");
        0
    });
    let cfg = SourceConfig {
        id: id.clone(),
        service_addr: svc,
        source_pid: opts.pid,
        destination: opts.to.to_string(),
        precopy: opts
            .precopy
            .as_ref()
            .map(|pc| pc.policy(opts.costs.with_sockets(sockets))),
        gate: opts.proxy.as_ref().map(|p| GateConfig {
            redirect: p.redirect.is_some(),
        }),
        max_frozen: opts.max_frozen,
        timeouts: Timeouts::default(),
        container: ckpt.container_spec(),
    };
    let mut machine = SourceMachine::new(cfg, Instant::now()).map_err(MigrationError::check)?;
    if let Some(plan) = &opts.prediction {
        machine.set_prediction(plan.clone());
    }
    machine.set_sockets(sockets);
    let record = SourceRecord {
        phase: SourcePhase::Frozen,
        lock_table: None,
        pid: opts.pid,
        pid_start,
        criu_worker: None,
        service_addr: svc,
        dev: dev.clone(),
        agent: opts.to,
        agent_name,
        certs: opts.certs.clone(),
        images: images.clone(),
        proxy: opts
            .proxy
            .clone()
            .zip(gate.as_ref().map(ProxyGate::original)),
        criu_log_level: opts.criu_log_level,
        container: ckpt
            .container_spec()
            .map(|_| opts.container.clone().unwrap_or_default()),
    };
    let ctx = Ctx {
        id: id.clone(),
        // The start time checked and journaled above: the tree is the one the record names.
        ckpt: Arc::new(ckpt),
        net: Arc::new(net),
        journal: Arc::new(journal),
        identity: Arc::new(identity),
        record: Arc::new(Mutex::new(record)),
        limit: opts.bandwidth.map(RateLimit::bits_per_sec),
    };
    let mut result = drive(machine, ctx, gate, Some(Tracker::default()), cancel).await;
    result.report.criu = criu.path().display().to_string();
    result.report.container = opts.container.clone();
    record_source_memory(&mut result.report);
    if let (Outcome::Committed, Some(p)) = (result.outcome, &opts.proxy) {
        if let Err(e) = crate::gate::record_answers(p, &mut result.report).await {
            warn!("the proxy could not say when the service answered after the resume: {e}");
        }
    }
    if result.outcome != Outcome::Committed && images.exists() && !keeps_images(result.outcome) {
        let _ = std::fs::remove_dir_all(&images);
    }
    into_result(result, &images)
}

/// Puts the source's processes' peaks in `report` (the machine recorded CRIU's dump): this
/// process's and CRIU's worker's.
fn record_source_memory(report: &mut Report) {
    let m = &mut report.memory;
    m.source_tether_rss_bytes = crate::peaks::own_peak_rss();
    m.source_criu_rss_bytes = crate::peaks::children_peak_rss();
}

/// Whether the image set must be kept after a migration that ended so: it is the way back.
fn keeps_images(o: Outcome) -> bool {
    matches!(o, Outcome::InDoubt | Outcome::Failed)
}

fn into_result(r: SourceResult, images: &Path) -> Result<Report, MigrationError> {
    let SourceResult {
        outcome,
        failure,
        report,
    } = r;
    if outcome == Outcome::Committed {
        return Ok(report);
    }
    let pid = report.source_pid;
    let warnings = if report.warnings.is_empty() {
        String::new()
    } else {
        format!(" Warnings: {}.", report.warnings.join("; "))
    };
    let (state, retry_safe) = match outcome {
        Outcome::NotStarted => (NOTHING_CHANGED.to_string(), true),
        Outcome::RolledBack => (
            format!(
                "Rolled back: the service is still running on the source (pid {pid}).{warnings}"
            ),
            report.warnings.is_empty(),
        ),
        Outcome::RestoredOnSource => (
            format!(
                "The destination could not run the service after the commit point; it was \
                 restored on the source from its image set (pid {pid}), its connections \
                 intact.{warnings}"
            ),
            report.warnings.is_empty(),
        ),
        Outcome::InDoubt => (
            format!(
                "IN DOUBT: the source copy was ended at the commit point and the agent could \
                 not confirm that the service runs there. The image set is kept in {}. Run \
                 `tether migrate --recover` once the agent is reachable: it commits the \
                 destination's copy, or restores the service here.{warnings}",
                images.display()
            ),
            false,
        ),
        _ => (
            format!(
                "NO COPY OF THE SERVICE RUNS. The image set is kept in {}; `criu restore -D \
                 {} --tcp-established` restores it here.{warnings}",
                images.display(),
                images.display()
            ),
            false,
        ),
    };
    let failure = failure.unwrap_or_else(|| {
        Failure::new(
            Side::Source,
            Phase::Cleanup,
            ErrorCode::Internal,
            format!("the migration ended {outcome:?} without a failure"),
        )
    });
    Err(MigrationError {
        failure,
        outcome,
        state,
        retry_safe,
        report: Some(Box::new(report)),
    })
}

/// Resolves every migration an earlier `tether migrate` left in the journal in `state_dir`.
///
/// Errs only when the journal cannot be read at all; each journaled migration has its own
/// result.
pub async fn recover(
    state_dir: &Path,
) -> Result<Vec<(MigrationId, Result<Report, MigrationError>)>, JournalUnreadable> {
    let journal =
        FileJournal::<SourceRecord, ()>::open(state_dir).map_err(|cause| JournalUnreadable {
            dir: state_dir.to_path_buf(),
            cause,
        })?;
    Ok(recover_all(&journal).await)
}

async fn recover_all(
    journal: &FileJournal<SourceRecord, ()>,
) -> Vec<(MigrationId, Result<Report, MigrationError>)> {
    let mut out = Vec::new();
    for (id, record) in journal.records() {
        let span = info_span!("recover", id = %id, pid = record.pid, to = %record.agent);
        let r = recover_one(journal.clone(), id.clone(), record)
            .instrument(span)
            .await;
        out.push((id, r));
    }
    out
}

async fn recover_one(
    journal: FileJournal<SourceRecord, ()>,
    id: MigrationId,
    record: SourceRecord,
) -> Result<Report, MigrationError> {
    warn!(phase = ?record.phase, "resolving a migration an earlier `tether migrate` left unfinished");
    let unresolved = |e: &dyn std::fmt::Display| MigrationError::unresolved(&record, e);
    if record.agent_name.is_empty() {
        return Err(unresolved(&format!(
            "the journal does not name the agent {} (the record was written by an older tether \
             migrate): add `\"agent_name\": \"NAME\"`, the name of its certificate, to \
             {id}.json in the state directory",
            record.agent
        )));
    }
    let identity = Identity::load(&record.certs).map_err(|e| unresolved(&e))?;
    let net = HostAddressMover::new().map_err(|e| unresolved(&e))?;
    let criu = Criu::locate()
        .await
        .map_err(|e| unresolved(&e))?
        .with_log_level(record.criu_log_level);
    let gate = match &record.proxy {
        Some((p, original)) => match ProxyGate::open(p, Some(*original)).await {
            Ok(g) => Some(g),
            Err(e) => {
                warn!("the proxy cannot be reached ({e}); it resumes by itself after its maximum hold");
                None
            }
        },
        None => None,
    };
    let cfg = SourceConfig {
        id: id.clone(),
        service_addr: record.service_addr,
        source_pid: record.pid,
        destination: record.agent.to_string(),
        precopy: None,
        gate: gate.as_ref().map(|_| GateConfig {
            redirect: record
                .proxy
                .as_ref()
                .is_some_and(|(p, _)| p.redirect.is_some()),
        }),
        max_frozen: Duration::from_secs(1),
        timeouts: Timeouts::default(),
        container: None,
    };
    if let Some(c) = &record.container {
        // Its locks were in its own namespace: they went with tether's death (the owned one)
        // or stay until Podman removes the container (the kept one).
        warn!(
            container = %c,
            "resolving a container's migration as a process tree's: if it ends committed,              remove the source's container with `podman rm {c}`"
        );
    }
    let machine =
        SourceMachine::recover(cfg, record.phase, record.lock_table.clone(), Instant::now());
    let images = record.images.clone();
    let ctx = Ctx {
        id,
        ckpt: Arc::new(CriuTree::recorded(criu, record.pid, record.pid_start)),
        net: Arc::new(net),
        journal: Arc::new(journal),
        identity: Arc::new(identity),
        record: Arc::new(Mutex::new(record)),
        limit: None,
    };
    let result = drive(machine, ctx, gate, None, std::future::pending::<()>()).await;
    into_result(result, &images)
}

/// Waits until no process of the tree at `root` has memory registered with a userfaultfd (a
/// lazy restore still filling it in), at most [`LAZY_FILL_WAIT`].
async fn wait_for_lazy_fill(root: i32) -> Result<(), String> {
    let deadline = Instant::now() + LAZY_FILL_WAIT;
    let mut told = false;
    loop {
        let procs = crate::procmem::tree(root).map_err(|e| e.to_string())?;
        let Some(pid) = procs
            .iter()
            .map(|p| p.host)
            .find(|&p| crate::procmem::userfaultfd_registered(p).unwrap_or(false))
        else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "pid {pid} still has memory registered with a userfaultfd after {} s: a lazy \
                 restore is still filling it in; nothing was changed, try again later",
                LAZY_FILL_WAIT.as_secs()
            ));
        }
        if !told {
            info!(
                pid,
                "waiting for a lazy restore to finish filling in the service's memory"
            );
            told = true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The driver proper: generic over the ports, so that tests can run it against fakes.
// ---------------------------------------------------------------------------------------------

/// What the driver works with.
pub struct Ctx<C, N, J> {
    /// The migration.
    pub id: MigrationId,
    /// CRIU (or a fake).
    pub ckpt: Arc<C>,
    /// The host's network (or a fake).
    pub net: Arc<N>,
    /// The journal.
    pub journal: Arc<J>,
    /// This host's certificates.
    pub identity: Arc<Identity>,
    /// The journal record, updated as the migration goes.
    pub record: Arc<Mutex<SourceRecord>>,
    /// Cap on the transfer rate.
    pub limit: Option<RateLimit>,
}

impl<C, N, J> std::fmt::Debug for Ctx<C, N, J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Messages to the driver's loop.
enum Input {
    /// An event for the machine, from the link of generation `gen` (0: not from a link).
    Event(u64, SourceEvent),
    /// A connection is up.
    LinkUp(u64, Link),
    /// CRIU's worker is known.
    Worker(Option<(i32, u64)>),
}

/// A connection to the agent with its stream halves.
struct Link {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    writer: mpsc::UnboundedSender<WriterCmd>,
    reader: tokio::task::JoinHandle<()>,
    writer_task: tokio::task::JoinHandle<()>,
}

enum WriterCmd {
    Send(ToAgent),
    Round,
    Images,
}

enum CriuCmd {
    Start(PathBuf),
    Proceed,
    Commit,
    Rollback,
}

enum GateCmd {
    Pause,
    Redirect,
    Resume,
    Undo,
}

/// Runs `machine` to its end against the ports in `ctx`, the proxy `gate` and, for a new
/// migration, the pre-copy `tracker`.
pub async fn drive<C, N, J, G>(
    mut machine: SourceMachine,
    ctx: Ctx<C, N, J>,
    gate: Option<G>,
    tracker: Option<Tracker>,
    cancel: impl std::future::Future<Output = ()>,
) -> SourceResult
where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<SourceRecord, ()>,
    G: TrafficGate,
{
    let (tx, mut rx) = mpsc::unbounded_channel::<Input>();
    let ctx = Arc::new(ctx);
    let criu = spawn_criu(ctx.ckpt.clone(), tx.clone());
    let svc_ip = lock(&ctx.record).service_addr.addr();
    let gate = gate.map(|g| spawn_gate(g, svc_ip, tx.clone()));
    let mut tracker = tracker;
    let mut link: Option<Link> = None;
    let mut generation = 0u64;
    let throttle: Arc<Mutex<ThrottleSlot>> = Arc::new(Mutex::new(ThrottleSlot::Unset));
    // Progress lines of a long transfer, from the connection's own counters: a round lasts
    // until its acknowledgement, long after its pages went into quinn's send buffer.
    let mut _progress: Option<Progress> = None;
    let mut hold = super::hold::TestHold::from_env();
    tokio::pin!(cancel);
    let mut cancelled = false;
    loop {
        super::hold::TestHold::at(&mut hold, machine.state_name(), false).await;
        while let Some(action) = machine.poll_action() {
            let label = match &action {
                SourceAction::SendRound { round } => Some(format!("pre-copy round {round}")),
                SourceAction::SendImages => {
                    Some("final transfer and restore (service frozen)".into())
                }
                _ => None,
            };
            if let (Some(label), Some(l)) = (label, link.as_ref()) {
                _progress = Some(Progress::start(&l.conn, label));
            }
            perform(
                action,
                &mut machine,
                &ctx,
                &tx,
                &criu,
                gate.as_ref(),
                &mut link,
                &mut generation,
                &mut tracker,
                &throttle,
            );
        }
        if machine.is_done() {
            break;
        }
        super::hold::TestHold::at(&mut hold, machine.state_name(), true).await;
        if !machine.transferring() {
            _progress = None;
        }
        let sleep = super::until(machine.poll_timeout());
        tokio::select! {
            input = rx.recv() => match input {
                Some(Input::Event(g, e)) => {
                    if g == 0 || g == generation {
                        machine.handle(Instant::now(), e);
                    }
                }
                Some(Input::LinkUp(g, l)) => {
                    if g == generation {
                        link = Some(l);
                        machine.handle(Instant::now(), SourceEvent::Connected);
                    } else {
                        l.conn.close(transport::NO_DECISION.into(), b"superseded");
                    }
                }
                Some(Input::Worker(w)) => {
                    let mut r = lock(&ctx.record);
                    r.criu_worker = w;
                    if let Err(e) = ctx.journal.save(&ctx.id, &r) {
                        warn!("cannot journal CRIU's worker: {e}");
                    }
                }
                None => break,
            },
            () = sleep => machine.handle(Instant::now(), SourceEvent::Tick),
            () = &mut cancel, if !cancelled => {
                cancelled = true;
                info!("cancel requested");
                machine.handle(Instant::now(), SourceEvent::Cancel);
            }
        }
    }
    if let Some(l) = link.take() {
        close_link(l, transport::DONE, "done");
    }
    closed().await;
    match machine.result() {
        Some(r) => r.clone(),
        None => SourceResult {
            outcome: Outcome::Failed,
            failure: Some(Failure::new(
                Side::Source,
                Phase::Cleanup,
                ErrorCode::Internal,
                "the driver stopped before the migration ended",
            )),
            report: machine.report().clone(),
        },
    }
}

/// Closing connections: their CONNECTION_CLOSE must leave before the process exits (an abort
/// that never reaches the agent leaves it waiting for its idle timeout).
static CLOSING: Mutex<Vec<tokio::task::JoinHandle<()>>> = Mutex::new(Vec::new());

fn close_link(l: Link, code: u32, reason: &str) {
    let reason = reason.to_string();
    l.reader.abort();
    l.writer_task.abort();
    let h = tokio::spawn(async move {
        transport::close(&l.endpoint, &l.conn, code, &reason).await;
    });
    let mut closing = lock(&CLOSING);
    closing.retain(|h| !h.is_finished());
    closing.push(h);
}

/// Waits (each bounded by [`transport::close`]) until closing connections are closed.
async fn closed() {
    let handles = std::mem::take(&mut *lock(&CLOSING));
    for h in handles {
        let _ = h.await;
    }
}

/// The auto-converge throttle of one migration, shared with the task that applies it.
enum ThrottleSlot {
    /// Not applied (or being measured and applied by a task).
    Unset,
    /// On the service's cgroup.
    Applied(crate::throttle::Throttle),
    /// Released: a throttle applied after this (a measuring task that lost the race) is undone
    /// at once, so the service is never left throttled.
    Released,
}

/// Measures the tree's CPU use (200 ms), then throttles it to `percent` of that. The caller
/// stores the throttle, or undoes it if the slot was released meanwhile.
async fn apply_throttle(
    root: i32,
    id: &MigrationId,
    percent: u8,
) -> Result<crate::throttle::Throttle, PortError> {
    let procs = crate::procmem::tree(root)
        .map_err(|e| PortError::caused(ErrorCode::Internal, "the tree", e))?;
    let p2 = procs.clone();
    let usage = tokio::task::spawn_blocking(move || {
        crate::throttle::cpu_usage(&p2, Duration::from_millis(200))
    })
    .await
    .map_err(|e| PortError::new(ErrorCode::Internal, e.to_string()))?;
    info!(cpus = usage, "service CPU use before throttling");
    crate::throttle::Throttle::apply(&procs, id.as_str(), percent, usage)
        .map_err(|e| PortError::caused(ErrorCode::Internal, "throttle", e))
}

/// Locks the service address under `table` (`owned`: tied to this process) and reports `step`.
fn spawn_lock<C, N, J>(
    ctx: &Arc<Ctx<C, N, J>>,
    tx: &mpsc::UnboundedSender<Input>,
    table: String,
    owned: bool,
    step: Step,
) where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<SourceRecord, ()>,
{
    let addr = lock(&ctx.record).service_addr.addr();
    let (net, tx) = (ctx.net.clone(), tx.clone());
    tokio::spawn(async move {
        let r = net.lock(&table, addr, owned).await;
        let _ = tx.send(Input::Event(0, SourceEvent::Completed(step, r)));
    });
}

#[allow(clippy::too_many_arguments)]
fn perform<C, N, J>(
    action: SourceAction,
    machine: &mut SourceMachine,
    ctx: &Arc<Ctx<C, N, J>>,
    tx: &mpsc::UnboundedSender<Input>,
    criu: &mpsc::UnboundedSender<CriuCmd>,
    gate: Option<&mpsc::UnboundedSender<GateCmd>>,
    link: &mut Option<Link>,
    generation: &mut u64,
    tracker: &mut Option<Tracker>,
    throttle: &Arc<Mutex<ThrottleSlot>>,
) where
    C: Checkpointer,
    N: AddressMover,
    J: Journal<SourceRecord, ()>,
{
    let now = Instant::now;
    let event = |e: SourceEvent| Input::Event(0, e);
    match action {
        SourceAction::Connect => {
            if let Some(l) = link.take() {
                close_link(l, transport::NO_DECISION, "reconnecting");
            }
            *generation += 1;
            let g = *generation;
            let (agent, name) = {
                let r = lock(&ctx.record);
                (r.agent, r.agent_name.clone())
            };
            let identity = ctx.identity.clone();
            let tx = tx.clone();
            let root = ctx.ckpt.root_pid();
            let images = lock(&ctx.record).images.clone();
            let limit = ctx.limit;
            let tracker = tracker.take();
            tokio::spawn(async move {
                match open_link(
                    &identity, agent, &name, g, &tx, root, images, limit, tracker,
                )
                .await
                {
                    Ok(l) => {
                        let _ = tx.send(Input::LinkUp(g, l));
                    }
                    Err(e) => {
                        let _ = tx.send(Input::Event(
                            g,
                            SourceEvent::ConnectionLost(ConnectionEnd {
                                reason: e.to_string(),
                                by_peer: false,
                            }),
                        ));
                    }
                }
            });
        }
        SourceAction::Send(m) => {
            if let Some(l) = link.as_ref() {
                let _ = l.writer.send(WriterCmd::Send(m));
            }
        }
        SourceAction::SendRound { .. } => match link.as_ref() {
            Some(l) => {
                let _ = l.writer.send(WriterCmd::Round);
            }
            None => machine.handle(
                now(),
                SourceEvent::RoundScanned(Err(PortError::new(
                    ErrorCode::Transport,
                    "no connection",
                ))),
            ),
        },
        SourceAction::SendImages => match link.as_ref() {
            Some(l) => {
                let _ = l.writer.send(WriterCmd::Images);
            }
            None => machine.handle(
                now(),
                SourceEvent::ImagesSent(Err(PortError::new(ErrorCode::Transport, "no connection"))),
            ),
        },
        SourceAction::Abort { code, reason } => {
            if let Some(l) = link.take() {
                *generation += 1;
                info!(%code, "aborting the migration on the agent: {reason}");
                close_link(l, transport::ABORT, &reason);
            }
        }
        SourceAction::Close => {
            if let Some(l) = link.take() {
                *generation += 1;
                close_link(l, transport::NO_DECISION, "closed without a decision");
            }
        }
        SourceAction::Throttle { percent } => {
            let mut slot = lock(throttle);
            match &mut *slot {
                ThrottleSlot::Applied(t) => {
                    let r = t
                        .set(percent)
                        .map_err(|e| PortError::caused(ErrorCode::Internal, "throttle", e));
                    drop(slot);
                    machine.handle(now(), SourceEvent::Completed(Step::Throttle, r));
                }
                ThrottleSlot::Released => {
                    drop(slot);
                    let r = Err(PortError::new(
                        ErrorCode::Internal,
                        "the throttle was already released",
                    ));
                    machine.handle(now(), SourceEvent::Completed(Step::Throttle, r));
                }
                ThrottleSlot::Unset => {
                    drop(slot);
                    // Measuring the tree's CPU use takes a moment: off the loop.
                    let root = ctx.ckpt.root_pid();
                    let id = ctx.id.clone();
                    let throttle = throttle.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let r = apply_throttle(root, &id, percent).await;
                        let mut slot = lock(&throttle);
                        // Released meanwhile: undone at once, so the service is never left
                        // throttled, and not reported: the machine has left pre-copy and counts
                        // no throttle step any more (while finishing, a late completion would be
                        // taken for one of the steps it waits for).
                        if matches!(*slot, ThrottleSlot::Released) {
                            drop(slot);
                            if let Ok(t) = r {
                                t.release();
                            }
                            info!("the throttle ended before it was applied: not reported");
                            return;
                        }
                        let r = r.map(|t| *slot = ThrottleSlot::Applied(t));
                        drop(slot);
                        let _ = tx.send(event(SourceEvent::Completed(Step::Throttle, r)));
                    });
                }
            }
        }
        SourceAction::ReleaseThrottle => {
            // Whatever is applied goes; a throttle still being measured finds `Released` and
            // undoes itself.
            match std::mem::replace(&mut *lock(throttle), ThrottleSlot::Released) {
                ThrottleSlot::Applied(t) => t.release(),
                _ => crate::throttle::release_leftover(ctx.id.as_str()),
            }
            machine.handle(now(), SourceEvent::Completed(Step::ReleaseThrottle, Ok(())));
        }
        SourceAction::StartDump => {
            let images = lock(&ctx.record).images.clone();
            let _ = criu.send(CriuCmd::Start(images));
        }
        SourceAction::ProceedDump => {
            let _ = criu.send(CriuCmd::Proceed);
        }
        SourceAction::CommitDump => {
            let _ = criu.send(CriuCmd::Commit);
        }
        SourceAction::RollbackDump => {
            let _ = criu.send(CriuCmd::Rollback);
        }
        SourceAction::Pause
        | SourceAction::Redirect
        | SourceAction::Resume
        | SourceAction::UndoGate => {
            let cmd = match action {
                SourceAction::Pause => GateCmd::Pause,
                SourceAction::Redirect => GateCmd::Redirect,
                SourceAction::Resume => GateCmd::Resume,
                _ => GateCmd::Undo,
            };
            match gate {
                Some(g) => {
                    let _ = g.send(cmd);
                }
                None => {
                    let e = PortError::new(ErrorCode::Proxy, "no proxy");
                    let ev = match cmd {
                        GateCmd::Pause => GateEvent::Paused(Err(e)),
                        GateCmd::Redirect => GateEvent::Redirected(Err(e)),
                        GateCmd::Resume => GateEvent::Resumed(Err(e)),
                        GateCmd::Undo => GateEvent::Undone(Err(e)),
                    };
                    machine.handle(now(), SourceEvent::Gate(ev));
                }
            }
        }
        SourceAction::Announce => {
            let (addr, dev) = {
                let r = lock(&ctx.record);
                (r.service_addr.addr(), r.dev.clone())
            };
            let net = ctx.net.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = net.announce(addr, &dev).await;
                let _ = tx.send(event(SourceEvent::Completed(Step::Announce, r)));
            });
        }
        SourceAction::RemoveAddress => {
            let (svc, dev) = {
                let r = lock(&ctx.record);
                (r.service_addr, r.dev.clone())
            };
            let net = ctx.net.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = net.remove(svc, &dev).await;
                let _ = tx.send(event(SourceEvent::Completed(Step::RemoveAddress, r)));
            });
        }
        SourceAction::Lock { table } => spawn_lock(ctx, tx, table, true, Step::Lock),
        SourceAction::KeepLock { table } => spawn_lock(ctx, tx, table, false, Step::KeepLock),
        SourceAction::Unlock { tables } => {
            let net = ctx.net.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = net.unlock(&tables).await;
                let _ = tx.send(event(SourceEvent::Completed(Step::Unlock, r)));
            });
        }
        SourceAction::RemoveImages => {
            let images = lock(&ctx.record).images.clone();
            let r = match std::fs::remove_dir_all(&images) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(PortError::caused(
                    ErrorCode::Storage,
                    &format!("removing {}", images.display()),
                    e,
                )),
            };
            machine.handle(now(), SourceEvent::Completed(Step::RemoveImages, r));
        }
        SourceAction::CheckSourceCopy => {
            let ckpt = ctx.ckpt.clone();
            let worker = lock(&ctx.record).criu_worker;
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = ckpt.source_copy_exists(worker).await;
                let _ = tx.send(event(SourceEvent::SourceCopy(r)));
            });
        }
        SourceAction::KillSourceCopy => {
            let ckpt = ctx.ckpt.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = ckpt.kill_source_copy().await;
                let _ = tx.send(event(SourceEvent::SourceKilled(r)));
            });
        }
        SourceAction::RestoreLocally => {
            let ckpt = ctx.ckpt.clone();
            let net = ctx.net.clone();
            let (svc, dev, images) = {
                let r = lock(&ctx.record);
                (r.service_addr, r.dev.clone(), r.images.clone())
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let r = async {
                    // The address is still here unless a cleanup removed it.
                    net.add(svc, &dev).await?;
                    ckpt.restore_here(&images).await
                }
                .await;
                let _ = tx.send(event(SourceEvent::RestoredLocally(r)));
            });
        }
        SourceAction::Journal { phase, lock_table } => {
            let r = {
                let mut rec = lock(&ctx.record);
                rec.phase = phase;
                if lock_table.is_some() {
                    rec.lock_table = lock_table;
                }
                ctx.journal.save(&ctx.id, &rec)
            };
            machine.handle(now(), SourceEvent::Completed(Step::Journal, r));
        }
        SourceAction::ForgetJournal => {
            let r = ctx.journal.forget(&ctx.id);
            machine.handle(now(), SourceEvent::Completed(Step::Journal, r));
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn open_link(
    identity: &Identity,
    agent: SocketAddr,
    name: &str,
    generation: u64,
    tx: &mpsc::UnboundedSender<Input>,
    root: i32,
    images: PathBuf,
    limit: Option<RateLimit>,
    tracker: Option<Tracker>,
) -> Result<Link, TransportError> {
    let (endpoint, conn) =
        transport::connect(identity, agent, name, Duration::from_secs(5)).await?;
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| TransportError::Lost(e.to_string()))?;
    let (wtx, wrx) = mpsc::unbounded_channel();
    let reader = tokio::spawn(read_loop(FrameReceiver(recv), generation, tx.clone()));
    let writer_task = tokio::spawn(write_loop(
        FrameSender(send),
        wrx,
        generation,
        tx.clone(),
        root,
        images,
        limit,
        tracker,
    ));
    Ok(Link {
        endpoint,
        conn,
        writer: wtx,
        reader,
        writer_task,
    })
}

async fn read_loop(mut rx: FrameReceiver, generation: u64, tx: mpsc::UnboundedSender<Input>) {
    let end = loop {
        match rx.next().await {
            Ok(Some(Frame::Control(body))) => {
                match crate::protocol::frame::decode::<FromAgent>(&body) {
                    Ok(m) => {
                        let _ = tx.send(Input::Event(generation, SourceEvent::Message(m)));
                    }
                    Err(e) => {
                        break ConnectionEnd {
                            reason: format!("the agent broke the protocol: {e}"),
                            by_peer: false,
                        }
                    }
                }
            }
            Ok(Some(f)) => {
                break ConnectionEnd {
                    reason: format!("the agent sent {} frames", f.name()),
                    by_peer: false,
                }
            }
            Ok(None) => break super::connection_end("agent", None),
            Err(e) => break super::connection_end("agent", Some(e)),
        }
    };
    let _ = tx.send(Input::Event(generation, SourceEvent::ConnectionLost(end)));
}

#[allow(clippy::too_many_arguments)]
async fn write_loop(
    mut stream: FrameSender,
    mut cmds: mpsc::UnboundedReceiver<WriterCmd>,
    generation: u64,
    tx: mpsc::UnboundedSender<Input>,
    root: i32,
    images: PathBuf,
    limit: Option<RateLimit>,
    mut tracker: Option<Tracker>,
) {
    while let Some(cmd) = cmds.recv().await {
        let event = match cmd {
            WriterCmd::Send(m) => {
                // A failure shows as the reader's connection loss.
                if stream.send(&m).await.is_err() {
                    break;
                }
                continue;
            }
            WriterCmd::Round => {
                let t = tracker.take().unwrap_or_default();
                match precopy::send_round(root, t, &mut stream, limit).await {
                    Ok((t, scan)) => {
                        tracker = Some(t);
                        SourceEvent::RoundScanned(Ok(scan))
                    }
                    Err(e) => SourceEvent::RoundScanned(Err(transfer_error(e))),
                }
            }
            WriterCmd::Images => {
                let t = tracker.take().unwrap_or_default();
                match precopy::send_images(&images, t, &mut stream).await {
                    Ok(sent) => SourceEvent::ImagesSent(Ok(sent)),
                    Err(e) => SourceEvent::ImagesSent(Err(transfer_error(e))),
                }
            }
        };
        let _ = tx.send(Input::Event(generation, event));
    }
}

fn transfer_error(e: precopy::TransferError) -> PortError {
    match e {
        precopy::TransferError::Transport(t) => {
            PortError::caused(ErrorCode::Transport, "sending", t)
        }
        other => PortError::caused(ErrorCode::Storage, "reading", other),
    }
}

fn spawn_criu<C: Checkpointer>(
    ckpt: Arc<C>,
    tx: mpsc::UnboundedSender<Input>,
) -> mpsc::UnboundedSender<CriuCmd> {
    let (ctx, mut crx) = mpsc::unbounded_channel::<CriuCmd>();
    tokio::spawn(async move {
        let mut dump: Option<C::Dump> = None;
        let send = |e: DumpEvent| {
            let _ = tx.send(Input::Event(0, SourceEvent::Dump(e)));
        };
        while let Some(cmd) = crx.recv().await {
            match cmd {
                CriuCmd::Start(images) => match ckpt.start_dump(&images).await {
                    Ok(d) => {
                        let _ = tx.send(Input::Worker(d.worker()));
                        dump = Some(d);
                        send(DumpEvent::PreFreeze);
                    }
                    Err(e) => send(DumpEvent::Failed(e)),
                },
                CriuCmd::Proceed => {
                    let Some(d) = dump.as_mut() else {
                        send(DumpEvent::Failed(PortError::new(
                            ErrorCode::Internal,
                            "no dump to proceed",
                        )));
                        continue;
                    };
                    // A rollback may come while CRIU dumps: it must not wait for the dump.
                    let interrupted = {
                        let fut = d.proceed();
                        tokio::pin!(fut);
                        tokio::select! {
                            r = &mut fut => Ok(r),
                            c = crx.recv() => Err(c),
                        }
                    };
                    match interrupted {
                        Ok(Ok(DumpPoint::Frozen)) => send(DumpEvent::Frozen),
                        Ok(Ok(DumpPoint::Held)) => send(DumpEvent::Held),
                        Ok(Ok(DumpPoint::PreFreeze)) => send(DumpEvent::PreFreeze),
                        Ok(Err(e)) => {
                            dump = None;
                            send(DumpEvent::Failed(e));
                        }
                        Err(Some(CriuCmd::Rollback)) => {
                            if let Some(d) = dump.take() {
                                send(DumpEvent::RolledBack(d.rollback().await));
                            }
                        }
                        Err(_) => {
                            if let Some(d) = dump.take() {
                                send(DumpEvent::RolledBack(d.rollback().await));
                            }
                            break;
                        }
                    }
                }
                CriuCmd::Commit => match dump.take() {
                    Some(mut d) => match d.answer_commit().await {
                        // The copy cannot come back now: the commit may go while CRIU ends it.
                        Ok(()) => {
                            send(DumpEvent::CommitAnswered);
                            send(DumpEvent::Ended(d.commit().await));
                        }
                        Err(e) => send(DumpEvent::Ended(Err(e))),
                    },
                    None => send(DumpEvent::Ended(Err(PortError::new(
                        ErrorCode::Internal,
                        "no dump to commit",
                    )))),
                },
                CriuCmd::Rollback => {
                    let r = match dump.take() {
                        Some(d) => d.rollback().await,
                        None => Ok(()),
                    };
                    send(DumpEvent::RolledBack(r));
                }
            }
        }
        // The driver is gone: a dump still held rolls back (CRIU thaws the tree).
        if let Some(d) = dump.take() {
            let _ = d.rollback().await;
        }
    });
    ctx
}

fn spawn_gate<G: TrafficGate>(
    mut gate: G,
    svc_ip: std::net::Ipv4Addr,
    tx: mpsc::UnboundedSender<Input>,
) -> mpsc::UnboundedSender<GateCmd> {
    let (gtx, mut grx) = mpsc::unbounded_channel::<GateCmd>();
    tokio::spawn(async move {
        while let Some(cmd) = grx.recv().await {
            let ev = match cmd {
                GateCmd::Pause => {
                    // The service reads what the proxy sent before the pause while the proxy
                    // waits for its flows to quiesce; what is still queued once the proxy sends
                    // nothing more gets a moment to be read.
                    let r = gate.pause().await;
                    if r.is_ok() {
                        drain_udp(svc_ip).await;
                    }
                    GateEvent::Paused(r)
                }
                GateCmd::Redirect => GateEvent::Redirected(gate.redirect().await),
                GateCmd::Resume => GateEvent::Resumed(gate.resume().await),
                GateCmd::Undo => GateEvent::Undone(gate.undo().await),
            };
            let _ = tx.send(Input::Event(0, SourceEvent::Gate(ev)));
        }
    });
    gtx
}

/// How long the source waits, after the proxy's pause, for the service to read its queued UDP
/// datagrams. A service reads what is queued within microseconds once scheduled; clients that
/// send to it directly (not through the proxy) can keep the queue from ever being empty, and
/// then this is what the pause costs them all (at 100 ms it cost a test 85 ms of stall, at 20 ms
/// it reached its cap in several runs of that test).
const UDP_DRAIN_MAX: Duration = Duration::from_millis(5);

/// Waits until the service's UDP receive queues are empty, at most [`UDP_DRAIN_MAX`]; called
/// once the proxy has paused (it sends nothing more). CRIU drops datagrams queued on a socket at
/// dump time; a service that does not read loses them. (Not polled during the pause itself:
/// only an empty queue after it counts, and reading `/proc/net/udp` every millisecond competes
/// with the quiescing for the CPU.)
async fn drain_udp(svc_ip: std::net::Ipv4Addr) {
    let deadline = Instant::now() + UDP_DRAIN_MAX;
    loop {
        match crate::hostnet::udp_rx_queued(svc_ip) {
            Ok(0) | Err(_) => return,
            Ok(n) if Instant::now() >= deadline => {
                warn!(
                    bytes = n,
                    "UDP data still queued at the service; CRIU drops it"
                );
                return;
            }
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_journal_that_cannot_be_read_is_an_error_not_nothing_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A file where the state directory should be.
        let file = dir.path().join("state");
        std::fs::write(&file, b"").expect("file");
        let e = recover(&file).await.expect_err("an unreadable journal");
        assert_eq!(e.dir, file);
        assert!(
            e.to_string().contains("cannot read the migration journal"),
            "{e}"
        );
    }

    fn options(certs: &Path, state: &Path, agent_name: Option<&str>) -> MigrateOptions {
        MigrateOptions {
            pid: std::process::id() as i32,
            container: None,
            to: "10.9.0.3:7700".parse().expect("agent"),
            agent_name: agent_name.map(str::to_string),
            certs: certs.to_path_buf(),
            service_addr: "10.9.0.2/24".parse().expect("address"),
            work_dir: state.join("work"),
            state_dir: state.join("state"),
            criu_log_level: 1,
            max_frozen: Duration::from_secs(4),
            precopy: None,
            bandwidth: None,
            proxy: None,
            costs: crate::profile::Profile::default().costs(),
            prediction: None,
        }
    }

    #[tokio::test]
    async fn a_migration_without_the_agents_name_is_refused_before_anything_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = options(&dir.path().join("certs"), dir.path(), None);
        let e = migrate(&opts, std::future::pending::<()>())
            .await
            .expect_err("no agent name");
        assert_eq!(e.outcome, Outcome::NotStarted, "{e}");
        assert!(e.retry_safe);
        let msg = e.to_string();
        assert!(msg.contains("--agent-name NAME"), "{msg}");
        assert!(msg.contains("agents.toml"), "{msg}");
        assert!(msg.contains("\"10.9.0.3:7700\" = \"NAME\""), "{msg}");
        assert!(msg.contains(NOTHING_CHANGED), "{msg}");
        assert!(
            !opts.state_dir.exists(),
            "refused before the journal is even opened"
        );
        let opts = options(&dir.path().join("certs"), dir.path(), Some("../dst"));
        let e = migrate(&opts, std::future::pending::<()>())
            .await
            .expect_err("a bad name");
        assert!(e.to_string().contains("invalid agent name"), "{e}");
    }

    #[test]
    fn the_agents_name_comes_from_the_option_or_the_agents_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join(crate::tls::AGENTS_FILE),
            "\"10.9.0.3:7700\" = \"edge2\"\n",
        )
        .expect("agents file");
        let opts = |n| options(dir.path(), dir.path(), n);
        assert_eq!(agent_name(&opts(None)).as_deref(), Ok("edge2"));
        assert_eq!(agent_name(&opts(Some("edge9"))).as_deref(), Ok("edge9"));
        let mut other = opts(None);
        other.to = "10.9.0.4:7700".parse().expect("addr");
        assert!(agent_name(&other).is_err(), "no entry for that address");
    }

    /// A migration journaled as frozen, whose certificates (in `dir`) do not exist: its
    /// recovery cannot even connect.
    fn frozen_record(dir: &Path) -> SourceRecord {
        SourceRecord {
            phase: SourcePhase::Frozen,
            lock_table: None,
            pid: 4242,
            pid_start: 1,
            criu_worker: None,
            service_addr: "10.9.0.2/24".parse().expect("address"),
            dev: "eth0".into(),
            agent: "127.0.0.1:1".parse().expect("agent"),
            agent_name: "dst".into(),
            certs: dir.join("no-certs"),
            images: dir.join("images"),
            proxy: None,
            criu_log_level: 1,
            container: None,
        }
    }

    #[tokio::test]
    async fn a_journaled_migration_without_the_agents_name_stops_recovery_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = frozen_record(dir.path());
        // As an older tether migrate wrote it: null, or no field at all.
        let mut old = serde_json::to_value(&record).expect("json");
        old["agent_name"] = serde_json::Value::Null;
        let r: SourceRecord = serde_json::from_value(old.clone()).expect("null reads");
        assert_eq!(r.agent_name, "");
        old.as_object_mut().expect("object").remove("agent_name");
        let r: SourceRecord = serde_json::from_value(old.clone()).expect("missing reads");
        assert_eq!(r.agent_name, "");
        let id = MigrationId::random();
        let state = dir.path().join("state");
        crate::dirs::private_dir(&state).expect("state dir");
        std::fs::write(
            state.join(format!("{id}.json")),
            serde_json::to_vec(&old).expect("json"),
        )
        .expect("old record");
        let results = recover(&state).await.expect("a readable journal");
        assert_eq!(results.len(), 1, "the old record is read, not skipped");
        let e = results[0].1.as_ref().expect_err("not resolved");
        assert_eq!(e.outcome, Outcome::InDoubt, "{e}");
        assert!(e.to_string().contains("does not name the agent"), "{e}");
        assert!(e.to_string().contains(&format!("{id}.json")), "{e}");
    }

    #[tokio::test]
    async fn a_recovery_that_cannot_begin_keeps_the_migration_in_doubt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal =
            FileJournal::<SourceRecord, ()>::open(&dir.path().join("state")).expect("journal");
        let id = MigrationId::random();
        let record = frozen_record(dir.path());
        journal.save(&id, &record).expect("save");
        let results = recover(&dir.path().join("state"))
            .await
            .expect("a readable journal");
        assert_eq!(results.len(), 1);
        let (rid, r) = &results[0];
        assert_eq!(rid, &id);
        let e = r.as_ref().expect_err("not resolved");
        assert_eq!(e.outcome, Outcome::InDoubt, "{e}");
        assert!(!e.outcome.service_runs());
        assert!(e.state.contains("Not resolved"), "{}", e.state);
        assert_eq!(
            journal.records().len(),
            1,
            "the record is kept for the next --recover"
        );
    }
}
