//! Processes in hosts: guards that kill them, and the `/proc` scanning used to find and kill
//! every process of a namespace.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::report_problem;

/// Identity of a namespace: device and inode of its nsfs file.
pub(crate) type NsId = (u64, u64);

/// How long [`ServiceProcess`] creation waits for the service process to appear and exec.
const SERVICE_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a guard waits for a launcher to exit after its service was killed.
const LAUNCHER_REAP_TIMEOUT: Duration = Duration::from_secs(3);
/// How long namespace cleanup keeps killing processes that are still in a namespace.
const NETNS_KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long namespace cleanup waits to reap the processes it killed.
const REAP_TIMEOUT: Duration = Duration::from_secs(1);
/// Default SIGTERM-to-SIGKILL grace period of a [`HostProcess`].
const DEFAULT_GRACE: Duration = Duration::from_secs(2);

/// Sets close-on-exec on every descriptor >= 3 of this process that lacks it, so that children
/// spawned afterwards inherit only stdin, stdout and stderr. Returns how many were changed.
///
/// Descriptors without the flag are normally inherited ones (a shell's or a jobserver's pipes)
/// or made by raw APIs such as `nix::unistd::pipe`; std and tokio open everything close-on-exec.
/// A service must not inherit them: CRIU cannot dump a descriptor shared with a process outside
/// the dumped tree. [`Topology::spawn_service`](super::Topology::spawn_service) and
/// [`Topology::spawn`](super::Topology::spawn) call this before spawning; call it yourself before
/// spawning a service from a [`Topology::command`](super::Topology::command). Do not use it in a
/// process that deliberately passes a descriptor without close-on-exec to a child it spawns
/// concurrently.
pub fn set_cloexec_on_inherited_fds() -> usize {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    // Collect first: the directory handle itself is a descriptor (opened close-on-exec).
    let fds: Vec<i32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    let mut changed = 0;
    for fd in fds {
        let Ok(bits) = fcntl(fd, FcntlArg::F_GETFD) else {
            continue; // closed meanwhile (e.g. the read_dir handle)
        };
        let flags = FdFlag::from_bits_truncate(bits);
        if !flags.contains(FdFlag::FD_CLOEXEC)
            && fcntl(fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC)).is_ok()
        {
            changed += 1;
        }
    }
    if changed > 0 {
        tracing::debug!("set close-on-exec on {changed} inherited descriptors");
    }
    changed
}

/// Runs a command to completion with stdin from `/dev/null` and returns its stdout, or an error
/// carrying the command line, exit status and stderr.
pub(crate) fn run_checked(mut cmd: Command) -> anyhow::Result<String> {
    cmd.stdin(Stdio::null());
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The identity of the namespace a namespace file (`/run/netns/NAME`, `/proc/PID/ns/net`) refers
/// to.
pub(crate) fn netns_id(path: &Path) -> std::io::Result<NsId> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// State letter and start time (clock ticks since boot) of a process, from `/proc/PID/stat`.
pub(crate) fn proc_state_and_start(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses state and start time out of the text of `/proc/PID/stat`. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); starttime is field 22.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

/// Parent pid of a process, from `/proc/PID/stat`.
fn proc_ppid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The first child of `pid` (which must be single-threaded), from
/// `/proc/PID/task/PID/children`, or from a `/proc` scan if the kernel lacks that file.
fn first_child(pid: u32) -> Option<u32> {
    match std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
        Ok(text) => text.split_whitespace().next()?.parse().ok(),
        Err(_) => std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|&p| proc_ppid(p) == Some(pid)),
    }
}

fn to_pid(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().map(Pid::from_raw)
}

/// Sends a signal; a process that is already gone is not an error.
fn signal(pid: u32, sig: Signal) {
    let Some(p) = to_pid(pid) else { return };
    match kill(p, sig) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => report_problem(&format!("kill({pid}, {sig}): {e}")),
    }
}

/// Pids (other than our own) of which some thread is in one of the namespaces.
fn pids_in_netns(ids: &[NsId]) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let in_ns = |path: PathBuf| netns_id(&path).is_ok_and(|id| ids.contains(&id));
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|&pid| {
            in_ns(PathBuf::from(format!("/proc/{pid}/ns/net")))
                || std::fs::read_dir(format!("/proc/{pid}/task")).is_ok_and(|tasks| {
                    tasks
                        .filter_map(|t| t.ok()?.file_name().into_string().ok())
                        .any(|tid| in_ns(PathBuf::from(format!("/proc/{pid}/task/{tid}/ns/net"))))
                })
        })
        .collect()
}

