//! The source side of a migration (`tether migrate`) as a state machine without I/O.
//!
//! The driver (`driver::source`) feeds [`SourceEvent`]s with the current time to
//! [`SourceMachine::handle`], performs the [`SourceAction`]s it takes out with
//! [`SourceMachine::poll_action`], and sends [`SourceEvent::Tick`] when
//! [`SourceMachine::poll_timeout`] passes. The machine decides everything else: the order of
//! the steps, pre-copy's end (through [`crate::policy::Policy`]), deadlines, the commit, the
//! rollback and the resolution of a migration left in doubt.
//!
//! # Sequence
//!
//! ```text
//!  source (this machine)                               agent
//!  Connect ── Hello ─────────────────────────────────▶
//!                          ◀─────────────────── Ready ── (or Refused: nothing changed)
//!  pre-copy, service running:  SendRound(i) ── pages, RoundEnd ─▶
//!                          ◀──────────────── RoundAck ──   policy: next round, throttle, stop
//!  Journal(Frozen), StartDump
//!    CRIU at pre-dump (set up, tree running): Pause the proxy (no byte in flight to the service)
//!    ProceedDump: the downtime starts, the frozen deadline runs
//!    CRIU: tree frozen ── Frozen ───────────────────▶ block inbound/outbound/ARP, add address
//!    Lock (owned: dies with this process) ∥ Redirect the proxy; once locked, ProceedDump
//!    CRIU at post-dump: images complete, tree held frozen and locked
//!  SendImages ── File*, FinalPages, pages, ImagesDone ─▶ rebuild, restore stopped (blocked)
//!                          ◀──────────────── Restored ──
//!  ═══ commit point ═══  Journal(Committing) ∥ KeepLock (outlives this process), then
//!  CommitDump: answer CRIU's post-dump; CRIU ends the frozen copy meanwhile
//!    ── Commit ─────────────────────────────────────▶ journal, lift block, announce, SIGCONT
//!                          ◀─────────────── Committed ──
//!  Resume the proxy: held bytes go to the running service at once
//!  once CRIU confirms the copy's end: RemoveAddress, then Unlock; RemoveImages, ForgetJournal
//! ```
//!
//! # States
//!
//! ```text
//!  Connecting ─▶ Handshaking ─▶ PreCopy(round) ─▶ Freezing(step) ─▶ Transferring
//!      │              │              │                 │                 │
//!      └──────────────┴──────────────┴─▶ Done(NotStarted)│                 │
//!                                                      ▼                 ▼
//!                                     RollingBack ◀────┴── AwaitingRestore
//!                                          │                  │ Restored
//!                                          ▼                  ▼
//!                            (Resolving Abort) ─▶ Done   Ending ─▶ AwaitingCommitted ─▶ Resuming ─▶ [AwaitingCopyEnd] ─▶ Finishing ─▶ Done(Committed)
//!                                                             │          │ lost / no answer           ▲
//!                                                             │          ▼                            │
//!                                                             │    Resolving(Commit) ── Committed ────┘
//!                                                             │          │ Aborted / Failed
//!                                                             └──────────┴─▶ [AwaitingCopyEnd] ─▶ RestoringLocally ─▶ Done(RestoredOnSource)
//!  Ending: until CRIU has the commit answer. [AwaitingCopyEnd]: only while CRIU has not yet
//!  confirmed that the frozen copy is gone (the cleanup and a local restore need it gone).
//!  recover(): Recovering ─ CheckSourceCopy ─▶ alive: Resolving(Abort) ─▶ Done(RolledBack)
//!                                          └▶ gone:  Resolving(Commit) ─▶ as above
//! ```
//!
//! Before the commit point every failure rolls back: CRIU thaws the tree (which never stopped
//! existing), the agent is told to undo (the QUIC close carries the reason), the proxy is pointed
//! back and resumed once the tree runs. From the commit point on there is no rollback to the
//! frozen copy: the outcome is the destination's copy, or (if the destination cannot run it)
//! a restore here from the image set. See [`crate::machine`] for the invariants.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{ConnectionEnd, Failure, PortError};
use crate::policy::{self, Decision as PolicyDecision, Policy, RoundStats};
use crate::protocol::stats::{CriuDumpStats, ImagesSent, RoundReport, RoundScan};
use crate::protocol::{
    Decision, ErrorCode, FromAgent, MigrationId, Phase, Resolution, ServiceAddr, Side, ToAgent,
    PAGE, PROTOCOL,
};
use crate::report::{ImageSizes, Outcome, ProxyReport, Report, ReportError};

/// How the source machine is set up.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The migration's id.
    pub id: MigrationId,
    /// The service address.
    pub service_addr: ServiceAddr,
    /// The service's root pid here (for the report).
    pub source_pid: i32,
    /// The agent, as the user named it (for the report).
    pub destination: String,
    /// Pre-copy policy; `None` for stop-and-copy.
    pub precopy: Option<policy::Config>,
    /// The proxy in front of the service, if any.
    pub gate: Option<GateConfig>,
    /// The longest the service may stay frozen before the commit point; past it, the migration
    /// rolls back.
    pub max_frozen: Duration,
    /// Other deadlines.
    pub timeouts: Timeouts,
    /// The container it moves, if it moves one (sent to the agent in `Hello`).
    pub container: Option<crate::protocol::ContainerSpec>,
}

/// The proxy in front of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GateConfig {
    /// Whether the proxy is redirected to a new backend during the dump.
    pub redirect: bool,
}

/// Kept between `--max-frozen` and the proxy's maximum hold: the commit's round trip and the
/// resume come after the frozen phase. The default of [`Timeouts::hold_margin`].
pub const HOLD_MARGIN: Duration = Duration::from_millis(500);

/// Deadlines of the source's side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timeouts {
    /// From connecting to the agent's answer to `Hello`.
    pub handshake: Duration,
    /// From a round's last page to its acknowledgement.
    pub round_ack: Duration,
    /// From `Commit` to `Committed` before the migration counts as in doubt.
    pub commit: Duration,
    /// How long an in-doubt migration is retried before giving up (the journal stays).
    pub resolve: Duration,
    /// Pause between attempts to reach the agent.
    pub resolve_retry: Duration,
    /// How long a rolled-back migration tries to tell an agent that may hold a restored copy.
    pub inform: Duration,
    /// Kept between the frozen deadline and the proxy's hold deadline, for the commit and the
    /// resume.
    pub hold_margin: Duration,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            handshake: Duration::from_secs(10),
            round_ack: Duration::from_secs(120),
            commit: Duration::from_secs(5),
            resolve: Duration::from_secs(60),
            resolve_retry: Duration::from_millis(500),
            inform: Duration::from_secs(10),
            hold_margin: HOLD_MARGIN,
        }
    }
}

/// What the source has recorded durably about a migration (the driver adds paths and
/// addresses). Written before anything the record must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SourcePhase {
    /// Pre-copy throttles the service's CPU (auto-converge): a restart must release it.
    Throttled,
    /// The tree may be frozen (the dump was requested): the outcome follows from whether the
    /// source copy still exists.
    Frozen,
    /// The commit point is being passed: CRIU is told to end the source copy.
    Committing,
    /// Rolled back, but the agent may still hold a restored copy it must be told to undo.
    RolledBack,
}

/// The proxy's answer to a pause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PauseInfo {
    /// Time until every flow was quiet, ms.
    pub quiesce_ms: f64,
    /// TCP connections held.
    pub tcp_flows: u64,
    /// UDP flows held.
    pub udp_flows: u64,
    /// How long the proxy will still hold before resuming by itself.
    pub hold_left: Duration,
}

/// The proxy's answer to a resume.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResumeInfo {
    /// Time the flows were held, ms.
    pub held_ms: f64,
    /// Datagrams released.
    pub released_datagrams: u64,
    /// The pause had already ended by itself (maximum hold); the redirect was applied again.
    pub expired: bool,
}

/// What CRIU reported as the dump ended (the source copy gone).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DumpEnd {
    /// CRIU's statistics.
    pub stats: Option<CriuDumpStats>,
}

/// CRIU's progress through the dump.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum DumpEvent {
    /// CRIU is set up and waits before freezing the tree (`pre-dump`).
    PreFreeze,
    /// The tree is frozen; CRIU waits before it dumps anything (its sockets above all).
    Frozen,
    /// The images are complete; the tree is held frozen (`post-dump`).
    Held,
    /// CRIU failed before the hold and rolled back by itself: the tree runs.
    Failed(PortError),
    /// After [`SourceAction::CommitDump`]: CRIU has the answer and ends the copy; it can no
    /// longer come back (its connections stay locked whatever CRIU does next).
    CommitAnswered,
    /// After [`SourceAction::CommitDump`], later: the source copy is gone. An error means it
    /// may not be (it is then still locked).
    Ended(Result<DumpEnd, PortError>),
    /// After [`SourceAction::RollbackDump`]: CRIU unlocked and thawed the tree.
    RolledBack(Result<(), PortError>),
}

/// The proxy's answers.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum GateEvent {
    /// After [`SourceAction::Pause`].
    Paused(Result<PauseInfo, PortError>),
    /// After [`SourceAction::Redirect`].
    Redirected(Result<(), PortError>),
    /// After [`SourceAction::Resume`].
    Resumed(Result<ResumeInfo, PortError>),
    /// After [`SourceAction::UndoGate`]: pointed back at the source and resumed.
    Undone(Result<(), PortError>),
}

/// Simple steps whose completion is reported with [`SourceEvent::Completed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// [`SourceAction::Journal`] or [`SourceAction::ForgetJournal`].
    Journal,
    /// [`SourceAction::Throttle`].
    Throttle,
    /// [`SourceAction::ReleaseThrottle`].
    ReleaseThrottle,
    /// [`SourceAction::Announce`].
    Announce,
    /// [`SourceAction::RemoveAddress`].
    RemoveAddress,
    /// [`SourceAction::Lock`].
    Lock,
    /// [`SourceAction::KeepLock`].
    KeepLock,
    /// [`SourceAction::Unlock`].
    Unlock,
    /// [`SourceAction::RemoveImages`].
    RemoveImages,
}

