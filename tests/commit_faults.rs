//! The commit protocol under real faults: real CRIU, network namespaces, QUIC and TCP repair,
//! clients through tether-proxy checked byte by byte. A fault is injected at an exact protocol
//! step: a process is paused there (`TETHER_TEST_HOLD=<state>:<ms>`, see
//! `tether_migrator::driver::hold`) and killed, or the src-dst link is blackholed (nftables
//! drop). Each test ends with exactly one copy of the service running, no reset, no lost byte,
//! and a clear message from `tether migrate` (or its `--recover`).
//!
//! They need root, `ip`, `nft`, `tc` and a working CRIU (`scripts/setup.sh`); without them they
//! fail with a message saying what is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{assert_clean, scenario};
use tether::scenario::{ClientRun, Scenario, ScenarioConfig};
use tether::testbed::Host;

const HOLD: &str = "TETHER_TEST_HOLD";

/// A service behind the proxy, whose hold outlasts every fault here (a fault after the commit
/// point keeps clients held until it is resolved).
fn proxied(cfg: ScenarioConfig) -> Scenario {
    scenario(&ScenarioConfig {
        proxy: true,
        proxy_max_hold_ms: Some(60_000),
        hot_first_mib: None,
        interpreted: false,
        container: false,
        container_args: Vec::new(),
        workers: 0,
        lazy_pages_from: None,
        ..cfg
    })
}

/// Clients through the proxy, a request every 2 ms on each connection.
fn clients(s: &mut Scenario, secs: u64) -> ClientRun {
    let via = s.proxy_addr();
    s.start_clients_to(
        via,
        8,
        2,
        Duration::from_secs(secs),
        None,
        &["--interval-ms", "2"],
    )
    .expect("clients via the proxy")
}

/// `tether migrate` from the service's host to `to`, through the proxy, in the background, its
/// stderr to a file.
fn spawn_migrate(s: &Scenario, to: Host, env: &[(&str, &str)], extra: &[&str]) -> (Child, PathBuf) {
    let log = s.topo.work_dir().join(format!(
        "migrate-{}.log",
        Instant::now().elapsed().as_nanos()
    ));
    let mut cmd = s.migrate_command(to, &s.certs(s.location()));
    cmd.args(s.proxy_args())
        .args(extra)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    (cmd.spawn().expect("spawn tether migrate"), log)
}

/// Waits until `path` contains `needle`; panics with its text if it does not within `within`.
fn wait_for(path: &Path, needle: &str, within: Duration) -> String {
    let log = common::wait_for_log(path, needle, within);
    assert!(
        log.contains(needle),
        "`{needle}` did not appear in {} within {within:?}:\n{log}",
        path.display()
    );
    log
}

