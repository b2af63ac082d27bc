//! The TCP data path: accept client connections, open one upstream connection each, and copy
//! both ways with an own loop that owns its buffers.
//!
//! - Client → service stops at a pause: the pump finishes writing what it has read, then reads
//!   nothing more (the kernel's flow control holds the rest, the client's FIN included) until
//!   the gate opens again.
//! - Service → client never stops.
//! - Half-close both ways: EOF from one side is passed on as `shutdown(SHUT_WR)` to the other,
//!   and the other direction goes on. An error on either side resets both connections
//!   (`SO_LINGER` 0), so that no side mistakes a failure for a clean end.
//! - Buffers: one per direction, allocated on first data, of the configured size. Backpressure is
//!   the kernel's: a pump that cannot write does not read.
//! - A connection accepted while the service is paused waits for the resume before it connects
//!   upstream, so that it goes to the (new) backend and no SYN is lost to the network lock.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::answer::Transport;
use crate::api::{TcpFlowInfo, UnquiescedFlow};
use crate::flowctx::FlowCtx;
use crate::metrics::{DropReason, GlobalMetrics};
use crate::sys;
use crate::util::millis;

/// No upstream connection; waiting for the gate to open before connecting.
const STAGE_WAITING: u8 = 0;
/// Connecting upstream.
const STAGE_CONNECTING: u8 = 1;
/// Upstream connection open; copying.
const STAGE_OPEN: u8 = 2;
/// Finished.
const STAGE_CLOSED: u8 = 3;

/// One client connection, as seen by the service's coordinator.
#[derive(Debug)]
pub(crate) struct TcpFlow {
    pub id: u64,
    pub client: SocketAddr,
    pub listen: SocketAddr,
    started: Instant,
    stage: AtomicU8,
    /// The client → service pump reads nothing and holds nothing (paused, or finished).
    c2s_idle: AtomicBool,
    upstream: OnceLock<TcpStream>,
    backend: OnceLock<SocketAddr>,
    bytes_to_service: AtomicU64,
    bytes_to_client: AtomicU64,
    abort: OnceLock<tokio::task::AbortHandle>,
}

impl TcpFlow {
    /// Why this flow is not quiet, or `None` if it is: it reads nothing from the client, holds
    /// nothing, and its upstream socket's send queue is empty (everything sent is acknowledged,
    /// FIN included).
    pub fn unquiesced(&self) -> Option<UnquiescedFlow> {
        let not = |reason: &str, outq| {
            Some(UnquiescedFlow {
                proto: "tcp".into(),
                id: self.id,
                client: self.client,
                reason: reason.into(),
                upstream_outq: outq,
            })
        };
        match self.stage.load(Ordering::SeqCst) {
            STAGE_WAITING | STAGE_CLOSED => None,
            STAGE_CONNECTING => not("connecting upstream", None),
            _ => {
                if !self.c2s_idle.load(Ordering::SeqCst) {
                    return not("still forwarding client data", None);
                }
                let up = self.upstream.get()?;
                match sys::outq(up.as_fd()) {
                    Ok(0) => None,
                    Ok(n) => not("unacknowledged bytes upstream", Some(n)),
                    Err(e) => not(&format!("SIOCOUTQ: {e}"), None),
                }
            }
        }
    }

    /// A snapshot for the `flows` command.
    pub fn info(&self, now: Instant) -> TcpFlowInfo {
        let stage = match self.stage.load(Ordering::SeqCst) {
            STAGE_WAITING => "waiting",
            STAGE_CONNECTING => "connecting",
            STAGE_OPEN => "open",
            _ => "closed",
        };
        let up = self.upstream.get();
        let tcpi = up.and_then(|u| sys::tcp_info(u.as_fd()).ok());
        TcpFlowInfo {
            id: self.id,
            client: self.client,
            listen: self.listen,
            stage: stage.into(),
            backend: self.backend.get().copied(),
            upstream_local: up.and_then(|u| u.local_addr().ok()),
            client_side_idle: self.c2s_idle.load(Ordering::SeqCst),
            bytes_to_service: self.bytes_to_service.load(Ordering::Relaxed),
            bytes_to_client: self.bytes_to_client.load(Ordering::Relaxed),
            age_ms: millis(now.saturating_duration_since(self.started)),
            upstream_outq: up.and_then(|u| sys::outq(u.as_fd()).ok()),
            upstream_unacked: tcpi.map(|t| t.unacked),
            upstream_rtt_us: tcpi.map(|t| t.rtt_us),
        }
    }

    /// Stops the flow's task (proxy shutdown).
    pub fn abort(&self) {
        if let Some(a) = self.abort.get() {
            a.abort();
        }
    }
}