/// SIGKILLs every process with a thread in one of the namespaces until none is left (or a
/// deadline passes), then waits a little to reap those that are our children. Returns the pids
/// still found in the namespaces at the deadline (empty on success). Our own process is never
/// killed: a thread of ours inside the namespace only keeps it alive until it leaves.
pub(crate) fn kill_processes_in_netns(ids: &[NsId]) -> Vec<u32> {
    if ids.is_empty() {
        return Vec::new();
    }
    let deadline = Instant::now() + NETNS_KILL_TIMEOUT;
    let mut killed = BTreeSet::new();
    let mut survivors = Vec::new();
    loop {
        let found = pids_in_netns(ids);
        if found.is_empty() {
            break;
        }
        for &pid in &found {
            signal(pid, Signal::SIGKILL);
            killed.insert(pid);
        }
        if Instant::now() > deadline {
            survivors = found;
            break;
        }
        killed.retain(|&pid| try_reap(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
    let reap_deadline = Instant::now() + REAP_TIMEOUT;
    while !killed.is_empty() && Instant::now() < reap_deadline {
        killed.retain(|&pid| try_reap(pid));
        if !killed.is_empty() {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if !killed.is_empty() {
        tracing::debug!("killed children not reaped in time: {killed:?}");
    }
    survivors
}

/// Reaps `pid` if it is an exited child of ours. Returns true while it is worth trying again:
/// it is a live child of ours, or not our child but not dead yet (when its parent dies first it
/// is re-parented to us if we are a subreaper). False once reaped, or once it is gone or a
/// zombie of someone else.
fn try_reap(pid: u32) -> bool {
    let Some(p) = to_pid(pid) else { return false };
    match waitpid(p, Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => true,
        Ok(_) => false,
        Err(_) => proc_state_and_start(pid).is_some_and(|(state, _)| state != 'Z' && state != 'X'),
    }
}

/// Waits up to `timeout` for a child to exit. `Ok(Some)` when it exited (or was reaped by
/// someone else, reported as `None` inside), `Err(())` on timeout.
fn wait_child(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>, ()> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(Some(status)),
            // ECHILD: reaped elsewhere (e.g. by a topology's cleanup).
            Err(_) => return Ok(None),
            Ok(None) if Instant::now() >= deadline => return Err(()),
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Kills an un-reaped child with SIGKILL and reaps it. Only called after `try_wait` said it is
/// still our un-reaped child, so its pid cannot have been reused.
fn kill_and_reap(child: &mut Child) -> Option<ExitStatus> {
    if let Err(e) = child.kill() {
        tracing::debug!("kill({}): {e}", child.id());
    }
    child.wait().ok()
}

/// A migratable service started by [`Topology::spawn_service`](super::Topology::spawn_service):
/// PID 1 of its own PID namespace, inside a host's network namespace, child of an `unshare`
/// launcher that is our child.
///
/// Dropping it SIGKILLs the service if the process with [`pid`](Self::pid) is still the one that
/// was started (same start time; SIGTERM would be ignored by a PID 1 without a handler), then
/// reaps the launcher. A service that was migrated away, killed or reaped by someone else is
/// fine; a restored copy of it under another pid is not touched (the topology kills it).
#[derive(Debug)]
pub struct ServiceProcess {
    launcher: Child,
    pid: u32,
    start_time: u64,
    log: Option<PathBuf>,
}

impl ServiceProcess {
    /// Spawns `cmd` (an `nsenter ... unshare --pid --fork -- program` command with stdio already
    /// set), finds the service process (the launcher's child) and waits until it has exec'd.
    pub(crate) fn start(mut cmd: Command, log: Option<&Path>) -> anyhow::Result<Self> {
        let see_log = log
            .map(|l| format!(" (see {})", l.display()))
            .unwrap_or_default();
        let mut launcher = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {cmd:?}"))?;
        let lpid = launcher.id();
        let deadline = Instant::now() + SERVICE_START_TIMEOUT;
        let (pid, start_time) = loop {
            match launcher.try_wait() {
                Ok(Some(status)) => {
                    bail!("{cmd:?} exited ({status}) before the service started{see_log}")
                }
                Ok(None) => {}
                Err(e) => bail!("cannot wait for {cmd:?}: {e}"),
            }
            if let Some(found) =
                first_child(lpid).and_then(|c| Some((c, proc_state_and_start(c)?.1)))
            {
                break found;
            }
            if Instant::now() > deadline {
                let _ = kill_and_reap(&mut launcher);
                bail!("{cmd:?}: no service process appeared within {SERVICE_START_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // From here on, dropping `svc` cleans up.
        let mut svc = ServiceProcess {
            launcher,
            pid,
            start_time,
            log: log.map(Path::to_path_buf),
        };
        // The child first runs `unshare` code, then execs the program: wait for the exec so that
        // callers inspecting /proc/PID (or dumping it) see the service itself.
        let launcher_exe = std::fs::read_link(format!("/proc/{lpid}/exe")).ok();
        // `unshare` execs `setsid`, which execs the program.
        let setsid_exe = which("setsid");
        loop {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
            if exe.is_some() && exe != launcher_exe && exe != setsid_exe {
                break;
            }
            match svc.launcher.try_wait() {
                Ok(Some(status)) => {
                    bail!("{cmd:?}: service exited right away (launcher: {status}){see_log}")
                }
                Ok(None) => {}
                Err(e) => bail!("cannot wait for {cmd:?}: {e}"),
            }
            if !svc.is_running() {
                bail!("{cmd:?}: service exited right away{see_log}");
            }
            if Instant::now() > deadline {
                // E.g. the program is `unshare` itself; the pid is right anyway.
                tracing::debug!("{cmd:?}: cannot tell whether pid {pid} has exec'd yet");
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(svc)
    }

    /// The service's pid in the machine's (our) PID namespace. Inside its own PID namespace it is
    /// PID 1.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The pid of the `unshare` launcher (our child; the service's parent).
    pub fn launcher_pid(&self) -> u32 {
        self.launcher.id()
    }

    /// The log file the service's stdout and stderr go to, if one was given.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// Whether the process started as this service still runs under [`pid`](Self::pid) (not
    /// exited, not a zombie, pid not reused). False after it was migrated away and killed.
    pub fn is_running(&self) -> bool {
        matches!(
            proc_state_and_start(self.pid),
            Some((state, start)) if start == self.start_time && state != 'Z' && state != 'X'
        )
    }

    /// Kills the service (SIGKILL) if it still runs here, and reaps the launcher. Idempotent;
    /// also done on drop. Returns the launcher's exit status if it was reaped here.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.is_running() {
            signal(self.pid, Signal::SIGKILL);
        }
        match wait_child(&mut self.launcher, LAUNCHER_REAP_TIMEOUT) {
            Ok(status) => status,
            Err(()) => {
                report_problem(&format!(
                    "launcher {} of service {} did not exit; killing it",
                    self.launcher.id(),
                    self.pid
                ));
                kill_and_reap(&mut self.launcher)
            }
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An ordinary long-running process in a host (an agent, a load client), started by
/// [`Topology::spawn`](super::Topology::spawn) or wrapped with [`HostProcess::spawn`].
///
/// Dropping it (or [`stop`](Self::stop)) sends SIGTERM, waits for a grace period (2 s unless
/// changed with [`with_grace`](Self::with_grace)), then sends SIGKILL, and reaps it.
#[derive(Debug)]
pub struct HostProcess {
    child: Child,
    grace: Duration,
}

impl HostProcess {
    /// Spawns a command (e.g. one from [`Topology::command`](super::Topology::command)) under a
    /// guard.
    pub fn spawn(cmd: &mut Command) -> anyhow::Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot spawn {cmd:?}"))?;
        Ok(Self::from_child(child))
    }

    /// Puts an already spawned child under a guard.
    pub fn from_child(child: Child) -> Self {
        HostProcess {
            child,
            grace: DEFAULT_GRACE,
        }
    }

    /// Sets the SIGTERM-to-SIGKILL grace period used by [`stop`](Self::stop) and drop.
    #[must_use]
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The process's pid (the program itself: `nsenter` execs it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The underlying child, e.g. to take its stdout. Do not `kill()` it after it may have been
    /// reaped by a topology's cleanup (std would signal the bare pid).
    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Checks without blocking whether the process has exited.
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Stops the process: SIGTERM, then SIGKILL after the grace period; reaps it. Returns its
    /// exit status if it was reaped here. Idempotent; also done on drop.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        match self.child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Err(_) => return None,
            Ok(None) => {}
        }
        // Still our un-reaped child: its pid cannot have been reused.
        signal(self.child.id(), Signal::SIGTERM);
        match wait_child(&mut self.child, self.grace) {
            Ok(status) => status,
            Err(()) => kill_and_reap(&mut self.child),
        }
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The resolved path of a program on PATH.
fn which(program: &str) -> Option<std::path::PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn stat_parsing_handles_odd_command_names() {
        let stat = "1234 (we ird) (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(parse_stat(stat), Some(('S', 987_654)));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (a) S 1 2"), None);
    }

    #[test]
    fn own_process_stat_is_readable() {
        let (state, start) = proc_state_and_start(std::process::id()).expect("own stat");
        assert!(state.is_ascii_uppercase(), "state {state}");
        assert!(start > 0);
    }

    #[test]
    fn host_process_guard_stops_a_plain_child() {
        let mut guard = HostProcess::spawn(Command::new("sleep").arg("30")).expect("spawn sleep");
        let pid = guard.pid();
        assert!(guard.try_wait().expect("try_wait").is_none());
        let status = guard.stop().expect("reaped here");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
        assert_ne!(proc_ppid(pid), Some(std::process::id()));
    }
}