/// What happens to the source machine.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SourceEvent {
    /// The connection (and its stream) to the agent is up, after [`SourceAction::Connect`].
    Connected,
    /// A message from the agent.
    Message(FromAgent),
    /// The connection ended (or could not be made).
    ConnectionLost(ConnectionEnd),
    /// After [`SourceAction::SendRound`]: the round's pages are all on the stream.
    RoundScanned(Result<RoundScan, PortError>),
    /// CRIU's progress.
    Dump(DumpEvent),
    /// The proxy's answers.
    Gate(GateEvent),
    /// After [`SourceAction::SendImages`]: files and final difference are on the stream.
    ImagesSent(Result<ImagesSent, PortError>),
    /// After [`SourceAction::CheckSourceCopy`]: whether the source copy exists (once no CRIU
    /// of this migration runs any more).
    SourceCopy(Result<bool, PortError>),
    /// After [`SourceAction::KillSourceCopy`].
    SourceKilled(Result<(), PortError>),
    /// After [`SourceAction::RestoreLocally`]: the restored root's pid here.
    RestoredLocally(Result<i32, PortError>),
    /// A simple step finished.
    Completed(Step, Result<(), PortError>),
    /// The user asked to stop.
    Cancel,
    /// [`SourceMachine::poll_timeout`] passed.
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum SourceAction {
    /// Open a new connection and stream to the agent; answer with [`SourceEvent::Connected`] or
    /// [`SourceEvent::ConnectionLost`].
    Connect,
    /// Send a control message on the stream.
    Send(ToAgent),
    /// Close the connection without a decision (the agent keeps a restored copy in doubt).
    Close,
    /// Close the connection at once, telling the agent to undo its side and why (not queued
    /// behind data).
    Abort {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// Scan the tree and send the pages of pre-copy round `round` (layouts and page batches;
    /// not `RoundEnd`); answer with [`SourceEvent::RoundScanned`].
    SendRound {
        /// The round.
        round: u32,
    },
    /// Cut the service's CPU by `percent`.
    Throttle {
        /// Percent of its CPU time taken away.
        percent: u8,
    },
    /// Give the service its CPU back (before the final dump).
    ReleaseThrottle,
    /// Start CRIU's dump; report [`DumpEvent::PreFreeze`] (or a failure).
    StartDump,
    /// Let CRIU go on from the point it waits at; report the next point.
    ProceedDump,
    /// Answer CRIU's post-dump with success: it ends the frozen tree. Report
    /// [`DumpEvent::CommitAnswered`] once the answer is written, then [`DumpEvent::Ended`] once
    /// the tree is gone.
    CommitDump,
    /// Make CRIU abandon the dump (answer failure, or close its socket): it unlocks and thaws
    /// the tree. Report [`DumpEvent::RolledBack`].
    RollbackDump,
    /// Pause the proxy's flows of the service (and wait for the service's UDP queues to drain).
    Pause,
    /// Point the proxy at the new location.
    Redirect,
    /// Resume the proxy (re-applying the redirect if its pause ended by itself).
    Resume,
    /// Point the proxy back at the source if redirected, and resume it if paused.
    UndoGate,
    /// Send the image files, `FinalPages` and the final difference; answer with
    /// [`SourceEvent::ImagesSent`].
    SendImages,
    /// Announce the service address from this host (gratuitous ARP).
    Announce,
    /// Remove the service address from this host.
    RemoveAddress,
    /// Lock the service address here (every packet to or from it dropped) under table `table`,
    /// owned by this process: the kernel lifts it if `tether migrate` dies, when CRIU thaws the
    /// tree by itself. Taken before CRIU dumps the tree's sockets.
    Lock {
        /// The table.
        table: String,
    },
    /// The same lock under table `table`, not owned: it outlives this process. Taken at the
    /// commit point, before CRIU ends the copy, so that packets reaching this host for the
    /// address find no socket and no reset until the address is gone, even if
    /// `tether migrate` dies meanwhile.
    KeepLock {
        /// The table.
        table: String,
    },
    /// Lift the locks: each table with whether it is owned (an owned one only this process may
    /// lift; one of a process that died is gone already). Absent tables are fine.
    Unlock {
        /// The tables.
        tables: Vec<(String, bool)>,
    },
    /// Remove the image set (memory images are secret).
    RemoveImages,
    /// Find out whether the source copy exists (after waiting for this migration's CRIU to end).
    CheckSourceCopy,
    /// Kill the source copy outright (CRIU failed to end it after the commit answer); report
    /// [`SourceEvent::SourceKilled`].
    KillSourceCopy,
    /// Restore the service on this host from the image set.
    RestoreLocally,
    /// Record the phase durably; answer with [`SourceEvent::Completed`]`(Step::Journal, ..)`.
    Journal {
        /// The phase.
        phase: SourcePhase,
        /// The table of the kept lock ([`SourceAction::KeepLock`]) this migration may leave, from
        /// the freeze on (a recovery lifts it, or lifts it once the address is gone).
        lock_table: Option<String>,
    },
    /// Remove the record; answer with [`SourceEvent::Completed`]`(Step::Journal, ..)`.
    ForgetJournal,
}

/// How a migration ended on the source.
#[derive(Debug, Clone)]
pub struct SourceResult {
    /// The outcome.
    pub outcome: Outcome,
    /// Why it did not commit, if it did not.
    pub failure: Option<Failure>,
    /// The report.
    pub report: Report,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FreezeStep {
    /// Waiting for CRIU's pre-dump point.
    Starting,
    /// Waiting for the proxy's pause.
    Pausing,
    /// CRIU freezes the tree.
    Freezing,
    /// The tree is frozen; the address is being locked before CRIU dumps its sockets. The
    /// redirect runs beside it.
    Locking { redirected: bool },
    /// CRIU dumps; the redirect runs beside it.
    Dumping { held: bool, redirected: bool },
}

/// One of the source's locks of the service address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum LockState {
    /// Not taken (or lifted).
    #[default]
    Off,
    /// Asked for, not confirmed: it may be in place.
    Asked,
    /// In place (or it may be: a failed lock is lifted like a taken one).
    On,
}

/// The source's locks: CRIU dumps with no network lock of its own (its per-connection nftables
/// lock aborts with more than about a thousand descriptors open: libnftables' `select()` on a
/// descriptor above `FD_SETSIZE`), so tether locks the whole service address in one transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Locks {
    /// The owned lock from the freeze on ([`SourceAction::Lock`]).
    frozen: LockState,
    /// The kept lock from the commit point on ([`SourceAction::KeepLock`]).
    kept: LockState,
}

impl Locks {
    fn asked(&self) -> bool {
        self.frozen == LockState::Asked || self.kept == LockState::Asked
    }
}

#[derive(Debug, Clone)]
struct Round {
    number: u32,
    started: Instant,
    scan: Option<RoundScan>,
    /// The pre-copy policy, which decides what follows the round.
    policy: Policy,
}

/// What waits for the end of the source copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterCopyEnd {
    /// Removing the address and the locks (which keep the copy unreachable).
    Cleanup,
    /// Restoring the service here (its pids must be free).
    RestoreLocally,
}

/// Whether the source copy is known to be gone, after the commit answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyEnd {
    /// CRIU was answered; it has not confirmed the end yet.
    Pending,
    /// CRIU failed after the answer; the copy is being killed outright.
    Killing,
    /// Gone.
    Confirmed,
    /// It could not be ended: it stays, locked and unreachable, and so does its kept lock.
    Lingering,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResolveWhy {
    /// `Commit` went unanswered.
    InDoubt,
    /// A restarted `tether migrate` resolves a journal.
    Recovery,
    /// After a rollback, the agent may hold a restored copy to undo.
    Inform,
}

#[derive(Debug, Clone)]
struct Resolving {
    decision: Decision,
    why: ResolveWhy,
    until: Instant,
    /// When to try connecting again, while not connected.
    retry_at: Option<Instant>,
    attempts: u32,
}

#[derive(Debug, Clone)]
struct RollingBack {
    failure: Failure,
    /// CRIU has not confirmed the thaw yet.
    awaiting_dump: bool,
    /// The locks are being lifted (after the thaw, before the proxy's undo).
    awaiting_unlock: bool,
    /// The proxy undo was asked and not answered.
    awaiting_gate: bool,
}

#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
enum State {
    Connecting,
    Handshaking,
    PreCopy(Round),
    Freezing(FreezeStep),
    Transferring,
    AwaitingRestore,
    Ending,
    AwaitingCommitted,
    Resolving(Resolving),
    Resuming {
        attempt: u32,
    },
    /// Waiting for the last steps' completions before ending with `outcome`.
    Finishing {
        pending: u32,
        outcome: Outcome,
    },
    RestoringLocally,
    /// Waiting for CRIU to confirm the end of the source copy before `then`.
    AwaitingCopyEnd {
        then: AfterCopyEnd,
    },
    RollingBack(RollingBack),
    /// A recovery found the source copy running: its locks go before the agent is told.
    RecoveringUnlock,
    Recovering,
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Handshaking => "handshaking",
            State::PreCopy(_) => "pre-copy",
            State::Freezing(_) => "freezing",
            State::Transferring => "transferring",
            State::AwaitingRestore => "awaiting-restore",
            State::Ending => "ending",
            State::AwaitingCommitted => "awaiting-committed",
            State::Resolving(_) => "resolving",
            State::Resuming { .. } => "resuming",
            State::Finishing { .. } => "finishing",
            State::RestoringLocally => "restoring-locally",
            State::AwaitingCopyEnd { .. } => "awaiting-copy-end",
            State::RollingBack(_) => "rolling-back",
            State::Recovering => "recovering",
            State::RecoveringUnlock => "recovering-unlock",
            State::Done => "done",
        }
    }
}

