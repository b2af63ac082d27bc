//! The soak's small version: 100 TCP and 20 QUIC clients through the proxy and as many direct,
//! each verified byte for byte, while the service moves 4 times. Every move commits and no
//! client sees a reset, a lost, duplicated, reordered or corrupted byte, or a lost connection.
//! The stalls are printed, not asserted (a timing on a shared machine; `examples/soak.rs` is the
//! benchmark). Needs root and `scripts/setup.sh`; fails when they are missing.

use tether::scenario::Binaries;
use tether::soak::{self, SoakConfig};
use tether::testbed::prerequisites_or_fail;

#[test]
fn the_service_moves_4_times_under_120_clients_per_path_without_a_client_error() {
    prerequisites_or_fail();
    let bins = Binaries::beside(env!("CARGO_BIN_EXE_tether").as_ref()).expect("binaries");
    let cfg = SoakConfig {
        tcp: 100,
        quic: 20,
        moves: 4,
        state_mb: 16,
        dirty_pages_per_sec: 1000,
        link_mbit: 1000,
        interval_ms: 10,
        full_restore: false,
        hot_first_mib: None,
        interpreted: false,
    };
    let mut out = Vec::new();
    let summary = soak::run(bins, &cfg, &mut out).expect("the soak runs");
    println!("{}", String::from_utf8_lossy(&out));
    assert_eq!(summary.committed, 4, "moves committed");
    assert_eq!(summary.client_errors, 0, "client errors");
    for m in &summary.moves {
        assert!(m.state_ok, "{}: state", m.direction);
        assert_eq!(m.paused_flows.0, 100, "{}: TCP flows paused", m.direction);
        // Flows of earlier moves' clients stay in the table until they idle out.
        assert!(m.paused_flows.1 >= 20, "{}: UDP flows paused", m.direction);
    }
}
