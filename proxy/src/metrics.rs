//! Counters of the data path (plain atomics, updated with relaxed ordering) and their rendering in
//! Prometheus' text format, served over HTTP by a small server off the data path.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Why the proxy dropped a datagram or refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum DropReason {
    /// A datagram from a new client flow while the UDP flow table was full.
    UdpFlowTableFull,
    /// Held datagram refused: the flow's queue had its maximum number of datagrams.
    HoldFlowDatagrams,
    /// Held datagram refused: the flow's queue had its maximum number of bytes.
    HoldFlowBytes,
    /// Held datagram refused: all queues together had their maximum number of datagrams.
    HoldTotalDatagrams,
    /// Held datagram refused: all queues together had their maximum number of bytes.
    HoldTotalBytes,
    /// Held datagram discarded because it had waited longer than the maximum age.
    HoldAge,
    /// Sending a datagram to the service failed.
    UdpUpstreamSend,
    /// The flow's upstream socket could not take more and its backlog was full.
    UdpUpstreamBacklog,
    /// The upstream socket of a new UDP flow could not be created.
    UdpUpstreamSocket,
    /// Sending a datagram to the client failed.
    UdpClientSend,
    /// A datagram longer than the receive buffer (never passed on cut short).
    UdpTooLong,
    /// A TCP connection refused because the service had its maximum number of connections.
    TcpFlowLimit,
    /// A TCP connection closed because its upstream connection could not be opened.
    TcpUpstreamConnect,
}

impl DropReason {
    /// Every reason, in a fixed order (the metrics' order).
    pub const ALL: [DropReason; 13] = [
        DropReason::UdpFlowTableFull,
        DropReason::HoldFlowDatagrams,
        DropReason::HoldFlowBytes,
        DropReason::HoldTotalDatagrams,
        DropReason::HoldTotalBytes,
        DropReason::HoldAge,
        DropReason::UdpUpstreamSend,
        DropReason::UdpUpstreamBacklog,
        DropReason::UdpUpstreamSocket,
        DropReason::UdpClientSend,
        DropReason::UdpTooLong,
        DropReason::TcpFlowLimit,
        DropReason::TcpUpstreamConnect,
    ];

    /// The reason's label value in metrics and the control API.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::UdpFlowTableFull => "udp_flow_table_full",
            DropReason::HoldFlowDatagrams => "hold_flow_datagrams",
            DropReason::HoldFlowBytes => "hold_flow_bytes",
            DropReason::HoldTotalDatagrams => "hold_total_datagrams",
            DropReason::HoldTotalBytes => "hold_total_bytes",
            DropReason::HoldAge => "hold_age",
            DropReason::UdpUpstreamSend => "udp_upstream_send",
            DropReason::UdpUpstreamBacklog => "udp_upstream_backlog",
            DropReason::UdpUpstreamSocket => "udp_upstream_socket",
            DropReason::UdpClientSend => "udp_client_send",
            DropReason::UdpTooLong => "udp_too_long",
            DropReason::TcpFlowLimit => "tcp_flow_limit",
            DropReason::TcpUpstreamConnect => "tcp_upstream_connect",
        }
    }

    fn index(self) -> usize {
        // ALL lists every variant exactly once, so the position always exists.
        DropReason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }
}

/// A monotonically increasing counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }
    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds `n` (may be negative).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    /// Sets the value.
    pub fn set(&self, n: i64) {
        self.0.store(n, Ordering::Relaxed);
    }
    /// The current value.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the duration histograms' buckets.
const DURATION_BUCKETS: [f64; 14] = [
    0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
];

/// A histogram of durations with fixed buckets (1 ms to 30 s).
#[derive(Debug, Default)]
pub struct DurationHistogram {
    buckets: [Counter; DURATION_BUCKETS.len()],
    count: Counter,
    sum_micros: Counter,
}

impl DurationHistogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (b, bound) in self.buckets.iter().zip(DURATION_BUCKETS) {
            if secs <= bound {
                b.inc();
            }
        }
        self.count.inc();
        self.sum_micros
            .add(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    }
    /// How many durations were recorded.
    pub fn count(&self) -> u64 {
        self.count.get()
    }
    /// Their sum.
    pub fn sum(&self) -> Duration {
        Duration::from_micros(self.sum_micros.get())
    }
    /// Writes this histogram as the samples of family `name` in Prometheus' text format
    /// (cumulative `_bucket`s up to `+Inf`, `_sum`, `_count`). `labels` are the samples' other
    /// label pairs, already escaped (`k="v",...`), or empty.
    pub fn write_samples(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        for (b, bound) in self.buckets.iter().zip(DURATION_BUCKETS) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{bound}\"}} {}",
                b.get()
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {}",
            self.count()
        );
        let braced = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{braced} {}", self.sum().as_secs_f64());
        let _ = writeln!(out, "{name}_count{braced} {}", self.count());
    }
}

