//! The soak: the example service moves src -> dst -> src ... many times behind the proxy while
//! load clients (through the proxy and direct) verify every reply byte for byte. Each move has
//! its own client runs, opened before it and verified through it; per move it reports the
//! downtime, the proxy's pause (quiesce, hold), the service's first answer after the resume,
//! the clients' stalls (p50, p99 and max over the
//! connections of each one's longest wait) and the proxy's memory and CPU. Shared by
//! `examples/soak.rs` (the benchmark) and `tests/soak.rs` (a small version in CI).

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;

use crate::scenario::{
    Binaries, ClientReport, ProcessUsage, ProtoReport, Scenario, ScenarioConfig,
};
use crate::testbed::Host;

/// What to run.
#[derive(Debug, Clone)]
pub struct SoakConfig {
    /// TCP connections per path (through the proxy, and as many direct).
    pub tcp: u32,
    /// QUIC connections per path.
    pub quic: u32,
    /// Moves (alternating, each from where the service runs).
    pub moves: u32,
    /// The service's memory state, MiB.
    pub state_mb: u32,
    /// Pages the service rewrites per second.
    pub dirty_pages_per_sec: u32,
    /// src-dst link rate, Mbit/s (0: unlimited).
    pub link_mbit: u64,
    /// Pause between a reply and the next request of a connection, ms.
    pub interval_ms: u64,
    /// Restore with all memory in place before the service runs (`--lazy-restore never` on both
    /// agents) instead of lazily.
    pub full_restore: bool,
    /// The agents' `--hot-first-mib` (their default if `None`).
    pub hot_first_mib: Option<u64>,
    /// Move `examples/interpreted_service.py` (TCP only) instead of the example service.
    pub interpreted: bool,
}

/// Stalls of one path and protocol in one move, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Stalls {
    /// Median over the connections of each one's longest wait.
    pub p50: f64,
    /// 99th percentile of the same.
    pub p99: f64,
    /// The longest.
    pub max: f64,
}

impl From<&ProtoReport> for Stalls {
    /// The longest wait for one reply (request sent to reply verified) per connection: what a
    /// request caught by the move waited, without the pause between requests that the gap
    /// between replies also holds.
    fn from(p: &ProtoReport) -> Stalls {
        Stalls {
            p50: p.wait_p50_ms,
            p99: p.wait_p99_ms,
            max: p.max_wait_ms,
        }
    }
}

