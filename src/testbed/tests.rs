//! Tests of the test bed that need root, network namespaces and CRIU. They call
//! [`prerequisites_or_fail`] first, so on a machine that is not set up they fail, not skip.
//! Every topology is dropped (and so removed) also when an assertion fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, SocketAddrV4, TcpListener};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::names::{netns_path, parse_name};
use super::process::{netns_id, proc_state_and_start, run_checked};
use super::*;

fn setup() {
    prerequisites_or_fail();
    become_subreaper().expect("become a child subreaper");
}

fn netns_list() -> Vec<String> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "list"]);
    run_checked(cmd)
        .expect("ip netns list")
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn assert_namespaces_gone(names: &[String]) {
    let list = netns_list();
    for name in names {
        assert!(!list.contains(name), "namespace {name} still listed");
        assert!(!netns_path(name).exists(), "{name} still in /run/netns");
    }
}

/// Waits up to 3 s until `pid` is gone or a zombie.
fn assert_dead(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match proc_state_and_start(pid) {
            None => return,
            Some((state, _)) if state == 'Z' || state == 'X' => return,
            Some(_) if Instant::now() > deadline => panic!("process {pid} still alive"),
            Some(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn all_namespaces(topo: &Topology) -> Vec<String> {
    let mut names: Vec<String> = topo.hosts().map(|h| topo.netns(h).to_owned()).collect();
    names.push(topo.lan_netns().to_owned());
    names
}

/// Accepts one connection on `listener` (in a thread) and echoes what it reads until EOF.
fn echo_once(listener: TcpListener) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut buf = [0u8; 1024];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => conn.write_all(&buf[..n]).expect("echo"),
            }
        }
    })
}

fn echo_roundtrip(topo: &Topology, from: Host, to: Host, to_addr: std::net::Ipv4Addr) {
    let listener = topo
        .listen_in(to, SocketAddrV4::new(to_addr, 0).into())
        .expect("listen");
    let addr = listener.local_addr().expect("local addr");
    let server = echo_once(listener);
    let mut conn = topo
        .connect_in(from, addr, Duration::from_secs(5))
        .expect("connect");
    let msg = format!("hello from {from} to {to}");
    conn.write_all(msg.as_bytes()).expect("write");
    let mut back = vec![0u8; msg.len()];
    conn.read_exact(&mut back).expect("read echo");
    assert_eq!(back, msg.as_bytes());
    drop(conn);
    server.join().expect("echo server");
}

#[test]
fn prerequisites_are_met() {
    setup();
    assert!(require_prerequisites().is_ok());
    assert!(criu_path().is_some_and(Path::exists));
}

