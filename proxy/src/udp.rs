//! The UDP (QUIC) data path of one listen address: an actor task that owns the listen socket's
//! receive side, the flow table and the hold queue, and takes commands from the service's
//! coordinator between datagrams (so that holding, releasing and redirecting are ordered with
//! the datagrams exactly).
//!
//! - One upstream socket per client address, connected to the backend: the service sees one
//!   peer per client, as it would without the proxy. A reader task per flow sends what the
//!   service answers back to the client from the listen socket; it never stops, also not while
//!   paused.
//! - The flow table has a size limit: a datagram from a new client while it is full is dropped
//!   and counted, existing flows are unaffected. Flows idle (both ways) longer than the idle
//!   timeout are removed, except while holding.
//! - While holding, client datagrams go to the [`HoldQueue`] (limits by datagrams, bytes and age,
//!   per flow and in total, drops counted). A release sends them, each flow's in order and before
//!   any datagram of that flow that arrives later, **paced and round-robin across flows**: the
//!   first held datagram of every flow, then the second of every flow, ..., at most
//!   [`RELEASE_CHUNK`] per [`RELEASE_TICK`]. Released at once, a pause's worth of datagrams
//!   (QUIC clients send probe after probe while held: thousands for a few hundred flows)
//!   overflowed the service's receive buffer, and a flow whose datagrams were all lost there
//!   waited for its next, backed-off probe: seconds. Round-robin puts every flow's first
//!   datagram in within milliseconds.
//! - Redirect re-connects every flow's upstream socket to the new backend (same local port, so
//!   a QUIC server sees the same peer address) and sends new flows there.
//! - I/O is batched both ways: up to [`sys::BATCH`] datagrams per `recvmmsg` on the listen
//!   socket and on each upstream socket, and the consecutive datagrams of one flow go out with
//!   one `sendmmsg`. Order within a flow is kept; batches form only when datagrams queue up, so
//!   a lone datagram is not delayed.
//! - The actor never waits for a flow: it sends upstream without blocking, and what a flow's
//!   upstream socket cannot take at once goes to that flow's backlog, which a writer task of the
//!   flow sends as the socket drains (datagrams of that flow follow it there, in order, until it
//!   is empty). The backlog is bounded (the per-flow hold limits); past them datagrams are
//!   dropped and counted (`udp_upstream_backlog`). A flow whose socket is full (a burst released
//!   after a pause into a slow link) thus never delays the other flows of its listener.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use crate::answer::{AnswerWatch, Transport};
use crate::api::{UdpFlowInfo, UnquiescedFlow};
use crate::config::Limits;
use crate::hold::{HoldQueue, Usage};
use crate::metrics::{DropReason, ServiceMetrics};
use crate::sys::{self, RecvMeta, BATCH};

/// Largest UDP payload.
const MAX_DATAGRAM: usize = 65_535;

/// Most held datagrams released per [`RELEASE_TICK`] (about 300 Mbit/s of 1200-byte datagrams):
/// a rate a service on a small host reads without its receive buffer overflowing.
pub(crate) const RELEASE_CHUNK: usize = 32;
/// The release's pace.
pub(crate) const RELEASE_TICK: Duration = Duration::from_millis(1);

/// What the coordinator asks of a UDP actor; each command is answered on its channel.
#[derive(Debug)]
pub(crate) enum UdpCmd {
    /// Start holding client datagrams.
    Hold(oneshot::Sender<()>),
    /// Send what is held, in order, and stop holding.
    Release(oneshot::Sender<Usage>),
    /// Send flows to a new backend: (flows re-pointed, flows removed).
    Redirect(SocketAddr, oneshot::Sender<(u64, u64)>),
    /// Flows whose upstream socket still has bytes queued.
    CheckQuiet(oneshot::Sender<Vec<UnquiescedFlow>>),
    /// Snapshot of the flows.
    List(oneshot::Sender<Vec<UdpFlowInfo>>),
}

/// The coordinator's side of a UDP actor.
#[derive(Debug, Clone)]
pub(crate) struct UdpHandle {
    tx: mpsc::Sender<UdpCmd>,
}

