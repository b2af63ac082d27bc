//! What the proxy answers to control commands: the `result` objects of the control protocol
//! (JSON), and the errors of commands; and, inside the crate, the commands themselves as the
//! interface the control server serves.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use crate::state::{Phase, StateError};

/// The control commands, as the control server (`control::serve`) serves them. The running
/// proxy's `ProxyHandle` implements them; the control server knows only this interface, not
/// the proxy.
pub(crate) trait Commands {
    /// Every service's state and counters.
    fn status(&self) -> Status;

    /// The flows of `service`.
    fn flows(&self, service: &str) -> impl Future<Output = Result<FlowList, CommandError>> + Send;

    /// Pauses `service`, waiting at most `timeout` (default: its configured pause timeout)
    /// for its flows to quiesce.
    fn pause(
        &self,
        service: &str,
        timeout: Option<Duration>,
    ) -> impl Future<Output = Result<PauseReport, CommandError>> + Send;

    /// Sends new connections and UDP flows of `service` to `backend`.
    fn redirect(
        &self,
        service: &str,
        backend: SocketAddr,
    ) -> impl Future<Output = Result<RedirectReport, CommandError>> + Send;

    /// Releases everything held for `service`.
    fn resume(
        &self,
        service: &str,
    ) -> impl Future<Output = Result<ResumeReport, CommandError>> + Send;

    /// When `service` answered after its last resume: once every transport that had flows
    /// has sent something toward a client, or `timeout` after the resume.
    fn answered(
        &self,
        service: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<AnswerReport, CommandError>> + Send;
}

/// Answer to `answered`: when the service first sent data toward a client after the last
/// resume, per transport. The downtime a client sees ends there; a lazily restored or
/// interpreted service may answer some milliseconds after the release.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AnswerReport {
    /// How long ago the resume released what was held, ms.
    pub resumed_ms_ago: f64,
    /// The service had TCP connections at the resume.
    pub tcp_expected: bool,
    /// The service had UDP flows at the resume.
    pub udp_expected: bool,
    /// From the release to the service's first byte toward a TCP client, ms; `None`: none
    /// by the time of this answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_tcp_ms: Option<f64>,
    /// From the release to the service's first datagram toward a UDP client, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_udp_ms: Option<f64>,
}

/// Answer to `status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// The proxy's version.
    pub version: String,
    /// Milliseconds since the proxy started.
    pub uptime_ms: u64,
    /// Every service, in configuration order.
    pub services: Vec<ServiceStatus>,
}

/// One service in [`Status`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ServiceStatus {
    /// The service's name.
    pub name: String,
    /// Its phase.
    pub phase: Phase,
    /// Where new connections and UDP flows go.
    pub backend: SocketAddr,
    /// The backend before the pause in force (a hold timeout returns to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_before_pause: Option<SocketAddr>,
    /// How long the pause in force has lasted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_for_ms: Option<u64>,
    /// Time left until the pause in force ends by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_left_ms: Option<u64>,
    /// How long a pause of this service lasts at most before it ends by itself (its configured
    /// `max_hold_ms`). 0 when the status comes from a proxy that does not report it.
    #[serde(default)]
    pub max_hold_ms: u64,
    /// TCP listen addresses (as bound).
    pub tcp_listen: Vec<SocketAddr>,
    /// UDP listen addresses (as bound).
    pub udp_listen: Vec<SocketAddr>,
    /// Open TCP connections.
    pub tcp_flows: u64,
    /// UDP flows.
    pub udp_flows: u64,
    /// Datagrams held now.
    pub held_datagrams: u64,
    /// Bytes of datagrams held now.
    pub held_bytes: u64,
    /// Drops so far by reason (only reasons with drops).
    pub drops: BTreeMap<String, u64>,
}

/// Answer to `flows`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FlowList {
    /// The service.
    pub service: String,
    /// Its TCP connections.
    pub tcp: Vec<TcpFlowInfo>,
    /// Its UDP flows.
    pub udp: Vec<UdpFlowInfo>,
}

/// One TCP connection in [`FlowList`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TcpFlowInfo {
    /// Flow id (unique per service).
    pub id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The listen address the client connected to.
    pub listen: SocketAddr,
    /// `waiting` (for a pause to end before connecting upstream), `connecting`, `open`,
    /// `closed`.
    pub stage: String,
    /// The backend the upstream connection goes to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<SocketAddr>,
    /// The proxy's address of the upstream connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_local: Option<SocketAddr>,
    /// Whether client-to-service data is held (nothing read, nothing pending) or finished.
    pub client_side_idle: bool,
    /// Bytes client → service.
    pub bytes_to_service: u64,
    /// Bytes service → client.
    pub bytes_to_client: u64,
    /// Milliseconds since the connection was accepted.
    pub age_ms: u64,
    /// Bytes in the upstream send queue (`SIOCOUTQ`: unsent plus unacknowledged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_outq: Option<u32>,
    /// Upstream segments in flight (`tcpi_unacked`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_unacked: Option<u32>,
    /// Upstream smoothed RTT in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_rtt_us: Option<u32>,
}

/// One UDP flow in [`FlowList`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct UdpFlowInfo {
    /// Flow id (unique per service).
    pub id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// The listen address the client sends to.
    pub listen: SocketAddr,
    /// Where the flow's upstream socket sends.
    pub backend: SocketAddr,
    /// The proxy's address of the upstream socket (what the service sees).
    pub upstream_local: SocketAddr,
    /// Datagrams client → service.
    pub datagrams_to_service: u64,
    /// Datagrams service → client.
    pub datagrams_to_client: u64,
    /// Bytes client → service.
    pub bytes_to_service: u64,
    /// Bytes service → client.
    pub bytes_to_client: u64,
    /// Milliseconds since the last datagram either way.
    pub idle_ms: u64,
    /// Datagrams held for this flow.
    pub held_datagrams: u64,
    /// Bytes held for this flow.
    pub held_bytes: u64,
}