#[test]
fn topology_has_hosts_links_and_addresses() {
    setup();
    let rate = 100_000_000;
    let topo = Topology::builder()
        .with_proxy(true)
        .migration_link_rate(rate)
        .build()
        .expect("build topology");
    let names = all_namespaces(&topo);
    assert_eq!(names.len(), 5);
    for name in &names {
        assert!(name.len() <= 15, "{name} too long");
        assert!(name.starts_with(topo.prefix()));
        assert!(parse_name(name).is_some(), "{name} not parsable");
        assert!(netns_path(name).exists());
    }
    let listed = netns_list();
    assert!(names.iter().all(|n| listed.contains(n)));
    assert!(topo.work_dir().is_dir());
    assert_eq!(topo.service_ip(), SERVICE_IP);
    assert_eq!(topo.service_cidr(), "10.77.0.100/24");
    assert_eq!(topo.migration_link_rate(), Some(rate));

    for host in topo.hosts() {
        let addrs = topo
            .run(host, &["ip", "-4", "-o", "addr", "show"])
            .expect("ip addr");
        let lan = format!("{}/24", topo.lan_addr(host));
        assert!(addrs.contains(&lan), "{host}: no {lan} in {addrs}");
        assert!(addrs.contains(topo.lan_ifname(host)), "{host}: {addrs}");
        assert!(
            !addrs.contains("10.77.0.100"),
            "{host} has the service address"
        );
        let lo = topo
            .run(host, &["ip", "-o", "link", "show", "lo"])
            .expect("ip link");
        assert!(lo.contains("LOOPBACK,UP"), "{host}: lo down: {lo}");
        if let Some(mig) = host.migration_addr() {
            assert_eq!(topo.migration_addr(host), mig);
            assert!(addrs.contains(&format!("{mig}/24 ")), "{host}: {addrs}");
            let qdisc = topo
                .run(
                    host,
                    &["tc", "qdisc", "show", "dev", topo.migration_ifname()],
                )
                .expect("tc");
            assert!(
                qdisc.contains("tbf") && qdisc.contains("rate 100Mbit"),
                "{qdisc}"
            );
        }
    }
    let mut cmd = Command::new("ip");
    cmd.args([
        "-n",
        topo.lan_netns(),
        "-o",
        "link",
        "show",
        "master",
        BRIDGE_NAME,
    ]);
    let bridge = run_checked(cmd).expect("bridge ports");
    assert_eq!(bridge.lines().count(), 4, "{bridge}");

    // Across the bridge, both ways, and over the migration link.
    echo_roundtrip(&topo, Host::Client, Host::Src, Host::Src.lan_addr());
    echo_roundtrip(&topo, Host::Proxy, Host::Dst, Host::Dst.lan_addr());
    echo_roundtrip(&topo, Host::Dst, Host::Client, Host::Client.lan_addr());
    echo_roundtrip(
        &topo,
        Host::Src,
        Host::Dst,
        Host::Dst.migration_addr().expect("dst"),
    );

    let work_dir = topo.work_dir().to_path_buf();
    topo.close().expect("clean teardown");
    assert_namespaces_gone(&names);
    assert!(!work_dir.exists());
}

#[test]
fn topology_without_proxy_has_three_hosts() {
    setup();
    let topo = Topology::builder().build().expect("build topology");
    assert_eq!(
        topo.hosts().collect::<Vec<_>>(),
        [Host::Client, Host::Src, Host::Dst]
    );
    assert!(!topo.has_host(Host::Proxy));
    let proxy_ns = format!("{}prx", topo.prefix());
    assert!(!netns_path(&proxy_ns).exists());
    let qdisc = topo
        .run(Host::Src, &["tc", "qdisc", "show", "dev", "mig0"])
        .expect("tc");
    assert!(!qdisc.contains("tbf"), "{qdisc}");
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        topo.netns(Host::Proxy).len()
    }));
    assert!(panicked.is_err());
}