/// The source side of one migration. See the [module documentation](self).
#[derive(Debug)]
pub struct SourceMachine {
    cfg: SourceConfig,
    state: State,
    actions: VecDeque<SourceAction>,
    deadline: Option<Instant>,
    report: Report,
    result: Option<SourceResult>,
    started: Instant,
    /// The connection is up (as far as the machine knows).
    connected: bool,
    precopy_started: Option<Instant>,
    prev_round_start: Option<Instant>,
    /// (bytes, bandwidth) of the round that moved the most: small rounds are paced by the scan.
    link: (u64, f64),
    throttle: Option<u8>,
    /// CRIU's dump was requested and has not ended, failed or rolled back.
    dump_active: bool,
    dump_requested: Option<Instant>,
    /// When CRIU was let go on to freeze the tree: the downtime starts.
    stopping: Option<Instant>,
    /// How long the service may stay frozen (`max_frozen`, or less if the proxy's hold is
    /// shorter), for the message of a frozen deadline that passed.
    frozen_limit: Duration,
    held_at: Option<Instant>,
    restored_at: Option<Instant>,
    committed_at: Option<Instant>,
    pause_asked: Option<Instant>,
    paused: bool,
    redirected: bool,
    /// `Frozen` was sent: the agent may have taken the address.
    told_frozen: bool,
    /// `ImagesDone` was sent: the agent may hold a restored copy.
    images_done: bool,
    /// The kept lock's table (journaled from the freeze on).
    lock_table: Option<String>,
    /// The locks in place.
    locks: Locks,
    /// `Journal(Committing)` is written (the commit point waits for it and the kept lock).
    commit_journaled: bool,
    /// The journal holds a record of this migration.
    journaled: bool,
    /// Once the source copy was ended (CRIU answered post-dump with success: the commit point
    /// is passed), whether its end is confirmed; `None` before.
    copy_end: Option<CopyEnd>,
    /// Failure that led past the commit point to a local restore or to doubt.
    late_failure: Option<Failure>,
    /// The pre-copy policy until pre-copy starts (its rounds carry it then); `None` for
    /// stop-and-copy.
    policy: Option<Policy>,
}

impl SourceMachine {
    /// A machine for a new migration; its first action is [`SourceAction::Connect`].
    ///
    /// Fails if the pre-copy policy's settings are invalid.
    pub fn new(cfg: SourceConfig, now: Instant) -> Result<SourceMachine, policy::PolicyError> {
        let policy = cfg.precopy.clone().map(Policy::new).transpose()?;
        let mut m = SourceMachine::blank(cfg, now);
        m.policy = policy;
        m.state = State::Connecting;
        m.push(SourceAction::Connect);
        Ok(m)
    }

    /// A machine resolving a migration an earlier `tether migrate` left unfinished, from its
    /// journal: `phase` and CRIU's `lock_table` as recorded. Its first action is
    /// [`SourceAction::CheckSourceCopy`].
    ///
    /// Whatever the recorded phase, the outcome follows from whether the source copy still
    /// exists once this migration's CRIU has ended: CRIU thaws it if `tether migrate` died
    /// before the commit point and ends it after. The phase only says how far it got.
    pub fn recover(
        cfg: SourceConfig,
        phase: SourcePhase,
        lock_table: Option<String>,
        now: Instant,
    ) -> SourceMachine {
        let mut m = SourceMachine::blank(cfg, now);
        info!(?phase, "resolving a migration left unfinished");
        m.report.recovered = true;
        m.lock_table = lock_table;
        m.journaled = true;
        m.told_frozen = true;
        m.images_done = true;
        m.paused = m.cfg.gate.is_some();
        m.redirected = m.cfg.gate.is_some_and(|g| g.redirect);
        // A throttle left by auto-converge is released whatever happened.
        if phase == SourcePhase::Throttled {
            // Killed during pre-copy: the service never stopped. Only the agent's copy of the
            // pages may remain, which it drops when the connection is gone.
            m.state = m.finish_after(
                now,
                Outcome::NotStarted,
                vec![SourceAction::ReleaseThrottle, SourceAction::ForgetJournal],
            );
            return m;
        }
        m.push(SourceAction::ReleaseThrottle);
        m.push(SourceAction::CheckSourceCopy);
        m.state = State::Recovering;
        m
    }

    /// Records the model's prediction made before the migration, for the report (which scores
    /// it once the migration commits).
    pub fn set_prediction(&mut self, plan: crate::plan::Plan) {
        self.report.prediction = Some(plan);
    }

    /// Records the tree's socket count, for the report.
    pub fn set_sockets(&mut self, sockets: u64) {
        self.report.sockets = sockets;
    }

    fn blank(cfg: SourceConfig, now: Instant) -> SourceMachine {
        let report = Report::new(
            cfg.id.as_str(),
            cfg.source_pid,
            cfg.destination.clone(),
            cfg.service_addr.to_string(),
        );
        SourceMachine {
            state: State::Done,
            actions: VecDeque::new(),
            deadline: None,
            report,
            result: None,
            started: now,
            connected: false,
            precopy_started: None,
            prev_round_start: None,
            link: (0, 0.0),
            throttle: None,
            dump_active: false,
            dump_requested: None,
            stopping: None,
            frozen_limit: cfg.max_frozen,
            held_at: None,
            restored_at: None,
            committed_at: None,
            pause_asked: None,
            paused: false,
            redirected: false,
            told_frozen: false,
            images_done: false,
            lock_table: None,
            locks: Locks::default(),
            commit_journaled: false,
            journaled: false,
            copy_end: None,
            late_failure: None,
            policy: None,
            cfg,
        }
    }

    /// The next action to perform, if any.
    pub fn poll_action(&mut self) -> Option<SourceAction> {
        self.actions.pop_front()
    }

    /// When the machine needs a [`SourceEvent::Tick`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// The outcome, once the machine is done.
    pub fn result(&self) -> Option<&SourceResult> {
        self.result.as_ref()
    }

    /// Whether the machine is done (no more actions will come).
    pub fn is_done(&self) -> bool {
        self.result.is_some()
    }

    /// The current state's name, for logs and tests.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// Whether memory is being transferred (a pre-copy round, or the frozen transfer until the
    /// restore): the time progress lines are for.
    pub fn transferring(&self) -> bool {
        matches!(
            self.state,
            State::PreCopy(_) | State::Transferring | State::AwaitingRestore
        )
    }

    /// Whether the commit point has been passed (the source copy was told to end).
    pub fn past_commit_point(&self) -> bool {
        self.copy_end.is_some()
    }

    /// The report so far.
    pub fn report(&self) -> &Report {
        &self.report
    }

    fn push(&mut self, a: SourceAction) {
        self.actions.push_back(a);
    }

    fn send(&mut self, m: ToAgent) {
        self.push(SourceAction::Send(m));
    }

    /// Handles one event at time `now`.
    pub fn handle(&mut self, now: Instant, event: SourceEvent) {
        if self.result.is_some() {
            return;
        }
        if let SourceEvent::ConnectionLost(_) = &event {
            self.connected = false;
        }
        if let SourceEvent::Tick = &event {
            if self.deadline.is_none_or(|d| now < d) {
                return;
            }
            self.deadline = None;
        }
        let event = match event {
            // After the commit was sent, CRIU's confirmation of the end of the source copy comes
            // whenever it comes; only what needs the copy gone waits for it.
            SourceEvent::Dump(DumpEvent::Ended(r))
                if self.copy_end.is_some() && !matches!(self.state, State::Ending) =>
            {
                return self.copy_ended(now, r.map(Some));
            }
            SourceEvent::SourceKilled(r)
                if self.copy_end.is_some() && !matches!(self.state, State::Ending) =>
            {
                return self.copy_ended(now, r.map(|()| None));
            }
            e => e,
        };
        let state = std::mem::replace(&mut self.state, State::Done);
        self.state = self.step(state, now, event);
    }

    /// CRIU confirmed (`Ok`) or failed to confirm (`Err`) the end of the source copy after the
    /// commit was sent; a confirmation from a kill carries no statistics.
    fn copy_ended(&mut self, now: Instant, r: Result<Option<DumpEnd>, PortError>) {
        match r {
            Ok(end) => self.copy_confirmed(end),
            Err(e) if self.copy_end == Some(CopyEnd::Pending) => return self.kill_copy(&e),
            Err(e) => {
                self.warn(format!(
                    "the source copy could not be ended ({e}); it stays frozen behind the lock \
                     table {}, which is kept: no client reaches it. Kill pid {} by hand, then \
                     delete the table",
                    self.lock_table.as_deref().unwrap_or("?"),
                    self.cfg.source_pid
                ));
                self.copy_end = Some(CopyEnd::Lingering);
            }
        }
        if let State::AwaitingCopyEnd { then } = self.state {
            self.state = match then {
                AfterCopyEnd::Cleanup => self.cleanup_after_commit(now),
                AfterCopyEnd::RestoreLocally => self.restore_locally(),
            };
        }
    }

    /// The source copy is gone: CRIU says so (with its statistics), or a kill did.
    fn copy_confirmed(&mut self, end: Option<DumpEnd>) {
        if let Some(end) = end {
            self.dump_stats(end);
        }
        self.copy_end = Some(CopyEnd::Confirmed);
    }

    /// CRIU failed to confirm the end of the source copy (`e`): kill it outright.
    fn kill_copy(&mut self, e: &PortError) {
        self.warn(format!(
            "CRIU did not confirm the end of the source copy ({e}); killing it"
        ));
        self.copy_end = Some(CopyEnd::Killing);
        self.push(SourceAction::KillSourceCopy);
    }