/// One move.
#[derive(Debug, Clone, Serialize)]
pub struct MoveRow {
    /// `src -> dst` or the other way.
    pub direction: String,
    /// Whether it committed.
    pub committed: bool,
    /// Why not, if it did not.
    pub error: Option<String>,
    /// The source's downtime, ms.
    pub downtime_ms: f64,
    /// CRIU's dump (freeze to images complete), ms.
    pub dump_ms: f64,
    /// The destination's restore, ms.
    pub restore_ms: f64,
    /// Until every flow was quiet at the pause, ms.
    pub quiesce_ms: f64,
    /// From the pause to the resume, ms.
    pub held_ms: f64,
    /// From the resume to the service's first answer through the proxy (TCP, UDP), ms.
    pub first_answer_ms: (Option<f64>, Option<f64>),
    /// Flows the proxy paused (TCP, UDP).
    pub paused_flows: (u64, u64),
    /// Datagrams the proxy held and released to the service.
    pub released_datagrams: u64,
    /// UDP datagrams the destination's kernel dropped for a full receive buffer during the move
    /// (`RcvbufErrors`): held datagrams released faster than the service reads them.
    pub dst_rcvbuf_errors: u64,
    /// Through the proxy: TCP, QUIC.
    pub proxy: (Stalls, Stalls),
    /// Direct: TCP, QUIC.
    pub direct: (Stalls, Stalls),
    /// Request latency of the proxied TCP clients: steady state (p50, p99) and within 1 s after
    /// the stall (p50, p99), ms.
    pub proxy_tcp_latency_ms: ((f64, f64), (f64, f64)),
    /// Resets, connection errors or failed verifications seen by the clients.
    pub client_errors: u64,
    /// The proxy's resident memory after the move, MiB.
    pub proxy_rss_mib: f64,
    /// The proxy's CPU time during the move's client run, s.
    pub proxy_cpu_s: f64,
    /// The service's memory state verified after the move.
    pub state_ok: bool,
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct SoakSummary {
    /// Per move.
    pub moves: Vec<MoveRow>,
    /// Moves that committed.
    pub committed: u32,
    /// Client errors over all moves (resets, lost, duplicated, reordered or corrupted bytes,
    /// failed state verifications).
    pub client_errors: u64,
    /// Datagrams the proxy dropped over the run (any reason).
    pub proxy_dropped_datagrams: u64,
}

fn errors(r: &ClientReport) -> u64 {
    [&r.tcp, &r.quic]
        .iter()
        .map(|p| p.errors + p.resets + (p.connections - p.ok_connections.min(p.connections)))
        .sum::<u64>()
        + r.state_verifications.failed
        + u64::from(!r.ok)
}

/// Runs the soak, writing a row per move to `out` as it goes.
pub fn run(bins: Binaries, cfg: &SoakConfig, out: &mut impl Write) -> anyhow::Result<SoakSummary> {
    let sc = ScenarioConfig {
        link_rate: (cfg.link_mbit > 0).then_some(cfg.link_mbit * 1_000_000),
        state_mb: cfg.state_mb,
        dirty_pages_per_sec: cfg.dirty_pages_per_sec,
        proxy: true,
        full_restore_on: if cfg.full_restore {
            vec![Host::Src, Host::Dst]
        } else {
            Vec::new()
        },
        proxy_max_hold_ms: None,
        hot_first_mib: cfg.hot_first_mib,
        interpreted: cfg.interpreted,
        container: false,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
    };
    let mut s = Scenario::start(bins, &sc).context("starting the test bed")?;
    writeln!(
        out,
        "{:<11} {:>4} {:>9} {:>7} {:>8} {:>8} {:>11} {:>8} {:>23} {:>23} {:>23} {:>23} {:>6} {:>7} {:>6}",
        "move",
        "ok",
        "downtime",
        "dump",
        "quiesce",
        "held",
        "answer",
        "flows",
        "proxy tcp stall",
        "proxy quic stall",
        "direct tcp stall",
        "direct quic stall",
        "errors",
        "rss",
        "cpu"
    )?;
    writeln!(
        out,
        "{:<11} {:>4} {:>9} {:>7} {:>8} {:>8} {:>11} {:>8} {:>23} {:>23} {:>23} {:>23} {:>6} {:>7} {:>6}",
        "",
        "",
        "ms",
        "ms",
        "ms",
        "ms",
        "tcp/udp ms",
        "tcp/udp",
        "p50/p99/max ms",
        "p50/p99/max ms",
        "p50/p99/max ms",
        "p50/p99/max ms",
        "",
        "MiB",
        "s"
    )?;
    let via_proxy = s.proxy_addr();
    let service = s.service_addr();
    let interval = cfg.interval_ms.to_string();
    let extra = ["--interval-ms", interval.as_str(), "--stagger-ms", "1"];
    // (The gap between replies, which the demo shows, also holds the pause between requests.)
    let mut rows = Vec::new();
    let dropped_before = proxy_dropped(&s);
    for _ in 0..cfg.moves {
        let from = s.location();
        let to = if from == Host::Src {
            Host::Dst
        } else {
            Host::Src
        };
        // Long enough for every connection to open (staggered by 1 ms) before the move; the
        // clients run until the move has ended (however long pre-copy takes), and one second.
        let open = Duration::from_millis(u64::from(cfg.tcp + cfg.quic) + 1500);
        let secs = Duration::from_secs(600);
        let cpu0 = s.proxy_usage().map_or(0.0, |u| u.cpu_s);
        let rcvbuf0 = rcvbuf_errors(&s, to);
        let proxied = s.start_clients_to(via_proxy, cfg.tcp, cfg.quic, secs, None, &extra)?;
        let direct = s.start_clients_to(service, cfg.tcp, cfg.quic, secs, None, &extra)?;
        std::thread::sleep(open);
        let args = s.proxy_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let run = s.migrate_with(to, None, &args)?;
        std::thread::sleep(Duration::from_secs(1));
        let p = proxied.stop()?;
        let d = direct.stop()?;
        let dst_rcvbuf_errors = rcvbuf_errors(&s, to).saturating_sub(rcvbuf0);
        let usage = s.proxy_usage().unwrap_or(ProcessUsage {
            rss_kib: 0,
            cpu_s: cpu0,
        });
        let committed = run.success;
        let error = (!committed).then(|| run.stderr.trim().to_string());
        if !committed {
            s.relocate()
                .context("after a failed move, where does the service run")?;
        }
        let state_ok = s.verify_state().is_ok();
        let report = run.report;
        let t = report
            .as_ref()
            .map(|r| r.timings.clone())
            .unwrap_or_default();
        let px = report
            .as_ref()
            .and_then(|r| r.proxy.clone())
            .unwrap_or_default();
        let row = MoveRow {
            direction: format!("{from} -> {to}"),
            committed,
            error,
            downtime_ms: t.downtime_ms,
            dump_ms: t.dump_ms,
            restore_ms: t.restore_ms,
            quiesce_ms: px.quiesce_ms,
            held_ms: px.held_ms,
            first_answer_ms: (px.first_tcp_answer_ms, px.first_udp_answer_ms),
            paused_flows: (px.tcp_flows, px.udp_flows),
            released_datagrams: px.released_datagrams,
            dst_rcvbuf_errors,
            proxy: ((&p.tcp).into(), (&p.quic).into()),
            direct: ((&d.tcp).into(), (&d.quic).into()),
            proxy_tcp_latency_ms: (
                (p.tcp.steady_p50_ms, p.tcp.steady_p99_ms),
                (p.tcp.after_stall_p50_ms, p.tcp.after_stall_p99_ms),
            ),
            client_errors: errors(&p) + errors(&d),
            proxy_rss_mib: usage.rss_kib as f64 / 1024.0,
            proxy_cpu_s: usage.cpu_s - cpu0,
            state_ok,
        };
        let st = |x: Stalls| format!("{:.0}/{:.0}/{:.0}", x.p50, x.p99, x.max);
        writeln!(
            out,
            "{:<11} {:>4} {:>9.1} {:>7.1} {:>8.1} {:>8.1} {:>11} {:>8} {:>23} {:>23} {:>23} {:>23} {:>6} {:>7.1} {:>6.2}",
            row.direction,
            if committed { "yes" } else { "NO" },
            row.downtime_ms,
            row.dump_ms,
            row.quiesce_ms,
            row.held_ms,
            {
                let a = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
                format!("{}/{}", a(row.first_answer_ms.0), a(row.first_answer_ms.1))
            },
            format!("{}/{}", row.paused_flows.0, row.paused_flows.1),
            st(row.proxy.0),
            st(row.proxy.1),
            st(row.direct.0),
            st(row.direct.1),
            row.client_errors,
            row.proxy_rss_mib,
            row.proxy_cpu_s
        )?;
        let ((s50, s99), (a50, a99)) = row.proxy_tcp_latency_ms;
        writeln!(
            out,
            "    proxied TCP request latency: steady p50/p99 {s50:.1}/{s99:.1} ms, within 1 s after \
             the stall {a50:.1}/{a99:.1} ms (p99 {:.1}x)",
            if s99 > 0.0 { a99 / s99 } else { 0.0 }
        )?;
        if row.dst_rcvbuf_errors > 0 {
            writeln!(
                out,
                "    {} datagram(s) dropped at {to} for a full receive buffer ({} released by the \
                 proxy)",
                row.dst_rcvbuf_errors, row.released_datagrams
            )?;
        }
        if let Some(e) = &row.error {
            writeln!(out, "    failed: {e}")?;
        }
        for e in p.errors.iter().chain(&d.errors).take(5) {
            writeln!(out, "    client: {e}")?;
        }
        if !state_ok {
            writeln!(out, "    the service's memory state did not verify")?;
        }
        rows.push(row);
    }
    let proxy_dropped_datagrams = proxy_dropped(&s).saturating_sub(dropped_before);
    let summary = SoakSummary {
        committed: rows.iter().filter(|r| r.committed).count() as u32,
        client_errors: rows.iter().map(|r| r.client_errors).sum::<u64>()
            + rows.iter().filter(|r| !r.state_ok).count() as u64,
        proxy_dropped_datagrams,
        moves: rows,
    };
    writeln!(
        out,
        "\n{}/{} moves committed; {} client errors (resets, lost/duplicated/reordered/corrupted \
         bytes, lost connections, failed state checks); {} datagrams dropped by the proxy.\n\
         stall: per connection, its longest wait for one reply (request sent to reply \
         verified); p50/p99/max over the connections of the move's client run. held: the \
         proxy's pause to resume; quiesce: until no byte toward the service was unacknowledged; \
         answer: from the resume to the service's first byte (TCP) and datagram (UDP) through \
         the proxy. rss: the proxy's resident memory after the move; cpu: its CPU time during the run.",
        summary.committed, cfg.moves, summary.client_errors, summary.proxy_dropped_datagrams
    )?;
    Ok(summary)
}

/// `Udp: RcvbufErrors` of a host's network namespace.
fn rcvbuf_errors(s: &Scenario, host: Host) -> u64 {
    let Ok(snmp) = s.topo.run(host, &["cat", "/proc/net/snmp"]) else {
        return 0;
    };
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// The proxy's dropped-datagram counter (all reasons), from its control socket.
fn proxy_dropped(s: &Scenario) -> u64 {
    let out = s
        .topo
        .command(Host::Proxy, s.tether())
        .args(["proxyctl", "--control"])
        .arg(s.proxy_socket())
        .arg("status")
        .output();
    let Ok(out) = out else { return 0 };
    serde_json::from_slice::<tether_proxy::api::Status>(&out.stdout).map_or(0, |st| {
        st.services.iter().flat_map(|svc| svc.drops.values()).sum()
    })
}
