//! The control API: newline-delimited JSON over a Unix socket, its server, and [`Client`].
//!
//! Requests, one JSON object per line (at most [`MAX_REQUEST_BYTES`]):
//!
//! ```text
//! {"cmd":"status"}
//! {"cmd":"flows","service":"kv"}
//! {"cmd":"pause","service":"kv","timeout_ms":500}      timeout_ms optional
//! {"cmd":"redirect","service":"kv","backend":"10.77.0.3:7000"}
//! {"cmd":"resume","service":"kv"}
//! {"cmd":"answered","service":"kv","timeout_ms":1000}  timeout_ms optional
//! ```
//!
//! Replies, one line each, in order: `{"ok":true,"result":{...}}` with the command's result
//! ([`Status`], [`FlowList`], [`PauseReport`], [`RedirectReport`], [`ResumeReport`],
//! [`AnswerReport`]), or
//! `{"ok":false,"kind":"...","error":"..."}` ([`ErrorKind`]; a pause that did not quiesce adds
//! `"unquiesced":[...]`). A request that is not understood changes nothing. `pause` replies only
//! once every flow is quiet, or with `not_quiesced` at its deadline (the pause is then undone).
//!
//! The socket is created fresh with mode 0600 (a stale socket file is replaced; a live one is an
//! error), and connections from a peer whose uid (`SO_PEERCRED`) is neither the proxy's nor root's
//! are refused with a `permission_denied` reply.
//!
//! `answered` says when the service first sent data toward a client after its last resume; it
//! replies once every transport that had flows at the resume has answered, or `timeout_ms`
//! (default [`DEFAULT_ANSWER_TIMEOUT_MS`], at most [`MAX_ANSWER_TIMEOUT_MS`]) after the resume.

use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};

use crate::api::Commands;
pub use crate::api::{
    AnswerReport, CommandError, ErrorKind, FlowList, PauseReport, RedirectReport, ResumeReport,
    Status, UnquiescedFlow,
};
use crate::metrics::GlobalMetrics;

/// Where `tether proxy` creates its control socket unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/tether/proxy.sock";

/// Longest request line the server accepts, newline included.
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Longest reply line the client accepts.
pub const MAX_REPLY_BYTES: usize = 64 << 20;
/// How long after a resume `answered` waits for the service's answers unless told otherwise.
pub const DEFAULT_ANSWER_TIMEOUT_MS: u64 = 1000;
/// The longest wait `answered` accepts.
pub const MAX_ANSWER_TIMEOUT_MS: u64 = 60_000;
/// Most control connections served at once.
const MAX_CONNECTIONS: usize = 64;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Request {
    /// Every service's state and counters.
    Status,
    /// The flows of a service.
    Flows {
        /// The service.
        service: String,
    },
    /// Pause a service; the reply comes once its flows are quiet or at the deadline.
    Pause {
        /// The service.
        service: String,
        /// How long to wait for quiescence (default: the service's `pause_timeout_ms`).
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
    /// Send new connections and UDP flows to another backend.
    Redirect {
        /// The service.
        service: String,
        /// The new backend.
        backend: SocketAddr,
    },
    /// Release held data.
    Resume {
        /// The service.
        service: String,
    },
    /// When the service answered after its last resume.
    Answered {
        /// The service.
        service: String,
        /// How long after the resume to wait for answers (default
        /// [`DEFAULT_ANSWER_TIMEOUT_MS`]).
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout_ms: Option<u64>,
    },
}

impl Request {
    /// The command's name.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Flows { .. } => "flows",
            Request::Pause { .. } => "pause",
            Request::Redirect { .. } => "redirect",
            Request::Resume { .. } => "resume",
            Request::Answered { .. } => "answered",
        }
    }
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    /// Whether the command succeeded.
    pub ok: bool,
    /// The command's result, on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error's class, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<ErrorKind>,
    /// What went wrong, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The flows that kept a pause from being confirmed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unquiesced: Vec<UnquiescedFlow>,
}

impl Reply {
    fn ok(result: impl serde::Serialize) -> Reply {
        match serde_json::to_value(result) {
            Ok(v) => Reply {
                ok: true,
                result: Some(v),
                kind: None,
                error: None,
                unquiesced: Vec::new(),
            },
            Err(e) => Reply::err(ErrorKind::Internal, format!("encoding the result: {e}")),
        }
    }

    fn err(kind: ErrorKind, error: String) -> Reply {
        Reply {
            ok: false,
            result: None,
            kind: Some(kind),
            error: Some(error),
            unquiesced: Vec::new(),
        }
    }

