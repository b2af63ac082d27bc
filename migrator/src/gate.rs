//! The [`TrafficGate`] for tether-proxy: its control socket, as a migration drives it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tether_proxy::api::ErrorKind;
use tether_proxy::control::{Client, ControlError};

use crate::machine::source::{PauseInfo, ResumeInfo};
use crate::machine::PortError;
use crate::ports::TrafficGate;
use crate::protocol::ErrorCode;

/// The tether-proxy in front of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

fn proxy_err(what: &str) -> impl FnOnce(ControlError) -> PortError + '_ {
    move |e| PortError::caused(ErrorCode::Proxy, what, e)
}

/// A connection to the proxy's control socket, with what the migration did to it.
#[derive(Debug)]
pub struct ProxyGate {
    client: Client,
    opts: ProxyOptions,
    /// The backend before the migration: where an undo points the proxy back.
    original: SocketAddr,
    /// The proxy's maximum hold for the service, if it reports it.
    max_hold: Option<Duration>,
}

impl ProxyGate {
    /// Connects to the proxy and looks the service up. `original` is the backend to point back
    /// to on an undo (default: the backend the proxy has now; a recovery passes the journaled
    /// one, since the proxy may be redirected already).
    pub async fn open(
        opts: &ProxyOptions,
        original: Option<SocketAddr>,
    ) -> Result<ProxyGate, PortError> {
        let mut client = Client::connect(&opts.socket)
            .await
            .map_err(proxy_err(&format!(
                "proxy control socket {}",
                opts.socket.display()
            )))?;
        let status = client.status().await.map_err(proxy_err("proxy status"))?;
        let svc = status
            .services
            .iter()
            .find(|s| s.name == opts.service)
            .ok_or_else(|| {
                PortError::new(
                    ErrorCode::Proxy,
                    format!("the proxy has no service named {:?}", opts.service),
                )
            })?;
        Ok(ProxyGate {
            original: original.unwrap_or(svc.backend),
            // An older proxy reports 0: unknown (the pause's answer still says what is left).
            max_hold: (svc.max_hold_ms > 0).then(|| Duration::from_millis(svc.max_hold_ms)),
            client,
            opts: opts.clone(),
        })
    }

    /// The backend the proxy pointed at before the migration.
    pub fn original(&self) -> SocketAddr {
        self.original
    }

    /// The proxy's maximum hold for the service, if it reports it: a pause not resumed ends by
    /// itself after it.
    pub fn max_hold(&self) -> Option<Duration> {
        self.max_hold
    }
}

/// How long after the resume the proxy waits for the service's first answers before it says
/// what came (the `answered` control command).
pub const ANSWER_WAIT: Duration = Duration::from_secs(1);

/// Asks the proxy when the service answered after the resume of a committed migration, and
/// puts it in `report`: the proxy's first answer per transport and the downtime as the clients
/// saw it. The proxy keeps what it saw, so this may come after the cleanup. A proxy that cannot
/// say (an older one, or no resume) leaves the report as it was and returns why.
pub async fn record_answers(
    opts: &ProxyOptions,
    report: &mut crate::report::Report,
) -> Result<(), ControlError> {
    let mut client = Client::connect(&opts.socket).await?;
    let a = client.answered(&opts.service, Some(ANSWER_WAIT)).await?;
    let Some(p) = report.proxy.as_mut() else {
        return Ok(());
    };
    p.first_tcp_answer_ms = a.first_tcp_ms;
    p.first_udp_answer_ms = a.first_udp_ms;
    let first = a
        .first_tcp_ms
        .into_iter()
        .chain(a.first_udp_ms)
        .reduce(f64::min);
    let t = &mut report.timings;
    t.answered_ms = first.map(|f| t.downtime_ms + t.resume_ms + f);
    Ok(())
}

impl TrafficGate for ProxyGate {
    async fn pause(&mut self) -> Result<PauseInfo, PortError> {
        let r = self
            .client
            .pause(&self.opts.service, self.opts.pause_timeout)
            .await
            .map_err(proxy_err("the proxy could not pause"))?;
        Ok(PauseInfo {
            quiesce_ms: r.quiesce_ms,
            tcp_flows: r.tcp_flows,
            udp_flows: r.udp_flows,
            hold_left: Duration::from_millis(r.max_hold_ms),
        })
    }

    async fn redirect(&mut self) -> Result<(), PortError> {
        if let Some(to) = self.opts.redirect {
            self.client
                .redirect(&self.opts.service, to)
                .await
                .map_err(proxy_err("the proxy could not redirect"))?;
        }
        Ok(())
    }

    async fn resume(&mut self) -> Result<ResumeInfo, PortError> {
        match self.client.resume(&self.opts.service).await {
            Ok(r) => Ok(ResumeInfo {
                held_ms: r.held_ms,
                released_datagrams: r.released_datagrams,
                expired: false,
            }),
            // The pause ended by itself (maximum hold), toward the backend from before the
            // pause: apply the redirect again.
            Err(e) if e.kind() == Some(ErrorKind::WrongState) => {
                self.redirect().await?;
                Ok(ResumeInfo {
                    held_ms: 0.0,
                    released_datagrams: 0,
                    expired: true,
                })
            }
            Err(e) => Err(proxy_err("the proxy could not resume")(e)),
        }
    }

    async fn undo(&mut self) -> Result<(), PortError> {
        let mut failed = None;
        if self.opts.redirect.is_some() {
            if let Err(e) = self
                .client
                .redirect(&self.opts.service, self.original)
                .await
            {
                failed = Some(proxy_err(&format!("redirect back to {}", self.original))(e));
            }
        }
        match self.client.resume(&self.opts.service).await {
            Ok(_) => {}
            // Already active: the pause ended by itself, or never began.
            Err(e) if e.kind() == Some(ErrorKind::WrongState) => {}
            Err(e) => failed = failed.or(Some(proxy_err("resume")(e))),
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
