//! The [`Checkpointer`] for a process tree: CRIU over its RPC, with the tree's root named by its
//! pid (and start time, so that a later process reusing the pid is never taken for it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::lazy::LazyPages;
use super::{images, Criu, CriuError, DumpPoint as CriuPoint, DumpScope, DumpSession};
use crate::machine::agent::RestoreInfo;
use crate::machine::source::DumpEnd;
use crate::machine::PortError;
use crate::ports::{Checkpointer, Dump, DumpPoint, LazyServer};
use crate::protocol::stats::{CriuDumpStats, CriuRestoreStats};
use crate::protocol::ErrorCode;

fn criu_err(what: &str) -> impl FnOnce(CriuError) -> PortError + '_ {
    move |e| PortError::caused(ErrorCode::Checkpoint, what, e)
}

/// A process tree as the unit of migration, checkpointed and restored by CRIU.
#[derive(Debug, Clone)]
pub struct CriuTree {
    criu: Criu,
    /// The root on the source (0 on a destination that only restores).
    root: i32,
    root_start: Option<u64>,
    /// Restores here are lazy (userfaultfd).
    lazy: bool,
    /// What the dump leaves to the restorer (empty for a plain tree).
    scope: DumpScope,
}

impl CriuTree {
    /// The source side, for a tree whose root's start time was journaled.
    pub fn recorded(criu: Criu, root: i32, root_start: u64) -> CriuTree {
        CriuTree {
            criu,
            root,
            root_start: Some(root_start),
            lazy: false,
            scope: DumpScope::default(),
        }
    }

    /// The same tree, dumped with `scope` (a container's external resources).
    #[must_use]
    pub fn with_scope(mut self, scope: DumpScope) -> CriuTree {
        self.scope = scope;
        self
    }

    /// A destination that restores trees, lazily if `lazy`.
    pub fn destination(criu: Criu, lazy: bool) -> CriuTree {
        CriuTree {
            criu,
            root: 0,
            root_start: None,
            lazy,
            scope: DumpScope::default(),
        }
    }

    /// The root's start time (field 22 of its stat), if it runs.
    pub fn root_start(&self) -> Option<u64> {
        self.root_start
    }

    fn root_alive(&self) -> bool {
        self.root_start
            .is_some_and(|s| process_start_time(self.root) == Some(s))
    }
}

/// A dump of a process tree in progress.
#[derive(Debug)]
pub struct TreeDump {
    session: DumpSession,
    images: PathBuf,
    tree: CriuTree,
    worker: Option<(i32, u64)>,
}

impl Dump for TreeDump {
    async fn proceed(&mut self) -> Result<DumpPoint, PortError> {
        match self.session.next().await.map_err(criu_err("criu dump"))? {
            CriuPoint::PreFreeze => Ok(DumpPoint::PreFreeze),
            CriuPoint::Frozen => Ok(DumpPoint::Frozen),
            CriuPoint::Dumped => Ok(DumpPoint::Held),
        }
    }

    async fn answer_commit(&mut self) -> Result<(), PortError> {
        self.session
            .answer_commit()
            .await
            .map_err(criu_err("answering CRIU's post-dump"))
    }

    async fn commit(self) -> Result<DumpEnd, PortError> {
        let TreeDump {
            session,
            images,
            tree,
            ..
        } = self;
        let committed = session.commit().await;
        if let Err(e) = &committed {
            warn!("CRIU did not confirm the end of the tree: {e}");
        }
        // CRIU kills the tree after post-dump; make sure (a CRIU that failed after our answer
        // leaves it alive behind the source's lock).
        if tree.root_alive() {
            kill_tree(tree.root, tree.root_start);
            if !wait_gone(tree.root, tree.root_start, Duration::from_secs(2)).await {
                return Err(PortError::new(
                    ErrorCode::Checkpoint,
                    format!("the source copy (pid {}) could not be ended", tree.root),
                ));
            }
        }
        let stats = images::stats(&images.join("stats-dump"))
            .ok()
            .flatten()
            .and_then(|s| s.dump)
            .map(|s| CriuDumpStats {
                freezing_time_us: s.freezing_time,
                frozen_time_us: s.frozen_time,
                memdump_time_us: s.memdump_time,
                memwrite_time_us: s.memwrite_time,
                pages_scanned: s.pages_scanned,
                pages_written: s.pages_written,
            });
        Ok(DumpEnd { stats })
    }

    async fn rollback(self) -> Result<(), PortError> {
        self.session
            .rollback()
            .await
            .map_err(criu_err("CRIU's rollback"))
    }

    fn worker(&self) -> Option<(i32, u64)> {
        self.worker
    }
}

impl LazyServer for LazyPages {
    fn pid(&self) -> Option<(i32, u64)> {
        let pid = i32::try_from(LazyPages::pid(self)?).ok()?;
        process_start_time(pid).map(|s| (pid, s))
    }