    fn from_command_error(e: CommandError) -> Reply {
        let mut r = Reply::err(e.kind(), e.to_string());
        if let CommandError::NotQuiesced { flows, .. } = e {
            r.unquiesced = flows;
        }
        r
    }
}

/// Parses one request line (without its newline). The error says what is wrong, for the
/// client.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(mut o) = v else {
        return Err("a request is a JSON object with a \"cmd\" field".into());
    };
    let cmd = match o.remove("cmd") {
        Some(Value::String(s)) => s,
        Some(_) => return Err("\"cmd\" must be a string".into()),
        None => return Err("missing field \"cmd\"".into()),
    };
    let allowed: &[&str] = match cmd.as_str() {
        "status" => &[],
        "flows" | "resume" => &["service"],
        "pause" | "answered" => &["service", "timeout_ms"],
        "redirect" => &["service", "backend"],
        other => {
            return Err(format!(
                "unknown command {other:?}; expected status, flows, pause, redirect, resume or \
                 answered"
            ))
        }
    };
    if let Some(k) = o.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!("unknown field {k:?} for {cmd}"));
    }
    let service = |o: &mut Map<String, Value>| match o.remove("service") {
        Some(Value::String(s)) if crate::config::valid_service_name(&s) => Ok(s),
        Some(Value::String(s)) => Err(format!("invalid service name {s:?}")),
        Some(_) => Err("\"service\" must be a string".to_string()),
        None => Err(format!("missing field \"service\" for {cmd}")),
    };
    Ok(match cmd.as_str() {
        "status" => Request::Status,
        "flows" => Request::Flows {
            service: service(&mut o)?,
        },
        "resume" => Request::Resume {
            service: service(&mut o)?,
        },
        "pause" => Request::Pause {
            service: service(&mut o)?,
            timeout_ms: timeout_ms(&mut o, u64::MAX)?,
        },
        "answered" => Request::Answered {
            service: service(&mut o)?,
            timeout_ms: timeout_ms(&mut o, MAX_ANSWER_TIMEOUT_MS)?,
        },
        _ => {
            let service = service(&mut o)?;
            let backend = match o.remove("backend") {
                Some(Value::String(s)) => s
                    .parse::<SocketAddr>()
                    .map_err(|_| format!("\"backend\" must be IP:PORT, not {s:?}"))?,
                Some(_) => return Err("\"backend\" must be a string IP:PORT".into()),
                None => return Err("missing field \"backend\" for redirect".into()),
            };
            Request::Redirect { service, backend }
        }
    })
}

/// The optional `timeout_ms` of a request: a positive integer of at most `max`.
fn timeout_ms(o: &mut Map<String, Value>, max: u64) -> Result<Option<u64>, String> {
    let bad = || {
        if max == u64::MAX {
            "\"timeout_ms\" must be a positive integer".to_string()
        } else {
            format!("\"timeout_ms\" must be a positive integer of at most {max}")
        }
    };
    match o.remove("timeout_ms") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(ms) if ms > 0 && ms <= max => Ok(Some(ms)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

/// Whether a peer with uid `peer` may use the control socket of a proxy running as `own`.
pub fn peer_allowed(peer: u32, own: u32) -> bool {
    peer == own || peer == 0
}

/// Creates the control socket fresh at `path`, mode 0600.
pub(crate) async fn bind(path: &Path) -> Result<UnixListener, String> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err("another process is listening on it".into());
            }
            std::fs::remove_file(path).map_err(|e| format!("removing the stale socket: {e}"))?;
        }
        Ok(_) => return Err("exists and is not a socket".into()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.to_string()),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
        }
    }
    let l = UnixListener::bind(path).map_err(|e| e.to_string())?;
    // Between bind and chmod the file has the umask's mode; SO_PEERCRED covers that window.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("chmod 0600: {e}"))?;
    Ok(l)
}

/// Serves control connections on `listener` until the task is aborted: runs their commands on
/// `commands` and counts requests, errors and refused peers in `global`.
pub(crate) async fn serve<C>(listener: UnixListener, commands: C, global: Arc<GlobalMetrics>)
where
    C: Commands + Clone + Send + Sync + 'static,
{
    let own = nix::unistd::geteuid().as_raw();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("control: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let commands = commands.clone();
        let global = global.clone();
        let permit = slots.clone().try_acquire_owned();
        tokio::spawn(async move {
            let Ok(_permit) = permit else {
                let r = Reply::err(
                    ErrorKind::Internal,
                    format!("too many control connections (limit {MAX_CONNECTIONS})"),
                );
                let _ = write_reply(&mut { stream }, &r).await;
                return;
            };
            connection(stream, &commands, &global, own).await;
        });
    }
}

