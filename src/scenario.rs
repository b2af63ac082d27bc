//! A migration scenario on the test bed, shared by the integration tests, the demo and the
//! benchmarks: a [`Topology`], certificates, a `tether agent` on `src` and on `dst`, the example
//! service on `src`, load clients on `client`, and `tether migrate` between the hosts.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::testbed::{
    become_subreaper, Host, HostProcess, ServiceProcess, Topology, PODMAN_NETWORK, SERVICE_IMAGE,
};
use tether_migrator::report::Report;

/// Port of the example service (TCP and UDP).
pub const SERVICE_PORT: u16 = 7000;
/// Port of the agents (UDP, QUIC).
pub const AGENT_PORT: u16 = 7700;
/// Port of each agent's metrics, on the loopback of its host's network namespace.
pub const AGENT_METRICS_PORT: u16 = 9110;

/// The programs a scenario runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `tether` CLI.
    pub tether: PathBuf,
    /// `examples/service`.
    pub service: PathBuf,
    /// `examples/client`.
    pub client: PathBuf,
}

impl Binaries {
    /// The binaries of the build an example (demo, benchmark) belongs to:
    /// `target/<profile>/examples/NAME` -> `target/<profile>/tether`.
    pub fn for_this_example() -> anyhow::Result<Binaries> {
        let exe = std::env::current_exe()?;
        let tether = exe
            .parent()
            .and_then(|d| d.parent())
            .map(|d| d.join("tether"))
            .context("cannot find the tether binary beside this example")?;
        Binaries::beside(&tether)
    }

    /// The examples built beside a `tether` binary (`target/<profile>/examples/`).
    pub fn beside(tether: &Path) -> anyhow::Result<Binaries> {
        let dir = tether
            .parent()
            .context("tether binary has no parent directory")?;
        let b = Binaries {
            tether: tether.to_path_buf(),
            service: dir.join("examples/service"),
            client: dir.join("examples/client"),
        };
        for p in [&b.tether, &b.service, &b.client] {
            if !p.is_file() {
                bail!(
                    "{} is missing: build it first (`cargo build --examples`)",
                    p.display()
                );
            }
        }
        Ok(b)
    }
}

/// How to set a scenario up.
#[derive(Debug, Clone)]
pub struct ScenarioConfig {
    /// tbf rate of the src-dst link, bits/s.
    pub link_rate: Option<u64>,
    /// Memory state of the service, MiB.
    pub state_mb: u32,
    /// Pages the service rewrites per second.
    pub dirty_pages_per_sec: u32,
    /// Run a `tether proxy` on a `proxy` host in front of the service.
    pub proxy: bool,
    /// Hosts whose agent restores fully (`--lazy-restore never`); the others restore lazily
    /// where they can (`auto`). `[Src]` makes a round trip run both restore paths.
    pub full_restore_on: Vec<Host>,
    /// The proxy's maximum hold, ms (its default, 5000, if `None`).
    pub proxy_max_hold_ms: Option<u64>,
    /// The agents' `--hot-first-mib` (their default if `None`).
    pub hot_first_mib: Option<u64>,
    /// Run `examples/interpreted_service.py` (CPython, TCP only: start no QUIC clients) instead
    /// of the example service.
    pub interpreted: bool,
    /// Run the example service as a Podman container ([`CONTAINER_NAME`], image
    /// [`SERVICE_IMAGE`], on the macvlan network of `src` and `dst` made Podman hosts) and move
    /// it with `tether migrate --container`.
    pub container: bool,
    /// More `podman run` options for the service's container (e.g. a `--volume`).
    pub container_args: Vec<String>,
    /// Worker processes of the example service (`--workers`), each with 8 MiB of state.
    pub workers: u32,
    /// The agents' `--lazy-pages-from` (`store` or `files`; their default if `None`).
    pub lazy_pages_from: Option<&'static str>,
}

impl Default for ScenarioConfig {
    fn default() -> Self {
        ScenarioConfig {
            link_rate: None,
            state_mb: 16,
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
        }
    }
}

/// The interpreted service (`ScenarioConfig::interpreted`), run with `python3`.
pub const INTERPRETED_SERVICE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/interpreted_service.py"
);