impl UdpHandle {
    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> UdpCmd) -> io::Result<T> {
        let (tx, rx) = oneshot::channel();
        let gone = || io::Error::other("UDP listener task has stopped");
        self.tx.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }
    pub async fn hold(&self) -> io::Result<()> {
        self.ask(UdpCmd::Hold).await
    }
    pub async fn release(&self) -> io::Result<Usage> {
        self.ask(UdpCmd::Release).await
    }
    pub async fn redirect(&self, to: SocketAddr) -> io::Result<(u64, u64)> {
        self.ask(|tx| UdpCmd::Redirect(to, tx)).await
    }
    pub async fn check_quiet(&self) -> io::Result<Vec<UnquiescedFlow>> {
        self.ask(UdpCmd::CheckQuiet).await
    }
    pub async fn list(&self) -> io::Result<Vec<UdpFlowInfo>> {
        self.ask(UdpCmd::List).await
    }
}

/// Counters of one flow, shared with its reader task.
#[derive(Debug, Default)]
struct FlowShared {
    /// Milliseconds since the actor's epoch at the last datagram either way.
    last_ms: AtomicU64,
    datagrams_to_service: AtomicU64,
    datagrams_to_client: AtomicU64,
    bytes_to_service: AtomicU64,
    bytes_to_client: AtomicU64,
}

#[derive(Debug)]
struct Flow {
    id: u64,
    upstream: Arc<UdpSocket>,
    backend: SocketAddr,
    shared: Arc<FlowShared>,
    reader: tokio::task::JoinHandle<()>,
    /// Datagrams the upstream socket could not take at once, for the writer task.
    backlog: mpsc::Sender<Vec<u8>>,
    /// Datagrams and bytes in the backlog or being sent by the writer: while any, this flow's
    /// datagrams go to the backlog (order).
    pending: Arc<Pending>,
    writer: tokio::task::JoinHandle<()>,
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

/// What a flow's backlog holds.
#[derive(Debug, Default)]
struct Pending {
    datagrams: AtomicU64,
    bytes: AtomicU64,
}

/// Allocates flow ids unique within a service (shared with its TCP flows).
pub(crate) type IdSource = Arc<AtomicU64>;

/// Receive buffer asked for on the listen socket, which takes the datagrams of every client
/// flow (the kernel caps it at `net.core.rmem_max`; the default 208 KiB holds fewer than a
/// hundred full-size datagrams).
const LISTEN_RCVBUF: usize = 4 << 20;

/// Binds a UDP listen socket.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = std::net::UdpSocket::bind(addr)?;
    s.set_nonblocking(true)?;
    if let Err(e) = socket2::SockRef::from(&s).set_recv_buffer_size(LISTEN_RCVBUF) {
        tracing::debug!(%addr, "SO_RCVBUF: {e}");
    }
    Ok(s)
}

/// The actor for one listen socket, to be spawned; it runs until every [`UdpHandle`] is
/// dropped.
pub(crate) fn actor(
    service: String,
    socket: std::net::UdpSocket,
    backend: SocketAddr,
    limits: Limits,
    metrics: Arc<ServiceMetrics>,
    answers: Arc<AnswerWatch>,
    ids: IdSource,
) -> io::Result<(UdpHandle, impl std::future::Future<Output = ()> + Send)> {
    let listen = Arc::new(UdpSocket::from_std(socket)?);
    let local = listen.local_addr()?;
    let (tx, rx) = mpsc::channel(16);
    let actor = Actor {
        service,
        listen,
        local,
        backend,
        limits,
        metrics,
        answers,
        ids,
        flows: HashMap::new(),
        holding: false,
        releasing: std::collections::VecDeque::new(),
        releasing_per_flow: HashMap::new(),
        queue: HoldQueue::new(limits.hold()),
        epoch: Instant::now(),
        rx,
    };
    Ok((UdpHandle { tx }, actor.run()))
}

struct Actor {
    service: String,
    listen: Arc<UdpSocket>,
    local: SocketAddr,
    backend: SocketAddr,
    limits: Limits,
    metrics: Arc<ServiceMetrics>,
    answers: Arc<AnswerWatch>,
    ids: IdSource,
    flows: HashMap<SocketAddr, Flow>,
    holding: bool,
    /// Held datagrams being released, in release order (round-robin across flows).
    releasing: std::collections::VecDeque<(SocketAddr, Vec<u8>)>,
    /// How many of `releasing` each flow has: its new datagrams queue behind them.
    releasing_per_flow: HashMap<SocketAddr, usize>,
    queue: HoldQueue<SocketAddr>,
    epoch: Instant,
    rx: mpsc::Receiver<UdpCmd>,
}