    async fn ready(&mut self, within: Duration) -> Result<(), PortError> {
        LazyPages::ready(self, within)
            .await
            .map_err(criu_err("the lazy-pages daemon"))
    }

    fn detach(&mut self) {
        LazyPages::detach(self)
    }

    fn asks_for_pages(&self) -> bool {
        LazyPages::asks_for_pages(self)
    }

    fn serve(&mut self, store: crate::pagestore::PageStore) -> Result<(), PortError> {
        LazyPages::serve(self, store).map_err(criu_err("the lazy restore's page server"))
    }

    async fn wait(&mut self) -> Result<Duration, PortError> {
        LazyPages::wait(self)
            .await
            .map_err(criu_err("the lazy-pages daemon"))
    }
}

impl Checkpointer for CriuTree {
    type Dump = TreeDump;
    type Lazy = LazyPages;

    fn start_lazy(&self, images: &Path, from_store: bool) -> Result<Option<LazyPages>, PortError> {
        if !self.lazy {
            return Ok(None);
        }
        self.criu
            .start_lazy_pages(images, from_store)
            .map(Some)
            .map_err(criu_err("starting the lazy-pages daemon"))
    }

    fn root_pid(&self) -> i32 {
        self.root
    }

    async fn start_dump(&self, images: &Path) -> Result<TreeDump, PortError> {
        let worker = self.criu.worker().map_err(criu_err("starting criu swrk"))?;
        let wpid = worker
            .pid()
            .and_then(|p| i32::try_from(p).ok())
            .and_then(|p| process_start_time(p).map(|s| (p, s)));
        let mut session = self
            .criu
            .start_dump(worker, self.root, images, &self.scope)
            .await
            .map_err(criu_err("criu dump"))?;
        match session.next().await.map_err(criu_err("criu dump"))? {
            CriuPoint::PreFreeze => Ok(TreeDump {
                session,
                images: images.to_path_buf(),
                tree: self.clone(),
                worker: wpid,
            }),
            other => Err(PortError::new(
                ErrorCode::Checkpoint,
                format!("CRIU stopped at {other:?} before pre-dump"),
            )),
        }
    }

    async fn source_copy_exists(&self, worker: Option<(i32, u64)>) -> Result<bool, PortError> {
        if let Some((pid, start)) = worker {
            // CRIU thaws or ends the tree when it reads the dead migrator's EOF, then exits.
            if !wait_gone(pid, Some(start), Duration::from_secs(30)).await {
                return Err(PortError::new(
                    ErrorCode::Checkpoint,
                    format!("CRIU (pid {pid}) of this migration still runs after 30 s"),
                ));
            }
        }
        Ok(self.root_alive())
    }

    async fn kill_source_copy(&self) -> Result<(), PortError> {
        if !self.root_alive() {
            return Ok(());
        }
        kill_tree(self.root, self.root_start);
        if wait_gone(self.root, self.root_start, Duration::from_secs(2)).await {
            Ok(())
        } else {
            Err(PortError::new(
                ErrorCode::Checkpoint,
                format!("pid {} did not die", self.root),
            ))
        }
    }

    async fn restore_here(&self, images: &Path) -> Result<i32, PortError> {
        let r = self
            .criu
            .restore(images, false, false, |_| {})
            .await
            .map_err(criu_err("criu restore"))?;
        info!(pid = r.pid, "restored on this host from the image set");
        Ok(r.pid)
    }

    async fn restore_stopped(
        &self,
        images: &Path,
        lazy: bool,
        on_pid: impl FnOnce(i32) + Send + 'static,
    ) -> Result<RestoreInfo, PortError> {
        let r = self
            .criu
            .restore(images, lazy, true, on_pid)
            .await
            .map_err(criu_err("criu restore"))?;
        let mut stats = images::stats(&images.join("stats-restore"))
            .ok()
            .flatten()
            .and_then(|s| s.restore)
            .map(|r| CriuRestoreStats {
                forking_time_us: r.forking_time,
                restore_time_us: r.restore_time,
                pages_restored: r.pages_restored.unwrap_or(0),
                ..Default::default()
            })
            .unwrap_or_default();
        stats.lazy = lazy;
        Ok(RestoreInfo {
            pid: r.pid,
            criu_restore_ms: r.elapsed.as_secs_f64() * 1e3,
            stats: Some(stats),
            held_bytes: None,
        })
    }