#[test]
fn service_runs_in_host_netns_and_own_pid_namespace() {
    setup();
    let topo = Topology::builder().build().expect("build topology");
    let log = topo.work_dir().join("sleep.log");
    let svc = topo
        .spawn_service(Host::Src, "sleep", ["30"], Some(&log))
        .expect("spawn service");
    let pid = svc.pid();
    assert!(svc.is_running());
    assert_ne!(pid, svc.launcher_pid());
    assert_eq!(svc.log_path(), Some(log.as_path()));

    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_eq!(comm.trim(), "sleep");
    let net = netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).expect("service netns");
    assert_eq!(
        net,
        netns_id(&topo.netns_path(Host::Src)).expect("src netns")
    );
    let pidns = netns_id(Path::new(&format!("/proc/{pid}/ns/pid"))).expect("service pidns");
    assert_ne!(
        pidns,
        netns_id(Path::new("/proc/self/ns/pid")).expect("own pidns")
    );
    let mntns = netns_id(Path::new(&format!("/proc/{pid}/ns/mnt"))).expect("service mntns");
    assert_eq!(
        mntns,
        netns_id(Path::new("/proc/self/ns/mnt")).expect("own mntns"),
        "no mount namespace of its own (CRIU refuses to dump those)"
    );
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid line");
    assert_eq!(nspid.split_whitespace().last(), Some("1"), "{nspid}");
    let ppid_line = status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .expect("PPid line");
    assert_eq!(ppid_line.trim(), svc.launcher_pid().to_string());
    // Only stdin, stdout and stderr are inherited. (Right after exec the program may briefly
    // hold files of its own open, e.g. locale data: retry for a moment.)
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("fds")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        fds.sort();
        if fds == ["0", "1", "2"] {
            break;
        }
        let links: Vec<_> = fds
            .iter()
            .map(|fd| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")))
            .collect();
        assert!(
            Instant::now() < deadline,
            "inherited descriptors: {links:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(log.exists());

    let launcher = svc.launcher_pid();
    drop(svc);
    assert_dead(pid);
    assert_dead(launcher);
}

#[test]
fn service_that_fails_to_start_is_an_error() {
    setup();
    let topo = Topology::builder().build().expect("build topology");
    let log = topo.work_dir().join("missing.log");
    let err = topo
        .spawn_service(Host::Src, "/nonexistent/program", ["x"], Some(&log))
        .expect_err("a missing program cannot start");
    assert!(format!("{err:#}").contains("missing.log"), "{err:#}");
}

#[test]
fn service_guard_tolerates_a_service_killed_elsewhere() {
    setup();
    let topo = Topology::builder().build().expect("build topology");
    let mut svc = topo
        .spawn_service(Host::Dst, "sleep", ["30"], None)
        .expect("spawn service");
    let pid = svc.pid();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill service");
    assert_dead(pid);
    assert!(!svc.is_running());
    svc.kill();
    svc.kill();
    assert_dead(svc.launcher_pid());
}

#[test]
fn host_process_runs_in_host_and_stops_on_drop() {
    setup();
    let topo = Topology::builder().build().expect("build topology");
    let mut agent = topo
        .spawn(Host::Client, "sleep", ["30"], None)
        .expect("spawn");
    let pid = agent.pid();
    assert_eq!(
        netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).expect("agent netns"),
        netns_id(&topo.netns_path(Host::Client)).expect("client netns")
    );
    assert!(agent.try_wait().expect("try_wait").is_none());
    drop(agent);
    assert_dead(pid);
}

#[test]
fn dropping_topology_kills_its_processes_and_removes_everything() {
    setup();
    let topo = Topology::builder()
        .with_proxy(true)
        .build()
        .expect("build topology");
    let names = all_namespaces(&topo);
    let work_dir = topo.work_dir().to_path_buf();
    let svc = topo
        .spawn_service(Host::Src, "sleep", ["30"], None)
        .expect("spawn service");
    let mut raw = topo
        .command(Host::Dst, "sleep")
        .arg("30")
        .spawn()
        .expect("spawn raw child");
    // A process that ignores SIGTERM, with a child of its own.
    let stubborn = topo
        .spawn(
            Host::Proxy,
            "bash",
            ["-c", "trap '' TERM; sleep 30 & wait"],
            None,
        )
        .expect("spawn bash");
    // A listener of ours inside the namespace must not keep anything alive.
    let listener = topo
        .listen_in(Host::Client, "10.77.0.1:0".parse().expect("addr"))
        .expect("listen");
    let pids = [svc.pid(), svc.launcher_pid(), raw.id(), stubborn.pid()];

    drop(topo);
    assert_namespaces_gone(&names);
    assert!(!work_dir.exists());
    for pid in pids {
        assert_dead(pid);
    }
    assert!(!svc.is_running());
    assert!(!matches!(raw.try_wait(), Ok(None)));
    drop(svc);
    drop(stubborn);
    drop(listener);
}

