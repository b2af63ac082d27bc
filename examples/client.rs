//! Load client for the example service (`examples/service.rs`), built to run across live
//! migrations and to notice anything a migration breaks.
//!
//! Every connection (TCP, or one bidirectional stream on its own QUIC connection) runs a closed
//! loop of echo requests with random payloads and checks each reply's magic, sequence number,
//! the server's running byte count and the payload transform; so a lost, duplicated, reordered or
//! corrupted byte, a reset or a dropped connection is caught, and the longest gap between two
//! good replies (the stall a migration causes) is measured. A connection that fails is recorded
//! and NOT reconnected: a dropped connection is precisely the failure under test.
//!
//! At the end (after `--duration` or on SIGTERM/SIGINT) one JSON object goes to stdout (and to
//! `--json FILE`); the exit status is 0 if nothing went wrong, 1 otherwise. See `Summary` for
//! the format.

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use bytes::{Buf as _, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use quinn::crypto::rustls::QuicClientConfig;
use rand::rngs::StdRng;
use rand::{RngCore as _, SeedableRng as _};
use serde::Serialize;
use tether::workload::proto::{
    self, ClientConn, Kind, ProtocolError, Reply, ReplyMismatch, ReplyOutcome, MAX_PAYLOAD,
};
use tether::workload::ALPN;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Load client for the tether example service: closed-loop echo over TCP connections and QUIC
/// streams that detects lost, duplicated, reordered or corrupted bytes, resets and dropped
/// connections, and measures the longest stall. Prints one JSON summary to stdout.
#[derive(Debug, Parser)]
#[command(name = "client", version)]
struct Args {
    /// Address of the service (TCP and UDP/QUIC).
    #[arg(long, value_name = "IP:PORT")]
    target: SocketAddr,

    /// Number of TCP connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    tcp: usize,

    /// Idle TCP connections besides: each is opened at the start (all at once), makes one
    /// verified echo request, stays silent until the end of the run, then makes one more (a
    /// service with many quiet clients, each still checked after whatever happened meanwhile).
    #[arg(long, value_name = "N", default_value_t = 0)]
    idle: usize,

    /// Number of QUIC connections (one bidirectional stream each).
    #[arg(long, value_name = "M", default_value_t = 0)]
    quic: usize,

    /// How long to run, in seconds (fractions allowed). SIGTERM/SIGINT end the run earlier.
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    duration: f64,

    /// Pause between a reply and the next request of a connection, in ms (0: none).
    #[arg(long, value_name = "K", default_value_t = 1)]
    interval_ms: u64,

    /// Random payload bytes per echo request (at most 65536).
    #[arg(long, value_name = "B", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(0..=MAX_PAYLOAD as i64))]
    payload_bytes: u32,

    /// Also verify the service's memory state every S seconds over an extra TCP connection.
    #[arg(long, value_name = "S")]
    verify_every_secs: Option<f64>,

    /// Also write the JSON summary to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,

    /// One-shot mode: send one state verification request over one TCP connection, print
    /// {"ok":bool,"digest":N,"digest_hex":"0x.."} (or {"ok":false,"error":".."}) and exit 0 if
    /// the state is intact, 1 otherwise.
    #[arg(long)]
    verify_state: bool,

    /// Delay between the starts of two consecutive connections, in ms.
    #[arg(long, value_name = "MS", default_value_t = 2)]
    stagger_ms: u64,

    /// Timeout for establishing a connection (TCP connect, QUIC handshake), in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    connect_timeout_secs: f64,

    /// At the end of the run, how long to wait for replies still in flight, in seconds. A reply
    /// that has not come by then is an error ("no reply").
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    drain_secs: f64,
}

/// How long the one-shot `--verify-state` waits for its reply (a scan of a large state in a
/// debug build can take seconds).
const ONE_SHOT_REPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// Most error descriptions listed in the summary.
const MAX_LISTED_ERRORS: usize = 20;
/// Bytes asked for per read.
const READ_CHUNK: usize = 16 * 1024;

fn secs(name: &str, v: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{name} must be a non-negative number of seconds"))
}

fn main() -> ExitCode {
    let args = Args::parse();
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
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("client: building the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let res = if args.verify_state {
        rt.block_on(one_shot_verify(&args))
    } else {
        rt.block_on(load(&args))
    };
    match res {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("client: {e:#}");
            ExitCode::from(2)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Connection plumbing shared by TCP and QUIC

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Tcp,
    Quic,
    /// An idle TCP connection (`--idle`).
    IdleTcp,
}

/// Why a connection stopped early.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Io(io::Error),
    Eof,
    Protocol(ProtocolError),
    Mismatch(ReplyMismatch),
    NoReply(Duration),
    TrailingBytes(usize),
    Internal(&'static str),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connection setup failed: {e}"),
            Failure::Io(e) => f.write_str(&error_chain(e)),
            Failure::Eof => f.write_str("connection closed by peer"),
            Failure::Protocol(e) => write!(f, "malformed reply: {e}"),
            Failure::Mismatch(e) => write!(f, "bad reply: {e}"),
            Failure::NoReply(d) => write!(
                f,
                "no reply at the end of the run, request outstanding for {} ms",
                d.as_millis()
            ),
            Failure::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the last reply"),
            Failure::Internal(e) => write!(f, "internal error: {e}"),
        }
    }
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Self {
        Failure::Protocol(e)
    }
}