/// Waits until the text `path` gained after its first `from` bytes contains `needle`.
fn wait_for_after(path: &Path, from: usize, needle: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        if log.get(from..).is_some_and(|new| new.contains(needle)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "`{needle}` did not appear in {} (after byte {from}) within {within:?}:\n{log}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Restarts the destination agent with a pause at `hold` (`TETHER_TEST_HOLD`), starts clients
/// through the proxy for `secs`, moves the service there in the background and kills the agent
/// once it pauses (within `within`). Returns the clients, `tether migrate` and its log, and the
/// length of the agent's log before the move.
fn kill_the_held_agent(
    s: &mut Scenario,
    hold: &str,
    secs: u64,
    within: Duration,
) -> (ClientRun, Child, PathBuf, usize) {
    s.start_agent_env(Host::Dst, &[(HOLD, hold)])
        .expect("agent with a hold");
    let c = clients(s, secs);
    std::thread::sleep(Duration::from_millis(1500));
    let dst_log = s.agent_log(Host::Dst);
    let from = std::fs::metadata(&dst_log).map_or(0, |m| m.len() as usize);
    let (child, log) = spawn_migrate(s, Host::Dst, &[], &[]);
    wait_for_after(&dst_log, from, "test hold: pausing", within);
    s.kill_agent(Host::Dst).expect("kill the agent");
    (c, child, log, from)
}

/// Waits for `tether migrate` to exit, at most [`MIGRATE_EXIT`]: a hung one is killed and fails
/// the test instead of hanging the suite.
fn wait_exit(mut child: Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + MIGRATE_EXIT;
    loop {
        if let Some(status) = child.try_wait().expect("wait for tether migrate") {
            return status;
        }
        if Instant::now() > deadline {
            sigkill(&mut child);
            panic!("tether migrate did not exit within {MIGRATE_EXIT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a `tether migrate` of these tests may take, faults and recovery included.
const MIGRATE_EXIT: Duration = Duration::from_secs(180);

fn sigkill(child: &mut Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL");
    let _ = child.wait();
}

/// Asserts exactly one copy of the service, running on `host`, and returns its pid.
fn one_copy(s: &Scenario, host: Host) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let copies = s.service_copies();
        if copies.len() == 1 && copies[0].0 == host && copies[0].2 != 'T' {
            return copies[0].1;
        }
        assert!(
            Instant::now() < deadline,
            "expected one running copy on {host}, found {copies:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Asserts that `host` holds nothing of a migration any more: no service address (unless it
/// runs the service), no nftables table.
fn nothing_left(s: &Scenario, host: Host, serves: bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let has_addr = s
            .addresses(host)
            .expect("addresses")
            .contains(&s.topo.service_ip());
        let tables = s.nft_tables(host).expect("tables");
        if has_addr == serves && tables.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{host} still holds: address {has_addr} (serves: {serves}), tables {tables:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The end of a fault that must end committed: one copy, running on the destination, nothing
/// of the migration left on either host, clients clean, state intact.
fn ends_on_dst(s: &mut Scenario, c: ClientRun, what: &str) {
    let dst_pid = one_copy(s, Host::Dst);
    s.adopt(Host::Dst, dst_pid);
    nothing_left(s, Host::Src, false);
    nothing_left(s, Host::Dst, true);
    let r = c.finish().expect("client report");
    assert_clean(&r, what);
    s.verify_state().expect("state verifies on dst");
}

/// The end of a fault that must roll back: the same process runs on the source, nothing is
/// left on the destination, clients clean, state intact.
fn ends_on_src(s: &Scenario, c: ClientRun, pid: u32, what: &str) {
    assert_eq!(one_copy(s, Host::Src), pid, "the same process runs on");
    nothing_left(s, Host::Dst, false);
    let r = c.finish().expect("client report");
    assert_clean(&r, what);
    s.verify_state().expect("state intact");
}

fn recover(s: &Scenario, host: Host) -> String {
    let out = s
        .recover_command(host)
        .output()
        .expect("run tether migrate --recover");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    println!("--recover:\n{stderr}");
    assert!(out.status.success(), "--recover: {stderr}");
    stderr
}

#[test]
fn migrate_killed_right_after_the_restore_report_rolls_back() {
    let mut s = proxied(ScenarioConfig::default());
    let pid = s.pid();
    let c = clients(&mut s, 14);
    std::thread::sleep(Duration::from_millis(1500));
    // Held once the destination has reported its (stopped) copy, before the commit point.
    let (mut child, log) = spawn_migrate(&s, Host::Dst, &[(HOLD, "ending:20000")], &[]);
    wait_for(&log, "test hold: pausing", Duration::from_secs(60));
    sigkill(&mut child);
    // CRIU read the EOF and thawed the source copy; the destination keeps its copy stopped and
    // unreachable, in doubt. The next `tether migrate` (here: --recover) resolves it.
    assert_eq!(one_copy_or_stopped(&s), vec![(Host::Src, pid)]);
    let said = recover(&s, Host::Src);
    assert!(said.contains("resolved"), "{said}");
    assert!(said.contains("still running on the source"), "{said}");
    assert_eq!(one_copy(&s, Host::Src), pid, "the same process runs on");
    nothing_left(&s, Host::Dst, false);
    nothing_left(&s, Host::Src, true);
    let r = c.finish().expect("client report");
    assert_clean(&r, "migrate killed before the commit point");
    s.verify_state().expect("state intact");
    // And the service still moves.
    s.migrate(Host::Dst)
        .expect("a migration after the recovery");
    s.verify_state().expect("state verifies on dst");
}

/// The running copies of the service (a stopped one on the destination is not counted).
fn one_copy_or_stopped(s: &Scenario) -> Vec<(Host, u32)> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let running: Vec<(Host, u32)> = s
            .service_copies()
            .into_iter()
            .filter(|c| c.2 != 'T')
            .map(|c| (c.0, c.1))
            .collect();
        if running.len() == 1 || Instant::now() > deadline {
            return running;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn migrate_killed_right_after_the_commit_is_confirmed_is_finished_by_recover() {
    let mut s = proxied(ScenarioConfig::default());
    let c = clients(&mut s, 14);
    std::thread::sleep(Duration::from_millis(1500));
    // Held once the destination confirmed that the service runs there, before the proxy's
    // resume and the source's cleanup.
    let (mut child, log) = spawn_migrate(&s, Host::Dst, &[(HOLD, "resuming:20000")], &[]);
    wait_for(&log, "test hold: pausing", Duration::from_secs(60));
    sigkill(&mut child);
    one_copy(&s, Host::Dst);
    // The proxy still holds the clients: --recover resumes it and cleans the source up.
    let said = recover(&s, Host::Src);
    assert!(said.contains("resolved: committed"), "{said}");
    ends_on_dst(&mut s, c, "migrate killed after the commit");
}

#[test]
fn agent_killed_right_after_it_reports_the_restore_commits_once_it_is_back() {
    let mut s = proxied(ScenarioConfig::default());
    // The destination agent pauses once it has sent `Restored`: it never handles the commit.
    let (c, child, log, _) =
        kill_the_held_agent(&mut s, "prepared+:30000", 16, Duration::from_secs(60));
    let dst_log = s.agent_log(Host::Dst);
    // The source ended its copy and sent the commit into the void; it waits, in doubt, for the
    // agent to come back. The restarted agent finds its stopped copy in its journal.
    std::thread::sleep(Duration::from_millis(500));
    s.start_agent(Host::Dst).expect("agent restarts");
    let status = wait_exit(child);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{said}");
    println!(
        "destination agent:\n{}",
        std::fs::read_to_string(&dst_log).unwrap_or_default()
    );
    assert!(status.success(), "tether migrate: {said}");
    assert!(said.contains("in doubt"), "it says what happened: {said}");
    ends_on_dst(&mut s, c, "agent killed after the restore");
}

#[test]
fn link_blackholed_during_the_frozen_transfer_rolls_back() {
    // 160 MiB stop-and-copy over 200 Mbit/s: the frozen transfer takes ~7 s.
    let mut s = proxied(ScenarioConfig {
        link_rate: Some(200_000_000),
        state_mb: 160,
        ..Default::default()
    });
    let pid = s.pid();
    let c = clients(&mut s, 25);
    std::thread::sleep(Duration::from_millis(1500));
    let dst_log = s.agent_log(Host::Dst);
    let (child, log) = spawn_migrate(
        &s,
        Host::Dst,
        &[],
        &["--stop-and-copy", "--max-frozen", "30s"],
    );
    wait_for(
        &dst_log,
        "service address added and blocked",
        Duration::from_secs(60),
    );
    std::thread::sleep(Duration::from_millis(500));
    s.blackhole_migration_link(true).expect("blackhole");
    let status = wait_exit(child);
    s.blackhole_migration_link(false).expect("heal");
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{said}");
    assert!(!status.success());
    assert!(
        said.contains("network side"),
        "it says which side failed: {said}"
    );
    assert!(said.contains("still running on the source"), "{said}");
    ends_on_src(&s, c, pid, "link cut during the transfer");
}

#[test]
fn link_blackholed_during_the_commit_commits_once_the_link_is_back() {
    let mut s = proxied(ScenarioConfig::default());
    let c = clients(&mut s, 20);
    std::thread::sleep(Duration::from_millis(1500));
    // Held after the restore report, before the commit point: the link goes down there, so the
    // source ends its copy and sends `Commit` into the blackhole.
    let (child, log) = spawn_migrate(&s, Host::Dst, &[(HOLD, "ending:1500")], &[]);
    wait_for(&log, "test hold: pausing", Duration::from_secs(60));
    s.blackhole_migration_link(true).expect("blackhole");
    std::thread::sleep(Duration::from_secs(8));
    s.blackhole_migration_link(false).expect("heal");
    let status = wait_exit(child);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{said}");
    assert!(status.success(), "tether migrate: {said}");
    assert!(said.contains("in doubt"), "it says what happened: {said}");
    ends_on_dst(&mut s, c, "link cut during the commit");
}

#[test]
fn max_frozen_rolls_back_a_stop_and_copy_that_cannot_finish_in_time() {
    // 128 MiB over 100 Mbit/s: ~11 s frozen, against a 2 s deadline.
    let mut s = proxied(ScenarioConfig {
        link_rate: Some(100_000_000),
        state_mb: 128,
        ..Default::default()
    });
    let pid = s.pid();
    let c = clients(&mut s, 12);
    std::thread::sleep(Duration::from_millis(1500));
    let mut args = s.proxy_args();
    args.extend(["--stop-and-copy".into(), "--max-frozen".into(), "2s".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = s.migrate_with(Host::Dst, None, &args).expect("run migrate");
    println!("{}", run.stderr);
    assert!(!run.success);
    assert!(run.stderr.contains("--max-frozen"), "{}", run.stderr);
    let report = run.report.expect("report");
    assert_eq!(
        serde_json::to_value(report.outcome).expect("json"),
        "rolled_back"
    );
    let frozen = report.timings.downtime_ms;
    println!("frozen for {frozen:.0} ms against a 2000 ms deadline");
    assert!(
        frozen <= 3000.0,
        "rolled back within the deadline + 1 s: frozen {frozen:.0} ms"
    );
    ends_on_src(&s, c, pid, "max-frozen rollback");
}

#[test]
fn agent_killed_while_the_lazy_restore_fills_memory_leaves_the_service_whole() {
    // 256 MiB restored lazily with no hot pages: after the resume nearly all of it still comes
    // from the page server (pre-copy filled the store), for a second or so. The page server is
    // a process of its own (a fork of the agent): a crash of the agent must not stop the fill,
    // or the service would read zeros where its memory never came.
    let mut s = scenario(&ScenarioConfig {
        proxy: true,
        proxy_max_hold_ms: Some(60_000),
        state_mb: 256,
        hot_first_mib: Some(0),
        ..Default::default()
    });
    // The destination agent pauses once the service runs there, before it tells the source.
    let (c, child, log, from) =
        kill_the_held_agent(&mut s, "ending:30000", 20, Duration::from_secs(90));
    let dst_log = s.agent_log(Host::Dst);
    let agent_said = std::fs::read_to_string(&dst_log).unwrap_or_default();
    let agent_said = agent_said.get(from..).unwrap_or_default();
    assert!(
        agent_said.contains("page server started"),
        "the restore was served from the page store:\n{agent_said}"
    );
    assert!(
        !agent_said.contains("lazy restore done"),
        "the agent was killed while memory was still filling in (else this tests nothing):\n{agent_said}"
    );
    // The source is in doubt; the agent comes back and finds its committed migration in the
    // journal.
    std::thread::sleep(Duration::from_millis(500));
    s.start_agent(Host::Dst).expect("agent restarts");
    let status = wait_exit(child);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "tether migrate: {said}");
    ends_on_dst(&mut s, c, "agent killed during the lazy fill");
}
