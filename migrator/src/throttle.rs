//! Auto-converge: cutting a tree's CPU time with a cgroup CPU quota while pre-copy runs, stepped
//! up round by round as QEMU's auto-converge does, and released before the final dump.
//!
//! The tree's processes move into a cgroup of their own (`tether-<migration id>`, CFS quota on
//! cgroup v1's `cpu` controller or `cpu.max` on a cgroup v2 root) and back to their original
//! cgroup on release, so that the dump records the cgroup they normally live in.

use std::path::{Path, PathBuf};

use crate::procmem::ProcId;

/// CFS period used for the quota: short enough that the service still answers within a period.
const PERIOD_US: u64 = 200_000;
/// The kernel's smallest quota per period.
const MIN_QUOTA_US: u64 = 1_000;
/// The kernel's longest period, used when a deep cut would need a quota under
/// [`MIN_QUOTA_US`] in a [`PERIOD_US`] period.
const MAX_PERIOD_US: u64 = 1_000_000;

/// Errors throttling.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ThrottleError {
    /// No CPU controller is usable here.
    #[error(
        "no usable cgroup CPU controller (looked at /sys/fs/cgroup/cpu and /sys/fs/cgroup/cpu.max)"
    )]
    NoController,
    /// A cgroup file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    V1,
    V2,
}

impl Version {
    /// The root of the CPU controller's hierarchy.
    fn root(self) -> PathBuf {
        PathBuf::from(match self {
            Version::V1 => "/sys/fs/cgroup/cpu",
            Version::V2 => "/sys/fs/cgroup",
        })
    }

    /// The cgroup of migration `name`'s throttle.
    fn dir(self, name: &str) -> PathBuf {
        self.root().join(format!("tether-{name}"))
    }

    /// Sets the CPU quota of cgroup `dir`: `quota` microseconds every `period`, or no limit
    /// (`None`).
    fn set_quota(self, dir: &Path, quota: Option<(u64, u64)>) -> Result<(), ThrottleError> {
        match (self, quota) {
            (Version::V1, Some((quota, period))) => {
                write(&dir.join("cpu.cfs_period_us"), &period.to_string())?;
                write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())
            }
            (Version::V1, None) => write(&dir.join("cpu.cfs_quota_us"), "-1"),
            (Version::V2, Some((quota, period))) => {
                write(&dir.join("cpu.max"), &format!("{quota} {period}"))
            }
            (Version::V2, None) => write(&dir.join("cpu.max"), "max"),
        }
    }
}

/// A throttled tree. Dropping it releases the throttle.
#[derive(Debug)]
pub struct Throttle {
    version: Version,
    dir: PathBuf,
    moved: Vec<(i32, PathBuf)>,
    /// CPUs' worth of time the tree used when the throttle began: a cut of p% leaves it
    /// (100 - p)% of that, as QEMU's throttle leaves a vCPU (100 - p)% of its time.
    usage: f64,
}

/// CPU time (user + system) of the processes so far, seconds.
pub fn cpu_seconds(procs: &[ProcId]) -> f64 {
    // Clock ticks per second; Linux reports 100 in /proc regardless of CONFIG_HZ.
    const TICKS: f64 = 100.0;
    procs
        .iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{}/stat", p.host)).ok())
        .filter_map(|stat| {
            let rest = stat.get(stat.rfind(')')? + 2..)?.to_string();
            let f: Vec<&str> = rest.split_whitespace().collect();
            // Fields 14 and 15 (utime, stime) are the 12th and 13th after the command name.
            let u: f64 = f.get(11)?.parse().ok()?;
            let s: f64 = f.get(12)?.parse().ok()?;
            Some((u + s) / TICKS)
        })
        .sum()
}

/// Measures how many CPUs' worth of time the processes use, over `window`.
pub fn cpu_usage(procs: &[ProcId], window: std::time::Duration) -> f64 {
    let a = cpu_seconds(procs);
    std::thread::sleep(window);
    let b = cpu_seconds(procs);
    ((b - a) / window.as_secs_f64()).max(0.0)
}

fn write(path: &Path, value: &str) -> Result<(), ThrottleError> {
    std::fs::write(path, value).map_err(|source| ThrottleError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The cgroup directory of `pid` for the CPU controller of `version`.
fn cgroup_of(pid: i32, version: Version, root: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = match version {
            Version::V1 => ctrls.split(',').any(|c| c == "cpu"),
            Version::V2 => ctrls.is_empty(),
        };
        matches.then(|| root.join(path.trim_start_matches('/')))
    })
}

