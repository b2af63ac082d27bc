//! Reading a running process tree's memory without soft-dirty bits: which pages CRIU would dump,
//! their content, and a content hash per page, so that pre-copy can send only what changed.
//!
//! A scan walks every process of the tree (`/proc/PID/task/*/children`), parses
//! `/proc/PID/maps`, decodes `/proc/PID/pagemap` for the pages that are present or swapped, and
//! copies those pages with `process_vm_readv` in large batches (contiguous pages coalesced into
//! one iovec, up to [`MAX_IOVECS`] iovecs and [`DEFAULT_BATCH_BYTES`] per call). Each page is
//! handed to a callback with its [`page_hash`] (xxh3-64) and whether its content is all zero.
//! Memory use is bounded by the batch buffer, whatever the size of the address space.
//!
//! Speed (2-vCPU VM, release build, another process holding 512 MiB of written pages): about
//! 0.11-0.19 s per scan, 2.7-4.6 GiB/s, copy and hashing included (measured once; each pre-copy
//! round's `scan_ms` in a migration report shows it for the service at hand).
//!
//! # Which pages (mirroring CRIU 4.2.1)
//!
//! CRIU writes a page into a process's `pages-*.img` when (`criu/mem.c`, `should_dump_page`,
//! `generate_vma_iovs`; `criu/include/vma.h`, `vma_entry_is_private`):
//!
//! - the VMA is private (`VMA_ANON_PRIVATE` or `VMA_FILE_PRIVATE`), and is not `[vvar]`
//!   (skipped explicitly in `generate_vma_iovs`), `[vsyscall]`/`[vectors]` (not
//!   `VMA_AREA_REGULAR`, `proc_parse.c` `handle_vma`) or `[uprobes]` (skipped in
//!   `vma_list_add`). Non-readable (`PROT_NONE`) private VMAs *are* dumped (the parasite makes
//!   them readable); this module reads those through `/proc/PID/mem`, which may read
//!   non-readable mappings, because `process_vm_readv` cannot;
//! - the page is present or swapped (`PME_PRESENT | PME_SWAP`), is not a guard region
//!   (`PME_GUARD_REGION`, pagemap bit 58), and is not the kernel's zero page (`__page_is_zero`;
//!   with `PAGEMAP_SCAN`, which CRIU uses on this kernel, also the huge zero page:
//!   `PAGE_IS_PFNZERO` in `pagemap-cache.c` `pmc_fill`);
//! - in a private *file* mapping, only pages that are not file pages (`PME_FILE` clear): the
//!   anonymous copies made by copy-on-write. Unmodified file pages come from the file on restore.
//! - `[vdso]` and AIO rings (`/[aio]`) are dumped whole, present or not
//!   (`should_dump_entire_vma`); so are they here.
//!
//! Shared mappings are **not** scanned: shared file mappings are not dumped at all, and shared
//! anonymous memory (`MAP_SHARED|MAP_ANONYMOUS`, memfd, SysV shm) is dumped by CRIU once per
//! object as shmem images (`add_shmem_area`), not in a process's pagemap. [`ScanStats`] counts
//! them in `vmas_shared` / `shared_bytes`; their content travels in the final difference.
//!
//! Known differences from CRIU, all on the side of sending *more* during pre-copy (never less
//! than the dump needs, because the final round diffs the real dump): `MAP_DROPPABLE` VMAs
//! (`VmFlags: dp`, invisible in `maps`) are scanned though CRIU skips them; zero-page detection
//! needs the PFNs in pagemap, which only a `CAP_SYS_ADMIN` reader sees: without it, pages mapping
//! the zero page are reported with `zero: true` instead of being skipped; `VM_IO`/`VM_PFNMAP`
//! private mappings (CRIU refuses to dump them) fail to read and are skipped.
//!
//! # Races
//!
//! The tree runs while it is scanned. A page that vanishes between the pagemap read and the
//! copy (`munmap`, `mprotect`) makes `process_vm_readv` stop early: the rest of that run is
//! skipped and counted in [`ScanStats::pages_vanished`]. A page dropped with `MADV_DONTNEED`
//! reads as zeros (the read maps the zero page), which is its true content at that moment. A
//! page being written during the copy may be torn; its hash is the hash of the bytes handed to
//! the callback, so the caller must send exactly `PageRef::data`; if the page then differs, the
//! next scan sees it as changed. A process that exits during the scan is skipped
//! ([`ScanStats::processes_vanished`]; pages already handed out for it stay handed out). A pid
//! reused by an unrelated process between [`tree`] (or the list given to
//! [`Scanner::scan_procs`]) and the scan would be scanned in its place. Reading a swapped-out
//! page swaps it in, as CRIU's dump does. None of this matters for the correctness of a
//! migration: the final round compares the frozen tree's CRIU dump with what the destination
//! holds.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, IoSliceMut, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// The page size this module works in. [`Scanner::scan`] fails with [`MemError::PageSize`] on
/// a kernel with another page size (some arm64 kernels use 16 or 64 KiB pages).
pub const PAGE_SIZE: usize = 4096;

/// The most iovecs handed to one `process_vm_readv` call (the kernel's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// The default size of a scan's batch buffer: the most bytes copied per `process_vm_readv` call
/// and the bound on the memory a scan holds.
pub const DEFAULT_BATCH_BYTES: usize = 4 << 20;

/// Pagemap entries read per `pread` (8 bytes each, so 64 KiB covering 32 MiB of address space).
const PAGEMAP_CHUNK: usize = 8192;

/// Pages per huge (PMD-mapped) page with 4 KiB pages: the huge zero page spans this many PFNs.
const HPAGE_PAGES: u64 = 512;

/// Errors of tree discovery and memory scans.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The root process of a tree does not exist (any more).
    #[error("process {pid} does not exist")]
    NoProcess {
        /// Host pid asked for.
        pid: i32,
    },
    /// A `/proc` file could not be opened or read (other than because the process is gone).
    #[error("reading {}: {source}", path.display())]
    Proc {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: io::Error,
    },
    /// A `/proc` file held a line this module cannot parse.
    #[error("cannot parse a line of {}: {line:?}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The offending line.
        line: String,
    },
    /// `process_vm_readv` was refused (permission: the reader needs ptrace access).
    #[error("reading the memory of process {pid}: {source}")]
    Read {
        /// Host pid of the process.
        pid: i32,
        /// The error `process_vm_readv` returned.
        #[source]
        source: Errno,
    },
    /// The kernel's page size is not [`PAGE_SIZE`].
    #[error("page size is {found} bytes; tether's memory scan supports {PAGE_SIZE} only")]
    PageSize {
        /// The kernel's page size.
        found: usize,
    },
}

/// A process of a tree: its host pid and its pid inside its own (innermost) PID namespace,
/// the last field of `NSpid` in `/proc/PID/status`. CRIU names images by the inner pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProcId {
    /// Pid as seen from this (the scanning) process's namespace.
    pub host: i32,
    /// Pid inside the process's innermost PID namespace (equal to `host` if none).
    pub ns: i32,
}

/// All processes of the tree rooted at `root`: the root first, then its descendants depth
/// first, children in ascending pid order. Children are read from
/// `/proc/PID/task/*/children` of every thread, since a child's parent may be any thread.
/// Processes that exit during the walk are left out; only a missing root is an error.
pub fn tree(root: i32) -> Result<Vec<ProcId>, MemError> {
    let root_ns = match ns_pid(root) {
        Ok(ns) => ns,
        Err(e) if is_gone(&e) => return Err(MemError::NoProcess { pid: root }),
        Err(e) => return Err(proc_err(format!("/proc/{root}/status"), e)),
    };
    let mut out = vec![ProcId {
        host: root,
        ns: root_ns,
    }];
    let mut seen = HashSet::from([root]);
    let mut stack = children(root)?;
    stack.reverse();
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        let ns = match ns_pid(pid) {
            Ok(ns) => ns,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(proc_err(format!("/proc/{pid}/status"), e)),
        };
        out.push(ProcId { host: pid, ns });
        let mut kids = children(pid)?;
        kids.reverse();
        stack.extend(kids);
    }
    Ok(out)
}

/// The sockets the tree rooted at `root` holds: distinct socket inodes among its processes'
/// descriptors (what CRIU dumps one by one). Descriptors that close during the walk are left
/// out.
pub fn tree_sockets(root: i32) -> Result<u64, MemError> {
    let mut inodes = HashSet::new();
    for p in tree(root)? {
        let dir = format!("/proc/{}/fd", p.host);
        let entries = match std::fs::read_dir(&dir) {
            Ok(d) => d,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(proc_err(dir, e)),
        };
        for e in entries.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                if let Some(ino) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    inodes.insert(ino);
                }
            }
        }
    }
    Ok(inodes.len() as u64)
}