    fn resume(&self, pid: i32) -> Result<(), PortError> {
        // CRIU stopped every process of the tree (SIGSTOP to each); continue each.
        let procs = crate::procmem::tree(pid)
            .map_err(|e| PortError::caused(ErrorCode::Checkpoint, "the restored tree", e))?;
        for p in procs {
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p.host),
                nix::sys::signal::Signal::SIGCONT,
            )
            .map_err(|e| {
                PortError::caused(ErrorCode::Checkpoint, &format!("SIGCONT to {}", p.host), e)
            })?;
        }
        Ok(())
    }

    fn kill(&self, pid: i32, start: u64) -> bool {
        kill_if_same(pid, start)
    }

    fn alive(&self, pid: i32, start: u64) -> bool {
        process_start_time(pid) == Some(start)
    }

    fn start_time(&self, pid: i32) -> Option<u64> {
        process_start_time(pid)
    }

    async fn restored_intact(
        &self,
        pid: i32,
        start: u64,
        lazy: Option<(i32, u64)>,
        served: Option<u64>,
        images: &Path,
    ) -> bool {
        if process_start_time(pid) != Some(start) {
            return false;
        }
        match lazy {
            None => true,
            Some((d, s)) if process_start_time(d) == Some(s) => true,
            // Served from the page store: the images hold holes where the lazy pages were, so
            // the memory cannot be compared with them; the page server's own account says
            // whether it served them all.
            Some(_) if let Some(expected) = served => match super::lazy::served_outcome(images) {
                Some(Ok(stats)) if stats.pages >= expected => {
                    info!(
                        pages = stats.pages,
                        expected, "the restored copy's memory was all served"
                    );
                    true
                }
                other => {
                    warn!(
                        ?other,
                        expected, "the restored copy's memory fill did not complete"
                    );
                    false
                }
            },
            // The daemon is gone: it finished filling the memory in, or died half-way (the
            // kernel then dropped the userfaultfd, and missing pages would read as zeros).
            // CRIU does not record which; the memory says.
            Some(_) => {
                let images = images.to_path_buf();
                let r =
                    tokio::task::spawn_blocking(move || verify_restored_memory(&images, pid)).await;
                match r {
                    Ok(Ok(v)) if v.missing == 0 => {
                        info!(
                            pages = v.pages,
                            differing = v.differing,
                            "the restored copy's memory is all in place"
                        );
                        true
                    }
                    Ok(Ok(v)) => {
                        warn!(
                            pages = v.pages,
                            missing = v.missing,
                            "the restored copy's memory is incomplete"
                        );
                        false
                    }
                    Ok(Err(e)) => {
                        warn!("cannot verify the restored copy's memory: {e}");
                        false
                    }
                    Err(e) => {
                        warn!("cannot verify the restored copy's memory: {e}");
                        false
                    }
                }
            }
        }
    }
}

/// What [`verify_restored_memory`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryCheck {
    /// Data pages of the image set compared.
    pub pages: u64,
    /// Pages whose memory differs from the image (CRIU's restorer writes a few, e.g. the
    /// signal frame on the stack, before the tree stops).
    pub differing: u64,
    /// Pages with data in the image that read as zeros (or cannot be read): never filled in.
    pub missing: u64,
}

/// Compares every data page of the image set in `images` with the memory of the restored tree
/// rooted at `root` (pages of private memory, by the pid each process has inside the tree's
/// PID namespace). A page a lazy-pages daemon never filled in reads as zeros once its
/// userfaultfd is gone: that is what `missing` counts.
pub fn verify_restored_memory(images: &Path, root: i32) -> Result<MemoryCheck, String> {
    use crate::criu::pages::{MemoryImages, Owner, PagesError};
    use std::collections::HashMap;
    let procs = crate::procmem::tree(root).map_err(|e| e.to_string())?;
    let host: HashMap<i32, i32> = procs.iter().map(|p| (p.ns, p.host)).collect();
    let maps = MemoryImages::load(images).map_err(|e| e.to_string())?;
    let mut check = MemoryCheck::default();
    let mut buf = vec![0u8; crate::protocol::PAGE];
    maps.for_each_page(|owner, vaddr, data| -> Result<(), PagesError> {
        let Owner::Pid(ns) = owner else {
            return Ok(());
        };
        check.pages += 1;
        let Some(&pid) = host.get(&ns) else {
            check.missing += 1;
            return Ok(());
        };
        let len = buf.len();
        let read = nix::sys::uio::process_vm_readv(
            nix::unistd::Pid::from_raw(pid),
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &[nix::sys::uio::RemoteIoVec {
                base: vaddr as usize,
                len,
            }],
        );
        if read.ok() != Some(len) {
            check.missing += 1;
        } else if buf.as_slice() != data.as_slice() {
            check.differing += 1;
            if crate::procmem::is_zero(&buf) && !crate::procmem::is_zero(data) {
                check.missing += 1;
            }
        }
        Ok(())
    })
    .map_err(|e| e.to_string())?;
    Ok(check)
}

