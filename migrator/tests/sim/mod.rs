//! A simulated pair: the real [`SourceMachine`] and [`AgentMachine`]s, driven in memory against a
//! model of everything else (CRIU and the service's copies, the proxy, both hosts' network, the
//! journals, the link and QUIC's behaviour on it), in virtual time. Like quinn's `tests/util.rs`
//! `Pair`, without sockets or processes, so that every path and every single fault at every
//! step runs in milliseconds.
//!
//! The model is deliberately small but keeps what the invariants are about: which copies of the
//! service exist and in what state (running, frozen, stopped, dead), whether each host has the
//! service address configured and whether it filters it (the source's locks, the
//! agent's block on the destination), where the LAN sends the address's packets (the last
//! announcement), whether the proxy holds or releases client bytes, and whether a copy that
//! clients talked to is ever thrown away. [`Sim::check`] asserts the invariants after every
//! event; [`Sim::final_check`] asserts the end state.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tether_migrator::machine::agent::{
    AgentAction, AgentConfig, AgentEvent, AgentMachine, AgentOutcome, AgentPhase, AgentStep,
    AgentTimeouts, RestoreInfo,
};
use tether_migrator::machine::source::{
    DumpEnd, DumpEvent, GateConfig, GateEvent, PauseInfo, ResumeInfo, SourceAction, SourceConfig,
    SourceEvent, SourceMachine, SourcePhase, Step, Timeouts,
};
use tether_migrator::machine::{ConnectionEnd, PortError};
use tether_migrator::policy;
use tether_migrator::protocol::frame::{self, Frame, HEADER};
use tether_migrator::protocol::stats::{FinalReport, ImagesSent, RoundScan};
use tether_migrator::protocol::{
    Decision, ErrorCode, FromAgent, MigrationId, PageBatch, Resolution, ToAgent, PAGE,
};
use tether_migrator::report::Outcome;

/// One-way latency of the link.
const LATENCY: Duration = Duration::from_micros(500);
/// QUIC's idle timeout: a peer that vanished is noticed this late.
const IDLE: Duration = Duration::from_secs(3);
/// How long a connect attempt to an unreachable agent takes to fail.
const CONNECT_FAIL: Duration = Duration::from_secs(1);
/// The proxy's maximum hold.
const MAX_HOLD: Duration = Duration::from_secs(5);
/// A fresh process's start-up before it acts.
const RESTART: Duration = Duration::from_millis(50);

/// A copy of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// No such copy.
    None,
    /// Running (serving, if reachable).
    Running,
    /// Frozen by CRIU (the source, during the dump).
    Frozen,
    /// Restored and stopped (the destination, before the commit).
    Stopped,
    /// Killed.
    Dead,
}

impl Copy {
    fn exists(self) -> bool {
        matches!(self, Copy::Running | Copy::Frozen | Copy::Stopped)
    }
}

/// CRIU's dump on the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Criu {
    Idle,
    /// Waiting at pre-dump (tree running).
    PreFreeze,
    /// Waiting at the freeze point (tree frozen).
    Frozen,
    /// Dumping (tree frozen), between points.
    Dumping,
    /// Waiting at post-dump (tree frozen, images complete).
    Held,
    /// Told to end the tree.
    Ended,
}

/// Which host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Host {
    Src,
    Dst,
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// `tether migrate` killed; restarted (recovery) after the given delay.
    KillSource(Duration),
    /// `tether agent` killed; restarted after the given delay.
    KillAgent(Duration),
    /// Both killed; the one named first restarts first (the other 30 s later).
    KillBoth(Host),
    /// The link drops everything for the given time.
    LinkCut(Duration),
    /// The link delays everything by the given time (connections stay up).
    LinkStall(Duration),
    /// The next message on the wire is lost (and with it the connection, as QUIC would have it).
    DropMessage,
    /// The next message on the wire arrives twice.
    DuplicateMessage,
    /// The next port action fails.
    FailPort,
    /// The n-th port action of the run (either side) fails.
    FailPortAt(usize),
    /// The n-th message on the wire is lost (and with it its connection).
    DropMessageAt(usize),
    /// The n-th message on the wire arrives twice.
    DuplicateMessageAt(usize),
}

impl Fault {
    /// Every single fault the suite injects at every step.
    pub fn all() -> Vec<Fault> {
        vec![
            Fault::KillSource(RESTART),
            Fault::KillSource(Duration::from_secs(20)),
            Fault::KillAgent(RESTART),
            Fault::KillAgent(Duration::from_secs(20)),
            Fault::KillBoth(Host::Src),
            Fault::KillBoth(Host::Dst),
            Fault::LinkCut(Duration::from_secs(2)),
            Fault::LinkCut(Duration::from_secs(8)),
            Fault::LinkStall(Duration::from_millis(2500)),
            Fault::DropMessage,
            Fault::DuplicateMessage,
            Fault::FailPort,
        ]
    }
}

/// What a scenario is made of.
#[derive(Debug, Clone)]
pub struct Setup {
    /// Pre-copy (else stop-and-copy).
    pub precopy: bool,
    /// A proxy in front of the service.
    pub proxy: bool,
    /// The proxy redirects to a new backend.
    pub redirect: bool,
    /// Pages the service has.
    pub pages: u64,
    /// How long the frozen transfer takes.
    pub transfer: Duration,
    /// --max-frozen.
    pub max_frozen: Duration,
}

impl Default for Setup {
    fn default() -> Setup {
        Setup {
            precopy: true,
            proxy: true,
            redirect: false,
            pages: 4096,
            transfer: Duration::from_millis(30),
            max_frozen: Duration::from_secs(4),
        }
    }
}

#[derive(Debug, Clone)]
enum Item {
    /// A frame reaches the agent on a connection.
    ToAgent(u64, Frame),
    /// A message reaches the source on a connection.
    ToSource(u64, FromAgent),
    /// A connection ends, as seen by the source / by the agent.
    LostAtSource(u64, ConnectionEnd),
    LostAtAgent(u64, ConnectionEnd),
    /// A port of the source finishes.
    Source(u64, SourceEvent),
    /// A port of the agent finishes (for the machine of that migration).
    Agent(u64, AgentEvent),
    /// A connect attempt succeeds or fails.
    Connected(u64, u64),
    ConnectFailed(u64),
    Restart(Host),
    HealLink,
    EndStall,
    /// The proxy's pause of a given epoch reaches its maximum hold.
    HoldExpiry(u64),
    /// CRIU's restore on the destination finishes (if the agent of that epoch still lives).
    RestoreDone(u64, Result<RestoreInfo, PortError>),
    /// The destination's address claim lands (block, then address), whatever became of the
    /// agent that asked for it.
    ClaimDone(u64, bool),
    /// CRIU, told to end the source copy, has ended it (or failed to), whatever became of the
    /// `tether migrate` that told it.
    CopyEnded(u64, bool),
}