/// The name of the example service's container (`ScenarioConfig::container`).
pub const CONTAINER_NAME: &str = "tether-svc";
/// The static MAC address of the example service's container: it moves with the container.
pub const CONTAINER_MAC: &str = "02:77:00:00:00:64";

/// The proxy's name for the example service.
pub const PROXY_SERVICE: &str = "example";

/// A running scenario. Dropping it stops everything and removes the topology.
#[derive(Debug)]
pub struct Scenario {
    // Field order is drop order: processes before the topology that holds their namespaces.
    proxy: Option<HostProcess>,
    agents: Vec<(Host, HostProcess)>,
    service: Option<ServiceProcess>,
    /// The topology.
    pub topo: Topology,
    bins: Binaries,
    certs: PathBuf,
    location: Host,
    pid: u32,
    migrations: u32,
    client_runs: u32,
    /// Hosts whose agent restores fully (`--lazy-restore never`).
    full_restore: Vec<Host>,
    /// The agents' `--hot-first-mib`, if set.
    hot_first_mib: Option<u64>,
    lazy_pages_from: Option<&'static str>,
    /// The service is the container [`CONTAINER_NAME`].
    container: bool,
}

/// A process's resident memory and CPU time (from `/proc`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessUsage {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// User and system CPU time, seconds.
    pub cpu_s: f64,
}

impl ProcessUsage {
    /// The figures of process `pid`, if it exists.
    pub fn of(pid: u32) -> Option<ProcessUsage> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
        let host = i32::try_from(pid).ok()?;
        let cpu_s = tether_migrator::throttle::cpu_seconds(&[tether_migrator::procmem::ProcId {
            host,
            ns: host,
        }]);
        Some(ProcessUsage { rss_kib, cpu_s })
    }
}

/// What `tether migrate` did.
#[derive(Debug)]
pub struct MigrateRun {
    /// Whether it exited 0.
    pub success: bool,
    /// Its stderr.
    pub stderr: String,
    /// Its report, if it wrote one.
    pub report: Option<Report>,
    /// Wall time of the command.
    pub elapsed: Duration,
}

impl Scenario {
    /// Builds the topology, certificates and agents, and starts the service on `src`.
    pub fn start(bins: Binaries, cfg: &ScenarioConfig) -> anyhow::Result<Scenario> {
        become_subreaper()?;
        let mut b = Topology::builder().with_proxy(cfg.proxy);
        if let Some(rate) = cfg.link_rate {
            b = b.migration_link_rate(rate);
        }
        let topo = b.build()?;
        let certs = topo.work_dir().join("certs");
        tether_migrator::tls::generate(&certs, &["src".into(), "dst".into()])?;
        let mut s = Scenario {
            proxy: None,
            agents: Vec::new(),
            service: None,
            topo,
            bins,
            certs,
            location: Host::Src,
            pid: 0,
            migrations: 0,
            client_runs: 0,
            full_restore: cfg.full_restore_on.clone(),
            hot_first_mib: cfg.hot_first_mib,
            lazy_pages_from: cfg.lazy_pages_from,
            container: cfg.container,
        };
        if cfg.container {
            if cfg.interpreted {
                bail!("the interpreted service does not run as a container here");
            }
            s.topo.enable_podman()?;
            s.topo.import_binary_image(&s.bins.service, SERVICE_IMAGE)?;
        } else {
            s.topo.run(
                Host::Src,
                &["ip", "addr", "add", s.topo.service_cidr(), "dev", "eth0"],
            )?;
        }
        for host in [Host::Src, Host::Dst] {
            s.start_agent(host)?;
        }
        let log = s.topo.work_dir().join("service.log");
        let listen = s.service_addr().to_string();
        let mut args = vec![
            "--listen".to_string(),
            listen,
            "--state-mb".to_string(),
            cfg.state_mb.to_string(),
            "--dirty-pages-per-sec".to_string(),
            cfg.dirty_pages_per_sec.to_string(),
        ];
        if cfg.workers > 0 {
            args.extend(["--workers".to_string(), cfg.workers.to_string()]);
        }
        let program = if cfg.interpreted {
            let found = std::process::Command::new("python3")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !found {
                anyhow::bail!(
                    "the interpreted service needs python3, which is missing here (scripts/setup.sh \
                     installs it)"
                );
            }
            args.insert(0, INTERPRETED_SERVICE.to_string());
            PathBuf::from("python3")
        } else {
            s.bins.service.clone()
        };
        if cfg.container {
            s.pid = s.run_container(&cfg.container_args, &args)?;
        } else {
            let svc = s
                .topo
                .spawn_service(Host::Src, &program, &args, Some(&log))?;
            s.pid = svc.pid();
            s.service = Some(svc);
        }
        s.topo
            .wait_for_tcp(Host::Client, s.service_addr(), Duration::from_secs(60))
            .context("the example service did not come up")?;
        if cfg.proxy {
            let log = s.topo.work_dir().join("proxy.log");
            let front = s.proxy_addr().to_string();
            let hold = cfg.proxy_max_hold_ms.unwrap_or(5000).to_string();
            let proc = s.topo.spawn(
                Host::Proxy,
                &s.bins.tether,
                [
                    "proxy",
                    "--max-hold-ms",
                    &hold,
                    "--name",
                    PROXY_SERVICE,
                    "--tcp-listen",
                    &front,
                    "--udp-listen",
                    &front,
                    "--backend",
                    &s.service_addr().to_string(),
                    "--control",
                    &s.proxy_socket().display().to_string(),
                ],
                Some(&log),
            )?;
            s.proxy = Some(proc);
            s.topo
                .wait_for_tcp(Host::Client, s.proxy_addr(), Duration::from_secs(20))
                .context("the proxy did not come up")?;
        }
        Ok(s)
    }