impl From<ReplyMismatch> for Failure {
    fn from(e: ReplyMismatch) -> Self {
        Failure::Mismatch(e)
    }
}

/// "outer: cause: cause", skipping causes already contained in the text so far.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            let _ = write!(s, ": {t}");
        }
        cur = c.source();
    }
    s
}

impl Failure {
    /// Whether the failure is a reset by the peer: ECONNRESET on TCP; for QUIC a stream reset,
    /// a STOP_SENDING or a stateless reset (the peer lost the connection's state).
    fn is_reset(&self, proto: Proto) -> bool {
        let Failure::Io(e) = self else { return false };
        match proto {
            Proto::Tcp | Proto::IdleTcp => e.kind() == io::ErrorKind::ConnectionReset,
            Proto::Quic => {
                let Some(inner) = e.get_ref() else {
                    return false;
                };
                if let Some(re) = inner.downcast_ref::<quinn::ReadError>() {
                    matches!(
                        re,
                        quinn::ReadError::Reset(_)
                            | quinn::ReadError::ConnectionLost(quinn::ConnectionError::Reset)
                    )
                } else if let Some(we) = inner.downcast_ref::<quinn::WriteError>() {
                    matches!(
                        we,
                        quinn::WriteError::Stopped(_)
                            | quinn::WriteError::ConnectionLost(quinn::ConnectionError::Reset)
                    )
                } else {
                    false
                }
            }
        }
    }
}

/// Sends `out` and reads one reply.
async fn exchange<R, W>(
    r: &mut R,
    w: &mut W,
    out: &[u8],
    buf: &mut BytesMut,
) -> Result<Reply, Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    w.write_all(out).await?;
    w.flush().await?;
    read_reply(r, buf).await
}

