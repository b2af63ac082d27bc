//! The destination agent's metrics: counters updated as migrations arrive, rendered in
//! Prometheus' text format and served (with tether-proxy's small HTTP server) off the migration
//! path. Pure apart from the atomics; [`render`] is unit-tested.

use std::fmt::Write as _;

use tether_proxy::metrics::{Counter, DurationHistogram, Gauge};

/// How a migration that reached this agent ended, from the agent's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Refused before anything on this host changed (bad hello, address in use, busy, ...).
    Refused,
    /// Failed here (transfer, rebuild or restore) and undone; the source keeps the service.
    Failed,
    /// Restored here, then aborted by the source or never committed, and undone.
    Undone,
    /// Committed: the service runs here.
    Committed,
}

impl Outcome {
    /// Every outcome, in the metrics' order.
    pub const ALL: [Outcome; 4] = [
        Outcome::Refused,
        Outcome::Failed,
        Outcome::Undone,
        Outcome::Committed,
    ];

    /// The outcome's label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
            Outcome::Undone => "undone",
            Outcome::Committed => "committed",
        }
    }

    fn index(self) -> usize {
        // Declaration order, which is also the order of `ALL`.
        self as usize
    }
}

/// The agent's counters.
#[derive(Debug, Default)]
pub struct AgentMetrics {
    /// Connections refused during the handshake (no certificate of our CA, bad TLS, ...).
    pub connections_refused_total: Counter,
    /// Migrations between their hello and their end.
    pub migrations_in_progress: Gauge,
    outcomes: [Counter; Outcome::ALL.len()],
    /// Bytes of page batches and image files received.
    pub received_bytes_total: Counter,
    /// Pages received during pre-copy rounds.
    pub precopy_pages_total: Counter,
    /// Pages received in final differences (while a source was frozen).
    pub final_pages_total: Counter,
    /// Leftovers of an earlier agent undone at start-up.
    pub leftovers_undone_total: Counter,
    /// From the complete image set to a restored tree (block move, announce, CRIU restore).
    pub restore_duration: DurationHistogram,
    /// Waiting for the pages files' rebuild after the last image arrived.
    pub rebuild_wait_duration: DurationHistogram,
    /// Lazy restores: from starting the lazy-pages daemon until all memory was in place.
    pub lazy_fill_duration: DurationHistogram,
    /// Lazy restores whose daemon failed or timed out after the commit.
    pub lazy_failures_total: Counter,
}

impl AgentMetrics {
    /// Counts a migration's end.
    pub fn ended(&self, outcome: Outcome) {
        self.outcomes[outcome.index()].inc();
    }

    /// Migrations that ended so.
    pub fn outcomes(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()].get()
    }
}

/// The metrics in Prometheus' text exposition format.
pub fn render(m: &AgentMetrics) -> String {
    let mut out = String::with_capacity(4096);
    let head = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
    };
    for (name, kind, help, value) in [
        (
            "tether_agent_connections_refused_total",
            "counter",
            "Connections refused during the handshake (no certificate of this CA, bad TLS).",
            m.connections_refused_total.get() as i64,
        ),
        (
            "tether_agent_migrations_in_progress",
            "gauge",
            "Migrations between their hello and their end.",
            m.migrations_in_progress.get(),
        ),
    ] {
        head(&mut out, name, kind, help);
        let _ = writeln!(out, "{name} {value}");
    }
    head(
        &mut out,
        "tether_agent_migrations_total",
        "counter",
        "Migrations that reached this agent, by how they ended here.",
    );
    for o in Outcome::ALL {
        let _ = writeln!(
            out,
            "tether_agent_migrations_total{{outcome=\"{}\"}} {}",
            o.as_str(),
            m.outcomes(o)
        );
    }
    for (name, help, c) in [
        (
            "tether_agent_received_bytes_total",
            "Bytes of page batches and image files received.",
            &m.received_bytes_total,
        ),
        (
            "tether_agent_precopy_pages_total",
            "Pages received in pre-copy rounds, while sources ran.",
            &m.precopy_pages_total,
        ),
        (
            "tether_agent_final_pages_total",
            "Pages received in final differences, while sources were frozen.",
            &m.final_pages_total,
        ),
        (
            "tether_agent_leftovers_undone_total",
            "Unfinished migrations of an earlier agent undone at start-up.",
            &m.leftovers_undone_total,
        ),
        (
            "tether_agent_lazy_failures_total",
            "Lazy restores whose lazy-pages daemon failed or timed out after the commit.",
            &m.lazy_failures_total,
        ),
    ] {
        head(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", c.get());
    }
    for (name, help, h) in [
        (
            "tether_agent_restore_seconds",
            "From the complete image set to a restored tree (part of the downtime).",
            &m.restore_duration,
        ),
        (
            "tether_agent_rebuild_wait_seconds",
            "Waiting for the pages files' rebuild after the last image arrived (part of the downtime).",
            &m.rebuild_wait_duration,
        ),
        (
            "tether_agent_lazy_fill_seconds",
            "Lazy restores: from starting the lazy-pages daemon until all memory was in place.",
            &m.lazy_fill_duration,
        ),
    ] {
        head(&mut out, name, "histogram", help);
        h.write_samples(&mut out, name, "");
    }
    out
}

/// Serves [`render`] of `metrics` at `http://listener/metrics` until dropped.
pub async fn serve(listener: tokio::net::TcpListener, metrics: std::sync::Arc<AgentMetrics>) {
    tether_proxy::metrics::serve(listener, std::sync::Arc::new(move || render(&metrics))).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn render_lists_every_family_with_its_values() {
        let m = AgentMetrics::default();
        m.ended(Outcome::Committed);
        m.ended(Outcome::Committed);
        m.ended(Outcome::Failed);
        m.migrations_in_progress.add(1);
        m.received_bytes_total.add(4096);
        m.restore_duration.observe(Duration::from_millis(150));
        let text = render(&m);
        for line in [
            "tether_agent_migrations_total{outcome=\"committed\"} 2",
            "tether_agent_migrations_total{outcome=\"failed\"} 1",
            "tether_agent_migrations_total{outcome=\"refused\"} 0",
            "tether_agent_migrations_total{outcome=\"undone\"} 0",
            "tether_agent_migrations_in_progress 1",
            "tether_agent_received_bytes_total 4096",
            "tether_agent_restore_seconds_bucket{le=\"0.1\"} 0",
            "tether_agent_restore_seconds_bucket{le=\"0.2\"} 1",
            "tether_agent_restore_seconds_bucket{le=\"+Inf\"} 1",
            "tether_agent_restore_seconds_count 1",
            "tether_agent_rebuild_wait_seconds_count 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample belongs to a family announced before it.
        let mut typed = std::collections::HashSet::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                typed.insert(rest.split(' ').next().unwrap_or_default().to_string());
            } else if !l.starts_with('#') {
                let name = l.split(['{', ' ']).next().unwrap_or_default();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
                    .unwrap_or(name);
                assert!(typed.contains(family), "{l} has no TYPE line");
            }
        }
    }
}