    /// Starts the example service's container on `src` with `args` and returns its init's pid.
    fn run_container(&self, options: &[String], args: &[String]) -> anyhow::Result<u32> {
        let ip = self.topo.service_ip().to_string();
        let mut argv = vec![
            "run",
            "--detach",
            "--name",
            CONTAINER_NAME,
            "--network",
            PODMAN_NETWORK,
            "--ip",
            &ip,
            "--mac-address",
            CONTAINER_MAC,
            // No CAP_SYS_RESOURCE here: CRIU must not need to raise these on restore.
            "--ulimit",
            "nofile=4096:4096",
            "--ulimit",
            "nproc=4096:4096",
        ];
        argv.extend(options.iter().map(String::as_str));
        argv.extend([SERVICE_IMAGE, "/service"]);
        argv.extend(args.iter().map(String::as_str));
        self.topo.podman(Host::Src, &argv)?;
        self.container_pid(Host::Src)?
            .context("the service's container does not run after podman run")
    }

    /// The host pid of the service container's init on `host`, if it runs there.
    pub fn container_pid(&self, host: Host) -> anyhow::Result<Option<u32>> {
        let out = self.topo.podman(
            host,
            &[
                "ps",
                "--filter",
                &format!("name=^{CONTAINER_NAME}$"),
                "--format",
                "{{.Pid}}",
            ],
        )?;
        Ok(out
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .filter(|p| *p > 0))
    }

    /// What `podman ps --all` lists on `host`: (name, state) of each container, the state as
    /// Podman's JSON gives it (`running`, `exited`, ...).
    pub fn containers(&self, host: Host) -> anyhow::Result<Vec<(String, String)>> {
        let out = self
            .topo
            .podman(host, &["ps", "--all", "--format", "json"])?;
        let list: Vec<serde_json::Value> =
            serde_json::from_str(&out).context("podman ps --format json")?;
        Ok(list
            .iter()
            .map(|c| {
                let name = c["Names"][0].as_str().unwrap_or_default().to_string();
                (name, c["State"].as_str().unwrap_or_default().to_string())
            })
            .collect())
    }

    /// The proxy's front address for the service (clients connect here).
    pub fn proxy_addr(&self) -> SocketAddr {
        SocketAddr::from((self.topo.lan_addr(Host::Proxy), SERVICE_PORT))
    }