#[derive(Debug, Clone)]
struct Conn {
    alive: bool,
    /// The agent-side machine this connection belongs to, once routed.
    migration: Option<MigrationId>,
    /// The connection carries a `Resolve` (its answer is a reply).
    resolve: bool,
}

/// The simulated world.
pub struct Sim {
    pub setup: Setup,
    pub now: Instant,
    start: Instant,
    seq: u64,
    queue: BTreeMap<(Instant, u64), Item>,
    pub id: MigrationId,
    // processes
    source: Option<SourceMachine>,
    /// Incarnation of `tether migrate`: events of a dead one are dropped.
    src_epoch: u64,
    agents: HashMap<MigrationId, AgentMachine>,
    agent_alive: bool,
    agent_epoch: u64,
    src_conn: Option<u64>,
    /// Each migration's main connection, on the agent's side.
    main_conn: HashMap<MigrationId, u64>,
    conns: HashMap<u64, Conn>,
    next_conn: u64,
    // the world
    pub src_copy: Copy,
    pub dst_copy: Copy,
    /// The source's owned lock (lifted by the kernel when `tether migrate` dies).
    pub src_lock_owned: bool,
    /// The source's kept lock.
    pub src_lock_kept: bool,
    pub dst_blocked: bool,
    pub src_address: bool,
    pub dst_address: bool,
    pub src_images: bool,
    /// Where the LAN sends the service address's packets.
    pub arp: Host,
    criu: Criu,
    pub proxy_paused: bool,
    proxy_epoch: u64,
    pub proxy_redirected: bool,
    /// The destination copy ran and was reachable at some point.
    pub dst_went_live: bool,
    /// The source copy ran again after having been frozen (rollback or local restore).
    pub src_came_back: bool,
    // journals
    src_journal: Option<(SourcePhase, Option<String>)>,
    agent_journal: HashMap<MigrationId, AgentPhase>,
    tombstones: HashMap<MigrationId, AgentOutcome>,
    // faults
    fault: Option<(usize, Fault)>,
    pub steps: usize,
    link_down_until: Option<Instant>,
    stall_until: Option<Instant>,
    drop_next: bool,
    dup_next: bool,
    fail_port: bool,
    /// Port actions performed so far (both sides).
    pub port_actions: usize,
    /// Messages put on the wire so far.
    pub messages: usize,
    indexed: Option<Fault>,
    /// Results of `tether migrate` incarnations, in order.
    pub results: Vec<Outcome>,
    /// The source's and the agent's states when the fault struck.
    pub fault_at: Option<(String, String)>,
    /// Violations seen.
    pub violations: Vec<String>,
    pub log: Vec<String>,
    round_pages: Vec<u64>,
}

impl Sim {
    /// A world with the service running on the source and no fault.
    pub fn new(setup: Setup) -> Sim {
        let now = Instant::now();
        let id: MigrationId = "m-sim".parse().expect("id");
        Sim {
            setup,
            now,
            start: now,
            seq: 0,
            queue: BTreeMap::new(),
            id,
            source: None,
            src_epoch: 0,
            agents: HashMap::new(),
            agent_alive: true,
            agent_epoch: 0,
            src_conn: None,
            main_conn: HashMap::new(),
            conns: HashMap::new(),
            next_conn: 1,
            src_copy: Copy::Running,
            dst_copy: Copy::None,
            src_lock_owned: false,
            src_lock_kept: false,
            dst_blocked: false,
            src_address: true,
            dst_address: false,
            src_images: false,
            arp: Host::Src,
            criu: Criu::Idle,
            proxy_paused: false,
            proxy_epoch: 0,
            proxy_redirected: false,
            dst_went_live: false,
            src_came_back: false,
            src_journal: None,
            agent_journal: HashMap::new(),
            tombstones: HashMap::new(),
            fault: None,
            steps: 0,
            link_down_until: None,
            stall_until: None,
            drop_next: false,
            dup_next: false,
            fail_port: false,
            port_actions: 0,
            messages: 0,
            indexed: None,
            results: Vec::new(),
            fault_at: None,
            violations: Vec::new(),
            log: Vec::new(),
            round_pages: Vec::new(),
        }
    }

    /// Injects `fault` just before step `step`.
    pub fn with_fault(mut self, step: usize, fault: Fault) -> Sim {
        match fault {
            Fault::FailPortAt(_) | Fault::DropMessageAt(_) | Fault::DuplicateMessageAt(_) => {
                self.indexed = Some(fault)
            }
            _ => self.fault = Some((step, fault)),
        }
        self
    }

    fn source_config(&self) -> SourceConfig {
        SourceConfig {
            id: self.id.clone(),
            service_addr: "10.77.0.100/24".parse().expect("addr"),
            source_pid: 100,
            destination: "dst".into(),
            precopy: self.setup.precopy.then(|| policy::Config {
                downtime_limit: Duration::from_millis(300),
                max_rounds: 6,
                ..Default::default()
            }),
            gate: self.setup.proxy.then_some(GateConfig {
                redirect: self.setup.redirect,
            }),
            max_frozen: self.setup.max_frozen,
            container: None,
            timeouts: Timeouts {
                resolve: Duration::from_secs(60),
                ..Default::default()
            },
        }
    }

    fn agent_config() -> AgentConfig {
        AgentConfig {
            max_image_bytes: 1 << 40,
            timeouts: AgentTimeouts::default(),
        }
    }

    fn at(&mut self, delay: Duration, item: Item) {
        self.seq += 1;
        self.queue.insert((self.now + delay, self.seq), item);
    }

    fn note(&mut self, s: String) {
        let t = (self.now - self.start).as_secs_f64() * 1e3;
        self.log.push(format!("{t:10.3} ms  {s}"));
    }

    /// Runs the migration to the end (both sides done, every timer run out, restarts done)
    /// and returns the number of steps.
    pub fn run(&mut self) -> usize {
        self.source =
            Some(SourceMachine::new(self.source_config(), self.now).expect("valid source config"));
        self.drain_source();
        self.step_until_quiet(true);
        self.steps
    }