/// The innermost-namespace pid of `pid`, from `/proc/PID/status`.
fn ns_pid(pid: i32) -> io::Result<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    // Kernels before 4.1 have no NSpid line: no nested namespace support, the pid is the pid.
    Ok(parse_nspid(&status).unwrap_or(pid))
}

/// The last field of the `NSpid:` line of a `/proc/PID/status` text.
fn parse_nspid(status: &str) -> Option<i32> {
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// The children of every thread of `pid`, sorted and deduplicated; empty if `pid` is gone.
fn children(pid: i32) -> Result<Vec<i32>, MemError> {
    let dir = format!("/proc/{pid}/task");
    let entries = match std::fs::read_dir(&dir) {
        Ok(d) => d,
        Err(e) if is_gone(&e) => return Ok(Vec::new()),
        Err(e) => return Err(proc_err(dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(proc_err(dir, e)),
        };
        let path = entry.path().join("children");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                for tok in text.split_whitespace() {
                    let child = tok.parse().map_err(|_| MemError::Parse {
                        path: path.clone(),
                        line: text.clone(),
                    })?;
                    out.push(child);
                }
            }
            // The thread exited between the listing and the read.
            Err(e) if is_gone(&e) => continue,
            Err(e) => return Err(proc_err(path, e)),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Whether an I/O error on a `/proc/PID/...` file means the process (or thread) is gone.
fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

fn proc_err(path: impl Into<PathBuf>, source: io::Error) -> MemError {
    MemError::Proc {
        path: path.into(),
        source,
    }
}

/// Hash of a page's content: xxh3-64 with the default seed. The destination and the comparison
/// with CRIU image pages must use this same function.
pub fn page_hash(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Whether every byte of `data` is zero. Branch-free within 256-byte blocks, so the compiler
/// vectorises it; a non-zero page usually returns after its first block.
pub fn is_zero(data: &[u8]) -> bool {
    let mut blocks = data.chunks_exact(256);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// One page as seen by a scan.
#[derive(Clone, Copy)]
pub struct PageRef<'a> {
    /// The process the page belongs to.
    pub pid: ProcId,
    /// The page's virtual address in that process (page-aligned).
    pub vaddr: u64,
    /// The page's content as copied ([`PAGE_SIZE`] bytes). Send these very bytes: `hash` is
    /// theirs, and the page may have changed since.
    pub data: &'a [u8],
    /// [`page_hash`] of `data`.
    pub hash: u64,
    /// Whether `data` is all zero (a frame for it needs a header only).
    pub zero: bool,
}

impl std::fmt::Debug for PageRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageRef")
            .field("pid", &self.pid)
            .field("vaddr", &format_args!("{:#x}", self.vaddr))
            .field("len", &self.data.len())
            .field("hash", &format_args!("{:#018x}", self.hash))
            .field("zero", &self.zero)
            .finish()
    }
}

/// Figures of one scan.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ScanStats {
    /// Processes scanned.
    pub processes: usize,
    /// Processes that exited before or during their scan (skipped).
    pub processes_vanished: usize,
    /// Dumpable VMAs scanned.
    pub vmas: usize,
    /// Shared mappings not scanned (CRIU dumps shared memory separately, see the module docs).
    pub vmas_shared: usize,
    /// Virtual size of those shared mappings, in bytes.
    pub shared_bytes: u64,
    /// Pages read and handed to the callback.
    pub pages_present: u64,
    /// Of those, pages whose content is all zero.
    pub pages_zero: u64,
    /// Present pages skipped because they map the kernel's (huge) zero page, as CRIU does.
    pub pages_zero_pfn: u64,
    /// Pages that vanished between the pagemap read and the copy (skipped).
    pub pages_vanished: u64,
    /// Bytes copied out of the tree.
    pub bytes_read: u64,
    /// Wall time of the scan.
    pub elapsed: Duration,
}

/// Reads every dumpable present page of a process tree, in large batches, and hands each page
/// to a callback. Holds reusable buffers: keep one per pre-copy session.
pub struct Scanner {
    /// Batch buffer: the destination of one `process_vm_readv` call.
    buf: PageBuf,
    /// Capacity of a batch in pages (`buf.len() / PAGE_SIZE`).
    batch_pages: usize,
    /// Runs of contiguous pages queued for the next copy, in address order.
    runs: Vec<Run>,
    /// Pages queued in `runs`.
    queued: usize,
    /// How the queued runs are read.
    method: ReadMethod,
    /// Remote iovecs of the current call.
    iovs: Vec<RemoteIoVec>,
    /// Raw pagemap bytes of the current chunk.
    pagemap: Vec<u8>,
    /// `/proc/PID/maps` text of the current process.
    maps: String,
    /// PFNs of the kernel's zero pages, when pagemap shows PFNs.
    zero: ZeroPfns,
    /// [`page_hash`] of a zero page.
    zero_hash: u64,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("batch_pages", &self.batch_pages)
            .field("zero", &self.zero)
            .finish_non_exhaustive()
    }
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

/// A page-aligned buffer of whole pages.
///
/// Alignment matters for speed: the kernel copies each source page (page-aligned) into it, and
/// a destination 16 bytes past a page boundary (where malloc puts a large allocation) makes
/// every store alias the next loads modulo 4 KiB; measured here, a scan ran 2-3 times slower.
struct PageBuf {
    mem: Vec<u8>,
    /// Offset of the first page boundary in `mem`.
    off: usize,
    len: usize,
}

impl PageBuf {
    fn new(pages: usize) -> Self {
        let len = pages * PAGE_SIZE;
        let mem = vec![0u8; len + PAGE_SIZE];
        // `mem` is never resized, so its address, and this offset, stay valid.
        let addr = mem.as_ptr() as usize;
        let off = addr.next_multiple_of(PAGE_SIZE) - addr;
        Self { mem, off, len }
    }

    fn get(&self) -> &[u8] {
        &self.mem[self.off..self.off + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.off..self.off + self.len]
    }
}

/// A run of contiguous pages to copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    addr: u64,
    pages: usize,
}

/// How a batch is copied out of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadMethod {
    /// `process_vm_readv`: readable mappings.
    Readv,
    /// `pread` on `/proc/PID/mem`, which reads non-readable (`PROT_NONE`) mappings too.
    Mem,
}

/// The process being scanned.
struct ProcCtx {
    pid: ProcId,
    /// `/proc/PID/mem`, opened on first need.
    mem: Option<File>,
    /// The process exited during its scan.
    gone: bool,
}

impl Scanner {
    /// A scanner with a [`DEFAULT_BATCH_BYTES`] buffer.
    pub fn new() -> Self {
        Self::with_batch_bytes(DEFAULT_BATCH_BYTES)
    }

    /// A scanner whose batch buffer (bytes per copy, and the scan's memory bound) is `bytes`,
    /// rounded to whole pages, at least one page.
    pub fn with_batch_bytes(bytes: usize) -> Self {
        let batch_pages = (bytes / PAGE_SIZE).max(1);
        let zero_page = [0u8; PAGE_SIZE];
        Self {
            buf: PageBuf::new(batch_pages),
            batch_pages,
            runs: Vec::new(),
            queued: 0,
            method: ReadMethod::Readv,
            iovs: Vec::with_capacity(MAX_IOVECS),
            pagemap: vec![0; PAGEMAP_CHUNK * 8],
            maps: String::new(),
            zero: zero_pfns(),
            zero_hash: page_hash(&zero_page),
        }
    }