    fn dump_stats(&mut self, end: DumpEnd) {
        if let Some(s) = &end.stats {
            self.report.timings.freeze_ms = f64::from(s.freezing_time_us) / 1e3;
        }
        self.report.criu_dump = end.stats;
    }

    fn step(&mut self, state: State, now: Instant, event: SourceEvent) -> State {
        use SourceEvent as E;
        match (state, event) {
            // Events that any state treats alike.
            (s, E::Cancel) if self.copy_end.is_some() => {
                warn!("cancel ignored: the commit point has been passed");
                s
            }

            // ---- connecting and handshake ----
            (State::Connecting, E::Connected) => {
                self.connected = true;
                self.send(ToAgent::Hello {
                    protocol: PROTOCOL,
                    migration_id: self.cfg.id.clone(),
                    service_addr: self.cfg.service_addr,
                    container: self.cfg.container.clone(),
                });
                self.deadline = Some(now + self.cfg.timeouts.handshake);
                State::Handshaking
            }
            (State::Connecting, E::ConnectionLost(end)) => self.not_started(
                now,
                Failure::new(
                    Side::Network,
                    Phase::Connect,
                    ErrorCode::Transport,
                    end.reason,
                ),
            ),
            (State::Connecting | State::Handshaking, E::Cancel) => {
                self.abort_connection(ErrorCode::Cancelled, "cancelled by the user");
                self.not_started(
                    now,
                    Failure::new(
                        Side::Source,
                        Phase::Handshake,
                        ErrorCode::Cancelled,
                        "cancelled by the user",
                    ),
                )
            }
            (State::Handshaking, E::Message(FromAgent::Ready { interface })) => {
                info!(%interface, "agent ready");
                self.deadline = None;
                self.report.timings.handshake_ms = ms(now - self.started);
                match self.policy.take() {
                    Some(policy) => {
                        self.precopy_started = Some(now);
                        self.start_round(policy, 0, now)
                    }
                    None => self.start_freeze(),
                }
            }
            (State::Handshaking, E::Message(FromAgent::Refused { code, reason })) => self
                .not_started(
                    now,
                    Failure::new(
                        Side::Destination,
                        Phase::Handshake,
                        code,
                        format!("agent refused: {reason}"),
                    ),
                ),
            (State::Handshaking, E::Message(m)) => {
                self.abort_connection(ErrorCode::Protocol, "unexpected answer to hello");
                self.not_started(
                    now,
                    Failure::new(
                        Side::Destination,
                        Phase::Handshake,
                        ErrorCode::Protocol,
                        format!("unexpected {} (expected ready or refused)", m.name()),
                    ),
                )
            }
            (State::Handshaking, E::ConnectionLost(end)) => self.not_started(
                now,
                Failure::new(
                    Side::Network,
                    Phase::Handshake,
                    ErrorCode::Transport,
                    end.reason,
                ),
            ),
            (State::Handshaking, E::Tick) => {
                self.abort_connection(ErrorCode::Timeout, "no answer to hello");
                self.not_started(
                    now,
                    Failure::new(
                        Side::Destination,
                        Phase::Handshake,
                        ErrorCode::Timeout,
                        format!(
                            "no answer within {} s",
                            self.cfg.timeouts.handshake.as_secs_f64()
                        ),
                    ),
                )
            }

            // ---- pre-copy: the service runs; a failure changes nothing ----
            (State::PreCopy(mut r), E::RoundScanned(Ok(scan))) if r.scan.is_none() => {
                r.scan = Some(scan);
                self.send(ToAgent::RoundEnd { round: r.number });
                self.deadline = Some(now + self.cfg.timeouts.round_ack);
                State::PreCopy(r)
            }
            (State::PreCopy(r), E::RoundScanned(Err(e))) => self.precopy_failed(
                now,
                Failure::port(Side::Source, Phase::PreCopy, e)
                    .context(format!("round {}", r.number)),
            ),
            (
                State::PreCopy(Round {
                    number,
                    started,
                    scan: Some(scan),
                    policy,
                }),
                E::Message(FromAgent::RoundAck { round, .. }),
            ) if round == number => {
                self.deadline = None;
                self.round_done(number, started, scan, policy, now)
            }
            (s @ State::PreCopy(_), E::Completed(Step::Throttle, Err(e))) => {
                self.throttle = None;
                self.warn(format!("cannot throttle the service: {e}"));
                s
            }
            (State::PreCopy(_), E::Message(m)) => {
                self.precopy_failed(now, self.unexpected(Phase::PreCopy, &m, &["round_ack"]))
            }
            (State::PreCopy(r), E::ConnectionLost(end)) => self.precopy_failed(
                now,
                Failure::new(
                    Side::Network,
                    Phase::PreCopy,
                    ErrorCode::Transport,
                    format!("round {}: {}", r.number, end.reason),
                ),
            ),
            (State::PreCopy(r), E::Tick) => self.precopy_failed(
                now,
                Failure::new(
                    Side::Destination,
                    Phase::PreCopy,
                    ErrorCode::Timeout,
                    format!(
                        "round {} not acknowledged within {} s",
                        r.number,
                        self.cfg.timeouts.round_ack.as_secs_f64()
                    ),
                ),
            ),
            (State::PreCopy(_), E::Cancel) => self.precopy_failed(
                now,
                Failure::new(
                    Side::Source,
                    Phase::PreCopy,
                    ErrorCode::Cancelled,
                    "cancelled by the user",
                ),
            ),

            // ---- freezing: the journal first, then CRIU, the proxy's pause, the freeze ----
            (State::Freezing(FreezeStep::Starting), E::Completed(Step::Journal, Ok(())))
                if !self.dump_active =>
            {
                self.journaled = true;
                self.dump_active = true;
                self.dump_requested = Some(now);
                self.push(SourceAction::StartDump);
                State::Freezing(FreezeStep::Starting)
            }
            (State::Freezing(FreezeStep::Starting), E::Completed(Step::Journal, Err(e)))
                if !self.dump_active =>
            {
                // Nothing is frozen yet; without a journal a crash could not be recovered.
                self.abort_connection(ErrorCode::Storage, "the source cannot write its journal");
                self.not_started(
                    now,
                    Failure::port(Side::Source, Phase::Dump, e)
                        .context("cannot record the migration before freezing"),
                )
            }
            (State::Freezing(FreezeStep::Starting), E::Dump(DumpEvent::PreFreeze)) => {
                if self.cfg.gate.is_some() {
                    self.pause_asked = Some(now);
                    // Counted as paused from the request on: an undo resumes it (a resume of a
                    // proxy that is not paused is harmless).
                    self.paused = true;
                    self.push(SourceAction::Pause);
                    State::Freezing(FreezeStep::Pausing)
                } else {
                    self.let_freeze(now, None);
                    State::Freezing(FreezeStep::Freezing)
                }
            }
            (State::Freezing(FreezeStep::Pausing), E::Gate(GateEvent::Paused(Ok(p)))) => {
                info!(
                    quiesce_ms = p.quiesce_ms,
                    tcp = p.tcp_flows,
                    udp = p.udp_flows,
                    "proxy paused"
                );
                self.report.proxy = Some(ProxyReport {
                    quiesce_ms: p.quiesce_ms,
                    tcp_flows: p.tcp_flows,
                    udp_flows: p.udp_flows,
                    hold_left_ms: p.hold_left.as_millis() as u64,
                    ..Default::default()
                });
                self.let_freeze(now, Some(p.hold_left));
                State::Freezing(FreezeStep::Freezing)
            }
            (State::Freezing(FreezeStep::Pausing), E::Gate(GateEvent::Paused(Err(e)))) => {
                // The proxy undoes a failed pause itself; the tree was never frozen.
                self.paused = false;
                self.rollback(
                    now,
                    Failure::port(Side::Proxy, Phase::Pause, e)
                        .context("the proxy could not pause"),
                )
            }
            (State::Freezing(FreezeStep::Freezing), E::Dump(DumpEvent::Frozen)) => {
                self.told_frozen = true;
                // The lock first: CRIU dumps the sockets (and puts them in repair mode) only
                // once it is in place.
                self.locks.frozen = LockState::Asked;
                self.push(SourceAction::Lock {
                    table: self.frozen_lock_table(),
                });
                self.send(ToAgent::Frozen);
                let redirected = !self.cfg.gate.is_some_and(|g| g.redirect);
                if !redirected {
                    // Counted from the request on: an undo points the proxy back.
                    self.redirected = true;
                    self.push(SourceAction::Redirect);
                }
                State::Freezing(FreezeStep::Locking { redirected })
            }
            (
                State::Freezing(FreezeStep::Locking { redirected }),
                E::Completed(Step::Lock, result),
            ) => {
                // A failed transaction applied nothing; lifted all the same on the way back.
                self.locks.frozen = LockState::On;
                match result {
                    Ok(()) => {
                        self.push(SourceAction::ProceedDump);
                        State::Freezing(FreezeStep::Dumping {
                            held: false,
                            redirected,
                        })
                    }
                    Err(e) => self.rollback(
                        now,
                        Failure::port(Side::Source, Phase::Dump, e)
                            .context("cannot lock the service address before the dump"),
                    ),
                }
            }
            (
                State::Freezing(FreezeStep::Locking { .. }),
                E::Gate(GateEvent::Redirected(Ok(()))),
            ) => State::Freezing(FreezeStep::Locking { redirected: true }),
            (State::Freezing(FreezeStep::Dumping { redirected, .. }), E::Dump(DumpEvent::Held)) => {
                self.held_at = Some(now);
                if let Some(r) = self.dump_requested {
                    self.report.timings.dump_ms = ms(now - r);
                }
                self.maybe_transfer(true, redirected)
            }
            (
                State::Freezing(FreezeStep::Dumping { held, .. }),
                E::Gate(GateEvent::Redirected(Ok(()))),
            ) => self.maybe_transfer(held, true),
            (State::Freezing(_), E::Gate(GateEvent::Redirected(Err(e)))) => {
                // It may have half-happened: the undo points the proxy back anyway.
                self.rollback(
                    now,
                    Failure::port(Side::Proxy, Phase::Redirect, e)
                        .context("the proxy could not redirect"),
                )
            }
            (State::Freezing(_), E::Dump(DumpEvent::Failed(e))) => {
                // CRIU has rolled back by itself: the tree runs.
                self.dump_active = false;
                self.rollback(now, Failure::port(Side::Source, Phase::Dump, e))
            }

            // ---- frozen transfer ----
            (State::Transferring, E::ImagesSent(Ok(sent))) => {
                self.images_done = true;
                self.send(ToAgent::ImagesDone {
                    files: sent.files,
                    bytes: sent.file_bytes,
                    final_pages: sent.pages.pages_sent,
                });
                self.report.images = ImageSizes {
                    files: sent.files,
                    total_bytes: sent.file_bytes + sent.pages.bytes,
                    pages_bytes: sent.pages.pages_dumped * PAGE as u64,
                };
                // CRIU's local dump: the image files and every dumped page.
                self.report.memory.source_dump_bytes =
                    sent.file_bytes + self.report.images.pages_bytes;
                self.report.precopy.final_difference = Some(sent.pages);
                info!(
                    files = sent.files,
                    final_pages = sent.pages.pages_sent,
                    of = sent.pages.pages_dumped,
                    bytes = sent.file_bytes + sent.pages.bytes,
                    "image set and final difference sent"
                );
                State::AwaitingRestore
            }
            (State::Transferring, E::ImagesSent(Err(e))) => {
                let side = if e.code == ErrorCode::Transport {
                    Side::Network
                } else {
                    Side::Source
                };
                self.rollback(now, Failure::port(side, Phase::Transfer, e))
            }
            (
                State::AwaitingRestore,
                E::Message(FromAgent::Restored {
                    pid,
                    restore_ms,
                    criu_restore_ms,
                    stats,
                    held_bytes,
                }),
            ) if self.images_done => {
                // ═══ the commit point ═══
                self.restored_at = Some(now);
                self.report.memory.destination_held_bytes = held_bytes;
                self.report.destination_pid = Some(pid);
                self.report.timings.restore_ms = restore_ms;
                if let Some(h) = self.held_at {
                    self.report.timings.transfer_ms = (ms(now - h) - restore_ms).max(0.0);
                }
                self.report.criu_restore = Some(stats.unwrap_or_default());
                info!(
                    pid,
                    restore_ms, criu_restore_ms, "restored on the destination (stopped)"
                );
                self.deadline = None;
                self.push(SourceAction::Journal {
                    phase: SourcePhase::Committing,
                    lock_table: self.lock_table.clone(),
                });
                // Beside the journal: the lock that outlives us once CRIU ends the copy.
                if let Some(table) = self.lock_table.clone() {
                    self.locks.kept = LockState::Asked;
                    self.push(SourceAction::KeepLock { table });
                }
                State::Ending
            }

            // ---- failures before the commit point, while frozen: roll back ----
            (
                State::Freezing(_) | State::Transferring | State::AwaitingRestore,
                E::Message(FromAgent::Failed {
                    phase,
                    code,
                    reason,
                }),
            ) => self.rollback(now, Failure::new(Side::Destination, phase, code, reason)),
            (
                s @ (State::Freezing(_) | State::Transferring | State::AwaitingRestore),
                E::Message(m),
            ) => {
                let phase = phase_of(&s);
                self.rollback(now, self.unexpected(phase, &m, &["restored", "failed"]))
            }
            (
                s @ (State::Freezing(_) | State::Transferring | State::AwaitingRestore),
                E::ConnectionLost(end),
            ) => {
                let phase = phase_of(&s);
                let side = if end.by_peer {
                    Side::Destination
                } else {
                    Side::Network
                };
                let code = if end.by_peer {
                    ErrorCode::Aborted
                } else {
                    ErrorCode::Transport
                };
                self.rollback(now, Failure::new(side, phase, code, end.reason))
            }
            (s @ (State::Freezing(_) | State::Transferring | State::AwaitingRestore), E::Tick) => {
                let phase = phase_of(&s);
                let limit = self.frozen_limit;
                self.rollback(
                    now,
                    Failure::new(
                        Side::Source,
                        phase,
                        ErrorCode::Timeout,
                        format!(
                            "the service was frozen for {} ms without a restore on the destination \
                             (--max-frozen; the proxy's hold bounds it too)",
                            limit.as_millis()
                        ),
                    ),
                )
            }
            (
                s @ (State::Freezing(_) | State::Transferring | State::AwaitingRestore),
                E::Cancel,
            ) => {
                let phase = phase_of(&s);
                self.rollback(
                    now,
                    Failure::new(
                        Side::Source,
                        phase,
                        ErrorCode::Cancelled,
                        "cancelled by the user",
                    ),
                )
            }

            // ---- the commit point: CRIU ends the source copy ----
            (State::Ending, E::Completed(Step::Journal, result)) if self.copy_end.is_none() => {
                if let Err(e) = result {
                    self.warn(format!("cannot record the commit in the journal: {e}"));
                }
                self.commit_journaled = true;
                self.commit_dump_when_ready()
            }
            (State::Ending, E::Completed(Step::KeepLock, result)) if self.copy_end.is_none() => {
                self.locks.kept = LockState::On;
                if let Err(e) = result {
                    self.warn(format!(
                        "cannot keep the service address locked past this process ({e}): if \
                         tether migrate dies before the address is gone, late packets to it \
                         could be answered with resets"
                    ));
                }
                self.commit_dump_when_ready()
            }
            // CRIU has the answer: the copy cannot come back. The commit goes at once; CRIU's
            // end of the copy (a few ms to tens of ms) runs beside it.
            (State::Ending, E::Dump(DumpEvent::CommitAnswered)) => self.send_commit(now),
            (State::Ending, E::Dump(DumpEvent::Ended(Ok(end)))) => {
                self.copy_confirmed(Some(end));
                self.send_commit(now)
            }
            (State::Ending, E::Dump(DumpEvent::Ended(Err(e)))) => {
                // CRIU failed before it had the answer: the source copy may still exist (its
                // connections stay locked). End it ourselves before the
                // destination may run a second one.
                self.kill_copy(&e);
                State::Ending
            }
            (State::Ending, E::SourceKilled(Ok(()))) => {
                self.copy_confirmed(None);
                self.send_commit(now)
            }
            (State::Ending, E::SourceKilled(Err(e))) => {
                // The source copy may exist (frozen, locked): the destination must not run.
                self.late_failure = Some(
                    Failure::port(Side::Source, Phase::Commit, e)
                        .context("the source copy could not be ended"),
                );
                self.abort_connection(
                    ErrorCode::Checkpoint,
                    "the source could not end its copy; undo",
                );
                self.finish_failed(now)
            }
            (s @ State::Ending, E::ConnectionLost(_)) => s,
            (s @ State::Ending, E::Message(_)) => s,

            // ---- after Commit ----
            (State::AwaitingCommitted, E::Message(FromAgent::Committed { go_live_ms })) => {
                self.report.timings.go_live_ms = go_live_ms;
                info!(go_live_ms, "the destination runs the service");
                self.deadline = None;
                self.enter_committed(now)
            }
            (
                State::AwaitingCommitted,
                E::Message(FromAgent::Failed {
                    phase,
                    code,
                    reason,
                }),
            ) => {
                // The destination could not run its copy and has undone it: restore here.
                self.deadline = None;
                self.late_failure = Some(Failure::new(Side::Destination, phase, code, reason));
                self.restore_locally()
            }
            (State::AwaitingCommitted, E::ConnectionLost(end)) => self.in_doubt(
                now,
                &format!("connection lost after commit: {}", end.reason),
            ),
            (State::AwaitingCommitted, E::Tick) => {
                // Not an abort: the source copy is gone, the destination must keep its own.
                self.close_connection();
                self.in_doubt(now, "no answer to commit in time")
            }
            (s @ State::AwaitingCommitted, E::Message(m)) => {
                warn!(
                    "ignoring {} while waiting for the commit confirmation",
                    m.name()
                );
                s
            }

            // ---- resolving: in doubt, recovering, or telling the agent of a rollback ----
            (State::Recovering, E::SourceCopy(Ok(alive))) => {
                let decision = if alive {
                    info!("the source copy runs: the migration was not committed");
                    if self.lock_table.is_some() {
                        // A kept lock taken just before the commit point, whose answer never
                        // reached CRIU: it must not cut the running copy off.
                        let tables = self.lock_tables();
                        self.push(SourceAction::Unlock { tables });
                        return State::RecoveringUnlock;
                    }
                    Decision::Abort
                } else {
                    info!("the source copy is gone: the migration passed its commit point");
                    self.copy_end = Some(CopyEnd::Confirmed);
                    Decision::Commit
                };
                self.resolve(now, decision, ResolveWhy::Recovery)
            }
            (State::RecoveringUnlock, E::Completed(Step::Unlock, result)) => {
                if let Err(e) = result {
                    self.warn(format!("cannot lift the lock of the service address: {e}"));
                }
                self.resolve(now, Decision::Abort, ResolveWhy::Recovery)
            }
            (State::Recovering, E::SourceCopy(Err(e))) => {
                self.late_failure = Some(
                    Failure::port(Side::Source, Phase::Resolve, e)
                        .context("cannot tell whether the source copy runs"),
                );
                self.finish(now, Outcome::InDoubt)
            }
            (State::Resolving(mut r), E::Connected) => {
                r.attempts += 1;
                self.connected = true;
                self.send(ToAgent::Resolve {
                    protocol: PROTOCOL,
                    migration_id: self.cfg.id.clone(),
                    decision: r.decision,
                });
                self.deadline = Some(now + self.cfg.timeouts.commit);
                State::Resolving(r)
            }
            (State::Resolving(r), E::Message(FromAgent::Resolved { resolution })) => {
                self.resolved(now, r, resolution)
            }
            (State::Resolving(r), E::Message(FromAgent::Refused { reason, .. })) => {
                warn!("the agent refused to resolve: {reason}");
                self.retry_resolve(now, r)
            }
            (State::Resolving(r), E::Message(m)) => {
                warn!("unexpected {} in answer to resolve", m.name());
                self.close_connection();
                self.retry_resolve(now, r)
            }
            (State::Resolving(r), E::ConnectionLost(end)) => {
                warn!(
                    attempt = r.attempts,
                    "cannot reach the agent to resolve: {}", end.reason
                );
                self.retry_resolve(now, r)
            }
            (State::Resolving(r), E::Tick) => {
                self.close_connection();
                self.retry_resolve(now, r)
            }
            (s @ State::Resolving(_), E::Cancel) => s,

            // ---- committed: the proxy resumes, then the source cleans up ----
            (State::Resuming { attempt }, E::Gate(GateEvent::Resumed(Err(e))))
                if attempt + 1 < RESUME_ATTEMPTS =>
            {
                warn!(attempt, "the proxy could not be resumed: {e}; trying again");
                self.deadline = Some(now + RESUME_RETRY);
                State::Resuming {
                    attempt: attempt + 1,
                }
            }
            (s @ State::Resuming { .. }, E::Tick) => {
                self.push(SourceAction::Resume);
                s
            }
            (State::Resuming { .. }, E::Gate(GateEvent::Resumed(result))) => {
                let after = self.committed_at.map_or(0.0, |c| ms(now - c));
                self.report.timings.resume_ms = after;
                match result {
                    Ok(r) => {
                        if let Some(p) = self.report.proxy.as_mut() {
                            p.held_ms = r.held_ms;
                            p.released_datagrams = r.released_datagrams;
                            p.after_downtime_ms = after;
                        }
                        if r.expired {
                            self.warn(
                                "the proxy's pause had ended by itself (maximum hold) before the \
                                 resume; its redirect was applied again",
                            );
                        }
                    }
                    Err(e) => self.warn(format!(
                        "the service runs on the destination, but the proxy could not be \
                         resumed: {e} (it resumes by itself after its maximum hold)"
                    )),
                }
                self.cleanup_after_commit(now)
            }
            (State::Finishing { pending, outcome }, E::Completed(step, result)) => {
                let address_gone = step == Step::RemoveAddress && result.is_ok();
                if let Err(e) = result {
                    self.warn(format!("{step:?}: {e}"));
                }
                if step == Step::RemoveAddress {
                    // The kept lock stays after a commit; left, it would block these
                    // very connections if the service ever comes back. It goes once the address
                    // is gone from here (in that order: a packet reaching this host with the
                    // address and no filter and no socket would get a reset), and only with the
                    // copy (a copy that could not be ended stays behind it).
                    let copy_gone = self.copy_end == Some(CopyEnd::Confirmed);
                    if let Some(table) = self.lock_table.clone().filter(|_| copy_gone) {
                        if address_gone {
                            let tables = self.lock_tables();
                            self.push(SourceAction::Unlock { tables });
                            return State::Finishing { pending, outcome };
                        }
                        self.warn(format!(
                            "the lock table {table} is kept: the address is still here"
                        ));
                    }
                }
                self.finishing(now, pending - 1, outcome)
            }
            (State::Finishing { pending, outcome }, E::Gate(GateEvent::Undone(result))) => {
                if let Err(e) = result {
                    self.warn(format!(
                        "the proxy could not be pointed back and resumed: {e}"
                    ));
                }
                self.finishing(now, pending - 1, outcome)
            }

            // ---- the destination failed after the commit point: restore here ----
            (State::RestoringLocally, E::RestoredLocally(Ok(pid))) => {
                info!(pid, "service restored on the source from its image set");
                self.report.source_pid = pid;
                // CRIU's restore has no lock of its own to lift: the restored connections go
                // live when ours go.
                let tables = self.lock_tables();
                let mut then = vec![SourceAction::Unlock { tables }, SourceAction::Announce];
                if self.paused || self.redirected {
                    then.push(SourceAction::UndoGate);
                }
                then.extend([SourceAction::RemoveImages, SourceAction::ForgetJournal]);
                self.finish_after(now, Outcome::RestoredOnSource, then)
            }
            (State::RestoringLocally, E::RestoredLocally(Err(e))) => {
                let prev = self.late_failure.take();
                let mut f = Failure::port(Side::Source, Phase::Restore, e)
                    .context("restoring the service on the source from its image set failed");
                if let Some(p) = prev {
                    f.message = format!("{}; after: {}", f.message, p.message);
                }
                self.late_failure = Some(f);
                self.finish_failed(now)
            }

            // ---- rolling back ----
            (
                State::RollingBack(mut rb),
                E::Dump(ev @ (DumpEvent::RolledBack(_) | DumpEvent::Failed(_))),
            ) => {
                rb.awaiting_dump = false;
                self.dump_active = false;
                match ev {
                    DumpEvent::RolledBack(Err(e)) => {
                        self.warn(format!("CRIU's rollback reported: {e}"))
                    }
                    // CRIU ended the dump by itself while we rolled back: the tree runs.
                    DumpEvent::Failed(e) => info!("CRIU ended the dump: {e}"),
                    _ => {}
                }
                // The tree runs again: its locks go, then the proxy may let the held bytes go to
                // it.
                self.unlock_once(&mut rb);
                self.undo_gate_once(&mut rb);
                self.rolled_back_if_done(now, rb)
            }
            (State::RollingBack(mut rb), E::Completed(step @ (Step::Lock | Step::KeepLock), _)) => {
                // A lock that completed after the rollback began: lifted like the others.
                if step == Step::Lock {
                    self.locks.frozen = LockState::On;
                } else {
                    self.locks.kept = LockState::On;
                }
                self.unlock_once(&mut rb);
                self.undo_gate_once(&mut rb);
                self.rolled_back_if_done(now, rb)
            }
            (State::RollingBack(mut rb), E::Completed(Step::Unlock, result)) => {
                rb.awaiting_unlock = false;
                if let Err(e) = result {
                    self.warn(format!(
                        "cannot lift the lock of the service address ({e}): its clients cannot \
                         reach it here until `nft delete table inet {}` is run",
                        self.lock_table.as_deref().unwrap_or("?")
                    ));
                }
                self.undo_gate_once(&mut rb);
                self.rolled_back_if_done(now, rb)
            }
            (State::RollingBack(mut rb), E::Gate(GateEvent::Undone(result))) => {
                rb.awaiting_gate = false;
                self.paused = false;
                self.redirected = false;
                if let Err(e) = result {
                    self.warn(format!("the proxy could not be resumed: {e}"));
                }
                self.rolled_back_if_done(now, rb)
            }
            (State::RollingBack(mut rb), E::Gate(GateEvent::Paused(Ok(_)))) => {
                // A pause that completed after the rollback began.
                self.paused = true;
                self.undo_gate_once(&mut rb);
                State::RollingBack(rb)
            }
            (s @ State::RollingBack(_), _) => s,

            // Completions of simple steps that need no decision.
            (s, E::Completed(_, Ok(()))) => s,
            (s, E::Completed(step, Err(e))) => {
                self.warn(format!("{step:?}: {e}"));
                s
            }
            (s, E::ConnectionLost(_)) => s,

            // Anything else is out of order: a bug in the driver or a peer that broke the
            // protocol. Before the commit point it rolls back; after it, it is ignored.
            (s, e) => {
                let what = format!("{e:?}");
                let what = &what[..what.len().min(120)];
                if self.copy_end.is_some() || matches!(s, State::Done) {
                    warn!(state = s.name(), "ignoring {what}");
                    s
                } else {
                    let phase = phase_of(&s);
                    warn!(state = s.name(), "unexpected {what}");
                    self.rollback(
                        now,
                        Failure::new(
                            Side::Source,
                            phase,
                            ErrorCode::Internal,
                            format!("unexpected event in state {}: {what}", s.name()),
                        ),
                    )
                }
            }
        }
    }

