//! Example stateful service for live-migration tests.
//!
//! Listens on one IP:PORT over TCP and over UDP (QUIC), speaks the framing of
//! [`tether::workload::proto`] on every TCP connection and on every QUIC bidirectional stream,
//! and keeps a self-verifying memory state ([`tether::workload::State`]) that a background thread
//! keeps dirtying at a configured rate, so that a migration must carry changing memory.
//!
//! Built to be checkpointed by CRIU: it holds no descriptor beyond stdio and its own sockets
//! (inherited ones are closed at start), uses no io_uring, runs a tokio runtime with 2 worker
//! threads plus one plain dirtier thread, and exits 0 on SIGTERM/SIGINT (it is started as PID 1
//! of its own PID namespace, where default signal actions do not apply).
//!
//! State sharing: the state sits behind one `std::sync::Mutex`. The dirtier takes it for one small
//! batch of pages every 10 ms (a few µs to a few ms), a verify request takes it for one whole
//! scan. A verify thus sees a consistent snapshot (each page and the total-writes counter agree),
//! which a lock-free design could not give without stopping the writer anyway; dirtying simply
//! pauses during the scan (the credit lost while paused is capped, see `dirtier`). Verification
//! runs on tokio's blocking pool, so it never stalls the echo traffic of other connections.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::{Buf as _, BytesMut};
use clap::Parser;
use quinn::crypto::rustls::QuicServerConfig;
use tether::workload::proto::{self, Kind, Reply, ServerConn};
use tether::workload::{State, ALPN};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{debug, info, warn};

/// Example stateful service for tether live-migration tests: TCP and QUIC echo with sequence and
/// byte-count checks, plus a memory state that is continuously dirtied and can be verified.
#[derive(Debug, Parser)]
#[command(name = "service", version)]
struct Args {
    /// Address to listen on, for TCP and for UDP/QUIC alike (port 0 picks a free TCP port and
    /// uses the same number for UDP).
    #[arg(long, value_name = "IP:PORT", required_unless_present = "worker")]
    listen: Option<SocketAddr>,

    /// Size of the memory state in MiB (allocated and filled at start).
    #[arg(long, value_name = "N", default_value_t = 64)]
    state_mb: usize,

    /// Pages (4 KiB) of the state rewritten per second by the background dirtier; 0 disables it.
    #[arg(long, value_name = "R", default_value_t = 0)]
    dirty_pages_per_sec: u64,

    /// Worker processes to start beside the server (children of it, as in a pre-forking
    /// server): each holds a memory state of its own (--worker-state-mb, dirtied at the same
    /// rate), and a state verification checks theirs too, over a pipe to each.
    #[arg(long, value_name = "N", default_value_t = 0)]
    workers: u32,

    /// Memory state of each worker, MiB.
    #[arg(long, value_name = "N", default_value_t = 8)]
    worker_state_mb: usize,

    /// Run as a worker (started by the service itself): verify the state on each `verify` line
    /// on stdin, answer `ok <digest>` or `err <why>` on stdout, exit at end of input.
    #[arg(long, hide = true)]
    worker: bool,
}

/// A worker's pipes: requests to its stdin, answers from its stdout.
struct WorkerPipe {
    pid: u32,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
}

/// The workers this service started (empty when it has none).
static WORKERS: Mutex<Vec<WorkerPipe>> = Mutex::new(Vec::new());

