//! Running code of the current process inside another network namespace.

use std::fs::File;
use std::path::Path;

use anyhow::Context;
use nix::sched::{setns, CloneFlags};

/// Runs `f` on a new thread that first joins the network namespace at `netns_path` (e.g.
/// `/run/netns/NAME`), and returns its result.
///
/// `setns(2)` on that thread does not affect any other thread of the process. Sockets created by
/// `f` belong to that namespace for their whole life, so a listener or stream returned by `f` can
/// be used from any thread afterwards. A panic in `f` is propagated to the caller.
pub fn in_netns<T, F>(netns_path: &Path, f: F) -> anyhow::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name("testbed-netns".into())
            .spawn_scoped(scope, move || -> anyhow::Result<T> {
                let ns = File::open(netns_path)
                    .with_context(|| format!("cannot open {}", netns_path.display()))?;
                setns(&ns, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns({})", netns_path.display()))?;
                drop(ns);
                Ok(f())
            })
            .context("cannot spawn a thread")?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