async fn read_reply<R: AsyncRead + Unpin>(r: &mut R, buf: &mut BytesMut) -> Result<Reply, Failure> {
    loop {
        if let Some((reply, used)) = proto::decode_reply(buf)? {
            buf.advance(used);
            return Ok(reply);
        }
        if buf.capacity() - buf.len() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        if r.read_buf(buf).await? == 0 {
            return Err(Failure::Eof);
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // Bounds 1 µs ..= 1 h with 3 significant digits are valid constants (low >= 1, high >= 2 *
    // low, sigfig <= 5), so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// What one echo connection did.
#[derive(Debug)]
struct ConnReport {
    proto: Proto,
    label: String,
    requests: u64,
    bytes: u64,
    max_stall: Duration,
    hist: Histogram<u64>,
    /// Each request's send time and wait, at most [`MAX_SAMPLES`]: to tell the latency right
    /// after the connection's longest wait (a move's stall) from the steady state.
    samples: Vec<(Instant, Duration)>,
    failure: Option<Failure>,
}

/// Most requests a connection keeps for [`split_at_stall`] (16 bytes each).
const MAX_SAMPLES: usize = 1 << 20;
/// How long after the end of a connection's longest wait its requests count as "after the
/// stall": a lazy restore's fill of tens of MiB ends well within it.
const AFTER_STALL: Duration = Duration::from_secs(1);

/// The waits of one connection's requests, split at its longest wait: those sent before it
/// (the steady state) and those sent within [`AFTER_STALL`] after its reply came (the service
/// resumed, its memory possibly still filling in). The longest wait itself is in neither.
fn split_at_stall(samples: &[(Instant, Duration)]) -> (Vec<Duration>, Vec<Duration>) {
    let Some((k, &(sent, wait))) = samples.iter().enumerate().max_by_key(|(_, (_, w))| *w) else {
        return (Vec::new(), Vec::new());
    };
    let resumed = sent + wait;
    let before = samples[..k].iter().map(|(_, w)| *w).collect();
    let after = samples[k + 1..]
        .iter()
        .filter(|(s, _)| *s >= resumed && *s < resumed + AFTER_STALL)
        .map(|(_, w)| *w)
        .collect();
    (before, after)
}

#[derive(Debug, Clone, Copy)]
struct LoopCfg {
    interval: Duration,
    payload_bytes: usize,
    drain: Duration,
    connect_timeout: Duration,
}

/// Resolves once the run is to stop (or the stop channel is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard returned by wait_for is not Send: drop it here.
    let _ = stop.wait_for(|s| *s).await;
}

/// Awaits `fut`; once `stop` is raised, gives it at most `drain` more. `None` if it did not
/// complete in time.
async fn until_drained<F: std::future::Future>(
    fut: F,
    stop: &mut watch::Receiver<bool>,
    drain: Duration,
) -> Option<F::Output> {
    tokio::pin!(fut);
    tokio::select! {
        biased;
        out = &mut fut => Some(out),
        () = stopped(stop) => tokio::time::timeout(drain, &mut fut).await.ok(),
    }
}

/// The closed echo loop of one connection; fills `rep` as it goes.
async fn echo_loop<R, W>(
    r: &mut R,
    w: &mut W,
    cfg: &LoopCfg,
    stop: &mut watch::Receiver<bool>,
    rep: &mut ConnReport,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut conn = ClientConn::new();
    let mut rng = StdRng::from_entropy();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(proto::REQUEST_HEADER_LEN + cfg.payload_bytes);
    let mut last_ok: Option<Instant> = None;
    loop {
        if *stop.borrow() {
            break;
        }
        let mut payload = vec![0u8; cfg.payload_bytes];
        rng.fill_bytes(&mut payload);
        let req = conn.next_request(Kind::Echo, payload);
        out.clear();
        proto::encode_request(&req, &mut out)?;
        let sent = Instant::now();
        let since = last_ok.unwrap_or(sent);

        let res = until_drained(exchange(r, w, &out, &mut buf), stop, cfg.drain).await;
        let now = Instant::now();
        // A failure's wait counts as a stall too.
        rep.max_stall = rep.max_stall.max(now - since);
        let reply = match res {
            Some(res) => res?,
            None => return Err(Failure::NoReply(now - sent)),
        };
        let ReplyOutcome::Echo { bytes } = conn.check_reply(&req, &reply)? else {
            // check_reply answers Echo for every accepted echo request.
            return Err(Failure::Internal("non-echo outcome for an echo request"));
        };
        rep.bytes += bytes as u64;
        rep.requests += 1;
        rep.hist.saturating_record(
            u64::try_from((now - sent).as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        if rep.samples.len() < MAX_SAMPLES {
            rep.samples.push((sent, now - sent));
        }
        last_ok = Some(now);

        if !cfg.interval.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(cfg.interval) => {}
                () = stopped(stop) => break,
            }
        }
    }
    if !buf.is_empty() {
        return Err(Failure::TrailingBytes(buf.len()));
    }
    Ok(())
}

impl ConnReport {
    fn new(proto: Proto, label: String) -> ConnReport {
        ConnReport {
            proto,
            label,
            requests: 0,
            bytes: 0,
            max_stall: Duration::ZERO,
            hist: new_histogram(),
            samples: Vec::new(),
            failure: None,
        }
    }
}

/// Opens a TCP connection within the configured time.
async fn connect_tcp(target: SocketAddr, cfg: &LoopCfg) -> Result<TcpStream, Failure> {
    match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(target)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(Failure::Connect(e.to_string())),
        Err(_) => Err(Failure::Connect("timed out".into())),
    }
}

async fn tcp_conn(
    id: usize,
    target: SocketAddr,
    cfg: LoopCfg,
    mut stop: watch::Receiver<bool>,
) -> ConnReport {
    let mut rep = ConnReport::new(Proto::Tcp, format!("tcp#{id}"));
    let sock = match connect_tcp(target, &cfg).await {
        Ok(s) => s,
        Err(f) => {
            rep.failure = Some(f);
            return rep;
        }
    };
    if let Err(e) = sock.set_nodelay(true) {
        warn!("{}: TCP_NODELAY: {e}", rep.label);
    }
    let (mut r, mut w) = sock.into_split();
    let res = echo_loop(&mut r, &mut w, &cfg, &mut stop, &mut rep).await;
    match res {
        Ok(()) => {
            let _ = w.shutdown().await;
        }
        Err(f) => rep.failure = Some(f),
    }
    rep
}

/// One idle connection (`--idle`): a verified echo at the start, silence until `stop`, a
/// verified echo at the end.
async fn idle_conn(
    id: usize,
    target: SocketAddr,
    cfg: LoopCfg,
    mut stop: watch::Receiver<bool>,
) -> ConnReport {
    let mut rep = ConnReport::new(Proto::IdleTcp, format!("idle#{id}"));
    let sock = match connect_tcp(target, &cfg).await {
        Ok(s) => s,
        Err(f) => {
            rep.failure = Some(f);
            return rep;
        }
    };
    let _ = sock.set_nodelay(true);
    let (mut r, mut w) = sock.into_split();
    let mut conn = ClientConn::new();
    let mut rng = StdRng::from_entropy();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut once = async |rep: &mut ConnReport| -> Result<(), Failure> {
        let mut payload = vec![0u8; cfg.payload_bytes];
        rng.fill_bytes(&mut payload);
        let req = conn.next_request(Kind::Echo, payload);
        let mut out = Vec::with_capacity(proto::REQUEST_HEADER_LEN + cfg.payload_bytes);
        proto::encode_request(&req, &mut out)?;
        let sent = Instant::now();
        let reply = tokio::time::timeout(cfg.drain, exchange(&mut r, &mut w, &out, &mut buf))
            .await
            .map_err(|_| Failure::NoReply(sent.elapsed()))??;
        let ReplyOutcome::Echo { bytes } = conn.check_reply(&req, &reply)? else {
            return Err(Failure::Internal("non-echo outcome for an echo request"));
        };
        rep.bytes += bytes as u64;
        rep.requests += 1;
        rep.hist.saturating_record(
            u64::try_from(sent.elapsed().as_micros())
                .unwrap_or(u64::MAX)
                .max(1),
        );
        Ok(())
    };
    if let Err(f) = once(&mut rep).await {
        rep.failure = Some(f);
        return rep;
    }
    stopped(&mut stop).await;
    if let Err(f) = once(&mut rep).await {
        rep.failure = Some(f);
        return rep;
    }
    let _ = w.shutdown().await;
    rep
}

/// Accepts any server certificate. For this test client only: it talks to a throw-away
/// self-signed certificate and checks data integrity itself; never use this against a real
/// server (it allows any man in the middle).
#[derive(Debug)]
struct AcceptAnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn quic_client_config() -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 with the ring provider")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.as_bytes().to_vec()];
    let crypto = QuicClientConfig::try_from(tls).context("QUIC TLS configuration")?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // A migration freezes the server for up to seconds: keep the connection alive and let it
    // sit idle far longer than that before giving up.
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(Duration::from_secs(30)).context("idle timeout")?,
        ))
        .keep_alive_interval(Some(Duration::from_secs(1)));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

