//! Lazy restore on the destination: a `criu lazy-pages` daemon serves a restored tree's anonymous
//! memory from the local pages files through userfaultfd, so `criu restore --lazy-pages` returns
//! without copying it and the service runs while its memory fills in behind it.
//!
//! A full restore of 256 MiB copies every page into fresh memory while the service is down
//! (~150 ms here, against ~30 ms lazily). The daemon gets its pages in one of two ways, both on
//! this host (nothing crosses the network after the restore), and exits once every page is in
//! place:
//!
//! - **from the page store** (the default): the daemon asks tether's page server
//!   ([`super::pageserver`]) over a socket pair; the pages files hold only the pages the restore
//!   itself copies in (the hot ones and those CRIU never restores lazily), so nothing rebuilds
//!   all of memory while the service is down. The server is a forked copy of the agent
//!   ([`crate::sys::fork_child`]) that shares the store's memory with it copy-on-write: it
//!   outlives an agent that dies or stops while memory still fills in, as the daemon does.
//! - **from the pages files**, rebuilt whole from the store plus the final difference.

use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::pages::Owner;
use super::pageserver::{self, Outcome, ServeStats, OUTCOME_LEN};
use super::rpc::{Features, Req, ReqType};
use super::{Criu, CriuError};
use crate::pagestore::PageStore;

/// The daemon's socket, in the images (work) directory, where the restore looks for it.
const SOCKET: &str = "lazy-pages.socket";
/// The daemon's log, in the images directory.
pub const LOG: &str = "lazy-pages.log";
/// Where the page server leaves its [`Outcome`] record as it exits, in the images directory:
/// what a restarted agent reads to tell a filled-in copy from one whose fill broke off.
pub const SERVED: &str = "page-server.outcome";
const SERVED_C: &std::ffi::CStr = c"page-server.outcome";

/// Whether `name` is one of the daemon's own files in the images directory: a source must not
/// send such a file (it would pose as the daemon's socket, overwrite its log, or claim a fill
/// that never happened).
pub fn is_daemon_file(name: &str) -> bool {
    name == SOCKET || name == LOG || name == SERVED
}

/// The outcome the page server of the image set in `images` left, if it has exited.
pub fn served_outcome(images: &Path) -> Option<Outcome> {
    let data = std::fs::read(images.join(SERVED)).ok()?;
    let record: [u8; OUTCOME_LEN] = data.as_slice().try_into().ok()?;
    pageserver::decode_outcome(&record)
}

