//! A real migration behind tether-proxy: clients through the proxy stall for the downtime only
//! (within 30 ms), the downtime as the clients see it: until the service's first answer after
//! the resume, per transport, which the proxy reports (a lazily restored service answers some
//! milliseconds after CRIU returns; the CI run that made this explicit saw a QUIC stall 28 ms
//! past the release at a 978 ms downtime). That answer itself must come promptly. Clients
//! talking to the service directly in the same migration are measured beside them, and stall
//! longer whenever a lost segment or datagram waits for a retransmission or probe timeout.
//! Needs root and `scripts/setup.sh`; fails when they are missing.

mod common;

use std::time::Duration;

use common::{proxied_move, scenario};
use tether::scenario::ScenarioConfig;
use tether_migrator::report::Report;

/// The service's first answer after the release may lag it (lazy fill, scheduling on two
/// busy cores) but not by more than this: a gross regression in the restore's fill fails.
const ANSWER_LAG_MAX_MS: f64 = 250.0;

/// The downtime a client of `transport` saw ended with the service's first answer on it:
/// the freeze to the resume, plus the answer's lag behind the release.
fn seen_downtime(r: &Report, first_answer_ms: Option<f64>, transport: &str, i: usize) -> f64 {
    let lag = first_answer_ms.unwrap_or_else(|| {
        panic!("move {i}: the proxy saw no {transport} answer after the resume")
    });
    assert!(
        lag <= ANSWER_LAG_MAX_MS,
        "move {i}: the service's first {transport} answer came {lag:.1} ms after the release"
    );
    r.timings.downtime_ms + r.timings.resume_ms + lag
}
use tether::testbed::Host;

#[test]
fn clients_behind_the_proxy_stall_for_the_downtime_only() {
    let mut s = scenario(&ScenarioConfig {
        proxy: true,
        full_restore_on: Vec::new(),
        // 64 MiB moved stop-and-copy: a downtime past TCP's 200 ms minimum RTO, where a
        // segment lost at the freeze costs direct clients a doubled timeout.
        state_mb: 64,
        ..Default::default()
    });
    let via_proxy = s.proxy_addr();
    let mut rows = Vec::new();
    for (i, to) in [Host::Dst, Host::Src, Host::Dst].into_iter().enumerate() {
        // A request every 2 ms on each of 20 connections: at the freeze some are in flight,
        // yet the two cores are not saturated. Back-to-back requests (no interval) kept both
        // cores busy in a debug build, and the scheduling delays they caused (up to 40 ms, in
        // the pause's control round trip and in the QUIC client after the release) made the
        // 30 ms criterion fail in 3 of 10 runs; with 2 ms it held in 6 of 6, 0.5-10 ms over.
        let busy = ["--interval-ms", "2"];
        let proxied = s
            .start_clients_to(via_proxy, 8, 2, Duration::from_secs(4), None, &busy)
            .expect("clients via the proxy");
        let service = s.service_addr();
        let direct = s
            .start_clients_to(service, 8, 2, Duration::from_secs(4), None, &busy)
            .expect("direct clients");
        std::thread::sleep(Duration::from_millis(1500));
        let (report, p, d) = proxied_move(&mut s, i, to, &["--stop-and-copy"], proxied, direct);
        let down = report.timings.downtime_ms;
        let proxy = report.proxy.clone().expect("proxy figures in the report");
        let tcp_seen = seen_downtime(&report, proxy.first_tcp_answer_ms, "TCP", i);
        let udp_seen = seen_downtime(&report, proxy.first_udp_answer_ms, "UDP", i);
        println!(
            "move {i} -> {to}: downtime {down:.1} ms (proxy held {:.1} ms: {:.1} before, of which \
             quiesce {:.1}, and {:.1} after; first answer after the release: tcp {:.1} quic \
             {:.1} ms); max stall via proxy: tcp {:.1} quic {:.1} ms; direct: tcp {:.1} quic \
             {:.1} ms",
            proxy.held_ms,
            proxy.before_downtime_ms,
            proxy.quiesce_ms,
            proxy.after_downtime_ms,
            tcp_seen - down - report.timings.resume_ms,
            udp_seen - down - report.timings.resume_ms,
            p.tcp.max_stall_ms,
            p.quic.max_stall_ms,
            d.tcp.max_stall_ms,
            d.quic.max_stall_ms
        );
        assert_eq!(proxy.tcp_flows, 8, "the proxy held every TCP connection");
        for (transport, stall, seen) in [
            ("TCP", p.tcp.max_stall_ms, tcp_seen),
            ("QUIC", p.quic.max_stall_ms, udp_seen),
        ] {
            assert!(
                stall <= seen + 30.0,
                "move {i}: {transport} stall via the proxy {stall:.1} ms exceeds the downtime its \
                 clients saw, {seen:.1} ms (CRIU's {down:.1} ms), + 30 ms"
            );
        }
        rows.push((
            down,
            p.tcp.max_stall_ms.max(p.quic.max_stall_ms),
            d.tcp.max_stall_ms.max(d.quic.max_stall_ms),
        ));
    }
    // Without the proxy, a segment or datagram lost at the freeze waits for a (doubling)
    // retransmission timeout, unless the service's own retransmission after the restore comes
    // first; on this one-LAN topology (gratuitous ARP, CRIU lifting the block) direct clients
    // often recover at the downtime too, so "longer" is printed, not asserted. What must hold:
    // going through the proxy never costs more than going direct.
    let longer = rows.iter().filter(|r| r.2 > r.1 + 30.0).count();
    println!(
        "direct clients stalled over 30 ms longer than proxied ones in {longer} of {} moves",
        rows.len()
    );
    for (i, (_, proxied, direct)) in rows.iter().enumerate() {
        assert!(
            *proxied <= direct + 30.0,
            "move {i}: the proxy made the stall longer ({proxied:.1} ms) than going direct \
             ({direct:.1} ms)"
        );
    }
}