impl Actor {
    async fn run(mut self) {
        let mut bufs = vec![vec![0u8; MAX_DATAGRAM]; BATCH];
        let mut meta = [RecvMeta::default(); BATCH];
        let period = (self.limits.udp_idle_timeout() / 4)
            .min(self.limits.hold().max_age / 4)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pace = tokio::time::interval(RELEASE_TICK);
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                cmd = self.rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => break,
                },
                _ = pace.tick(), if !self.releasing.is_empty() => self.release_chunk(),
                r = self.listen.readable() => match r {
                    Ok(()) => self.client_batch(&mut bufs, &mut meta).await,
                    Err(e) => {
                        tracing::debug!(service = %self.service, listen = %self.local, "readable: {e}");
                    }
                },
                _ = tick.tick() => self.housekeeping(Instant::now()),
            }
        }
        self.forget_held();
        let n = self.flows.len() as i64;
        self.metrics.udp_flows.add(-n);
    }

    /// Takes what the listen socket holds (one `recvmmsg`) and handles it run by run of
    /// datagrams from one client, in arrival order.
    async fn client_batch(&mut self, bufs: &mut [Vec<u8>], meta: &mut [RecvMeta; BATCH]) {
        let listen = self.listen.clone();
        let n = match listen.try_io(Interest::READABLE, || {
            sys::recv_batch(listen.as_fd(), bufs, meta)
        }) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                tracing::debug!(service = %self.service, listen = %self.local, "recv: {e}");
                return;
            }
        };
        let mut i = 0;
        while i < n {
            let Some(from) = meta[i].from else {
                i += 1;
                continue;
            };
            let mut run: Vec<&[u8]> = Vec::with_capacity(n - i);
            while i < n && meta[i].from == Some(from) {
                if meta[i].truncated {
                    // A datagram is never passed on cut short.
                    self.metrics.drop_one(DropReason::UdpTooLong);
                } else {
                    run.push(&bufs[i][..meta[i].len]);
                }
                i += 1;
            }
            self.client_datagrams(&run, from).await;
        }
    }
    fn now_ms(&self, now: Instant) -> u64 {
        crate::util::millis(now.saturating_duration_since(self.epoch))
    }

    async fn command(&mut self, cmd: UdpCmd) {
        match cmd {
            UdpCmd::Hold(tx) => {
                // A release still under way goes out at once: what is held next queues behind.
                while !self.releasing.is_empty() {
                    self.release_chunk();
                }
                self.holding = true;
                let _ = tx.send(());
            }
            UdpCmd::Release(tx) => {
                let released = self.release();
                let _ = tx.send(released);
            }
            UdpCmd::Redirect(to, tx) => {
                let r = self.redirect(to).await;
                let _ = tx.send(r);
            }
            UdpCmd::CheckQuiet(tx) => {
                let v = self
                    .flows
                    .iter()
                    .filter_map(|(client, f)| {
                        let backlog = f.pending.datagrams.load(Ordering::Acquire)
                            + self.releasing_per_flow.get(client).copied().unwrap_or(0) as u64;
                        match sys::outq(f.upstream.as_fd()) {
                            Ok(0) if backlog == 0 => None,
                            r => Some(UnquiescedFlow {
                                proto: "udp".into(),
                                id: f.id,
                                client: *client,
                                reason: match &r {
                                    Err(e) => format!("SIOCOUTQ: {e}"),
                                    Ok(0) => format!(
                                        "{backlog} datagram(s) waiting for the upstream socket"
                                    ),
                                    Ok(_) => "datagrams queued upstream".into(),
                                },
                                upstream_outq: r.ok(),
                            }),
                        }
                    })
                    .collect();
                let _ = tx.send(v);
            }
            UdpCmd::List(tx) => {
                let now = self.now_ms(Instant::now());
                let v = self
                    .flows
                    .iter()
                    .map(|(client, f)| {
                        let held = self.queue.flow_usage(client);
                        let s = &f.shared;
                        UdpFlowInfo {
                            id: f.id,
                            client: *client,
                            listen: self.local,
                            backend: f.backend,
                            upstream_local: f
                                .upstream
                                .local_addr()
                                .unwrap_or_else(|_| unspecified(f.backend)),
                            datagrams_to_service: s.datagrams_to_service.load(Ordering::Relaxed),
                            datagrams_to_client: s.datagrams_to_client.load(Ordering::Relaxed),
                            bytes_to_service: s.bytes_to_service.load(Ordering::Relaxed),
                            bytes_to_client: s.bytes_to_client.load(Ordering::Relaxed),
                            idle_ms: now.saturating_sub(s.last_ms.load(Ordering::Relaxed)),
                            held_datagrams: held.datagrams as u64,
                            held_bytes: held.bytes as u64,
                        }
                    })
                    .collect();
                let _ = tx.send(v);
            }
        }
    }

    /// Handles consecutive datagrams from one client: holds them, or sends them upstream.
    async fn client_datagrams(&mut self, datagrams: &[&[u8]], from: SocketAddr) {
        if datagrams.is_empty() {
            return;
        }
        let now = Instant::now();
        if !self.flows.contains_key(&from) {
            if self.flows.len() >= self.limits.udp_max_flows.get() {
                self.metrics
                    .drop_n(DropReason::UdpFlowTableFull, datagrams.len() as u64);
                return;
            }
            match self.new_flow(from) {
                Ok(f) => {
                    self.flows.insert(from, f);
                    self.metrics.udp_flows.add(1);
                    self.metrics.udp_flows_total.inc();
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, client = %from, backend = %self.backend, "new UDP flow: {e}");
                    self.metrics
                        .drop_n(DropReason::UdpUpstreamSocket, datagrams.len() as u64);
                    return;
                }
            }
        }
        let now_ms = self.now_ms(now);
        if let Some(f) = self.flows.get(&from) {
            f.shared.last_ms.store(now_ms, Ordering::Relaxed);
        }
        if let Some(n) = self.releasing_per_flow.get_mut(&from) {
            // Behind the flow's datagrams still being released, within the hold limits.
            let room = self.limits.hold().flow_datagrams.saturating_sub(*n);
            *n += datagrams.len().min(room);
            for (i, data) in datagrams.iter().enumerate() {
                if i < room {
                    self.releasing.push_back((from, data.to_vec()));
                } else {
                    self.metrics.drop_one(DropReason::HoldFlowDatagrams);
                }
            }
        } else if self.holding {
            self.expire(now);
            for data in datagrams {
                match self.queue.push(from, data.to_vec(), now) {
                    Ok(()) => {
                        self.metrics.held_datagrams.add(1);
                        self.metrics.held_bytes.add(data.len() as i64);
                    }
                    Err(reason) => self.metrics.drop_one(reason),
                }
            }
        } else {
            self.send(from, datagrams);
        }
    }

    /// Sends datagrams of `client`'s flow upstream, in order, batched, without waiting: what the
    /// socket cannot take at once (or everything, while the flow has a backlog) goes to the
    /// flow's backlog, within its bounds. Returns what was sent or queued (a datagram that fails
    /// or does not fit is counted as a drop and the rest go on).
    fn send(&self, client: SocketAddr, datagrams: &[&[u8]]) -> Usage {
        let mut sent = Usage::default();
        let Some(f) = self.flows.get(&client) else {
            self.metrics
                .drop_n(DropReason::UdpUpstreamSend, datagrams.len() as u64);
            return sent;
        };
        let mut at = 0;
        if f.pending.datagrams.load(Ordering::Acquire) == 0 {
            let r = send_now(&f.upstream, datagrams, &self.service, client, |_| {
                self.metrics.drop_one(DropReason::UdpUpstreamSend)
            });
            count_to_service(&f.shared, &self.metrics, r.datagrams, r.bytes);
            sent.datagrams += r.datagrams;
            sent.bytes += r.bytes;
            at = r.consumed;
        }
        let limits = self.limits.hold();
        for d in datagrams[at..].iter() {
            let p = &f.pending;
            let full = p.datagrams.load(Ordering::Acquire) as usize >= limits.flow_datagrams
                || p.bytes.load(Ordering::Acquire) as usize + d.len() > limits.flow_bytes;
            if full {
                self.metrics.drop_one(DropReason::UdpUpstreamBacklog);
                continue;
            }
            p.datagrams.fetch_add(1, Ordering::AcqRel);
            p.bytes.fetch_add(d.len() as u64, Ordering::AcqRel);
            if f.backlog.try_send(d.to_vec()).is_err() {
                p.datagrams.fetch_sub(1, Ordering::AcqRel);
                p.bytes.fetch_sub(d.len() as u64, Ordering::AcqRel);
                self.metrics.drop_one(DropReason::UdpUpstreamBacklog);
                continue;
            }
            sent.datagrams += 1;
            sent.bytes += d.len();
        }
        sent
    }

    fn new_flow(&self, client: SocketAddr) -> io::Result<Flow> {
        let sock = std::net::UdpSocket::bind(unspecified(self.backend))?;
        sock.set_nonblocking(true)?;
        sock.connect(self.backend)?;
        let upstream = Arc::new(UdpSocket::from_std(sock)?);
        let shared = Arc::new(FlowShared::default());
        let pending = Arc::new(Pending::default());
        // Bounded by the per-flow hold limits (checked before each push); the channel's own
        // capacity only backs that up.
        let (backlog, queued) = mpsc::channel(self.limits.hold().flow_datagrams.max(1));
        let writer = tokio::spawn(writer(
            upstream.clone(),
            queued,
            pending.clone(),
            shared.clone(),
            self.metrics.clone(),
            self.service.clone(),
            client,
        ));
        let reader = tokio::spawn(reader(
            upstream.clone(),
            self.listen.clone(),
            client,
            shared.clone(),
            self.metrics.clone(),
            self.answers.clone(),
            self.epoch,
        ));
        Ok(Flow {
            id: self.ids.fetch_add(1, Ordering::Relaxed),
            upstream,
            backend: self.backend,
            shared,
            reader,
            backlog,
            pending,
            writer,
        })
    }

    fn expire(&mut self, now: Instant) {
        let dropped = self.queue.expire(now);
        if dropped.datagrams > 0 {
            self.metrics
                .drop_n(DropReason::HoldAge, dropped.datagrams as u64);
            self.account_unheld(dropped);
        }
    }

    fn account_unheld(&self, u: Usage) {
        self.metrics.held_datagrams.add(-(u.datagrams as i64));
        self.metrics.held_bytes.add(-(u.bytes as i64));
    }

    /// Stops holding and starts releasing what is held: each flow's datagrams in their order,
    /// round-robin across flows (every flow's first, then every flow's second, ...), paced by
    /// [`release_chunk`](Self::release_chunk). Returns what is to be released.
    fn release(&mut self) -> Usage {
        self.expire(Instant::now());
        let (held, total) = self.queue.drain_round_robin();
        self.account_unheld(total);
        for h in held {
            *self.releasing_per_flow.entry(h.flow).or_default() += 1;
            self.releasing.push_back((h.flow, h.data));
        }
        self.holding = false;
        self.release_chunk();
        total
    }

    /// Sends the next [`RELEASE_CHUNK`] datagrams of the release, consecutive ones of a flow as
    /// one batch.
    fn release_chunk(&mut self) {
        let mut sent = 0u64;
        let mut n = 0;
        while n < RELEASE_CHUNK {
            let Some((flow, first)) = self.releasing.pop_front() else {
                break;
            };
            let mut run = vec![first];
            n += 1;
            while n < RELEASE_CHUNK && self.releasing.front().is_some_and(|(f, _)| *f == flow) {
                if let Some((_, d)) = self.releasing.pop_front() {
                    run.push(d);
                    n += 1;
                }
            }
            if let Some(c) = self.releasing_per_flow.get_mut(&flow) {
                *c = c.saturating_sub(run.len());
                if *c == 0 {
                    self.releasing_per_flow.remove(&flow);
                }
            }
            let refs: Vec<&[u8]> = run.iter().map(Vec::as_slice).collect();
            sent += self.send(flow, &refs).datagrams as u64;
        }
        self.metrics.released_datagrams_total.add(sent);
    }

    async fn redirect(&mut self, to: SocketAddr) -> (u64, u64) {
        self.backend = to;
        let mut ok = 0;
        let mut failed = Vec::new();
        for (client, f) in self.flows.iter_mut() {
            match f.upstream.connect(to).await {
                Ok(()) => {
                    f.backend = to;
                    ok += 1;
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, %client, %to, "re-pointing UDP flow: {e}");
                    failed.push(*client);
                }
            }
        }
        for client in &failed {
            self.remove_flow(client);
        }
        (ok, failed.len() as u64)
    }

    fn remove_flow(&mut self, client: &SocketAddr) {
        if self.flows.remove(client).is_some() {
            self.metrics.udp_flows.add(-1);
            let u = self.queue.remove_flow(client);
            if u.datagrams > 0 {
                self.account_unheld(u);
                self.metrics
                    .drop_n(DropReason::UdpUpstreamSocket, u.datagrams as u64);
            }
        }
    }

    fn housekeeping(&mut self, now: Instant) {
        if self.holding {
            self.expire(now);
            return;
        }
        let idle = self.limits.udp_idle_timeout_ms;
        let now_ms = self.now_ms(now);
        let stale: Vec<SocketAddr> = self
            .flows
            .iter()
            .filter(|(_, f)| now_ms.saturating_sub(f.shared.last_ms.load(Ordering::Relaxed)) > idle)
            .map(|(c, _)| *c)
            .collect();
        for c in &stale {
            self.remove_flow(c);
        }
        if !stale.is_empty() {
            tracing::debug!(service = %self.service, listen = %self.local, "removed {} idle UDP flows", stale.len());
        }
    }

    fn forget_held(&mut self) {
        let u = self.queue.usage();
        self.account_unheld(u);
        while self.queue.pop().is_some() {}
    }
}

