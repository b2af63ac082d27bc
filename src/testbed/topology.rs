//! The [`Topology`]: namespaces, links, addresses, and running things in them.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use super::names::{netns_path, next_prefix, work_dir_for, LAN_SUFFIX};
use super::netns::in_netns;
use super::podman::HostSetup;
use super::process::{
    kill_processes_in_netns, netns_id, run_checked, set_cloexec_on_inherited_fds,
};
use super::{
    report_problem, Host, HostProcess, ServiceProcess, BRIDGE_NAME, LAN_IFNAME, LAN_PREFIX_LEN,
    MIGRATION_IFNAME, MIGRATION_PREFIX_LEN, SERVICE_CIDR, SERVICE_IP,
};

/// Smallest tbf bucket we configure: a few full-size GSO segments.
const MIN_TBF_BURST: u64 = 32 * 1024;
/// Environment variable that, when set to anything but `0`, keeps topology work directories.
const KEEP_WORK_DIR_ENV: &str = "TETHER_KEEP_WORK_DIR";

/// The tbf bucket size (bytes) used for a rate limit of `rate_bits_per_sec`: 4 ms worth of data
/// at that rate (`rate / 8 / 250`), at least 32 KiB.
///
/// A bucket much smaller than the data a 250 Hz timer tick lets through would cap the rate below
/// the setting; a much larger one lets short transfers (a pre-copy round) run at veth speed and
/// skews measured bandwidth.
pub fn tbf_burst_bytes(rate_bits_per_sec: u64) -> u64 {
    (rate_bits_per_sec / 8 / 250).max(MIN_TBF_BURST)
}

/// Builds a [`Topology`]; get one with [`Topology::builder`].
#[derive(Debug, Clone, Default)]
pub struct TopologyBuilder {
    proxy: bool,
    migration_link_rate: Option<u64>,
    /// Test hook: fail in the middle of `build()` to exercise the rollback.
    #[cfg(test)]
    fail_midway: bool,
}

impl TopologyBuilder {
    /// Whether to create the `proxy` host (default: no).
    #[must_use]
    pub fn with_proxy(mut self, proxy: bool) -> Self {
        self.proxy = proxy;
        self
    }

    /// Limits the migration link (both directions) to `bits_per_sec` with a `tbf` qdisc on
    /// `mig0` at both ends (burst from [`tbf_burst_bytes`], latency 50 ms). Default: unlimited
    /// (veth speed, ~15 Gbit/s here).
    #[must_use]
    pub fn migration_link_rate(mut self, bits_per_sec: u64) -> Self {
        self.migration_link_rate = Some(bits_per_sec);
        self
    }

    /// Test hook: makes `build()` fail after the LAN is set up.
    #[cfg(test)]
    pub(crate) fn fail_midway(mut self) -> Self {
        self.fail_midway = true;
        self
    }

    /// Creates the namespaces, bridge, links and addresses. On failure everything created so
    /// far is removed again.
    pub fn build(self) -> anyhow::Result<Topology> {
        if self.migration_link_rate == Some(0) {
            bail!("migration link rate must be positive");
        }
        let prefix = next_prefix()?;
        let host_ns = Host::ALL.map(|h| format!("{prefix}{}", h.suffix()));
        let mut topo = Topology {
            lan_ns: format!("{prefix}{LAN_SUFFIX}"),
            work_dir: work_dir_for(&prefix),
            prefix,
            host_ns,
            has_proxy: self.proxy,
            migration_link_rate: self.migration_link_rate,
            created: Vec::new(),
            work_dir_created: false,
            host_setup: [None, None, None, None],
            podman_mnt_dir: None,
        };
        // From here on, an early return drops `topo`, which removes what was created.
        topo.create(&self)
            .with_context(|| format!("cannot build test topology {}", topo.prefix))?;
        tracing::debug!(prefix = %topo.prefix, "test topology ready");
        Ok(topo)
    }
}

