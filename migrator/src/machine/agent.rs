//! The destination side of one migration (`tether agent`) as a state machine without I/O.
//!
//! The driver (`driver::agent`) creates one machine per migration once a connection
//! opened with `Hello`, feeds it the connection's frames and its ports' results as
//! [`AgentEvent`]s, performs the [`AgentAction`]s it takes out, and sends [`AgentEvent::Tick`]
//! when [`AgentMachine::poll_timeout`] passes. Frames are decoded and sequenced here; what the
//! data frames carry (pages, image files) goes to the driver's store through actions.
//!
//! # Sequence
//!
//! ```text
//!  source                                   agent (this machine)
//!  Hello ────────────────────────────────▶ ChooseInterface: address free here? which interface?
//!        ◀──────────────────── Ready ──── (or Refused: nothing changed here)
//!  Layout, pages, RoundEnd ──────────────▶ StorePrecopy ...
//!        ◀───────────────── RoundAck ────
//!  Frozen ───────────────────────────────▶ Journal(Claimed), Prepare: block the address
//!                                          (inbound, outbound, ARP), then add it
//!  File, data ... FinalPages ────────────▶ CreateFile/WriteFile ..., StartRebuild
//!  pages ... ImagesDone ─────────────────▶ StoreFinal ..., FinishRebuild,
//!                                          Journal(Restoring), Restore (tree left stopped)
//!                                          Journal(Prepared)
//!        ◀──────────────── Restored ─────
//!  Commit ───────────────────────────────▶ Journal(Committed), GoLive: lift the block,
//!                                          announce the address, resume the tree
//!        ◀─────────────── Committed ─────  Tombstone(Committed)
//! ```
//!
//! # States
//!
//! ```text
//!  Accepting ─▶ PreCopy ─▶ Receiving(files) ─▶ Receiving(final) ─▶ Rebuilding ─▶ Restoring ─▶ Prepared
//!      │          │            │                    │                  │             │           │ │
//!      │          └────────────┴────── any failure, Abort, lost ──────┴─────────────┘           │ │
//!      ▼                                      ▼                                                  │ │
//!  Done(refused)                           Undoing ─▶ Done(aborted)   ◀── Abort / close ─────────┘ │
//!                                             ▲                                                    │
//!                        in-doubt timeout ─── InDoubt ◀── connection lost / no Commit ─────────────┤
//!                                             │ Resolve(Commit)                                    │ Commit
//!                                             └───────────────────────▶ GoingLive ◀────────────────┘
//!                                                                          │
//!                                                                          ▼
//!                                                                    Done(committed)
//!  recover(): Prepared record ─ CheckCopy ─▶ InDoubt | Undoing;  Committed record ─▶ GoingLive;
//!             earlier records ─▶ Undoing
//! ```
//!
//! Before the agent has sent `Restored`, the source cannot have ended its copy (it does so only
//! after `Restored`), so every failure, abort or lost connection undoes this side. After it,
//! the restored copy may be the only one: a lost connection leaves the migration in doubt, the
//! copy stopped and unreachable, until the source resolves it (`Resolve` on a new connection)
//! or the in-doubt timeout passes (the source still holds its image set then).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use super::{ConnectionEnd, Failure, PortError};
use crate::protocol::frame::{self, Frame, MAX_FILES};
use crate::protocol::stats::CriuRestoreStats;
use crate::protocol::{
    Decision, ErrorCode, FromAgent, PageBatch, Phase, Resolution, ServiceAddr, Side, ToAgent,
    WireError,
};

/// How the agent's machines are set up.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentConfig {
    /// Largest image set accepted (files plus final difference), bytes.
    pub max_image_bytes: u64,
    /// Deadlines.
    pub timeouts: AgentTimeouts,
}

/// Deadlines of the agent's side.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AgentTimeouts {
    /// Longest silence of the source before `Restored`.
    pub message: Duration,
    /// From `Restored` to `Commit` on a live connection before the migration counts as in
    /// doubt.
    pub commit: Duration,
    /// How long a restored copy is kept, stopped and unreachable, for a source that does not
    /// say how its migration ended; then it is undone.
    pub in_doubt: Duration,
}

impl Default for AgentTimeouts {
    fn default() -> AgentTimeouts {
        AgentTimeouts {
            message: Duration::from_secs(60),
            commit: Duration::from_secs(30),
            in_doubt: Duration::from_secs(300),
        }
    }
}

/// What the agent records durably about a migration (the driver adds paths, pids' start
/// times and the lazy-pages daemon). Written before the change it must survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentPhase {
    /// The address is about to be blocked and added here.
    Claimed,
    /// CRIU restores the tree.
    Restoring {
        /// The restored root's pid, once CRIU named it.
        pid: Option<i32>,
    },
    /// The tree is restored, stopped and unreachable; `Restored` is about to be sent: from now
    /// on the copy may be the only one.
    Prepared {
        /// Its root's pid.
        pid: i32,
    },
    /// `Commit` arrived: the copy must run, whatever happens to this agent.
    Committed {
        /// Its root's pid.
        pid: i32,
    },
}