#[test]
fn failed_build_is_rolled_back() {
    setup();
    let err = Topology::builder()
        .with_proxy(true)
        .fail_midway()
        .build()
        .expect_err("injected failure");
    let text = format!("{err:#}");
    assert!(text.contains("injected failure"), "{text}");
    let prefix = text
        .split_whitespace()
        .map(|w| w.trim_end_matches(':'))
        .find(|w| parse_name(&format!("{w}lan")).is_some())
        .map(str::to_owned)
        .expect("prefix in error message");
    let leftovers: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    assert!(!super::names::work_dir_for(&prefix).exists());
    assert!(Topology::builder().migration_link_rate(0).build().is_err());
}

#[test]
fn parallel_topologies_are_isolated_from_each_other() {
    setup();
    let topos: Vec<Topology> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| s.spawn(|| Topology::builder().build().expect("build topology")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("builder thread"))
            .collect()
    });
    let mut prefixes: Vec<&str> = topos.iter().map(Topology::prefix).collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    assert_eq!(prefixes.len(), 3);

    // Same addresses everywhere, but a listener in one topology is invisible in another.
    let listener = topos[0]
        .listen_in(Host::Src, "10.77.0.2:0".parse().expect("addr"))
        .expect("listen");
    let addr = listener.local_addr().expect("addr");
    let server = echo_once(listener);
    let refused = topos[1].connect_in(Host::Client, addr, Duration::from_secs(2));
    assert!(refused.is_err(), "connected across topologies");
    let mut ok = topos[0]
        .connect_in(Host::Client, addr, Duration::from_secs(2))
        .expect("connect within topology");
    ok.write_all(b"x").expect("write");
    drop(ok);
    server.join().expect("echo server");
    for topo in &topos[1..] {
        echo_roundtrip(topo, Host::Client, Host::Src, Host::Src.lan_addr());
    }
}

#[test]
fn wait_for_tcp_times_out_then_succeeds() {
    setup();
    let topo = Topology::builder().build().expect("build topology");
    let addr: SocketAddr = "10.77.0.3:7070".parse().expect("addr");
    let start = Instant::now();
    let err = topo
        .wait_for_tcp(Host::Client, addr, Duration::from_millis(300))
        .expect_err("nothing listens");
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(format!("{err:#}").contains("10.77.0.3:7070"));

    std::thread::scope(|s| {
        let late = s.spawn(|| {
            std::thread::sleep(Duration::from_millis(200));
            let listener = topo.listen_in(Host::Dst, addr).expect("listen");
            listener.accept().expect("accept");
        });
        topo.wait_for_tcp(Host::Client, addr, Duration::from_secs(5))
            .expect("listener appears");
        late.join().expect("listener thread");
    });
}

/// A namespace named like a topology of a dead process is removed, with its processes.
#[test]
fn stale_topologies_of_dead_processes_are_removed() {
    setup();
    // A pid that just died (reuse within this test is very unlikely).
    let mut child = Command::new("true").spawn().expect("spawn true");
    let dead_pid = child.id();
    child.wait().expect("wait");
    let name = format!("tt{dead_pid}x0src");

    struct Cleanup(String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.0])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let mut add = Command::new("ip");
    add.args(["netns", "add", &name]);
    run_checked(add).expect("ip netns add");
    let _cleanup = Cleanup(name.clone());
    let mut sleeper = Command::new("nsenter");
    sleeper
        .arg(format!("--net={}", netns_path(&name).display()))
        .args(["--", "sleep", "30"]);
    let sleeper = HostProcess::spawn(&mut sleeper).expect("spawn sleeper");
    let pid = sleeper.pid();
    // Wait until the sleeper is inside the namespace.
    let target = netns_id(&netns_path(&name)).expect("netns id");
    let deadline = Instant::now() + Duration::from_secs(3);
    while netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok() != Some(target) {
        assert!(Instant::now() < deadline, "sleeper never entered {name}");
        std::thread::sleep(Duration::from_millis(5));
    }

    assert!(remove_stale_topologies() >= 1);
    assert_namespaces_gone(std::slice::from_ref(&name));
    assert_dead(pid);
    drop(sleeper);
}
