//! One service at run time: its state, its flows, and the pause, redirect and resume sequences
//! that drive the data path from the pure [`ServiceState`].
//!
//! Commands that change the state are serialized by an operation lock; a pause holds it only to
//! start and to finish, not while it waits for quiescence, so that a resume (or the hold timeout)
//! can end a pause that does not quiesce.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::answer::AnswerWatch;
use crate::api::{
    AnswerReport, CommandError, FlowList, PauseReport, RedirectReport, ResumeReport, ServiceStatus,
    UnquiescedFlow,
};
use crate::config::Limits;
use crate::flowctx::FlowCtx;
use crate::hold::Usage;
use crate::metrics::{DropReason, GlobalMetrics, ServiceMetrics};
use crate::state::{Phase, ServiceState};
use crate::tcp::{self, TcpFlow, TcpFlows};
use crate::udp::UdpHandle;
use crate::util::millis;

/// How often a pause checks whether its flows have quiesced, at most (a flow that stops
/// reading wakes it earlier).
const QUIESCE_POLL: Duration = Duration::from_millis(1);
/// How long a pause re-checks without sleeping while only acknowledgements are outstanding
/// (they come within a round-trip time, far below the timer's 1 ms resolution).
const QUIESCE_SPIN: Duration = Duration::from_millis(3);

/// Longest pause timeout a command may ask for.
pub(crate) const MAX_PAUSE_TIMEOUT: Duration =
    Duration::from_millis(crate::config::MAX_PAUSE_TIMEOUT_MS);

#[derive(Debug)]
pub(crate) struct Service {
    /// Name, limits, counters, and the gate and backend its TCP flows follow.
    ctx: Arc<FlowCtx>,
    pub tcp_listen: Vec<SocketAddr>,
    pub udp_listen: Vec<SocketAddr>,
    /// The phase, for observers.
    phase_tx: watch::Sender<Phase>,
    state: Mutex<ServiceState>,
    ops: tokio::sync::Mutex<()>,
    tcp: Arc<TcpFlows>,
    udp: Vec<UdpHandle>,
}