/// Starts `n` workers: this program again, with `--worker`.
fn start_workers(args: &Args) -> Result<()> {
    let exe = std::env::current_exe().context("this program's path")?;
    let mut workers = WORKERS.lock().unwrap_or_else(PoisonError::into_inner);
    for i in 0..args.workers {
        let mut child = std::process::Command::new(&exe)
            .args([
                "--worker",
                "--state-mb",
                &args.worker_state_mb.to_string(),
                "--dirty-pages-per-sec",
                &args.dirty_pages_per_sec.to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting worker {i}"))?;
        let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("worker {i} has no pipes");
        };
        info!(worker = i, pid = child.id(), "worker started");
        workers.push(WorkerPipe {
            pid: child.id(),
            to,
            from: std::io::BufReader::new(from),
        });
    }
    Ok(())
}

/// Asks every worker to verify its state; the digests of all, combined, or the first failure.
fn verify_workers() -> Result<u64, String> {
    use std::io::BufRead as _;
    let mut workers = WORKERS.lock().unwrap_or_else(PoisonError::into_inner);
    let mut digest = 0u64;
    for (i, w) in workers.iter_mut().enumerate() {
        let mut line = String::new();
        writeln!(w.to, "verify")
            .and_then(|()| w.to.flush())
            .and_then(|()| w.from.read_line(&mut line))
            .map_err(|e| format!("worker {i} (pid {}): {e}", w.pid))?;
        match line.trim().split_once(' ') {
            Some(("ok", d)) => {
                let d = u64::from_str_radix(d.trim_start_matches("0x"), 16)
                    .map_err(|e| format!("worker {i}: bad digest {d}: {e}"))?;
                digest = digest.rotate_left(7) ^ d;
            }
            _ => return Err(format!("worker {i} (pid {}): {}", w.pid, line.trim())),
        }
    }
    Ok(digest)
}

/// A worker's life: its state, its dirtier, and verifications on request.
fn worker(args: &Args) -> Result<()> {
    use std::io::BufRead as _;
    let state: SharedState = Arc::new(Mutex::new(
        State::new(args.state_mb).context("allocating the state")?,
    ));
    if args.dirty_pages_per_sec > 0 {
        let st = Arc::clone(&state);
        let rate = args.dirty_pages_per_sec;
        std::thread::spawn(move || dirtier(&st, rate));
    }
    let mut out = std::io::stdout().lock();
    for line in std::io::stdin().lock().lines() {
        if line.context("reading a request")?.trim() != "verify" {
            continue;
        }
        let answer = match state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .verify()
        {
            Ok(d) => format!("ok {d:#018x}"),
            Err(e) => format!("err {e}"),
        };
        writeln!(out, "{answer}").and_then(|()| out.flush())?;
    }
    Ok(())
}

/// How often the dirtier wakes up.
const DIRTY_TICK: Duration = Duration::from_millis(10);
/// Longest stretch of time the dirtier catches up on after a pause (a long verify, a freeze, a
/// clock jump across a migration): the rate is kept, bursts are not.
const DIRTY_MAX_CATCH_UP: Duration = Duration::from_millis(100);

/// Bytes the service asks for per read.
const READ_CHUNK: usize = 16 * 1024;

type SharedState = Arc<Mutex<State>>;

fn main() -> ExitCode {
    let args = Args::parse();
    // Before anything opens a descriptor of its own.
    let closed = close_inherited_fds();
    // Thousands of connections need more than the common soft limit of 1024 descriptors.
    if let Ok((_, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        let _ =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }

    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if closed > 0 {
        warn!(closed, "closed inherited file descriptors");
    }

    let result = if args.worker {
        worker(&args)
    } else {
        run(args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Closes every descriptor above stdio: one inherited from a launcher (a pipe, say) would be
/// shared with a process outside the dumped tree, which CRIU refuses to checkpoint.
fn close_inherited_fds() -> usize {
    let fds: Vec<i32> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|&fd| fd > 2)
            .collect(),
        Err(_) => return 0,
    };
    // The directory's own descriptor is in the list but closed by now: close() fails with EBADF
    // for it, which is not counted.
    fds.into_iter()
        .filter(|&fd| nix::unistd::close(fd).is_ok())
        .count()
}

fn run(args: Args) -> Result<()> {
    let started = Instant::now();
    let state = State::new(args.state_mb).context("allocating the state")?;
    info!(
        mb = args.state_mb,
        pages = state.pages(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "state allocated and filled"
    );
    let state: SharedState = Arc::new(Mutex::new(state));
    start_workers(&args)?;

    if args.dirty_pages_per_sec > 0 {
        let st = Arc::clone(&state);
        let rate = args.dirty_pages_per_sec;
        std::thread::Builder::new()
            .name("dirtier".into())
            .spawn(move || dirtier(&st, rate))
            .context("spawning the dirtier thread")?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    rt.block_on(serve(args, state))
}

/// Rewrites `rate` pseudo-randomly chosen pages per second, in batches every [`DIRTY_TICK`].
fn dirtier(state: &Mutex<State>, rate: u64) {
    // xorshift64*: a deterministic, allocation-free page picker; the seed only needs to be
    // non-zero.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id());
    let mut next = move || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let mut last = Instant::now();
    let mut credit = 0f64;
    let mut reported_error = false;
    loop {
        std::thread::sleep(DIRTY_TICK);
        let now = Instant::now();
        let dt = now.saturating_duration_since(last).min(DIRTY_MAX_CATCH_UP);
        last = now;
        credit += rate as f64 * dt.as_secs_f64();
        let batch = credit.floor();
        credit -= batch;
        if batch < 1.0 {
            continue;
        }
        let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
        let pages = st.pages() as u64;
        if pages == 0 {
            return;
        }
        for _ in 0..batch as u64 {
            let i = (next() % pages) as usize;
            if let Err(e) = st.touch(i) {
                // Cannot happen (i < pages); report once rather than flood the log.
                if !reported_error {
                    warn!("dirtier: {e}");
                    reported_error = true;
                }
            }
        }
    }
}

async fn serve(args: Args, state: SharedState) -> Result<()> {
    let listen = args.listen.context("--listen is required")?;
    let tcp = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding TCP {listen}"))?;
    let addr = tcp.local_addr().context("TCP local address")?;
    let endpoint = quic_endpoint(addr)?;

    info!(%addr, "listening on TCP and UDP/QUIC");
    // stdout may be /dev/null or closed: a failed write is not an error of the service.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "service ready {addr}");
    let _ = out.flush();
    drop(out);

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;

    tokio::select! {
        _ = sigterm.recv() => info!("SIGTERM: exiting"),
        _ = sigint.recv() => info!("SIGINT: exiting"),
        r = accept_tcp(tcp, Arc::clone(&state)) => r?,
        () = accept_quic(endpoint.clone(), state) => {},
    }
    endpoint.close(0u32.into(), b"shutdown");
    // Leave without waiting for connection tasks or a running verification.
    std::process::exit(0);
}

fn quic_endpoint(addr: SocketAddr) -> Result<quinn::Endpoint> {
    let cert = rcgen::generate_simple_self_signed(vec![ALPN.to_string()])
        .context("generating the self-signed certificate")?;
    let cert_der = cert.cert.der().clone();
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.key_pair.serialize_der().into());

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .with_no_client_auth()
        .with_single_cert(vec![cert_der], key)
        .context("server certificate")?;
    tls.alpn_protocols = vec![ALPN.as_bytes().to_vec()];

    let crypto = QuicServerConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30)).context("idle timeout")?,
        ))
        .max_concurrent_bidi_streams(16u32.into())
        .max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));

    // A large receive buffer, as QUIC servers ask for (the kernel caps it at net.core.rmem_max):
    // when hundreds of connections resume after a move, their datagrams arrive at once, and the
    // default (208 KiB, about 90 full-size datagrams) overflows, costing clients a probe timeout.
    let socket =
        std::net::UdpSocket::bind(addr).with_context(|| format!("binding UDP/QUIC {addr}"))?;
    if let Err(e) = socket2::SockRef::from(&socket).set_recv_buffer_size(QUIC_RCVBUF) {
        tracing::warn!("SO_RCVBUF {QUIC_RCVBUF}: {e}");
    }
    let runtime = quinn::default_runtime().context("no async runtime for quinn")?;
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(config),
        socket,
        runtime,
    )
    .with_context(|| format!("QUIC endpoint on {addr}"))
}

