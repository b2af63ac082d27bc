//! Podman containers moved by `tether migrate --container` between two Podman hosts (each with
//! its own storage, run root, network configuration and mount namespace): clients through the
//! proxy and direct intact, Podman managing the container where it runs, rollback when the
//! destination's restore fails, refusal before the freeze when a bind mount is missing there.
//! Needs root, CRIU and Podman (`scripts/setup.sh`); fails when they are missing.

mod common;

use std::time::Duration;

use common::{assert_clean, proxied_move, scenario};
use tether::scenario::{ClientRun, Scenario, ScenarioConfig, CONTAINER_NAME};
use tether::testbed::Host;
use tether_migrator::driver::agent::BREAK_RESTORE_VAR;

fn container_scenario(proxy: bool) -> Scenario {
    scenario(&ScenarioConfig {
        container: true,
        proxy,
        state_mb: 64,
        dirty_pages_per_sec: 1000,
        ..Default::default()
    })
}

/// The containers Podman lists on `host`: (name, state).
fn listed(s: &Scenario, host: Host) -> Vec<(String, String)> {
    s.containers(host).expect("podman ps")
}

/// `podman logs` of the service's container on `host`: what it wrote to stdout and stderr
/// (which `podman logs` prints to its own stdout and stderr).
fn logs(s: &Scenario, host: Host) -> String {
    let out = s
        .topo
        .command(host, "podman")
        .args(["logs", CONTAINER_NAME])
        .output()
        .expect("podman logs");
    assert!(out.status.success(), "podman logs on {host}");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Load clients, a request every 2 ms: `tcp` + `quic` connections to `target` for `secs`.
fn clients_to(
    s: &mut Scenario,
    target: std::net::SocketAddr,
    tcp: u32,
    quic: u32,
    secs: u64,
) -> ClientRun {
    s.start_clients_to(
        target,
        tcp,
        quic,
        Duration::from_secs(secs),
        None,
        &["--interval-ms", "2"],
    )
    .expect("clients")
}

#[test]
fn a_podman_container_moves_there_and_back_with_its_clients_and_its_log() {
    let mut s = container_scenario(true);
    let via_proxy = s.proxy_addr();
    for (i, to) in [Host::Dst, Host::Src].into_iter().enumerate() {
        let from = s.location();
        let verified_before = logs(&s, from).matches("state verified").count();
        let proxied = clients_to(&mut s, via_proxy, 8, 2, 4);
        let direct = {
            let t = s.service_addr();
            clients_to(&mut s, t, 4, 1, 4)
        };
        std::thread::sleep(Duration::from_millis(1500));
        let (report, p, d) = proxied_move(&mut s, i, to, &[], proxied, direct);
        println!(
            "move {i} {from} -> {to}: downtime {:.1} ms (restore {:.1} ms), {} pre-copy rounds, \
             final difference {} pages; max stall via proxy: tcp {:.1} quic {:.1} ms; direct: \
             tcp {:.1} quic {:.1} ms",
            report.timings.downtime_ms,
            report.timings.restore_ms,
            report.precopy.rounds.len(),
            report
                .precopy
                .final_difference
                .as_ref()
                .map_or(0, |f| f.pages_sent),
            p.tcp.max_stall_ms,
            p.quic.max_stall_ms,
            d.tcp.max_stall_ms,
            d.quic.max_stall_ms,
        );
        // The agents restore lazily where they can: through Podman too.
        assert!(
            report.criu_restore.as_ref().is_some_and(|c| c.lazy),
            "move {i}: the container's restore was not lazy: {:?}",
            report.criu_restore
        );
        // Podman manages it where it runs now, and only there.
        assert_eq!(
            listed(&s, to),
            vec![(CONTAINER_NAME.to_string(), "running".to_string())],
            "move {i}: podman ps on {to}"
        );
        assert!(
            listed(&s, from).is_empty(),
            "move {i}: the container stays on {from}"
        );
        assert_eq!(
            s.service_copies().len(),
            1,
            "move {i}: copies {:?}",
            s.service_copies()
        );
        // Its log came along and goes on: what it wrote before the move (the verification of
        // proxied_move came after it).
        let log = logs(&s, to);
        assert!(
            log.contains("listening on TCP and UDP/QUIC"),
            "move {i}: the log from before the move is missing on {to}:\n{log}"
        );
        assert!(
            log.matches("state verified").count() > verified_before,
            "move {i}: nothing logged after the move on {to}:\n{log}"
        );
    }
    // `podman stop` manages the moved container as any other.
    s.topo
        .podman(Host::Src, &["stop", "--time", "2", CONTAINER_NAME])
        .expect("podman stop");
    assert_eq!(
        listed(&s, Host::Src)[0].1,
        "exited",
        "podman stop on the container moved back"
    );
}

#[test]
fn a_failed_restore_leaves_the_source_container_running_and_nothing_on_the_destination() {
    let mut s = container_scenario(true);
    s.start_agent_env(Host::Dst, &[(BREAK_RESTORE_VAR, "1")])
        .expect("agent whose restores fail");
    let pid = s.container_pid(Host::Src).expect("ps").expect("runs");
    let proxied = {
        let t = s.proxy_addr();
        clients_to(&mut s, t, 8, 2, 4)
    };
    let direct = {
        let t = s.service_addr();
        clients_to(&mut s, t, 4, 1, 4)
    };
    std::thread::sleep(Duration::from_millis(1000));
    let args = s.proxy_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = s.migrate_with(Host::Dst, None, &args).expect("run migrate");
    assert!(
        !run.success,
        "the migration committed despite the failed restore"
    );
    assert!(
        run.stderr.contains("on the destination") && run.stderr.contains("running on the source"),
        "the failure says where and that the service runs on the source: {}",
        run.stderr
    );
    let (p, d) = (
        proxied.finish().expect("proxied"),
        direct.finish().expect("direct"),
    );
    assert_clean(&p, "via proxy");
    assert_clean(&d, "direct");
    // The same processes, thawed.
    assert_eq!(
        s.container_pid(Host::Src).expect("ps"),
        Some(pid),
        "not the same container"
    );
    assert_eq!(s.service_copies(), vec![(Host::Src, pid, 'S')]);
    s.verify_state().expect("state verifies");
    // Nothing on the destination: no container, no storage of one, no block, no namespace.
    assert!(
        listed(&s, Host::Dst).is_empty(),
        "{:?}",
        listed(&s, Host::Dst)
    );
    let storage = s.topo.work_dir().join("podman-dst/root/overlay-containers");
    let left: Vec<_> = std::fs::read_dir(&storage)
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "container storage left on the destination: {left:?}"
    );
    let tables = s
        .topo
        .run(Host::Dst, &["nft", "list", "tables"])
        .expect("nft");
    assert!(
        !tables.contains("tether"),
        "tables left on the destination: {tables}"
    );
    let netns = s.topo.run(Host::Dst, &["ls", "/run/netns"]).expect("ls");
    assert!(
        netns.trim().is_empty(),
        "network namespaces left on the destination: {netns}"
    );
    // And it still moves once the destination can restore.
    s.start_agent(Host::Dst).expect("agent");
    s.migrate(Host::Dst).expect("the move after the failed one");
    s.verify_state().expect("state verifies");
}