impl Service {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        backend: SocketAddr,
        limits: Limits,
        tcp_listen: Vec<SocketAddr>,
        udp_listen: Vec<SocketAddr>,
        udp: Vec<UdpHandle>,
        ids: Arc<AtomicU64>,
        metrics: Arc<ServiceMetrics>,
        global: Arc<GlobalMetrics>,
        answers: Arc<AnswerWatch>,
    ) -> Service {
        Service {
            ctx: Arc::new(FlowCtx::new(
                name, backend, limits, ids, metrics, global, answers,
            )),
            tcp_listen,
            udp_listen,
            phase_tx: watch::Sender::new(Phase::Active),
            state: Mutex::new(ServiceState::new(backend)),
            ops: tokio::sync::Mutex::new(()),
            tcp: Arc::new(TcpFlows::default()),
            udp,
        }
    }

    pub fn name(&self) -> &str {
        &self.ctx.name
    }

    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.ctx.metrics
    }

    fn limits(&self) -> &Limits {
        &self.ctx.limits
    }

    /// Accepts this service's TCP connections on `listener` until the task is aborted.
    pub fn accept_tcp(&self, listener: TcpListener) -> impl Future<Output = ()> + Send + 'static {
        tcp::accept_loop(self.ctx.clone(), self.tcp.clone(), listener)
    }

    fn state(&self) -> MutexGuard<'_, ServiceState> {
        // The state is pure and consistent after every method; a panic elsewhere while the lock
        // was held cannot leave it half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state, then sets the backend for new flows and the gate from it and
    /// publishes the phase. The data path follows the pure state only through these.
    fn with_state<R>(&self, f: impl FnOnce(&mut ServiceState) -> R) -> R {
        let mut s = self.state();
        let r = f(&mut s);
        self.ctx.publish(s.backend(), s.client_data_flows());
        self.phase_tx
            .send_if_modified(|p| std::mem::replace(p, s.phase()) != s.phase());
        r
    }

    /// Where new flows go.
    pub fn backend(&self) -> SocketAddr {
        self.state().backend()
    }

    /// Follows the service's phase.
    pub fn watch_phase(&self) -> watch::Receiver<Phase> {
        self.phase_tx.subscribe()
    }

    fn tcp_snapshot(&self) -> Vec<Arc<TcpFlow>> {
        self.tcp.snapshot()
    }

    /// Stops every TCP flow task (proxy shutdown).
    pub fn abort_flows(&self) {
        for f in self.tcp_snapshot() {
            f.abort();
        }
    }

    /// The flows that are not quiet now.
    async fn unquiesced(&self) -> Vec<UnquiescedFlow> {
        let mut v: Vec<_> = self
            .tcp_snapshot()
            .iter()
            .filter_map(|f| f.unquiesced())
            .collect();
        for u in &self.udp {
            match u.check_quiet().await {
                Ok(mut x) => v.append(&mut x),
                Err(e) => tracing::error!(service = %self.ctx.name, "{e}"),
            }
        }
        v
    }

    /// Releases every UDP listener's held datagrams (the gate is already open).
    async fn release_udp(&self) -> Usage {
        let mut total = Usage::default();
        for u in &self.udp {
            match u.release().await {
                Ok(x) => {
                    total.datagrams += x.datagrams;
                    total.bytes += x.bytes;
                }
                Err(e) => tracing::error!(service = %self.ctx.name, "{e}"),
            }
        }
        total
    }

    fn udp_flow_count(&self) -> u64 {
        u64::try_from(self.ctx.metrics.udp_flows.get()).unwrap_or(0)
    }

    /// Pauses the service: stops client-to-service data and waits until every flow is quiet,
    /// at most `timeout` (default: the configured pause timeout). On timeout the pause is undone.
    pub async fn pause(
        self: &Arc<Self>,
        timeout: Option<Duration>,
    ) -> Result<PauseReport, CommandError> {
        let timeout = timeout.unwrap_or(self.limits().pause_timeout());
        if timeout.is_zero() || timeout > MAX_PAUSE_TIMEOUT {
            return Err(CommandError::BadRequest(format!(
                "timeout_ms must be between 1 and {}",
                MAX_PAUSE_TIMEOUT.as_millis()
            )));
        }
        let max_hold = self.limits().max_hold();
        let ticket = {
            let _op = self.ops.lock().await;
            let ticket = self.with_state(|s| s.begin_pause(Instant::now(), timeout, max_hold))?;
            self.ctx.metrics.pauses_total.inc();
            // The gate is closed now; the flows are looked at only after this (see tcp.rs).
            for u in &self.udp {
                if let Err(e) = u.hold().await {
                    tracing::error!(service = %self.ctx.name, "{e}");
                }
            }
            let weak = Arc::downgrade(self);
            let deadline = tokio::time::Instant::from_std(ticket.hold_deadline);
            tokio::spawn(async move {
                tokio::time::sleep_until(deadline).await;
                if let Some(svc) = weak.upgrade() {
                    svc.expire(ticket.id).await;
                }
            });
            ticket
        };
        tracing::info!(service = %self.ctx.name, pause = ticket.id, "pausing");
        let cancelled =
            || CommandError::Cancelled("a resume command or the hold timeout".to_string());
        let started = Instant::now();
        loop {
            let unq = self.unquiesced().await;
            let now = Instant::now();
            if unq.is_empty() {
                let _op = self.ops.lock().await;
                let quiesce = self
                    .with_state(|s| s.confirm_quiesced(ticket.id, now))
                    .map_err(|_| cancelled())?;
                self.ctx.metrics.quiesce_duration.observe(quiesce);
                let report = PauseReport {
                    service: self.ctx.name.clone(),
                    quiesce_ms: quiesce.as_secs_f64() * 1e3,
                    tcp_flows: self.tcp_snapshot().len() as u64,
                    udp_flows: self.udp_flow_count(),
                    max_hold_ms: millis(ticket.hold_deadline.saturating_duration_since(now)),
                };
                tracing::info!(
                    service = %self.ctx.name,
                    pause = ticket.id,
                    "paused: {} TCP, {} UDP flows quiet after {:.2} ms",
                    report.tcp_flows,
                    report.udp_flows,
                    report.quiesce_ms
                );
                return Ok(report);
            }
            if now >= ticket.quiesce_deadline {
                let _op = self.ops.lock().await;
                let waited = self
                    .with_state(|s| s.fail_pause(ticket.id, now))
                    .map_err(|_| cancelled())?;
                self.release_udp().await;
                self.ctx.metrics.pause_failures_total.inc();
                tracing::warn!(
                    service = %self.ctx.name,
                    pause = ticket.id,
                    "{} flow(s) did not quiesce within {} ms; pause undone",
                    unq.len(),
                    waited.as_millis()
                );
                return Err(CommandError::NotQuiesced {
                    flows: unq,
                    waited_ms: millis(waited),
                });
            }
            {
                let s = self.state();
                if s.pause_id() != Some(ticket.id) || s.phase() != Phase::Pausing {
                    drop(s);
                    self.ctx.metrics.pause_failures_total.inc();
                    return Err(cancelled());
                }
            }
            let only_acks = unq.iter().all(|f| f.upstream_outq.is_some());
            if only_acks && now.saturating_duration_since(started) < QUIESCE_SPIN {
                tokio::task::yield_now().await;
            } else {
                let wait = QUIESCE_POLL.min(ticket.quiesce_deadline.saturating_duration_since(now));
                let _ = tokio::time::timeout(wait, self.ctx.parked()).await;
            }
        }
    }

    /// Sends new connections and UDP flows to `to`.
    pub async fn redirect(&self, to: SocketAddr) -> Result<RedirectReport, CommandError> {
        if to.ip().is_unspecified() || to.port() == 0 {
            return Err(CommandError::BadRequest(format!(
                "backend {to} needs an address and a port"
            )));
        }
        let _op = self.ops.lock().await;
        let from = self.with_state(|s| s.begin_redirect(to))?;
        let (mut ok, mut failed) = (0, 0);
        for u in &self.udp {
            match u.redirect(to).await {
                Ok((a, b)) => {
                    ok += a;
                    failed += b;
                }
                Err(e) => tracing::error!(service = %self.ctx.name, "{e}"),
            }
        }
        let phase = self
            .with_state(|s| s.finish_redirect())
            .map_err(|e| CommandError::Internal(e.to_string()))?;
        self.ctx.metrics.redirects_total.inc();
        tracing::info!(service = %self.ctx.name, %from, %to, "redirected ({ok} UDP flows, {failed} failed)");
        Ok(RedirectReport {
            service: self.ctx.name.clone(),
            from,
            to,
            udp_flows: ok,
            udp_flows_failed: failed,
            phase,
        })
    }

    /// Releases everything held, in order.
    pub async fn resume(&self) -> Result<ResumeReport, CommandError> {
        let _op = self.ops.lock().await;
        let id = self.with_state(|s| {
            let id = s.begin_resume()?;
            // Armed before the gate opens (`with_state` publishes it after this closure), so
            // that the service's first answer cannot slip by unseen.
            self.arm_answers();
            Ok::<_, crate::state::StateError>(id)
        })?;
        let released = self.release_udp().await;
        let rec = self
            .with_state(|s| s.finish_resume(Instant::now()))
            .map_err(|e| CommandError::Internal(e.to_string()))?;
        self.ctx.metrics.pause_duration.observe(rec.held);
        tracing::info!(
            service = %self.ctx.name,
            pause = id,
            "resumed toward {} after {:.2} ms; released {} datagrams",
            rec.backend,
            rec.held.as_secs_f64() * 1e3,
            released.datagrams
        );
        Ok(ResumeReport {
            service: self.ctx.name.clone(),
            held_ms: rec.held.as_secs_f64() * 1e3,
            released_datagrams: released.datagrams as u64,
            released_bytes: released.bytes as u64,
            backend: rec.backend,
            was_quiesced: rec.was_quiesced,
        })
    }

    /// Ends pause `id` if it is still in force at its hold deadline: back to the old backend,
    /// release, log an error.
    async fn expire(&self, id: u64) {
        let _op = self.ops.lock().await;
        let Some(e) = self.with_state(|s| {
            let e = s.expire_hold(id, Instant::now());
            if e.is_some() {
                self.arm_answers();
            }
            e
        }) else {
            return;
        };
        self.ctx.metrics.hold_timeouts_total.inc();
        tracing::error!(
            service = %self.ctx.name,
            pause = id,
            "pause not resumed within {} ms: resuming toward the previous backend {}{}",
            self.limits().max_hold_ms,
            e.backend,
            e.abandoned_redirect
                .map(|a| format!(" (abandoning the redirect to {a})"))
                .unwrap_or_default()
        );
        if e.abandoned_redirect.is_some() {
            for u in &self.udp {
                if let Err(err) = u.redirect(e.backend).await {
                    tracing::error!(service = %self.ctx.name, "{err}");
                }
            }
        }
        self.release_udp().await;
        match self.with_state(|s| s.finish_resume(Instant::now())) {
            Ok(rec) => self.ctx.metrics.pause_duration.observe(rec.held),
            Err(err) => tracing::error!(service = %self.ctx.name, "{err}"),
        }
    }

    /// A resume releases what was held now: from here on, the service's first data toward a
    /// client on each transport is its answer.
    fn arm_answers(&self) {
        let m = &self.ctx.metrics;
        self.ctx
            .answers
            .armed(Instant::now(), m.tcp_flows.get() > 0, m.udp_flows.get() > 0);
    }

    /// When the service answered after its last resume.
    pub async fn answered(&self, timeout: Duration) -> Result<AnswerReport, CommandError> {
        self.ctx
            .answers
            .answered(timeout)
            .await
            .ok_or_else(|| CommandError::NotResumed(self.ctx.name.clone()))
    }

    /// The `status` entry of this service.
    pub fn status(&self, now: Instant) -> ServiceStatus {
        let s = self.state().clone();
        let drops: BTreeMap<String, u64> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str().to_string(), self.ctx.metrics.drops(*r)))
            .filter(|(_, n)| *n > 0)
            .collect();
        ServiceStatus {
            name: self.ctx.name.clone(),
            phase: s.phase(),
            backend: s.backend(),
            backend_before_pause: s.backend_before_pause(),
            paused_for_ms: s.held_for(now).map(millis),
            hold_left_ms: s
                .hold_deadline()
                .map(|d| millis(d.saturating_duration_since(now))),
            max_hold_ms: self.limits().max_hold_ms,
            tcp_listen: self.tcp_listen.clone(),
            udp_listen: self.udp_listen.clone(),
            tcp_flows: u64::try_from(self.ctx.metrics.tcp_flows.get()).unwrap_or(0),
            udp_flows: u64::try_from(self.ctx.metrics.udp_flows.get()).unwrap_or(0),
            held_datagrams: u64::try_from(self.ctx.metrics.held_datagrams.get()).unwrap_or(0),
            held_bytes: u64::try_from(self.ctx.metrics.held_bytes.get()).unwrap_or(0),
            drops,
        }
    }

    /// The `flows` answer of this service.
    pub async fn flows(&self) -> FlowList {
        let now = Instant::now();
        let tcp = self.tcp_snapshot().iter().map(|f| f.info(now)).collect();
        let mut udp = Vec::new();
        for u in &self.udp {
            match u.list().await {
                Ok(mut v) => udp.append(&mut v),
                Err(e) => tracing::error!(service = %self.ctx.name, "{e}"),
            }
        }
        udp.sort_by_key(|f: &crate::api::UdpFlowInfo| f.id);
        FlowList {
            service: self.ctx.name.clone(),
            tcp,
            udp,
        }
    }
}