/// The CFS quota and period (microseconds) that leave `(100 - percent)`% of `usage` CPUs' worth
/// of time. Where the quota would fall under the kernel's 1 ms minimum, the period grows instead
/// (up to 1 s), so that a deep cut of a light process is still the cut asked for: with the quota
/// pinned at 1 ms per 200 ms, a process using 0.15 CPUs cut by 99% kept 3% of its time.
pub fn quota_period_us(percent: u8, usage: f64) -> (u64, u64) {
    let keep = f64::from(100 - percent.min(99)) / 100.0;
    let share = usage * keep;
    let quota = (PERIOD_US as f64 * share) as u64;
    if quota >= MIN_QUOTA_US {
        return (quota, PERIOD_US);
    }
    let period = (MIN_QUOTA_US as f64 / share.max(1e-9)) as u64;
    (MIN_QUOTA_US, period.clamp(PERIOD_US, MAX_PERIOD_US))
}

impl Throttle {
    /// Moves `procs` into a new cgroup named after `name` and cuts their CPU time by `percent`
    /// of `usage` (CPUs' worth of time they use, see [`cpu_usage`]).
    pub fn apply(
        procs: &[ProcId],
        name: &str,
        percent: u8,
        usage: f64,
    ) -> Result<Throttle, ThrottleError> {
        let version = if Version::V1.root().join("cpu.cfs_quota_us").exists() {
            Version::V1
        } else if std::fs::read_to_string(Version::V2.root().join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
        {
            Version::V2
        } else {
            return Err(ThrottleError::NoController);
        };
        let root = version.root();
        let dir = version.dir(name);
        std::fs::create_dir_all(&dir).map_err(|source| ThrottleError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut t = Throttle {
            version,
            dir,
            moved: Vec::new(),
            usage: usage.max(0.01),
        };
        t.set(percent)?;
        for p in procs {
            let Some(orig) = cgroup_of(p.host, version, &root) else {
                continue;
            };
            // A process that exited meanwhile is fine to miss.
            if write(&t.dir.join("cgroup.procs"), &p.host.to_string()).is_ok() {
                t.moved.push((p.host, orig));
            }
        }
        Ok(t)
    }

    /// Changes the cut to `percent`.
    pub fn set(&mut self, percent: u8) -> Result<(), ThrottleError> {
        let quota = quota_period_us(percent, self.usage);
        self.version.set_quota(&self.dir, Some(quota))
    }

    fn release_inner(&mut self) {
        for (pid, orig) in self.moved.drain(..) {
            if let Err(e) = write(&orig.join("cgroup.procs"), &pid.to_string()) {
                if Path::new(&format!("/proc/{pid}")).exists() {
                    tracing::error!("cannot return pid {pid} to its cgroup: {e}");
                }
            }
        }
        if self.dir.exists() {
            if let Err(e) = std::fs::remove_dir(&self.dir) {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }

    /// Ends the throttle: the processes return to their cgroups at full speed.
    pub fn release(mut self) {
        self.release_inner();
    }
}

/// Lifts the throttle of migration `name` that a `tether migrate` which died left behind: its
/// processes stay in the throttle's cgroup (their original cgroups died with the migrator's
/// memory) but get their whole CPU back. Nothing to do if there is no such cgroup.
pub fn release_leftover(name: &str) {
    for version in [Version::V1, Version::V2] {
        let dir = version.dir(name);
        if !dir.is_dir() {
            continue;
        }
        match version.set_quota(&dir, None) {
            Ok(()) => tracing::warn!(
                "lifted the CPU throttle an earlier `tether migrate` left in {}",
                dir.display()
            ),
            Err(e) => tracing::error!("cannot lift the throttle in {}: {e}", dir.display()),
        }
        // Empty (every process gone) it can go.
        let _ = std::fs::remove_dir(&dir);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.release_inner();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_steps() {
        assert_eq!(quota_period_us(20, 1.0), (160_000, 200_000));
        assert_eq!(quota_period_us(50, 2.0), (200_000, 200_000));
        assert_eq!(quota_period_us(50, 0.5), (50_000, 200_000));
        assert_eq!(quota_period_us(99, 1.0), (2_000, 200_000));
    }

    #[test]
    fn deep_cuts_of_light_processes_lengthen_the_period() {
        // 0.15 CPUs cut by 99%: 0.0015 CPUs = 1 ms every 666 ms.
        assert_eq!(quota_period_us(99, 0.15), (1_000, 666_666));
        // Deeper than 1 ms per second cannot be asked of the kernel.
        assert_eq!(quota_period_us(99, 0.01), (1_000, 1_000_000));
        assert_eq!(
            quota_period_us(100, 0.0),
            (1_000, 1_000_000),
            "never below 1 ms per 1 s"
        );
    }
}