async fn quic_conn(
    id: usize,
    target: SocketAddr,
    config: quinn::ClientConfig,
    cfg: LoopCfg,
    mut stop: watch::Receiver<bool>,
) -> ConnReport {
    let mut rep = ConnReport::new(Proto::Quic, format!("quic#{id}"));
    let setup = async {
        let bind: SocketAddr = if target.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        // One endpoint (UDP socket) per connection, like independent clients.
        let endpoint = quinn::Endpoint::client(bind).map_err(|e| e.to_string())?;
        let conn = endpoint
            .connect_with(config, target, ALPN)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| error_chain(&e))?;
        let (send, recv) = conn.open_bi().await.map_err(|e| error_chain(&e))?;
        Ok::<_, String>((endpoint, conn, send, recv))
    };
    let (endpoint, conn, mut send, mut recv) =
        match tokio::time::timeout(cfg.connect_timeout, setup).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                rep.failure = Some(Failure::Connect(e));
                return rep;
            }
            Err(_) => {
                rep.failure = Some(Failure::Connect("timed out".into()));
                return rep;
            }
        };
    let res = echo_loop(&mut recv, &mut send, &cfg, &mut stop, &mut rep).await;
    match res {
        Ok(()) => {
            // Graceful end: finish our side, let the server see it and finish its side, then
            // close the connection (closing at once would discard the FIN in flight).
            let _ = send.finish();
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                recv.read_to_end(proto::MAX_REPLY_LEN),
            )
            .await;
            conn.close(0u32.into(), b"done");
        }
        Err(f) => {
            rep.failure = Some(f);
            conn.close(1u32.into(), b"client error");
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
    rep
}