/// Receive buffer asked for on the QUIC socket.
const QUIC_RCVBUF: usize = 4 << 20;

async fn accept_tcp(listener: TcpListener, state: SharedState) -> Result<()> {
    loop {
        match listener.accept().await {
            Ok((sock, peer)) => {
                if let Err(e) = sock.set_nodelay(true) {
                    warn!(%peer, "TCP_NODELAY: {e}");
                }
                let st = Arc::clone(&state);
                tokio::spawn(async move {
                    debug!(%peer, "tcp connection");
                    let (mut r, mut w) = sock.into_split();
                    match serve_stream(&mut r, &mut w, &st).await {
                        Ok(n) => debug!(%peer, requests = n, "tcp connection closed"),
                        Err(e) => info!(%peer, "tcp connection ended: {e:#}"),
                    }
                });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("TCP accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn accept_quic(endpoint: quinn::Endpoint, state: SharedState) {
    while let Some(incoming) = endpoint.accept().await {
        let st = Arc::clone(&state);
        tokio::spawn(async move {
            let peer = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    info!(%peer, "QUIC handshake failed: {e}");
                    return;
                }
            };
            debug!(%peer, "quic connection");
            loop {
                match conn.accept_bi().await {
                    Ok((mut send, mut recv)) => {
                        let st = Arc::clone(&st);
                        tokio::spawn(async move {
                            match serve_stream(&mut recv, &mut send, &st).await {
                                Ok(n) => {
                                    debug!(%peer, requests = n, "quic stream finished");
                                    let _ = send.finish();
                                }
                                Err(e) if closed_by_peer(&e) => {
                                    debug!(%peer, "quic stream ended: {e:#}")
                                }
                                Err(e) => info!(%peer, "quic stream ended: {e:#}"),
                            }
                        });
                    }
                    Err(e) => {
                        match e {
                            quinn::ConnectionError::ApplicationClosed(_)
                            | quinn::ConnectionError::LocallyClosed => {
                                debug!(%peer, "quic connection closed: {e}")
                            }
                            _ => info!(%peer, "quic connection ended: {e}"),
                        }
                        return;
                    }
                }
            }
        });
    }
}

/// Whether a stream error is the peer closing its QUIC connection on purpose.
fn closed_by_peer(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
        .is_some_and(|re| {
            matches!(
                re,
                quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(_))
            )
        })
}

/// Serves one byte stream until the peer closes it (returns the number of requests served) or a
/// protocol or I/O error (returned after a sequence error reply has been sent, if any).
async fn serve_stream<R, W>(r: &mut R, w: &mut W, state: &SharedState) -> Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut conn = ServerConn::new();
    let mut buf = BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        while let Some((req, used)) = proto::decode_request(&buf)? {
            buf.advance(used);
            let received = match conn.accept(&req) {
                Ok(received) => received,
                Err(e) => {
                    out.clear();
                    proto::encode_reply(
                        &Reply::sequence_error(&req, conn.received(), &e),
                        &mut out,
                    )?;
                    w.write_all(&out).await?;
                    w.flush().await?;
                    return Err(e.into());
                }
            };
            let reply = match req.kind {
                Kind::Echo => Reply::echo(&req, received),
                Kind::VerifyState => {
                    let st = Arc::clone(state);
                    let outcome = tokio::task::spawn_blocking(move || {
                        let started = Instant::now();
                        let res = st
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .verify()
                            .map_err(|e| e.to_string())
                            .and_then(|own| Ok(own ^ verify_workers()?));
                        (res, started.elapsed())
                    })
                    .await;
                    let (res, took) = outcome.context("verification task")?;
                    match &res {
                        Ok(digest) => info!(
                            digest = format_args!("{digest:#018x}"),
                            ms = took.as_millis() as u64,
                            "state verified"
                        ),
                        Err(e) => warn!("state verification FAILED: {e}"),
                    }
                    match res {
                        Ok(digest) => Reply::verify(req.seq, received, Ok(digest)),
                        Err(e) => Reply::verify(req.seq, received, Err(&e.to_string())),
                    }
                }
            };
            proto::encode_reply(&reply, &mut out)?;
        }
        if !out.is_empty() {
            w.write_all(&out).await?;
            w.flush().await?;
            out.clear();
        }
        // The buffer holds at most one partial frame (bounded by the decoder, which rejects a
        // length above the maximum from the header alone) plus one read.
        if buf.capacity() - buf.len() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        if r.read_buf(&mut buf).await? == 0 {
            if buf.is_empty() {
                return Ok(conn.next_seq());
            }
            anyhow::bail!(
                "peer closed the stream in the middle of a frame ({} bytes)",
                buf.len()
            );
        }
    }
}