#[test]
fn a_bind_mount_missing_on_the_destination_is_refused_before_the_freeze() {
    // Both Podman hosts share this machine's file system: the source directory is removed
    // after the container mounted it, so that it exists in the container and nowhere else.
    let data = tempfile::tempdir().expect("dir");
    let source = data.path().join("data");
    std::fs::create_dir(&source).expect("mkdir");
    let mut s = scenario(&ScenarioConfig {
        container: true,
        state_mb: 16,
        container_args: vec![
            "--volume".into(),
            format!("{}:/data", source.display()),
            // A named volume Podman makes on the source only.
            "--volume".into(),
            "tether-test-cache:/cache".into(),
        ],
        ..Default::default()
    });
    std::fs::remove_dir(&source).expect("rmdir");
    let pid = s.container_pid(Host::Src).expect("ps").expect("runs");
    let run = s.migrate_with(Host::Dst, None, &[]).expect("run migrate");
    assert!(!run.success, "moved without its bind mount");
    let last = run
        .stderr
        .lines()
        .rev()
        .find(|l| l.contains("failed"))
        .unwrap_or_default();
    assert!(
        last.contains(&source.display().to_string()) && last.contains("Nothing was changed"),
        "the refusal names the mount and says nothing changed: {last}"
    );
    let report = run.report.expect("report");
    assert_eq!(report.timings.downtime_ms, 0.0, "the service was frozen");
    assert_eq!(s.container_pid(Host::Src).expect("ps"), Some(pid));
    assert!(
        listed(&s, Host::Dst).is_empty(),
        "{:?}",
        listed(&s, Host::Dst)
    );
    let tables = s
        .topo
        .run(Host::Dst, &["nft", "list", "tables"])
        .expect("nft");
    assert!(
        !tables.contains("tether"),
        "tables left on the destination: {tables}"
    );
    s.verify_state().expect("state verifies");
}

