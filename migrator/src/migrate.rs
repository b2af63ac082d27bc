//! The source side of a migration (`tether migrate`): the whole sequence, in one place.
//!
//! ```text
//!  source (this)                                   destination agent
//!  ─────────────                                   ─────────────────
//!  check pid, address, certs, CRIU
//!  connect (QUIC, mutual TLS) ── Hello ──────────▶ check address free, pick interface
//!                              ◀───────── Ready ──
//!  pre-copy rounds (service running):
//!    Layout, page batches, RoundEnd ──────────────▶ store pages
//!                              ◀────── RoundAck ──
//!    ... until the policy predicts a downtime under the limit (or rounds stop shrinking, or
//!    the round cap); auto-converge throttles the service's CPU meanwhile
//!  start criu swrk (start-up cost before the freeze)
//!  criu dump --tcp-established, nftables lock
//!    pre-dump notify: proxy pause; answer it: the downtime starts
//!    network-lock notify (tree frozen) ─ Frozen ─▶ add address, block inbound to it
//!    proxy redirect while CRIU dumps
//!    post-dump notify: hold (frozen, locked)
//!  send images ──── File* (page maps, no page data),
//!     FinalPages, page batches of the final difference,
//!     ImagesDone ───────────────────────────────────▶ rebuild pages-*.img from held pages +
//!                                                  difference, block renamed to CRIU-<run id>,
//!                                                  gratuitous ARP, criu restore
//!                              ◀────── Restored ── (CRIU lifts the block as sockets go live)
//!  proxy resume: held bytes go to the restored service
//!  ───────── commit point ─────────
//!  ─ Commit ─────────────────────────────────────▶ keep the service
//!                              ◀───── Committed ──
//!  criu: kill the frozen tree; remove address and CRIU's lock table
//! ```
//!
//! Any failure before the commit point rolls back: the agent undoes its side (on `Abort`, or by
//! itself when the connection drops), CRIU unlocks and thaws the tree, and the source announces
//! the address again so the LAN sends its packets back here. The tree was never killed, its
//! sockets never closed: its clients continue.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{error, info, info_span, warn, Instrument};

use crate::criu::{self, Criu, DumpPoint, HeldDump};
use crate::hostnet::{self, Link, ServiceAddr};
use crate::policy::{self, Decision, Policy, RoundStats};
use crate::precopy::{self, FinalReport, RateLimit, RoundReport, Tracker};
use crate::progress::Progress;
use crate::report::{
    CriuDumpStats, CriuRestoreStats, ImageSizes, Outcome, PrecopySummary, ProxyReport, Report,
    Timings,
};
use crate::throttle::Throttle;
use crate::tls::Identity;
use crate::transport::{self, FrameReceiver, FrameSender, TransportError};
use crate::wire::{self, FromAgent, MigrationId, ToAgent};

/// What to migrate and where.
#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Root of the process tree (host pid).
    pub pid: i32,
    /// The destination agent.
    pub to: SocketAddr,
    /// The name the agent's certificate must carry; any CA-signed agent if `None`.
    pub agent_name: Option<String>,
    /// This host's certificate directory.
    pub certs: PathBuf,
    /// The service's address, configured on this host.
    pub service_addr: ServiceAddr,
    /// Where the dump is written (should be tmpfs).
    pub work_dir: PathBuf,
    /// CRIU log level.
    pub criu_log_level: i32,
    /// How long to wait for the destination's restore.
    pub restore_timeout: Duration,
    /// Pre-copy settings; `None` for stop-and-copy.
    pub precopy: Option<PrecopyOptions>,
    /// Cap on the transfer rate, bits/s.
    pub bandwidth: Option<u64>,
    /// The tether-proxy in front of the service, if any.
    pub proxy: Option<ProxyOptions>,
}

/// The tether-proxy in front of the service: paused right before the freeze, resumed right after
/// the commit (or on rollback).
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The proxy's control socket.
    pub socket: PathBuf,
    /// The service's name in the proxy's configuration.
    pub service: String,
    /// Where new connections and UDP flows go after the move; unchanged if `None` (the service
    /// keeps its address).
    pub redirect: Option<SocketAddr>,
    /// How long the proxy may take to quiesce the service's flows.
    pub pause_timeout: Duration,
}

/// Time of the frozen phase per byte of state, in scans: see `precopy_rounds`.
const FROZEN_PASSES: f64 = 8.0;

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

