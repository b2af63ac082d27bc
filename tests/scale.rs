//! A service with thousands of connections moves: 2,000 idle TCP connections (each checked once
//! before and once after the move) beside a few busy TCP and QUIC ones. Every dump of a tree with
//! more than about 500 sockets used to fail (CRIU's per-connection nftables lock aborted it).
//! Needs root and `scripts/setup.sh`; fails when they are missing.

mod common;

use std::time::Duration;

use common::{assert_clean, scenario};
use tether::scenario::ScenarioConfig;
use tether::testbed::Host;

const IDLE: u64 = 2000;

#[test]
fn a_service_with_2000_tcp_connections_moves_and_every_connection_works_after() {
    let mut s = scenario(&ScenarioConfig::default());
    let service = s.service_addr();
    let idle = IDLE.to_string();
    let clients = s
        .start_clients_to(
            service,
            8,
            2,
            Duration::from_secs(12),
            None,
            &["--idle", &idle, "--interval-ms", "2"],
        )
        .expect("clients");
    // Let every idle connection open and make its first request.
    std::thread::sleep(Duration::from_secs(4));
    let report = s.migrate(Host::Dst).expect("the move commits");
    let r = clients.finish().expect("client report");
    println!(
        "downtime {:.1} ms (dump {:.1}, transfer {:.1}, restore {:.1}); idle connections {} ok of {}; \
         busy tcp max stall {:.1} ms, quic {:.1} ms",
        report.timings.downtime_ms,
        report.timings.dump_ms,
        report.timings.transfer_ms,
        report.timings.restore_ms,
        r.idle.ok_connections,
        r.idle.connections,
        r.tcp.max_stall_ms,
        r.quic.max_stall_ms
    );
    assert_clean(&r, "2,000 idle connections");
    // The report counts the tree's sockets (the model's n): the idle and busy connections, the
    // listener and the QUIC socket.
    assert!(
        report.sockets >= IDLE + 8,
        "sockets in the report: {}",
        report.sockets
    );
    assert_eq!(r.idle.connections, IDLE, "idle connections opened");
    assert_eq!(
        r.idle.ok_connections, IDLE,
        "idle connections that answered after the move"
    );
    assert_eq!(r.idle.resets, 0);
    // Each made one request before the move and one after.
    assert_eq!(r.idle.requests, 2 * IDLE);
    s.verify_state().expect("state verifies");
    assert_eq!(s.location(), Host::Dst);
    assert_eq!(
        s.nft_tables(Host::Src).expect("tables"),
        Vec::<String>::new(),
        "the source's locks are gone"
    );
}