async fn write_reply<W: AsyncWriteExt + Unpin>(w: &mut W, r: &Reply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).unwrap_or_else(|e| {
        format!("{{\"ok\":false,\"kind\":\"internal\",\"error\":\"encoding: {e}\"}}").into_bytes()
    });
    line.push(b'\n');
    w.write_all(&line).await
}

async fn connection(
    mut stream: UnixStream,
    commands: &impl Commands,
    global: &GlobalMetrics,
    own: u32,
) {
    match stream.peer_cred() {
        Ok(c) if peer_allowed(c.uid(), own) => {}
        other => {
            global.control_refused_total.inc();
            let who = match other {
                Ok(c) => format!("uid {}", c.uid()),
                Err(e) => format!("a peer without credentials ({e})"),
            };
            tracing::warn!("control: refused {who}");
            let r = Reply::err(
                ErrorKind::PermissionDenied,
                format!("permission denied: {who} may not control this proxy (uid {own})"),
            );
            let _ = write_reply(&mut stream, &r).await;
            return;
        }
    }
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    loop {
        let mut line = Vec::new();
        let limit = (MAX_REQUEST_BYTES + 1) as u64;
        match (&mut rd).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let complete = line.last() == Some(&b'\n');
        if !complete && line.len() > MAX_REQUEST_BYTES {
            global.control_errors_total.inc();
            let r = Reply::err(
                ErrorKind::BadRequest,
                format!("request longer than {MAX_REQUEST_BYTES} bytes; closing the connection"),
            );
            let _ = write_reply(&mut wr, &r).await;
            return;
        }
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        global.control_requests_total.inc();
        let reply = match parse_request(&line) {
            Err(msg) => Reply::err(ErrorKind::BadRequest, msg),
            Ok(req) => execute(commands, req).await,
        };
        if !reply.ok {
            global.control_errors_total.inc();
        }
        if write_reply(&mut wr, &reply).await.is_err() || !complete {
            return;
        }
    }
}

async fn execute(h: &impl Commands, req: Request) -> Reply {
    let r = match req {
        Request::Status => Ok(Reply::ok(h.status())),
        Request::Flows { service } => h.flows(&service).await.map(Reply::ok),
        Request::Pause {
            service,
            timeout_ms,
        } => h
            .pause(&service, timeout_ms.map(Duration::from_millis))
            .await
            .map(Reply::ok),
        Request::Redirect { service, backend } => {
            h.redirect(&service, backend).await.map(Reply::ok)
        }
        Request::Resume { service } => h.resume(&service).await.map(Reply::ok),
        Request::Answered {
            service,
            timeout_ms,
        } => h
            .answered(
                &service,
                Duration::from_millis(timeout_ms.unwrap_or(DEFAULT_ANSWER_TIMEOUT_MS)),
            )
            .await
            .map(Reply::ok),
    };
    r.unwrap_or_else(Reply::from_command_error)
}

/// A failed control call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// The control socket could not be reached.
    #[error("connecting to the proxy's control socket {path}: {error}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The connection failed.
    #[error("control connection: {0}")]
    Io(std::io::Error),
    /// The proxy's reply was not understood (or the connection closed without one).
    #[error("control protocol: {0}")]
    Protocol(String),
    /// The proxy refused or failed the command; for a `not_quiesced` pause the service is
    /// active again.
    #[error("proxy: {cmd}: {message}")]
    Rejected {
        /// The command.
        cmd: &'static str,
        /// The error's class.
        kind: ErrorKind,
        /// The proxy's message.
        message: String,
        /// For `not_quiesced`: the flows that were not quiet.
        unquiesced: Vec<UnquiescedFlow>,
    },
}

impl From<std::io::Error> for ControlError {
    fn from(e: std::io::Error) -> ControlError {
        ControlError::Io(e)
    }
}

impl ControlError {
    /// The proxy's error class, if the proxy answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ControlError::Rejected { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// A connection to a proxy's control socket. Calls are sequential (one request, one reply).
///
/// ```no_run
/// # async fn f() -> Result<(), tether_proxy::control::ControlError> {
/// use std::time::Duration;
/// let mut proxy = tether_proxy::control::Client::connect("/run/tether/proxy.sock").await?;
/// let paused = proxy.pause("kv", Duration::from_millis(500)).await?; // all flows quiet
/// // ... freeze, dump, transfer, restore ...
/// proxy.redirect("kv", std::net::SocketAddr::from(([10, 77, 0, 100], 7000))).await?;
/// proxy.resume("kv").await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Client {
    rd: BufReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
}