    fn next_timer(&self) -> Option<(Instant, Option<MigrationId>)> {
        let mut best: Option<(Instant, Option<MigrationId>)> = None;
        if let Some(t) = self.source.as_ref().and_then(|s| s.poll_timeout()) {
            best = Some((t, None));
        }
        if self.agent_alive {
            for (id, m) in &self.agents {
                if let Some(t) = m.poll_timeout() {
                    if best.as_ref().is_none_or(|(b, _)| t < *b) {
                        best = Some((t, Some(id.clone())));
                    }
                }
            }
        }
        best
    }

    fn tick(&mut self, who: Option<MigrationId>) {
        match who {
            None => self.source_event(SourceEvent::Tick),
            Some(id) => self.agent_event(&id, AgentEvent::Tick),
        }
    }

    fn inject_fault(&mut self) {
        let Some((step, fault)) = self.fault else {
            return;
        };
        if self.steps != step {
            return;
        }
        self.fault = None;
        self.fault_at = Some(self.states());
        self.note(format!("FAULT {fault:?}"));
        match fault {
            Fault::KillSource(after) => {
                self.kill_source();
                self.at(after, Item::Restart(Host::Src));
            }
            Fault::KillAgent(after) => {
                self.kill_agent();
                self.at(after, Item::Restart(Host::Dst));
            }
            Fault::KillBoth(first) => {
                self.kill_source();
                self.kill_agent();
                let (a, b) = match first {
                    Host::Src => (Host::Src, Host::Dst),
                    Host::Dst => (Host::Dst, Host::Src),
                };
                self.at(RESTART, Item::Restart(a));
                self.at(Duration::from_secs(30), Item::Restart(b));
            }
            Fault::LinkCut(d) => {
                self.link_down_until = Some(self.now + d);
                self.at(d, Item::HealLink);
                // Every connection dies of silence.
                let ids: Vec<u64> = self.conns.keys().copied().collect();
                for c in ids {
                    self.break_conn(c, IDLE);
                }
            }
            Fault::LinkStall(d) => {
                self.stall_until = Some(self.now + d);
                self.at(d, Item::EndStall);
            }
            Fault::DropMessage => self.drop_next = true,
            Fault::DuplicateMessage => self.dup_next = true,
            Fault::FailPort => self.fail_port = true,
            Fault::FailPortAt(_) | Fault::DropMessageAt(_) | Fault::DuplicateMessageAt(_) => {}
        }
    }