/// The TCP flows of one service that are open now, by id.
#[derive(Debug, Default)]
pub(crate) struct TcpFlows(Mutex<HashMap<u64, Arc<TcpFlow>>>);

impl TcpFlows {
    fn map(&self) -> MutexGuard<'_, HashMap<u64, Arc<TcpFlow>>> {
        // Only inserts and removes happen under this lock.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, flow: Arc<TcpFlow>) {
        self.map().insert(flow.id, flow);
    }

    fn remove(&self, id: u64) {
        self.map().remove(&id);
    }

    /// The flows open now, in id order.
    pub fn snapshot(&self) -> Vec<Arc<TcpFlow>> {
        let mut v: Vec<_> = self.map().values().cloned().collect();
        v.sort_by_key(|f| f.id);
        v
    }
}

/// Binds a TCP listener with `SO_REUSEADDR` and a large backlog.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(4096)
}

/// Accepts connections on `listener` for the service of `ctx` until the task is aborted, and
/// keeps them in `flows` while they are open.
pub(crate) async fn accept_loop(ctx: Arc<FlowCtx>, flows: Arc<TcpFlows>, listener: TcpListener) {
    let listen = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(service = %ctx.name, "tcp listener: {e}");
            return;
        }
    };
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors or memory: back off instead of spinning.
                tracing::warn!(service = %ctx.name, %listen, "accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let limit = ctx.limits.max_tcp_flows.get();
        if usize::try_from(ctx.metrics.tcp_flows.get()).unwrap_or(0) >= limit {
            ctx.metrics.drop_one(DropReason::TcpFlowLimit);
            reset(&client);
            tracing::debug!(service = %ctx.name, %peer, "tcp flow limit {limit} reached");
            continue;
        }
        let flow = Arc::new(TcpFlow {
            id: ctx.next_flow_id(),
            client: peer,
            listen,
            started: Instant::now(),
            stage: AtomicU8::new(STAGE_WAITING),
            c2s_idle: AtomicBool::new(true),
            upstream: OnceLock::new(),
            backend: OnceLock::new(),
            bytes_to_service: AtomicU64::new(0),
            bytes_to_client: AtomicU64::new(0),
            abort: OnceLock::new(),
        });
        ctx.metrics.tcp_flows.add(1);
        ctx.metrics.tcp_flows_total.inc();
        flows.insert(flow.clone());
        let guard = FlowGuard {
            ctx: ctx.clone(),
            flows: flows.clone(),
            flow: flow.clone(),
        };
        let task = tokio::spawn(run_flow(guard, client));
        // A fresh OnceLock: the set cannot fail.
        let _ = flow.abort.set(task.abort_handle());
    }
}

/// Unregisters the flow when its task ends, however it ends.
struct FlowGuard {
    ctx: Arc<FlowCtx>,
    flows: Arc<TcpFlows>,
    flow: Arc<TcpFlow>,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        self.flow.stage.store(STAGE_CLOSED, Ordering::SeqCst);
        self.flow.c2s_idle.store(true, Ordering::SeqCst);
        self.flows.remove(self.flow.id);
        self.ctx.metrics.tcp_flows.add(-1);
    }
}

/// Resets a connection: `SO_LINGER` 0, so that closing it sends RST.
fn reset(s: &TcpStream) {
    let _ = s.set_zero_linger();
}

/// Waits until the gate is open. `Err` if the proxy is shutting down.
async fn gate_open(
    gate: &mut watch::Receiver<Option<SocketAddr>>,
) -> Result<(), watch::error::RecvError> {
    gate.wait_for(Option::is_some).await.map(|_| ())
}

