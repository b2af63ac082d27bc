//! Integration tests of live migration with real CRIU, real network namespaces as hosts, real
//! QUIC with mutual TLS and kernel TCP repair. They need root, `ip`, `nft`, `tc` and a working
//! CRIU (`scripts/setup.sh`); without them they fail with a message saying what is missing.

mod common;

use std::time::Duration;

use common::{assert_clean, scenario, wait_for_log};
use tether::scenario::{Scenario, ScenarioConfig};
use tether::testbed::Host;

#[test]
fn tcp_service_with_16_connections_moves_src_dst_src() {
    // dst restores lazily (userfaultfd), src fully: the round trip runs both restore paths.
    let mut s = scenario(&ScenarioConfig {
        full_restore_on: vec![Host::Src],
        ..Default::default()
    });
    let clients = s
        .start_clients(16, 0, Duration::from_secs(8), Some(1))
        .expect("clients");
    std::thread::sleep(Duration::from_millis(1500));
    let there = s.migrate(Host::Dst).expect("src -> dst");
    assert_eq!(s.location(), Host::Dst);
    s.verify_state().expect("state verifies on dst");
    std::thread::sleep(Duration::from_millis(1000));
    let back = s.migrate(Host::Src).expect("dst -> src");
    s.verify_state().expect("state verifies back on src");
    let r = clients.finish().expect("client report");
    for (what, r) in [("there", &there), ("back", &back)] {
        let t = &r.timings;
        println!(
            "{what}: restore {:.1} ms, commit {:.1} ms (commit sent after {:.1} ms, destination \
             live {:.1} ms after it)",
            t.restore_ms, t.commit_ms, t.commit_sent_ms, t.go_live_ms
        );
    }
    println!(
        "downtime {:.1} ms and {:.1} ms; client max stall {:.1} ms; {} requests, {} bytes verified",
        there.timings.downtime_ms,
        back.timings.downtime_ms,
        r.tcp.max_stall_ms,
        r.tcp.requests,
        r.tcp.bytes_verified
    );
    assert_clean(&r, "tcp");
    let lazy =
        |rep: &tether_migrator::report::Report| rep.criu_restore.as_ref().is_some_and(|c| c.lazy);
    assert!(
        lazy(&there),
        "dst restored lazily (needs userfaultfd: `criu check --feature uffd-noncoop`)"
    );
    assert!(!lazy(&back), "src restored fully (--lazy-restore never)");
    let metric = |h: Host, sample: &str| s.agent_metric(h, sample).expect("agent metrics");
    assert_eq!(
        metric(Host::Dst, "tether_agent_lazy_fill_seconds_count"),
        1.0
    );
    assert_eq!(metric(Host::Dst, "tether_agent_lazy_failures_total"), 0.0);
    assert_eq!(
        metric(Host::Src, "tether_agent_lazy_fill_seconds_count"),
        0.0
    );
    assert_eq!(r.tcp.connections, 16);
    assert!(r.tcp.requests > 1000, "the clients made progress");
    assert!(r.state_verifications.ok >= 3, "periodic verifications ran");
    // Nothing left behind: the address lives only where the service is, no lock tables remain.
    let svc = s.topo.service_ip();
    assert!(s.addresses(Host::Src).expect("src addrs").contains(&svc));
    assert!(!s.addresses(Host::Dst).expect("dst addrs").contains(&svc));
    for h in [Host::Src, Host::Dst] {
        assert_eq!(
            s.nft_tables(h).expect("tables"),
            Vec::<String>::new(),
            "{h}"
        );
        // Each agent received one migration and says so in its metrics.
        let metric = |sample: &str| s.agent_metric(h, sample).expect("agent metrics");
        assert_eq!(
            metric("tether_agent_migrations_total{outcome=\"committed\"}"),
            1.0,
            "{h}"
        );
        assert_eq!(metric("tether_agent_migrations_in_progress"), 0.0, "{h}");
        assert_eq!(metric("tether_agent_restore_seconds_count"), 1.0, "{h}");
        assert!(
            metric("tether_agent_received_bytes_total") > 16.0 * 1024.0 * 1024.0,
            "{h}: at least the 16 MiB state arrived"
        );
    }
}

