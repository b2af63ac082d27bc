//! The agent's data plane for one migration: pre-copied pages into the page store, image files
//! into the images directory, and the rebuild of CRIU's page files from the store plus the final
//! difference. The agent machine decides what may come when; this only stores it, within the
//! bounds, and says what failed.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use crate::authz::Reservation;
use crate::criu::pages::{self, MemoryImages, Owner};
use crate::criu::rebuild::PagesDraft;
use crate::machine::PortError;
use crate::metrics::AgentMetrics;
use crate::pagestore::{merge_ranges, PageStore, StoreError};
use crate::protocol::{ErrorCode, PageBatch};

fn data(what: &str, e: impl std::fmt::Display) -> PortError {
    PortError::new(ErrorCode::Protocol, format!("{what}: {e}"))
}

fn storage(what: &str, e: std::io::Error) -> PortError {
    PortError::caused(ErrorCode::Storage, what, e)
}

type DraftResult = (Result<PagesDraft, pages::PagesError>, Duration);

/// What a restore served from the page store needs ([`Receiver::finish_rebuild`]).
#[derive(Debug)]
pub struct Served {
    /// The store, holding every page the pages files lack.
    pub store: PageStore,
    /// How many pages the pages files lack: what the lazy-pages daemon must get from the store.
    pub pages: u64,
}

/// One migration's received pages and files.
#[derive(Debug)]
pub struct Receiver {
    dir: PathBuf,
    store: Option<PageStore>,
    file: Option<(PathBuf, std::fs::File)>,
    /// From `FinalPages` on: the dump's page maps and the rebuild writing the held pages.
    images: Option<MemoryImages>,
    draft: Option<tokio::task::JoinHandle<DraftResult>>,
    /// For a restore served from the page store: the pages files, holes until the hot pages
    /// are written; the final difference goes into the store as it comes.
    sparse: Option<PagesDraft>,
    final_pages: Vec<(Owner, PageBatch)>,
    metrics: Arc<AgentMetrics>,
    /// The most image bytes (files plus page data) this migration may bring.
    max_bytes: u64,
    /// This migration's share of the host's memory budget.
    budget: Reservation,
    /// Image file bytes written.
    file_bytes: u64,
    /// Page data the rebuild writes (the dump's page maps' data).
    rebuilt_bytes: u64,
    /// Page data of the final difference held until the rebuild patches it in.
    final_bytes: u64,
    /// The page store's memory while the page server holds it (a served restore), bytes.
    lent_store: u64,
    /// The most memory held at once so far (the most `account` charged), bytes.
    peak: u64,
}

fn limit(e: impl std::fmt::Display) -> PortError {
    PortError::new(ErrorCode::Limit, e.to_string())
}

impl Receiver {
    /// A receiver writing into `dir` (created, private), holding at most `max_bytes` of pages
    /// and files, and charging what it holds to `budget`.
    pub fn new(
        dir: &Path,
        max_bytes: u64,
        budget: Reservation,
        metrics: Arc<AgentMetrics>,
    ) -> Result<Receiver, PortError> {
        crate::dirs::private_dir(dir)
            .map_err(|e| storage(&format!("cannot create {}", dir.display()), e))?;
        Ok(Receiver {
            dir: dir.to_path_buf(),
            store: Some(PageStore::new(max_bytes)),
            file: None,
            images: None,
            draft: None,
            sparse: None,
            final_pages: Vec::new(),
            metrics,
            max_bytes,
            budget,
            file_bytes: 0,
            rebuilt_bytes: 0,
            peak: 0,
            final_bytes: 0,
            lent_store: 0,
        })
    }

    /// Charges what this migration holds now to the host's budget.
    fn account(&mut self) -> Result<(), PortError> {
        let store = self.store.as_ref().map_or(0, PageStore::memory);
        let held =
            store + self.lent_store + self.file_bytes + self.rebuilt_bytes + self.final_bytes;
        self.peak = self.peak.max(held);
        self.budget.set(held).map_err(limit)
    }

    /// The most memory this migration has held here at once, bytes: page store, image files,
    /// rebuilt pages files and the final difference waiting for them.
    pub fn peak(&self) -> u64 {
        self.peak
    }

