//! Unique, short names for the namespaces of a topology, and removal of stale ones.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::process::{kill_processes_in_netns, netns_id, run_checked};
use super::report_problem;

/// Longest namespace name we create (the interface-name limit, kept for namespaces too so that
/// names can be reused as interface or nftables names by callers).
pub(crate) const MAX_NAME_LEN: usize = 15;

/// Where `ip netns add` puts its namespace files.
pub(crate) const NETNS_DIR: &str = "/run/netns";

/// Suffix of the `lan` namespace holding the bridge.
pub(crate) const LAN_SUFFIX: &str = "lan";
/// Suffix of the short-lived namespace the prerequisite probe creates.
pub(crate) const PROBE_SUFFIX: &str = "chk";
/// Every suffix a namespace of ours can carry (hosts, lan, probe); all three characters long.
const SUFFIXES: [&str; 6] = ["cli", "src", "dst", "prx", LAN_SUFFIX, PROBE_SUFFIX];
const SUFFIX_LEN: usize = 3;
/// Fixed characters of a prefix: "tt" and the "x" between pid and counter.
const PREFIX_FIXED_LEN: usize = 3;

static COUNTER: AtomicU64 = AtomicU64::new(0);
static STALE_CLEANUP: OnceLock<()> = OnceLock::new();