/// The counters of one service.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Open TCP connections.
    pub tcp_flows: Gauge,
    /// TCP connections accepted.
    pub tcp_flows_total: Counter,
    /// UDP flows in the flow table.
    pub udp_flows: Gauge,
    /// UDP flows created.
    pub udp_flows_total: Counter,
    /// TCP bytes client → service.
    pub tcp_bytes_to_service: Counter,
    /// TCP bytes service → client.
    pub tcp_bytes_to_client: Counter,
    /// UDP payload bytes client → service.
    pub udp_bytes_to_service: Counter,
    /// UDP payload bytes service → client.
    pub udp_bytes_to_client: Counter,
    /// Datagrams client → service.
    pub udp_datagrams_to_service: Counter,
    /// Datagrams service → client.
    pub udp_datagrams_to_client: Counter,
    /// Datagrams held now.
    pub held_datagrams: Gauge,
    /// Bytes of held datagrams now.
    pub held_bytes: Gauge,
    /// Datagrams held and later released.
    pub released_datagrams_total: Counter,
    /// Drops by reason, indexed like [`DropReason::ALL`].
    drops: [Counter; DropReason::ALL.len()],
    /// Pauses requested.
    pub pauses_total: Counter,
    /// Pauses whose flows did not quiesce in time (or that were cancelled).
    pub pause_failures_total: Counter,
    /// Pauses ended by the maximum hold time.
    pub hold_timeouts_total: Counter,
    /// Redirects.
    pub redirects_total: Counter,
    /// From the pause command until the pause was confirmed.
    pub quiesce_duration: DurationHistogram,
    /// From the pause command until the end of the resume (the hold a client sees at most).
    pub pause_duration: DurationHistogram,
    /// From a resume until the service's first byte or datagram toward a client.
    pub first_answer: DurationHistogram,
}

impl ServiceMetrics {
    /// Counts one drop.
    pub fn drop_one(&self, reason: DropReason) {
        self.drops[reason.index()].inc();
    }
    /// Counts `n` drops.
    pub fn drop_n(&self, reason: DropReason, n: u64) {
        self.drops[reason.index()].add(n);
    }
    /// Drops so far for `reason`.
    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason.index()].get()
    }
}

/// The counters of the whole proxy.
#[derive(Debug, Default)]
pub struct GlobalMetrics {
    /// Bytes of TCP copy buffers allocated now.
    pub tcp_buffer_bytes: Gauge,
    /// Control requests served.
    pub control_requests_total: Counter,
    /// Control requests answered with an error.
    pub control_errors_total: Counter,
    /// Control connections refused (another user).
    pub control_refused_total: Counter,
}