    /// Pre-copy: an owner's memory ranges.
    pub fn layout(&mut self, owner: u64, ranges: Vec<(u64, u64)>) -> Result<(), PortError> {
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| data("layout", "after the final pages"))?;
        store
            .announce(owner, ranges)
            .map_err(|e| data("layout", e))?;
        self.account()
    }

    /// Pre-copy: a page batch.
    pub fn precopy(&mut self, batch: &PageBatch) -> Result<(), PortError> {
        let n = batch.pages.len() as u64;
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| data("pages", "after the final pages"))?;
        store.apply(batch).map_err(|e| match e {
            StoreError::Full { .. } => limit(format!("pre-copy pages: {e}")),
            e => data("pre-copy pages", e),
        })?;
        self.account()?;
        self.metrics.precopy_pages_total.add(n);
        self.metrics
            .received_bytes_total
            .add(n * crate::protocol::PAGE as u64);
        Ok(())
    }

    /// Creates the next image file.
    pub fn create_file(&mut self, name: &str, size: u64) -> Result<(), PortError> {
        if pages::is_pages_file(name) {
            return Err(data(
                "image files",
                format!("page data file {name} sent as a file"),
            ));
        }
        if name == crate::container::podman::CRIU_CONFIG_FILE {
            return Err(data(
                "image files",
                format!("{name} is the destination's own CRIU configuration, not an image"),
            ));
        }
        if crate::criu::lazy::is_daemon_file(name) {
            return Err(data(
                "image files",
                format!("{name} is the lazy-pages daemon's own file, not an image"),
            ));
        }
        let path = self.dir.join(name);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| storage(&format!("cannot create {}", path.display()), e))?;
        self.metrics.received_bytes_total.add(size);
        self.file = Some((path, f));
        Ok(())
    }

    /// Appends to the current image file (the directory is on tmpfs: a write is a memory copy).
    pub fn write(&mut self, chunk: &[u8]) -> Result<(), PortError> {
        let (path, f) = self
            .file
            .as_mut()
            .ok_or_else(|| data("file data", "without a file"))?;
        f.write_all(chunk)
            .map_err(|e| storage(&format!("writing {}", path.display()), e))?;
        self.file_bytes += chunk.len() as u64;
        self.account()
    }

    /// The page maps are in: the final difference may carry pages of the dump's page maps only.
    /// Starts writing CRIU's page files from the held pages on a blocking thread, while the
    /// source still compares its dump. With `served` (a lazy restore whose daemon asks the page
    /// store for its pages), the files get their lengths and stay holes, and the final
    /// difference goes into the store as it comes; [`finish_rebuild`](Self::finish_rebuild)
    /// writes the hot pages and hands the store over.
    pub fn start_rebuild(&mut self, served: bool) -> Result<(), PortError> {
        self.file = None;
        let images = MemoryImages::load(&self.dir).map_err(|e| data("the dump's page maps", e))?;
        // The page maps come from the peer: what they declare is bounded before anything is
        // allocated or written for it.
        let declared = images
            .data_len_within(self.max_bytes.saturating_sub(self.file_bytes))
            .map_err(|e| limit(format!("{e} (--max-image-mib, with the image files)")))?;
        // Served: the pages files are holes but for the pages the restore reads itself, counted
        // when they are written.
        self.rebuilt_bytes = if served { 0 } else { declared };
        // The store is still counted here, beside the pages files the rebuild writes from it:
        // the peak while both are held.
        self.account()?;
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| data("final pages", "twice"))?;
        for map in &images.maps {
            let ranges = merge_ranges(
                map.entries
                    .iter()
                    .filter(|e| e.has_data())
                    .map(|e| (e.vaddr, e.end())),
            );
            store
                .announce(map.owner.code(), ranges)
                .map_err(|e| data("page maps", e))?;
        }
        let recent = |store: &PageStore| {
            store
                .rewritten_pages()
                .filter_map(|(owner, vaddr)| Some((Owner::from_code(owner)?, vaddr)))
                .collect::<Vec<_>>()
        };
        if served {
            // Nothing is written: one look-up per page, to count what is missing.
            let t = Instant::now();
            let mut d = images
                .draft_sparse(&self.dir, |owner: Owner, vaddr| {
                    store.get(owner.code(), vaddr)
                })
                .map_err(|e| PortError::caused(ErrorCode::Storage, "rebuild", e))?;
            d.mark_recent(recent(store));
            info!(
                ms = t.elapsed().as_secs_f64() * 1e3,
                missing = d.missing(),
                "pages files drafted for a restore served from the page store"
            );
            self.sparse = Some(d);
            self.images = Some(images);
            return Ok(());
        }
        let store = self
            .store
            .take()
            .ok_or_else(|| data("final pages", "twice"))?;
        let (maps, dir) = (images.clone(), self.dir.clone());
        self.draft = Some(tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let d = maps
                .draft_pages(&dir, |owner, vaddr| store.get(owner.code(), vaddr))
                .map(|mut d| {
                    d.mark_recent(recent(&store));
                    d
                });
            (d, t.elapsed())
        }));
        self.images = Some(images);
        Ok(())
    }

    /// A batch of the final difference, checked against the dump's page maps.
    pub fn final_batch(&mut self, batch: PageBatch) -> Result<(), PortError> {
        let images = self
            .images
            .as_ref()
            .ok_or_else(|| data("final pages", "before the page maps"))?;
        let owner = Owner::from_code(batch.owner)
            .ok_or_else(|| data("final pages", format!("bad page owner {:#x}", batch.owner)))?;
        if let Some((a, _)) = batch
            .pages
            .iter()
            .find(|(a, _)| !images.has_data_at(owner, *a))
        {
            return Err(data(
                "final pages",
                format!("final page {a:#x} of {owner} is not in the dump's page map"),
            ));
        }
        let n = batch.pages.len() as u64;
        if let (Some(d), Some(store)) = (self.sparse.as_mut(), self.store.as_mut()) {
            store.apply(&batch).map_err(|e| match e {
                StoreError::Full { .. } => limit(format!("final pages: {e}")),
                e => data("final pages", e),
            })?;
            d.patch(owner, batch.pages.iter().map(|(a, p)| (*a, p.as_deref())))
                .map_err(|e| data("final pages", e))?;
        } else {
            self.final_pages.push((owner, batch));
            self.final_bytes += n * crate::protocol::PAGE as u64;
        }
        self.account()?;
        self.metrics.final_pages_total.add(n);
        self.metrics
            .received_bytes_total
            .add(n * crate::protocol::PAGE as u64);
        Ok(())
    }

    /// Completes CRIU's page files with the final difference; a page the dump needs and nobody
    /// sent fails here. With `hot_first` pages above 0, the page maps mark that many hot pages
    /// for a lazy restore to copy in at once ([`crate::criu::eager`]).
    ///
    /// A rebuild [started served](Self::start_rebuild), with `serve`, writes only the pages the
    /// lazy restore reads itself and returns the page store, whose pages the lazy-pages daemon
    /// must get from now on ([`Served`]); without `serve` (the daemon is not there after all) it writes every
    /// page, as an ordinary rebuild.
    pub async fn finish_rebuild(
        &mut self,
        hot_first: u64,
        serve: bool,
    ) -> Result<Option<Served>, PortError> {
        if let Some(draft) = self.sparse.take() {
            return self.finish_served(draft, hot_first, serve).await;
        }
        let t = Instant::now();
        let task = self
            .draft
            .take()
            .ok_or_else(|| data("images done", "before the final pages"))?;
        let (drafted, draft_time) = task.await.map_err(|e| {
            PortError::new(
                ErrorCode::Internal,
                format!("the rebuild thread failed: {e}"),
            )
        })?;
        let mut drafted =
            drafted.map_err(|e| PortError::caused(ErrorCode::Storage, "rebuild", e))?;
        let waited = t.elapsed();
        self.metrics.rebuild_wait_duration.observe(waited);
        let pages = std::mem::take(&mut self.final_pages);
        self.final_bytes = 0;
        let totals = tokio::task::spawn_blocking(move || {
            for (owner, b) in &pages {
                drafted.patch(*owner, b.pages.iter().map(|(a, p)| (*a, p.as_deref())))?;
            }
            drafted.finish_hot_first(hot_first)
        })
        .await
        .map_err(|e| {
            PortError::new(
                ErrorCode::Internal,
                format!("the rebuild thread failed: {e}"),
            )
        })?
        .map_err(|e| PortError::new(ErrorCode::Protocol, format!("rebuild: {e}")))?;
        info!(
            ?totals,
            draft_ms = draft_time.as_secs_f64() * 1e3,
            waited_ms = waited.as_secs_f64() * 1e3,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "page data rebuilt"
        );
        Ok(None)
    }

    async fn finish_served(
        &mut self,
        draft: PagesDraft,
        hot_first: u64,
        serve: bool,
    ) -> Result<Option<Served>, PortError> {
        let t = Instant::now();
        let store = self
            .store
            .take()
            .ok_or_else(|| data("images done", "twice"))?;
        let (totals, store) = tokio::task::spawn_blocking(move || {
            let held = |owner: Owner, vaddr| store.get(owner.code(), vaddr);
            let totals = if serve {
                draft.finish_served(hot_first, held)
            } else {
                draft.finish_whole(held)
            };
            (totals, store)
        })
        .await
        .map_err(|e| {
            PortError::new(
                ErrorCode::Internal,
                format!("the rebuild thread failed: {e}"),
            )
        })?;
        let totals =
            totals.map_err(|e| PortError::new(ErrorCode::Protocol, format!("rebuild: {e}")))?;
        self.rebuilt_bytes = totals.written * crate::protocol::PAGE as u64;
        // Held by the page server from now on (this process drops its copy), until the fill
        // ends: still this migration's.
        self.lent_store = if serve { store.memory() } else { 0 };
        self.account()?;
        info!(
            ?totals,
            served = serve,
            ms = t.elapsed().as_secs_f64() * 1e3,
            "page data written"
        );
        Ok(serve.then(|| Served {
            store,
            pages: totals.pages.saturating_sub(totals.written),
        }))
    }

    /// Waits for a rebuild thread still writing into the directory (before it is removed).
    pub async fn settle(&mut self) {
        if let Some(d) = self.draft.take() {
            let _ = d.await;
        }
        self.file = None;
    }
}