    // ---- pre-copy ----

    fn start_round(&mut self, policy: Policy, number: u32, now: Instant) -> State {
        self.push(SourceAction::SendRound { round: number });
        State::PreCopy(Round {
            number,
            started: now,
            scan: None,
            policy,
        })
    }

    fn round_done(
        &mut self,
        number: u32,
        started: Instant,
        scan: RoundScan,
        mut policy: Policy,
        now: Instant,
    ) -> State {
        let duration = now - started;
        let mut rep = RoundReport {
            round: number,
            pages_scanned: scan.pages_scanned,
            pages_dirty: scan.pages_sent,
            pages_sent: scan.pages_sent,
            pages_zero: scan.pages_zero,
            bytes: scan.bytes,
            scan_ms: scan.scan_ms,
            duration_ms: ms(duration),
            bandwidth: scan.bytes as f64 / duration.as_secs_f64().max(1e-6),
            throttle: self.throttle,
            ..Default::default()
        };
        // Dirty pages found this round accumulated since the previous round started.
        rep.dirty_rate = match self.prev_round_start {
            Some(p) => rep.pages_dirty as f64 / (started - p).as_secs_f64().max(1e-6),
            None => 0.0,
        };
        // Pages that will have changed by the end of the next step: the dirty rate over this
        // round's duration (round 0: unknown, 0 as its dirty rate).
        let next = (rep.dirty_rate * duration.as_secs_f64()).round() as u64;
        if rep.bytes >= self.link.0 {
            self.link = (rep.bytes, rep.bandwidth);
        }
        let state_bytes = scan.pages_scanned * PAGE as u64;
        let fixed = policy.observe_scan(state_bytes, ms_duration(scan.scan_ms));
        self.report.precopy.frozen_cost_ms = Some(ms(fixed));
        if number == 1 && policy.limit_below_fixed_cost() {
            warn!(
                estimate_ms = ms(fixed),
                limit_ms = ms(policy.config().downtime_limit),
                "the downtime limit is below the frozen cost of this state size; pre-copy runs \
                 until rounds stop shrinking"
            );
        }
        let stats = RoundStats {
            pages_sent: rep.pages_sent,
            pages_dirty_next: next,
            bytes: rep.bytes,
            duration,
            bandwidth: self.link.1,
            dirty_rate: rep.dirty_rate,
        };
        let decision = policy.decide(&stats);
        rep.predicted_downtime_ms = policy.predicted_downtime(next).map(ms);
        rep.predicted_next_pages = Some(next);
        rep.predicted_next_ms = policy.predicted_round(next).map(ms);
        let max_rounds = policy.config().max_rounds;
        // Nothing is known about the dirty rate before a second scan: the policy counts round 0
        // (for the cap) but cannot end pre-copy after it.
        let decision = if number == 0 && max_rounds > 1 {
            PolicyDecision::Continue
        } else {
            decision
        };
        info!(
            round = number,
            sent = rep.pages_sent,
            zero = rep.pages_zero,
            scanned = rep.pages_scanned,
            ms = rep.duration_ms,
            mbit_s = rep.bandwidth * 8.0 / 1e6,
            dirty_pages_s = rep.dirty_rate,
            ?decision,
            "pre-copy round"
        );
        self.report.precopy.rounds.push(rep);
        self.prev_round_start = Some(started);
        match decision {
            PolicyDecision::StopAndCopy { reason, .. } => {
                self.report.precopy.stop_reason = Some(format!("{reason:?}"));
                if let Some(t) = self.precopy_started {
                    self.report.precopy.precopy_ms = ms(now - t);
                }
                if self.throttle.take().is_some() {
                    self.push(SourceAction::ReleaseThrottle);
                }
                self.start_freeze()
            }
            PolicyDecision::Throttle { percent, .. } => {
                if self.throttle.is_none() && !self.journaled {
                    // A crash while throttled must not leave the service throttled.
                    self.journaled = true;
                    self.push(SourceAction::Journal {
                        phase: SourcePhase::Throttled,
                        lock_table: None,
                    });
                }
                self.throttle = Some(percent);
                // The policy only steps the throttle up: the latest is the highest.
                self.report.precopy.max_throttle = Some(percent);
                info!(percent, "auto-converge: throttling the service's CPU");
                self.push(SourceAction::Throttle { percent });
                self.start_round(policy, number + 1, now)
            }
            _ => self.start_round(policy, number + 1, now),
        }
    }