    /// The proxy's control socket.
    pub fn proxy_socket(&self) -> PathBuf {
        self.topo.work_dir().join("proxy.sock")
    }

    /// `tether migrate` arguments that drive the scenario's proxy.
    pub fn proxy_args(&self) -> Vec<String> {
        vec![
            "--proxy".into(),
            self.proxy_socket().display().to_string(),
            "--service".into(),
            PROXY_SERVICE.into(),
        ]
    }

    /// The service's address and port.
    pub fn service_addr(&self) -> SocketAddr {
        SocketAddr::from((self.topo.service_ip(), SERVICE_PORT))
    }

    /// Where the service runs now.
    pub fn location(&self) -> Host {
        self.location
    }

    /// The service's current host pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The certificate directory of a host.
    pub fn certs(&self, host: Host) -> PathBuf {
        self.certs.join(host.name())
    }

    /// The certificate root (CA and all hosts).
    pub fn certs_root(&self) -> &Path {
        &self.certs
    }

    /// The agent's migration address on a host.
    pub fn agent_addr(&self, host: Host) -> SocketAddr {
        SocketAddr::from((self.topo.migration_addr(host), AGENT_PORT))
    }

    /// The agent's log file on a host.
    pub fn agent_log(&self, host: Host) -> PathBuf {
        self.topo
            .work_dir()
            .join(format!("agent-{}.log", host.name()))
    }

    /// The `tether` binary.
    pub fn tether(&self) -> &Path {
        &self.bins.tether
    }

    /// Starts (or restarts) the agent on `host` and waits until it listens.
    pub fn start_agent(&mut self, host: Host) -> anyhow::Result<()> {
        self.start_agent_env(host, &[])
    }

    /// Like [`start_agent`](Self::start_agent), with environment variables (e.g. a
    /// `TETHER_TEST_HOLD`).
    pub fn start_agent_env(&mut self, host: Host, env: &[(&str, &str)]) -> anyhow::Result<()> {
        self.agents.retain(|(h, _)| *h != host);
        let log = self.agent_log(host);
        let before = std::fs::read_to_string(&log).map(|s| s.len()).unwrap_or(0);
        let work = self.shm_dir(&format!("agent-{}", host.name()));
        let work = work.display().to_string();
        let state = self.topo.work_dir().join(format!("state-{}", host.name()));
        let listen = self.agent_addr(host).to_string();
        let certs = self.certs(host).display().to_string();
        let state = state.display().to_string();
        let metrics = format!("127.0.0.1:{AGENT_METRICS_PORT}");
        let allowed = service_block(self.topo.service_cidr());
        let lazy = if self.full_restore.contains(&host) {
            "never"
        } else {
            "auto"
        };
        let hot_first = self.hot_first_mib.map(|m| m.to_string());
        let mut args = vec![
            "agent",
            "--lazy-restore",
            lazy,
            "--listen",
            &listen,
            "--certs",
            &certs,
            "--work-dir",
            &work,
            "--state-dir",
            &state,
            "--metrics",
            &metrics,
            // Both test hosts move the service, each way.
            "--allow-source",
            Host::Src.name(),
            "--allow-source",
            Host::Dst.name(),
            "--allow-service",
            &allowed,
        ];
        if let Some(m) = &hot_first {
            args.extend(["--hot-first-mib", m.as_str()]);
        }
        if let Some(from) = self.lazy_pages_from {
            args.extend(["--lazy-pages-from", from]);
        }
        let proc = self
            .topo
            .spawn_env(host, &self.bins.tether, args, env, Some(&log))?;
        self.agents.push((host, proc));
        wait_for_log(&log, before, "agent ready", Duration::from_secs(20))
            .with_context(|| format!("agent on {host} did not start"))
    }