// ---------------------------------------------------------------------------------------------
// State verification

/// Connects and sends verification requests until stopped.
#[derive(Debug, Default)]
struct VerifyReport {
    ok: u64,
    failed: u64,
    failures: Vec<String>,
    connection_error: Option<String>,
}

async fn verify_loop(
    target: SocketAddr,
    every: Duration,
    cfg: LoopCfg,
    mut stop: watch::Receiver<bool>,
) -> VerifyReport {
    let mut rep = VerifyReport::default();
    let mut requests = 0u64;
    let res: Result<(), Failure> = async {
        let sock = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(target)).await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(Failure::Connect(e.to_string())),
            Err(_) => return Err(Failure::Connect("timed out".into())),
        };
        let _ = sock.set_nodelay(true);
        let (mut r, mut w) = sock.into_split();
        let mut conn = ClientConn::new();
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = Vec::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                () = stopped(&mut stop) => break,
            }
            let req = conn.next_request(Kind::VerifyState, Vec::new());
            out.clear();
            proto::encode_request(&req, &mut out)?;
            let sent = Instant::now();
            let reply = match until_drained(
                exchange(&mut r, &mut w, &out, &mut buf),
                &mut stop,
                cfg.drain,
            )
            .await
            {
                Some(res) => res?,
                None => return Err(Failure::NoReply(sent.elapsed())),
            };
            requests += 1;
            match conn.check_reply(&req, &reply)? {
                ReplyOutcome::StateOk { digest } => {
                    rep.ok += 1;
                    debug!(
                        digest = format_args!("{digest:#018x}"),
                        ms = sent.elapsed().as_millis() as u64,
                        "state verified"
                    );
                }
                ReplyOutcome::StateFailed { message } => {
                    rep.failed += 1;
                    warn!("state verification FAILED: {message}");
                    rep.failures
                        .push(format!("state verification failed: {message}"));
                }
                ReplyOutcome::Echo { .. } => {
                    // check_reply answers Echo only for echo requests.
                    return Err(Failure::Internal("echo outcome for a verify request"));
                }
            }
        }
        let _ = w.shutdown().await;
        Ok(())
    }
    .await;
    if let Err(f) = res {
        rep.connection_error = Some(format!("conn verify: {f} after {requests} requests"));
    }
    rep
}

// ---------------------------------------------------------------------------------------------
// Summary

/// Latency percentiles in µs.
#[derive(Debug, Serialize)]
struct Latency {
    p50: u64,
    p99: u64,
    p999: u64,
    max: u64,
}