impl Client {
    /// Connects to the control socket at `path`.
    pub async fn connect(path: impl AsRef<Path>) -> Result<Client, ControlError> {
        let path = path.as_ref();
        let s = UnixStream::connect(path)
            .await
            .map_err(|error| ControlError::Connect {
                path: path.to_owned(),
                error,
            })?;
        let (rd, wr) = s.into_split();
        Ok(Client {
            rd: BufReader::new(rd),
            wr,
        })
    }

    /// Sends one raw line (a newline is added) and reads one reply.
    pub async fn send_raw(&mut self, line: &[u8]) -> Result<Reply, ControlError> {
        let mut l = line.to_vec();
        l.push(b'\n');
        self.wr.write_all(&l).await?;
        let mut reply = Vec::new();
        (&mut self.rd)
            .take(MAX_REPLY_BYTES as u64)
            .read_until(b'\n', &mut reply)
            .await?;
        if reply.last() != Some(&b'\n') {
            return Err(ControlError::Protocol(if reply.is_empty() {
                "the proxy closed the connection without a reply".into()
            } else {
                "incomplete reply".into()
            }));
        }
        serde_json::from_slice(&reply)
            .map_err(|e| ControlError::Protocol(format!("malformed reply: {e}")))
    }

    /// Sends a request; returns its `result` or the proxy's error.
    pub async fn request(&mut self, req: &Request) -> Result<Value, ControlError> {
        let line = serde_json::to_vec(req)
            .map_err(|e| ControlError::Protocol(format!("encoding the request: {e}")))?;
        let r = self.send_raw(&line).await?;
        if r.ok {
            Ok(r.result.unwrap_or(Value::Null))
        } else {
            Err(ControlError::Rejected {
                cmd: req.name(),
                kind: r.kind.unwrap_or(ErrorKind::Internal),
                message: r.error.unwrap_or_default(),
                unquiesced: r.unquiesced,
            })
        }
    }

    async fn call<T: DeserializeOwned>(&mut self, req: Request) -> Result<T, ControlError> {
        let v = self.request(&req).await?;
        serde_json::from_value(v)
            .map_err(|e| ControlError::Protocol(format!("unexpected {} result: {e}", req.name())))
    }

    /// Every service's state and counters.
    pub async fn status(&mut self) -> Result<Status, ControlError> {
        self.call(Request::Status).await
    }

    /// The flows of `service`.
    pub async fn flows(&mut self, service: &str) -> Result<FlowList, ControlError> {
        self.call(Request::Flows {
            service: service.into(),
        })
        .await
    }

    /// Pauses `service` and returns once every flow is quiet: nothing the proxy sent upstream
    /// is unacknowledged, client-to-service data is held. Waits at most `timeout` for that; on
    /// `Rejected { kind: NotQuiesced, .. }` the pause was undone (the service is active).
    /// Unless resumed, the pause ends by itself after the service's `max_hold_ms`.
    pub async fn pause(
        &mut self,
        service: &str,
        timeout: Duration,
    ) -> Result<PauseReport, ControlError> {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        self.call(Request::Pause {
            service: service.into(),
            timeout_ms: Some(ms),
        })
        .await
    }

    /// Sends new connections and UDP flows of `service` to `backend` (existing TCP connections
    /// keep their upstream sockets). Allowed while active or paused.
    pub async fn redirect(
        &mut self,
        service: &str,
        backend: SocketAddr,
    ) -> Result<RedirectReport, ControlError> {
        self.call(Request::Redirect {
            service: service.into(),
            backend,
        })
        .await
    }

    /// Releases everything held for `service`, in order.
    pub async fn resume(&mut self, service: &str) -> Result<ResumeReport, ControlError> {
        self.call(Request::Resume {
            service: service.into(),
        })
        .await
    }

