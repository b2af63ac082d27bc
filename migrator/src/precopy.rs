//! The source side of memory transfer: pre-copy rounds while the tree runs, and the final
//! difference after the dump. Works without soft-dirty bits: pages are read from the running tree
//! ([`crate::procmem`]) and compared by content hash with what the destination holds.
//!
//! Scanning runs on a blocking thread and hands encoded page batches to the sender through a
//! bounded channel, so memory use stays at a few MiB whatever the state size.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::criu::pages::{self, MemoryImages, Owner};
use crate::pagestore::merge_ranges;
use crate::procmem::{self, ProcId, Scanner, VmaClass};
use crate::protocol::frame;
use crate::protocol::stats::{FinalReport, ImagesSent, RoundScan};
use crate::protocol::{PageBatch, ToAgent};
use crate::transport::{FrameSender, TransportError};

/// Encoded frames in flight between the scanner and the sender.
const CHANNEL_FRAMES: usize = 16;

/// What the destination holds: (owner code, address) -> content hash. Mirrors the agent's
/// [`crate::pagestore::PageStore`] exactly (same layout pruning), so the final difference can
/// leave out every page whose content the destination already has.
#[derive(Debug, Default)]
pub struct Tracker {
    held: HashMap<(u64, u64), u64>,
}

impl Tracker {
    /// Pages the destination holds.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether the destination holds nothing.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    fn prune(&mut self, owner: u64, ranges: &[(u64, u64)]) {
        self.held
            .retain(|(o, a), _| *o != owner || ranges.iter().any(|&(s, e)| (s..e).contains(a)));
    }
}