/// Totals of one protocol.
#[derive(Debug, Serialize)]
struct ProtoSummary {
    /// Connections attempted.
    connections: usize,
    /// Connections that ran to the end without any error.
    ok_connections: usize,
    /// Requests whose reply was verified.
    requests: u64,
    /// Echo payload bytes verified.
    bytes_verified: u64,
    /// Connections that failed (setup, I/O, bad reply, no reply at the end).
    errors: usize,
    /// Of those, failures that were resets by the peer.
    resets: usize,
    /// Longest gap between consecutive good replies (or first send and first reply, or the last
    /// good reply and a failure) over all connections.
    max_stall_ms: f64,
    /// The median and 99th percentile, over the connections, of each connection's longest gap.
    stall_p50_ms: f64,
    stall_p99_ms: f64,
    /// The longest wait for one reply (request sent to reply verified) over all connections,
    /// and the median and 99th percentile over the connections of each one's longest: a stall
    /// without the pause between requests.
    max_wait_ms: f64,
    wait_p50_ms: f64,
    wait_p99_ms: f64,
    /// Request latency (all connections' requests) before each connection's longest wait (the
    /// steady state) and within 1 s after it (a move's resume: a lazily restored service still
    /// filling its memory in), ms.
    steady_p50_ms: f64,
    steady_p99_ms: f64,
    after_stall_p50_ms: f64,
    after_stall_p99_ms: f64,
    /// Requests in each of those two sets.
    steady_requests: usize,
    after_stall_requests: usize,
    latency_us: Latency,
}

/// State verification totals.
#[derive(Debug, Serialize)]
struct VerifySummary {
    ok: u64,
    failed: u64,
    /// 1 if the verification connection itself failed, else 0.
    connection_errors: u64,
}

/// The JSON object printed at the end.
#[derive(Debug, Serialize)]
struct Summary {
    tcp: ProtoSummary,
    quic: ProtoSummary,
    /// The `--idle` connections (stall: not measured, they are silent by design).
    idle: ProtoSummary,
    state_verifications: VerifySummary,
    /// At most [`MAX_LISTED_ERRORS`] descriptions.
    errors: Vec<String>,
    /// No error, no reset, no failed verification.
    ok: bool,
    /// Wall time of the run, seconds.
    elapsed_s: f64,
}

fn summarize(proto: Proto, reports: &[ConnReport]) -> ProtoSummary {
    let mine: Vec<&ConnReport> = reports.iter().filter(|r| r.proto == proto).collect();
    let mut hist = new_histogram();
    for r in &mine {
        if let Err(e) = hist.add(&r.hist) {
            // All histograms share the same bounds; cannot happen.
            warn!("merging latency histograms: {e}");
        }
    }
    let max_stall = mine.iter().map(|r| r.max_stall).max().unwrap_or_default();
    let mut stalls: Vec<f64> = mine
        .iter()
        .map(|r| r.max_stall.as_micros() as f64 / 1000.0)
        .collect();
    stalls.sort_by(f64::total_cmp);
    let mut waits: Vec<f64> = mine
        .iter()
        .filter(|r| r.requests > 0)
        .map(|r| r.hist.max() as f64 / 1000.0)
        .collect();
    waits.sort_by(f64::total_cmp);
    let at = |v: &[f64], q: f64| -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
        v[i]
    };
    let pct = |q: f64| at(&stalls, q);
    let (mut steady, mut after): (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    for r in &mine {
        let (b, a) = split_at_stall(&r.samples);
        steady.extend(b.iter().map(|d| d.as_secs_f64() * 1e3));
        after.extend(a.iter().map(|d| d.as_secs_f64() * 1e3));
    }
    steady.sort_by(f64::total_cmp);
    after.sort_by(f64::total_cmp);
    let errors = mine.iter().filter(|r| r.failure.is_some()).count();
    ProtoSummary {
        connections: mine.len(),
        ok_connections: mine.len() - errors,
        requests: mine.iter().map(|r| r.requests).sum(),
        bytes_verified: mine.iter().map(|r| r.bytes).sum(),
        errors,
        resets: mine
            .iter()
            .filter(|r| r.failure.as_ref().is_some_and(|f| f.is_reset(proto)))
            .count(),
        max_stall_ms: max_stall.as_micros() as f64 / 1000.0,
        stall_p50_ms: pct(0.50),
        stall_p99_ms: pct(0.99),
        max_wait_ms: waits.last().copied().unwrap_or(0.0),
        wait_p50_ms: at(&waits, 0.50),
        wait_p99_ms: at(&waits, 0.99),
        steady_p50_ms: at(&steady, 0.50),
        steady_p99_ms: at(&steady, 0.99),
        after_stall_p50_ms: at(&after, 0.50),
        after_stall_p99_ms: at(&after, 0.99),
        steady_requests: steady.len(),
        after_stall_requests: after.len(),
        latency_us: Latency {
            p50: hist.value_at_quantile(0.50),
            p99: hist.value_at_quantile(0.99),
            p999: hist.value_at_quantile(0.999),
            max: hist.max(),
        },
    }
}