/// How a migration ended here, kept after it ended so that a late `Resolve` gets the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentOutcome {
    /// The service runs here.
    Committed {
        /// Its root's pid.
        pid: i32,
    },
    /// Nothing of it is left here.
    Aborted {
        /// Why.
        reason: String,
    },
    /// Refused at `Hello`; nothing was changed.
    Refused {
        /// Why.
        reason: String,
    },
}

impl AgentOutcome {
    /// The answer to a `Resolve` about a migration that ended so.
    pub fn resolution(&self) -> Resolution {
        match self {
            AgentOutcome::Committed { pid } => Resolution::Committed { pid: *pid },
            AgentOutcome::Aborted { reason } | AgentOutcome::Refused { reason } => {
                Resolution::Aborted {
                    reason: reason.clone(),
                }
            }
        }
    }
}

/// What the restore produced.
#[derive(Debug, Clone, PartialEq)]
pub struct RestoreInfo {
    /// The restored root's pid.
    pub pid: i32,
    /// Milliseconds of the CRIU restore request alone.
    pub criu_restore_ms: f64,
    /// CRIU's statistics.
    pub stats: Option<CriuRestoreStats>,
    /// The most memory this migration held here before the restore (page store, image files,
    /// rebuilt pages files), bytes, where the driver knows it.
    pub held_bytes: Option<u64>,
}

/// Simple steps whose completion is reported with [`AgentEvent::Completed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentStep {
    /// [`AgentAction::Journal`].
    Journal,
    /// [`AgentAction::Tombstone`].
    Tombstone,
}

/// What happens to an agent machine.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentEvent {
    /// After [`AgentAction::ChooseInterface`]: the interface for the service address, or why
    /// it cannot be here.
    InterfaceChosen(Result<String, PortError>),
    /// A frame on the migration's stream.
    Frame(Frame),
    /// The migration's connection ended.
    ConnectionLost(ConnectionEnd),
    /// A `Resolve` for this migration arrived on another connection; answer it with
    /// [`AgentAction::Reply`] carrying `request`.
    Resolve {
        /// The source's decision.
        decision: Decision,
        /// Names the request for the reply.
        request: u64,
    },
    /// A data action (store, file, rebuild start) failed.
    DataFailed(Phase, PortError),
    /// After [`AgentAction::Prepare`].
    Prepared(Result<(), PortError>),
    /// After [`AgentAction::FinishRebuild`].
    Rebuilt(Result<(), PortError>),
    /// During [`AgentAction::Restore`]: CRIU named the restored root (before it runs).
    RestoreStarted {
        /// Its pid.
        pid: i32,
    },
    /// After [`AgentAction::Restore`].
    Restored(Result<RestoreInfo, PortError>),
    /// After [`AgentAction::GoLive`].
    WentLive(Result<(), PortError>),
    /// After [`AgentAction::Undo`] (best effort: what failed was logged).
    Undone,
    /// After [`AgentAction::CheckCopy`]: whether the restored copy (and its lazy-pages daemon)
    /// still exists.
    CopyAlive(bool),
    /// A simple step finished.
    Completed(AgentStep, Result<(), PortError>),
    /// [`AgentMachine::poll_timeout`] passed.
    Tick,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum AgentAction {
    /// Check that the service address is not configured here and pick its interface.
    ChooseInterface,
    /// Send a message on the migration's stream.
    Send(FromAgent),
    /// Finish the migration's stream and close its connection (after the last message).
    Close,
    /// Answer a `Resolve` request.
    Reply {
        /// The request.
        request: u64,
        /// The answer.
        resolution: Resolution,
    },
    /// Record the phase durably; answer with [`AgentEvent::Completed`]`(AgentStep::Journal, ..)`.
    Journal(AgentPhase),
    /// Record the final outcome, drop the record; answer with
    /// [`AgentEvent::Completed`]`(AgentStep::Tombstone, ..)`.
    Tombstone(AgentOutcome),
    /// Pre-copy: the owner's memory ranges.
    Layout {
        /// The owner code.
        owner: u64,
        /// Its ranges.
        ranges: Vec<(u64, u64)>,
    },
    /// Store pre-copied pages (failures come as [`AgentEvent::DataFailed`]).
    StorePrecopy(PageBatch),
    /// Block the service address (inbound, outbound, ARP) and add it on `dev`; answer with
    /// [`AgentEvent::Prepared`].
    Prepare {
        /// The interface.
        dev: String,
    },
    /// Create the next image file, of `size` bytes.
    CreateFile {
        /// Its plain name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// Append to the current image file.
    WriteFile(Vec<u8>),
    /// The page maps are in: start writing CRIU's page files from the stored pages (and, for a
    /// lazy restore, start the lazy-pages daemon).
    StartRebuild,
    /// Keep a page batch of the final difference.
    StoreFinal(PageBatch),
    /// Complete the page files with the final difference; answer with [`AgentEvent::Rebuilt`].
    FinishRebuild,
    /// Restore the tree, left stopped; report [`AgentEvent::RestoreStarted`] as soon as CRIU
    /// names its root, then [`AgentEvent::Restored`].
    Restore,
    /// Make the restored tree reachable and running: lift the block, announce the address,
    /// resume every process. Answer with [`AgentEvent::WentLive`].
    GoLive,
    /// Undo everything of this migration here (kill a restored copy and its lazy-pages daemon,
    /// remove the address, lift blocks, remove images); answer with [`AgentEvent::Undone`].
    Undo,
    /// Check whether the restored copy still exists; answer with [`AgentEvent::CopyAlive`].
    CheckCopy,
}

/// What a journal write must precede.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JournalGate {
    /// Taking the address (block, then add it).
    Claim,
    /// CRIU's restore.
    Restore,
    /// Going live.
    Commit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Receiving {
    /// `FinalPages` came: page batches are the final difference now.
    final_pages: bool,
    /// Bytes still to come of the current file.
    file_left: u64,
    files: u32,
    file_bytes: u64,
    final_count: u64,
    final_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Accepting,
    PreCopy,
    Receiving(Receiving),
    Rebuilding,
    /// Journal(Restoring) written or pending; CRIU restores.
    Restoring {
        started: bool,
    },
    /// Restored, stopped and unreachable; `Restored` sent.
    Prepared,
    InDoubt,
    /// `Commit` came; the copy goes live.
    GoingLive,
    Undoing,
    /// Waiting for the tombstone's completion.
    Ending,
    Done,
}

impl State {
    fn name(&self) -> &'static str {
        match self {
            State::Accepting => "accepting",
            State::PreCopy => "pre-copy",
            State::Receiving(_) => "receiving",
            State::Rebuilding => "rebuilding",
            State::Restoring { .. } => "restoring",
            State::Prepared => "prepared",
            State::InDoubt => "in-doubt",
            State::GoingLive => "going-live",
            State::Undoing => "undoing",
            State::Ending => "ending",
            State::Done => "done",
        }
    }

    fn phase(&self) -> Phase {
        match self {
            State::Accepting => Phase::Handshake,
            State::PreCopy => Phase::PreCopy,
            State::Receiving(_) => Phase::Transfer,
            State::Rebuilding => Phase::Rebuild,
            State::Restoring { .. } => Phase::Restore,
            State::Prepared | State::InDoubt | State::GoingLive => Phase::Commit,
            State::Undoing | State::Ending | State::Done => Phase::Rollback,
        }
    }
}