/// Renders all metrics in Prometheus' text exposition format (version 0.0.4).
pub fn render(global: &GlobalMetrics, services: &[(&str, &ServiceMetrics)]) -> String {
    let mut out = String::with_capacity(8192);
    let mut w = Writer { out: &mut out };
    w.head(
        "tether_proxy_tcp_buffer_bytes",
        "gauge",
        "Bytes of TCP copy buffers allocated.",
    );
    w.line(
        "tether_proxy_tcp_buffer_bytes",
        "",
        global.tcp_buffer_bytes.get(),
    );
    w.head(
        "tether_proxy_control_requests_total",
        "counter",
        "Control requests served.",
    );
    w.line(
        "tether_proxy_control_requests_total",
        "",
        global.control_requests_total.get(),
    );
    w.head(
        "tether_proxy_control_errors_total",
        "counter",
        "Control requests answered with an error.",
    );
    w.line(
        "tether_proxy_control_errors_total",
        "",
        global.control_errors_total.get(),
    );
    w.head(
        "tether_proxy_control_refused_total",
        "counter",
        "Control connections refused (peer of another user).",
    );
    w.line(
        "tether_proxy_control_refused_total",
        "",
        global.control_refused_total.get(),
    );

    w.head(
        "tether_proxy_flows",
        "gauge",
        "Open flows (TCP connections, UDP flow table entries).",
    );
    for (s, m) in services {
        w.line(
            "tether_proxy_flows",
            &labels(s, &[("proto", "tcp")]),
            m.tcp_flows.get(),
        );
        w.line(
            "tether_proxy_flows",
            &labels(s, &[("proto", "udp")]),
            m.udp_flows.get(),
        );
    }
    w.head(
        "tether_proxy_flows_total",
        "counter",
        "Flows opened (TCP connections accepted, UDP flows created).",
    );
    for (s, m) in services {
        w.line(
            "tether_proxy_flows_total",
            &labels(s, &[("proto", "tcp")]),
            m.tcp_flows_total.get(),
        );
        w.line(
            "tether_proxy_flows_total",
            &labels(s, &[("proto", "udp")]),
            m.udp_flows_total.get(),
        );
    }
    w.head(
        "tether_proxy_bytes_total",
        "counter",
        "Payload bytes relayed.",
    );
    for (s, m) in services {
        for (proto, dir, c) in [
            ("tcp", "to_service", &m.tcp_bytes_to_service),
            ("tcp", "to_client", &m.tcp_bytes_to_client),
            ("udp", "to_service", &m.udp_bytes_to_service),
            ("udp", "to_client", &m.udp_bytes_to_client),
        ] {
            w.line(
                "tether_proxy_bytes_total",
                &labels(s, &[("proto", proto), ("direction", dir)]),
                c.get(),
            );
        }
    }
    w.head(
        "tether_proxy_datagrams_total",
        "counter",
        "UDP datagrams relayed.",
    );
    for (s, m) in services {
        for (dir, c) in [
            ("to_service", &m.udp_datagrams_to_service),
            ("to_client", &m.udp_datagrams_to_client),
        ] {
            w.line(
                "tether_proxy_datagrams_total",
                &labels(s, &[("direction", dir)]),
                c.get(),
            );
        }
    }
    w.head(
        "tether_proxy_held_datagrams",
        "gauge",
        "UDP datagrams held by a pause.",
    );
    for (s, m) in services {
        w.line(
            "tether_proxy_held_datagrams",
            &labels(s, &[]),
            m.held_datagrams.get(),
        );
    }
    w.head(
        "tether_proxy_held_bytes",
        "gauge",
        "Bytes of UDP datagrams held by a pause.",
    );
    for (s, m) in services {
        w.line(
            "tether_proxy_held_bytes",
            &labels(s, &[]),
            m.held_bytes.get(),
        );
    }
    w.head(
        "tether_proxy_released_datagrams_total",
        "counter",
        "Held UDP datagrams released by a resume.",
    );
    for (s, m) in services {
        w.line(
            "tether_proxy_released_datagrams_total",
            &labels(s, &[]),
            m.released_datagrams_total.get(),
        );
    }
    w.head(
        "tether_proxy_drops_total",
        "counter",
        "Datagrams dropped and connections refused, by reason.",
    );
    for (s, m) in services {
        for r in DropReason::ALL {
            w.line(
                "tether_proxy_drops_total",
                &labels(s, &[("reason", r.as_str())]),
                m.drops(r),
            );
        }
    }
    for (name, help, f) in [
        (
            "tether_proxy_pauses_total",
            "Pauses requested.",
            (|m: &ServiceMetrics| m.pauses_total.get()) as fn(&ServiceMetrics) -> u64,
        ),
        (
            "tether_proxy_pause_failures_total",
            "Pauses that did not quiesce in time or were cancelled.",
            |m| m.pause_failures_total.get(),
        ),
        (
            "tether_proxy_hold_timeouts_total",
            "Pauses ended by the maximum hold time (resumed toward the old backend).",
            |m| m.hold_timeouts_total.get(),
        ),
        ("tether_proxy_redirects_total", "Redirects.", |m| {
            m.redirects_total.get()
        }),
    ] {
        w.head(name, "counter", help);
        for (s, m) in services {
            w.line(name, &labels(s, &[]), f(m));
        }
    }
    for (name, help, f) in [
        (
            "tether_proxy_quiesce_seconds",
            "From a pause command until its flows were quiet.",
            (|m: &ServiceMetrics| &m.quiesce_duration) as fn(&ServiceMetrics) -> &DurationHistogram,
        ),
        (
            "tether_proxy_pause_seconds",
            "From a pause command until the end of its resume.",
            |m| &m.pause_duration,
        ),
        (
            "tether_proxy_first_answer_seconds",
            "From a resume until the service's first byte or datagram toward a client.",
            |m| &m.first_answer,
        ),
    ] {
        w.head(name, "histogram", help);
        for (s, m) in services {
            f(m).write_samples(w.out, name, &label_pairs(s, &[]));
        }
    }
    out
}

struct Writer<'a> {
    out: &'a mut String,
}

impl Writer<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }
    fn line(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        let _ = writeln!(self.out, "{name}{labels} {v}");
    }
}

/// `{service="NAME",k="v",...}` with label values escaped.
fn labels(service: &str, extra: &[(&str, &str)]) -> String {
    format!("{{{}}}", label_pairs(service, extra))
}