#[test]
fn quic_connection_survives_a_migration() {
    let mut s = scenario(&ScenarioConfig::default());
    let clients = s
        .start_clients(0, 2, Duration::from_secs(6), None)
        .expect("clients");
    std::thread::sleep(Duration::from_millis(1500));
    let rep = s.migrate(Host::Dst).expect("src -> dst");
    s.verify_state().expect("state verifies on dst");
    let r = clients.finish().expect("client report");
    println!(
        "downtime {:.1} ms; QUIC max stall {:.1} ms; {} requests verified",
        rep.timings.downtime_ms, r.quic.max_stall_ms, r.quic.requests
    );
    assert_clean(&r, "quic");
    assert_eq!(r.quic.connections, 2);
    assert!(r.quic.requests > 100, "the QUIC clients made progress");
}

#[test]
fn rollback_when_the_destination_agent_dies_during_the_transfer() {
    // Stop-and-copy of 192 MiB over a 200 Mbit/s link: the frozen transfer takes seconds, long
    // enough to kill the agent while the source is frozen (the hard case; a failure during
    // pre-copy never froze anything).
    let mut s = scenario(&ScenarioConfig {
        link_rate: Some(200_000_000),
        state_mb: 192,
        dirty_pages_per_sec: 100,
        proxy: false,
        full_restore_on: Vec::new(),
        proxy_max_hold_ms: None,
        hot_first_mib: None,
        interpreted: false,
        container: false,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
    });
    let pid = s.pid();
    s.verify_state().expect("state verifies");
    let clients = s
        .start_clients(4, 1, Duration::from_secs(14), None)
        .expect("clients");
    std::thread::sleep(Duration::from_millis(1000));
    let dst_log = s.agent_log(Host::Dst);
    let killer = {
        let log = dst_log.clone();
        std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while std::time::Instant::now() < deadline {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("service address added and blocked") {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            false
        })
    };
    // Run the migration on a thread; kill the agent once the transfer is under way.
    let handle = {
        let mut cmd = s.migrate_command(Host::Dst, &s.certs(Host::Src));
        // A frozen deadline well beyond the transfer: the rollback must come from the agent's
        // death, not from the deadline.
        cmd.args(["--stop-and-copy", "--max-frozen", "30s"]);
        std::thread::spawn(move || cmd.output().expect("run migrate"))
    };
    assert!(
        killer.join().expect("watcher"),
        "the transfer never started"
    );
    std::thread::sleep(Duration::from_millis(300));
    s.kill_agent(Host::Dst).expect("kill agent");
    let out = handle.join().expect("migrate thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stderr}");
    assert!(!out.status.success(), "migrate must fail");
    assert!(
        stderr.contains("still running on the source"),
        "the message says where the service is: {stderr}"
    );
    assert!(
        !stderr.contains("--max-frozen"),
        "the rollback came from the agent's death: {stderr}"
    );
    assert_eq!(s.pid(), pid);
    assert!(s.service_alive(), "the service runs on");
    s.verify_state().expect("state verifies after the rollback");
    let r = clients.finish().expect("client report");
    println!(
        "client max stall across the rollback: tcp {:.0} ms, quic {:.0} ms",
        r.tcp.max_stall_ms, r.quic.max_stall_ms
    );
    assert_clean(&r, "rollback");
    // A restarted agent undoes what its crashed predecessor left; then a migration works.
    s.start_agent(Host::Dst).expect("agent restarts");
    assert!(!s
        .addresses(Host::Dst)
        .expect("dst addrs")
        .contains(&s.topo.service_ip()));
    assert_eq!(
        s.nft_tables(Host::Dst).expect("tables"),
        Vec::<String>::new()
    );
}