    /// When `service` answered after its last resume; the proxy replies once every transport
    /// that had flows answered, or `timeout` after the resume (default
    /// [`DEFAULT_ANSWER_TIMEOUT_MS`]).
    pub async fn answered(
        &mut self,
        service: &str,
        timeout: Option<Duration>,
    ) -> Result<AnswerReport, ControlError> {
        self.call(Request::Answered {
            service: service.into(),
            timeout_ms: timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1)),
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse_request(br#"{"cmd":"status"}"#), Ok(Request::Status));
        assert_eq!(
            parse_request(br#"{"cmd":"flows","service":"kv"}"#),
            Ok(Request::Flows {
                service: "kv".into()
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"pause","service":"kv","timeout_ms":250}"#),
            Ok(Request::Pause {
                service: "kv".into(),
                timeout_ms: Some(250)
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"pause","service":"kv"}"#),
            Ok(Request::Pause {
                service: "kv".into(),
                timeout_ms: None
            })
        );
        assert_eq!(
            parse_request(br#"{"service":"kv","backend":"[::1]:80","cmd":"redirect"}"#),
            Ok(Request::Redirect {
                service: "kv".into(),
                backend: "[::1]:80".parse().expect("addr")
            })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"resume","service":"kv"}"#),
            Ok(Request::Resume {
                service: "kv".into()
            })
        );
    }

    #[test]
    fn requests_round_trip_through_serialization() {
        for r in [
            Request::Status,
            Request::Flows {
                service: "a".into(),
            },
            Request::Pause {
                service: "a".into(),
                timeout_ms: Some(5),
            },
            Request::Pause {
                service: "a".into(),
                timeout_ms: None,
            },
            Request::Redirect {
                service: "a".into(),
                backend: "1.2.3.4:5".parse().expect("addr"),
            },
            Request::Resume {
                service: "a".into(),
            },
            Request::Answered {
                service: "a".into(),
                timeout_ms: Some(250),
            },
            Request::Answered {
                service: "a".into(),
                timeout_ms: None,
            },
        ] {
            let line = serde_json::to_vec(&r).expect("json");
            assert_eq!(parse_request(&line), Ok(r));
        }
    }

    #[test]
    fn rejects_malformed_requests_with_clear_errors() {
        let cases: [(&[u8], &str); 16] = [
            (b"", "malformed JSON"),
            (b"{", "malformed JSON"),
            (b"[1,2]", "JSON object"),
            (b"\"status\"", "JSON object"),
            (br#"{}"#, "missing field \"cmd\""),
            (br#"{"cmd":5}"#, "must be a string"),
            (br#"{"cmd":"reboot"}"#, "unknown command \"reboot\""),
            (br#"{"cmd":"status","x":1}"#, "unknown field \"x\""),
            (br#"{"cmd":"pause"}"#, "missing field \"service\""),
            (br#"{"cmd":"pause","service":7}"#, "must be a string"),
            (
                br#"{"cmd":"pause","service":"kv","timeout_ms":-1}"#,
                "positive integer",
            ),
            (
                br#"{"cmd":"pause","service":"kv","timeout_ms":0}"#,
                "positive integer",
            ),
            (
                br#"{"cmd":"answered","service":"kv","timeout_ms":60001}"#,
                "at most 60000",
            ),
            (br#"{"cmd":"answered"}"#, "missing field \"service\""),
            (
                br#"{"cmd":"redirect","service":"kv","backend":"nowhere"}"#,
                "IP:PORT",
            ),
            (
                br#"{"cmd":"resume","service":"../x y"}"#,
                "invalid service name",
            ),
        ];
        for (line, want) in cases {
            let e = parse_request(line).expect_err(&String::from_utf8_lossy(line));
            assert!(e.contains(want), "{:?}: {e}", String::from_utf8_lossy(line));
        }
    }

    #[test]
    fn peer_policy() {
        assert!(peer_allowed(1000, 1000));
        assert!(peer_allowed(0, 1000));
        assert!(!peer_allowed(1001, 1000));
        assert!(!peer_allowed(65534, 0));
    }

    #[test]
    fn not_quiesced_replies_carry_the_flows() {
        let f = UnquiescedFlow {
            proto: "tcp".into(),
            id: 3,
            client: "127.0.0.1:9".parse().expect("addr"),
            reason: "unacknowledged bytes upstream".into(),
            upstream_outq: Some(10),
        };
        let r = Reply::from_command_error(CommandError::NotQuiesced {
            flows: vec![f.clone()],
            waited_ms: 5,
        });
        let text = serde_json::to_string(&r).expect("json");
        assert!(text.contains("\"ok\":false"), "{text}");
        assert!(text.contains("\"kind\":\"not_quiesced\""), "{text}");
        let back: Reply = serde_json::from_str(&text).expect("parse");
        assert_eq!(back.unquiesced, vec![f]);
    }
}
