//! The migration model as a product, end to end: `tether plan` on a live service, `tether
//! calibrate` on real migrations' reports, and the prediction `tether migrate` records and
//! scores. Real CRIU, real namespaces; they need root and `scripts/setup.sh`, and fail when those
//! are missing.

mod common;

use std::time::Duration;

use common::scenario;
use tether::scenario::ScenarioConfig;
use tether::testbed::Host;
use tether_migrator::plan::Plan;
use tether_migrator::profile::Profile;

const MIB: f64 = 1_048_576.0;

#[test]
fn plan_calibrate_and_a_scored_prediction() {
    let mut s = scenario(&ScenarioConfig {
        link_rate: Some(1_000_000_000),
        state_mb: 64,
        dirty_pages_per_sec: 1000,
        ..Default::default()
    });
    std::thread::sleep(Duration::from_millis(500));

    // tether plan: the live measurement and both methods.
    let out = std::process::Command::new(s.tether())
        .args(["plan", "--json", "--bandwidth", "1G", "--window", "500ms"])
        .args(["--pid", &s.pid().to_string()])
        .output()
        .expect("run tether plan");
    let code = out.status.code();
    assert!(
        matches!(code, Some(0 | 3)),
        "tether plan: {code:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Plan = serde_json::from_slice(&out.stdout).expect("plan JSON");
    println!("plan: {}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        code == Some(0),
        plan.limit_holds,
        "exit status follows the plan"
    );
    let state = plan.inputs.state_bytes as f64 / MIB;
    assert!((64.0..80.0).contains(&state), "state {state} MiB");
    assert!(
        (300.0..3000.0).contains(&plan.inputs.dirty_rate),
        "dirty rate {}",
        plan.inputs.dirty_rate
    );
    assert_eq!(plan.inputs.bandwidth, 125e6);
    // The example service's TCP listener and its QUIC socket, at the least; counted into the
    // frozen phase (K n).
    assert!(plan.inputs.sockets >= 2, "sockets {}", plan.inputs.sockets);
    assert!(plan.pre_copy.rounds >= 2, "{plan:?}");
    assert!(plan.pre_copy.downtime_ms < plan.stop_and_copy.downtime_ms);
    assert!(plan.pre_copy.total_ms > plan.pre_copy.downtime_ms);
    assert!(plan.stop_and_copy.bytes_sent >= plan.inputs.state_bytes);
    // A missing link rate is a clear error, not a guess (no profile with a link here).
    let out = std::process::Command::new(s.tether())
        .args(["plan", "--profile", "/nonexistent/profile.toml"])
        .args(["--pid", &s.pid().to_string()])
        .output()
        .expect("run tether plan");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/profile.toml"), "{err}");

    // Two real moves, both methods, then a profile fitted to their reports. Their profile records
    // no link: no prediction is made.
    let dir = tempfile::tempdir().expect("tempdir");
    let builtin = dir.path().join("builtin.toml");
    Profile::default().save(&builtin).expect("save");
    let builtin = builtin.display().to_string();
    let mut reports = Vec::new();
    for (i, (to, method)) in [(Host::Dst, Some("--stop-and-copy")), (Host::Src, None)]
        .into_iter()
        .enumerate()
    {
        let mut extra = vec!["--profile", builtin.as_str()];
        extra.extend(method);
        let run = s.migrate_with(to, None, &extra).expect("run migrate");
        assert!(run.success, "move {i}: {}", run.stderr);
        let r = run.report.expect("report");
        assert!(r.prediction.is_none(), "no link known: no prediction");
        let path = dir.path().join(format!("move-{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&r).expect("json")).expect("write report");
        reports.push(path);
        s.verify_state().expect("state verifies");
    }
    let profile_path = dir.path().join("profile.toml");
    let out = std::process::Command::new(s.tether())
        .args(["calibrate", "--bandwidth", "1G", "--out"])
        .arg(&profile_path)
        .args(&reports)
        .output()
        .expect("run tether calibrate");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tether calibrate: {err}");
    println!("calibrate: {}{err}", String::from_utf8_lossy(&out.stdout));
    let profile = Profile::load(&profile_path).expect("the written profile loads");
    assert_eq!(profile.link_mbit, Some(1000.0));
    assert!(
        profile.source.contains("2 migration(s)"),
        "{}",
        profile.source
    );

    // With that profile, tether migrate predicts the move and scores its prediction.
    let profile_arg = profile_path.display().to_string();
    let run = s
        .migrate_with(Host::Dst, None, &["--profile", &profile_arg])
        .expect("run migrate");
    assert!(run.success, "{}", run.stderr);
    let r = run.report.expect("report");
    let p = r.prediction.as_ref().expect("a prediction in the report");
    let e = r.prediction_error.expect("a scored prediction");
    println!(
        "predicted downtime {:.1} ms, measured {:.1} ms; total {:.1} vs {:.1} ms; {e:?}",
        p.pre_copy.downtime_ms, r.timings.downtime_ms, p.pre_copy.total_ms, r.timings.total_ms
    );
    assert_eq!(p.inputs.bandwidth, 125e6, "the profile's link");
    let d = e.downtime.expect("downtime error");
    let t = e.total.expect("total error");
    // Not a timing assertion: a prediction off by more than 5x is broken, not noisy.
    assert!((-0.8..4.0).contains(&d), "downtime error {d}");
    assert!((-0.8..4.0).contains(&t), "total error {t}");
    assert!(
        r.precopy.rounds[..r.precopy.rounds.len() - 1]
            .iter()
            .all(|x| x.predicted_next_pages.is_some() && x.predicted_next_ms.is_some()),
        "every round predicts the next"
    );
    s.verify_state().expect("state verifies");
}