    fn precopy_failed(&mut self, now: Instant, f: Failure) -> State {
        let mut then = Vec::new();
        if self.throttle.take().is_some() {
            then.push(SourceAction::ReleaseThrottle);
        }
        if self.journaled {
            then.push(SourceAction::ForgetJournal);
        }
        self.abort_connection(f.code, &f.message);
        self.late_failure = Some(f);
        self.finish_after(now, Outcome::NotStarted, then)
    }

    // ---- freezing ----

    fn start_freeze(&mut self) -> State {
        // Named before anything is locked: a recovery lifts whatever the journal names.
        self.lock_table = Some(format!("tether-lock-{}", self.cfg.id));
        self.push(SourceAction::Journal {
            phase: SourcePhase::Frozen,
            lock_table: self.lock_table.clone(),
        });
        State::Freezing(FreezeStep::Starting)
    }

    /// Lets CRIU freeze the tree: the downtime starts, and with it the frozen deadline (kept
    /// below the proxy's hold, if there is one).
    fn let_freeze(&mut self, now: Instant, hold_left: Option<Duration>) {
        self.stopping = Some(now);
        if let (Some(p), Some(a)) = (self.report.proxy.as_mut(), self.pause_asked) {
            p.before_downtime_ms = ms(now - a);
        }
        let mut limit = self.cfg.max_frozen;
        if let Some(h) = hold_left {
            let h = h.saturating_sub(self.cfg.timeouts.hold_margin);
            if h < limit {
                warn!(
                    hold_ms = h.as_millis() as u64,
                    "the proxy's remaining hold is shorter than --max-frozen; it bounds the frozen phase"
                );
                limit = h;
            }
        }
        self.frozen_limit = limit;
        self.deadline = Some(now + limit);
        self.push(SourceAction::ProceedDump);
    }