/// The destination side of one migration. See the [module documentation](self).
#[derive(Debug)]
pub struct AgentMachine {
    cfg: AgentConfig,
    state: State,
    actions: VecDeque<AgentAction>,
    deadline: Option<Instant>,
    /// The migration's main connection is up.
    connected: bool,
    dev: Option<String>,
    /// The block and address are (being) set up here.
    claimed: bool,
    /// What waits for the journal write in progress.
    journal_gate: Option<JournalGate>,
    prepared: bool,
    /// The page files are complete.
    rebuilt: bool,
    /// Host changes in flight that an undo must wait for: the address claim, CRIU's restore
    /// (either may still change the host after the undo, and leave it changed).
    claiming: bool,
    restoring: bool,
    /// An undo is due once they return.
    undo_after: bool,
    /// Why the source (or a timeout) had the migration undone.
    abort_reason: Option<String>,
    pid: Option<i32>,
    /// When `ImagesDone` came (the restore's clock).
    images_done_at: Option<Instant>,
    commit_at: Option<Instant>,
    /// `Resolve` requests to answer once the outcome is known.
    pending_replies: Vec<u64>,
    /// Why the migration is being undone; sent as `Failed` if the source still listens.
    failure: Option<Failure>,
    outcome: Option<AgentOutcome>,
    /// Pre-copy pages received (for logs).
    precopy_pages: u64,
}

impl AgentMachine {
    /// A machine for a migration whose `Hello` arrived (the driver has checked its protocol
    /// version and that its id is new). Its first action is [`AgentAction::ChooseInterface`].
    pub fn new(cfg: AgentConfig, service_addr: ServiceAddr, now: Instant) -> AgentMachine {
        info!(%service_addr, "new migration");
        let mut m = AgentMachine::blank(cfg);
        m.connected = true;
        m.state = State::Accepting;
        m.deadline = Some(now + cfg.timeouts.message);
        m.push(AgentAction::ChooseInterface);
        m
    }