/// An isolated test network of namespaces: hosts `client`, `src`, `dst` and optionally `proxy`
/// on a bridged LAN, plus a direct migration link between `src` and `dst`. See the
/// [module documentation](super) for the layout.
///
/// Everything is removed when the topology is dropped (or [`close`](Self::close)d): the
/// processes in its namespaces are killed, the namespaces deleted, the work directory removed.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    host_ns: [String; 4],
    lan_ns: String,
    has_proxy: bool,
    migration_link_rate: Option<u64>,
    /// Namespaces created so far, in creation order.
    created: Vec<String>,
    work_dir: PathBuf,
    work_dir_created: bool,
    /// Per host: the mount namespace and environment of its programs (Podman hosts).
    pub(super) host_setup: [Option<HostSetup>; 4],
    /// Where the Podman hosts' mount namespaces are bound, once [`Topology::enable_podman`] ran.
    pub(super) podman_mnt_dir: Option<PathBuf>,
}

pub(super) fn host_index(host: Host) -> usize {
    match host {
        Host::Client => 0,
        Host::Src => 1,
        Host::Dst => 2,
        Host::Proxy => 3,
    }
}

fn ip(netns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = Command::new("ip");
    cmd.arg("-n").arg(netns).args(args);
    run_checked(cmd).map(drop)
}

/// Stdout and stderr for a spawned process: `/dev/null`, or the log file opened for appending.
fn output_stdio(log: Option<&Path>) -> anyhow::Result<(Stdio, Stdio)> {
    match log {
        None => Ok((Stdio::null(), Stdio::null())),
        Some(path) => {
            let file: File = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open log file {}", path.display()))?;
            let err = file.try_clone().context("cannot duplicate log file")?;
            Ok((Stdio::from(file), Stdio::from(err)))
        }
    }
}