    /// The owned lock's table.
    fn frozen_lock_table(&self) -> String {
        format!("tether-frozen-{}", self.cfg.id)
    }

    /// Every lock table this migration may have left: the owned one (`true`) and the kept one.
    fn lock_tables(&self) -> Vec<(String, bool)> {
        let mut t = vec![(self.frozen_lock_table(), true)];
        t.extend(self.lock_table.clone().map(|k| (k, false)));
        t
    }

    /// The commit point: once `Journal(Committing)` is written and the kept lock is in place
    /// (or failed), CRIU is answered and ends the copy.
    fn commit_dump_when_ready(&mut self) -> State {
        if self.commit_journaled && self.locks.kept != LockState::Asked {
            self.copy_end = Some(CopyEnd::Pending);
            self.dump_active = false;
            self.push(SourceAction::CommitDump);
        }
        State::Ending
    }

    fn maybe_transfer(&mut self, held: bool, redirected: bool) -> State {
        if held && redirected {
            self.push(SourceAction::SendImages);
            State::Transferring
        } else {
            State::Freezing(FreezeStep::Dumping { held, redirected })
        }
    }

    // ---- commit ----

    fn enter_committed(&mut self, now: Instant) -> State {
        self.committed_at = Some(now);
        if let Some(r) = self.restored_at {
            self.report.timings.commit_ms = ms(now - r);
        }
        if let Some(s) = self.stopping {
            self.report.timings.downtime_ms = ms(now - s);
        }
        if self.cfg.gate.is_some() {
            self.push(SourceAction::Resume);
            State::Resuming { attempt: 0 }
        } else {
            self.cleanup_after_commit(now)
        }
    }

    fn cleanup_after_commit(&mut self, now: Instant) -> State {
        if matches!(self.copy_end, Some(CopyEnd::Pending | CopyEnd::Killing)) {
            // The lock table keeps the copy unreachable until it is gone.
            return State::AwaitingCopyEnd {
                then: AfterCopyEnd::Cleanup,
            };
        }
        self.paused = false;
        // The locks go after the address (see the completion of RemoveAddress).
        let mut then = vec![SourceAction::RemoveAddress, SourceAction::RemoveImages];
        if self.journaled {
            then.push(SourceAction::ForgetJournal);
        }
        self.finish_after(now, Outcome::Committed, then)
    }

    /// Performs `then` (actions that each report one completion) and ends with `outcome` once
    /// all have.
    fn finish_after(&mut self, now: Instant, outcome: Outcome, then: Vec<SourceAction>) -> State {
        self.deadline = None;
        let pending = then.len() as u32;
        self.actions.extend(then);
        self.finishing(now, pending, outcome)
    }

    fn finishing(&mut self, now: Instant, pending: u32, outcome: Outcome) -> State {
        if pending == 0 {
            self.finish(now, outcome)
        } else {
            State::Finishing { pending, outcome }
        }
    }

    fn restore_locally(&mut self) -> State {
        if matches!(self.copy_end, Some(CopyEnd::Pending | CopyEnd::Killing)) {
            // The restore needs the copy's pids free.
            return State::AwaitingCopyEnd {
                then: AfterCopyEnd::RestoreLocally,
            };
        }
        warn!("the destination cannot run the service; restoring it here from the image set");
        self.push(SourceAction::RestoreLocally);
        State::RestoringLocally
    }

    fn in_doubt(&mut self, now: Instant, why: &str) -> State {
        warn!("the migration is in doubt ({why}); asking the agent");
        self.resolve(now, Decision::Commit, ResolveWhy::InDoubt)
    }

    fn resolve(&mut self, now: Instant, decision: Decision, why: ResolveWhy) -> State {
        let window = if why == ResolveWhy::Inform {
            self.cfg.timeouts.inform
        } else {
            self.cfg.timeouts.resolve
        };
        self.deadline = Some(now + window);
        self.push(SourceAction::Connect);
        State::Resolving(Resolving {
            decision,
            why,
            until: now + window,
            retry_at: None,
            attempts: 0,
        })
    }

    fn retry_resolve(&mut self, now: Instant, mut r: Resolving) -> State {
        self.connected = false;
        if now >= r.until {
            return self.give_up_resolving(now, r);
        }
        match r.retry_at {
            Some(t) if now >= t => {
                r.retry_at = None;
                self.push(SourceAction::Connect);
                self.deadline = Some(r.until);
            }
            Some(t) => self.deadline = Some(t.min(r.until)),
            None => {
                let t = now + self.cfg.timeouts.resolve_retry;
                r.retry_at = Some(t);
                self.deadline = Some(t.min(r.until));
            }
        }
        State::Resolving(r)
    }

    fn give_up_resolving(&mut self, now: Instant, r: Resolving) -> State {
        match r.why {
            ResolveWhy::Inform => {
                self.warn(
                    "the destination could not be told of the rollback; it undoes its copy by \
                     itself after its in-doubt timeout (the journal stays until it is told)",
                );
                self.finish(now, Outcome::RolledBack)
            }
            _ if r.decision == Decision::Abort => {
                self.warn(
                    "the destination could not be told to undo its copy; it does so by itself \
                     after its in-doubt timeout (the journal stays until it is told)",
                );
                self.finish(now, Outcome::RolledBack)
            }
            _ => {
                let msg = format!(
                    "the agent could not be reached for {} s after the commit point; whether the \
                     service runs there is unknown",
                    self.cfg.timeouts.resolve.as_secs()
                );
                self.late_failure.get_or_insert(Failure::new(
                    Side::Network,
                    Phase::Resolve,
                    ErrorCode::Transport,
                    msg,
                ));
                self.finish(now, Outcome::InDoubt)
            }
        }
    }