    /// A machine for a migration an earlier agent left unfinished, from its journal.
    pub fn recover(
        cfg: AgentConfig,
        service_addr: ServiceAddr,
        phase: AgentPhase,
        now: Instant,
    ) -> AgentMachine {
        info!(%service_addr, ?phase, "resuming a migration from the journal");
        let mut m = AgentMachine::blank(cfg);
        m.claimed = true;
        let _ = now;
        match phase {
            AgentPhase::Committed { pid } => {
                info!(
                    pid,
                    "finishing a committed migration left by an earlier agent"
                );
                m.pid = Some(pid);
                m.state = State::GoingLive;
                m.push(AgentAction::GoLive);
            }
            AgentPhase::Prepared { pid } => {
                info!(
                    pid,
                    "an earlier agent left a restored copy in doubt; checking it"
                );
                m.pid = Some(pid);
                m.prepared = true;
                m.state = State::Prepared;
                m.push(AgentAction::CheckCopy);
            }
            AgentPhase::Claimed | AgentPhase::Restoring { .. } => {
                info!("undoing a migration an earlier agent left unfinished");
                m.failure = Some(Failure::new(
                    Side::Destination,
                    Phase::Restore,
                    ErrorCode::Aborted,
                    "the agent restarted before the restore was complete",
                ));
                m.state = State::Undoing;
                m.push(AgentAction::Undo);
            }
        }
        m
    }

    fn blank(cfg: AgentConfig) -> AgentMachine {
        AgentMachine {
            cfg,
            state: State::Done,
            actions: VecDeque::new(),
            deadline: None,
            connected: false,
            dev: None,
            claimed: false,
            journal_gate: None,
            prepared: false,
            rebuilt: false,
            claiming: false,
            restoring: false,
            undo_after: false,
            abort_reason: None,
            pid: None,
            images_done_at: None,
            commit_at: None,
            pending_replies: Vec::new(),
            failure: None,
            outcome: None,
            precopy_pages: 0,
        }
    }

    /// The next action to perform, if any.
    pub fn poll_action(&mut self) -> Option<AgentAction> {
        self.actions.pop_front()
    }

    /// When the machine needs an [`AgentEvent::Tick`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// How the migration ended here, once it did.
    pub fn outcome(&self) -> Option<&AgentOutcome> {
        self.outcome.as_ref()
    }