    /// Scans the tree rooted at `root` (see [`tree`]) and calls `f` for every dumpable page,
    /// in (process, address) order. See the module docs for which pages and for races.
    pub fn scan(&mut self, root: i32, f: impl FnMut(PageRef<'_>)) -> Result<ScanStats, MemError> {
        let start = Instant::now();
        let procs = tree(root)?;
        let mut stats = self.scan_procs(&procs, f)?;
        stats.elapsed = start.elapsed();
        Ok(stats)
    }

    /// Scans the given processes, in the given order (for a fixed set across rounds). Processes
    /// that no longer exist are skipped and counted as vanished.
    pub fn scan_procs(
        &mut self,
        procs: &[ProcId],
        mut f: impl FnMut(PageRef<'_>),
    ) -> Result<ScanStats, MemError> {
        let start = Instant::now();
        check_page_size()?;
        let mut stats = ScanStats::default();
        for &pid in procs {
            let mut ctx = ProcCtx {
                pid,
                mem: None,
                gone: false,
            };
            let res = self.scan_process(&mut ctx, &mut f, &mut stats);
            self.runs.clear();
            self.queued = 0;
            res?;
            if ctx.gone {
                stats.processes_vanished += 1;
            } else {
                stats.processes += 1;
            }
        }
        stats.elapsed = start.elapsed();
        Ok(stats)
    }

    fn scan_process(
        &mut self,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        let host = ctx.pid.host;
        let maps_path = format!("/proc/{host}/maps");
        let mut maps = std::mem::take(&mut self.maps);
        maps.clear();
        let read = File::open(&maps_path).and_then(|mut file| file.read_to_string(&mut maps));
        let res = match read {
            Err(e) if is_gone(&e) => {
                ctx.gone = true;
                Ok(())
            }
            Err(e) => Err(proc_err(maps_path, e)),
            Ok(_) => self.scan_maps(&maps, &maps_path, ctx, f, stats),
        };
        self.maps = maps;
        res
    }

    fn scan_maps(
        &mut self,
        maps: &str,
        maps_path: &str,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        let host = ctx.pid.host;
        let pagemap_path = format!("/proc/{host}/pagemap");
        let pagemap = match File::open(&pagemap_path) {
            Ok(file) => file,
            Err(e) if is_gone(&e) => {
                ctx.gone = true;
                return Ok(());
            }
            Err(e) => return Err(proc_err(pagemap_path, e)),
        };
        for line in maps.lines() {
            let vma = parse_maps_line(line).ok_or_else(|| MemError::Parse {
                path: maps_path.into(),
                line: line.to_owned(),
            })?;
            let class = classify(&vma);
            match class {
                VmaClass::Skip => continue,
                VmaClass::Shared => {
                    stats.vmas_shared += 1;
                    stats.shared_bytes += vma.end - vma.start;
                    continue;
                }
                VmaClass::AnonPrivate | VmaClass::FilePrivate | VmaClass::Entire => {}
            }
            stats.vmas += 1;
            let method = if vma.read {
                ReadMethod::Readv
            } else {
                ReadMethod::Mem
            };
            if class == VmaClass::Entire {
                let pages = pages_between(vma.start, vma.end);
                self.queue(vma.start, pages, method, ctx, f, stats)?;
            } else {
                self.scan_vma(&vma, class, &pagemap, &pagemap_path, method, ctx, f, stats)?;
            }
            if ctx.gone {
                return Ok(());
            }
        }
        self.flush(ctx, f, stats)
    }

    /// Decodes the pagemap of one VMA chunk by chunk and queues its dumpable pages.
    #[allow(clippy::too_many_arguments)]
    fn scan_vma(
        &mut self,
        vma: &MapsEntry<'_>,
        class: VmaClass,
        pagemap: &File,
        pagemap_path: &str,
        method: ReadMethod,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        let file_private = class == VmaClass::FilePrivate;
        let mut addr = vma.start;
        while addr < vma.end {
            let want = pages_between(addr, vma.end).min(PAGEMAP_CHUNK);
            let got = match read_pagemap(pagemap, addr, want, &mut self.pagemap) {
                Ok(n) => n,
                Err(e) if is_gone(&e) => {
                    ctx.gone = true;
                    return Ok(());
                }
                Err(e) => return Err(proc_err(pagemap_path, e)),
            };
            if got == 0 {
                // The address space went away under us (exit, or the VMA was unmapped).
                return Ok(());
            }
            let mut run: Option<Run> = None;
            for i in 0..got {
                let entry = PagemapEntry(u64_at(&self.pagemap, i));
                let page = addr + (i * PAGE_SIZE) as u64;
                let dump = match entry.should_dump(file_private) {
                    false => false,
                    true if self.zero.is_zero_pfn(entry.pfn()) => {
                        stats.pages_zero_pfn += 1;
                        false
                    }
                    true => true,
                };
                match (&mut run, dump) {
                    (Some(r), true) => r.pages += 1,
                    (None, true) => {
                        run = Some(Run {
                            addr: page,
                            pages: 1,
                        })
                    }
                    (Some(r), false) => {
                        let r = *r;
                        run = None;
                        self.queue(r.addr, r.pages, method, ctx, f, stats)?;
                    }
                    (None, false) => {}
                }
                if ctx.gone {
                    return Ok(());
                }
            }
            if let Some(r) = run {
                self.queue(r.addr, r.pages, method, ctx, f, stats)?;
            }
            addr += (got * PAGE_SIZE) as u64;
        }
        Ok(())
    }

    /// Queues `pages` pages from `addr` for copying; copies whenever the batch is full.
    fn queue(
        &mut self,
        mut addr: u64,
        mut pages: usize,
        method: ReadMethod,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        if self.queued > 0 && self.method != method {
            self.flush(ctx, f, stats)?;
        }
        self.method = method;
        while pages > 0 && !ctx.gone {
            if self.queued == self.batch_pages {
                self.flush(ctx, f, stats)?;
            }
            let take = pages.min(self.batch_pages - self.queued);
            match self.runs.last_mut() {
                Some(last) if last.addr + (last.pages * PAGE_SIZE) as u64 == addr => {
                    last.pages += take;
                }
                _ => {
                    if self.runs.len() == MAX_IOVECS {
                        self.flush(ctx, f, stats)?;
                        continue;
                    }
                    self.runs.push(Run { addr, pages: take });
                }
            }
            self.queued += take;
            pages -= take;
            addr += (take * PAGE_SIZE) as u64;
        }
        Ok(())
    }

    /// Copies the queued runs and hands their pages to `f`.
    fn flush(
        &mut self,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        let res = if ctx.gone || self.runs.is_empty() {
            Ok(())
        } else {
            match self.method {
                ReadMethod::Readv => self.flush_readv(ctx, f, stats),
                ReadMethod::Mem => self.flush_mem(ctx, f, stats),
            }
        };
        self.runs.clear();
        self.queued = 0;
        res
    }

    fn flush_readv(
        &mut self,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        let pid = Pid::from_raw(ctx.pid.host);
        // Position: run `ri`, of which `done` pages are handled.
        let mut ri = 0;
        let mut done = 0;
        while ri < self.runs.len() {
            self.iovs.clear();
            let mut bytes = 0;
            for (k, run) in self.runs[ri..].iter().enumerate() {
                let skip = if k == 0 { done } else { 0 };
                let len = (run.pages - skip) * PAGE_SIZE;
                self.iovs.push(RemoteIoVec {
                    base: (run.addr + (skip * PAGE_SIZE) as u64) as usize,
                    len,
                });
                bytes += len;
            }
            let n = {
                let mut local = [IoSliceMut::new(&mut self.buf.get_mut()[..bytes])];
                match process_vm_readv(pid, &mut local, &self.iovs) {
                    Ok(n) => n,
                    Err(Errno::ESRCH) => {
                        ctx.gone = true;
                        return Ok(());
                    }
                    Err(source @ (Errno::EPERM | Errno::EACCES | Errno::EINVAL)) => {
                        return Err(MemError::Read {
                            pid: ctx.pid.host,
                            source,
                        });
                    }
                    // EFAULT (unmapped or no longer readable), ENOMEM, EIO, ...: the first
                    // page could not be copied.
                    Err(_) => 0,
                }
            };
            stats.bytes_read += n as u64;
            let mut good = n / PAGE_SIZE;
            let mut pos = 0;
            while good > 0 {
                let run = self.runs[ri];
                let take = (run.pages - done).min(good);
                for p in 0..take {
                    let vaddr = run.addr + ((done + p) * PAGE_SIZE) as u64;
                    let data = &self.buf.get()[(pos + p) * PAGE_SIZE..][..PAGE_SIZE];
                    deliver(ctx.pid, vaddr, data, self.zero_hash, f, stats);
                }
                pos += take;
                good -= take;
                done += take;
                if done == run.pages {
                    ri += 1;
                    done = 0;
                }
            }
            if n < bytes {
                // The copy stopped at page `done` of run `ri`: that page vanished (unmapped,
                // made unreadable, a file hole...). Skip the rest of its run, which most likely
                // went with it, and go on with the next run.
                stats.pages_vanished += (self.runs[ri].pages - done) as u64;
                ri += 1;
                done = 0;
            }
        }
        Ok(())
    }

    fn flush_mem(
        &mut self,
        ctx: &mut ProcCtx,
        f: &mut dyn FnMut(PageRef<'_>),
        stats: &mut ScanStats,
    ) -> Result<(), MemError> {
        if ctx.mem.is_none() {
            let path = format!("/proc/{}/mem", ctx.pid.host);
            match File::open(&path) {
                Ok(file) => ctx.mem = Some(file),
                Err(e) if is_gone(&e) => {
                    ctx.gone = true;
                    return Ok(());
                }
                Err(e) => return Err(proc_err(path, e)),
            }
        }
        let Some(mem) = &ctx.mem else {
            return Ok(());
        };
        for run in &self.runs {
            let bytes = run.pages * PAGE_SIZE;
            let dst = &mut self.buf.get_mut()[..bytes];
            let mut got = 0;
            while got < bytes {
                match mem.read_at(&mut dst[got..], run.addr + got as u64) {
                    Ok(0) => break,
                    Ok(k) => got += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // EIO / EFAULT: the page is gone; skip the rest of the run as above.
                    Err(_) => break,
                }
            }
            stats.bytes_read += got as u64;
            let good = got / PAGE_SIZE;
            for p in 0..good {
                let vaddr = run.addr + (p * PAGE_SIZE) as u64;
                let data = &self.buf.get()[p * PAGE_SIZE..][..PAGE_SIZE];
                deliver(ctx.pid, vaddr, data, self.zero_hash, f, stats);
            }
            stats.pages_vanished += (run.pages - good) as u64;
        }
        Ok(())
    }
}

/// Hashes one copied page and hands it to `f`.
fn deliver(
    pid: ProcId,
    vaddr: u64,
    data: &[u8],
    zero_hash: u64,
    f: &mut dyn FnMut(PageRef<'_>),
    stats: &mut ScanStats,
) {
    let zero = is_zero(data);
    let hash = if zero { zero_hash } else { page_hash(data) };
    stats.pages_present += 1;
    stats.pages_zero += u64::from(zero);
    f(PageRef {
        pid,
        vaddr,
        data,
        hash,
        zero,
    });
}

fn pages_between(start: u64, end: u64) -> usize {
    ((end - start) / PAGE_SIZE as u64) as usize
}

/// Fails unless the kernel's page size is [`PAGE_SIZE`].
fn check_page_size() -> Result<(), MemError> {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE) {
        Ok(Some(n)) if n as usize == PAGE_SIZE => Ok(()),
        Ok(Some(n)) => Err(MemError::PageSize { found: n as usize }),
        // sysconf(_SC_PAGE_SIZE) cannot fail on Linux; do not refuse to work if it did.
        _ => Ok(()),
    }
}

/// Reads the pagemap entries of `pages` pages from `vaddr` into `out`; returns how many were
/// read (fewer if the address space ended, 0 if the process is gone).
fn read_pagemap(file: &File, vaddr: u64, pages: usize, out: &mut Vec<u8>) -> io::Result<usize> {
    let bytes = pages * 8;
    if out.len() < bytes {
        out.resize(bytes, 0);
    }
    let offset = vaddr / PAGE_SIZE as u64 * 8;
    let mut got = 0;
    while got < bytes {
        match file.read_at(&mut out[got..bytes], offset + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got / 8)
}

/// The native-endian u64 at index `i` of a byte buffer.
fn u64_at(bytes: &[u8], i: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
    u64::from_ne_bytes(word)
}

/// One `/proc/PID/pagemap` entry (Documentation/admin-guide/mm/pagemap.rst).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    const PRESENT: u64 = 1 << 63;
    const SWAP: u64 = 1 << 62;
    const FILE: u64 = 1 << 61;
    const GUARD: u64 = 1 << 58;
    const EXCLUSIVE: u64 = 1 << 56;
    const SOFT_DIRTY: u64 = 1 << 55;
    const PFN_MASK: u64 = (1 << 55) - 1;

    /// The page is in RAM.
    pub fn present(self) -> bool {
        self.0 & Self::PRESENT != 0
    }
    /// The page is swapped out.
    pub fn swapped(self) -> bool {
        self.0 & Self::SWAP != 0
    }
    /// The page is a file page or shared anonymous (not a private anonymous page).
    pub fn file(self) -> bool {
        self.0 & Self::FILE != 0
    }
    /// The page is in a guard region (`MADV_GUARD_INSTALL`, Linux 6.15+).
    pub fn guard(self) -> bool {
        self.0 & Self::GUARD != 0
    }
    /// The page is mapped exclusively by this process.
    pub fn exclusive(self) -> bool {
        self.0 & Self::EXCLUSIVE != 0
    }
    /// The soft-dirty bit (always clear on kernels without soft-dirty).
    pub fn soft_dirty(self) -> bool {
        self.0 & Self::SOFT_DIRTY != 0
    }
    /// The page frame number, if the page is present and the reader may see PFNs
    /// (`CAP_SYS_ADMIN`; otherwise the kernel reports 0).
    pub fn pfn(self) -> Option<u64> {
        let pfn = self.0 & Self::PFN_MASK;
        (self.present() && pfn != 0).then_some(pfn)
    }
    /// CRIU's `should_dump_page`, less the zero-page test: present or swapped, not a guard
    /// region, and in a private file mapping (`file_private`) not a file page.
    pub fn should_dump(self, file_private: bool) -> bool {
        if self.guard() || (file_private && self.file()) {
            return false;
        }
        self.present() || self.swapped()
    }
}

/// The PFNs of the kernel's zero page and huge zero page, as far as they could be found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ZeroPfns {
    /// The 4 KiB zero page.
    small: Option<u64>,
    /// First PFN of the huge (PMD-sized) zero page.
    huge: Option<u64>,
}

impl ZeroPfns {
    fn is_zero_pfn(&self, pfn: Option<u64>) -> bool {
        let Some(pfn) = pfn else { return false };
        self.small == Some(pfn)
            || self
                .huge
                .is_some_and(|h| (h..h + HPAGE_PAGES).contains(&pfn))
    }
}

/// The zero-page PFNs, found once per process.
fn zero_pfns() -> ZeroPfns {
    static ZERO: OnceLock<ZeroPfns> = OnceLock::new();
    *ZERO.get_or_init(detect_zero_pfns)
}

/// Finds the zero pages' PFNs as CRIU's `init_zero_page_pfn` does: read never-written anonymous
/// memory, which then maps the zero page, and look its PFN up in `/proc/self/pagemap`. Each
/// candidate is confirmed with `/proc/kpageflags` (`KPF_ZERO_PAGE`): an unconfirmed PFN is not
/// used, since skipping pages by a wrong PFN would hide real pages from pre-copy. Without
/// `CAP_SYS_ADMIN` PFNs read as 0 and nothing is found; zero pages are then reported with
/// `zero: true` instead. (The huge zero page is found only where read faults map it, i.e. with
/// transparent huge pages in effect for anonymous memory; not on the development VM, where
/// that branch is therefore untested.)
fn detect_zero_pfns() -> ZeroPfns {
    const KPF_ZERO_PAGE: u64 = 1 << 24;
    const KPF_THP: u64 = 1 << 22;
    const HPAGE: usize = HPAGE_PAGES as usize * PAGE_SIZE;
    // A zeroed Vec this large comes from calloc via mmap (above glibc's largest mmap threshold,
    // 32 MiB) and is never written. The length is not a multiple of 2 MiB, so the mapping is not
    // THP-aligned at both ends: a page in a partial 2 MiB block at the start or at the end maps
    // the small zero page even when THP maps the huge zero page into whole blocks.
    let len = 40 * 1024 * 1024 + 3 * PAGE_SIZE;
    let region = vec![0u8; len];
    // Opaque to the optimiser, which may otherwise fold loads from calloc'ed memory to 0.
    let region: &[u8] = std::hint::black_box(&region);
    let base = region.as_ptr() as usize;
    let first = base.next_multiple_of(PAGE_SIZE);
    let last = (base + len) / PAGE_SIZE * PAGE_SIZE - PAGE_SIZE;
    let block = base.next_multiple_of(HPAGE);
    let candidates = [
        first,
        first + PAGE_SIZE,
        last - PAGE_SIZE,
        last,
        block + PAGE_SIZE,
        block + 2 * PAGE_SIZE,
    ];
    for &addr in &candidates {
        std::hint::black_box(region[addr - base]);
    }
    let (Ok(pagemap), Ok(kflags)) = (
        File::open("/proc/self/pagemap"),
        File::open("/proc/kpageflags"),
    ) else {
        return ZeroPfns::default();
    };
    let entry = |addr: usize| -> Option<u64> {
        let mut word = [0u8; 8];
        pagemap
            .read_exact_at(&mut word, (addr / PAGE_SIZE * 8) as u64)
            .ok()?;
        PagemapEntry(u64::from_ne_bytes(word)).pfn()
    };
    let flags = |pfn: u64| -> Option<u64> {
        let mut word = [0u8; 8];
        kflags.read_exact_at(&mut word, pfn * 8).ok()?;
        Some(u64::from_ne_bytes(word))
    };
    let mut zero = ZeroPfns::default();
    for &addr in &candidates {
        let Some(pfn) = entry(addr) else { continue };
        let Some(fl) = flags(pfn) else { continue };
        if fl & KPF_ZERO_PAGE == 0 {
            continue;
        }
        if fl & KPF_THP == 0 {
            zero.small.get_or_insert(pfn);
        } else {
            let head = pfn.checked_sub(((addr % HPAGE) / PAGE_SIZE) as u64);
            if let Some(head) = head.filter(|h| h % HPAGE_PAGES == 0) {
                zero.huge.get_or_insert(head);
            }
        }
    }
    zero
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapsEntry<'a> {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// `r`: readable.
    pub read: bool,
    /// `w`: writable.
    pub write: bool,
    /// `x`: executable.
    pub exec: bool,
    /// `s` (shared) rather than `p` (private).
    pub shared: bool,
    /// Offset into the file.
    pub offset: u64,
    /// Device major number of the file.
    pub dev_major: u32,
    /// Device minor number of the file.
    pub dev_minor: u32,
    /// Inode of the file; 0 for anonymous memory.
    pub inode: u64,
    /// The path or pseudo-path (`[heap]`, `[anon:name]`...), possibly with spaces and a
    /// ` (deleted)` suffix; empty for plain anonymous memory.
    pub path: &'a str,
}

/// Whether any mapping of `pid` is registered with a userfaultfd for missing pages (`um` in its
/// smaps `VmFlags`): the mark of a lazy restore whose memory is still being filled in. Such
/// pages are absent until they come, so a dump or pre-copy scan taken now would miss them.
pub fn userfaultfd_registered(pid: i32) -> Result<bool, MemError> {
    let path = format!("/proc/{pid}/smaps");
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(smaps_has_uffd(&text)),
        Err(e) if is_gone(&e) => Err(MemError::NoProcess { pid }),
        Err(e) => Err(proc_err(path, e)),
    }
}

/// Whether an smaps text lists a mapping with the `um` (userfaultfd missing) flag.
fn smaps_has_uffd(smaps: &str) -> bool {
    smaps
        .lines()
        .filter_map(|l| l.strip_prefix("VmFlags:"))
        .any(|flags| flags.split_whitespace().any(|f| f == "um"))
}

/// Parses one line of `/proc/PID/maps`:
/// `start-end perms offset major:minor inode [path]`, the path being everything after the
/// padding (it may contain spaces; newlines in it are escaped by the kernel as `\012`).
pub fn parse_maps_line(line: &str) -> Option<MapsEntry<'_>> {
    fn field(s: &str) -> Option<(&str, &str)> {
        let s = s.trim_start_matches(' ');
        let end = s.find(' ').unwrap_or(s.len());
        let (tok, rest) = s.split_at(end);
        (!tok.is_empty()).then_some((tok, rest))
    }
    let (range, rest) = field(line)?;
    let (perms, rest) = field(rest)?;
    let (offset, rest) = field(rest)?;
    let (dev, rest) = field(rest)?;
    let (inode, rest) = field(rest)?;
    let (start, end) = range.split_once('-')?;
    let (dev_major, dev_minor) = dev.split_once(':')?;
    let perms = perms.as_bytes();
    if perms.len() != 4 {
        return None;
    }
    let shared = match perms[3] {
        b's' => true,
        b'p' => false,
        _ => return None,
    };
    let entry = MapsEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(dev_major, 16).ok()?,
        dev_minor: u32::from_str_radix(dev_minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path: rest.trim_start_matches(' '),
    };
    (entry.start <= entry.end).then_some(entry)
}