    fn kill_source(&mut self) {
        if self.source.take().is_none() {
            return;
        }
        self.src_epoch += 1;
        // CRIU reads EOF at its next notification: before the commit answer it rolls back.
        match self.criu {
            Criu::PreFreeze => self.criu = Criu::Idle,
            Criu::Frozen | Criu::Dumping | Criu::Held => {
                self.criu = Criu::Idle;
                self.src_copy = Copy::Running;
                self.src_came_back = true;
            }
            Criu::Idle | Criu::Ended => {}
        }
        // The owned lock dies with the process that took it.
        self.src_lock_owned = false;
        if let Some(c) = self.src_conn.take() {
            self.break_conn(c, IDLE);
        }
        let resolving: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alive)
            .map(|(k, _)| *k)
            .collect();
        for c in resolving {
            self.break_conn(c, IDLE);
        }
    }

    fn kill_agent(&mut self) {
        if !self.agent_alive {
            return;
        }
        self.agent_alive = false;
        self.agent_epoch += 1;
        self.agents.clear();
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for c in ids {
            self.break_conn(c, IDLE);
        }
    }

    /// Ends a connection: both ends notice after `after` (the silence of a dead peer).
    fn break_conn(&mut self, c: u64, after: Duration) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if !conn.alive {
            return;
        }
        conn.alive = false;
        let end = ConnectionEnd {
            reason: "timed out".into(),
            by_peer: false,
        };
        self.at(after, Item::LostAtSource(c, end.clone()));
        self.at(after, Item::LostAtAgent(c, end));
    }

    /// Closes a connection on purpose from one end: the other learns at once, with the reason.
    fn close_conn(&mut self, c: u64, from: Host, by_peer: bool, reason: &str) {
        let Some(conn) = self.conns.get_mut(&c) else {
            return;
        };
        if !conn.alive {
            return;
        }
        conn.alive = false;
        let end = ConnectionEnd {
            reason: reason.into(),
            by_peer,
        };
        let delay = self.wire_delay();
        if self.link_down_until.is_some() {
            // The close is lost: the other end notices the silence.
            let end = ConnectionEnd {
                reason: "timed out".into(),
                by_peer: false,
            };
            match from {
                Host::Src => self.at(IDLE, Item::LostAtAgent(c, end)),
                Host::Dst => self.at(IDLE, Item::LostAtSource(c, end)),
            }
            return;
        }
        match from {
            Host::Src => self.at(delay, Item::LostAtAgent(c, end)),
            Host::Dst => self.at(delay, Item::LostAtSource(c, end)),
        }
    }

    fn wire_delay(&self) -> Duration {
        match self.stall_until {
            Some(t) if t > self.now => (t - self.now) + LATENCY,
            _ => LATENCY,
        }
    }

    /// Puts a message on the wire of connection `c`.
    fn wire(&mut self, c: u64, item: Item) {
        let alive = self.conns.get(&c).is_some_and(|k| k.alive);
        if !alive || self.link_down_until.is_some() {
            return;
        }
        let n = self.messages;
        self.messages += 1;
        match self.indexed {
            Some(Fault::DropMessageAt(k)) if k == n => {
                self.fault_at = Some(self.states());
                self.drop_next = true
            }
            Some(Fault::DuplicateMessageAt(k)) if k == n => {
                self.fault_at = Some(self.states());
                self.dup_next = true
            }
            _ => {}
        }
        if self.drop_next {
            self.drop_next = false;
            self.note(format!("dropped {item:?}"));
            self.break_conn(c, IDLE);
            return;
        }
        let delay = self.wire_delay();
        if self.dup_next {
            self.dup_next = false;
            self.note("duplicated the next message".into());
            self.at(delay, item.clone());
        }
        self.at(delay, item);
    }

    /// The source's and the agent's state names now (`-` for none).
    pub fn states(&self) -> (String, String) {
        let src = self
            .source
            .as_ref()
            .map_or("-", |s| s.state_name())
            .to_string();
        let agt = self
            .agents
            .get(&self.id)
            .map_or("-", |m| m.state_name())
            .to_string();
        (src, agt)
    }

    fn port_fails(&mut self) -> bool {
        let n = self.port_actions;
        self.port_actions += 1;
        if self.indexed == Some(Fault::FailPortAt(n)) {
            self.fault_at = Some(self.states());
            self.note(format!("FAULT port action #{n} fails"));
            return true;
        }
        std::mem::take(&mut self.fail_port)
    }

    fn deliver(&mut self, item: Item) {
        match item {
            Item::ToAgent(c, f) => self.frame_at_agent(c, f),
            Item::ToSource(c, m) => {
                if self.src_conn == Some(c) {
                    self.source_event(SourceEvent::Message(m));
                }
            }
            Item::LostAtSource(c, end) => {
                if self.src_conn == Some(c) {
                    self.src_conn = None;
                    self.source_event(SourceEvent::ConnectionLost(end));
                }
            }
            Item::LostAtAgent(c, end) => {
                if !self.agent_alive {
                    return;
                }
                let Some(conn) = self.conns.get(&c) else {
                    return;
                };
                if conn.resolve {
                    return;
                }
                if let Some(id) = conn.migration.clone() {
                    self.agent_event(&id, AgentEvent::ConnectionLost(end));
                }
            }
            Item::Source(epoch, e) => {
                if epoch == self.src_epoch {
                    self.source_event(e);
                }
            }
            Item::Agent(epoch, e) => {
                if epoch == self.agent_epoch {
                    let id = self.id.clone();
                    self.agent_event(&id, e);
                }
            }
            Item::Connected(epoch, c) => {
                if epoch == self.src_epoch && self.conns.get(&c).is_some_and(|k| k.alive) {
                    self.src_conn = Some(c);
                    self.source_event(SourceEvent::Connected);
                }
            }
            Item::ConnectFailed(epoch) => {
                if epoch == self.src_epoch {
                    self.source_event(SourceEvent::ConnectionLost(ConnectionEnd {
                        reason: "cannot connect".into(),
                        by_peer: false,
                    }));
                }
            }
            Item::Restart(Host::Src) => self.restart_source(),
            Item::Restart(Host::Dst) => self.restart_agent(),
            Item::HealLink => self.link_down_until = None,
            Item::EndStall => self.stall_until = None,
            Item::CopyEnded(epoch, ok) => {
                if ok {
                    self.src_copy = Copy::Dead;
                }
                if epoch == self.src_epoch {
                    let r = if ok {
                        Ok(DumpEnd::default())
                    } else {
                        Err(PortError::new(
                            ErrorCode::Internal,
                            "injected failure of criu's end",
                        ))
                    };
                    self.source_event(SourceEvent::Dump(DumpEvent::Ended(r)));
                }
            }
            Item::ClaimDone(epoch, ok) => {
                if ok {
                    self.dst_blocked = true;
                    self.dst_address = true;
                }
                if epoch == self.agent_epoch {
                    let id = self.id.clone();
                    let r = if ok {
                        Ok(())
                    } else {
                        Err(PortError::new(
                            ErrorCode::Internal,
                            "injected failure of the address",
                        ))
                    };
                    self.agent_event(&id, AgentEvent::Prepared(r));
                }
            }
            Item::RestoreDone(epoch, r) => {
                if epoch != self.agent_epoch {
                    // The agent died during the restore: CRIU fails at its next notification
                    // and kills what it restored.
                    return;
                }
                if r.is_ok() {
                    self.dst_copy = Copy::Stopped;
                }
                let id = self.id.clone();
                self.agent_event(&id, AgentEvent::Restored(r));
            }
            Item::HoldExpiry(epoch) => {
                if epoch == self.proxy_epoch && self.proxy_paused {
                    // The proxy resumes by itself toward the backend it had before the pause.
                    self.note("proxy: maximum hold reached, resuming".into());
                    self.proxy_paused = false;
                    self.proxy_redirected = false;
                }
            }
        }
    }

    fn restart_source(&mut self) {
        self.src_epoch += 1;
        let Some((phase, table)) = self.src_journal.clone() else {
            self.note("source restarted: nothing to recover".into());
            return;
        };
        self.note(format!("source restarted: recovering from {phase:?}"));
        let mut cfg = self.source_config();
        cfg.precopy = None;
        self.source = Some(SourceMachine::recover(cfg, phase, table, self.now));
        self.drain_source();
    }

    fn restart_agent(&mut self) {
        self.agent_alive = true;
        self.agent_epoch += 1;
        let records: Vec<(MigrationId, AgentPhase)> = self
            .agent_journal
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        self.note(format!("agent restarted with {} record(s)", records.len()));
        for (id, phase) in records {
            let m = AgentMachine::recover(
                Self::agent_config(),
                "10.77.0.100/24".parse().expect("addr"),
                phase,
                self.now,
            );
            self.agents.insert(id.clone(), m);
            self.drain_agent(&id);
        }
    }

    // ---- the source ----

    fn source_event(&mut self, e: SourceEvent) {
        let Some(s) = self.source.as_mut() else {
            return;
        };
        let short = format!("{e:?}");
        let before = s.state_name();
        s.handle(self.now, e);
        let after = s.state_name();
        self.note(format!(
            "src {before} -> {after}: {}",
            &short[..short.len().min(100)]
        ));
        self.drain_source();
    }

    fn src_later(&mut self, delay: Duration, e: SourceEvent) {
        let epoch = self.src_epoch;
        self.at(delay, Item::Source(epoch, e));
    }

    fn drain_source(&mut self) {
        loop {
            let Some(s) = self.source.as_mut() else {
                return;
            };
            let Some(a) = s.poll_action() else {
                if let Some(r) = s.result() {
                    let outcome = r.outcome;
                    let msg = format!("source done: {outcome:?} {:?}", r.failure);
                    self.note(msg);
                    self.results.push(outcome);
                    self.source = None;
                    if let Some(c) = self.src_conn.take() {
                        self.close_conn(c, Host::Src, false, "done");
                    }
                }
                return;
            };
            self.source_action(a);
        }
    }

    fn src_fail(&self, what: &str) -> PortError {
        PortError::new(ErrorCode::Internal, format!("injected failure of {what}"))
    }

    fn source_action(&mut self, a: SourceAction) {
        let fail = !matches!(
            a,
            SourceAction::Send(_)
                | SourceAction::Connect
                | SourceAction::Abort { .. }
                | SourceAction::Close
        ) && self.port_fails();
        match a {
            SourceAction::Connect => {
                let epoch = self.src_epoch;
                if self.agent_alive && self.link_down_until.is_none() {
                    let c = self.next_conn;
                    self.next_conn += 1;
                    self.conns.insert(
                        c,
                        Conn {
                            alive: true,
                            migration: None,
                            resolve: false,
                        },
                    );
                    let d = self.wire_delay() * 2;
                    self.at(d, Item::Connected(epoch, c));
                } else {
                    self.at(CONNECT_FAIL, Item::ConnectFailed(epoch));
                }
            }
            SourceAction::Send(m) => {
                if let Some(c) = self.src_conn {
                    let f = encode_frame(&m);
                    self.wire(c, Item::ToAgent(c, f));
                }
            }
            SourceAction::Abort { reason, .. } => {
                if let Some(c) = self.src_conn.take() {
                    self.close_conn(c, Host::Src, true, &reason);
                }
            }
            SourceAction::Close => {
                if let Some(c) = self.src_conn.take() {
                    self.close_conn(c, Host::Src, false, "closed");
                }
            }
            SourceAction::SendRound { round } => {
                let pages = self.round_pages(round);
                if fail {
                    self.src_later(
                        Duration::from_millis(1),
                        SourceEvent::RoundScanned(Err(self.src_fail("the scan"))),
                    );
                    return;
                }
                if let Some(c) = self.src_conn {
                    let f = encode_frame(&ToAgent::Layout {
                        owner: 1,
                        ranges: vec![(0, 1 << 30)],
                    });
                    self.wire(c, Item::ToAgent(c, f));
                    let data = vec![7u8; PAGE];
                    let b = PageBatch::encode(1, &[(0x1000, Some(&data))]);
                    self.wire(c, Item::ToAgent(c, Frame::Pages(b[HEADER..].to_vec())));
                }
                // 1 Gbit/s.
                let took = Duration::from_secs_f64(pages as f64 * PAGE as f64 / 125e6)
                    + Duration::from_millis(2);
                self.src_later(
                    took,
                    SourceEvent::RoundScanned(Ok(RoundScan {
                        pages_scanned: self.setup.pages,
                        pages_sent: pages,
                        pages_zero: 0,
                        bytes: pages * PAGE as u64,
                        scan_ms: 2.0,
                    })),
                );
            }
            SourceAction::Throttle { .. } => self.src_done(Step::Throttle, fail),
            SourceAction::ReleaseThrottle => self.src_done(Step::ReleaseThrottle, fail),
            SourceAction::StartDump => {
                if fail {
                    self.src_later(
                        Duration::from_millis(1),
                        SourceEvent::Dump(DumpEvent::Failed(self.src_fail("criu dump"))),
                    );
                    return;
                }
                self.criu = Criu::PreFreeze;
                self.src_later(
                    Duration::from_millis(30),
                    SourceEvent::Dump(DumpEvent::PreFreeze),
                );
            }
            SourceAction::ProceedDump => match self.criu {
                Criu::PreFreeze => {
                    if fail {
                        self.criu = Criu::Idle;
                        self.src_later(
                            Duration::from_millis(1),
                            SourceEvent::Dump(DumpEvent::Failed(self.src_fail("the freeze"))),
                        );
                        return;
                    }
                    self.criu = Criu::Frozen;
                    self.src_copy = Copy::Frozen;
                    self.src_images = false;
                    self.src_later(
                        Duration::from_millis(5),
                        SourceEvent::Dump(DumpEvent::Frozen),
                    );
                }
                Criu::Frozen => {
                    if fail {
                        // CRIU fails mid-dump and rolls back by itself.
                        self.criu = Criu::Idle;
                        self.src_copy = Copy::Running;
                        self.src_came_back = true;
                        self.src_later(
                            Duration::from_millis(1),
                            SourceEvent::Dump(DumpEvent::Failed(self.src_fail("the dump"))),
                        );
                        return;
                    }
                    if !self.src_locked() {
                        let t = (self.now - self.start).as_secs_f64() * 1e3;
                        self.violations
                            .push(format!("{t:.1} ms: CRIU dumps the sockets unlocked"));
                    }
                    self.criu = Criu::Dumping;
                    let epoch = self.src_epoch;
                    // The images are complete at post-dump.
                    self.src_images = true;
                    self.at(
                        Duration::from_millis(50),
                        Item::Source(epoch, SourceEvent::Dump(DumpEvent::Held)),
                    );
                    self.criu = Criu::Held;
                }
                other => panic!("ProceedDump with CRIU at {other:?}"),
            },
            SourceAction::CommitDump => {
                assert_eq!(self.criu, Criu::Held, "CommitDump without a held dump");
                self.criu = Criu::Ended;
                // The answer is written at once; CRIU ends the copy a little later (it may fail
                // to: the copy then stays frozen and locked until it is killed).
                self.src_later(Duration::ZERO, SourceEvent::Dump(DumpEvent::CommitAnswered));
                let epoch = self.src_epoch;
                self.at(Duration::from_millis(5), Item::CopyEnded(epoch, !fail));
            }
            SourceAction::RollbackDump => {
                let was = self.criu;
                self.criu = Criu::Idle;
                if matches!(was, Criu::Frozen | Criu::Dumping | Criu::Held) {
                    self.src_copy = Copy::Running;
                    self.src_came_back = true;
                }
                let r = if fail {
                    Err(self.src_fail("criu's rollback"))
                } else {
                    Ok(())
                };
                self.src_later(
                    Duration::from_millis(3),
                    SourceEvent::Dump(DumpEvent::RolledBack(r)),
                );
            }
            SourceAction::Pause => {
                if fail {
                    self.src_later(
                        Duration::from_millis(1),
                        SourceEvent::Gate(GateEvent::Paused(Err(self.src_fail("the pause")))),
                    );
                    return;
                }
                self.proxy_paused = true;
                self.proxy_epoch += 1;
                let e = self.proxy_epoch;
                self.at(MAX_HOLD, Item::HoldExpiry(e));
                self.src_later(
                    Duration::from_millis(1),
                    SourceEvent::Gate(GateEvent::Paused(Ok(PauseInfo {
                        quiesce_ms: 1.0,
                        tcp_flows: 4,
                        udp_flows: 1,
                        hold_left: MAX_HOLD - Duration::from_millis(1),
                    }))),
                );
            }
            SourceAction::Redirect => {
                let r = if fail {
                    Err(self.src_fail("the redirect"))
                } else {
                    self.proxy_redirected = true;
                    Ok(())
                };
                self.src_later(
                    Duration::from_millis(1),
                    SourceEvent::Gate(GateEvent::Redirected(r)),
                );
            }
            SourceAction::Resume => {
                let r = if fail {
                    Err(self.src_fail("the resume"))
                } else {
                    let expired = !self.proxy_paused;
                    self.proxy_paused = false;
                    if self.setup.redirect {
                        self.proxy_redirected = true;
                    }
                    Ok(ResumeInfo {
                        held_ms: 100.0,
                        released_datagrams: 0,
                        expired,
                    })
                };
                self.src_later(
                    Duration::from_millis(1),
                    SourceEvent::Gate(GateEvent::Resumed(r)),
                );
            }
            SourceAction::UndoGate => {
                let r = if fail {
                    Err(self.src_fail("the undo"))
                } else {
                    self.proxy_paused = false;
                    self.proxy_redirected = false;
                    Ok(())
                };
                self.src_later(
                    Duration::from_millis(1),
                    SourceEvent::Gate(GateEvent::Undone(r)),
                );
            }
            SourceAction::SendImages => {
                if fail {
                    self.src_later(
                        Duration::from_millis(1),
                        SourceEvent::ImagesSent(Err(self.src_fail("reading the dump"))),
                    );
                    return;
                }
                if let Some(c) = self.src_conn {
                    let f = encode_frame(&ToAgent::File {
                        name: "inventory.img".into(),
                        size: 4,
                    });
                    self.wire(c, Item::ToAgent(c, f));
                    self.wire(c, Item::ToAgent(c, Frame::Data(vec![1, 2, 3, 4])));
                    let f = encode_frame(&ToAgent::FinalPages);
                    self.wire(c, Item::ToAgent(c, f));
                    let data = vec![9u8; PAGE];
                    let b = PageBatch::encode(1, &[(0x2000, Some(&data))]);
                    self.wire(c, Item::ToAgent(c, Frame::Pages(b[HEADER..].to_vec())));
                }
                let d = self.setup.transfer;
                self.src_later(
                    d,
                    SourceEvent::ImagesSent(Ok(ImagesSent {
                        files: 1,
                        file_bytes: 4,
                        pages: FinalReport {
                            pages_dumped: self.setup.pages,
                            pages_sent: 1,
                            pages_zero: 0,
                            bytes: (PAGE + 9 + 12) as u64,
                        },
                    })),
                );
            }
            SourceAction::Announce => {
                if !fail {
                    self.arp = Host::Src;
                }
                self.src_done(Step::Announce, fail);
            }
            SourceAction::RemoveAddress => {
                if !fail {
                    self.src_address = false;
                }
                self.src_done(Step::RemoveAddress, fail);
            }
            SourceAction::Lock { .. } => {
                if !fail {
                    self.src_lock_owned = true;
                }
                self.src_done(Step::Lock, fail);
            }
            SourceAction::KeepLock { .. } => {
                if !fail {
                    self.src_lock_kept = true;
                }
                self.src_done(Step::KeepLock, fail);
            }
            SourceAction::Unlock { .. } => {
                if !fail {
                    self.src_lock_owned = false;
                    self.src_lock_kept = false;
                }
                self.src_done(Step::Unlock, fail);
            }
            SourceAction::RemoveImages => {
                if !fail {
                    self.src_images = false;
                }
                self.src_done(Step::RemoveImages, fail);
            }
            SourceAction::CheckSourceCopy => {
                // (The real check first waits for this migration's CRIU to exit; in the model
                // it ends the copy within milliseconds, long before a restart.)
                let r = if fail {
                    Err(self.src_fail("the check"))
                } else {
                    Ok(self.src_copy.exists())
                };
                self.src_later(Duration::from_millis(1), SourceEvent::SourceCopy(r));
            }
            SourceAction::KillSourceCopy => {
                let r = if fail {
                    Err(self.src_fail("the kill"))
                } else {
                    self.src_copy = Copy::Dead;
                    Ok(())
                };
                self.src_later(Duration::from_millis(1), SourceEvent::SourceKilled(r));
            }
            SourceAction::RestoreLocally => {
                let r = if fail || !self.src_images {
                    Err(self.src_fail("the local restore"))
                } else {
                    assert!(!self.src_copy.exists(), "local restore beside a live copy");
                    self.src_copy = Copy::Running;
                    self.src_came_back = true;
                    self.src_address = true;
                    Ok(101)
                };
                self.src_later(Duration::from_millis(80), SourceEvent::RestoredLocally(r));
            }
            SourceAction::Journal { phase, lock_table } => {
                if !fail {
                    self.src_journal = Some((phase, lock_table));
                }
                self.src_done(Step::Journal, fail);
            }
            SourceAction::ForgetJournal => {
                if !fail {
                    self.src_journal = None;
                }
                self.src_done(Step::Journal, fail);
            }
            other => panic!("unknown source action {other:?}"),
        }
    }

    fn src_done(&mut self, step: Step, fail: bool) {
        let r = if fail {
            Err(self.src_fail(&format!("{step:?}")))
        } else {
            Ok(())
        };
        // Simple steps are synchronous in the driver: they complete before anything else.
        if let Some(s) = self.source.as_mut() {
            s.handle(self.now, SourceEvent::Completed(step, r));
        }
    }

    fn round_pages(&mut self, round: u32) -> u64 {
        let p = if round == 0 {
            self.setup.pages
        } else {
            (self.setup.pages >> (2 * round)).max(8)
        };
        self.round_pages.push(p);
        p
    }

    // ---- the agent ----

    fn frame_at_agent(&mut self, c: u64, f: Frame) {
        if !self.agent_alive {
            return;
        }
        let Some(conn) = self.conns.get(&c).cloned() else {
            return;
        };
        if let Some(id) = conn.migration.clone() {
            if conn.resolve {
                return;
            }
            self.agent_event(&id, AgentEvent::Frame(f));
            return;
        }
        // The first frame of a connection routes it, as the agent's driver does.
        let Frame::Control(body) = &f else {
            return;
        };
        let Ok(msg) = frame::decode::<ToAgent>(body) else {
            return;
        };
        match msg {
            ToAgent::Hello { migration_id, .. } => {
                let known = self.agents.contains_key(&migration_id)
                    || self.agent_journal.contains_key(&migration_id)
                    || self.tombstones.contains_key(&migration_id);
                if known {
                    self.agent_send(
                        c,
                        FromAgent::Refused {
                            code: ErrorCode::Refused,
                            reason: "migration id reused".into(),
                        },
                    );
                    return;
                }
                if let Some(k) = self.conns.get_mut(&c) {
                    k.migration = Some(migration_id.clone());
                }
                let m = AgentMachine::new(
                    Self::agent_config(),
                    "10.77.0.100/24".parse().expect("addr"),
                    self.now,
                );
                self.agents.insert(migration_id.clone(), m);
                self.main_conn.insert(migration_id.clone(), c);
                self.drain_agent(&migration_id);
            }
            ToAgent::Resolve {
                migration_id,
                decision,
                ..
            } => {
                if let Some(k) = self.conns.get_mut(&c) {
                    k.migration = Some(migration_id.clone());
                    k.resolve = true;
                }
                if self.agents.contains_key(&migration_id) {
                    self.agent_event(
                        &migration_id,
                        AgentEvent::Resolve {
                            decision,
                            request: c,
                        },
                    );
                } else {
                    let resolution = self.tombstones.get(&migration_id).map_or(
                        Resolution::Aborted {
                            reason: "unknown migration".into(),
                        },
                        AgentOutcome::resolution,
                    );
                    self.agent_send(c, FromAgent::Resolved { resolution });
                }
            }
            _ => {}
        }
    }

    fn agent_send(&mut self, c: u64, m: FromAgent) {
        self.wire(c, Item::ToSource(c, m));
    }

    fn agent_event(&mut self, id: &MigrationId, e: AgentEvent) {
        if !self.agent_alive {
            return;
        }
        let Some(m) = self.agents.get_mut(id) else {
            return;
        };
        let short = format!("{e:?}");
        let before = m.state_name();
        m.handle(self.now, e);
        let after = m.state_name();
        self.note(format!(
            "agt {before} -> {after}: {}",
            &short[..short.len().min(100)]
        ));
        self.drain_agent(id);
    }

    fn agent_later(&mut self, delay: Duration, e: AgentEvent) {
        let epoch = self.agent_epoch;
        self.at(delay, Item::Agent(epoch, e));
    }

    fn drain_agent(&mut self, id: &MigrationId) {
        loop {
            let Some(m) = self.agents.get_mut(id) else {
                return;
            };
            let Some(a) = m.poll_action() else {
                if m.is_done() {
                    let msg = format!("agent done: {:?}", m.outcome());
                    self.note(msg);
                    self.agents.remove(id);
                }
                return;
            };
            self.agent_action(id, a);
        }
    }

    fn agent_action(&mut self, id: &MigrationId, a: AgentAction) {
        let can_fail = matches!(
            a,
            AgentAction::ChooseInterface
                | AgentAction::Journal(_)
                | AgentAction::Tombstone(_)
                | AgentAction::Prepare { .. }
                | AgentAction::StorePrecopy(_)
                | AgentAction::StartRebuild
                | AgentAction::FinishRebuild
                | AgentAction::Restore
                | AgentAction::GoLive
        );
        let fail = can_fail && self.port_fails();
        let err =
            |what: &str| PortError::new(ErrorCode::Internal, format!("injected failure of {what}"));
        let main = self.main_conn.get(id).copied();
        match a {
            AgentAction::ChooseInterface => {
                let r = if fail {
                    Err(PortError::new(
                        ErrorCode::AddressInUse,
                        "injected: address in use",
                    ))
                } else {
                    Ok("eth0".to_string())
                };
                self.agent_later(Duration::from_millis(1), AgentEvent::InterfaceChosen(r));
            }
            AgentAction::Send(m) => {
                if let Some(c) = main {
                    self.agent_send(c, m);
                }
            }
            AgentAction::Close => {
                if let Some(c) = main {
                    self.close_conn(c, Host::Dst, false, "closed");
                }
            }
            AgentAction::Reply {
                request,
                resolution,
            } => self.agent_send(request, FromAgent::Resolved { resolution }),
            AgentAction::Journal(phase) => {
                let r = if fail {
                    Err(err("the journal"))
                } else {
                    self.agent_journal.insert(id.clone(), phase);
                    Ok(())
                };
                if let Some(m) = self.agents.get_mut(id) {
                    m.handle(self.now, AgentEvent::Completed(AgentStep::Journal, r));
                }
            }
            AgentAction::Tombstone(outcome) => {
                let r = if fail {
                    Err(err("the tombstone"))
                } else {
                    self.agent_journal.remove(id);
                    self.tombstones.insert(id.clone(), outcome);
                    Ok(())
                };
                if let Some(m) = self.agents.get_mut(id) {
                    m.handle(self.now, AgentEvent::Completed(AgentStep::Tombstone, r));
                }
            }
            AgentAction::Layout { .. }
            | AgentAction::CreateFile { .. }
            | AgentAction::WriteFile(_)
            | AgentAction::StoreFinal(_) => {}
            AgentAction::StorePrecopy(_) | AgentAction::StartRebuild => {
                if fail {
                    self.agent_later(
                        Duration::from_millis(1),
                        AgentEvent::DataFailed(
                            tether_migrator::protocol::Phase::Transfer,
                            err("the store"),
                        ),
                    );
                }
            }
            AgentAction::Prepare { .. } => {
                // Lands later: an undo decided meanwhile must wait for it.
                let epoch = self.agent_epoch;
                self.at(Duration::from_millis(3), Item::ClaimDone(epoch, !fail));
            }
            AgentAction::FinishRebuild => {
                let r = if fail {
                    Err(err("the rebuild"))
                } else {
                    Ok(())
                };
                self.agent_later(Duration::from_millis(5), AgentEvent::Rebuilt(r));
            }
            AgentAction::Restore => {
                if fail {
                    let epoch = self.agent_epoch;
                    self.at(
                        Duration::from_millis(20),
                        Item::RestoreDone(epoch, Err(err("criu restore"))),
                    );
                    return;
                }
                self.agent_later(
                    Duration::from_millis(20),
                    AgentEvent::RestoreStarted { pid: 200 },
                );
                let epoch = self.agent_epoch;
                self.at(
                    Duration::from_millis(60),
                    Item::RestoreDone(
                        epoch,
                        Ok(RestoreInfo {
                            pid: 200,
                            criu_restore_ms: 40.0,
                            stats: None,
                            held_bytes: None,
                        }),
                    ),
                );
            }
            AgentAction::GoLive => {
                // Resume the tree (still blocked), then lift the block, then announce; a
                // second run (a restarted agent) finds it done.
                let r = if fail {
                    Err(err("going live"))
                } else if !matches!(self.dst_copy, Copy::Stopped | Copy::Running) {
                    Err(err("the restored copy is gone"))
                } else {
                    self.dst_copy = Copy::Running;
                    self.dst_blocked = false;
                    self.arp = Host::Dst;
                    Ok(())
                };
                self.agent_later(Duration::from_millis(1), AgentEvent::WentLive(r));
            }
            AgentAction::Undo => {
                if self.dst_copy.exists() {
                    self.dst_copy = Copy::Dead;
                }
                self.dst_address = false;
                self.dst_blocked = false;
                self.agent_later(Duration::from_millis(2), AgentEvent::Undone);
            }
            AgentAction::CheckCopy => {
                let alive = self.dst_copy.exists();
                self.agent_later(Duration::from_millis(1), AgentEvent::CopyAlive(alive));
            }
            other => panic!("unknown agent action {other:?}"),
        }
    }

    // ---- invariants ----

    /// Whether the source filters the address (either lock).
    pub fn src_locked(&self) -> bool {
        self.src_lock_owned || self.src_lock_kept
    }

    fn live(&self, h: Host) -> bool {
        match h {
            Host::Src => self.src_copy == Copy::Running && !self.src_locked(),
            Host::Dst => self.dst_copy == Copy::Running && !self.dst_blocked,
        }
    }

    /// The invariants that must hold after every step.
    pub fn check(&mut self) {
        let t = (self.now - self.start).as_secs_f64() * 1e3;
        // 1. Never two live copies reachable by clients.
        if self.live(Host::Src) && self.live(Host::Dst) {
            self.violations.push(format!(
                "{t:.1} ms: two live copies (source and destination)"
            ));
        }
        if self.dst_copy == Copy::Running && !self.dst_blocked {
            self.dst_went_live = true;
        }
        // 2. Never zero copies without a way back.
        if !self.src_copy.exists() && !self.dst_copy.exists() && !self.src_images {
            self.violations.push(format!(
                "{t:.1} ms: no copy of the service and no image set"
            ));
        }
        // 3a. A destination copy that clients reached is never thrown away, and the source
        //     never comes back after it (the clients' bytes since would be lost).
        if self.dst_went_live && self.dst_copy == Copy::Dead {
            self.violations.push(format!(
                "{t:.1} ms: the destination copy ran and was killed"
            ));
        }
        if self.dst_went_live && self.src_copy == Copy::Running && self.src_came_back {
            self.violations.push(format!(
                "{t:.1} ms: the source copy came back after the destination ran"
            ));
        }
        // 3b. Packets that reach a host with the address, unfiltered, and no copy there get a
        //     reset.
        let (addr, filtered, copy) = match self.arp {
            Host::Src => (self.src_address, self.src_locked(), self.src_copy),
            Host::Dst => (self.dst_address, self.dst_blocked, self.dst_copy),
        };
        if addr && !filtered && !copy.exists() {
            self.violations.push(format!(
                "{t:.1} ms: clients' packets reach {:?}, which has the address and no copy: resets",
                self.arp
            ));
        }
        self.violations.dedup();
    }

    /// The end state: exactly one copy serves, where the LAN sends its packets, and the proxy
    /// is not holding clients.
    pub fn final_check(&mut self) {
        let src = self.live(Host::Src);
        let dst = self.live(Host::Dst);
        if src == dst {
            self.violations.push(format!(
                "end: {} copies serve (source {:?} locked={}, destination {:?} blocked={})",
                src as u8 + dst as u8,
                self.src_copy,
                self.src_locked(),
                self.dst_copy,
                self.dst_blocked
            ));
            return;
        }
        let serving = if src { Host::Src } else { Host::Dst };
        if self.arp != serving {
            self.violations.push(format!(
                "end: the LAN sends the service's packets to {:?}",
                self.arp
            ));
        }
        if self.proxy_paused {
            self.violations
                .push("end: the proxy still holds the clients".into());
        }
        if self.setup.redirect && self.proxy_redirected != (serving == Host::Dst) {
            self.violations.push(format!(
                "end: the proxy points at the wrong backend (redirected={}, serving {serving:?})",
                self.proxy_redirected
            ));
        }
        if serving == Host::Src && self.dst_copy == Copy::Stopped {
            self.violations
                .push("end: a stopped copy is left on the destination".into());
        }
        if serving == Host::Src && (self.dst_address || self.dst_blocked) {
            self.violations.push(format!(
                "end: the destination keeps the address (configured={}, blocked={})",
                self.dst_address, self.dst_blocked
            ));
        }
    }

    /// Which host serves the service now, if exactly one does.
    pub fn serving(&self) -> Option<Host> {
        match (self.live(Host::Src), self.live(Host::Dst)) {
            (true, false) => Some(Host::Src),
            (false, true) => Some(Host::Dst),
            _ => None,
        }
    }

    /// Leftovers a later recovery or operator must clean (not invariant violations).
    pub fn leftovers(&self) -> Vec<String> {
        let mut v = Vec::new();
        let serving_dst = self.live(Host::Dst);
        if serving_dst && self.src_address {
            v.push("the source still has the service address".into());
        }
        if !serving_dst && self.dst_address {
            v.push("the destination still has the service address".into());
        }
        if self.src_journal.is_some() {
            v.push("a source journal record".into());
        }
        if !self.agent_journal.is_empty() {
            v.push("an agent journal record".into());
        }
        if self.src_images {
            v.push("the source's image set".into());
        }
        v
    }

    /// Runs a `tether migrate --recover` now (as an operator would after a failure), then runs
    /// the world to its end again.
    pub fn recover_source(&mut self) {
        if self.source.is_none() && self.src_journal.is_some() {
            self.restart_source();
            self.run_more();
        }
    }

    fn run_more(&mut self) {
        self.step_until_quiet(false);
    }

    /// Delivers messages and runs timers in time order until nothing is left within an hour,
    /// injecting the case's fault when `faults` (at most 100,000 steps in all: more is a
    /// violation, a livelock of the machines).
    fn step_until_quiet(&mut self, faults: bool) {
        let horizon = self.now + Duration::from_secs(3600);
        loop {
            if self.steps > 100_000 {
                self.violations.push("no end after 100000 steps".into());
                break;
            }
            let next_item = self.queue.keys().next().copied();
            let next_timer = self.next_timer();
            let (t, item) = match (next_item, next_timer.clone()) {
                (Some((ti, _)), Some((tt, _))) if tt < ti => (tt, false),
                (Some((ti, _)), _) => (ti, true),
                (None, Some((tt, _))) => (tt, false),
                (None, None) => break,
            };
            if t > horizon {
                break;
            }
            self.now = self.now.max(t);
            if faults {
                self.inject_fault();
            }
            if item {
                let key = *self.queue.keys().next().expect("an item");
                let it = self.queue.remove(&key).expect("the item");
                self.deliver(it);
            } else {
                let (_, who) = next_timer.expect("a timer");
                self.tick(who);
            }
            self.steps += 1;
            self.check();
        }
    }
}

fn encode_frame<T: serde::Serialize>(m: &T) -> Frame {
    let f = frame::encode(m);
    Frame::Control(f[HEADER..].to_vec())
}

#[allow(unused)]
fn _decision(_: Decision) {}