/// `service="NAME",k="v",...` (the inside of [`labels`]) with label values escaped.
fn label_pairs(service: &str, extra: &[(&str, &str)]) -> String {
    let mut s = String::from("service=\"");
    escape_into(&mut s, service);
    s.push('"');
    for (k, v) in extra {
        s.push(',');
        s.push_str(k);
        s.push_str("=\"");
        escape_into(&mut s, v);
        s.push('"');
    }
    s
}

fn escape_into(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// Largest HTTP request head the metrics server reads.
const MAX_REQUEST_HEAD: usize = 8192;

/// Serves `GET /metrics` (and `GET /`) on `listener` with the text `render` returns, one request
/// per connection. Runs until dropped. (Also serves `tether agent`'s metrics.)
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    loop {
        let (mut conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let render = render.clone();
        tokio::spawn(async move {
            let res = tokio::time::timeout(Duration::from_secs(5), async {
                let mut head = Vec::with_capacity(512);
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = conn.read(&mut buf).await?;
                    if n == 0 || head.len() + n > MAX_REQUEST_HEAD {
                        return Ok(());
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let (status, ctype, body) = respond(&head, &*render);
                let reply = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                conn.write_all(reply.as_bytes()).await?;
                conn.write_all(body.as_bytes()).await?;
                conn.shutdown().await
            })
            .await;
            if let Ok(Err(e)) = res {
                tracing::debug!("metrics: {peer}: {e}");
            }
        });
    }
}

fn respond(head: &[u8], render: &dyn Fn() -> String) -> (&'static str, &'static str, String) {
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default();
    let path = parts.next().unwrap_or_default();
    let path = path.split('?').next().unwrap_or_default();
    match (method, path) {
        ("GET", "/metrics") | ("GET", "/") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
        ),
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    }
}

/// Binds the metrics listener.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_with_labels_and_histograms() {
        let g = GlobalMetrics::default();
        g.tcp_buffer_bytes.set(4096);
        let m = ServiceMetrics::default();
        m.tcp_flows.add(2);
        m.tcp_bytes_to_service.add(10);
        m.drop_one(DropReason::HoldAge);
        m.drop_n(DropReason::UdpFlowTableFull, 3);
        m.pause_duration.observe(Duration::from_millis(15));
        let text = render(&g, &[("kv\"x", &m)]);
        assert!(text.contains("tether_proxy_tcp_buffer_bytes 4096\n"));
        assert!(text.contains("tether_proxy_flows{service=\"kv\\\"x\",proto=\"tcp\"} 2\n"));
        assert!(text.contains(
            "tether_proxy_bytes_total{service=\"kv\\\"x\",proto=\"tcp\",direction=\"to_service\"} 10\n"
        ));
        assert!(text.contains(
            "tether_proxy_drops_total{service=\"kv\\\"x\",reason=\"udp_flow_table_full\"} 3\n"
        ));
        assert!(
            text.contains("tether_proxy_drops_total{service=\"kv\\\"x\",reason=\"hold_age\"} 1\n")
        );
        assert!(
            text.contains("tether_proxy_pause_seconds_bucket{service=\"kv\\\"x\",le=\"0.01\"} 0\n")
        );
        assert!(
            text.contains("tether_proxy_pause_seconds_bucket{service=\"kv\\\"x\",le=\"0.02\"} 1\n")
        );
        assert!(
            text.contains("tether_proxy_pause_seconds_bucket{service=\"kv\\\"x\",le=\"+Inf\"} 1\n")
        );
        assert!(text.contains("tether_proxy_pause_seconds_count{service=\"kv\\\"x\"} 1\n"));
        assert!(text.contains("tether_proxy_pause_seconds_sum{service=\"kv\\\"x\"} 0.015\n"));
        // Every sample line has a value; every family has HELP and TYPE.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(
                l.rsplit(' ')
                    .next()
                    .is_some_and(|v| v.parse::<f64>().is_ok()),
                "{l}"
            );
        }
    }

    #[test]
    fn drop_reasons_are_distinct() {
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), DropReason::ALL.len());
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn http_routes() {
        let r = || "x 1\n".to_string();
        assert_eq!(respond(b"GET /metrics HTTP/1.1\r\n\r\n", &r).0, "200 OK");
        assert_eq!(respond(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n", &r).2, "x 1\n");
        assert_eq!(
            respond(b"GET /nope HTTP/1.1\r\n\r\n", &r).0,
            "404 Not Found"
        );
        assert_eq!(
            respond(b"POST /metrics HTTP/1.1\r\n\r\n", &r).0,
            "405 Method Not Allowed"
        );
        assert_eq!(respond(b"", &r).0, "405 Method Not Allowed");
    }
}