    /// Whether the machine is done (no more actions will come).
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The current state's name, for logs and tests.
    pub fn state_name(&self) -> &'static str {
        self.state.name()
    }

    /// Whether the restored copy may be the only one (`Restored` was sent) and not committed:
    /// the migration must not be dropped without the source's word or the in-doubt timeout.
    pub fn in_doubt(&self) -> bool {
        matches!(self.state, State::Prepared | State::InDoubt)
    }

    fn push(&mut self, a: AgentAction) {
        self.actions.push_back(a);
    }

    fn send(&mut self, m: FromAgent) {
        if self.connected {
            self.push(AgentAction::Send(m));
        }
    }

    /// Handles one event at time `now`.
    pub fn handle(&mut self, now: Instant, event: AgentEvent) {
        if self.state == State::Done {
            if let AgentEvent::Resolve { request, .. } = event {
                // Ended while the request was on its way: answer from the outcome.
                let resolution = self.outcome.as_ref().map_or(
                    Resolution::Aborted {
                        reason: "unknown migration".into(),
                    },
                    AgentOutcome::resolution,
                );
                self.push(AgentAction::Reply {
                    request,
                    resolution,
                });
            }
            return;
        }
        if let AgentEvent::Tick = event {
            if self.deadline.is_none_or(|d| now < d) {
                return;
            }
            self.deadline = None;
        }
        if let AgentEvent::ConnectionLost(_) = &event {
            self.connected = false;
        }
        let state = std::mem::replace(&mut self.state, State::Done);
        self.state = self.step(state, now, event);
    }

    fn step(&mut self, state: State, now: Instant, event: AgentEvent) -> State {
        use AgentEvent as E;
        match (state, event) {
            // ---- acceptance ----
            (State::Accepting, E::InterfaceChosen(Ok(dev))) => {
                info!(%dev, "accepted");
                self.send(FromAgent::Ready {
                    interface: dev.clone(),
                });
                self.dev = Some(dev);
                self.deadline = Some(now + self.cfg.timeouts.message);
                State::PreCopy
            }
            (State::Accepting, E::InterfaceChosen(Err(e))) => {
                info!("refused: {e}");
                self.send(FromAgent::Refused {
                    code: e.code,
                    reason: e.message.clone(),
                });
                self.push(AgentAction::Close);
                self.outcome = Some(AgentOutcome::Refused { reason: e.message });
                self.deadline = None;
                State::Done
            }

            // ---- frames from the source, before the restore ----
            (
                s @ (State::Accepting
                | State::PreCopy
                | State::Receiving(_)
                | State::Rebuilding
                | State::Restoring { .. }),
                E::Frame(f),
            ) => {
                self.deadline = Some(now + self.cfg.timeouts.message);
                match self.frame(s, now, f) {
                    Ok(s) => s,
                    Err((phase, e)) => self.fail(
                        now,
                        Failure::new(Side::Source, phase, e.code(), e.to_string()),
                    ),
                }
            }

            // ---- journal writes, and what waits for them ----
            (s, E::Completed(AgentStep::Journal, r)) => match (self.journal_gate.take(), r) {
                (Some(JournalGate::Claim), Ok(())) => {
                    let dev = self.dev.clone().unwrap_or_default();
                    self.claiming = true;
                    self.push(AgentAction::Prepare { dev });
                    s
                }
                (Some(JournalGate::Restore), Ok(())) => {
                    self.restoring = true;
                    self.push(AgentAction::Restore);
                    State::Restoring { started: true }
                }
                (Some(gate @ (JournalGate::Claim | JournalGate::Restore)), Err(e)) => {
                    // Without a record, a crash could not be undone: do not touch the host.
                    let phase = if gate == JournalGate::Claim {
                        Phase::Transfer
                    } else {
                        Phase::Restore
                    };
                    self.fail(
                        now,
                        Failure::port(Side::Destination, phase, e)
                            .context("cannot record the migration"),
                    )
                }
                (Some(JournalGate::Commit), r) => {
                    if let Err(e) = r {
                        error!("cannot record the commit (going live anyway): {e}");
                    }
                    self.push(AgentAction::GoLive);
                    s
                }
                (None, Err(e)) => {
                    error!("cannot update the migration's record: {e}");
                    s
                }
                (None, Ok(())) => s,
            },

            // ---- preparing the address (runs beside the image transfer) ----
            (s @ (State::Undoing | State::Ending | State::Done), E::Prepared(_)) => {
                self.claiming = false;
                self.undo_if_due();
                s
            }
            (s, E::Prepared(Ok(()))) if self.claimed && !self.prepared => {
                self.claiming = false;
                info!(
                    pages = self.precopy_pages,
                    "service address added and blocked"
                );
                self.prepared = true;
                match s {
                    State::Rebuilding if self.rebuilt => self.start_restore(),
                    s => s,
                }
            }
            (s, E::Prepared(Err(e))) => {
                self.claiming = false;
                let phase = s.phase();
                self.fail(now, Failure::port(Side::Destination, phase, e))
            }
            (s, E::DataFailed(phase, e)) if !matches!(s, State::Undoing | State::Ending) => {
                self.fail(now, Failure::port(Side::Destination, phase, e))
            }

            // ---- rebuild and restore ----
            (State::Rebuilding, E::Rebuilt(Ok(()))) => {
                self.rebuilt = true;
                if self.prepared {
                    self.start_restore()
                } else {
                    State::Rebuilding
                }
            }
            (State::Rebuilding, E::Rebuilt(Err(e))) => {
                self.fail(now, Failure::port(Side::Destination, Phase::Rebuild, e))
            }
            (s @ State::Restoring { .. }, E::RestoreStarted { pid }) => {
                self.pid = Some(pid);
                // So that a restarted agent can kill a tree CRIU finished without us.
                self.push(AgentAction::Journal(AgentPhase::Restoring {
                    pid: Some(pid),
                }));
                s
            }
            (State::Restoring { .. }, E::Restored(Ok(info))) => {
                self.restoring = false;
                self.pid = Some(info.pid);
                let restore_ms = self
                    .images_done_at
                    .map_or(0.0, |t| (now - t).as_secs_f64() * 1e3);
                info!(
                    pid = info.pid,
                    restore_ms, "restored, stopped and unreachable"
                );
                // Recorded before the source can learn of it: from `Restored` on, this copy
                // may be the only one.
                self.push(AgentAction::Journal(AgentPhase::Prepared { pid: info.pid }));
                self.send(FromAgent::Restored {
                    pid: info.pid,
                    restore_ms,
                    criu_restore_ms: info.criu_restore_ms,
                    stats: info.stats,
                    held_bytes: info.held_bytes,
                });
                if self.connected {
                    self.deadline = Some(now + self.cfg.timeouts.commit);
                    State::Prepared
                } else {
                    self.enter_in_doubt(now, "the connection was lost before Restored was sent")
                }
            }
            (State::Restoring { .. }, E::Restored(Err(e))) => {
                self.restoring = false;
                self.fail(now, Failure::port(Side::Destination, Phase::Restore, e))
            }

            // ---- prepared: the copy may be the only one ----
            (State::Prepared, E::Frame(Frame::Control(body))) => {
                match frame::decode::<ToAgent>(&body) {
                    Ok(ToAgent::Commit) => self.commit(now),
                    Ok(ToAgent::Abort { reason, .. }) => {
                        self.abort(now, format!("source aborted: {reason}"))
                    }
                    Ok(m) => {
                        warn!("unexpected {} after restored; in doubt now", m.name());
                        self.push(AgentAction::Close);
                        self.connected = false;
                        self.enter_in_doubt(now, "protocol violation after restored")
                    }
                    Err(e) => {
                        warn!("{e}; in doubt now");
                        self.push(AgentAction::Close);
                        self.connected = false;
                        self.enter_in_doubt(now, "protocol violation after restored")
                    }
                }
            }
            (State::Prepared, E::Frame(f)) => {
                warn!("unexpected {} after restored; in doubt now", f.name());
                self.push(AgentAction::Close);
                self.connected = false;
                self.enter_in_doubt(now, "protocol violation after restored")
            }
            (State::Prepared, E::ConnectionLost(end)) => {
                if end.by_peer {
                    self.abort(now, format!("source aborted: {}", end.reason))
                } else {
                    self.enter_in_doubt(now, &format!("connection lost: {}", end.reason))
                }
            }
            (State::Prepared, E::Tick) => {
                self.push(AgentAction::Close);
                self.connected = false;
                self.enter_in_doubt(now, "no commit in time")
            }
            (State::Prepared | State::InDoubt, E::CopyAlive(alive)) => {
                if alive {
                    self.enter_in_doubt(now, "recovered after a restart")
                } else {
                    self.abort(now, "the restored copy is gone".into())
                }
            }
            (
                State::Prepared | State::InDoubt,
                E::Resolve {
                    decision: Decision::Commit,
                    request,
                },
            ) => {
                self.pending_replies.push(request);
                self.commit(now)
            }
            (
                State::Prepared | State::InDoubt,
                E::Resolve {
                    decision: Decision::Abort,
                    request,
                },
            ) => {
                self.pending_replies.push(request);
                self.abort(now, "the source took the service back".into())
            }
            (State::InDoubt, E::Tick) => {
                error!(
                    "no word from the source for {} s; undoing the restored copy (the source \
                     keeps its image set)",
                    self.cfg.timeouts.in_doubt.as_secs()
                );
                self.abort(
                    now,
                    format!(
                        "in doubt for {} s without word from the source",
                        self.cfg.timeouts.in_doubt.as_secs()
                    ),
                )
            }
            (s @ State::InDoubt, _) => s,

            // ---- going live ----
            (State::GoingLive, E::WentLive(Ok(()))) => {
                let pid = self.pid.unwrap_or(-1);
                let go_live_ms = self
                    .commit_at
                    .map_or(0.0, |t| (now - t).as_secs_f64() * 1e3);
                info!(pid, go_live_ms, "committed: the service runs here");
                self.send(FromAgent::Committed { go_live_ms });
                self.push(AgentAction::Close);
                self.end(AgentOutcome::Committed { pid })
            }
            (State::GoingLive, E::WentLive(Err(e))) => {
                // The copy cannot run: undo it and tell the source, which restores its own
                // from its image set.
                error!("the restored service cannot go live: {e}");
                self.fail(now, Failure::port(Side::Destination, Phase::Commit, e))
            }
            (s @ State::GoingLive, E::Resolve { request, .. }) => {
                self.pending_replies.push(request);
                s
            }
            (s @ State::GoingLive, _) => s,

            // ---- undoing ----
            (State::Undoing, E::Restored(r)) if self.restoring => {
                // The restore returned after the undo was decided: now undo, its tree included.
                self.restoring = false;
                if let Ok(info) = r {
                    self.pid = Some(info.pid);
                }
                self.undo_if_due();
                State::Undoing
            }
            (s @ State::Undoing, E::RestoreStarted { pid }) => {
                self.pid = Some(pid);
                s
            }
            (State::Undoing, E::Undone) => {
                let reason = match (&self.failure, &self.abort_reason) {
                    (Some(f), _) => f.to_string(),
                    (None, Some(r)) => r.clone(),
                    (None, None) => "aborted".to_string(),
                };
                if let Some(f) = self.failure.clone() {
                    self.send(FromAgent::Failed {
                        phase: f.phase,
                        code: f.code,
                        reason: f.message,
                    });
                }
                self.push(AgentAction::Close);
                info!("destination side undone");
                self.end(AgentOutcome::Aborted { reason })
            }
            (s @ State::Undoing, E::Resolve { request, .. }) => {
                self.pending_replies.push(request);
                s
            }
            (s @ State::Undoing, _) => s,

            (State::Ending, E::Completed(AgentStep::Tombstone, r)) => {
                if let Err(e) = r {
                    error!("cannot record the outcome: {e}");
                }
                State::Done
            }
            (s @ State::Ending, E::Resolve { request, .. }) => {
                if let Some(o) = &self.outcome {
                    let resolution = o.resolution();
                    self.push(AgentAction::Reply {
                        request,
                        resolution,
                    });
                }
                s
            }
            (s @ State::Ending, _) => s,

            // ---- before the restore: resolves, losses, deadlines ----
            (
                s @ (State::Accepting
                | State::PreCopy
                | State::Receiving(_)
                | State::Rebuilding
                | State::Restoring { .. }),
                E::Resolve { decision, request },
            ) => match (decision, &s) {
                // Still restoring: the source learns once it is done.
                (Decision::Commit, State::Rebuilding | State::Restoring { .. }) => {
                    self.push(AgentAction::Reply {
                        request,
                        resolution: Resolution::Pending,
                    });
                    s
                }
                _ => {
                    self.pending_replies.push(request);
                    self.abort(
                        now,
                        "the source resolved the migration before the restore".into(),
                    )
                }
            },
            (s, E::ConnectionLost(end)) => {
                if end.by_peer {
                    // The source aborted on purpose: nobody waits for a `Failed`.
                    return self.abort(now, format!("source aborted: {}", end.reason));
                }
                let phase = s.phase();
                self.fail(
                    now,
                    Failure::new(
                        Side::Network,
                        phase,
                        ErrorCode::Transport,
                        format!("connection lost: {}", end.reason),
                    ),
                )
            }
            (s, E::Tick) => {
                let phase = s.phase();
                self.fail(
                    now,
                    Failure::new(
                        Side::Source,
                        phase,
                        ErrorCode::Timeout,
                        format!(
                            "no message from the source for {} s",
                            self.cfg.timeouts.message.as_secs()
                        ),
                    ),
                )
            }
            (s, E::Completed(_, Ok(()))) => s,
            (s, e) => {
                let what = format!("{e:?}");
                let what = &what[..what.len().min(120)];
                warn!(state = s.name(), "unexpected {what}");
                let phase = s.phase();
                self.fail(
                    now,
                    Failure::new(
                        Side::Destination,
                        phase,
                        ErrorCode::Internal,
                        format!("unexpected event in state {}: {what}", s.name()),
                    ),
                )
            }
        }
    }

    /// A frame before the restore.
    fn frame(&mut self, state: State, now: Instant, f: Frame) -> Result<State, (Phase, WireError)> {
        let phase = state.phase();
        let unexpected = |expected: &'static [&'static str], got: &'static str| {
            (phase, WireError::Unexpected { expected, got })
        };
        match (state, f) {
            (State::Accepting, f) => Err(unexpected(&["nothing before ready"], f.name())),
            (State::PreCopy, Frame::Pages(body)) => {
                let batch = PageBatch::decode(&body).map_err(|e| (phase, e))?;
                self.precopy_pages += batch.pages.len() as u64;
                self.push(AgentAction::StorePrecopy(batch));
                Ok(State::PreCopy)
            }
            (State::Receiving(mut r), Frame::Data(chunk)) => {
                if r.file_left == 0 {
                    return Err(unexpected(&["file", "final_pages"], "file data"));
                }
                if chunk.len() as u64 > r.file_left {
                    return Err((
                        phase,
                        WireError::BadSize(format!(
                            "{} bytes of file data where {} were left of the file",
                            chunk.len(),
                            r.file_left
                        )),
                    ));
                }
                r.file_left -= chunk.len() as u64;
                self.push(AgentAction::WriteFile(chunk));
                Ok(State::Receiving(r))
            }
            (State::Receiving(mut r), Frame::Pages(body)) if r.final_pages && r.file_left == 0 => {
                let batch = PageBatch::decode(&body).map_err(|e| (phase, e))?;
                r.final_count += batch.pages.len() as u64;
                r.final_bytes = r.final_bytes.saturating_add(body.len() as u64);
                if r.file_bytes.saturating_add(r.final_bytes) > self.cfg.max_image_bytes {
                    return Err((
                        phase,
                        WireError::BadSize(format!(
                            "the image set exceeds {} bytes",
                            self.cfg.max_image_bytes
                        )),
                    ));
                }
                self.push(AgentAction::StoreFinal(batch));
                Ok(State::Receiving(r))
            }
            (s, Frame::Control(body)) => {
                let msg: ToAgent = frame::decode(&body).map_err(|e| (phase, e))?;
                self.message(s, now, msg).map_err(|e| (phase, e))
            }
            (State::Receiving(r), f) if r.file_left > 0 => {
                Err(unexpected(&["file data"], f.name()))
            }
            (_, f) => Err(unexpected(&["a control message"], f.name())),
        }
    }

    /// A control message before the restore.
    fn message(&mut self, state: State, now: Instant, msg: ToAgent) -> Result<State, WireError> {
        match (state, msg) {
            (State::PreCopy, ToAgent::Layout { owner, ranges }) => {
                self.push(AgentAction::Layout { owner, ranges });
                Ok(State::PreCopy)
            }
            (State::PreCopy, ToAgent::RoundEnd { round }) => {
                info!(round, pages = self.precopy_pages, "pre-copy round stored");
                // The driver stores pages as they come: by now all of this round's are in.
                self.send(FromAgent::RoundAck {
                    round,
                    pages_held: self.precopy_pages,
                });
                Ok(State::PreCopy)
            }
            (State::PreCopy, ToAgent::Frozen) => {
                // The source is frozen: record, then take the address (blocked first).
                self.claimed = true;
                self.journal_gate = Some(JournalGate::Claim);
                self.push(AgentAction::Journal(AgentPhase::Claimed));
                Ok(State::Receiving(Receiving {
                    final_pages: false,
                    file_left: 0,
                    files: 0,
                    file_bytes: 0,
                    final_count: 0,
                    final_bytes: 0,
                }))
            }
            (State::Receiving(mut r), ToAgent::File { name, size })
                if !r.final_pages && r.file_left == 0 =>
            {
                frame::check_file_name(&name)?;
                r.files += 1;
                r.file_bytes = r.file_bytes.saturating_add(size);
                if r.files > MAX_FILES || r.file_bytes > self.cfg.max_image_bytes {
                    return Err(WireError::BadSize(format!(
                        "image set exceeds the limits ({} files, {} bytes; at most {MAX_FILES} \
                         files, {} bytes)",
                        r.files, r.file_bytes, self.cfg.max_image_bytes
                    )));
                }
                r.file_left = size;
                self.push(AgentAction::CreateFile { name, size });
                Ok(State::Receiving(r))
            }
            (State::Receiving(mut r), ToAgent::FinalPages)
                if !r.final_pages && r.file_left == 0 =>
            {
                r.final_pages = true;
                self.push(AgentAction::StartRebuild);
                Ok(State::Receiving(r))
            }
            (
                State::Receiving(r),
                ToAgent::ImagesDone {
                    files,
                    bytes,
                    final_pages,
                },
            ) if r.final_pages && r.file_left == 0 => {
                if files != r.files || bytes != r.file_bytes || final_pages != r.final_count {
                    return Err(WireError::BadSize(format!(
                        "source announced {files} files / {bytes} bytes / {final_pages} final \
                         pages, received {} / {} / {}",
                        r.files, r.file_bytes, r.final_count
                    )));
                }
                info!(files, bytes, final_pages, "image set received");
                self.images_done_at = Some(now);
                self.push(AgentAction::FinishRebuild);
                self.rebuilt = false;
                Ok(State::Rebuilding)
            }
            (_, ToAgent::Abort { reason, .. }) => {
                Ok(self.abort(now, format!("source aborted: {reason}")))
            }
            (s, m) => Err(WireError::Unexpected {
                expected: expected_in(&s),
                got: m.name(),
            }),
        }
    }

    fn start_restore(&mut self) -> State {
        self.journal_gate = Some(JournalGate::Restore);
        self.push(AgentAction::Journal(AgentPhase::Restoring { pid: None }));
        State::Restoring { started: false }
    }

    fn commit(&mut self, now: Instant) -> State {
        let pid = self.pid.unwrap_or(-1);
        self.commit_at = Some(now);
        self.deadline = None;
        // Recorded first: from here on, a restarted agent finishes going live.
        self.journal_gate = Some(JournalGate::Commit);
        self.push(AgentAction::Journal(AgentPhase::Committed { pid }));
        State::GoingLive
    }

    fn enter_in_doubt(&mut self, now: Instant, why: &str) -> State {
        warn!(
            "in doubt ({why}): the restored copy stays stopped and unreachable until the source \
             resolves the migration, at most {} s",
            self.cfg.timeouts.in_doubt.as_secs()
        );
        self.deadline = Some(now + self.cfg.timeouts.in_doubt);
        State::InDoubt
    }

    /// Undoes the migration because the source (or a timeout) says so: no `Failed` is sent.
    fn abort(&mut self, _now: Instant, reason: String) -> State {
        info!("undoing: {reason}");
        self.failure = None;
        self.deadline = None;
        self.abort_reason = Some(reason);
        self.undo();
        State::Undoing
    }

    /// Asks for the undo, once the host changes in flight (the address claim, CRIU's restore)
    /// have returned: undone before they land, they would stay.
    fn undo(&mut self) {
        self.undo_after = true;
        if self.claiming || self.restoring {
            info!("waiting for the host changes in flight to return before undoing");
        }
        self.undo_if_due();
    }

    fn undo_if_due(&mut self) {
        if self.undo_after && !self.claiming && !self.restoring {
            self.undo_after = false;
            self.push(AgentAction::Undo);
        }
    }

    /// Undoes the migration after a failure here; the source is told once it is undone.
    fn fail(&mut self, _now: Instant, f: Failure) -> State {
        error!(phase = %f.phase, "migration failed: {}", f.message);
        self.deadline = None;
        self.failure = Some(f);
        self.undo();
        State::Undoing
    }

    fn end(&mut self, outcome: AgentOutcome) -> State {
        self.deadline = None;
        let resolution = outcome.resolution();
        for request in std::mem::take(&mut self.pending_replies) {
            self.push(AgentAction::Reply {
                request,
                resolution: resolution.clone(),
            });
        }
        self.push(AgentAction::Tombstone(outcome.clone()));
        self.outcome = Some(outcome);
        State::Ending
    }
}

fn expected_in(s: &State) -> &'static [&'static str] {
    match s {
        State::PreCopy => &["layout", "page batch", "round_end", "frozen"],
        State::Receiving(r) if r.file_left > 0 => &["file data"],
        State::Receiving(r) if !r.final_pages => &["file", "final_pages"],
        State::Receiving(_) => &["page batch", "images_done"],
        _ => &["nothing until restored"],
    }
}