/// Sends as many of `datagrams` as the socket takes now (batched, in order). A pending ICMP error
/// from an earlier datagram (port unreachable while the service moved) is reported on a call
/// that sent nothing: retried once. A datagram that fails otherwise is passed to `dropped` and
/// skipped. Stops at the first that would block.
fn send_now(
    upstream: &UdpSocket,
    datagrams: &[&[u8]],
    service: &str,
    client: SocketAddr,
    mut dropped: impl FnMut(&[u8]),
) -> Sent {
    let (mut at, mut sent, mut bytes) = (0, 0, 0);
    let mut retried = false;
    while at < datagrams.len() {
        let left = &datagrams[at..];
        match upstream.try_io(Interest::WRITABLE, || {
            sys::send_batch(upstream.as_fd(), left, None)
        }) {
            Ok(n) => {
                bytes += left[..n].iter().map(|d| d.len()).sum::<usize>();
                at += n;
                sent += n;
                retried = false;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused && !retried => retried = true,
            Err(e) => {
                tracing::debug!(%service, %client, "send upstream: {e}");
                dropped(left[0]);
                at += 1;
                retried = false;
            }
        }
    }
    Sent {
        consumed: at,
        datagrams: sent,
        bytes,
    }
}

/// What [`send_now`] did.
struct Sent {
    /// Datagrams dealt with (sent or dropped), from the start.
    consumed: usize,
    /// Datagrams sent.
    datagrams: usize,
    /// Their bytes.
    bytes: usize,
}

fn count_to_service(shared: &FlowShared, metrics: &ServiceMetrics, n: usize, bytes: usize) {
    if n == 0 {
        return;
    }
    shared
        .datagrams_to_service
        .fetch_add(n as u64, Ordering::Relaxed);
    shared
        .bytes_to_service
        .fetch_add(bytes as u64, Ordering::Relaxed);
    metrics.udp_datagrams_to_service.add(n as u64);
    metrics.udp_bytes_to_service.add(bytes as u64);
}

fn count_to_client(shared: &FlowShared, metrics: &ServiceMetrics, n: usize, bytes: usize) {
    shared
        .datagrams_to_client
        .fetch_add(n as u64, Ordering::Relaxed);
    shared
        .bytes_to_client
        .fetch_add(bytes as u64, Ordering::Relaxed);
    metrics.udp_datagrams_to_client.add(n as u64);
    metrics.udp_bytes_to_client.add(bytes as u64);
}

/// Sends one flow's backlog upstream as its socket drains, in order; only this flow waits.
async fn writer(
    upstream: Arc<UdpSocket>,
    mut queued: mpsc::Receiver<Vec<u8>>,
    pending: Arc<Pending>,
    shared: Arc<FlowShared>,
    metrics: Arc<ServiceMetrics>,
    service: String,
    client: SocketAddr,
) {
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    loop {
        if queued.recv_many(&mut batch, BATCH).await == 0 {
            return;
        }
        let mut at = 0;
        while at < batch.len() {
            if upstream.writable().await.is_err() {
                return;
            }
            let refs: Vec<&[u8]> = batch[at..].iter().map(Vec::as_slice).collect();
            let r = send_now(&upstream, &refs, &service, client, |_| {
                metrics.drop_one(DropReason::UdpUpstreamSend)
            });
            count_to_service(&shared, &metrics, r.datagrams, r.bytes);
            let n = r.consumed;
            let done = &batch[at..at + n];
            pending
                .bytes
                .fetch_sub(done.iter().map(|d| d.len() as u64).sum(), Ordering::AcqRel);
            pending.datagrams.fetch_sub(n as u64, Ordering::AcqRel);
            at += n;
        }
        batch.clear();
    }
}

fn unspecified(like: SocketAddr) -> SocketAddr {
    if like.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0))
    }
}