impl Criu {
    /// Whether this kernel and CRIU can restore lazily (CRIU's `lazy_pages` feature check:
    /// userfaultfd with non-cooperative events).
    pub async fn lazy_pages_supported(&self) -> bool {
        let Ok(worker) = self.worker() else {
            return false;
        };
        let resp = worker
            .call(&Req {
                r#type: ReqType::FeatureCheck as i32,
                features: Some(Features {
                    lazy_pages: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        worker.finish().await;
        matches!(resp, Ok(r) if r.success && r.features.as_ref().and_then(|f| f.lazy_pages) == Some(true))
    }

    /// Starts a `criu lazy-pages` daemon for the image set in `images`. It needs the image files
    /// other than page data at once (it reads the process tree). With `from_store`, it will ask
    /// for its pages over a socket pair, answered once [`LazyPages::serve`] has the page store;
    /// else the pages files must be complete before the restore starts. It runs in a process
    /// group of its own (a Ctrl-C meant for the agent must not reach it) and is killed when the
    /// handle is dropped, unless [detached](LazyPages::detach).
    pub fn start_lazy_pages(
        &self,
        images: &Path,
        from_store: bool,
    ) -> Result<LazyPages, CriuError> {
        const PS_FD: i32 = 3;
        let mut cmd = std::process::Command::new(self.path());
        cmd.arg("lazy-pages")
            .arg("-D")
            .arg(images)
            .arg("-o")
            .arg(LOG)
            .arg(format!("-v{}", self.log_level))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let pair = if from_store {
            let (ours, theirs) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Stream,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| CriuError::Spawn(e.into()))?;
            cmd.arg("--page-server")
                .arg("--ps-socket")
                .arg(PS_FD.to_string());
            crate::sys::pass_fd(&mut cmd, theirs.as_fd(), PS_FD);
            Some((ours, theirs))
        } else {
            None
        };
        let child = tokio::process::Command::from(cmd)
            .spawn()
            .map_err(CriuError::Spawn)?;
        // The daemon's end is its own now: a daemon that dies is a hang-up to the server.
        let serve_end = pair.map(|(ours, _theirs)| ours);
        Ok(LazyPages {
            child,
            images: images.to_path_buf(),
            started: Instant::now(),
            detached: false,
            serve_end,
            server: None,
        })
    }
}

/// A running `criu lazy-pages` daemon.
#[derive(Debug)]
pub struct LazyPages {
    child: tokio::process::Child,
    images: PathBuf,
    started: Instant,
    /// It serves a committed service: dropping the handle (an agent that stops) must not kill
    /// it, or the service reads zeros where its memory never came.
    detached: bool,
    /// Started to ask for its pages: this end of its socket pair, until the server has it.
    serve_end: Option<OwnedFd>,
    /// The page server answering it.
    server: Option<Server>,
}

/// A forked page server ([`LazyPages::serve`]): the thread that forks it, then waits for it
/// and reads its outcome (`None`: it could not be started, or ended without saying how).
/// Dropping it (an undo) detaches the thread: the server exits on its own once the daemon's
/// end closes, and the thread reaps it.
type Server = std::thread::JoinHandle<Option<Outcome>>;

impl Drop for LazyPages {
    fn drop(&mut self) {
        if !self.detached {
            let _ = self.child.start_kill();
        }
    }
}

impl LazyPages {
    /// The daemon's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// From now on the daemon outlives this handle: call it as soon as the restored service is
    /// committed, before anything can drop the handle.
    pub fn detach(&mut self) {
        self.detached = true;
    }

    /// Whether the daemon asks for its pages (started `from_store`) rather than reading the pages
    /// files.
    pub fn asks_for_pages(&self) -> bool {
        self.serve_end.is_some() || self.server.is_some()
    }

    /// Starts answering the daemon's page requests from `store` (which must hold every page of
    /// the page maps the daemon fills lazily), in a forked copy of this process that exits when
    /// the daemon closes the connection or goes away. Returns at once: the fork (a few ms for
    /// a large store: it copies this process's page tables) runs on a thread of its own,
    /// alongside the restore, which the daemon's first request follows. If it fails, the
    /// daemon is killed, so that the restore fails rather than wait for pages forever.
    pub fn serve(&mut self, store: PageStore) -> Result<(), CriuError> {
        let sock = self.serve_end.take().ok_or_else(|| CriuError::Failed {
            op: "lazy-pages",
            errno: None,
            detail: "the daemon was not started to ask for its pages, or is served already".into(),
        })?;
        let daemon = self.child.id().and_then(|p| i32::try_from(p).ok());
        let images = self.images.clone();
        let dir = std::fs::File::open(&images).map_err(CriuError::Spawn)?;
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || {
                let t = Instant::now();
                let forked = start_server(sock, store, OwnedFd::from(dir));
                match forked {
                    Ok(pid) => {
                        info!(
                            pid,
                            fork_ms = t.elapsed().as_secs_f64() * 1e3,
                            "page server started for the lazy restore"
                        );
                        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
                        served_outcome(&images)
                    }
                    Err(e) => {
                        warn!("cannot start the lazy restore's page server: {e}");
                        if let Some(d) = daemon {
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(d),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        None
                    }
                }
            })
            .map_err(CriuError::Spawn)?;
        self.server = Some(thread);
        Ok(())
    }

    /// Waits until the daemon listens (its socket exists), at most `timeout`.
    pub async fn ready(&mut self, timeout: Duration) -> Result<(), CriuError> {
        let socket = self.images.join(SOCKET);
        let deadline = Instant::now() + timeout;
        loop {
            if socket.exists() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(self.failed(status, "exited before it listened"));
            }
            if Instant::now() >= deadline {
                return Err(
                    self.failed_with(format!("not listening after {} ms", timeout.as_millis()))
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits until the daemon has put every page in place and exited; returns how long it ran
    /// since it started. Never kills it: after a commit, killing it would leave the service
    /// reading zeros where its memory never came.
    pub async fn wait(&mut self) -> Result<Duration, CriuError> {
        let done = match self.child.wait().await {
            Ok(status) if status.success() => Ok(self.started.elapsed()),
            Ok(status) => Err(self.failed(status, "failed")),
            Err(e) => Err(CriuError::Rpc(e)),
        };
        let served = match self.server.take() {
            Some(s) => Some(
                tokio::task::spawn_blocking(move || s.join().ok().flatten())
                    .await
                    .ok()
                    .flatten(),
            ),
            None => None,
        };
        match served {
            Some(Some(Ok(ServeStats { requests, pages }))) => {
                info!(requests, pages, "page server done");
            }
            Some(Some(Err((e, s)))) => {
                warn!(
                    requests = s.requests,
                    pages = s.pages,
                    "page server failed: {e}"
                );
                if done.is_ok() {
                    return Err(self.failed_with(format!("its page server failed: {e}")));
                }
            }
            Some(None) => warn!("page server ended without saying how"),
            None => {}
        }
        done
    }

    fn failed(&self, status: ExitStatus, what: &str) -> CriuError {
        self.failed_with(format!("{what} ({status})"))
    }

    fn failed_with(&self, what: String) -> CriuError {
        let errors = super::log_errors(&self.images.join(LOG));
        CriuError::Failed {
            op: "lazy-pages",
            errno: None,
            detail: if errors.is_empty() {
                what
            } else {
                format!("{what}: {errors}")
            },
        }
    }
}

/// Forks the page server: it answers on `sock` from `store` and, as it exits, writes its
/// outcome to [`SERVED`] in the directory `dir` (read with [`served_outcome`]). Returns its pid.
/// This process's copy of `store` and of `sock` is dropped before returning.
fn start_server(sock: OwnedFd, store: PageStore, dir: OwnedFd) -> std::io::Result<i32> {
    let pid = crate::sys::fork_child([sock.as_fd(), dir.as_fd()], |[sock, dir]| {
        // In the forked child: no allocation, no drop of what the agent owned (see
        // `fork_child`). The store is read in place, shared with the agent copy-on-write.
        let store = ManuallyDrop::new(store);
        let mut sock = std::os::unix::net::UnixStream::from(sock);
        let outcome = pageserver::serve(&mut sock, |owner: Owner, vaddr| {
            store.get(owner.code(), vaddr)
        });
        let record = pageserver::encode_outcome(&outcome);
        if let Ok(f) = crate::sys::create_at(dir.as_fd(), SERVED_C) {
            let _ = std::io::Write::write_all(&mut std::fs::File::from(f), &record);
        }
        i32::from(outcome.is_err())
    })?;
    // Here `store` was moved into the closure, which the parent never runs: it is dropped with
    // it, and `sock` on return. The daemon's requests reach only the server, which sees the
    // daemon hang up if it dies.
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::pageserver::{Header, HEADER};
    use crate::protocol::PageBatch;
    use std::io::{Read, Write};

    /// The forked server answers from the store it was handed, the parent having dropped its
    /// own copy, and reports what it did in the images directory.
    #[test]
    fn a_forked_server_answers_from_the_store_and_reports() {
        let mut store = PageStore::new(1 << 30);
        store
            .announce(5, vec![(0x10000, 0x10000 + 64 * 4096)])
            .expect("announce");
        let pages = (0..64u64)
            .map(|i| {
                (
                    0x10000 + i * 4096,
                    (i != 3).then(|| vec![i as u8 + 1; 4096]),
                )
            })
            .collect();
        store.apply(&PageBatch { owner: 5, pages }).expect("apply");
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = OwnedFd::from(std::fs::File::open(dir.path()).expect("open dir"));
        let pid = start_server(OwnedFd::from(ours), store, d).expect("fork");
        let mut daemon = theirs;
        daemon
            .write_all(&Header::get(5, 0x10000, 64).encode())
            .expect("request");
        let mut h = [0u8; HEADER];
        daemon.read_exact(&mut h).expect("reply");
        assert!(Header::decode(&h).is_pages_reply());
        let mut data = vec![0u8; 64 * 4096];
        daemon.read_exact(&mut data).expect("pages");
        for (i, p) in data.chunks(4096).enumerate() {
            let want = if i == 3 { 0 } else { i as u8 + 1 };
            assert!(p.iter().all(|b| *b == want), "page {i}");
        }
        daemon.write_all(&Header::close().encode()).expect("close");
        let mut status = [0u8; 4];
        daemon.read_exact(&mut status).expect("status");
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 0)
        );
        let want = Some(Ok(ServeStats {
            requests: 1,
            pages: 64,
        }));
        assert_eq!(
            served_outcome(dir.path()),
            want,
            "left in the images directory"
        );
    }

    /// A daemon that dies is a hang-up: the server exits with a failure and says so.
    #[test]
    fn a_forked_server_exits_when_its_daemon_goes() {
        let store = PageStore::new(1 << 20);
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
        let dir = tempfile::tempdir().expect("tempdir");
        let d = OwnedFd::from(std::fs::File::open(dir.path()).expect("open dir"));
        let pid = start_server(OwnedFd::from(ours), store, d).expect("fork");
        drop(theirs);
        let status = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None).expect("wait");
        assert_eq!(
            status,
            nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(pid), 1)
        );
        assert!(matches!(
            served_outcome(dir.path()),
            Some(Err((pageserver::ServeError::Hangup, _)))
        ));
    }
}