#[test]
fn a_container_with_worker_processes_moves_whole() {
    let mut s = scenario(&ScenarioConfig {
        container: true,
        state_mb: 32,
        dirty_pages_per_sec: 500,
        workers: 2,
        lazy_pages_from: None,
        ..Default::default()
    });
    let tree = |s: &Scenario, host: Host| -> Vec<u32> {
        let pid = s.container_pid(host).expect("ps").expect("runs");
        let mut t = vec![pid];
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        t.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<u32>().ok()),
        );
        t
    };
    let ns_pids = |pids: &[u32]| -> Vec<String> {
        // The pids inside the container (NSpid's last field) survive the move.
        let mut v: Vec<String> = pids
            .iter()
            .map(|p| {
                std::fs::read_to_string(format!("/proc/{p}/status"))
                    .ok()
                    .and_then(|st| {
                        st.lines()
                            .find_map(|l| l.strip_prefix("NSpid:"))
                            .and_then(|v| v.split_whitespace().last().map(str::to_string))
                    })
                    .unwrap_or_default()
            })
            .collect();
        v.sort();
        v
    };
    let before = tree(&s, Host::Src);
    assert_eq!(
        before.len(),
        3,
        "the service and its two workers: {before:?}"
    );
    let inside = ns_pids(&before);
    let digest = s.verify_state().expect("state verifies (workers included)");
    for to in [Host::Dst, Host::Src] {
        s.migrate(to).expect("move");
        let after = tree(&s, to);
        assert_eq!(after.len(), 3, "the tree on {to}: {after:?}");
        assert_eq!(ns_pids(&after), inside, "the container's pids changed");
        s.verify_state()
            .expect("state verifies after the move (workers included)");
    }
    assert_ne!(digest, 0);
}

const HOLD: &str = "TETHER_TEST_HOLD";

/// `nft list tables` on `host` (every family: the destination's block is `netdev`).
fn tables(s: &Scenario, host: Host) -> String {
    s.topo.run(host, &["nft", "list", "tables"]).expect("nft")
}

/// `tether migrate` to `to` through the proxy, in the background, with `env`; its stderr to a
/// file.
fn spawn_migrate(
    s: &Scenario,
    to: Host,
    env: &[(&str, &str)],
) -> (std::process::Child, std::path::PathBuf) {
    let log = s
        .topo
        .work_dir()
        .join(format!("migrate-{}.log", std::process::id()));
    let mut cmd = s.migrate_command(to, &s.certs(s.location()));
    cmd.args(s.proxy_args())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"));
    (cmd.spawn().expect("spawn tether migrate"), log)
}