/// Which side a failure happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Side {
    /// This host.
    Source,
    /// The agent's host.
    Destination,
    /// The connection between them.
    Network,
}

/// A failed migration: where, why, and what state the service is in.
#[derive(Debug, thiserror::Error)]
#[error("{phase} failed on the {side:?} side: {reason}. {state}")]
pub struct MigrationError {
    /// Where it failed.
    pub side: Side,
    /// The phase, e.g. `dump`, `transfer`, `restore`.
    pub phase: &'static str,
    /// Why.
    pub reason: String,
    /// What the user needs to know about the service now.
    pub state: String,
    /// Whether running the same migration again is safe.
    pub retry_safe: bool,
    /// The report, if the migration got far enough to have one.
    pub report: Option<Box<Report>>,
}

impl MigrationError {
    fn before_start(side: Side, phase: &'static str, reason: impl ToString) -> MigrationError {
        MigrationError {
            side,
            phase,
            reason: reason.to_string(),
            state: "Nothing was changed; the service runs on the source as before.".into(),
            retry_safe: true,
            report: None,
        }
    }
}

/// Tells the agent to undo its side: closes the connection with the reason (immediate, not
/// queued behind page data) and waits, bounded, until the close is sent.
async fn abort(quic: &(quinn::Endpoint, quinn::Connection), reason: &str) {
    transport::abort(&quic.0, &quic.1, reason).await;
}

struct Failure {
    side: Side,
    phase: &'static str,
    reason: String,
}

fn at(side: Side, phase: &'static str) -> impl FnOnce(String) -> Failure {
    move |reason| Failure {
        side,
        phase,
        reason,
    }
}

/// How long `tether migrate` waits for a lazy restore of the service to finish filling in its
/// memory before it refuses.
const LAZY_FILL_WAIT: Duration = Duration::from_secs(30);

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