fn emit(json: &str, file: Option<&PathBuf>) -> Result<()> {
    println!("{json}");
    if let Some(path) = file {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Modes

/// Raises `stop` at the deadline or on SIGTERM/SIGINT.
async fn stopper(stop: watch::Sender<bool>, run_for: Duration) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! {
            () = tokio::time::sleep(run_for) => {}
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
        let _ = stop.send(true);
        // Keep the sender alive: receivers treat a closed channel as "stop" anyway.
        std::future::pending::<()>().await;
    });
    Ok(())
}

async fn load(args: &Args) -> Result<bool> {
    let started = Instant::now();
    let cfg = LoopCfg {
        interval: Duration::from_millis(args.interval_ms),
        payload_bytes: args.payload_bytes as usize,
        drain: secs("drain-secs", args.drain_secs)?,
        connect_timeout: secs("connect-timeout-secs", args.connect_timeout_secs)?,
    };
    let run_for = secs("duration", args.duration)?;
    let verify_every = args
        .verify_every_secs
        .map(|s| secs("verify-every-secs", s))
        .transpose()?
        .filter(|d| !d.is_zero());
    let quic_config = if args.quic > 0 {
        Some(quic_client_config()?)
    } else {
        None
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    stopper(stop_tx, run_for).await?;

    let verify_task = verify_every
        .map(|every| tokio::spawn(verify_loop(args.target, every, cfg, stop_rx.clone())));

    // Interleave TCP and QUIC starts, one every --stagger-ms.
    let stagger = Duration::from_millis(args.stagger_ms);
    let mut tasks = Vec::with_capacity(args.tcp + args.quic);
    let mut idle_tasks = Vec::with_capacity(args.idle);
    for id in 0..args.idle {
        let (stop, target) = (stop_rx.clone(), args.target);
        idle_tasks.push(tokio::spawn(idle_conn(id, target, cfg, stop)));
    }
    let (mut t, mut q) = (0, 0);
    while t < args.tcp || q < args.quic {
        for proto in [Proto::Tcp, Proto::Quic] {
            let start_after = stagger * tasks.len() as u32;
            let stop = stop_rx.clone();
            let target = args.target;
            match proto {
                Proto::Tcp if t < args.tcp => {
                    let id = t;
                    t += 1;
                    tasks.push(tokio::spawn(async move {
                        tokio::time::sleep(start_after).await;
                        tcp_conn(id, target, cfg, stop).await
                    }));
                }
                Proto::Quic if q < args.quic => {
                    let id = q;
                    q += 1;
                    // Set whenever args.quic > 0, which this arm implies.
                    let Some(config) = quic_config.clone() else {
                        continue;
                    };
                    tasks.push(tokio::spawn(async move {
                        tokio::time::sleep(start_after).await;
                        quic_conn(id, target, config, cfg, stop).await
                    }));
                }
                _ => {}
            }
        }
    }

    let mut reports = Vec::with_capacity(tasks.len() + idle_tasks.len());
    let mut errors = Vec::new();
    let mut task_failures = 0usize;
    for task in tasks.into_iter().chain(idle_tasks) {
        match task.await {
            Ok(r) => reports.push(r),
            Err(e) => {
                task_failures += 1;
                errors.push(format!("connection task failed: {e}"));
            }
        }
    }
    let verify = match verify_task {
        Some(task) => match task.await {
            Ok(v) => v,
            Err(e) => VerifyReport {
                connection_error: Some(format!("verify task failed: {e}")),
                ..VerifyReport::default()
            },
        },
        None => VerifyReport::default(),
    };

    for r in &reports {
        if let Some(f) = &r.failure {
            let msg = format!("conn {}: {f} after {} requests", r.label, r.requests);
            warn!("{msg}");
            errors.push(msg);
        }
    }
    errors.extend(verify.failures.iter().cloned());
    errors.extend(verify.connection_error.iter().cloned());
    errors.truncate(MAX_LISTED_ERRORS);

    let tcp = summarize(Proto::Tcp, &reports);
    let quic = summarize(Proto::Quic, &reports);
    let idle = summarize(Proto::IdleTcp, &reports);
    let ok = tcp.errors == 0
        && quic.errors == 0
        && idle.errors == 0
        && tcp.connections == args.tcp
        && quic.connections == args.quic
        && idle.connections == args.idle
        && task_failures == 0
        && verify.failed == 0
        && verify.connection_error.is_none();
    let summary = Summary {
        tcp,
        quic,
        idle,
        state_verifications: VerifySummary {
            ok: verify.ok,
            failed: verify.failed,
            connection_errors: u64::from(verify.connection_error.is_some()),
        },
        errors,
        ok,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    emit(&serde_json::to_string(&summary)?, args.json.as_ref())?;
    Ok(ok)
}

/// Result of `--verify-state`.
#[derive(Debug, Serialize)]
struct OneShot {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest_hex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn one_shot_verify(args: &Args) -> Result<bool> {
    let connect_timeout = secs("connect-timeout-secs", args.connect_timeout_secs)?;
    let res: Result<ReplyOutcome, Failure> = async {
        let sock =
            match tokio::time::timeout(connect_timeout, TcpStream::connect(args.target)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(Failure::Connect(e.to_string())),
                Err(_) => return Err(Failure::Connect("timed out".into())),
            };
        let (mut r, mut w) = sock.into_split();
        let mut conn = ClientConn::new();
        let req = conn.next_request(Kind::VerifyState, Vec::new());
        let mut out = Vec::new();
        proto::encode_request(&req, &mut out)?;
        let mut buf = BytesMut::with_capacity(4096);
        let reply = match tokio::time::timeout(
            ONE_SHOT_REPLY_TIMEOUT,
            exchange(&mut r, &mut w, &out, &mut buf),
        )
        .await
        {
            Ok(res) => res?,
            Err(_) => return Err(Failure::NoReply(ONE_SHOT_REPLY_TIMEOUT)),
        };
        let outcome = conn.check_reply(&req, &reply)?;
        let _ = w.shutdown().await;
        Ok(outcome)
    }
    .await;
    let result = match res {
        Ok(ReplyOutcome::StateOk { digest }) => OneShot {
            ok: true,
            digest: Some(digest),
            digest_hex: Some(format!("{digest:#018x}")),
            error: None,
        },
        Ok(ReplyOutcome::StateFailed { message }) => OneShot {
            ok: false,
            digest: None,
            digest_hex: None,
            error: Some(format!("state verification failed: {message}")),
        },
        Ok(ReplyOutcome::Echo { .. }) => OneShot {
            ok: false,
            digest: None,
            digest_hex: None,
            error: Some("unexpected echo reply".into()),
        },
        Err(f) => OneShot {
            ok: false,
            digest: None,
            digest_hex: None,
            error: Some(f.to_string()),
        },
    };
    emit(&serde_json::to_string(&result)?, args.json.as_ref())?;
    Ok(result.ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_split_at_the_longest_wait_into_steady_and_the_second_after() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let samples = vec![
            (t0, ms(2)),
            (t0 + ms(10), ms(3)),
            // The stall: sent at 20 ms, answered at 520 ms.
            (t0 + ms(20), ms(500)),
            (t0 + ms(525), ms(9)),
            (t0 + ms(1400), ms(4)),
            // More than a second after the resume: steady again, in neither set.
            (t0 + ms(1600), ms(2)),
        ];
        let (before, after) = split_at_stall(&samples);
        assert_eq!(before, vec![ms(2), ms(3)]);
        assert_eq!(after, vec![ms(9), ms(4)]);
        assert_eq!(split_at_stall(&[]), (Vec::new(), Vec::new()));
    }
}