    /// The Prometheus text the agent on `host` serves now.
    pub fn agent_metrics(&self, host: Host) -> anyhow::Result<String> {
        use std::io::{Read, Write};
        let addr = SocketAddr::from(([127, 0, 0, 1], AGENT_METRICS_PORT));
        let mut conn = self.topo.connect_in(host, addr, Duration::from_secs(2))?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")?;
        let mut reply = String::new();
        conn.read_to_string(&mut reply)?;
        let (head, body) = reply
            .split_once("\r\n\r\n")
            .context("metrics reply without a header end")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("metrics of the agent on {host}: {head}");
        }
        Ok(body.to_string())
    }

    /// A sample's value in the agent's metrics on `host` (`name` with its labels, as printed).
    pub fn agent_metric(&self, host: Host, sample: &str) -> anyhow::Result<f64> {
        let text = self.agent_metrics(host)?;
        text.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
            .with_context(|| format!("no sample {sample} in the metrics of {host}:\n{text}"))
    }

    /// Kills the agent on `host` with SIGKILL (a crash).
    pub fn kill_agent(&mut self, host: Host) -> anyhow::Result<()> {
        let Some(i) = self.agents.iter().position(|(h, _)| *h == host) else {
            bail!("no agent on {host}");
        };
        let (_, mut proc) = self.agents.remove(i);
        let _ = proc.child_mut().kill();
        let _ = proc.child_mut().wait();
        Ok(())
    }

    /// Starts a load client on `client` talking to the service directly: `tcp` TCP connections
    /// and `quic` QUIC connections for `duration`. Its JSON report is collected by
    /// [`ClientRun::finish`].
    pub fn start_clients(
        &mut self,
        tcp: u32,
        quic: u32,
        duration: Duration,
        verify_every: Option<u32>,
    ) -> anyhow::Result<ClientRun> {
        let target = self.service_addr();
        self.start_clients_to(target, tcp, quic, duration, verify_every, &[])
    }

    /// Like [`start_clients`](Self::start_clients), to another address (e.g. the proxy's).
    pub fn start_clients_to(
        &mut self,
        target: SocketAddr,
        tcp: u32,
        quic: u32,
        duration: Duration,
        verify_every: Option<u32>,
        extra: &[&str],
    ) -> anyhow::Result<ClientRun> {
        let n = self.client_runs;
        self.client_runs += 1;
        let json = self.topo.work_dir().join(format!("client-{n}.json"));
        let log = self.topo.work_dir().join(format!("client-{n}.log"));
        let mut args = vec![
            "--target".to_string(),
            target.to_string(),
            "--tcp".into(),
            tcp.to_string(),
            "--quic".into(),
            quic.to_string(),
            "--duration".into(),
            format!("{:.3}", duration.as_secs_f64()),
            "--json".into(),
            json.display().to_string(),
        ];
        if let Some(s) = verify_every {
            args.extend(["--verify-every-secs".into(), s.to_string()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let proc = self
            .topo
            .spawn(Host::Client, &self.bins.client, &args, Some(&log))?;
        Ok(ClientRun {
            proc: Some(proc),
            json,
            log,
            deadline: Instant::now() + duration + Duration::from_secs(40),
        })
    }

    /// Asks the service to verify its memory state (one-shot client). Returns the digest.
    pub fn verify_state(&self) -> anyhow::Result<u64> {
        let out = self
            .topo
            .command(Host::Client, &self.bins.client)
            .args([
                "--target",
                &self.service_addr().to_string(),
                "--verify-state",
            ])
            .output()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "verify-state printed no JSON: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        if v["ok"] != serde_json::Value::Bool(true) || !out.status.success() {
            bail!("service state verification failed: {v}");
        }
        v["digest"].as_u64().context("no digest")
    }

    /// The `tether migrate` command that moves the service from its current host to `to` with the
    /// certificates in `certs`, for callers that run it themselves (in the background, to
    /// interrupt it); [`migrate_with`](Self::migrate_with) runs it and reads the report.
    pub fn migrate_command(&self, to: Host, certs: &Path) -> std::process::Command {
        let mut cmd = self.topo.command(self.location, &self.bins.tether);
        cmd.arg("migrate");
        if self.container {
            cmd.args(["--container", CONTAINER_NAME]);
        } else {
            cmd.args(["--pid", &self.pid.to_string()]);
        }
        cmd.args([
            "--to",
            &self.agent_addr(to).to_string(),
            "--certs",
            &certs.display().to_string(),
            "--agent-name",
            to.name(),
            "--service-addr",
            self.topo.service_cidr(),
            "--state-dir",
            &self.migrate_state_dir(self.location).display().to_string(),
            "--work-dir",
            &self.shm_dir("migrate").display().to_string(),
        ]);
        cmd
    }

    /// A directory on tmpfs (`/dev/shm`) of this scenario, for image sets: `what` names its use.
    /// [`Drop`] removes every one, whatever the test left in them.
    fn shm_dir(&self, what: &str) -> PathBuf {
        PathBuf::from(format!("/dev/shm/{}-{what}", self.topo.prefix()))
    }

    /// The journal directory of `tether migrate` on `host`.
    pub fn migrate_state_dir(&self, host: Host) -> PathBuf {
        self.topo
            .work_dir()
            .join(format!("migrate-state-{}", host.name()))
    }

    /// `tether migrate --recover` on `host`, as an operator runs it after a failure.
    pub fn recover_command(&self, host: Host) -> std::process::Command {
        let mut cmd = self.topo.command(host, &self.bins.tether);
        cmd.args([
            "migrate",
            "--recover",
            "--state-dir",
            &self.migrate_state_dir(host).display().to_string(),
        ]);
        cmd
    }

    /// Runs `tether migrate` from the service's current host to `to`, with another certificate
    /// directory if given, and extra arguments.
    pub fn migrate_with(
        &mut self,
        to: Host,
        certs: Option<&Path>,
        extra: &[&str],
    ) -> anyhow::Result<MigrateRun> {
        let from = self.location;
        let report = self
            .topo
            .work_dir()
            .join(format!("report-{}.json", self.migrations));
        self.migrations += 1;
        let certs = certs
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.certs(from));
        let mut cmd = self.migrate_command(to, &certs);
        cmd.args(["--report", &report.display().to_string()]);
        cmd.args(extra);
        let t0 = Instant::now();
        let out: Output = cmd.output().context("cannot run tether migrate")?;
        let elapsed = t0.elapsed();
        let report: Option<Report> = std::fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let run = MigrateRun {
            success: out.status.success(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            report,
            elapsed,
        };
        if run.success {
            let pid = run
                .report
                .as_ref()
                .and_then(|r| r.destination_pid)
                .context("a committed migration without a destination pid")?;
            self.location = to;
            self.pid = u32::try_from(pid).context("bad destination pid")?;
        }
        Ok(run)
    }

    /// Migrates to `to` and fails unless the migration committed.
    pub fn migrate(&mut self, to: Host) -> anyhow::Result<Report> {
        let run = self.migrate_with(to, None, &[])?;
        if !run.success {
            bail!("migration to {to} failed:\n{}", run.stderr);
        }
        run.report.context("no report")
    }

    /// Takes note that the service now runs on `host` as `pid` (after a migration that a test
    /// finished another way than [`migrate_with`](Self::migrate_with), e.g. `--recover`).
    pub fn adopt(&mut self, host: Host, pid: u32) {
        self.location = host;
        self.pid = pid;
    }

    /// Finds where the service runs after a migration that did not commit (rolled back, restored
    /// on the source from its image set: a new pid) and adopts it: the one copy of the service
    /// that is not stopped. Errors if there is none, or more than one.
    pub fn relocate(&mut self) -> anyhow::Result<(Host, u32)> {
        let running: Vec<(Host, u32)> = self
            .service_copies()
            .into_iter()
            .filter(|(_, _, state)| *state != 'T' && *state != 't')
            .map(|(h, p, _)| (h, p))
            .collect();
        match running.as_slice() {
            [(host, pid)] => {
                self.adopt(*host, *pid);
                Ok((*host, *pid))
            }
            [] => bail!("no running copy of the service"),
            more => bail!("{} running copies of the service: {more:?}", more.len()),
        }
    }

    /// The proxy's resident memory and CPU time so far, if it runs.
    pub fn proxy_usage(&self) -> Option<ProcessUsage> {
        ProcessUsage::of(self.proxy.as_ref()?.pid())
    }

    /// Whether the service's current process is alive.
    pub fn service_alive(&self) -> bool {
        Path::new(&format!("/proc/{}", self.pid)).exists()
    }

    /// Every copy of the service on the scenario's hosts (processes running the service's
    /// binary in the network namespace of `src` or `dst`, any state): (host, pid, state letter
    /// from /proc/PID/stat, e.g. `S` running or sleeping, `T` stopped).
    pub fn service_copies(&self) -> Vec<(Host, u32, char)> {
        if self.container {
            return self.container_copies();
        }
        let ns = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        let hosts: Vec<(Host, u64)> = [Host::Src, Host::Dst]
            .into_iter()
            .filter_map(|h| Some((h, ns(&self.topo.netns_path(h)).ok()?)))
            .collect();
        let exe = std::fs::canonicalize(&self.bins.service).unwrap_or(self.bins.service.clone());
        let mut v = Vec::new();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return v;
        };
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if std::fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .as_deref()
                != Some(&exe)
            {
                continue;
            }
            let Ok(n) = ns(Path::new(&format!("/proc/{pid}/ns/net"))) else {
                continue;
            };
            let Some((host, _)) = hosts.iter().find(|(_, i)| *i == n) else {
                continue;
            };
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()))
                .unwrap_or('?');
            if state != 'Z' {
                v.push((*host, pid, state));
            }
        }
        v
    }

    /// [`service_copies`](Self::service_copies) of a container: its init on each host where
    /// Podman runs it, `T` while its freezer holds it.
    fn container_copies(&self) -> Vec<(Host, u32, char)> {
        let mut v = Vec::new();
        for host in [Host::Src, Host::Dst] {
            let Ok(Some(pid)) = self.container_pid(host) else {
                continue;
            };
            let frozen = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                .ok()
                .and_then(|c| {
                    let dir = tether_migrator::container::scope::freezer(&c)?;
                    std::fs::read_to_string(dir.join("freezer.state")).ok()
                })
                .is_some_and(|s| s.trim() == "FROZEN");
            v.push((host, pid, if frozen { 'T' } else { 'S' }));
        }
        v
    }

    /// Drops (or lets through again) every packet between `src` and `dst` on their migration
    /// link, in `src`'s namespace: a link that is cut while both hosts run.
    pub fn blackhole_migration_link(&self, on: bool) -> anyhow::Result<()> {
        let peer = self.topo.migration_addr(Host::Dst);
        let rules = if on {
            format!(
                "table inet tether-test-blackhole {{\n  chain out {{\n    type filter hook output priority -400; policy accept;\n    ip daddr {peer} drop\n  }}\n  chain in {{\n    type filter hook input priority -400; policy accept;\n    ip saddr {peer} drop\n  }}\n}}\n"
            )
        } else {
            "add table inet tether-test-blackhole\ndelete table inet tether-test-blackhole\n".into()
        };
        let path = self.topo.work_dir().join("blackhole.nft");
        std::fs::write(&path, rules)?;
        self.topo
            .run(Host::Src, &["nft", "-f", &path.display().to_string()])
            .map(drop)
    }

    /// IPv4 addresses on a host's `eth0`.
    pub fn addresses(&self, host: Host) -> anyhow::Result<Vec<Ipv4Addr>> {
        let out = self
            .topo
            .run(host, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .collect())
    }

    /// The `inet` nftables tables of a host.
    pub fn nft_tables(&self, host: Host) -> anyhow::Result<Vec<String>> {
        let out = self.topo.run(host, &["nft", "list", "tables", "inet"])?;
        Ok(out
            .lines()
            .filter_map(|l| l.strip_prefix("table inet "))
            .map(str::to_string)
            .collect())
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        // Every host's, not only the agents still running: a test may have killed one.
        let dirs = Host::ALL
            .iter()
            .map(|h| format!("agent-{}", h.name()))
            .chain(["migrate".to_string()]);
        for what in dirs {
            let _ = std::fs::remove_dir_all(self.shm_dir(&what));
        }
    }
}