/// Runs a migration. `cancel` resolving before the commit point rolls the migration back.
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
    let started = Instant::now();
    let svc = opts.service_addr;
    // ---- checks: nothing changes until all pass ----
    if opts.pid <= 1 || !Path::new(&format!("/proc/{}", opts.pid)).exists() {
        return Err(MigrationError::before_start(
            Side::Source,
            "check",
            format!("no process with pid {}", opts.pid),
        ));
    }
    let identity = Identity::load(&opts.certs)
        .map_err(|e| MigrationError::before_start(Side::Source, "check", e))?;
    let dev = match hostnet::interface_of(svc.addr()).await {
        Ok(Some(dev)) => dev,
        Ok(None) => {
            return Err(MigrationError::before_start(
                Side::Source,
                "check",
                format!("service address {svc} is not configured on this host"),
            ))
        }
        Err(e) => return Err(MigrationError::before_start(Side::Source, "check", e)),
    };
    let link =
        Link::lookup(&dev).map_err(|e| MigrationError::before_start(Side::Source, "check", e))?;
    let criu = Criu::locate()
        .await
        .map_err(|e| MigrationError::before_start(Side::Source, "check", e))?
        .with_log_level(opts.criu_log_level);
    // A service restored lazily moments ago may still be receiving its memory: pages not yet
    // filled in are absent, and the scans and the dump would miss them.
    wait_for_lazy_fill(opts.pid)
        .await
        .map_err(|e| MigrationError::before_start(Side::Source, "check", e))?;

    let mut gate = match &opts.proxy {
        Some(p) => Some(
            Gate::open(p)
                .await
                .map_err(|e| MigrationError::before_start(Side::Source, "check", e))?,
        ),
        None => None,
    };

    // ---- handshake ----
    let quic = transport::connect(
        &identity,
        opts.to,
        opts.agent_name.as_deref(),
        Duration::from_secs(5),
    )
    .await
    .map_err(|e| MigrationError::before_start(Side::Network, "connect", e))?;
    let (send, recv) = quic
        .1
        .open_bi()
        .await
        .map_err(|e| MigrationError::before_start(Side::Network, "connect", e))?;
    let mut tx = FrameSender(send);
    let mut rx = FrameReceiver(recv);
    tx.send(&ToAgent::Hello {
        protocol: wire::PROTOCOL,
        migration_id: id.clone(),
        service_addr: svc,
    })
    .await
    .map_err(|e| MigrationError::before_start(Side::Network, "connect", e))?;
    match rx
        .message_within(Duration::from_secs(10), "the agent's answer")
        .await
    {
        Ok(FromAgent::Ready { interface }) => info!(%interface, "agent ready"),
        Ok(FromAgent::Refused { reason }) => {
            return Err(MigrationError::before_start(
                Side::Destination,
                "handshake",
                format!("agent refused: {reason}"),
            ))
        }
        Ok(other) => {
            return Err(MigrationError::before_start(
                Side::Destination,
                "handshake",
                format!("unexpected answer {other:?}"),
            ))
        }
        Err(e) => {
            // Includes the agent rejecting our certificate.
            return Err(MigrationError::before_start(Side::Network, "handshake", e));
        }
    }
    let handshake_ms = ms(started.elapsed());

    // ---- pre-copy: the service keeps running; any failure here changed nothing ----
    let limit = opts.bandwidth.map(RateLimit::bits_per_sec);
    let mut tracker = Tracker::default();
    let mut summary = PrecopySummary::default();
    tokio::pin!(cancel);
    if let Some(pc) = &opts.precopy {
        let t0 = Instant::now();
        let r = tokio::select! {
            r = precopy_rounds(opts.pid, &id, pc, (&quic.1, &mut tx, &mut rx), limit, &mut summary) => r,
            _ = &mut cancel => Err("cancelled by the user".to_string()),
        };
        match r {
            Ok(t) => tracker = t,
            Err(reason) => {
                abort(&quic, &reason).await;
                return Err(MigrationError::before_start(
                    Side::Source,
                    "pre-copy",
                    reason,
                ));
            }
        }
        summary.precopy_ms = ms(t0.elapsed());
    }

    let images = opts.work_dir.join(format!("tether-{id}"));
    create_private_dir(&images).map_err(|e| {
        MigrationError::before_start(
            Side::Source,
            "prepare",
            format!("{}: {e}", images.display()),
        )
    })?;
    let _cleanup = RemoveDir(images.clone());
    let worker = criu
        .worker()
        .map_err(|e| MigrationError::before_start(Side::Source, "prepare", e))?;

    let mut report = Report {
        migration_id: id.to_string(),
        outcome: Outcome::NotStarted,
        error: None,
        source_pid: opts.pid,
        destination_pid: None,
        destination: opts.to.to_string(),
        service_addr: svc.to_string(),
        timings: Timings {
            handshake_ms,
            ..Default::default()
        },
        images: ImageSizes::default(),
        criu_dump: None,
        criu_restore: None,
        criu: criu.path().display().to_string(),
        precopy: summary,
        proxy: None,
    };

    // ---- freeze and dump (the proxy pauses right before the freeze), holding the tree ----
    let dumped = tokio::select! {
        r = freeze_and_dump(&criu, worker, svc.addr(), opts.pid, &images, gate.as_mut(), &mut tx, &mut report) => r,
        // Dropping the dump closes CRIU's socket: it rolls back at its next notification.
        _ = &mut cancel => Err(at(Side::Source, "dump")("cancelled by the user".into())),
    };
    let held = match dumped {
        Ok(h) => h,
        Err(f) => {
            // CRIU has thawed the tree (or does so as its socket closes).
            let mut extra = String::new();
            if let Some(g) = gate.as_mut() {
                if let Some(e) = g.undo().await {
                    extra = format!(" The proxy could not be resumed: {e}.");
                }
            }
            abort(&quic, &format!("{}: {}", f.phase, f.reason)).await;
            let _ = link.announce(svc.addr());
            report.outcome = Outcome::NotStarted;
            return Err(rolled_back(report, f.side, f.phase, f.reason, extra));
        }
    };

    let result = async {
        transfer_and_restore(
            &images,
            tracker,
            (&quic.1, &mut tx, &mut rx),
            &mut report,
            opts.restore_timeout,
        )
        .await
    };
    let result = tokio::select! {
        r = result => r,
        _ = &mut cancel => Err(at(Side::Source, "transfer")("cancelled by the user".into())),
    };
    let restored_at = match result {
        Ok(t) => t,
        Err(f) => return Err(rollback(held, &link, svc, &quic, gate.as_mut(), report, f).await),
    };
    report.timings.downtime_ms = ms(restored_at - held.stopping);
    // The restored sockets are live: release the clients' held bytes to them at once, so their
    // stall is the downtime, not a retransmission timeout.
    if let Some(g) = gate.as_mut() {
        match g.resume().await {
            Ok(r) => {
                if let Some(p) = report.proxy.as_mut() {
                    p.held_ms = r.held_ms;
                    p.released_datagrams = r.released_datagrams;
                    p.after_downtime_ms = ms(restored_at.elapsed());
                }
            }
            Err(e) => error!(
                "the service runs on the destination, but resuming the proxy failed: {e} \
                 (it resumes by itself after its maximum hold)"
            ),
        }
    }

    // ---- commit point: the destination runs the service ----
    let t_commit = Instant::now();
    if let Err(e) = tx.send(&ToAgent::Commit).await {
        let f = at(Side::Network, "commit")(e.to_string());
        return Err(rollback(held, &link, svc, &quic, gate.as_mut(), report, f).await);
    }
    match rx
        .message_within::<FromAgent>(Duration::from_secs(10), "commit confirmation")
        .await
    {
        Ok(FromAgent::Committed) => {}
        other => {
            // The agent undoes its copy when it has not seen the commit; without the
            // confirmation the source takes the service back.
            let f = at(Side::Destination, "commit")(format!("no commit confirmation: {other:?}"));
            return Err(rollback(held, &link, svc, &quic, gate.as_mut(), report, f).await);
        }
    }
    let lock_table = criu::images::lock_table_name(&images).ok();
    if let Err(e) = held.commit().await {
        // The destination runs the service; a failure to end the source copy must be seen.
        error!(
            "the service runs on the destination, but ending the frozen source copy failed: {e}"
        );
    }
    if let Err(e) = hostnet::remove_address(svc, &dev).await {
        error!("cannot remove {svc} from {dev}: {e}");
    }
    if let Some(t) = lock_table {
        // The dump's lock table stays after a commit; left, it would block these very
        // connections if the service ever comes back.
        if let Err(e) = hostnet::delete_table(&t).await {
            error!("cannot remove CRIU's lock table {t}: {e}");
        }
    }
    report.timings.commit_ms = ms(t_commit.elapsed());
    report.timings.total_ms = ms(started.elapsed());
    report.outcome = Outcome::Committed;
    if let Some(s) = criu::images::stats(&images.join("stats-dump"))
        .ok()
        .flatten()
        .and_then(|s| s.dump)
    {
        report.timings.freeze_ms = f64::from(s.freezing_time) / 1e3;
        report.criu_dump = Some(CriuDumpStats {
            freezing_time_us: s.freezing_time,
            frozen_time_us: s.frozen_time,
            memdump_time_us: s.memdump_time,
            memwrite_time_us: s.memwrite_time,
            pages_scanned: s.pages_scanned,
            pages_written: s.pages_written,
        });
    }
    info!(
        downtime_ms = report.timings.downtime_ms,
        total_ms = report.timings.total_ms,
        "committed: the service runs on the destination"
    );
    Ok(report)
}

