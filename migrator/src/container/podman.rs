//! Podman, driven through its command line: what tether asks of it and how it reads the answers.
//!
//! Podman has no hold point of its own (`podman container checkpoint` ends or thaws the
//! container at once, and refuses a paused one), so tether dumps a container's tree with its own
//! CRIU worker, with the options runc's own dump uses (see [`super::scope`]), and hands the
//! images to Podman only to restore: on the destination the container is created beforehand
//! with the source's configuration (`podman create`, then `init` and `stop`, which writes the
//! runtime bundle Podman's restore reads), and `podman container restore` then restores it from
//! the images in its bundle's `checkpoint` directory, as after a checkpoint of its own.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::process::Command;
use tracing::{debug, info};

use super::ContainerError;
use crate::protocol::ContainerSpec;

/// Longest a Podman command may take (its own storage and network set-up included).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// The name under which the source's container log travels with the images.
pub const LOG_FILE: &str = "container.log";
/// The runtime's record of the tree's standard descriptors, which its restore needs.
pub const DESCRIPTORS_FILE: &str = "descriptors.json";

/// Global options of `podman` that take a value as the next argument (to find the subcommand in
/// a recorded command line).
const GLOBAL_WITH_VALUE: &[&str] = &[
    "--root",
    "--runroot",
    "--network-config-dir",
    "--cgroup-manager",
    "--events-backend",
    "--tmpdir",
    "--log-level",
    "--url",
    "--connection",
    "-c",
    "--identity",
    "--storage-driver",
    "--storage-opt",
    "--conmon",
    "--runtime",
    "--runtime-flag",
    "--hooks-dir",
    "--network-cmd-path",
    "--volumepath",
    "--imagestore",
    "--registries-conf",
    "--ssh",
];

/// The `podman` command, with the directory of the CRIU tether uses first in its PATH (Podman's
/// runtime runs `criu` from PATH).
#[derive(Debug, Clone)]
pub struct Podman {
    bin: PathBuf,
    path_env: Option<std::ffi::OsString>,
}

/// A container created here for a restore ([`Podman::stage`]): what the restore needs of it,
/// read once beforehand (each `podman inspect` costs some 45 ms, in the downtime if done then).
#[derive(Debug, Clone)]
pub struct Staged {
    /// Its id.
    pub id: String,
    /// Its runtime bundle (where `checkpoint` goes).
    pub bundle: PathBuf,
    /// Its log file, if it has one.
    pub log_path: Option<PathBuf>,
    /// Where conmon writes its init's pid.
    pub pid_file: PathBuf,
    /// The CRIU configuration file its runtime reads at the restore (annotation
    /// `org.criu.config`), if it was given one: see [`Podman::restore`].
    pub criu_config: Option<PathBuf>,
}

/// The name, in a container's image set on the destination, of the CRIU configuration file its
/// restore reads (see [`Podman::restore`]): the agent's own, never a source's (the receiver
/// refuses a file of that name: CRIU options from a source could run commands here).
pub const CRIU_CONFIG_FILE: &str = "criu-lazy.conf";

/// The annotation through which runc hands CRIU a configuration file of the container's own.
const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// The lazy-pages daemon's socket, which CRIU's restore looks for in its work directory.
const LAZY_SOCKET: &str = "lazy-pages.socket";