/// Number of base-36 counter digits that fit in a name for a pid with `pid_len` decimal digits.
fn counter_digits(pid_len: usize) -> u32 {
    let free = MAX_NAME_LEN.saturating_sub(PREFIX_FIXED_LEN + SUFFIX_LEN + pid_len);
    // At least one digit; u32 conversion cannot fail for such small numbers.
    u32::try_from(free.max(1)).unwrap_or(1)
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// The prefix `tt<pid>x<counter>` for a pid and a counter value. The counter wraps so that
/// `<prefix><suffix>` stays within [`MAX_NAME_LEN`] characters (at least 36^2 = 1296 distinct
/// prefixes per process even with a 7-digit pid; 36^4 with the usual 5-digit pids).
pub(crate) fn format_prefix(pid: u32, counter: u64) -> String {
    let pid_s = pid.to_string();
    let modulus = 36u64.saturating_pow(counter_digits(pid_s.len()));
    format!("tt{pid_s}x{}", base36(counter % modulus))
}

/// Splits a namespace name made by [`format_prefix`] + suffix into (creator pid, prefix,
/// suffix), or `None` if it is not one of ours.
pub(crate) fn parse_name(name: &str) -> Option<(u32, &str, &str)> {
    if name.len() < PREFIX_FIXED_LEN + SUFFIX_LEN + 2 || !name.is_ascii() {
        return None;
    }
    let (prefix, suffix) = name.split_at(name.len() - SUFFIX_LEN);
    if !SUFFIXES.contains(&suffix) {
        return None;
    }
    let rest = prefix.strip_prefix("tt")?;
    let (pid, counter) = rest.split_once('x')?;
    if pid.is_empty()
        || !pid.bytes().all(|b| b.is_ascii_digit())
        || counter.is_empty()
        || !counter
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
    {
        return None;
    }
    Some((pid.parse().ok()?, prefix, suffix))
}

/// `/run/netns/<name>`.
pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// The work directory a topology with this prefix uses.
pub(crate) fn work_dir_for(prefix: &str) -> PathBuf {
    std::env::temp_dir().join(format!("tether-{prefix}"))
}

/// A fresh prefix, unused by any namespace on the machine. The first call in a process first
/// removes stale topologies (including those left by an earlier process with the same pid).
pub(crate) fn next_prefix() -> anyhow::Result<String> {
    STALE_CLEANUP.get_or_init(|| {
        remove_stale(true);
    });
    let pid = std::process::id();
    for _ in 0..10_000 {
        let prefix = format_prefix(pid, COUNTER.fetch_add(1, Ordering::Relaxed));
        let taken = SUFFIXES
            .iter()
            .any(|s| netns_path(&format!("{prefix}{s}")).exists());
        if !taken {
            return Ok(prefix);
        }
    }
    anyhow::bail!("no free namespace prefix for pid {pid} (too many live topologies?)")
}

/// Removes the namespaces of topologies whose creating process no longer exists (left behind by
/// a test process that was killed or aborted): kills the processes inside them, deletes the
/// namespaces and their work directories. Returns the number of namespaces removed.
///
/// A namespace is considered stale only if no process with its creator's pid exists, so a live
/// topology of another process is never touched (a reused pid merely delays the cleanup). Called
/// automatically, once per process, before the first topology is built.
pub fn remove_stale_topologies() -> usize {
    remove_stale(false)
}

fn remove_stale(include_own_pid: bool) -> usize {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return 0;
    };
    let stale: Vec<(String, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|name| {
            let (pid, prefix, _) = parse_name(&name)?;
            let dead = if pid == me {
                include_own_pid
            } else {
                !Path::new(&format!("/proc/{pid}")).exists()
            };
            let prefix = prefix.to_owned();
            dead.then_some((name, prefix))
        })
        .collect();
    if stale.is_empty() {
        return 0;
    }
    let ids: Vec<_> = stale
        .iter()
        .filter_map(|(name, _)| netns_id(&netns_path(name)).ok())
        .collect();
    let survivors = kill_processes_in_netns(&ids);
    if !survivors.is_empty() {
        report_problem(&format!(
            "stale topology cleanup: processes {survivors:?} survived SIGKILL"
        ));
    }
    let mut removed = 0;
    for (name, prefix) in &stale {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "del", name]);
        match run_checked(cmd) {
            Ok(_) => removed += 1,
            // Another process may be cleaning up the same namespace concurrently.
            Err(e) if !netns_path(name).exists() => {
                tracing::debug!("stale namespace {name} vanished: {e:#}");
            }
            Err(e) => report_problem(&format!("cannot delete stale namespace {name}: {e:#}")),
        }
        let dir = work_dir_for(prefix);
        if dir.exists() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                report_problem(&format!("cannot remove {}: {e}", dir.display()));
            }
        }
    }
    if removed > 0 {
        tracing::info!("removed {removed} stale test-bed namespaces");
    }
    removed
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn base36_digits() {
        assert_eq!(base36(0), "0");
        assert_eq!(base36(35), "z");
        assert_eq!(base36(36), "10");
        assert_eq!(base36(36 * 36 - 1), "zz");
    }

    #[test]
    fn names_fit_in_15_chars_for_any_pid_and_counter() {
        for pid in [1u32, 99, 32_768, 99_999, 4_194_304] {
            for counter in [0u64, 1, 35, 36, 1295, 1296, 46_655, 1_679_615, u64::MAX] {
                let prefix = format_prefix(pid, counter);
                for suffix in SUFFIXES {
                    let name = format!("{prefix}{suffix}");
                    assert!(name.len() <= MAX_NAME_LEN, "{name} too long");
                    let (p, pre, suf) = parse_name(&name).expect("own name parses");
                    assert_eq!((p, pre, suf), (pid, prefix.as_str(), suffix));
                }
            }
        }
    }

    #[test]
    fn prefixes_are_distinct_across_pids_and_counters() {
        let mut seen = std::collections::HashSet::new();
        for pid in [1u32, 11, 12, 111, 4_194_304] {
            for counter in 0..2000u64 {
                let prefix = format_prefix(pid, counter);
                // 7-digit pids wrap after 1296 prefixes; everything else must be distinct.
                if pid < 1_000_000 || counter < 1296 {
                    assert!(seen.insert(prefix.clone()), "duplicate {prefix}");
                }
            }
        }
    }

    #[test]
    fn foreign_names_are_not_parsed() {
        for name in [
            "",
            "src",
            "ttsrc",
            "tt1src",
            "ttx1src",
            "tt1xsrc",
            "tt1x1foo",
            "tt1a1src",
            "tt1xA1src",
            "xx1x1src",
            "myns",
            "tt12x1SRC",
        ] {
            assert!(parse_name(name).is_none(), "{name} parsed");
        }
        assert_eq!(parse_name("tt42xz1lan"), Some((42, "tt42xz1", "lan")));
    }
}