#[test]
fn rollback_when_the_restore_fails() {
    let mut s = scenario(&ScenarioConfig::default());
    let pid = s.pid();
    // Something on the destination already listens on the service's port: CRIU cannot restore
    // the service's listening socket there.
    let squatter = s
        .topo
        .listen_in(
            Host::Dst,
            ([0, 0, 0, 0], tether::scenario::SERVICE_PORT).into(),
        )
        .expect("squat the port");
    let clients = s
        .start_clients(4, 1, Duration::from_secs(5), None)
        .expect("clients");
    std::thread::sleep(Duration::from_millis(1000));
    let run = s.migrate_with(Host::Dst, None, &[]).expect("run migrate");
    println!("{}", run.stderr);
    assert!(!run.success, "migrate must fail");
    assert!(run.stderr.contains("restore"), "{}", run.stderr);
    assert!(
        run.stderr.contains("still running on the source"),
        "{}",
        run.stderr
    );
    let report = run.report.expect("a report is written on failure too");
    assert_eq!(
        serde_json::to_value(report.outcome).expect("json"),
        "rolled_back"
    );
    assert_eq!(s.location(), Host::Src);
    assert_eq!(s.pid(), pid);
    assert!(s.service_alive());
    // What the demo does after a failed move: find the one running copy.
    assert_eq!(s.relocate().expect("one running copy"), (Host::Src, pid));
    // No lock is left on the source (the rolled-back service must be reachable).
    assert_eq!(
        s.nft_tables(Host::Src).expect("tables"),
        Vec::<String>::new()
    );
    let r = clients.finish().expect("client report");
    assert_clean(&r, "failed restore");
    s.verify_state().expect("state verifies after the rollback");
    // The destination is as before, and once the port is free the migration goes through.
    assert!(!s
        .addresses(Host::Dst)
        .expect("dst addrs")
        .contains(&s.topo.service_ip()));
    assert_eq!(
        s.nft_tables(Host::Dst).expect("tables"),
        Vec::<String>::new()
    );
    let metric = |sample: &str| s.agent_metric(Host::Dst, sample).expect("agent metrics");
    assert_eq!(
        metric("tether_agent_migrations_total{outcome=\"failed\"}"),
        1.0
    );
    assert_eq!(
        metric("tether_agent_migrations_total{outcome=\"committed\"}"),
        0.0
    );
    drop(squatter);
    s.migrate(Host::Dst)
        .expect("migration after the port is free");
    s.verify_state().expect("state verifies on dst");
}

#[test]
fn agent_refuses_a_certificate_from_another_ca() {
    let mut s = scenario(&ScenarioConfig::default());
    let other = s.topo.work_dir().join("other-ca");
    tether_migrator::tls::generate(&other, &["src".into()]).expect("second CA");
    let pid = s.pid();
    let run = s
        .migrate_with(Host::Dst, Some(&other.join("src")), &[])
        .expect("run migrate");
    println!("{}", run.stderr);
    assert!(!run.success);
    assert!(run.stderr.contains("Nothing was changed"), "{}", run.stderr);
    assert!(s.service_alive());
    assert_eq!(s.pid(), pid);
    // The agent learns of the refusal from the client's CONNECTION_CLOSE (or, were that lost,
    // at its 3 s handshake idle timeout) and logs it asynchronously.
    let log = wait_for_log(
        &s.agent_log(Host::Dst),
        "refused connection",
        Duration::from_secs(10),
    );
    assert!(
        log.contains("refused connection"),
        "the agent logs the refusal: {log}"
    );
    assert!(!log.contains("authenticated peer connected"), "{log}");
    let refused = s
        .agent_metric(Host::Dst, "tether_agent_connections_refused_total")
        .expect("agent metrics");
    assert!(refused >= 1.0, "the refusal is counted: {refused}");
    s.verify_state().expect("service unharmed");
}