    fn resolved(&mut self, now: Instant, r: Resolving, resolution: Resolution) -> State {
        self.deadline = None;
        match (r.decision, resolution) {
            (Decision::Commit, Resolution::Committed { pid }) => {
                info!(
                    pid,
                    "the agent confirms: the service runs on the destination"
                );
                self.report.destination_pid = Some(pid);
                self.enter_committed(now)
            }
            (Decision::Commit, Resolution::Aborted { reason }) => {
                self.late_failure = Some(Failure::new(
                    Side::Destination,
                    Phase::Resolve,
                    ErrorCode::Aborted,
                    format!("the destination no longer holds the service: {reason}"),
                ));
                self.restore_locally()
            }
            (_, Resolution::Pending) => {
                info!("the agent is still restoring; asking again");
                let mut r = r;
                r.retry_at = Some(now + self.cfg.timeouts.resolve_retry);
                self.retry_resolve(now, r)
            }
            (Decision::Abort, Resolution::Aborted { .. }) => {
                info!("the agent has undone its side");
                let mut then = Vec::new();
                if r.why == ResolveWhy::Recovery {
                    // The source copy runs: announce the address here, point the proxy back.
                    then.push(SourceAction::Announce);
                    if self.paused || self.redirected {
                        then.push(SourceAction::UndoGate);
                    }
                    if self.lock_table.is_some() {
                        // Lifted before the agent was asked; make sure.
                        let tables = self.lock_tables();
                        then.push(SourceAction::Unlock { tables });
                    }
                    then.push(SourceAction::RemoveImages);
                }
                then.push(SourceAction::ForgetJournal);
                self.finish_after(now, Outcome::RolledBack, then)
            }
            (Decision::Abort, Resolution::Committed { pid }) => {
                // Cannot happen under the protocol: the agent runs its copy only on a commit,
                // which follows the end of the source copy.
                self.late_failure = Some(Failure::new(
                    Side::Destination,
                    Phase::Resolve,
                    ErrorCode::Internal,
                    format!(
                        "the destination runs the service (pid {pid}) although the source copy \
                         was not ended: two copies may run; stop one by hand"
                    ),
                ));
                self.finish(now, Outcome::Failed)
            }
        }
    }

    // ---- rollback ----

    /// Starts undoing a migration that failed before the commit point: CRIU thaws the tree, the
    /// agent is told, the proxy is pointed back and resumed once the tree runs.
    fn rollback(&mut self, now: Instant, failure: Failure) -> State {
        warn!(
            phase = %failure.phase,
            side = %failure.side,
            "rolling back: {}",
            failure.message
        );
        self.deadline = None;
        if self.throttle.take().is_some() {
            self.push(SourceAction::ReleaseThrottle);
        }
        let awaiting_dump = self.dump_active;
        if awaiting_dump {
            // The tree is (or is about to be) frozen: thaw it first.
            self.push(SourceAction::RollbackDump);
        }
        self.abort_connection(
            failure.code,
            &format!("{}: {}", failure.phase, failure.message),
        );
        if self.told_frozen {
            // The agent may have announced the address: bring the LAN's packets back.
            self.push(SourceAction::Announce);
        }
        let mut rb = RollingBack {
            failure,
            awaiting_dump,
            awaiting_unlock: false,
            awaiting_gate: false,
        };
        self.unlock_once(&mut rb);
        self.undo_gate_once(&mut rb);
        self.rolled_back_if_done(now, rb)
    }

    /// Once the tree runs (CRIU is not thawing it any more), points the proxy back and resumes
    /// it if it was paused or redirected, asking only once.
    fn undo_gate_once(&mut self, rb: &mut RollingBack) {
        let locked = rb.awaiting_unlock || self.locks != Locks::default();
        if !rb.awaiting_dump && !locked && !rb.awaiting_gate && (self.paused || self.redirected) {
            rb.awaiting_gate = true;
            self.push(SourceAction::UndoGate);
        }
    }

    /// Once the tree runs and no lock is pending, lifts the locks in place, asking only once
    /// (before the proxy's undo: held bytes must find the address open).
    fn unlock_once(&mut self, rb: &mut RollingBack) {
        if rb.awaiting_dump || rb.awaiting_unlock || self.locks.asked() {
            return;
        }
        if self.locks != Locks::default() {
            let tables = self.lock_tables();
            self.locks = Locks::default();
            rb.awaiting_unlock = true;
            self.push(SourceAction::Unlock { tables });
        }
    }

    fn rolled_back_if_done(&mut self, now: Instant, rb: RollingBack) -> State {
        if rb.awaiting_dump || rb.awaiting_unlock || self.locks.asked() || rb.awaiting_gate {
            return State::RollingBack(rb);
        }
        let was_frozen = self.stopping.is_some();
        if let Some(t) = self.stopping {
            // How long the service was stopped before it ran again here.
            self.report.timings.downtime_ms = ms(now - t);
        }
        self.late_failure = Some(rb.failure);
        if self.images_done {
            // The agent may hold a restored copy and have missed the close: tell it on a new
            // connection, and keep the journal until it is told.
            self.journaled = true;
            self.push(SourceAction::Journal {
                phase: SourcePhase::RolledBack,
                lock_table: self.lock_table.clone(),
            });
            return self.resolve(now, Decision::Abort, ResolveWhy::Inform);
        }
        let outcome = if was_frozen {
            Outcome::RolledBack
        } else {
            Outcome::NotStarted
        };
        let then = if self.journaled {
            vec![SourceAction::ForgetJournal]
        } else {
            Vec::new()
        };
        self.finish_after(now, outcome, then)
    }

    fn send_commit(&mut self, now: Instant) -> State {
        if let Some(r) = self.restored_at {
            self.report.timings.commit_sent_ms = ms(now - r);
        }
        if self.connected {
            self.send(ToAgent::Commit);
            self.deadline = Some(now + self.cfg.timeouts.commit);
            State::AwaitingCommitted
        } else {
            self.in_doubt(
                now,
                "the connection was lost before the commit could be sent",
            )
        }
    }

    fn close_connection(&mut self) {
        if self.connected {
            self.connected = false;
            self.push(SourceAction::Close);
        }
    }

    fn abort_connection(&mut self, code: ErrorCode, reason: &str) {
        if self.connected {
            self.connected = false;
            self.push(SourceAction::Abort {
                code,
                reason: reason.to_string(),
            });
        }
    }

    // ---- endings ----

    fn not_started(&mut self, now: Instant, f: Failure) -> State {
        self.late_failure = Some(f);
        self.finish(now, Outcome::NotStarted)
    }

    fn finish_failed(&mut self, now: Instant) -> State {
        self.finish(now, Outcome::Failed)
    }

    fn finish(&mut self, now: Instant, outcome: Outcome) -> State {
        self.deadline = None;
        self.report.outcome = outcome;
        self.report.timings.total_ms = ms(now - self.started);
        self.report.score_prediction();
        let failure = self.late_failure.take();
        if let Some(f) = &failure {
            self.report.error = Some(ReportError {
                side: f.side,
                phase: f.phase,
                code: f.code,
                message: f.message.clone(),
            });
        }
        match outcome {
            Outcome::Committed => info!(
                downtime_ms = self.report.timings.downtime_ms,
                total_ms = self.report.timings.total_ms,
                "committed: the service runs on the destination"
            ),
            other => warn!(?other, "migration ended"),
        }
        self.result = Some(SourceResult {
            outcome,
            failure,
            report: self.report.clone(),
        });
        State::Done
    }

    fn warn(&mut self, w: impl Into<String>) {
        let w = w.into();
        warn!("{w}");
        self.report.warnings.push(w);
    }

    fn unexpected(
        &self,
        phase: Phase,
        m: &FromAgent,
        expected: &'static [&'static str],
    ) -> Failure {
        Failure::new(
            Side::Destination,
            phase,
            ErrorCode::Protocol,
            crate::protocol::WireError::Unexpected {
                expected,
                got: m.name(),
            }
            .to_string(),
        )
    }
}

/// Tries at resuming the proxy after the commit: a proxy left paused resumes by itself after
/// its maximum hold, but toward the backend it had before the pause.
const RESUME_ATTEMPTS: u32 = 3;
/// Pause between them.
const RESUME_RETRY: Duration = Duration::from_millis(100);

fn phase_of(s: &State) -> Phase {
    match s {
        State::Connecting => Phase::Connect,
        State::Handshaking => Phase::Handshake,
        State::PreCopy(_) => Phase::PreCopy,
        State::Freezing(FreezeStep::Pausing) => Phase::Pause,
        State::Freezing(_) => Phase::Dump,
        State::Transferring => Phase::Transfer,
        State::AwaitingRestore => Phase::Restore,
        State::Ending | State::AwaitingCommitted => Phase::Commit,
        State::Resolving(_) | State::Recovering | State::RecoveringUnlock => Phase::Resolve,
        State::Resuming { .. } => Phase::Resume,
        State::Finishing { .. } => Phase::Cleanup,
        State::RestoringLocally => Phase::Restore,
        State::AwaitingCopyEnd { .. } => Phase::Commit,
        State::RollingBack(_) => Phase::Rollback,
        State::Done => Phase::Cleanup,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ms_duration(ms: f64) -> Duration {
    Duration::try_from_secs_f64(ms.max(0.0) / 1e3).unwrap_or(Duration::MAX)
}
