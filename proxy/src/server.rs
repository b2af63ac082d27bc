//! The proxy as a whole: binds every listener, runs the data path, the control server and the
//! metrics server, and offers the control operations in-process through [`ProxyHandle`].

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::answer::AnswerWatch;
use crate::api::{
    AnswerReport, CommandError, Commands, FlowList, PauseReport, RedirectReport, ResumeReport,
    Status,
};
use crate::config::Config;
use crate::metrics::{self, GlobalMetrics, ServiceMetrics};
use crate::service::Service;
use crate::state::Phase;
use crate::util::millis;
use crate::{control, tcp, udp};

/// The proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A listen address could not be bound.
    #[error("service {service}: binding {proto} {addr}: {error}")]
    Bind {
        /// The service.
        service: String,
        /// `tcp` or `udp`.
        proto: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The control socket could not be created.
    #[error("control socket {path}: {reason}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The metrics address could not be bound.
    #[error("metrics address {addr}: {error}")]
    Metrics {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

#[derive(Debug)]
struct Inner {
    services: Vec<Arc<Service>>,
    by_name: HashMap<String, usize>,
    global: Arc<GlobalMetrics>,
    started: Instant,
}

/// A running proxy. Dropping it stops everything: listeners, flows (their connections are
/// closed), the control server (its socket file is removed) and the metrics server.
#[derive(Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
    tasks: JoinSet<()>,
    control_path: Option<PathBuf>,
    metrics_addr: Option<SocketAddr>,
}

impl Proxy {
    /// Validates `config`, binds every listener, the control socket (`config.control`, created
    /// fresh with mode 0600) and the metrics address, and starts serving. Must be called within
    /// a Tokio runtime.
    pub async fn start(config: &Config) -> Result<Proxy, ProxyError> {
        config.validate()?;
        let global = Arc::new(GlobalMetrics::default());
        let mut tasks = JoinSet::new();
        let mut services = Vec::new();
        let mut by_name = HashMap::new();
        let mut accepts = Vec::new();
        for sc in &config.services {
            let metrics = Arc::new(ServiceMetrics::default());
            let answers = Arc::new(AnswerWatch::new(metrics.clone()));
            let ids = Arc::new(AtomicU64::new(1));
            let mut tcp_listen = Vec::new();
            for addr in &sc.tcp_listen {
                let bind_err = |error| ProxyError::Bind {
                    service: sc.name.clone(),
                    proto: "tcp",
                    addr: *addr,
                    error,
                };
                let l = tcp::bind(*addr).map_err(bind_err)?;
                tcp_listen.push(l.local_addr().map_err(bind_err)?);
                accepts.push((services.len(), l));
            }
            let mut udp_listen = Vec::new();
            let mut handles = Vec::new();
            for addr in &sc.udp_listen {
                let bind_err = |error| ProxyError::Bind {
                    service: sc.name.clone(),
                    proto: "udp",
                    addr: *addr,
                    error,
                };
                let s = udp::bind(*addr).map_err(bind_err)?;
                udp_listen.push(s.local_addr().map_err(bind_err)?);
                let (h, task) = udp::actor(
                    sc.name.clone(),
                    s,
                    sc.backend,
                    sc.limits,
                    metrics.clone(),
                    answers.clone(),
                    ids.clone(),
                )
                .map_err(bind_err)?;
                handles.push(h);
                tasks.spawn(task);
            }
            by_name.insert(sc.name.clone(), services.len());
            services.push(Arc::new(Service::new(
                sc.name.clone(),
                sc.backend,
                sc.limits,
                tcp_listen,
                udp_listen,
                handles,
                ids,
                metrics,
                global.clone(),
                answers,
            )));
        }
        for (i, l) in accepts {
            tasks.spawn(services[i].accept_tcp(l));
        }
        let inner = Arc::new(Inner {
            services,
            by_name,
            global,
            started: Instant::now(),
        });

        let metrics_addr = match config.metrics {
            Some(addr) => {
                let l = metrics::bind(addr)
                    .await
                    .map_err(|error| ProxyError::Metrics { addr, error })?;
                let bound = l
                    .local_addr()
                    .map_err(|error| ProxyError::Metrics { addr, error })?;
                let handle = ProxyHandle {
                    inner: inner.clone(),
                };
                tasks.spawn(metrics::serve(l, Arc::new(move || handle.metrics_text())));
                Some(bound)
            }
            None => None,
        };

        let control_path = match &config.control {
            Some(path) => {
                let l = control::bind(path)
                    .await
                    .map_err(|reason| ProxyError::Control {
                        path: path.clone(),
                        reason,
                    })?;
                tasks.spawn(control::serve(
                    l,
                    ProxyHandle {
                        inner: inner.clone(),
                    },
                    inner.global.clone(),
                ));
                Some(path.clone())
            }
            None => None,
        };

        for s in &inner.services {
            tracing::info!(
                service = %s.name(),
                backend = %s.backend(),
                "listening on tcp {:?} udp {:?}",
                s.tcp_listen,
                s.udp_listen
            );
        }
        Ok(Proxy {
            inner,
            tasks,
            control_path,
            metrics_addr,
        })
    }

    /// Operations on the running proxy, without the control socket.
    pub fn handle(&self) -> ProxyHandle {
        ProxyHandle {
            inner: self.inner.clone(),
        }
    }

    /// The control socket's path, if one was configured.
    pub fn control_path(&self) -> Option<&Path> {
        self.control_path.as_deref()
    }

    /// The metrics server's bound address, if one was configured.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The bound TCP listen addresses of `service` (port 0 in the configuration is resolved).
    pub fn tcp_addrs(&self, service: &str) -> Vec<SocketAddr> {
        self.handle()
            .service(service)
            .map(|s| s.tcp_listen.clone())
            .unwrap_or_default()
    }

    /// The bound UDP listen addresses of `service`.
    pub fn udp_addrs(&self, service: &str) -> Vec<SocketAddr> {
        self.handle()
            .service(service)
            .map(|s| s.udp_listen.clone())
            .unwrap_or_default()
    }

    /// Serves until `shutdown` resolves, then stops (as dropping does).
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                r = self.tasks.join_next() => match r {
                    Some(Err(e)) if e.is_panic() => {
                        tracing::error!("a proxy task panicked: {e}");
                    }
                    Some(_) => {}
                    None => std::future::pending::<()>().await,
                },
            }
        }
        tracing::info!("proxy shutting down");
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.tasks.abort_all();
        for s in &self.inner.services {
            s.abort_flows();
        }
        if let Some(p) = &self.control_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The control operations of a running proxy, in-process (the control socket uses these).