/// What a scan does with a VMA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmaClass {
    /// Private anonymous memory (heap, stacks, `[anon:...]`, private hugetlb): present and
    /// swapped pages.
    AnonPrivate,
    /// Private file mapping: present and swapped pages that are not file pages (COW copies).
    FilePrivate,
    /// Dumped whole by CRIU whether present or not: `[vdso]`, AIO rings.
    Entire,
    /// Shared mapping: not in a process's pagemap image (see the module docs).
    Shared,
    /// Never dumped: `[vvar]`, `[vvar_vclock]`, `[vsyscall]`, `[vectors]`, `[uprobes]`.
    Skip,
}

/// Classifies a VMA as CRIU does for its page dump (see the module docs).
pub fn classify(vma: &MapsEntry<'_>) -> VmaClass {
    match vma.path {
        "[vvar]" | "[vvar_vclock]" | "[vsyscall]" | "[vectors]" | "[uprobes]" => {
            return VmaClass::Skip
        }
        "[vdso]" => return VmaClass::Entire,
        p if p.starts_with("/[aio]") && vma.inode != 0 => return VmaClass::Entire,
        _ => {}
    }
    if vma.shared {
        VmaClass::Shared
    } else if vma.inode == 0 {
        VmaClass::AnonPrivate
    } else {
        VmaClass::FilePrivate
    }
}