/// Freezes and dumps the tree, pausing the proxy (if any) right before the freeze, once CRIU has
/// done its set-up: the clients' stall starts as late as possible. Tells the agent as soon as the
/// tree is frozen. On error the tree runs on (CRIU thaws it) and the proxy may still be paused.
#[allow(clippy::too_many_arguments)]
async fn freeze_and_dump(
    criu: &Criu,
    worker: crate::criu::swrk::Worker,
    svc_ip: std::net::Ipv4Addr,
    pid: i32,
    images: &Path,
    mut gate: Option<&mut Gate>,
    tx: &mut FrameSender,
    report: &mut Report,
) -> Result<HeldDump, Failure> {
    let criu_err = |e: crate::criu::CriuError| at(Side::Source, "dump")(e.to_string());
    let mut dump = criu
        .start_dump(worker, pid, images)
        .await
        .map_err(criu_err)?;
    dump.until(DumpPoint::PreFreeze).await.map_err(criu_err)?;
    let pause_asked = Instant::now();
    if let Some(g) = gate.as_deref_mut() {
        // The service reads what the proxy sent before the pause while the proxy waits for its
        // flows to quiesce.
        let paused = AtomicBool::new(false);
        let pause = async {
            let r = g.pause().await;
            paused.store(true, Ordering::Release);
            r
        };
        let (r, ()) = tokio::join!(pause, drain_udp(svc_ip, &paused));
        match r {
            Ok(p) => {
                info!(
                    quiesce_ms = p.quiesce_ms,
                    tcp = p.tcp_flows,
                    udp = p.udp_flows,
                    "proxy paused"
                );
                report.proxy = Some(ProxyReport {
                    quiesce_ms: p.quiesce_ms,
                    tcp_flows: p.tcp_flows,
                    udp_flows: p.udp_flows,
                    ..Default::default()
                });
            }
            Err(e) => {
                let _ = dump.abort().await;
                return Err(at(Side::Source, "pause")(format!(
                    "the proxy could not pause: {e}"
                )));
            }
        }
    }
    dump.until(DumpPoint::Frozen).await.map_err(criu_err)?;
    if let Err(e) = tx.send(&ToAgent::Frozen).await {
        let _ = dump.abort().await;
        return Err(at(Side::Network, "dump")(e.to_string()));
    }
    // The redirect only has to precede the restore: it runs while CRIU dumps, off the clients'
    // stall.
    let (held, redirected) = match gate {
        Some(g) => tokio::join!(dump.held(), g.redirect()),
        None => (dump.held().await, Ok(())),
    };
    let held = held.map_err(criu_err)?;
    if let Err(e) = redirected {
        if let Err(r) = held.rollback().await {
            error!("rolling back the dump after the failed redirect: {r}");
        }
        return Err(at(Side::Source, "redirect")(format!(
            "the proxy could not redirect: {e}"
        )));
    }
    if let Some(p) = report.proxy.as_mut() {
        p.before_downtime_ms = ms(held.stopping - pause_asked);
    }
    report.timings.dump_ms = ms(held.dump_duration());
    Ok(held)
}