async fn run_flow(guard: FlowGuard, client: TcpStream) {
    let ctx = &guard.ctx;
    let flow = &guard.flow;
    let _ = client.set_nodelay(true);
    let mut gate = ctx.watch_gate();

    // Connect upstream only while the gate is open: announce the attempt first, then check the
    // gate (the coordinator closes the gate first, then looks at the stage), so that a pause
    // never misses a connection attempt in flight.
    let backend = loop {
        flow.stage.store(STAGE_CONNECTING, Ordering::SeqCst);
        if let Some(backend) = *gate.borrow_and_update() {
            break backend;
        }
        flow.stage.store(STAGE_WAITING, Ordering::SeqCst);
        ctx.notify_parked();
        if gate_open(&mut gate).await.is_err() {
            return;
        }
    };
    let _ = flow.backend.set(backend);
    let upstream = match connect(backend, ctx.limits.connect_timeout()).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(service = %ctx.name, client = %flow.client, %backend, "upstream connect: {e}");
            ctx.metrics.drop_one(DropReason::TcpUpstreamConnect);
            reset(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    // A fresh OnceLock, set once here.
    let _ = flow.upstream.set(upstream);
    flow.c2s_idle.store(false, Ordering::SeqCst);
    flow.stage.store(STAGE_OPEN, Ordering::SeqCst);
    let Some(upstream) = flow.upstream.get() else {
        return;
    };

    let size = ctx.limits.tcp_buffer_bytes;
    let global = &ctx.global;
    let c2s = async {
        let mut buf = LazyBuf::new(size, global);
        let r = pump_c2s(&client, upstream, &mut buf, &mut gate, flow, ctx).await;
        drop(buf);
        flow.c2s_idle.store(true, Ordering::SeqCst);
        ctx.notify_parked();
        r
    };
    let s2c = async {
        let mut buf = LazyBuf::new(size, global);
        pump(upstream, &client, &mut buf, |n| {
            flow.bytes_to_client.fetch_add(n, Ordering::Relaxed);
            ctx.metrics.tcp_bytes_to_client.add(n);
            ctx.answers.seen(Transport::Tcp);
        })
        .await
    };
    if let Err(e) = tokio::try_join!(c2s, s2c) {
        tracing::debug!(service = %ctx.name, client = %flow.client, "flow {} reset: {e}", flow.id);
        reset(&client);
        reset(upstream);
    }
}

async fn connect(to: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(to)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
    }
}

/// A copy buffer allocated on first use and counted in the global buffer gauge.
struct LazyBuf<'a> {
    buf: Vec<u8>,
    size: usize,
    global: &'a GlobalMetrics,
}

impl<'a> LazyBuf<'a> {
    fn new(size: usize, global: &'a GlobalMetrics) -> LazyBuf<'a> {
        LazyBuf {
            buf: Vec::new(),
            size,
            global,
        }
    }
    fn get(&mut self) -> &mut [u8] {
        if self.buf.is_empty() {
            self.buf = vec![0; self.size];
            self.global
                .tcp_buffer_bytes
                .add(i64::try_from(self.size).unwrap_or(i64::MAX));
        }
        &mut self.buf
    }
}

impl Drop for LazyBuf<'_> {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.global
                .tcp_buffer_bytes
                .add(-i64::try_from(self.size).unwrap_or(i64::MAX));
        }
    }
}

/// Reads what is there (at least one byte, or 0 at EOF). Cancel-safe: nothing is lost when the
/// future is dropped before it completes.
async fn read_some(src: &TcpStream, buf: &mut LazyBuf<'_>) -> io::Result<usize> {
    loop {
        src.readable().await?;
        match src.try_read(buf.get()) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        dst.writable().await?;
        match dst.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn shutdown_write(s: &TcpStream) -> io::Result<()> {
    socket2::SockRef::from(s).shutdown(Shutdown::Write)
}

/// Copies `src` to `dst` until EOF, then half-closes `dst`.
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    buf: &mut LazyBuf<'_>,
    count: impl Fn(u64),
) -> io::Result<()> {
    loop {
        let n = read_some(src, buf).await?;
        if n == 0 {
            return shutdown_write(dst);
        }
        write_all(dst, &buf.buf[..n]).await?;
        count(n as u64);
    }
}

/// Copies client → service until EOF, stopping at the gate.
async fn pump_c2s(
    client: &TcpStream,
    upstream: &TcpStream,
    buf: &mut LazyBuf<'_>,
    gate: &mut watch::Receiver<Option<SocketAddr>>,
    flow: &TcpFlow,
    ctx: &FlowCtx,
) -> io::Result<()> {
    loop {
        // Here the buffer holds nothing. Announce that we may read, then check the gate (the
        // coordinator closes the gate, then checks `c2s_idle`).
        flow.c2s_idle.store(false, Ordering::SeqCst);
        if gate.borrow_and_update().is_none() {
            flow.c2s_idle.store(true, Ordering::SeqCst);
            ctx.notify_parked();
            if gate_open(gate).await.is_err() {
                // Proxy shutting down: stop quietly.
                return std::future::pending().await;
            }
            continue;
        }
        let n = tokio::select! {
            biased;
            r = gate.changed() => {
                if r.is_err() {
                    return std::future::pending().await;
                }
                continue;
            }
            r = read_some(client, buf) => r?,
        };
        if n == 0 {
            return shutdown_write(upstream);
        }
        write_all(upstream, &buf.buf[..n]).await?;
        flow.bytes_to_service.fetch_add(n as u64, Ordering::Relaxed);
        ctx.metrics.tcp_bytes_to_service.add(n as u64);
    }
}