impl Topology {
    /// Starts building a topology (no proxy host, unlimited migration link).
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    fn create(&mut self, opts: &TopologyBuilder) -> anyhow::Result<()> {
        let mut namespaces = vec![self.lan_ns.clone()];
        namespaces.extend(self.hosts().map(|h| self.netns(h).to_owned()));
        for ns in namespaces {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "add", &ns]);
            run_checked(cmd)?;
            self.created.push(ns);
        }

        if self.work_dir.exists() {
            std::fs::remove_dir_all(&self.work_dir)
                .with_context(|| format!("cannot remove old {}", self.work_dir.display()))?;
        }
        std::fs::create_dir_all(&self.work_dir)
            .with_context(|| format!("cannot create {}", self.work_dir.display()))?;
        self.work_dir_created = true;

        for ns in &self.created {
            ip(ns, &["link", "set", "lo", "up"])?;
        }

        let lan = self.lan_ns.as_str();
        ip(lan, &["link", "add", BRIDGE_NAME, "type", "bridge"])?;
        ip(lan, &["link", "set", BRIDGE_NAME, "up"])?;
        for host in self.hosts() {
            let port = format!("v-{}", host.name());
            let ns = self.netns(host);
            ip(
                lan,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", LAN_IFNAME, "netns", ns,
                ],
            )?;
            ip(lan, &["link", "set", &port, "master", BRIDGE_NAME, "up"])?;
            let addr = format!("{}/{LAN_PREFIX_LEN}", host.lan_addr());
            ip(ns, &["addr", "add", &addr, "dev", LAN_IFNAME])?;
            ip(ns, &["link", "set", LAN_IFNAME, "up"])?;
        }

        #[cfg(test)]
        if opts.fail_midway {
            bail!("injected failure (test)");
        }

        let (src, dst) = (self.netns(Host::Src), self.netns(Host::Dst));
        ip(
            src,
            &[
                "link",
                "add",
                MIGRATION_IFNAME,
                "type",
                "veth",
                "peer",
                "name",
                MIGRATION_IFNAME,
                "netns",
                dst,
            ],
        )?;
        for host in [Host::Src, Host::Dst] {
            let ns = self.netns(host);
            let addr = format!("{}/{MIGRATION_PREFIX_LEN}", self.migration_addr(host));
            ip(ns, &["addr", "add", &addr, "dev", MIGRATION_IFNAME])?;
            ip(ns, &["link", "set", MIGRATION_IFNAME, "up"])?;
            if let Some(rate) = opts.migration_link_rate {
                let mut tc = Command::new("tc");
                tc.args([
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    MIGRATION_IFNAME,
                    "root",
                    "tbf",
                ])
                .arg("rate")
                .arg(format!("{rate}bit"))
                .arg("burst")
                .arg(tbf_burst_bytes(rate).to_string())
                .args(["latency", "50ms"]);
                run_checked(tc)?;
            }
        }
        Ok(())
    }

    /// Removes everything; returns the problems met (empty on success). Idempotent.
    fn teardown(&mut self) -> Vec<String> {
        let mut problems = self.teardown_podman();
        let ids: Vec<_> = self
            .created
            .iter()
            .filter_map(|ns| netns_id(&netns_path(ns)).ok())
            .collect();
        let survivors = kill_processes_in_netns(&ids);
        if !survivors.is_empty() {
            problems.push(format!(
                "processes {survivors:?} in topology {} survived SIGKILL",
                self.prefix
            ));
        }
        for ns in self.created.drain(..).rev() {
            let del = || {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "del", &ns]);
                run_checked(cmd)
            };
            if let Err(first) = del() {
                std::thread::sleep(Duration::from_millis(50));
                if netns_path(&ns).exists() {
                    if let Err(e) = del() {
                        problems.push(format!("cannot delete namespace {ns}: {first:#}; {e:#}"));
                    }
                }
            }
        }
        if self.work_dir_created {
            self.work_dir_created = false;
            let keep = std::env::var_os(KEEP_WORK_DIR_ENV).is_some_and(|v| v != "0");
            if keep {
                tracing::info!("keeping {} ({KEEP_WORK_DIR_ENV})", self.work_dir.display());
            } else if let Err(e) = std::fs::remove_dir_all(&self.work_dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    problems.push(format!("cannot remove {}: {e}", self.work_dir.display()));
                }
            }
        }
        problems
    }

    /// Tears the topology down now (as drop would) and reports any problem as an error.
    pub fn close(mut self) -> anyhow::Result<()> {
        let problems = self.teardown();
        if !problems.is_empty() {
            bail!("{}", problems.join("; "));
        }
        Ok(())
    }

    /// The unique prefix of this topology's namespace names (`tt<pid>x<counter>`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The hosts of this topology: `client`, `src`, `dst`, and `proxy` if built with one.
    pub fn hosts(&self) -> impl Iterator<Item = Host> {
        let has_proxy = self.has_proxy;
        Host::ALL
            .into_iter()
            .filter(move |h| *h != Host::Proxy || has_proxy)
    }

    /// Whether `host` exists in this topology (only `proxy` is optional).
    pub fn has_host(&self, host: Host) -> bool {
        host != Host::Proxy || self.has_proxy
    }

    fn check_host(&self, host: Host) {
        assert!(
            self.has_host(host),
            "topology {} has no {host} host (build it with `.with_proxy(true)`)",
            self.prefix
        );
    }

    /// The network namespace name of a host (as `ip netns list` shows it).
    ///
    /// # Panics
    ///
    /// If the host is `proxy` and the topology was built without one.
    pub fn netns(&self, host: Host) -> &str {
        self.check_host(host);
        &self.host_ns[host_index(host)]
    }

    /// `/run/netns/<name>` of a host's namespace, for `nsenter --net=`, `setns` or CRIU.
    ///
    /// # Panics
    ///
    /// If the host is `proxy` and the topology was built without one.
    pub fn netns_path(&self, host: Host) -> PathBuf {
        netns_path(self.netns(host))
    }

    /// The name of the namespace holding the LAN bridge ([`BRIDGE_NAME`]).
    pub fn lan_netns(&self) -> &str {
        &self.lan_ns
    }

    /// A host's LAN address (10.77.0.1 client, .2 src, .3 dst, .4 proxy).
    ///
    /// # Panics
    ///
    /// If the host is `proxy` and the topology was built without one.
    pub fn lan_addr(&self, host: Host) -> Ipv4Addr {
        self.check_host(host);
        host.lan_addr()
    }

    /// A host's address on the migration link (10.78.0.2 src, 10.78.0.3 dst).
    ///
    /// # Panics
    ///
    /// For `client` and `proxy`, which are not on the migration link.
    pub fn migration_addr(&self, host: Host) -> Ipv4Addr {
        match host.migration_addr() {
            Some(addr) => addr,
            None => panic!("{host} is not on the migration link (only src and dst are)"),
        }
    }

    /// The name of a host's LAN interface (`eth0`).
    ///
    /// # Panics
    ///
    /// If the host is `proxy` and the topology was built without one.
    pub fn lan_ifname(&self, host: Host) -> &'static str {
        self.check_host(host);
        LAN_IFNAME
    }

    /// The name of the migration-link interface in `src` and `dst` (`mig0`).
    pub fn migration_ifname(&self) -> &'static str {
        MIGRATION_IFNAME
    }

    /// The topology's free service address, 10.77.0.100 (configured nowhere at start).
    pub fn service_ip(&self) -> Ipv4Addr {
        SERVICE_IP
    }

    /// The service address with its prefix length, `"10.77.0.100/24"`, as `ip addr add` takes
    /// it.
    pub fn service_cidr(&self) -> &'static str {
        SERVICE_CIDR
    }

    /// The migration link's rate limit in bit/s, if one was set.
    pub fn migration_link_rate(&self) -> Option<u64> {
        self.migration_link_rate
    }

    /// A scratch directory for this topology (under the system temp dir, named after the
    /// prefix), removed with the topology unless `TETHER_KEEP_WORK_DIR` is set (and not `0`).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// A command running `program` inside the host's network namespace:
    /// `nsenter --net=/run/netns/NAME -- program`. Add arguments and stdio as usual. (`nsenter`
    /// execs the program, so the child's pid is the program's.)
    ///
    /// # Panics
    ///
    /// If the host is `proxy` and the topology was built without one.
    pub fn command(&self, host: Host, program: impl AsRef<OsStr>) -> Command {
        let mut net = std::ffi::OsString::from("--net=");
        net.push(self.netns_path(host));
        let mut cmd = Command::new("nsenter");
        cmd.arg(net);
        if let Some(setup) = &self.host_setup[host_index(host)] {
            let mut mnt = std::ffi::OsString::from("--mount=");
            mnt.push(&setup.mount_ns);
            cmd.arg(mnt);
            cmd.envs(setup.env.iter().map(|(k, v)| (k, v)));
        }
        cmd.arg("--").arg(program);
        cmd
    }

    /// Runs `argv` (program and arguments) in a host and returns its stdout; an error carries
    /// the exit status and stderr.
    pub fn run<S: AsRef<OsStr>>(&self, host: Host, argv: &[S]) -> anyhow::Result<String> {
        let Some((program, args)) = argv.split_first() else {
            bail!("run: empty command line");
        };
        let mut cmd = self.command(host, program);
        cmd.args(args);
        run_checked(cmd)
    }

    /// Starts an ordinary long-running process (agent, client) in a host, with stdin from
    /// `/dev/null` and stdout and stderr to `/dev/null` or appended to `log`, inheriting no other
    /// descriptor. The guard stops it
    /// on drop (SIGTERM, SIGKILL after a grace period). For other stdio, build the command with
    /// [`command`](Self::command) and use [`HostProcess::spawn`].
    pub fn spawn<I, S>(
        &self,
        host: Host,
        program: impl AsRef<OsStr>,
        args: I,
        log: Option<&Path>,
    ) -> anyhow::Result<HostProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_env(host, program, args, &[], log)
    }

    /// Like [`spawn`](Self::spawn), with environment variables added.
    pub fn spawn_env<I, S>(
        &self,
        host: Host,
        program: impl AsRef<OsStr>,
        args: I,
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> anyhow::Result<HostProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (out, err) = output_stdio(log)?;
        let mut cmd = self.command(host, program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.envs(env.iter().copied());
        set_cloexec_on_inherited_fds();
        let mut proc = HostProcess::spawn(&mut cmd)?;
        // Return once `nsenter` has switched namespaces, so that callers see the process where
        // it belongs (or once it has exited).
        let target = netns_id(&self.netns_path(host))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let pid = proc.pid();
        while netns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok() != Some(target)
            && matches!(proc.try_wait(), Ok(None))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(proc)
    }

    /// Starts a migratable service in a host: in the host's network namespace and in a new PID
    /// namespace of its own, where it is PID 1 (`nsenter --net=... -- unshare --pid --fork --
    /// setsid program args...`; no mount namespace;
    /// the service leads its own session). Stdin is `/dev/null`; stdout and stderr go to
    /// `/dev/null` or are appended to `log`. No other descriptor is inherited (see
    /// [`set_cloexec_on_inherited_fds`](super::set_cloexec_on_inherited_fds)).
    ///
    /// Returns once the service process exists and has exec'd `program`; it may not be ready to
    /// serve yet (see [`wait_for_tcp`](Self::wait_for_tcp)).
    pub fn spawn_service<I, S>(
        &self,
        host: Host,
        program: impl AsRef<OsStr>,
        args: I,
        log: Option<&Path>,
    ) -> anyhow::Result<ServiceProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let (out, err) = output_stdio(log)?;
        let mut cmd = self.command(host, "unshare");
        // setsid: CRIU refuses a tree whose session leader is outside its PID namespace, so the
        // service must lead a session of its own.
        cmd.args(["--pid", "--fork", "--", "setsid", "--"])
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        set_cloexec_on_inherited_fds();
        ServiceProcess::start(cmd, log)
    }

    /// Runs `f` on a fresh thread inside the host's network namespace (see
    /// [`in_netns`](super::in_netns)); sockets it creates stay in that namespace.
    ///
    /// # Panics
    ///
    /// If `f` panics, or the host is `proxy` and the topology was built without one.
    pub fn in_host<T, F>(&self, host: Host, f: F) -> anyhow::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        in_netns(&self.netns_path(host), f)
    }

    /// Opens a TCP connection from inside a host (the socket lives in the host's namespace).
    pub fn connect_in(
        &self,
        host: Host,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<TcpStream> {
        self.in_host(host, || TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connect from {host} to {addr}"))
    }

    /// Binds a TCP listener inside a host (e.g. on `host.lan_addr()` port 0).
    pub fn listen_in(&self, host: Host, addr: SocketAddr) -> anyhow::Result<TcpListener> {
        self.in_host(host, || TcpListener::bind(addr))?
            .with_context(|| format!("listen in {host} on {addr}"))
    }

    /// Waits until a TCP connection from `host` to `addr` succeeds (the connection is closed
    /// right away), retrying every 20 ms, for at most `timeout`.
    pub fn wait_for_tcp(
        &self,
        host: Host,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let last_error = self.in_host(host, || loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = left
                .min(Duration::from_millis(500))
                .max(Duration::from_millis(1));
            match TcpStream::connect_timeout(&addr, attempt) {
                Ok(_) => return None,
                Err(e) if Instant::now() >= deadline => return Some(e),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        })?;
        match last_error {
            None => Ok(()),
            Some(e) => bail!("{addr} not reachable from {host} within {timeout:?}: {e}"),
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for problem in self.teardown() {
            report_problem(&problem);
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn burst_is_4ms_of_data_but_at_least_32k() {
        assert_eq!(tbf_burst_bytes(1), MIN_TBF_BURST);
        assert_eq!(tbf_burst_bytes(10_000_000), MIN_TBF_BURST);
        assert_eq!(tbf_burst_bytes(100_000_000), 50_000);
        assert_eq!(tbf_burst_bytes(1_000_000_000), 500_000);
        assert_eq!(tbf_burst_bytes(u64::MAX), u64::MAX / 2000);
    }
}