fn wait_exit(mut child: std::process::Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("tether migrate did not exit within 180 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The one running (not held) copy of the service, once there is exactly one.
fn one_running_copy(s: &Scenario) -> (Host, u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let running: Vec<_> = s
            .service_copies()
            .into_iter()
            .filter(|c| c.2 != 'T')
            .collect();
        if running.len() == 1 && s.service_copies().len() == 1 {
            return (running[0].0, running[0].1);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected one copy, found {:?}",
            s.service_copies()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 20 s) until the destination lists no container, then asserts that and that no
/// table of tether's is left there.
fn nothing_left_on_dst(s: &Scenario) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !listed(s, Host::Dst).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        listed(s, Host::Dst).is_empty(),
        "{:?}",
        listed(s, Host::Dst)
    );
    assert!(
        !tables(s, Host::Dst).contains("tether"),
        "{}",
        tables(s, Host::Dst)
    );
}

fn held_container_scenario() -> Scenario {
    scenario(&ScenarioConfig {
        container: true,
        proxy: true,
        // A fault after the commit point keeps clients held until it is resolved.
        proxy_max_hold_ms: Some(60_000),
        state_mb: 32,
        dirty_pages_per_sec: 500,
        ..Default::default()
    })
}

/// Restarts the destination agent with a pause at `hold` (`TETHER_TEST_HOLD`), starts clients
/// through the proxy, and moves the container there in the background until the agent pauses.
/// Returns the clients and `tether migrate` with its log.
fn move_with_the_agent_held(
    s: &mut Scenario,
    hold: &str,
) -> (ClientRun, std::process::Child, std::path::PathBuf) {
    s.start_agent_env(Host::Dst, &[(HOLD, hold)])
        .expect("agent with a hold");
    let c = {
        let t = s.proxy_addr();
        clients_to(s, t, 8, 2, 16)
    };
    std::thread::sleep(Duration::from_millis(1500));
    let dst_log = s.agent_log(Host::Dst);
    let (child, log) = spawn_migrate(s, Host::Dst, &[]);
    let said = common::wait_for_log(&dst_log, "test hold: pausing", Duration::from_secs(60));
    assert!(
        said.contains("test hold: pausing"),
        "the agent never paused:\n{said}"
    );
    (c, child, log)
}

#[test]
fn a_container_whose_agent_dies_after_the_restore_commits_once_it_is_back() {
    let mut s = held_container_scenario();
    // The destination agent pauses once it has reported the restore: it never sees the commit.
    let (c, child, log) = move_with_the_agent_held(&mut s, "prepared+:30000");
    s.kill_agent(Host::Dst).expect("kill the agent");
    std::thread::sleep(Duration::from_millis(500));
    // The restarted agent finds the restored, frozen container in its journal, and goes live
    // with it once the source resolves the migration.
    s.start_agent(Host::Dst).expect("agent restarts");
    let status = wait_exit(child);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(status.success(), "tether migrate: {said}");
    assert!(said.contains("in doubt"), "it says what happened: {said}");
    let (host, pid) = one_running_copy(&s);
    assert_eq!(host, Host::Dst);
    s.adopt(Host::Dst, pid);
    assert_eq!(
        listed(&s, Host::Dst),
        vec![(CONTAINER_NAME.to_string(), "running".to_string())]
    );
    assert!(
        listed(&s, Host::Src).is_empty(),
        "{:?}",
        listed(&s, Host::Src)
    );
    for h in [Host::Src, Host::Dst] {
        assert!(
            !tables(&s, h).contains("tether"),
            "tables left on {h}: {}",
            tables(&s, h)
        );
    }
    assert_clean(
        &c.finish().expect("clients"),
        "agent killed after the restore",
    );
    s.verify_state().expect("state verifies on dst");
}

#[test]
fn a_container_move_whose_migrate_dies_before_the_commit_point_rolls_back() {
    let mut s = held_container_scenario();
    let pid = s.container_pid(Host::Src).expect("ps").expect("runs");
    let c = {
        let t = s.proxy_addr();
        clients_to(&mut s, t, 8, 2, 14)
    };
    std::thread::sleep(Duration::from_millis(1500));
    // Held once the destination has reported its (frozen) copy, before the commit point.
    let (mut child, log) = spawn_migrate(&s, Host::Dst, &[(HOLD, "ending:20000")]);
    let said = common::wait_for_log(&log, "test hold: pausing", Duration::from_secs(60));
    assert!(
        said.contains("test hold: pausing"),
        "migrate never paused:\n{said}"
    );
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    // CRIU read the EOF and thawed the source's container; `--recover` resolves the rest.
    let out = s.recover_command(Host::Src).output().expect("--recover");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--recover: {said}");
    assert!(said.contains("still running on the source"), "{said}");
    assert_eq!(
        one_running_copy(&s),
        (Host::Src, pid),
        "the same processes run on"
    );
    nothing_left_on_dst(&s);
    assert!(
        !tables(&s, Host::Src).contains("tether"),
        "{}",
        tables(&s, Host::Src)
    );
    assert_clean(
        &c.finish().expect("clients"),
        "migrate killed before the commit point",
    );
    // Directly, not through the proxy. Once in nine runs of the suite a direct connection right
    // after this rollback timed out (5 s) while the proxy's went through: not understood yet.
    // What the LAN and the client host knew then is printed, and the check retried for a while.
    let t = std::time::Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match s.verify_state() {
            Ok(_) => break,
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                let lan = std::process::Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        s.topo.lan_netns(),
                        "bridge",
                        "fdb",
                        "show",
                        "br",
                        "br0",
                    ])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let neigh = s
                    .topo
                    .run(Host::Client, &["ip", "neigh"])
                    .unwrap_or_default();
                println!("direct verification failed ({e:#}); bridge fdb:\n{lan}client neighbours:\n{neigh}");
            }
            Err(e) => panic!("state intact: {e:#}"),
        }
    }
    println!(
        "direct verification after the rollback: {tries} tries, {:?}",
        t.elapsed()
    );
    s.migrate(Host::Dst).expect("a move after the recovery");
    s.verify_state().expect("state verifies on dst");
}

#[test]
fn a_container_that_dies_on_the_destination_before_it_goes_live_is_restored_on_the_source() {
    let mut s = held_container_scenario();
    // The destination agent pauses once it has reported the restore; meanwhile its copy dies.
    let (c, child, log) = move_with_the_agent_held(&mut s, "prepared+:4000");
    let dst_pid = s
        .container_pid(Host::Dst)
        .expect("ps")
        .expect("restored on dst");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(dst_pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the restored container");
    // It is held frozen until it goes live, so the kill is only pending: the agent must see it.
    let status = wait_exit(child);
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    println!("{said}");
    // The source had ended its copy: it restores the service from its image set, through
    // Podman, into the same container.
    assert!(!status.success(), "tether migrate: {said}");
    assert!(
        said.contains("restored") && said.contains("source"),
        "{said}"
    );
    let (host, pid) = one_running_copy(&s);
    assert_eq!(host, Host::Src);
    s.adopt(Host::Src, pid);
    assert_eq!(
        listed(&s, Host::Src),
        vec![(CONTAINER_NAME.to_string(), "running".to_string())]
    );
    nothing_left_on_dst(&s);
    assert_clean(&c.finish().expect("clients"), "the destination's copy died");
    s.verify_state().expect("state verifies on the source");
}
