//! This process's peak memory and that of its largest child: what a migration cost the host
//! beyond the service (`tether migrate` itself, and CRIU's worker, which it spawns).

/// Peak resident memory of this process so far (`VmHWM`), bytes; 0 where `/proc` does not say.
pub fn own_peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_vm_hwm(&s))
        .unwrap_or(0)
}

/// Peak resident memory of the largest child this process has waited for (`ru_maxrss` of
/// `RUSAGE_CHILDREN`), bytes; 0 before any.
pub fn children_peak_rss() -> u64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map(|u| u64::try_from(u.max_rss()).unwrap_or(0) * 1024)
        .unwrap_or(0)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_peak_of_this_process_and_of_a_waited_child() {
        assert_eq!(parse_vm_hwm("Name:\tx\nVmHWM:\t  2048 kB\n"), Some(2 << 20));
        assert_eq!(parse_vm_hwm("Name:\tx\n"), None);
        assert!(own_peak_rss() > 0, "a running test has resident memory");
        let ok = std::process::Command::new("true")
            .status()
            .expect("true runs");
        assert!(ok.success());
        assert!(
            children_peak_rss() > 0,
            "the waited child had resident memory"
        );
    }
}
