//! Lazy restore on the destination: a `criu lazy-pages` daemon serves a restored tree's anonymous
//! memory from the local pages files through userfaultfd, so `criu restore --lazy-pages` returns
//! without copying it and the service runs while its memory fills in behind it.
//!
//! A full restore of 256 MiB copies every page into fresh memory while the service is down
//! (~150 ms here, against ~30 ms lazily). The daemon reads the same rebuilt `pages-*.img` files
//! a full restore would, on the same host: nothing crosses the network after the restore, and
//! the daemon exits once every page is in place.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::rpc::{Features, Req, ReqType};
use super::{Criu, CriuError};

/// The daemon's socket, in the images (work) directory, where the restore looks for it.
const SOCKET: &str = "lazy-pages.socket";
/// The daemon's log, in the images directory.
pub const LOG: &str = "lazy-pages.log";

/// Whether `name` is one of the daemon's own files in the images directory: a source must not
/// send such a file (it would pose as the daemon's socket or overwrite its log).
pub fn is_daemon_file(name: &str) -> bool {
    name == SOCKET || name == LOG
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
    /// other than page data at once (it reads the process tree); the pages files must be complete
    /// before the restore starts. It runs in a process group of its own (a Ctrl-C meant for the
    /// agent must not reach it) and is killed when the handle is dropped, unless
    /// [detached](LazyPages::detach).
    pub fn start_lazy_pages(&self, images: &Path) -> Result<LazyPages, CriuError> {
        let child = tokio::process::Command::new(self.path())
            .arg("lazy-pages")
            .arg("-D")
            .arg(images)
            .arg("-o")
            .arg(LOG)
            .arg(format!("-v{}", self.log_level))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(CriuError::Spawn)?;
        Ok(LazyPages {
            child,
            images: images.to_path_buf(),
            started: Instant::now(),
            detached: false,
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
}

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
        match self.child.wait().await {
            Ok(status) if status.success() => Ok(self.started.elapsed()),
            Ok(status) => Err(self.failed(status, "failed")),
            Err(e) => Err(CriuError::Rpc(e)),
        }
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