#[derive(Debug, Clone)]
pub struct ProxyHandle {
    inner: Arc<Inner>,
}

impl ProxyHandle {
    pub(crate) fn service(&self, name: &str) -> Result<&Arc<Service>, CommandError> {
        self.inner
            .by_name
            .get(name)
            .and_then(|i| self.inner.services.get(*i))
            .ok_or_else(|| CommandError::UnknownService(name.to_string()))
    }

    /// Every service's state and counters.
    pub fn status(&self) -> Status {
        let now = Instant::now();
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            uptime_ms: millis(now.saturating_duration_since(self.inner.started)),
            services: self.inner.services.iter().map(|s| s.status(now)).collect(),
        }
    }

    /// The flows of `service`.
    pub async fn flows(&self, service: &str) -> Result<FlowList, CommandError> {
        Ok(self.service(service)?.flows().await)
    }

    /// Pauses `service`; see the crate documentation.
    pub async fn pause(
        &self,
        service: &str,
        timeout: Option<Duration>,
    ) -> Result<PauseReport, CommandError> {
        self.service(service)?.pause(timeout).await
    }

    /// Redirects `service` to `backend`.
    pub async fn redirect(
        &self,
        service: &str,
        backend: SocketAddr,
    ) -> Result<RedirectReport, CommandError> {
        self.service(service)?.redirect(backend).await
    }

    /// Resumes `service`.
    pub async fn resume(&self, service: &str) -> Result<ResumeReport, CommandError> {
        self.service(service)?.resume().await
    }

    /// When `service` answered after its last resume (see the control command `answered`).
    pub async fn answered(
        &self,
        service: &str,
        timeout: Duration,
    ) -> Result<AnswerReport, CommandError> {
        self.service(service)?.answered(timeout).await
    }

    /// Follows the phase of `service` (e.g. to await the end of a pause by its hold timeout).
    pub fn watch_phase(&self, service: &str) -> Result<watch::Receiver<Phase>, CommandError> {
        Ok(self.service(service)?.watch_phase())
    }

    /// The counters of `service`.
    pub fn metrics(&self, service: &str) -> Result<Arc<ServiceMetrics>, CommandError> {
        Ok(self.service(service)?.metrics().clone())
    }

    /// The proxy-wide counters.
    pub fn global_metrics(&self) -> Arc<GlobalMetrics> {
        self.inner.global.clone()
    }

    /// All metrics in Prometheus' text format.
    pub fn metrics_text(&self) -> String {
        let list: Vec<(&str, &ServiceMetrics)> = self
            .inner
            .services
            .iter()
            .map(|s| (s.name(), &**s.metrics()))
            .collect();
        metrics::render(&self.inner.global, &list)
    }
}

/// What the control server serves: the methods of the same names above (a type's own methods
/// take precedence over a trait's in `ProxyHandle::name` paths).
impl Commands for ProxyHandle {
    fn status(&self) -> Status {
        ProxyHandle::status(self)
    }

    async fn flows(&self, service: &str) -> Result<FlowList, CommandError> {
        ProxyHandle::flows(self, service).await
    }

    async fn pause(
        &self,
        service: &str,
        timeout: Option<Duration>,
    ) -> Result<PauseReport, CommandError> {
        ProxyHandle::pause(self, service, timeout).await
    }

    async fn redirect(
        &self,
        service: &str,
        backend: SocketAddr,
    ) -> Result<RedirectReport, CommandError> {
        ProxyHandle::redirect(self, service, backend).await
    }

    async fn resume(&self, service: &str) -> Result<ResumeReport, CommandError> {
        ProxyHandle::resume(self, service).await
    }

    async fn answered(
        &self,
        service: &str,
        timeout: Duration,
    ) -> Result<AnswerReport, CommandError> {
        ProxyHandle::answered(self, service, timeout).await
    }
}