/// Errors of a transfer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransferError {
    /// Reading the tree's memory.
    #[error("reading the service's memory: {0}")]
    Memory(#[from] procmem::MemError),
    /// Reading the dump.
    #[error("reading the dump's memory images: {0}")]
    Images(#[from] pages::PagesError),
    /// The connection.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// Reading an image file.
    #[error("reading image file {name}: {source}")]
    File {
        /// The file.
        name: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The scanning thread failed.
    #[error("scanner thread: {0}")]
    Thread(String),
}

/// Caps the sending rate.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    bytes_per_sec: f64,
}

impl RateLimit {
    /// A cap of `bits_per_sec`.
    pub fn bits_per_sec(bits: u64) -> RateLimit {
        RateLimit {
            bytes_per_sec: bits as f64 / 8.0,
        }
    }
}

/// The private mappings of a process as `[start, end)` ranges: what its pages may be.
pub fn layout(pid: i32) -> Result<Vec<(u64, u64)>, procmem::MemError> {
    let path = std::path::PathBuf::from(format!("/proc/{pid}/maps"));
    let text = std::fs::read_to_string(&path)
        .map_err(|source| procmem::MemError::Proc { path, source })?;
    // Adjacent VMAs (different permissions) form one range.
    Ok(merge_ranges(
        text.lines()
            .filter_map(procmem::parse_maps_line)
            .filter(|m| {
                matches!(
                    procmem::classify(m),
                    VmaClass::AnonPrivate | VmaClass::FilePrivate | VmaClass::Entire
                )
            })
            .map(|m| (m.start, m.end)),
    ))
}

/// Collects pages into batches and encodes full batches as frames.
struct Batcher {
    owner: u64,
    pages: Vec<(u64, Option<Vec<u8>>)>,
    out: mpsc::Sender<Vec<u8>>,
    sent: u64,
    zero: u64,
}

impl Batcher {
    fn push(&mut self, owner: u64, addr: u64, data: Option<&[u8]>) -> Result<(), TransferError> {
        if owner != self.owner || self.pages.len() == PageBatch::MAX_PAGES {
            self.flush()?;
            self.owner = owner;
        }
        self.sent += 1;
        if data.is_none() {
            self.zero += 1;
        }
        self.pages.push((addr, data.map(<[u8]>::to_vec)));
        Ok(())
    }

    fn flush(&mut self) -> Result<(), TransferError> {
        if self.pages.is_empty() {
            return Ok(());
        }
        let refs: Vec<(u64, Option<&[u8]>)> =
            self.pages.iter().map(|(a, d)| (*a, d.as_deref())).collect();
        let frame = PageBatch::encode(self.owner, &refs);
        self.pages.clear();
        self.out
            .blocking_send(frame)
            .map_err(|_| TransferError::Thread("the sender is gone".into()))
    }

    fn control(&mut self, msg: &ToAgent) -> Result<(), TransferError> {
        self.flush()?;
        self.out
            .blocking_send(frame::encode(msg))
            .map_err(|_| TransferError::Thread("the sender is gone".into()))
    }
}

/// Sends frames from the scanner as they come, within the rate limit; returns bytes sent.
async fn pump(
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: &mut FrameSender,
    limit: Option<RateLimit>,
) -> Result<u64, TransferError> {
    let start = Instant::now();
    let mut bytes = 0u64;
    while let Some(frame) = rx.recv().await {
        if let Some(l) = limit {
            let due = Duration::from_secs_f64(bytes as f64 / l.bytes_per_sec);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        tx.send_frame(&frame).await?;
        bytes += frame.len() as u64;
    }
    Ok(bytes)
}

/// Sends one pre-copy round: announces each process's layout and sends every page whose
/// content the destination does not have. `RoundEnd` is the caller's (the source machine's).
pub async fn send_round(
    root: i32,
    tracker: Tracker,
    tx: &mut FrameSender,
    limit: Option<RateLimit>,
) -> Result<(Tracker, RoundScan), TransferError> {
    let (ftx, frx) = mpsc::channel(CHANNEL_FRAMES);
    let scan = tokio::task::spawn_blocking(move || scan_round(root, tracker, ftx));
    let bytes = pump(frx, tx, limit).await;
    let (tracker, stats, sent, zero) = scan
        .await
        .map_err(|e| TransferError::Thread(e.to_string()))??;
    let bytes = bytes?;
    Ok((
        tracker,
        RoundScan {
            pages_scanned: stats.pages_present,
            pages_sent: sent,
            pages_zero: zero,
            bytes,
            scan_ms: stats.elapsed.as_secs_f64() * 1e3,
        },
    ))
}

type ScanOut = (Tracker, procmem::ScanStats, u64, u64);

fn scan_round(
    root: i32,
    mut tracker: Tracker,
    out: mpsc::Sender<Vec<u8>>,
) -> Result<ScanOut, TransferError> {
    let procs: Vec<ProcId> = procmem::tree(root)?;
    let mut b = Batcher {
        owner: 0,
        pages: Vec::with_capacity(PageBatch::MAX_PAGES),
        out,
        sent: 0,
        zero: 0,
    };
    let mut scanner = Scanner::new();
    let mut total = procmem::ScanStats::default();
    let start = Instant::now();
    for p in procs {
        let owner = Owner::Pid(p.ns).code();
        let ranges = match layout(p.host) {
            Ok(r) => r,
            // The process exited: its pages are not needed.
            Err(_) => continue,
        };
        tracker.prune(owner, &ranges);
        b.control(&ToAgent::Layout {
            owner,
            ranges: ranges.clone(),
        })?;
        let mut err = None;
        let stats = scanner.scan_procs(&[p], |page| {
            if err.is_some() {
                return;
            }
            // A mapping created after the layout was read: its pages come next round (or in
            // the final difference); the agent would reject them now.
            if !ranges.iter().any(|&(s, e)| (s..e).contains(&page.vaddr)) {
                return;
            }
            let key = (owner, page.vaddr);
            if tracker.held.get(&key) == Some(&page.hash) {
                return;
            }
            tracker.held.insert(key, page.hash);
            let data = (!page.zero).then_some(page.data);
            if let Err(e) = b.push(owner, page.vaddr, data) {
                err = Some(e);
            }
        })?;
        if let Some(e) = err {
            return Err(e);
        }
        total.processes += stats.processes;
        total.pages_present += stats.pages_present;
        total.pages_zero += stats.pages_zero;
        total.bytes_read += stats.bytes_read;
    }
    b.flush()?;
    total.elapsed = start.elapsed();
    Ok((tracker, total, b.sent, b.zero))
}

/// Sends what the destination needs of a dump while the tree is frozen: every image file but
/// the page data and CRIU's log, `FinalPages`, then the final difference (see
/// [`final_difference`]). `ImagesDone` is the caller's (the source machine's).
pub async fn send_images(
    images: &Path,
    tracker: Tracker,
    tx: &mut FrameSender,
) -> Result<ImagesSent, TransferError> {
    let mut files = 0u32;
    let mut file_bytes = 0u64;
    let mut entries: Vec<_> = std::fs::read_dir(images)
        .map_err(|source| TransferError::File {
            name: images.display().to_string(),
            source,
        })?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        // Page data goes as the final difference; the log stays here.
        if name == crate::criu::DUMP_LOG || pages::is_pages_file(&name) {
            continue;
        }
        let data = std::fs::read(entry.path()).map_err(|source| TransferError::File {
            name: name.clone(),
            source,
        })?;
        tx.send(&ToAgent::File {
            name,
            size: data.len() as u64,
        })
        .await?;
        tx.send_data(&data).await?;
        files += 1;
        file_bytes += data.len() as u64;
    }
    tx.send(&ToAgent::FinalPages).await?;
    let pages = final_difference(images, tracker, tx).await?;
    Ok(ImagesSent {
        files,
        file_bytes,
        pages,
    })
}

/// Sends the final difference: every page of the dump whose content the destination does not
/// hold, as page batches. The image files (with the page maps) must already be sent, followed by
/// [`ToAgent::FinalPages`].
pub async fn final_difference(
    images: &Path,
    tracker: Tracker,
    tx: &mut FrameSender,
) -> Result<FinalReport, TransferError> {
    let (ftx, frx) = mpsc::channel(CHANNEL_FRAMES);
    let dir = images.to_path_buf();
    let diff = tokio::task::spawn_blocking(move || -> Result<FinalReport, TransferError> {
        let images = MemoryImages::load(&dir)?;
        let mut b = Batcher {
            owner: 0,
            pages: Vec::with_capacity(PageBatch::MAX_PAGES),
            out: ftx,
            sent: 0,
            zero: 0,
        };
        // Read back and compared on every core (the tree is frozen: this is downtime). Pages
        // come in no particular order: batch per owner in increasing address order, as the
        // batch format requires.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let (parts, totals) = images.par_for_each_page(
            threads,
            Vec::new,
            |pending: &mut Vec<(u64, u64, Option<Vec<u8>>)>,
             owner: Owner,
             vaddr,
             data: &[u8; 4096]|
             -> Result<(), TransferError> {
                let code = owner.code();
                let hash = procmem::page_hash(data);
                if tracker.held.get(&(code, vaddr)) != Some(&hash) {
                    let d = (!procmem::is_zero(data)).then(|| data.to_vec());
                    pending.push((code, vaddr, d));
                }
                Ok(())
            },
        )?;
        let dumped = totals.pages;
        let mut pending: Vec<(u64, u64, Option<Vec<u8>>)> = parts.into_iter().flatten().collect();
        pending.sort_unstable_by_key(|(o, a, _)| (*o, *a));
        for (o, a, d) in &pending {
            b.push(*o, *a, d.as_deref())?;
        }
        b.flush()?;
        Ok(FinalReport {
            pages_dumped: dumped,
            pages_sent: b.sent,
            pages_zero: b.zero,
            bytes: 0,
        })
    });
    let bytes = pump(frx, tx, None).await;
    let mut report = diff
        .await
        .map_err(|e| TransferError::Thread(e.to_string()))??;
    report.bytes = bytes?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_mirrors_the_store() {
        let mut t = Tracker::default();
        t.held.insert((1, 0x1000), 1);
        t.held.insert((1, 0x5000), 2);
        t.held.insert((2, 0x1000), 3);
        t.prune(1, &[(0x4000, 0x6000)]);
        assert_eq!(t.len(), 2);
        assert!(t.held.contains_key(&(1, 0x5000)));
        assert!(t.held.contains_key(&(2, 0x1000)));
    }

    #[test]
    fn layout_of_self_covers_the_stack_and_heap() {
        let pid = std::process::id() as i32;
        let l = layout(pid).expect("own maps");
        assert!(!l.is_empty());
        let local = 0u64;
        let addr = &local as *const u64 as u64;
        assert!(
            l.iter().any(|&(s, e)| (s..e).contains(&addr)),
            "stack in layout"
        );
        assert!(l.windows(2).all(|w| w[0].1 < w[1].0), "sorted and merged");
    }
}
