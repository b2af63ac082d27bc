//! QUIC endpoints (quinn, mutual TLS) and the framed stream of the migration protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{RecvStream, SendStream};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::protocol::frame::{self, Frame, Kind, HEADER, MAX_DATA};
use crate::protocol::WireError;
use crate::tls::{Identity, TlsError};

/// Errors on the migration connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// Endpoint setup.
    #[error("cannot open QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    /// Connecting failed.
    #[error("cannot connect to {addr}: {reason}")]
    Connect {
        /// The peer.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// The connection or stream failed.
    #[error("connection lost: {0}")]
    Lost(String),
    /// The peer aborted the migration, saying why (close code [`ABORT`]).
    #[error("peer aborted: {0}")]
    PeerAborted(String),
    /// The peer closed the connection without a decision (close code [`DONE`] or
    /// [`NO_DECISION`]).
    #[error("peer closed the connection: {0}")]
    PeerClosed(String),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] WireError),
    /// The peer did not answer in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
}

fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    // Large windows: an image set is sent as fast as the link allows on one stream.
    t.stream_receive_window(quinn::VarInt::from_u32(32 << 20));
    t.receive_window(quinn::VarInt::from_u32(64 << 20));
    t.send_window(64 << 20);
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    // A dead peer is noticed within 3 s, not the default 30 s: while a migration waits for it,
    // the service is frozen.
    if let Ok(idle) = quinn::IdleTimeout::try_from(Duration::from_secs(3)) {
        t.max_idle_timeout(Some(idle));
    }
    t
}

/// The agent's endpoint: requires client certificates signed by the CA.
pub fn server(identity: &Identity, listen: SocketAddr) -> Result<quinn::Endpoint, TransportError> {
    let crypto = QuicServerConfig::try_from(identity.server_config()?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    quinn::Endpoint::server(cfg, listen).map_err(TransportError::Endpoint)
}

/// Connects to the agent at `to`, whose server certificate must carry `agent_name`.
pub async fn connect(
    identity: &Identity,
    to: SocketAddr,
    agent_name: &str,
    timeout: Duration,
) -> Result<(quinn::Endpoint, quinn::Connection), TransportError> {
    let crypto = QuicClientConfig::try_from(identity.client_config()?)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    let bind: SocketAddr = if to.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(TransportError::Endpoint)?;
    endpoint.set_default_client_config(cfg);
    let connecting = endpoint
        .connect(to, agent_name)
        .map_err(|e| TransportError::Connect {
            addr: to,
            reason: e.to_string(),
        })?;
    match tokio::time::timeout(timeout, connecting).await {
        Ok(Ok(c)) => Ok((endpoint, c)),
        Ok(Err(e)) => {
            // A handshake we refused (say, the agent's certificate is from another CA) queued a
            // CONNECTION_CLOSE; let it go out, bounded, so the agent learns now rather than at
            // its idle timeout.
            let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
            Err(TransportError::Connect {
                addr: to,
                reason: e.to_string(),
            })
        }
        Err(_) => Err(TransportError::Connect {
            addr: to,
            reason: format!("no answer within {timeout:?} (is `tether agent` running there?)"),
        }),
    }
}

/// Close code: the migration (or this connection's part in it) ended normally.
pub const DONE: u32 = 0;
/// Close code: the sender aborts the migration; the receiver must undo its side.
pub const ABORT: u32 = 1;
/// Close code: the sender gives up this connection without deciding anything (a migration in
/// doubt stays in doubt).
pub const NO_DECISION: u32 = 2;

fn read_error(e: quinn::ReadExactError) -> TransportError {
    use quinn::{ReadError, ReadExactError};
    match e {
        ReadExactError::ReadError(ReadError::ConnectionLost(c)) => connection_error(c),
        other => TransportError::Lost(other.to_string()),
    }
}

/// What a connection's end means for the migration.
pub fn connection_error(e: quinn::ConnectionError) -> TransportError {
    match e {
        quinn::ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            if close.error_code == quinn::VarInt::from_u32(ABORT) {
                TransportError::PeerAborted(reason)
            } else {
                TransportError::PeerClosed(reason)
            }
        }
        other => TransportError::Lost(other.to_string()),
    }
}

/// Closes a connection on purpose with `code` and `reason` (a QUIC CONNECTION_CLOSE: it is not
/// queued behind stream data) and waits, bounded, until it is sent.
pub async fn close(endpoint: &quinn::Endpoint, conn: &quinn::Connection, code: u32, reason: &str) {
    let reason = &reason.as_bytes()[..reason.len().min(512)];
    conn.close(quinn::VarInt::from_u32(code), reason);
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
}

/// The sending half of a migration stream.
#[derive(Debug)]
pub struct FrameSender(pub SendStream);

impl FrameSender {
    /// Sends one control message.
    pub async fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), TransportError> {
        self.0
            .write_all(&frame::encode(msg))
            .await
            .map_err(|e| TransportError::Lost(e.to_string()))
    }

    /// Sends an already encoded frame (e.g. a [`PageBatch`](crate::protocol::PageBatch)).
    pub async fn send_frame(&mut self, frame: &[u8]) -> Result<(), TransportError> {
        self.0
            .write_all(frame)
            .await
            .map_err(|e| TransportError::Lost(e.to_string()))
    }

    /// Sends file data as data frames.
    pub async fn send_data(&mut self, mut data: &[u8]) -> Result<(), TransportError> {
        while !data.is_empty() {
            let n = data.len().min(MAX_DATA);
            let hdr = frame::header(Kind::Data, n);
            let chunks = [
                bytes::Bytes::copy_from_slice(&hdr),
                bytes::Bytes::copy_from_slice(&data[..n]),
            ];
            let mut chunks = chunks;
            self.0
                .write_all_chunks(&mut chunks)
                .await
                .map_err(|e| TransportError::Lost(e.to_string()))?;
            data = &data[n..];
        }
        Ok(())
    }
}

/// The receiving half of a migration stream.
#[derive(Debug)]
pub struct FrameReceiver(pub RecvStream);

impl FrameReceiver {
    /// Reads the next frame; `Ok(None)` at a clean end of stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, TransportError> {
        let mut h = [0u8; HEADER];
        match self.0.read_exact(&mut h).await {
            Ok(()) => {}
            Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
            Err(e) => return Err(read_error(e)),
        }
        let (kind, len) = frame::parse_header(h)?;
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).await.map_err(read_error)?;
        Ok(Some(match kind {
            Kind::Control => Frame::Control(body),
            Kind::Data => Frame::Data(body),
            Kind::Pages => Frame::Pages(body),
        }))
    }

    /// Reads the next frame, which must be a control message.
    pub async fn message<T: DeserializeOwned>(&mut self) -> Result<T, TransportError> {
        match self.next().await? {
            Some(Frame::Control(body)) => Ok(frame::decode(&body)?),
            Some(f) => Err(WireError::Unexpected {
                expected: &["a control message"],
                got: f.name(),
            }
            .into()),
            None => Err(TransportError::Lost("peer closed the stream".into())),
        }
    }

    /// Like [`FrameReceiver::message`] with a deadline.
    pub async fn message_within<T: DeserializeOwned>(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<T, TransportError> {
        tokio::time::timeout(timeout, self.message())
            .await
            .map_err(|_| TransportError::Timeout(timeout, what))?
    }
}