/// Sends SIGKILL to `pid` if it is still the process that started at `start`; returns whether.
/// A restored tree's root is PID 1 of its PID namespace: the kernel kills the rest with it.
pub fn kill_if_same(pid: i32, start: u64) -> bool {
    process_start_time(pid) == Some(start)
        && nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .is_ok()
}

fn kill_tree(root: i32, start: Option<u64>) {
    let Some(start) = start else {
        return;
    };
    if process_start_time(root) != Some(start) {
        return;
    }
    let procs = crate::procmem::tree(root).unwrap_or_default();
    for p in procs.iter().rev() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.host),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    kill_if_same(root, start);
}

async fn wait_gone(pid: i32, start: Option<u64>, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        let alive = match start {
            Some(s) => process_start_time(pid) == Some(s),
            None => std::path::Path::new(&format!("/proc/{pid}")).exists(),
        };
        if !alive {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The start time of a process (field 22 of /proc/PID/stat), to tell it from a later process
/// that reuses its pid. A zombie counts as gone.
pub fn process_start_time(pid: i32) -> Option<u64> {
    if pid <= 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    if fields.next() == Some("Z") {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::pages::{pagemap_image, PagemapEntry, PE_PRESENT};
    use crate::protocol::PAGE;

    /// Writes a one-page image set for this process: `vaddr` with `data`.
    fn image(dir: &Path, ns_pid: i32, vaddr: u64, data: &[u8]) {
        let v = pagemap_image(
            1,
            &[PagemapEntry {
                vaddr,
                compat_nr_pages: 0,
                in_parent: None,
                flags: Some(PE_PRESENT),
                nr_pages: Some(1),
            }],
        );
        std::fs::write(dir.join(format!("pagemap-{ns_pid}.img")), v).expect("pagemap");
        std::fs::write(dir.join("pages-1.img"), data).expect("pages");
    }

    #[test]
    fn a_page_never_filled_in_is_told_from_one_the_restorer_wrote() {
        let me = std::process::id() as i32;
        let ns = crate::procmem::tree(me).expect("own tree")[0].ns;
        let mut buf = vec![0u8; 2 * PAGE];
        let off = buf.as_ptr().align_offset(PAGE);
        let page = &mut buf[off..off + PAGE];
        let vaddr = page.as_ptr() as u64;
        let dir = tempfile::tempdir().expect("tempdir");
        image(dir.path(), ns, vaddr, &[0xab; PAGE]);

        page.fill(0xab);
        let v = verify_restored_memory(dir.path(), me).expect("verify");
        assert_eq!((v.pages, v.differing, v.missing), (1, 0, 0));
        // Written since the dump (as CRIU's restorer writes the stack): different, not missing.
        page[0] = 0xcd;
        let v = verify_restored_memory(dir.path(), me).expect("verify");
        assert_eq!((v.pages, v.differing, v.missing), (1, 1, 0));
        // Never filled in: zeros where the image has data.
        page.fill(0);
        let v = verify_restored_memory(dir.path(), me).expect("verify");
        assert_eq!((v.pages, v.differing, v.missing), (1, 1, 1));
        std::hint::black_box(&buf);
    }

    /// A copy whose lazy pages came from the page store is whole once its daemon is gone only if
    /// the page server says it served them all: the images hold holes where they were.
    #[tokio::test]
    async fn a_served_copy_is_whole_only_if_its_server_served_every_page() {
        use crate::criu::pageserver::{encode_outcome, ServeError, ServeStats};
        let tree = CriuTree::destination(
            Criu {
                path: PathBuf::from("/nonexistent/criu"),
                log_level: 2,
            },
            true,
        );
        let me = std::process::id() as i32;
        let start = process_start_time(me).expect("own start time");
        let gone_daemon = Some((i32::MAX, 1));
        let dir = tempfile::tempdir().expect("tempdir");
        let intact = |served| tree.restored_intact(me, start, gone_daemon, served, dir.path());
        assert!(!intact(Some(10)).await, "no account from the server");
        let write = |o| {
            std::fs::write(
                dir.path().join(crate::criu::lazy::SERVED),
                encode_outcome(&o),
            )
            .expect("write outcome")
        };
        write(Ok(ServeStats {
            requests: 2,
            pages: 5,
        }));
        assert!(!intact(Some(10)).await, "5 of 10 pages served");
        write(Err((
            ServeError::Hangup,
            ServeStats {
                requests: 9,
                pages: 10,
            },
        )));
        assert!(!intact(Some(10)).await, "the server failed");
        write(Ok(ServeStats {
            requests: 3,
            pages: 10,
        }));
        assert!(intact(Some(10)).await, "every page served");
        let alive_daemon = Some((me, start));
        assert!(
            tree.restored_intact(me, start, alive_daemon, Some(10), dir.path())
                .await,
            "a daemon still running fills the rest"
        );
    }
}