/// What tether reads of a container (`podman inspect`).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Inspected {
    /// Its full id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its init process on the host (0 when it does not run).
    pub pid: i32,
    /// It runs (not paused, created or exited).
    pub running: bool,
    /// It has a terminal (`-t`).
    pub tty: bool,
    /// Podman's record of the command line that made it.
    pub create_command: Vec<String>,
    /// Its log file (k8s-file driver), if it has one.
    pub log_path: Option<PathBuf>,
    /// The runtime bundle's `config.json` (the OCI spec it runs with).
    pub oci_config: PathBuf,
    /// Where conmon writes its init's pid.
    pub pid_file: Option<PathBuf>,
    /// Its bind mounts: (host source, path in the container).
    pub binds: Vec<(String, String)>,
    /// The named volumes it mounts.
    pub volumes: Vec<String>,
    /// Its MAC address on its first network, if it has one.
    pub mac: Option<String>,
    /// Its IPv4 addresses, on every network.
    pub addresses: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawInspect {
    id: String,
    name: String,
    state: RawState,
    config: RawConfig,
    #[serde(default)]
    host_config: Option<RawHostConfig>,
    #[serde(rename = "OCIConfigPath", default)]
    oci_config_path: Option<String>,
    #[serde(default)]
    pid_file: Option<String>,
    #[serde(default)]
    mounts: Vec<RawMount>,
    #[serde(default)]
    network_settings: Option<RawNetworkSettings>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawState {
    #[serde(default)]
    pid: i32,
    #[serde(default)]
    running: bool,
    #[serde(default)]
    paused: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawConfig {
    #[serde(default)]
    tty: bool,
    #[serde(default)]
    create_command: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawHostConfig {
    #[serde(default)]
    log_config: Option<RawLogConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawLogConfig {
    #[serde(default)]
    path: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawMount {
    #[serde(rename = "Type", default)]
    kind: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    source: String,
    #[serde(default)]
    destination: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetworkSettings {
    #[serde(default)]
    networks: Option<std::collections::BTreeMap<String, RawNetwork>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct RawNetwork {
    #[serde(rename = "IPAddress", default)]
    ip_address: String,
    #[serde(default)]
    mac_address: String,
}

impl Podman {
    /// Finds `podman` in PATH; `criu` is the CRIU binary its runtime is to use.
    pub fn locate(criu: &Path) -> Result<Podman, ContainerError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let bin = std::env::split_paths(&path)
            .map(|d| d.join("podman"))
            .find(|p| p.is_file())
            .ok_or(ContainerError::NoPodman)?;
        let path_env = criu.parent().map(|dir| {
            let mut dirs = vec![dir.to_path_buf()];
            dirs.extend(std::env::split_paths(&path));
            std::env::join_paths(dirs).unwrap_or(path.clone())
        });
        Ok(Podman { bin, path_env })
    }

    async fn run(&self, what: &str, args: &[&str]) -> Result<String, ContainerError> {
        let started = Instant::now();
        let mut cmd = Command::new(&self.bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(p) = &self.path_env {
            cmd.env("PATH", p);
        }
        let out = tokio::time::timeout(COMMAND_TIMEOUT, cmd.output())
            .await
            .map_err(|_| ContainerError::Podman {
                what: what.to_string(),
                detail: format!("no answer within {} s", COMMAND_TIMEOUT.as_secs()),
            })?
            .map_err(|e| ContainerError::Podman {
                what: what.to_string(),
                detail: e.to_string(),
            })?;
        debug!(what, ms = started.elapsed().as_millis() as u64, "podman");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(ContainerError::Podman {
                what: what.to_string(),
                detail: error_of(&String::from_utf8_lossy(&out.stderr)),
            })
        }
    }

    /// Reads a container's state and configuration.
    pub async fn inspect(&self, name: &str) -> Result<Inspected, ContainerError> {
        let out = self
            .run(
                &format!("inspecting container {name}"),
                &["container", "inspect", "--", name],
            )
            .await
            .map_err(|e| match e {
                ContainerError::Podman { detail, .. } if detail.contains("no such") => {
                    ContainerError::NoSuchContainer(name.to_string())
                }
                e => e,
            })?;
        parse_inspect(&out, name)
    }

    /// Whether a container `name` exists here.
    pub async fn exists(&self, name: &str) -> Result<bool, ContainerError> {
        match self.inspect(name).await {
            Ok(_) => Ok(true),
            Err(ContainerError::NoSuchContainer(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates `spec`'s container here, left exited with its runtime bundle written, ready for
    /// [`restore`](Self::restore). Refuses (changing nothing) when a bind-mount source or a
    /// named volume is missing, the name is taken or the image is absent. Returns its id.
    ///
    /// `init` runs the runtime's set-up (its network among it: the caller blocks the address on
    /// the LAN first) but not the container's command, and `stop` ends that set-up again.
    ///
    /// With `criu_config`, the container carries the annotation `org.criu.config` naming that
    /// path: runc then gives CRIU that file as configuration at every checkpoint and restore,
    /// and CRIU ignores it while it does not exist ([`restore`](Self::restore) writes it for
    /// the restore only). Not when the container names a configuration of its own.
    pub async fn stage(
        &self,
        spec: &ContainerSpec,
        criu_config: Option<&Path>,
    ) -> Result<Staged, ContainerError> {
        if let Some(p) = spec.bind_sources.iter().find(|p| !Path::new(p).exists()) {
            return Err(ContainerError::MissingMount(p.clone()));
        }
        for v in &spec.volumes {
            if self
                .run("looking for a volume", &["volume", "exists", v])
                .await
                .is_err()
            {
                return Err(ContainerError::MissingVolume(v.clone()));
            }
        }
        if self.exists(&spec.name).await? {
            return Err(ContainerError::NameTaken(spec.name.clone()));
        }
        let criu_config = criu_config.filter(|_| {
            !spec
                .create_args
                .iter()
                .any(|a| a.contains(CRIU_CONFIG_ANNOTATION))
        });
        let annotation =
            criu_config.map(|p| format!("--annotation={CRIU_CONFIG_ANNOTATION}={}", p.display()));
        let mut args: Vec<&str> = vec!["create"];
        args.extend(annotation.as_deref());
        args.extend(spec.create_args.iter().map(String::as_str));
        let id = self
            .run(&format!("creating container {}", spec.name), &args)
            .await?
            .trim()
            .to_string();
        if id.is_empty() {
            return Err(ContainerError::Podman {
                what: format!("creating container {}", spec.name),
                detail: "no id printed".into(),
            });
        }
        let ready = async {
            self.run("initialising the staged container", &["init", &id])
                .await?;
            self.run(
                "stopping the staged container",
                &["stop", "--time", "0", &id],
            )
            .await?;
            let c = self.inspect(&id).await?;
            let bad = |what: &str| ContainerError::Podman {
                what: "reading the staged container".into(),
                detail: format!("Podman names no {what}"),
            };
            Ok::<_, ContainerError>(Staged {
                bundle: c
                    .oci_config
                    .parent()
                    .ok_or_else(|| bad("bundle"))?
                    .to_path_buf(),
                pid_file: c.pid_file.ok_or_else(|| bad("pid file"))?,
                log_path: c.log_path,
                criu_config: criu_config.map(Path::to_path_buf),
                id: id.clone(),
            })
        }
        .await;
        match ready {
            Ok(staged) => {
                info!(container = %spec.name, %id, "staged for the restore");
                Ok(staged)
            }
            Err(e) => {
                let _ = self.remove(&id).await;
                Err(e)
            }
        }
    }

    /// Restores the staged container from `images` (the directory is linked in as its bundle's
    /// `checkpoint`; Podman removes the link, not the images, once restored), with the source's
    /// log (if `images` has one) in place first. Returns its init pid (from conmon's pid file)
    /// and how long Podman took.
    ///
    /// With `lazy` (a lazy-pages daemon serves `images`), and a container staged with a CRIU
    /// configuration file: Podman does not pass runc's `--lazy-pages`, so the restore gets it
    /// from that file (`lazy-pages`), written for this restore and removed after it, and finds
    /// the daemon's socket in runc's work directory (the bundle) through a link. Returns
    /// whether the restore was lazy.
    pub async fn restore(
        &self,
        staged: &Staged,
        images: &Path,
        lazy: bool,
    ) -> Result<(i32, Duration, bool), ContainerError> {
        let link = staged.bundle.join("checkpoint");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(images, &link).map_err(|e| ContainerError::Io {
            what: format!("linking the images as {}", link.display()),
            source: e,
        })?;
        let source_log = images.join(LOG_FILE);
        if let (Some(log), true) = (&staged.log_path, source_log.is_file()) {
            std::fs::copy(&source_log, log).map_err(|e| ContainerError::Io {
                what: format!("putting the source's log in {}", log.display()),
                source: e,
            })?;
        }
        let lazy_files = match (&staged.criu_config, lazy) {
            (Some(conf), true) => {
                let socket = staged.bundle.join(LAZY_SOCKET);
                let _ = std::fs::remove_file(&socket);
                std::fs::write(conf, "lazy-pages\n")
                    .and_then(|()| std::os::unix::fs::symlink(images.join(LAZY_SOCKET), &socket))
                    .map_err(ContainerError::io("preparing the lazy restore"))?;
                Some((conf.clone(), socket))
            }
            (Some(conf), false) => {
                // CRIU ignores the file while it does not exist.
                let _ = std::fs::remove_file(conf);
                None
            }
            (None, _) => None,
        };
        let lazy = lazy_files.is_some();
        let _ = std::fs::remove_file(&staged.pid_file);
        let started = Instant::now();
        let restored = self
            .run(
                "restoring the container",
                &["container", "restore", "--tcp-established", &staged.id],
            )
            .await;
        let elapsed = started.elapsed();
        let _ = std::fs::remove_file(&link);
        if let Some((conf, socket)) = lazy_files {
            let _ = std::fs::remove_file(conf);
            let _ = std::fs::remove_file(socket);
        }
        restored?;
        let pid = std::fs::read_to_string(&staged.pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| ContainerError::Podman {
                what: "restoring the container".into(),
                detail: format!(
                    "Podman restored it, yet its pid file {} names no process",
                    staged.pid_file.display()
                ),
            })?;
        Ok((pid, elapsed, lazy))
    }

    /// Removes container `id` (killing it if it runs); absent is fine.
    pub async fn remove(&self, id: &str) -> Result<(), ContainerError> {
        self.run(
            &format!("removing container {id}"),
            &["rm", "--force", "--ignore", "--time", "0", id],
        )
        .await
        .map(drop)
    }
}

/// Podman's error in its stderr: its `Error: ` line (it may have logged warnings before), else
/// all of it.
pub fn error_of(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("Error: "))
        .unwrap_or(stderr)
        .trim()
        .to_string()
}

fn parse_inspect(out: &str, name: &str) -> Result<Inspected, ContainerError> {
    let bad = |detail: String| ContainerError::Podman {
        what: format!("reading `podman inspect {name}`"),
        detail,
    };
    let mut all: Vec<RawInspect> = serde_json::from_str(out).map_err(|e| bad(e.to_string()))?;
    if all.len() != 1 {
        return Err(bad(format!("{} containers described, not one", all.len())));
    }
    let r = all.remove(0);
    let networks = r
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default();
    Ok(Inspected {
        running: r.state.running && !r.state.paused,
        pid: r.state.pid,
        tty: r.config.tty,
        create_command: r.config.create_command.unwrap_or_default(),
        log_path: r
            .host_config
            .and_then(|h| h.log_config)
            .and_then(|l| l.path)
            .filter(|p| !p.is_empty())
            .map(PathBuf::from),
        oci_config: r.oci_config_path.map(PathBuf::from).unwrap_or_default(),
        pid_file: r.pid_file.filter(|p| !p.is_empty()).map(PathBuf::from),
        volumes: r
            .mounts
            .iter()
            .filter(|m| m.kind == "volume" && !m.name.is_empty())
            .map(|m| m.name.clone())
            .collect(),
        binds: r
            .mounts
            .into_iter()
            .filter(|m| m.kind == "bind")
            .map(|m| (m.source, m.destination))
            .collect(),
        mac: networks
            .values()
            .map(|n| n.mac_address.clone())
            .find(|m| !m.is_empty()),
        addresses: networks
            .values()
            .map(|n| n.ip_address.clone())
            .filter(|a| !a.is_empty())
            .collect(),
        id: r.id,
        name: r.name,
    })
}

/// The arguments of the `podman run`/`create` in a recorded command line, from the
/// subcommand's first argument on, as `podman create` takes them: `run`'s `--detach` dropped.
/// `None` when the line names neither subcommand.
pub fn create_args(command: &[String]) -> Option<Vec<String>> {
    let mut i = 1;
    while i < command.len() {
        let a = command[i].as_str();
        if a == "run" || a == "create" {
            break;
        }
        if a == "container" {
            i += 1;
            continue;
        }
        if !a.starts_with('-') {
            return None;
        }
        i += if GLOBAL_WITH_VALUE.contains(&a) { 2 } else { 1 };
    }
    if i >= command.len() {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = command[i + 1..].iter();
    for a in rest.by_ref() {
        if a == "--" || !a.starts_with('-') && !out.last().is_some_and(|p: &String| takes_value(p))
        {
            // The image: everything from here on is the image and its command.
            out.push(a.clone());
            break;
        }
        match a.as_str() {
            "-d" | "--detach" | "--detach=true" | "-d=true" => continue,
            // What an earlier move's destination added (see `Podman::stage`): not the user's.
            s if s.starts_with(&format!("--annotation={CRIU_CONFIG_ANNOTATION}="))
                && s.ends_with(&format!("/{CRIU_CONFIG_FILE}")) =>
            {
                continue
            }
            s if s.starts_with('-')
                && !s.starts_with("--")
                && s.len() > 2
                && s[1..].chars().all(|c| "dit".contains(c)) =>
            {
                let kept: String = s[1..].chars().filter(|c| *c != 'd').collect();
                out.push(format!("-{kept}"));
            }
            _ => out.push(a.clone()),
        }
    }
    out.extend(rest.cloned());
    Some(out)
}

/// Whether `flag` (as written, before its value) takes the next argument as its value: every
/// long option of `run`/`create` written without `=` does, but for the boolean ones.
fn takes_value(flag: &str) -> bool {
    const BOOLEAN: &[&str] = &[
        "-d",
        "--detach",
        "-i",
        "--interactive",
        "-t",
        "--tty",
        "--rm",
        "--privileged",
        "--read-only",
        "--init",
        "--replace",
        "--no-hosts",
        "--no-healthcheck",
        "--oom-kill-disable",
        "-P",
        "--publish-all",
        "--read-only-tmpfs",
        "--rmi",
        "--sig-proxy",
        "--systemd",
        "-q",
        "--quiet",
        "--http-proxy",
        "--env-host",
        "--passwd",
    ];
    if !flag.starts_with('-') || flag.contains('=') || BOOLEAN.contains(&flag) {
        return false;
    }
    // Clusters of short boolean flags (`-it`).
    if !flag.starts_with("--") && flag.len() > 2 {
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn the_create_arguments_are_read_off_a_recorded_run() {
        let cmd = v(&[
            "podman",
            "--root",
            "/r",
            "--cgroup-manager",
            "cgroupfs",
            "run",
            "-d",
            "--name",
            "svc",
            "--network",
            "lan",
            "--ip",
            "10.77.0.5",
            "--rm",
            "img:1",
            "/service",
            "-d",
            "--listen",
            "x",
        ]);
        assert_eq!(
            create_args(&cmd).expect("args"),
            v(&[
                "--name",
                "svc",
                "--network",
                "lan",
                "--ip",
                "10.77.0.5",
                "--rm",
                "img:1",
                "/service",
                "-d",
                "--listen",
                "x"
            ])
        );
        let cmd = v(&[
            "podman",
            "create",
            "--annotation=org.criu.config=/dev/shm/t/m1/criu-lazy.conf",
            "--name=a",
            "img",
        ]);
        assert_eq!(create_args(&cmd).expect("args"), v(&["--name=a", "img"]));
        let cmd = v(&["podman", "container", "create", "-dit", "--name=a", "img"]);
        assert_eq!(
            create_args(&cmd).expect("args"),
            v(&["-it", "--name=a", "img"])
        );
        assert_eq!(create_args(&v(&["podman", "ps"])), None);
        assert_eq!(create_args(&v(&["podman"])), None);
    }

    #[test]
    fn podman_s_error_is_told_from_its_warnings() {
        let err = "time=\"x\" level=warning msg=\"Error validating CNI config\"\nError: no such container x\n";
        assert_eq!(error_of(err), "no such container x");
        assert_eq!(error_of("plain\n"), "plain");
    }

    #[test]
    fn inspect_output_is_read() {
        let out = r#"[{"Id":"abc","Name":"svc","State":{"Pid":42,"Running":true,"Paused":false},
            "Config":{"Tty":false,"CreateCommand":["podman","run","img"]},
            "HostConfig":{"LogConfig":{"Path":"/x/ctr.log"}},"OCIConfigPath":"/b/config.json",
            "Mounts":[{"Type":"bind","Source":"/srv","Destination":"/data"},{"Type":"volume","Name":"cache","Source":"/var/lib/v","Destination":"/v"}],
            "NetworkSettings":{"Networks":{"lan":{"IPAddress":"10.77.0.5","MacAddress":"02:00:00:00:00:05"}}}}]"#;
        let i = parse_inspect(out, "svc").expect("parse");
        assert_eq!((i.pid, i.running, i.tty), (42, true, false));
        assert_eq!(i.binds, vec![("/srv".to_string(), "/data".to_string())]);
        assert_eq!(i.volumes, vec!["cache".to_string()]);
        assert_eq!(i.mac.as_deref(), Some("02:00:00:00:00:05"));
        assert_eq!(i.addresses, vec!["10.77.0.5".to_string()]);
        assert_eq!(i.log_path, Some(PathBuf::from("/x/ctr.log")));
        assert!(parse_inspect("[]", "svc").is_err());
        assert!(parse_inspect("not json", "svc").is_err());
    }
}
