//! Helpers shared by the integration tests.

#![allow(dead_code)]

use tether::scenario::{Binaries, ClientReport, ClientRun, Scenario, ScenarioConfig};
use tether::testbed::{prerequisites_or_fail, Host};
use tether_migrator::report::Report;

/// A scenario with the binaries of this build; fails (never skips) when the machine lacks root,
/// namespaces or CRIU.
pub fn scenario(cfg: &ScenarioConfig) -> Scenario {
    prerequisites_or_fail();
    let bins = Binaries::beside(env!("CARGO_BIN_EXE_tether").as_ref()).expect("binaries");
    Scenario::start(bins, cfg).expect("scenario starts")
}

/// Asserts a load client saw no error, reset or lost connection, and no failed verification.
pub fn assert_clean(r: &ClientReport, what: &str) {
    assert!(
        r.ok && r.errors.is_empty(),
        "{what}: client saw errors: {:?}",
        r.errors
    );
    for (name, p) in [("tcp", &r.tcp), ("quic", &r.quic)] {
        assert_eq!(p.errors, 0, "{what}: {name} errors");
        assert_eq!(p.resets, 0, "{what}: {name} resets");
        assert_eq!(
            p.ok_connections, p.connections,
            "{what}: {name} connections lost"
        );
    }
    assert_eq!(
        r.state_verifications.failed, 0,
        "{what}: state verification"
    );
}

/// Move `i` of a proxied scenario: migrates to `to` through the proxy with `extra` flags while
/// the `proxied` and `direct` client runs go on, and checks that it committed, that both runs
/// were clean and that the service's state verifies. Returns the report and both runs' reports.
pub fn proxied_move(
    s: &mut Scenario,
    i: usize,
    to: Host,
    extra: &[&str],
    proxied: ClientRun,
    direct: ClientRun,
) -> (Report, ClientReport, ClientReport) {
    let mut args = s.proxy_args();
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = s.migrate_with(to, None, &args).expect("run migrate");
    assert!(run.success, "move {i}: {}", run.stderr);
    let report = run.report.expect("report");
    let p = proxied.finish().expect("proxied report");
    let d = direct.finish().expect("direct report");
    s.verify_state().expect("state verifies");
    assert_clean(&p, "via proxy");
    assert_clean(&d, "direct");
    (report, p, d)
}

/// Waits (up to `within`) until the log at `path` contains `needle`, and returns the log as last
/// read. Processes write their logs asynchronously to what a test observes, so a test that
/// checks a log line waits for it rather than reading once.
pub fn wait_for_log(path: &std::path::Path, needle: &str, within: std::time::Duration) -> String {
    let deadline = std::time::Instant::now() + within;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.contains(needle) || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