/// How fast a process tree writes memory, measured by content (no soft-dirty bits).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DirtyRate {
    /// The wait between the two scans, as asked for.
    pub window: Duration,
    /// Time between the starts of the two scans (first scan plus window): the interval over
    /// which a page's two reads lie apart, and the one the rates are computed over.
    pub interval: Duration,
    /// Pages read by the second scan.
    pub pages_scanned: u64,
    /// Pages whose hash changed between the scans, plus pages present only in the second.
    pub pages_changed: u64,
    /// `pages_changed` per second of `interval`.
    pub pages_per_sec: f64,
    /// The same in MB/s (10^6 bytes per second).
    pub mb_per_sec: f64,
    /// Duration of the second scan.
    pub scan_time: Duration,
}

/// Measures the dirty rate of the tree rooted at `root`: scans it, waits `window`, scans again
/// and counts the pages whose content changed, plus pages that became present. The tree is
/// disturbed only by the reads. A page written many times in the interval counts once: this is
/// the rate at which *distinct* pages get dirty, which is what pre-copy has to resend.
pub fn measure_dirty_rate(root: i32, window: Duration) -> Result<DirtyRate, MemError> {
    let mut scanner = Scanner::new();
    // Host pid -> (vaddr, hash), in address order as the scan delivers them.
    let mut first: HashMap<i32, Vec<(u64, u64)>> = HashMap::new();
    let t0 = Instant::now();
    scanner.scan(root, |p| {
        first.entry(p.pid.host).or_default().push((p.vaddr, p.hash));
    })?;
    std::thread::sleep(window);
    let t1 = Instant::now();
    let mut scanned = 0u64;
    let mut changed = 0u64;
    let mut cursor: Option<(i32, usize)> = None;
    let second = scanner.scan(root, |p| {
        scanned += 1;
        let idx = match &mut cursor {
            Some((pid, idx)) if *pid == p.pid.host => idx,
            _ => &mut cursor.insert((p.pid.host, 0)).1,
        };
        let before = first.get(&p.pid.host).map(Vec::as_slice).unwrap_or(&[]);
        while *idx < before.len() && before[*idx].0 < p.vaddr {
            *idx += 1;
        }
        let same = before.get(*idx) == Some(&(p.vaddr, p.hash));
        changed += u64::from(!same);
    })?;
    let interval = t1 - t0;
    let secs = interval.as_secs_f64().max(1e-9);
    let pages_per_sec = changed as f64 / secs;
    Ok(DirtyRate {
        window,
        interval,
        pages_scanned: scanned,
        pages_changed: changed,
        pages_per_sec,
        mb_per_sec: pages_per_sec * PAGE_SIZE as f64 / 1e6,
        scan_time: second.elapsed,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};

    #[test]
    fn maps_lines_parse() {
        let l = "7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 ";
        let e = parse_maps_line(l).unwrap();
        assert_eq!((e.start, e.end), (0x7f3a1c000000, 0x7f3a1c021000));
        assert!(e.read && e.write && !e.exec && !e.shared);
        assert_eq!((e.inode, e.path), (0, ""));
        assert_eq!(classify(&e), VmaClass::AnonPrivate);

        let l = "55d0c0a00000-55d0c0a21000 r-xp 00002000 fd:01 1234567                    /usr/bin/my prog (deleted)";
        let e = parse_maps_line(l).unwrap();
        assert_eq!(e.path, "/usr/bin/my prog (deleted)");
        assert_eq!((e.dev_major, e.dev_minor, e.offset), (0xfd, 1, 0x2000));
        assert_eq!(e.inode, 1234567);
        assert_eq!(classify(&e), VmaClass::FilePrivate);

        let l = "7ffd3b1e1000-7ffd3b202000 rw-p 00000000 00:00 0                          [stack]";
        assert_eq!(parse_maps_line(l).unwrap().path, "[stack]");
        let l = "7f00-8f00 rw-p 00000000 00:00 0    [anon:glibc: malloc arena]";
        let e = parse_maps_line(l).unwrap();
        assert_eq!(e.path, "[anon:glibc: malloc arena]");
        assert_eq!(classify(&e), VmaClass::AnonPrivate);

        let l = "7f3a1c000000-7f3a1c021000 rw-s 00000000 00:01 2048   /dev/zero (deleted)";
        let e = parse_maps_line(l).unwrap();
        assert!(e.shared);
        assert_eq!(classify(&e), VmaClass::Shared);
        let l = "7f3a1c000000-7f3a1c021000 rw-s 00000000 00:01 9  /memfd:state  x (deleted)";
        assert_eq!(
            parse_maps_line(l).unwrap().path,
            "/memfd:state  x (deleted)"
        );

        let l =
            "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]";
        assert_eq!(classify(&parse_maps_line(l).unwrap()), VmaClass::Skip);
        let l = "7ffd3b3f0000-7ffd3b3f4000 r--p 00000000 00:00 0                          [vvar]";
        assert_eq!(classify(&parse_maps_line(l).unwrap()), VmaClass::Skip);
        let l = "7ffd3b3f4000-7ffd3b3f6000 r-xp 00000000 00:00 0                          [vdso]";
        assert_eq!(classify(&parse_maps_line(l).unwrap()), VmaClass::Entire);
        let l = "7f0000000000-7f0000002000 rw-s 00000000 00:10 77   /[aio] (deleted)";
        assert_eq!(classify(&parse_maps_line(l).unwrap()), VmaClass::Entire);
        // PROT_NONE private memory is still dumped.
        let l = "7f0000000000-7f0000002000 ---p 00000000 00:00 0";
        let e = parse_maps_line(l).unwrap();
        assert!(!e.read);
        assert_eq!(classify(&e), VmaClass::AnonPrivate);

        for bad in [
            "",
            "zz-10 rw-p 0 00:00 0",
            "10-20 rw-q 0 00:00 0",
            "10-20 rw-p 0 00:00",
            "20-10 rw-p 0 00:00 0",
            "10-20 rwp 0 00:00 0",
        ] {
            assert_eq!(parse_maps_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn pagemap_entries_decode() {
        let present_anon = PagemapEntry((1 << 63) | (1 << 56) | 0x1234);
        assert!(present_anon.present() && present_anon.exclusive());
        assert!(!present_anon.swapped() && !present_anon.file() && !present_anon.soft_dirty());
        assert_eq!(present_anon.pfn(), Some(0x1234));
        assert!(present_anon.should_dump(false) && present_anon.should_dump(true));

        let file_page = PagemapEntry((1 << 63) | (1 << 61) | 0x99);
        assert!(file_page.file());
        assert!(file_page.should_dump(false));
        assert!(
            !file_page.should_dump(true),
            "unmodified file page of a private mapping"
        );

        // Swapped: bits 0-4 type, 5-54 offset; never a PFN.
        let swapped = PagemapEntry((1 << 62) | (7 << 5) | 1);
        assert!(swapped.swapped() && !swapped.present());
        assert_eq!(swapped.pfn(), None);
        assert!(swapped.should_dump(false) && swapped.should_dump(true));

        // Present without PFN (reader without CAP_SYS_ADMIN).
        assert_eq!(PagemapEntry(1 << 63).pfn(), None);
        assert!(PagemapEntry(1 << 63).should_dump(false));

        assert!(!PagemapEntry(0).should_dump(false));
        assert!(!PagemapEntry(1 << 58).should_dump(false), "guard region");
        assert!(PagemapEntry((1 << 63) | (1 << 55)).soft_dirty());
        // The PFN field is bits 0-54 only.
        assert_eq!(PagemapEntry((1 << 63) | (1 << 55) | 5).pfn(), Some(5));
    }

    #[test]
    fn nspid_parses() {
        let status = "Name:\tsleep\nTgid:\t4242\nPid:\t4242\nNSpid:\t4242\t17\t1\nPPid:\t1\n";
        assert_eq!(parse_nspid(status), Some(1));
        assert_eq!(parse_nspid("Pid:\t5\nNSpid:\t5\n"), Some(5));
        assert_eq!(parse_nspid("Pid:\t5\n"), None);
    }

    #[test]
    fn zero_detection_and_hash() {
        let mut page = vec![0u8; PAGE_SIZE];
        assert!(is_zero(&page));
        assert!(is_zero(&[]));
        assert!(is_zero(&[0; 300]));
        for i in [0, 1, 255, 256, 2047, PAGE_SIZE - 1] {
            page[i] = 1;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        let mut odd = [0u8; 300];
        odd[299] = 0x80;
        assert!(!is_zero(&odd));

        // Pinned values: the destination and stored hashes depend on this exact function
        // (xxh3-64, seed 0; cross-checked with `xxhsum -H3`).
        assert_eq!(page_hash(&page), ZERO_PAGE_XXH3);
        let counting: Vec<u8> = (0..PAGE_SIZE).map(|i| i as u8).collect();
        assert_eq!(page_hash(&counting), COUNTING_PAGE_XXH3);
        assert_eq!(Scanner::new().zero_hash, ZERO_PAGE_XXH3);
    }

    const ZERO_PAGE_XXH3: u64 = 0x93d7_6fe1_48c6_89ba;
    const COUNTING_PAGE_XXH3: u64 = 0xeb4b_7c37_0787_9151;

    /// A page-aligned region of `pages` pages inside a Vec (which is not page-aligned itself).
    struct Aligned {
        buf: Vec<u8>,
        off: usize,
        pages: usize,
    }

    impl Aligned {
        fn new(pages: usize) -> Self {
            let buf = vec![0u8; (pages + 1) * PAGE_SIZE];
            let off = (buf.as_ptr() as usize).next_multiple_of(PAGE_SIZE) - buf.as_ptr() as usize;
            Self { buf, off, pages }
        }
        fn page_mut(&mut self, i: usize) -> &mut [u8] {
            &mut self.buf[self.off + i * PAGE_SIZE..][..PAGE_SIZE]
        }
        fn page(&self, i: usize) -> &[u8] {
            &self.buf[self.off + i * PAGE_SIZE..][..PAGE_SIZE]
        }
        fn addr(&self, i: usize) -> u64 {
            (self.buf.as_ptr() as usize + self.off + i * PAGE_SIZE) as u64
        }
        fn index(&self, vaddr: u64) -> Option<usize> {
            let start = self.addr(0);
            (vaddr >= start && vaddr < start + (self.pages * PAGE_SIZE) as u64)
                .then(|| ((vaddr - start) / PAGE_SIZE as u64) as usize)
        }
    }

    /// Scans the tree of this test process (children of other tests included) and returns
    /// (hash, zero) of every page of `region`, by index.
    fn scan_region(
        scanner: &mut Scanner,
        region: &Aligned,
    ) -> (Vec<Option<(u64, bool)>>, ScanStats) {
        let me = std::process::id() as i32;
        let mut seen = vec![None; region.pages];
        let mut last = (0, 0u64);
        let stats = scanner
            .scan(me, |p| {
                assert!(p.pid.host != last.0 || p.vaddr > last.1, "address order");
                last = (p.pid.host, p.vaddr);
                assert_eq!(p.data.len(), PAGE_SIZE);
                if p.pid.host != me {
                    return;
                }
                if let Some(i) = region.index(p.vaddr) {
                    assert_eq!(p.hash, page_hash(p.data));
                    assert_eq!(p.zero, is_zero(p.data));
                    seen[i] = Some((p.hash, p.zero));
                }
            })
            .unwrap();
        (seen, stats)
    }

    #[test]
    fn self_scan_finds_pages_and_changes() {
        let pages = 64;
        let mut region = Aligned::new(pages);
        for i in 0..pages {
            region.page_mut(i).fill(i as u8 + 1);
        }
        // Two pages written with zeros: real (non-zero-page) pages with zero content.
        region.page_mut(10).fill(0);
        region.page_mut(11).fill(0);
        // A small batch so runs are split across calls and iovec limits are exercised.
        let mut scanner = Scanner::with_batch_bytes(7 * PAGE_SIZE);
        let (before, stats) = scan_region(&mut scanner, &region);
        assert!(stats.processes >= 1 && stats.vmas > 0 && stats.pages_present > 0);
        for (i, got) in before.iter().enumerate() {
            let (hash, zero) = got.unwrap_or_else(|| panic!("page {i} not scanned"));
            assert_eq!(hash, page_hash(region.page(i)), "page {i}");
            assert_eq!(zero, i == 10 || i == 11, "page {i}");
        }

        let changed = [3usize, 17, 40, 63];
        for &i in &changed {
            region.page_mut(i)[100] ^= 0xff;
        }
        let (after, _) = scan_region(&mut Scanner::new(), &region);
        let differing: Vec<usize> = (0..pages).filter(|&i| before[i] != after[i]).collect();
        assert_eq!(differing, changed);
    }

    /// The PFN of a page of this process, from /proc/self/pagemap (None without CAP_SYS_ADMIN).
    fn own_pfn(vaddr: u64) -> Option<u64> {
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let mut word = [0u8; 8];
        pagemap
            .read_exact_at(&mut word, vaddr / PAGE_SIZE as u64 * 8)
            .unwrap();
        PagemapEntry(u64::from_ne_bytes(word)).pfn()
    }

    #[test]
    fn unwritten_pages_are_not_scanned() {
        // A zeroed allocation above 32 MiB comes from calloc via mmap: no page is present until
        // touched. Pages only read map the zero page, which CRIU does not dump.
        let pages = 9000;
        let mut region = Aligned::new(pages);
        let touched = [5usize, 6, 700];
        for &i in &touched {
            region.page_mut(i)[0] = 1;
        }
        let read_only = 4000..4010;
        for i in read_only.clone() {
            std::hint::black_box(std::hint::black_box(&region).page(i)[0]);
        }
        let (seen, stats) = scan_region(&mut Scanner::new(), &region);
        let zero = zero_pfns();
        eprintln!("zero pfns: {zero:?}; stats {stats:?}");
        for &i in &touched {
            let (hash, zero) = seen[i].unwrap_or_else(|| panic!("written page {i} missing"));
            assert_eq!(hash, page_hash(region.page(i)));
            assert!(!zero);
        }
        for i in read_only {
            let pfn = own_pfn(region.addr(i));
            if pfn.is_some() && zero.is_zero_pfn(pfn) {
                assert_eq!(seen[i], None, "page {i} maps the zero page (pfn {pfn:?})");
            } else {
                // PFNs hidden (no CAP_SYS_ADMIN) or not the zero page: reported as zero.
                assert!(seen[i].is_none_or(|(_, z)| z), "page {i}: {:?}", seen[i]);
            }
        }
        if own_pfn(region.addr(touched[0])).is_some() {
            // Running with PFNs visible: the zero page must have been found.
            assert!(zero.small.is_some(), "{zero:?}");
        }
        // Pages never touched are absent, or (a transparent huge page around a written page)
        // present with zero content.
        for (i, got) in seen.iter().enumerate() {
            if !touched.contains(&i) {
                assert!(got.is_none_or(|(_, z)| z), "page {i}: {got:?}");
            }
        }
    }

    #[test]
    fn zero_pfn_ranges() {
        let z = ZeroPfns {
            small: Some(100),
            huge: Some(1024),
        };
        assert!(z.is_zero_pfn(Some(100)));
        assert!(!z.is_zero_pfn(Some(101)));
        assert!(!z.is_zero_pfn(None));
        assert!(z.is_zero_pfn(Some(1024)) && z.is_zero_pfn(Some(1535)));
        assert!(!z.is_zero_pfn(Some(1023)) && !z.is_zero_pfn(Some(1536)));
        assert!(!ZeroPfns::default().is_zero_pfn(Some(100)));
    }

    /// A python3 helper that writes 4 private anonymous pages (page i filled with 0x40 + i),
    /// makes them PROT_NONE, prints their address and sleeps.
    const PROT_NONE_HELPER: &str = r#"
import ctypes, mmap, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
m = mmap.mmap(-1, 4 * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(4):
    m[i * 4096:(i + 1) * 4096] = bytes([0x40 + i]) * 4096
addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
assert libc.mprotect(addr, 4 * 4096, 0) == 0
print(addr, flush=True)
time.sleep(30)
"#;

    #[test]
    fn prot_none_private_pages_are_read() {
        // CRIU dumps present pages of PROT_NONE private mappings; process_vm_readv cannot read
        // them, /proc/PID/mem can. mprotect needs unsafe in Rust, so a python3 helper makes
        // them; python3 is a prerequisite of this test (it fails, never skips, without it).
        let mut child = Command::new("python3")
            .args(["-c", PROT_NONE_HELPER])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("this test needs python3 on PATH");
        let pid = child.id() as i32;
        let mut line = String::new();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let _ = out.read_line(&mut line);
        let res = line.trim().parse::<u64>().map(|addr| {
            let mut seen = HashMap::new();
            let stats = Scanner::new().scan(pid, |p| {
                if (addr..addr + 4 * PAGE_SIZE as u64).contains(&p.vaddr) {
                    seen.insert(p.vaddr, p.hash);
                }
            });
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            (addr, seen, stats, maps)
        });
        kill_all(&[pid]);
        let _ = child.wait();
        let (addr, seen, stats, maps) = res.unwrap_or_else(|_| panic!("helper said {line:?}"));
        let stats = stats.unwrap();
        let vma = maps
            .lines()
            .filter_map(parse_maps_line)
            .find(|v| (v.start..v.end).contains(&addr))
            .unwrap();
        assert!(!vma.read && !vma.write && !vma.shared, "{vma:?}");
        for i in 0..4u64 {
            let want = page_hash(&[0x40 + i as u8; PAGE_SIZE]);
            assert_eq!(
                seen.get(&(addr + i * PAGE_SIZE as u64)),
                Some(&want),
                "page {i}"
            );
        }
        assert_eq!(stats.pages_vanished, 0, "{stats:?}");
    }

    #[test]
    fn proc_mem_path_reads_like_readv() {
        // The /proc/PID/mem path serves PROT_NONE private memory. mprotect needs unsafe, so
        // exercise that path on readable memory of this process, next to the readv path.
        let mut region = Aligned::new(8);
        for i in 0..8 {
            region.page_mut(i).fill(0x5a ^ i as u8);
        }
        let me = std::process::id() as i32;
        let mut scanner = Scanner::with_batch_bytes(3 * PAGE_SIZE);
        let mut ctx = ProcCtx {
            pid: ProcId { host: me, ns: me },
            mem: None,
            gone: false,
        };
        let mut stats = ScanStats::default();
        let mut got = Vec::new();
        let mut f = |p: PageRef<'_>| got.push((p.vaddr, p.hash));
        scanner
            .queue(
                region.addr(0),
                8,
                ReadMethod::Mem,
                &mut ctx,
                &mut f,
                &mut stats,
            )
            .unwrap();
        // Switching method flushes.
        scanner
            .queue(
                region.addr(2),
                1,
                ReadMethod::Readv,
                &mut ctx,
                &mut f,
                &mut stats,
            )
            .unwrap();
        scanner.flush(&mut ctx, &mut f, &mut stats).unwrap();
        let want: Vec<(u64, u64)> = (0..8)
            .map(|i| (region.addr(i), page_hash(region.page(i))))
            .chain([(region.addr(2), page_hash(region.page(2)))])
            .collect();
        assert_eq!(got, want);
        assert_eq!(stats.pages_vanished, 0);
    }

    #[test]
    fn vanished_pages_are_skipped() {
        let mut region = Aligned::new(4);
        for i in 0..4 {
            region.page_mut(i).fill(7);
        }
        let me = std::process::id() as i32;
        let mut scanner = Scanner::new();
        let mut ctx = ProcCtx {
            pid: ProcId { host: me, ns: me },
            mem: None,
            gone: false,
        };
        let mut stats = ScanStats::default();
        let mut got = Vec::new();
        let mut f = |p: PageRef<'_>| got.push(p.vaddr);
        // Page 0 of the address space is never mapped: EFAULT on the first run, then the
        // second run is still read.
        for method in [ReadMethod::Readv, ReadMethod::Mem] {
            got_clear(
                &mut scanner,
                &mut ctx,
                &mut stats,
                &mut f,
                method,
                region.addr(0),
            );
        }
        assert_eq!(
            got,
            vec![
                region.addr(0),
                region.addr(1),
                region.addr(0),
                region.addr(1)
            ]
        );
        assert_eq!(stats.pages_vanished, 6);
        assert!(!ctx.gone);

        fn got_clear(
            scanner: &mut Scanner,
            ctx: &mut ProcCtx,
            stats: &mut ScanStats,
            f: &mut dyn FnMut(PageRef<'_>),
            method: ReadMethod,
            good: u64,
        ) {
            scanner.queue(0x1000, 3, method, ctx, f, stats).unwrap();
            scanner.queue(good, 2, method, ctx, f, stats).unwrap();
            scanner.flush(ctx, f, stats).unwrap();
        }
    }

    #[test]
    fn missing_root_is_an_error() {
        // Pids are below 2^22 on Linux.
        assert!(matches!(tree(i32::MAX), Err(MemError::NoProcess { .. })));
        assert!(matches!(
            Scanner::new().scan(i32::MAX, |_| {}),
            Err(MemError::NoProcess { .. })
        ));
    }

    /// Kills the given processes by pid (SIGKILL); ignores ones already gone.
    fn kill_all(pids: &[i32]) {
        for &pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }

    /// Waits (at most 10 s) until the tree under `child` has `n` processes, or `child` exits.
    fn wait_tree(child: &mut std::process::Child, n: usize) -> Vec<ProcId> {
        let root = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let t = tree(root).unwrap_or_default();
            let exited = !matches!(child.try_wait(), Ok(None));
            if t.len() >= n || exited || Instant::now() > deadline {
                return t;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn tree_sockets_counts_each_socket_of_the_tree_once() {
        let me = std::process::id() as i32;
        let before = tree_sockets(me).expect("count");
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let b = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        // A duplicated descriptor is the same socket.
        let _dup = a.try_clone().expect("dup");
        // Other threads of the test harness may open sockets meanwhile: at least these two.
        let after = tree_sockets(me).expect("count");
        assert!(after >= before + 2, "{before} -> {after}");
        drop((a, b));
        assert!(matches!(
            tree_sockets(i32::MAX),
            Err(MemError::NoProcess { .. })
        ));
    }

    #[test]
    fn tree_finds_children_and_scans_them() {
        let mut sh = Command::new("sh")
            .args(["-c", "sleep 5 & sleep 5 & wait"])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let root = sh.id() as i32;
        let comm = |pid: i32| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok();
        // Wait until both children exist and have exec'ed sleep (a forked child is "sh" first).
        let deadline = Instant::now() + Duration::from_secs(10);
        let procs = loop {
            let procs = wait_tree(&mut sh, 3);
            let execed = procs
                .get(1..)
                .unwrap_or_default()
                .iter()
                .all(|p| comm(p.host).as_deref() == Some("sleep\n"));
            if (procs.len() == 3 && execed) || Instant::now() > deadline {
                break procs;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let pids: Vec<i32> = procs.iter().map(|p| p.host).collect();
        let check = || -> Result<(), String> {
            if procs.len() != 3 || procs[0].host != root {
                return Err(format!("tree {procs:?}"));
            }
            for p in &procs[1..] {
                if comm(p.host).as_deref() != Some("sleep\n") {
                    return Err(format!("{p:?} is {:?}", comm(p.host)));
                }
            }
            let mut per_pid: HashMap<i32, u64> = HashMap::new();
            let stats = Scanner::new()
                .scan(root, |p| *per_pid.entry(p.pid.host).or_default() += 1)
                .map_err(|e| e.to_string())?;
            if stats.processes != 3 || per_pid.len() != 3 {
                return Err(format!("{stats:?} {per_pid:?}"));
            }
            Ok(())
        };
        let res = check();
        kill_all(&pids);
        let _ = sh.wait();
        res.unwrap();
    }

    #[test]
    fn tree_reports_namespace_pids() {
        // Needs root (a new PID namespace): fails, never skips, without it.
        let mut child = Command::new("unshare")
            .args(["--pid", "--fork", "sleep", "5"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("this test needs unshare(1)");
        let procs = wait_tree(&mut child, 2);
        let pids: Vec<i32> = procs.iter().map(|p| p.host).collect();
        kill_all(&pids);
        let status = child.wait().unwrap();
        assert!(
            procs.len() >= 2 || status.success(),
            "unshare --pid failed: this test needs root (run scripts/test.sh as root)"
        );
        assert_eq!(procs.len(), 2, "{procs:?}");
        assert_eq!(procs[1].ns, 1, "{procs:?}");
        assert_ne!(procs[1].host, 1);
    }

    /// Environment variable that turns `helper_writer` into a memory-writing helper process:
    /// `PAGES:RATE`.
    const HELPER_ENV: &str = "TETHER_PROCMEM_HELPER";
    /// What the helper prints once its buffer is touched.
    const HELPER_READY: &str = "procmem-helper-ready";

    /// Not a test: run by [`Helper::spawn`] as a child process (this test binary, with
    /// [`HELPER_ENV`] set). Touches `PAGES` pages, prints [`HELPER_READY`], then writes distinct
    /// pages at `RATE` pages per second until killed (at most 60 s).
    #[test]
    #[ignore = "helper process for other tests"]
    fn helper_writer() {
        let Some((pages, rate)) = std::env::var(HELPER_ENV).ok().and_then(|v| {
            let (p, r) = v.split_once(':')?;
            Some((p.parse::<usize>().ok()?, r.parse::<u64>().ok()?))
        }) else {
            return;
        };
        let mut region = Aligned::new(pages);
        for i in 0..pages {
            let page = region.page_mut(i);
            page[0] = 1;
            page[PAGE_SIZE - 1] = i as u8;
        }
        println!("{HELPER_READY}");
        let start = Instant::now();
        let mut written = 0u64;
        let mut next = 0usize;
        while start.elapsed() < Duration::from_secs(60) {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            while written < due {
                let page = region.page_mut(next);
                page[0] = page[0].wrapping_add(1);
                next = (next + 1) % pages;
                written += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// A helper child process (see [`helper_writer`]), killed by pid when dropped.
    struct Helper {
        child: std::process::Child,
    }

    impl Helper {
        /// Starts a helper that holds `pages` written pages and dirties `rate` pages/s, and
        /// waits until its pages are written.
        fn spawn(pages: usize, rate: u64) -> Self {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "procmem::tests::helper_writer",
                    "--ignored",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(HELPER_ENV, format!("{pages}:{rate}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let helper = Self { child };
            let mut line = String::new();
            while out.read_line(&mut line).unwrap_or(0) > 0 {
                if line.contains(HELPER_READY) {
                    return helper;
                }
                line.clear();
            }
            panic!("helper did not start");
        }

        fn pid(&self) -> i32 {
            self.child.id() as i32
        }
    }

    impl Drop for Helper {
        fn drop(&mut self) {
            kill_all(&[self.pid()]);
            let _ = self.child.wait();
        }
    }

    #[test]
    fn dirty_rate_of_a_writer() {
        let rate = 2000u64;
        let helper = Helper::spawn(16384, rate);
        let dr = measure_dirty_rate(helper.pid(), Duration::from_millis(1000)).unwrap();
        drop(helper);
        eprintln!("{dr:?}");
        let ratio = dr.pages_per_sec / rate as f64;
        assert!(
            (0.3..3.0).contains(&ratio),
            "measured {dr:?} for {rate} pages/s"
        );
        assert!(dr.pages_scanned >= 16384);
        assert!((dr.mb_per_sec - dr.pages_per_sec * 4096.0 / 1e6).abs() < 1e-6);
    }

    #[test]
    fn smaps_userfaultfd_flag() {
        let plain = "7f00-7f01 rw-p 00000000 00:00 0\nSize: 4 kB\nVmFlags: rd wr mr mw me ac sd\n";
        let lazy = "7f00-7f01 rw-p 00000000 00:00 0\nVmFlags: rd wr mr mw me ac um\n";
        assert!(!smaps_has_uffd(plain));
        assert!(smaps_has_uffd(&format!("{plain}{lazy}")));
        // "um" only as a flag of its own, not inside another word.
        assert!(!smaps_has_uffd("VmFlags: rd wr umx\n"));
        assert!(!userfaultfd_registered(std::process::id() as i32).expect("own smaps"));
    }
}