/// A running load client.
#[derive(Debug)]
pub struct ClientRun {
    proc: Option<HostProcess>,
    json: PathBuf,
    log: PathBuf,
    deadline: Instant,
}

impl ClientRun {
    /// Ends the run now (SIGTERM: the client stops its connections, waits for replies in flight
    /// and writes its report) and returns the report.
    pub fn stop(mut self) -> anyhow::Result<ClientReport> {
        if let Some(p) = &self.proc {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(p.pid()).context("client pid")?);
            // Ours, by pid, and still running (finish has not reaped it).
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            self.deadline = self.deadline.min(Instant::now() + Duration::from_secs(40));
        }
        self.finish()
    }

    /// Waits for the client to finish its run and returns its report.
    pub fn finish(mut self) -> anyhow::Result<ClientReport> {
        let mut proc = self.proc.take().context("client already finished")?;
        loop {
            if proc.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > self.deadline {
                proc.stop();
                bail!("the load client did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let text = std::fs::read_to_string(&self.json).with_context(|| {
            format!(
                "the load client wrote no report; its log: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("bad client report: {text}"))
    }
}

/// Per-protocol figures of a load client's report.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ProtoReport {
    /// Connections opened.
    pub connections: u64,
    /// Connections that saw no error.
    pub ok_connections: u64,
    /// Requests answered and verified.
    pub requests: u64,
    /// Payload bytes verified.
    pub bytes_verified: u64,
    /// Connections that failed.
    pub errors: u64,
    /// Resets seen.
    pub resets: u64,
    /// Longest time without a reply on any connection, ms.
    pub max_stall_ms: f64,
    /// Median over the connections of each one's longest time without a reply, ms.
    #[serde(default)]
    pub stall_p50_ms: f64,
    /// 99th percentile of the same, ms.
    #[serde(default)]
    pub stall_p99_ms: f64,
    /// Longest wait for one reply (request to verified reply) on any connection, ms: a stall
    /// without the pause between requests.
    #[serde(default)]
    pub max_wait_ms: f64,
    /// Median over the connections of each one's longest wait for a reply, ms.
    #[serde(default)]
    pub wait_p50_ms: f64,
    /// 99th percentile of the same, ms.
    #[serde(default)]
    pub wait_p99_ms: f64,
    /// Request latency before each connection's longest wait (the steady state): median, ms.
    #[serde(default)]
    pub steady_p50_ms: f64,
    /// Its 99th percentile, ms.
    #[serde(default)]
    pub steady_p99_ms: f64,
    /// Request latency within 1 s after each connection's longest wait (a move's resume, the
    /// lazy fill): median, ms.
    #[serde(default)]
    pub after_stall_p50_ms: f64,
    /// Its 99th percentile, ms.
    #[serde(default)]
    pub after_stall_p99_ms: f64,
}

/// Periodic state verification results.
#[derive(Debug, Clone, Deserialize)]
pub struct VerifyReport {
    /// Verifications that passed.
    pub ok: u64,
    /// Verifications that failed.
    pub failed: u64,
}

/// A load client's JSON report.
#[derive(Debug, Clone, Deserialize)]
pub struct ClientReport {
    /// TCP figures.
    pub tcp: ProtoReport,
    /// QUIC figures.
    pub quic: ProtoReport,
    /// Idle TCP connections (`--idle`).
    #[serde(default)]
    pub idle: ProtoReport,
    /// Periodic state verifications.
    pub state_verifications: VerifyReport,
    /// The first errors, described.
    pub errors: Vec<String>,
    /// True if nothing went wrong.
    pub ok: bool,
}

fn wait_for_log(log: &Path, from: usize, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.get(from..).is_some_and(|t| t.contains(needle)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "`{needle}` did not appear in {} within {timeout:?}; it says:\n{}",
                log.display(),
                text.get(from..).unwrap_or("")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The address block of a service address `a.b.c.d/len`, as `--allow-service` takes it.
fn service_block(cidr: &str) -> String {
    // Invariant: `cidr` is the test bed's constant SERVICE_CIDR, a valid service address.
    let svc: tether_migrator::protocol::ServiceAddr =
        cidr.parse().expect("the test bed's service address parses");
    let mask = u32::MAX << (32 - u32::from(svc.prefix()));
    let net = std::net::Ipv4Addr::from(u32::from(svc.addr()) & mask);
    format!("{net}/{}", svc.prefix())
}