/// How long the source waits, after the proxy's pause, for the service to read its queued UDP
/// datagrams. A service reads what is queued within microseconds once scheduled; clients that
/// send to it directly (not through the proxy) can keep the queue from ever being empty, and
/// then this is what the pause costs them all (at 100 ms it cost a test 85 ms of stall, at 20 ms
/// it reached its cap in several runs of that test).
const UDP_DRAIN_MAX: Duration = Duration::from_millis(5);

/// Waits until the service's UDP receive queues are empty once `paused` is set (the proxy sends
/// nothing more), at most [`UDP_DRAIN_MAX`] after that. CRIU drops datagrams queued on a socket
/// at dump time; a service that does not read loses them.
async fn drain_udp(svc_ip: std::net::Ipv4Addr, paused: &AtomicBool) {
    let mut deadline = None;
    loop {
        // Read the flag before the queue: an empty queue counts only if seen after the pause.
        let closed = paused.load(Ordering::Acquire);
        let queued = hostnet::udp_rx_queued(svc_ip);
        if closed {
            let now = Instant::now();
            let deadline = *deadline.get_or_insert(now + UDP_DRAIN_MAX);
            match queued {
                Ok(0) | Err(_) => return,
                Ok(n) if now >= deadline => {
                    warn!(
                        bytes = n,
                        "UDP data still queued at the service; CRIU drops it"
                    );
                    return;
                }
                Ok(_) => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// The proxy in front of the service, as the migration drives it.
struct Gate {
    client: tether_proxy::control::Client,
    opts: ProxyOptions,
    original: SocketAddr,
    paused: bool,
    redirected: bool,
}

impl Gate {
    async fn open(opts: &ProxyOptions) -> Result<Gate, String> {
        let mut client = tether_proxy::control::Client::connect(&opts.socket)
            .await
            .map_err(|e| format!("proxy control socket {}: {e}", opts.socket.display()))?;
        let status = client
            .status()
            .await
            .map_err(|e| format!("proxy status: {e}"))?;
        let svc = status
            .services
            .iter()
            .find(|s| s.name == opts.service)
            .ok_or_else(|| format!("the proxy has no service named {:?}", opts.service))?;
        Ok(Gate {
            client,
            original: svc.backend,
            opts: opts.clone(),
            paused: false,
            redirected: false,
        })
    }

    async fn pause(&mut self) -> Result<tether_proxy::api::PauseReport, String> {
        let r = self
            .client
            .pause(&self.opts.service, self.opts.pause_timeout)
            .await
            .map_err(|e| e.to_string())?;
        self.paused = true;
        Ok(r)
    }

    async fn redirect(&mut self) -> Result<(), String> {
        if let Some(to) = self.opts.redirect {
            self.client
                .redirect(&self.opts.service, to)
                .await
                .map_err(|e| e.to_string())?;
            self.redirected = true;
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<tether_proxy::api::ResumeReport, String> {
        let r = self
            .client
            .resume(&self.opts.service)
            .await
            .map_err(|e| e.to_string())?;
        self.paused = false;
        Ok(r)
    }

    /// Points the proxy back at the source and resumes it; returns what failed, if anything.
    async fn undo(&mut self) -> Option<String> {
        let mut err = None;
        if self.redirected {
            if let Err(e) = self
                .client
                .redirect(&self.opts.service, self.original)
                .await
            {
                err = Some(format!("redirect back to {}: {e}", self.original));
            }
            self.redirected = false;
        }
        if self.paused {
            match self.client.resume(&self.opts.service).await {
                Ok(_) => {}
                // Already active: the pause ended by itself (maximum hold).
                Err(e) if e.kind() == Some(tether_proxy::api::ErrorKind::WrongState) => {}
                Err(e) => err = Some(format!("resume: {e}")),
            }
            self.paused = false;
        }
        err
    }
}

/// Sends the image set (files with the page maps, then the final difference of the pages) and
/// waits for the restore. Returns when the service runs there.
async fn transfer_and_restore(
    images: &Path,
    tracker: Tracker,
    (conn, tx, rx): (&quinn::Connection, &mut FrameSender, &mut FrameReceiver),
    report: &mut Report,
    restore_timeout: Duration,
) -> Result<Instant, Failure> {
    let t0 = Instant::now();
    // Until the restore is confirmed: a stop-and-copy of a large state over a slow link sends
    // for many seconds while the service is frozen.
    let _progress = Progress::start(conn, "final transfer and restore (service frozen)".into());
    let mut files = 0u32;
    let mut total = 0u64;
    let mut entries: Vec<_> = std::fs::read_dir(images)
        .map_err(|e| at(Side::Source, "transfer")(e.to_string()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Page data goes as the final difference; the log stays here.
        if name == criu::DUMP_LOG || criu::pages::is_pages_file(&name) {
            continue;
        }
        let data = std::fs::read(entry.path())
            .map_err(|e| at(Side::Source, "transfer")(format!("{name}: {e}")))?;
        tx.send(&ToAgent::File {
            name: name.clone(),
            size: data.len() as u64,
        })
        .await
        .map_err(|e| at(Side::Network, "transfer")(e.to_string()))?;
        tx.send_data(&data)
            .await
            .map_err(|e| at(Side::Network, "transfer")(e.to_string()))?;
        files += 1;
        total += data.len() as u64;
    }
    tx.send(&ToAgent::FinalPages)
        .await
        .map_err(|e| at(Side::Network, "transfer")(e.to_string()))?;
    let fin: FinalReport = precopy::final_difference(images, tracker, tx)
        .await
        .map_err(|e| match e {
            precopy::TransferError::Transport(t) => at(Side::Network, "transfer")(t.to_string()),
            other => at(Side::Source, "transfer")(other.to_string()),
        })?;
    tx.send(&ToAgent::ImagesDone {
        files,
        bytes: total,
        final_pages: fin.pages_sent,
    })
    .await
    .map_err(|e| at(Side::Network, "transfer")(e.to_string()))?;
    report.images = ImageSizes {
        files,
        total_bytes: total + fin.bytes,
        pages_bytes: fin.pages_dumped * wire::PAGE as u64,
    };
    info!(
        files,
        final_pages = fin.pages_sent,
        of = fin.pages_dumped,
        bytes = total + fin.bytes,
        "image set and final difference sent"
    );
    report.precopy.final_difference = Some(fin);
    match rx
        .message_within::<FromAgent>(restore_timeout, "the restore")
        .await
    {
        Ok(FromAgent::Restored {
            pid,
            restore_ms,
            criu_restore_ms,
            stats,
        }) => {
            let now = Instant::now();
            report.timings.restore_ms = restore_ms;
            report.timings.transfer_ms = ms(now - t0) - restore_ms;
            report.destination_pid = Some(pid);
            report.criu_restore = stats.or(Some(CriuRestoreStats::default()));
            info!(
                pid,
                restore_ms, criu_restore_ms, "restored on the destination"
            );
            Ok(now)
        }
        Ok(FromAgent::Failed { phase, reason }) => Err(at(Side::Destination, "restore")(format!(
            "{phase}: {reason}"
        ))),
        Ok(other) => Err(at(Side::Destination, "restore")(format!(
            "unexpected answer {other:?}"
        ))),
        Err(TransportError::Timeout(..)) => {
            Err(at(Side::Destination, "restore")("no answer in time".into()))
        }
        Err(e) => Err(at(Side::Network, "restore")(e.to_string())),
    }
}

/// Pre-copy rounds until the policy says stop. Returns what the destination holds. The throttle,
/// if any, is released before returning, so the dump sees the tree in its own cgroup.
async fn precopy_rounds(
    pid: i32,
    id: &MigrationId,
    pc: &PrecopyOptions,
    (conn, tx, rx): (&quinn::Connection, &mut FrameSender, &mut FrameReceiver),
    limit: Option<RateLimit>,
    summary: &mut PrecopySummary,
) -> Result<Tracker, String> {
    let mut policy = Policy::new(policy::Config {
        downtime_limit: pc.downtime_limit,
        max_rounds: pc.max_rounds.max(1),
        auto_converge: pc.auto_converge,
        throttle: policy::ThrottleSteps {
            initial: pc.throttle_steps.0,
            increment: pc.throttle_steps.1,
            ..Default::default()
        },
        ..Default::default()
    })
    .map_err(|e| e.to_string())?;
    let mut tracker = Tracker::default();
    let mut throttle: Option<Throttle> = None;
    let mut prev_start: Option<Instant> = None;
    // The link's rate is best seen in the round that moved the most bytes (round 0, usually):
    // small rounds are paced by the scan, not the link.
    let mut link = (0u64, 0f64);
    let mut round = 0u32;
    // Seconds one scan takes per byte of state, the fastest seen.
    let mut scan_per_byte: Option<f64> = None;
    let stop = loop {
        let start = Instant::now();
        let progress = Progress::start(conn, format!("pre-copy round {round}"));
        let (t, mut rep): (Tracker, RoundReport) =
            precopy::round(pid, round, tracker, tx, rx, limit)
                .await
                .map_err(|e| format!("round {round}: {e}"))?;
        drop(progress);
        tracker = t;
        let duration = Duration::from_secs_f64(rep.duration_ms / 1e3);
        // Dirty pages found this round accumulated since the previous round started.
        rep.dirty_rate = match prev_start {
            Some(p) => rep.pages_dirty as f64 / (start - p).as_secs_f64().max(1e-6),
            None => 0.0,
        };
        // Pages that will have changed by the end of the next step: the dirty rate over this
        // round's duration (round 0: unknown; it is never the last round unless capped).
        let next = (rep.dirty_rate * duration.as_secs_f64()).round() as u64;
        rep.throttle = throttle.as_ref().map(Throttle::percent);
        if rep.bytes >= link.0 {
            link = (rep.bytes, rep.bandwidth);
        }
        // The frozen phase copies the whole state about four times (CRIU's dump, comparing the
        // dump, rebuilding its page files, CRIU's restore); calibrated against
        // scripts/bench-migration.sh it costs ~8x the time of one scan plus ~120 ms. Without it
        // the policy chases limits no state size allows. The fastest scan so far counts: a
        // round that sends much (round 0) is paced by the link, not by reading memory, and
        // calibrating from it predicted 15 s for a 256 MiB state that took 0.55 s.
        let state = rep.pages_scanned as f64 * wire::PAGE as f64;
        if state > 0.0 {
            let per_byte = rep.scan_ms / 1e3 / state;
            scan_per_byte = Some(scan_per_byte.map_or(per_byte, |p: f64| p.min(per_byte)));
        }
        if let Some(per_byte) = scan_per_byte {
            let fixed = Duration::from_secs_f64(0.12 + FROZEN_PASSES * per_byte * state);
            policy.observe_fixed_cost(fixed);
            summary.frozen_cost_ms = Some(fixed.as_secs_f64() * 1e3);
            if round == 1 && fixed >= pc.downtime_limit {
                warn!(
                    estimate_ms = fixed.as_secs_f64() * 1e3,
                    limit_ms = pc.downtime_limit.as_secs_f64() * 1e3,
                    "the downtime limit is below the frozen cost of this state size; pre-copy \
                     runs until rounds stop shrinking"
                );
            }
        }
        let stats = RoundStats {
            pages_sent: rep.pages_sent,
            pages_dirty_next: if round == 0 { 0 } else { next },
            bytes: rep.bytes,
            duration,
            bandwidth: link.1,
            dirty_rate: rep.dirty_rate,
        };
        let decision = policy.decide(&stats);
        rep.predicted_downtime_ms = policy
            .predicted_downtime(next)
            .map(|d| d.as_secs_f64() * 1e3);

        let decision = if round == 0 && pc.max_rounds > 1 {
            // Nothing is known about the dirty rate before a second scan: the policy counts
            // round 0 (for the cap) but cannot end pre-copy after it.
            Decision::Continue
        } else {
            decision
        };
        info!(
            round,
            sent = rep.pages_sent,
            zero = rep.pages_zero,
            scanned = rep.pages_scanned,
            ms = rep.duration_ms,
            mbit_s = rep.bandwidth * 8.0 / 1e6,
            dirty_pages_s = rep.dirty_rate,
            ?decision,
            "pre-copy round"
        );
        summary.rounds.push(rep);
        prev_start = Some(start);
        round += 1;
        match decision {
            Decision::StopAndCopy { reason, .. } => break format!("{reason:?}"),
            Decision::Throttle { percent, .. } => {
                let applied = match throttle.as_mut() {
                    Some(t) => t.set(percent).map_err(|e| e.to_string()),
                    None => {
                        let applied = async {
                            let procs = crate::procmem::tree(pid).map_err(|e| e.to_string())?;
                            let p2 = procs.clone();
                            let usage = tokio::task::spawn_blocking(move || {
                                crate::throttle::cpu_usage(&p2, Duration::from_millis(200))
                            })
                            .await
                            .map_err(|e| e.to_string())?;
                            info!(cpus = usage, "service CPU use before throttling");
                            Throttle::apply(&procs, id.as_str(), percent, usage)
                                .map_err(|e| e.to_string())
                        }
                        .await;
                        applied.map(|t| throttle = Some(t))
                    }
                };
                match applied {
                    Ok(()) => info!(percent, "auto-converge: service CPU throttled"),
                    Err(e) => warn!("cannot throttle the service: {e}"),
                }
            }
            _ => {}
        }
    };
    if let Some(t) = throttle.take() {
        summary.max_throttle = Some(t.percent());
        t.release();
    }
    summary.stop_reason = Some(stop);
    Ok(tracker)
}

/// Rolls back after the dump: the agent undoes its side, CRIU unlocks and thaws the tree, and the
/// address is announced from here again.
async fn rollback(
    held: HeldDump,
    link: &Link,
    svc: ServiceAddr,
    quic: &(quinn::Endpoint, quinn::Connection),
    gate: Option<&mut Gate>,
    report: Report,
    f: Failure,
) -> MigrationError {
    warn!(phase = f.phase, side = ?f.side, "rolling back: {}", f.reason);
    // The tree is frozen: thaw it first, then tell the agent, then let held traffic go to it.
    let thawed = held.rollback().await;
    abort(quic, &f.reason).await;
    let announced = link.announce(svc.addr());
    let mut extra = String::new();
    if let Some(g) = gate {
        if let Some(e) = g.undo().await {
            extra.push_str(&format!(" The proxy could not be resumed: {e}."));
        }
    }
    if let Err(e) = &thawed {
        extra.push_str(&format!(" CRIU's rollback reported: {e}."));
    }
    if let Err(e) = announced {
        extra.push_str(&format!(" Re-announcing the address failed: {e}."));
    }
    rolled_back(report, f.side, f.phase, f.reason, extra)
}

fn rolled_back(
    mut report: Report,
    side: Side,
    phase: &'static str,
    reason: String,
    extra: String,
) -> MigrationError {
    if report.outcome != Outcome::NotStarted || phase != "dump" {
        report.outcome = Outcome::RolledBack;
    }
    report.error = Some(format!("{phase}: {reason}"));
    let pid = report.source_pid;
    MigrationError {
        side,
        phase,
        reason,
        state: format!(
            "Rolled back: the service is still running on the source (pid {pid}).{extra}"
        ),
        retry_safe: extra.is_empty(),
        report: Some(Box::new(report)),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn create_private_dir(d: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
}

/// Removes the dump directory (memory images are secret) however the migration ends.
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