thread_local! {
    /// Receive buffers of the flow reader tasks on this thread: one set per thread rather than
    /// one per flow (they are never held across an await).
    static RECV_BUFS: RefCell<Vec<Vec<u8>>> = RefCell::new(vec![vec![0; MAX_DATAGRAM]; BATCH]);
}

/// What one synchronous receive-and-forward step of a flow reader did.
enum Step {
    /// Datagrams and bytes sent to the client; `rest` holds copies of those the listen socket
    /// could not take at once.
    Sent {
        datagrams: usize,
        bytes: usize,
        rest: Vec<Vec<u8>>,
    },
    /// Nothing to read (readiness cleared).
    Idle,
}

/// Relays the service's datagrams of one flow to the client, from the listen socket.
async fn reader(
    upstream: Arc<UdpSocket>,
    listen: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<FlowShared>,
    metrics: Arc<ServiceMetrics>,
    answers: Arc<AnswerWatch>,
    epoch: Instant,
) {
    let mut errors = 0u32;
    let mut meta = [RecvMeta::default(); BATCH];
    loop {
        if upstream.readable().await.is_err() {
            return;
        }
        // Receive a batch and try to send it on in one synchronous step, so the shared buffers
        // are never held across an await; what the listen socket cannot take at once is copied.
        let step = RECV_BUFS.with(|b| -> io::Result<Step> {
            let mut bufs = b.borrow_mut();
            let n = match upstream.try_io(Interest::READABLE, || {
                sys::recv_batch(upstream.as_fd(), &mut bufs, &mut meta)
            }) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Idle),
                Err(e) => return Err(e),
            };
            let mut out: Vec<&[u8]> = Vec::with_capacity(n);
            for (m, buf) in meta[..n].iter().zip(bufs.iter()) {
                if m.truncated {
                    metrics.drop_one(DropReason::UdpTooLong);
                } else {
                    out.push(&buf[..m.len]);
                }
            }
            let mut sent = 0;
            while sent < out.len() {
                match sys::send_batch(listen.as_fd(), &out[sent..], Some(client)) {
                    Ok(k) => sent += k,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(%client, "send to client: {e}");
                        metrics.drop_one(DropReason::UdpClientSend);
                        out.remove(sent);
                    }
                }
            }
            let bytes = out.iter().map(|d| d.len()).sum();
            Ok(Step::Sent {
                datagrams: out.len(),
                bytes,
                rest: out[sent..].iter().map(|d| d.to_vec()).collect(),
            })
        });
        let (datagrams, bytes) = match step {
            Ok(Step::Idle) => continue,
            Ok(Step::Sent {
                datagrams,
                bytes,
                rest,
            }) => {
                let mut lost = (0, 0);
                for d in &rest {
                    if let Err(e) = listen.send_to(d, client).await {
                        tracing::debug!(%client, "send to client: {e}");
                        metrics.drop_one(DropReason::UdpClientSend);
                        lost = (lost.0 + 1, lost.1 + d.len());
                    }
                }
                (datagrams - lost.0, bytes - lost.1)
            }
            // ICMP errors from the service side (port unreachable while it moves): keep going.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                errors += 1;
                tracing::debug!(%client, "receive from service: {e}");
                if errors > 100 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                continue;
            }
        };
        if datagrams > 0 {
            errors = 0;
            let ms = crate::util::millis(epoch.elapsed());
            shared.last_ms.store(ms, Ordering::Relaxed);
            count_to_client(&shared, &metrics, datagrams, bytes);
            answers.seen(Transport::Udp);
        }
    }
}