#[test]
fn bad_input_gives_a_clear_error_and_changes_nothing() {
    let mut s = scenario(&ScenarioConfig::default());
    let pid = s.pid();
    let certs = s.certs(Host::Src).display().to_string();
    let svc = s.topo.service_cidr().to_string();
    let dst = s.agent_addr(Host::Dst).to_string();
    let run_named = |s: &Scenario, name: Option<&str>, args: &[&str]| {
        let mut cmd = s.topo.command(Host::Src, s.tether());
        cmd.arg("migrate").args(args);
        // The test bed's directories, not the defaults under /run/tether: removed with it.
        cmd.arg("--state-dir")
            .arg(s.migrate_state_dir(Host::Src))
            .arg("--work-dir")
            .arg(s.topo.work_dir().join("bad-input-images"));
        if let Some(name) = name {
            cmd.args(["--agent-name", name]);
        }
        let out = cmd.output().expect("run migrate");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let run = |s: &Scenario, args: &[&str]| run_named(s, Some("dst"), args);
    // No agent name: neither --agent-name nor agents.toml in --certs.
    let (ok, err) = run_named(
        &s,
        None,
        &[
            "--pid",
            &pid.to_string(),
            "--to",
            &dst,
            "--certs",
            &certs,
            "--service-addr",
            &svc,
        ],
    );
    assert!(!ok && err.contains("--agent-name NAME"), "{err}");
    assert!(err.contains("agents.toml"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    // A pid that does not exist.
    let (ok, err) = run(
        &s,
        &[
            "--pid",
            "999999",
            "--to",
            &dst,
            "--certs",
            &certs,
            "--service-addr",
            &svc,
        ],
    );
    assert!(!ok && err.contains("no process with pid 999999"), "{err}");
    // An unreachable agent.
    let nobody = format!("{}:7799", s.topo.migration_addr(Host::Dst));
    let (ok, err) = run(
        &s,
        &[
            "--pid",
            &pid.to_string(),
            "--to",
            &nobody,
            "--certs",
            &certs,
            "--service-addr",
            &svc,
        ],
    );
    assert!(!ok && err.contains("cannot connect"), "{err}");
    assert!(err.contains("Nothing was changed"), "{err}");
    // A missing certificate directory.
    let (ok, err) = run(
        &s,
        &[
            "--pid",
            &pid.to_string(),
            "--to",
            &dst,
            "--certs",
            "/nonexistent/certs",
            "--service-addr",
            &svc,
        ],
    );
    assert!(!ok && err.contains("does not exist"), "{err}");
    // A malformed service address.
    let (ok, err) = run(
        &s,
        &[
            "--pid",
            &pid.to_string(),
            "--to",
            &dst,
            "--certs",
            &certs,
            "--service-addr",
            "10.77.0.100",
        ],
    );
    assert!(!ok && err.contains("IPv4/PREFIX"), "{err}");
    // The address is already in use on the destination.
    s.topo
        .run(
            Host::Dst,
            &["ip", "addr", "add", "10.77.0.100/32", "dev", "lo"],
        )
        .expect("occupy address");
    let r = s.migrate_with(Host::Dst, None, &[]).expect("run migrate");
    assert!(
        !r.success && r.stderr.contains("already in use"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("Nothing was changed"), "{}", r.stderr);
    s.topo
        .run(
            Host::Dst,
            &["ip", "addr", "del", "10.77.0.100/32", "dev", "lo"],
        )
        .expect("free address");
    // After all of that, the service is where it was and intact.
    assert_eq!(s.location(), Host::Src);
    assert_eq!(s.pid(), pid);
    assert!(s.service_alive());
    s.verify_state().expect("service unharmed");
    assert_eq!(
        s.nft_tables(Host::Src).expect("tables"),
        Vec::<String>::new()
    );
}
