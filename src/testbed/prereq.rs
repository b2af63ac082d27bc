//! Checks that the machine can run the test bed and CRIU.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::names::{netns_path, next_prefix, PROBE_SUFFIX};
use super::process::run_checked;

/// Tools the test bed and tether need on `PATH`.
const TOOLS: [&str; 5] = ["ip", "tc", "nsenter", "unshare", "nft"];
/// Where `scripts/setup.sh` installs CRIU; preferred over `PATH`.
const CRIU_PREFERRED: &str = "/usr/local/sbin/criu";
/// Oldest CRIU that dumps TCP sockets on our kernels.
const CRIU_MIN: (u32, u32) = (4, 2);

static RESULT: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// Checks, once per process (the result is cached), that this machine can run the test bed:
/// effective uid 0; `ip`, `tc`, `nsenter`, `unshare` and `nft` on `PATH`; that network
/// namespaces, bridges, veth pairs and `tbf` can be created; and that a CRIU >= 4.2 whose
/// `criu check` passes exists (`/usr/local/sbin/criu`, else `criu` on `PATH`).
///
/// The error lists every missing piece, one per line.
pub fn require_prerequisites() -> Result<(), String> {
    RESULT
        .get_or_init(check)
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

/// The working CRIU found by [`require_prerequisites`] (which this runs if needed), or `None` if
/// the prerequisites are not met.
pub fn criu_path() -> Option<&'static Path> {
    RESULT
        .get_or_init(check)
        .as_ref()
        .ok()
        .map(PathBuf::as_path)
}

/// Panics with a clear message if [`require_prerequisites`] fails. Tests that need root and CRIU
/// call this first, so that they fail (not skip) on a machine that is not set up.
///
/// # Panics
///
/// When a prerequisite is missing; the message lists them and says to run `scripts/setup.sh`.
#[track_caller]
pub fn prerequisites_or_fail() {
    if let Err(missing) = require_prerequisites() {
        panic!(
            "the tether test bed cannot run on this machine:\n{missing}\n\
             Run `scripts/setup.sh` as root (e.g. `sudo scripts/setup.sh`) to install what is \
             missing, and run the tests as root."
        );
    }
}

fn check() -> Result<PathBuf, String> {
    let mut missing = Vec::new();
    let root = nix::unistd::geteuid().is_root();
    if !root {
        missing.push(format!(
            "not running as root (effective uid {})",
            nix::unistd::geteuid()
        ));
    }
    for tool in TOOLS {
        if find_in_path(tool).is_none() {
            missing.push(format!("`{tool}` not found on PATH"));
        }
    }
    let has = |tool| find_in_path(tool).is_some();
    if root && has("ip") && has("tc") {
        if let Err(e) = probe_netns() {
            missing.push(format!(
                "cannot create network namespaces, bridges, veth pairs or tbf qdiscs: {e:#}"
            ));
        }
    }
    let criu = if root {
        match find_criu() {
            Ok(path) => Some(path),
            Err(e) => {
                missing.push(e);
                None
            }
        }
    } else {
        missing.push("CRIU not checked (`criu check` needs root)".to_owned());
        None
    };
    match criu {
        Some(path) if missing.is_empty() => Ok(path),
        _ => Err(missing
            .iter()
            .map(|m| format!("  - {m}"))
            .collect::<Vec<_>>()
            .join("\n")),
    }
}

/// An executable named `name` in a directory of `PATH`.
fn find_in_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Creates a namespace with a bridge, a veth pair and a tbf qdisc, then deletes it.
fn probe_netns() -> anyhow::Result<()> {
    let name = format!("{}{PROBE_SUFFIX}", next_prefix()?);
    let ip = |args: &[&str]| {
        let mut cmd = Command::new("ip");
        cmd.args(args);
        run_checked(cmd)
    };
    ip(&["netns", "add", &name])?;
    let result = (|| -> anyhow::Result<()> {
        ip(&["-n", &name, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n", &name, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
        ])?;
        let mut tc = Command::new("tc");
        tc.args(["-n", &name, "qdisc", "add", "dev", "v0", "root", "tbf"])
            .args(["rate", "1mbit", "burst", "32768", "latency", "50ms"]);
        run_checked(tc)?;
        Ok(())
    })();
    let deleted = ip(&["netns", "del", &name]);
    result?;
    deleted?;
    if netns_path(&name).exists() {
        anyhow::bail!("{} still exists after `ip netns del`", name);
    }
    Ok(())
}

/// Parses `Version: 4.2.1` (or `Version: 4.2`) out of `criu --version`.
pub(crate) fn parse_criu_version(text: &str) -> Option<(u32, u32, u32)> {
    let line = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// The first CRIU among `/usr/local/sbin/criu` and `criu` on `PATH` that is new enough and
/// passes `criu check`.
fn find_criu() -> Result<PathBuf, String> {
    let mut candidates = Vec::new();
    if Path::new(CRIU_PREFERRED).exists() {
        candidates.push(PathBuf::from(CRIU_PREFERRED));
    }
    if let Some(p) = find_in_path("criu") {
        if !candidates.contains(&p) {
            candidates.push(p);
        }
    }
    if candidates.is_empty() {
        return Err(format!(
            "no CRIU found (neither {CRIU_PREFERRED} nor `criu` on PATH); \
             need CRIU >= {}.{}",
            CRIU_MIN.0, CRIU_MIN.1
        ));
    }
    let mut problems = Vec::new();
    for criu in candidates {
        let out = Command::new(&criu)
            .arg("--version")
            .stdin(Stdio::null())
            .output();
        let version = match out {
            Ok(out) => parse_criu_version(&String::from_utf8_lossy(&out.stdout)),
            Err(e) => {
                problems.push(format!("{}: cannot run: {e}", criu.display()));
                continue;
            }
        };
        let Some((major, minor, patch)) = version else {
            problems.push(format!("{}: cannot parse `--version`", criu.display()));
            continue;
        };
        if (major, minor) < CRIU_MIN {
            problems.push(format!(
                "{} is CRIU {major}.{minor}.{patch}, need >= {}.{}",
                criu.display(),
                CRIU_MIN.0,
                CRIU_MIN.1
            ));
            continue;
        }
        let mut check = Command::new(&criu);
        check.arg("check");
        match run_checked(check) {
            Ok(_) => return Ok(criu),
            Err(e) => problems.push(format!(
                "{} (CRIU {major}.{minor}.{patch}) fails `criu check`: {e:#}",
                criu.display()
            )),
        }
    }
    Err(format!("no working CRIU: {}", problems.join("; ")))
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn criu_versions_parse() {
        assert_eq!(parse_criu_version("Version: 4.2.1\n"), Some((4, 2, 1)));
        assert_eq!(
            parse_criu_version("Version: 3.17\nGitID: v3.17\n"),
            Some((3, 17, 0))
        );
        assert_eq!(parse_criu_version("Version: 4.10-rc1\n"), Some((4, 10, 0)));
        assert_eq!(parse_criu_version("criu: bad option"), None);
        assert!((4, 1) < CRIU_MIN && (4, 2) >= CRIU_MIN && (5, 0) >= CRIU_MIN);
    }
}
