//! Podman hosts: `src` and `dst` each with a Podman of its own, as two machines would have.
//!
//! Two rootful Podman instances on one machine share more than their storage: netavark keeps
//! its address allocations in `/run/containers/networks` whatever the configuration says (it
//! assumes one network namespace per machine), and Podman makes its containers' network
//! namespaces under `/run/netns`. So each Podman host gets, besides its network namespace:
//!
//! - a mount namespace of its own (kept by a bind mount of its nsfs file in the topology's work
//!   directory), with private tmpfs on `/run/containers` and `/run/netns`;
//! - its own storage root, run root, temporary directory and network configuration directory
//!   under the work directory, given to Podman through `CONTAINERS_CONF` and
//!   `CONTAINERS_STORAGE_CONF` (so that a plain `podman` in that host, tether's included, is
//!   that host's Podman);
//! - a macvlan network `lan` on its `eth0`, the LAN's subnet, the same on both hosts, so that a
//!   container's static address is on the LAN wherever it runs.
//!
//! [`Topology::command`] and everything built on it run a Podman host's programs in its mount
//! namespace with its environment. Teardown removes every container first (their processes are
//! in namespaces of their own, out of reach of the topology's kill), then the mount namespaces
//! (and the mounts in them).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

use super::process::run_checked;
use super::{Host, Topology, LAN_IFNAME, LAN_SUBNET};

/// The macvlan network every Podman host has.
pub const PODMAN_NETWORK: &str = "lan";
/// The image of the example service the test bed builds and imports on each Podman host.
pub const SERVICE_IMAGE: &str = "localhost/tether-service:test";

/// What a host runs its programs in, beyond its network namespace.
#[derive(Debug, Clone)]
pub(super) struct HostSetup {
    /// Its mount namespace (a bind-mounted nsfs file).
    pub mount_ns: PathBuf,
    /// Environment variables of its programs.
    pub env: Vec<(String, String)>,
}

/// Whether `podman` is on PATH.
pub fn podman_available() -> bool {
    Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

impl Topology {
    /// Makes `src` and `dst` Podman hosts (see the module's documentation). Fails, with what is
    /// missing, where Podman is not installed.
    pub fn enable_podman(&mut self) -> anyhow::Result<()> {
        if !podman_available() {
            bail!("podman is missing: scripts/setup.sh installs it (with runc, conmon, netavark)");
        }
        let mnt = self.work_dir().join("mntns");
        std::fs::create_dir_all(&mnt)?;
        // An nsfs file can only be bound onto a private mount.
        run(&["mount", "--bind", &s(&mnt), &s(&mnt)])?;
        self.podman_mnt_dir = Some(mnt.clone());
        run(&["mount", "--make-private", &s(&mnt)])?;
        for host in [Host::Src, Host::Dst] {
            let dir = self.work_dir().join(format!("podman-{}", host.name()));
            for d in ["root", "run", "tmp", "net"] {
                std::fs::create_dir_all(dir.join(d))?;
            }
            std::fs::write(
                dir.join("containers.conf"),
                format!(
                    "[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n\
                     events_logfile_path = \"{d}/events.log\"\ntmp_dir = \"{d}/tmp\"\n\
                     [network]\nnetwork_config_dir = \"{d}/net\"\n",
                    d = dir.display()
                ),
            )?;
            std::fs::write(
                dir.join("storage.conf"),
                format!(
                    "[storage]\ndriver = \"overlay\"\ngraphroot = \"{d}/root\"\nrunroot = \"{d}/run\"\n",
                    d = dir.display()
                ),
            )?;
            let ns = mnt.join(host.name());
            std::fs::write(&ns, b"")?;
            run(&[
                "unshare",
                &format!("--mount={}", ns.display()),
                "--propagation",
                "private",
                "sh",
                "-c",
                "mkdir -p /run/containers /run/netns && \
                 mount -t tmpfs -o mode=0755 tmpfs /run/containers && \
                 mount -t tmpfs -o mode=0755 tmpfs /run/netns",
            ])
            .with_context(|| format!("making the mount namespace of {host}"))?;
            self.host_setup[super::topology::host_index(host)] = Some(HostSetup {
                mount_ns: ns,
                env: vec![
                    ("CONTAINERS_CONF".into(), s(&dir.join("containers.conf"))),
                    (
                        "CONTAINERS_STORAGE_CONF".into(),
                        s(&dir.join("storage.conf")),
                    ),
                ],
            });
            self.podman(
                host,
                &[
                    "network",
                    "create",
                    "--driver",
                    "macvlan",
                    "--opt",
                    &format!("parent={LAN_IFNAME}"),
                    "--subnet",
                    LAN_SUBNET,
                    PODMAN_NETWORK,
                ],
            )?;
        }
        Ok(())
    }

    /// Runs `podman args...` on a Podman host and returns its stdout.
    pub fn podman(&self, host: Host, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = self.command(host, "podman");
        cmd.args(args);
        run_checked(cmd).with_context(|| format!("podman {} on {host}", args.join(" ")))
    }

    /// Builds an image holding `binary` as `/service` with the shared libraries it needs (read
    /// off `ldd`), from scratch (no registry is reachable), and imports it as `image` on both
    /// Podman hosts.
    pub fn import_binary_image(&self, binary: &Path, image: &str) -> anyhow::Result<()> {
        let root = self.work_dir().join("image-root");
        std::fs::create_dir_all(root.join("tmp"))?;
        std::fs::copy(binary, root.join("service"))
            .with_context(|| format!("copying {}", binary.display()))?;
        let out = Command::new("ldd").arg(binary).output()?;
        for lib in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                l.split_whitespace()
                    .rfind(|w| w.starts_with('/'))
                    .map(PathBuf::from)
            })
        {
            let to = root.join(lib.strip_prefix("/").unwrap_or(&lib));
            if let Some(dir) = to.parent() {
                std::fs::create_dir_all(dir)?;
            }
            std::fs::copy(&lib, &to).with_context(|| format!("copying {}", lib.display()))?;
        }
        let tar = self.work_dir().join("image.tar");
        run(&["tar", "-C", &s(&root), "-cf", &s(&tar), "."])?;
        std::fs::remove_dir_all(&root)?;
        for host in [Host::Src, Host::Dst] {
            self.podman(host, &["import", "--quiet", &s(&tar), image])?;
        }
        std::fs::remove_file(&tar)?;
        Ok(())
    }

    /// Removes every container of the Podman hosts, then their mount namespaces. Problems are
    /// returned, not raised (teardown goes on).
    pub(super) fn teardown_podman(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(mnt) = self.podman_mnt_dir.take() else {
            return problems;
        };
        for host in [Host::Src, Host::Dst] {
            let i = super::topology::host_index(host);
            if self.host_setup[i].is_none() {
                continue;
            }
            if let Err(e) = self.podman(host, &["rm", "--all", "--force", "--time", "0"]) {
                problems.push(format!("cannot remove the containers of {host}: {e:#}"));
            }
            if let Some(setup) = self.host_setup[i].take() {
                if let Err(e) = run(&["umount", &s(&setup.mount_ns)]) {
                    problems.push(format!(
                        "cannot release the mount namespace of {host}: {e:#}"
                    ));
                }
            }
        }
        if let Err(e) = run(&["umount", &s(&mnt)]) {
            problems.push(format!("cannot unmount {}: {e:#}", mnt.display()));
        }
        problems
    }
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `argv` here (not in a host) and returns its stdout.
fn run(argv: &[&str]) -> anyhow::Result<String> {
    let (program, args) = argv.split_first().context("empty command line")?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    run_checked(cmd)
}