/// Answer to a successful `pause`: every flow is quiet and client-to-service data is held.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PauseReport {
    /// The service.
    pub service: String,
    /// Milliseconds from the command until every flow was quiet.
    pub quiesce_ms: f64,
    /// TCP connections held.
    pub tcp_flows: u64,
    /// UDP flows held.
    pub udp_flows: u64,
    /// Milliseconds until the pause ends by itself unless resumed.
    pub max_hold_ms: u64,
}

/// A flow that kept a pause from being confirmed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UnquiescedFlow {
    /// `tcp` or `udp`.
    pub proto: String,
    /// Flow id.
    pub id: u64,
    /// The client's address.
    pub client: SocketAddr,
    /// What was still going on.
    pub reason: String,
    /// Bytes in the upstream send queue, when that was the reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_outq: Option<u32>,
}

/// Answer to `redirect`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RedirectReport {
    /// The service.
    pub service: String,
    /// The previous backend.
    pub from: SocketAddr,
    /// The new backend.
    pub to: SocketAddr,
    /// UDP flows re-pointed to the new backend.
    pub udp_flows: u64,
    /// UDP flows that could not be re-pointed and were removed.
    pub udp_flows_failed: u64,
    /// The phase after the redirect (`active` or `paused`).
    pub phase: Phase,
}

/// Answer to `resume`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ResumeReport {
    /// The service.
    pub service: String,
    /// Milliseconds from the pause command until the resume finished.
    pub held_ms: f64,
    /// Held datagrams released (sent to the backend, in order).
    pub released_datagrams: u64,
    /// Their bytes.
    pub released_bytes: u64,
    /// Where flows go now.
    pub backend: SocketAddr,
    /// Whether the pause had been confirmed quiesced (false: a pause still waiting was cancelled).
    pub was_quiesced: bool,
}

/// The class of a failed command, as the `kind` of an error reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// Malformed JSON, unknown command, bad or missing fields, oversized request.
    BadRequest,
    /// No such service.
    UnknownService,
    /// The command is not allowed in the service's phase.
    WrongState,
    /// The flows did not quiesce before the deadline; the service is active again.
    NotQuiesced,
    /// The pause ended (resume command or hold timeout) before it was confirmed.
    Cancelled,
    /// The peer is not allowed to use the control socket.
    PermissionDenied,
    /// Something failed inside the proxy.
    Internal,
}

/// A control command that failed. It changed nothing, except as documented per variant.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Malformed request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// No such service.
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// The service's phase does not allow the command.
    #[error(transparent)]
    State(#[from] StateError),
    /// The pause's flows did not quiesce in time; the service is active again (nothing held).
    #[error(
        "{} flow(s) did not quiesce within {waited_ms} ms; the pause was undone and the service is active again",
        flows.len()
    )]
    NotQuiesced {
        /// The flows that were not quiet at the deadline.
        flows: Vec<UnquiescedFlow>,
        /// How long the pause waited.
        waited_ms: u64,
    },
    /// The pause was ended before it was confirmed.
    #[error("the pause was ended by {0} before its flows quiesced")]
    Cancelled(String),
    /// `answered` before any resume of the service.
    #[error("service {0:?} has not been resumed since the proxy started")]
    NotResumed(String),
    /// Internal failure.
    #[error("internal error: {0}")]
    Internal(String),
}

impl CommandError {
    /// The error's class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CommandError::BadRequest(_) => ErrorKind::BadRequest,
            CommandError::UnknownService(_) => ErrorKind::UnknownService,
            CommandError::State(_) => ErrorKind::WrongState,
            CommandError::NotQuiesced { .. } => ErrorKind::NotQuiesced,
            CommandError::Cancelled(_) => ErrorKind::Cancelled,
            CommandError::NotResumed(_) => ErrorKind::WrongState,
            CommandError::Internal(_) => ErrorKind::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_status() -> ServiceStatus {
        ServiceStatus {
            name: "kv".into(),
            phase: Phase::Active,
            backend: "10.0.0.1:7000".parse().expect("addr"),
            backend_before_pause: None,
            paused_for_ms: None,
            hold_left_ms: None,
            max_hold_ms: 5000,
            tcp_listen: vec!["0.0.0.0:7000".parse().expect("addr")],
            udp_listen: Vec::new(),
            tcp_flows: 1,
            udp_flows: 0,
            held_datagrams: 0,
            held_bytes: 0,
            drops: BTreeMap::new(),
        }
    }

    #[test]
    fn service_status_carries_the_maximum_hold() {
        let s = service_status();
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["max_hold_ms"], 5000);
        let back: ServiceStatus = serde_json::from_value(v).expect("parse");
        assert_eq!(back, s);
    }

    #[test]
    fn service_status_without_the_maximum_hold_parses_as_zero() {
        let mut v = serde_json::to_value(service_status()).expect("json");
        v.as_object_mut()
            .expect("object")
            .remove("max_hold_ms")
            .expect("field");
        let old: ServiceStatus = serde_json::from_value(v).expect("older status parses");
        assert_eq!(old.max_hold_ms, 0);
        assert_eq!(old.name, "kv");
    }
}
