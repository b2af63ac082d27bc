//! CRIU's memory images: page maps (`pagemap-*.img`) and the raw page data they describe
//! (`pages-<id>.img`).
//!
//! Format, as CRIU 4.2.1 writes it (`criu/page-xfer.c`, `criu/pagemap.c`, `criu/shmem.c`):
//!
//! - `pagemap-<pid>.img` holds a process's private memory; `<pid>` is the pid inside the dumped
//!   tree's PID namespace. `pagemap-shmem-<id>.img` holds a shared-memory object (anonymous
//!   shared mappings and memfds, dumped the memfd way; SysV segments), where `<id>` is the
//!   object's inode number as `/proc/PID/maps` shows it (for SysV segments, the segment id) and
//!   addresses are byte offsets into the object.
//! - A page map is an image (`IMG_COMMON_MAGIC`, `PAGEMAP_MAGIC`, then `u32 len | protobuf`
//!   entries in host byte order): first a `pagemap_head { pages_id }`, then `pagemap_entry
//!   { vaddr, compat_nr_pages, in_parent, flags, nr_pages }` runs of pages.
//! - Flags: [`PE_PRESENT`] (the data is in the pages file), [`PE_LAZY`] (may be restored
//!   lazily; set together with `PE_PRESENT` for anonymous private memory in an ordinary dump,
//!   alone when `--lazy-pages` left the data on the source), [`PE_PARENT`] (the data is in a parent
//!   pre-dump's images). Entries written by CRIU before flags existed are normalised as CRIU does:
//!   `in_parent` means `PE_PARENT`, no flags means `PE_PRESENT`, no `nr_pages` means
//!   `compat_nr_pages`.
//! - `pages-<pages_id>.img` is raw (no magic): the data of the `PE_PRESENT` entries, in entry
//!   order, `nr_pages * 4096` bytes each, nothing else.
//! - Pages mapped to the kernel's zero page (read but never written) are not dumped at all; a
//!   written page of zeros is. Shared memory is dumped for every page that has data in the
//!   object (also pages only ever read).
//!
//! All I/O here is blocking; call it from a blocking thread.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use prost::Message;

/// Size of a memory page in CRIU's images. CRIU writes the host's page size; tether supports
/// 4 KiB pages only.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;

/// Image magic of page maps (`PAGEMAP_MAGIC`, also `SHMEM_PAGEMAP_MAGIC`).
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
const IMG_COMMON_MAGIC: u32 = 0x5456_4319;

/// Pagemap flag: the pages are in the parent (pre-dump) images, not in this pages file.
pub const PE_PARENT: u32 = 1 << 0;
/// Pagemap flag: the pages may be restored lazily (userfaultfd).
pub const PE_LAZY: u32 = 1 << 1;
/// Pagemap flag: the pages' data is in this dump's pages file.
pub const PE_PRESENT: u32 = 1 << 2;
const KNOWN_FLAGS: u32 = PE_PARENT | PE_LAZY | PE_PRESENT;

/// Pagemap entries are a few tens of bytes; a larger length means a corrupt file.
const MAX_ENTRY: usize = 4096;
/// Bytes read from (or buffered for) a pages file at a time.
const CHUNK: usize = 4 << 20;

/// `pagemap_head` (`images/pagemap.proto`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapHead {
    /// The `<id>` of the `pages-<id>.img` file holding this map's data.
    #[prost(uint32, required, tag = "1")]
    pub pages_id: u32,
}

/// `pagemap_entry` (`images/pagemap.proto`), as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct PagemapEntry {
    /// First page's address (or offset in a shared-memory object).
    #[prost(uint64, required, tag = "1")]
    pub vaddr: u64,
    /// Page count of images older than `nr_pages` (CRIU now writes 0 here).
    #[prost(uint32, required, tag = "2")]
    pub compat_nr_pages: u32,
    /// Old form of [`PE_PARENT`].
    #[prost(bool, optional, tag = "3")]
    pub in_parent: Option<bool>,
    /// `PE_*` flags.
    #[prost(uint32, optional, tag = "4")]
    pub flags: Option<u32>,
    /// Page count.
    #[prost(uint64, optional, tag = "5")]
    pub nr_pages: Option<u64>,
}

/// Whose memory a page map describes.
///
/// [`Owner::code`] packs it into the `u64` owner field of [`crate::protocol::PageBatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum Owner {
    /// A process's private memory, by its pid inside the tree's PID namespace; addresses are
    /// virtual addresses.
    Pid(i32),
    /// A shared-memory object, by CRIU's shmid (the object's inode number, as in
    /// `/proc/PID/maps`); addresses are byte offsets into the object.
    Shmem(u64),
}

const SHMEM_BIT: u64 = 1 << 63;

impl Owner {
    /// The owner as one `u64`: a pid as itself, a shmid with the top bit set.
    pub fn code(self) -> u64 {
        match self {
            // Parsed pids are positive; a negative one maps to a code `from_code` refuses.
            Owner::Pid(p) => u64::from(p as u32),
            Owner::Shmem(id) => SHMEM_BIT | id,
        }
    }

    /// The owner a [`code`](Owner::code) stands for, if it is a valid one.
    pub fn from_code(code: u64) -> Option<Owner> {
        if code & SHMEM_BIT != 0 {
            Some(Owner::Shmem(code & !SHMEM_BIT))
        } else {
            i32::try_from(code).ok().filter(|p| *p > 0).map(Owner::Pid)
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Pid(p) => write!(f, "pid {p}"),
            Owner::Shmem(id) => write!(f, "shmem {id}"),
        }
    }
}

/// Errors reading or rebuilding memory images.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PagesError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A page map is not what CRIU writes.
    #[error("page map {path} is malformed: {what}")]
    Malformed {
        /// The page map file.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
    /// A file whose name starts with `pagemap` is neither `pagemap-<pid>.img` nor
    /// `pagemap-shmem-<id>.img`: a CRIU image tether does not know.
    #[error("unknown page map image {name} (not pagemap-<pid>.img or pagemap-shmem-<id>.img)")]
    UnknownImage {
        /// The file name.
        name: String,
    },
    /// The page maps declare more page data than allowed (they come from a peer).
    #[error(
        "the dump's page maps declare {declared} bytes of page data, more than the {max} bytes \
         allowed"
    )]
    TooLarge {
        /// Bytes declared (saturated at `u64::MAX`).
        declared: u64,
        /// The most allowed.
        max: u64,
    },
    /// A pages file's length is not what its page map implies.
    #[error("pages file {path} holds {actual} bytes, its page map implies {expected}")]
    Length {
        /// The pages file.
        path: PathBuf,
        /// Bytes the page map implies.
        expected: u64,
        /// Bytes found (or written).
        actual: u64,
    },
    /// The page source lacks pages the dump's page map lists.
    #[error(
        "page {vaddr:#x} of {owner} is listed in {pagemap} but was never received \
         ({missing} of its pages missing in all)"
    )]
    MissingPage {
        /// The owner of the first missing page.
        owner: Owner,
        /// The first missing page's address.
        vaddr: u64,
        /// How many of that page map's data pages are missing.
        missing: u64,
        /// The page map file.
        pagemap: PathBuf,
    },
    /// The page store refused a page of the final difference.
    #[error("page store: {0}")]
    Store(String),
    /// A draft made for a restore served from the page store, finished as if it held every page.
    #[error("the pages files were drafted for a restore served from the page store and hold only its hot pages")]
    Sparse,
    /// A page sent for the final difference that the dump's page map does not list with data.
    #[error("page {vaddr:#x} of {owner} is not in the dump's page map")]
    NotInPageMap {
        /// The owner.
        owner: Owner,
        /// The page address.
        vaddr: u64,
    },
    /// Pages sent for an owner the dump has no page map of.
    #[error("the dump has no page map of {owner}")]
    NoPageMap {
        /// The owner.
        owner: Owner,
    },
    /// The page source returned a page of the wrong size.
    #[error("page {vaddr:#x} of {owner} has {len} bytes, not {PAGE_SIZE}")]
    BadPage {
        /// The owner.
        owner: Owner,
        /// The page address.
        vaddr: u64,
        /// Its length.
        len: usize,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PagesError + '_ {
    move |source| PagesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One run of pages of a page map, normalised (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First page's address (or offset in a shared-memory object); page-aligned.
    pub vaddr: u64,
    /// Number of pages.
    pub nr_pages: u64,
    /// `PE_*` flags.
    pub flags: u32,
}

impl MapEntry {
    /// Whether this run's data is in the pages file ([`PE_PRESENT`]).
    pub fn has_data(&self) -> bool {
        self.flags & PE_PRESENT != 0
    }

    /// Whether this run's data is in a parent dump ([`PE_PARENT`]).
    pub fn in_parent(&self) -> bool {
        self.flags & PE_PARENT != 0
    }

    /// Whether this run may be restored lazily ([`PE_LAZY`]).
    pub fn lazy(&self) -> bool {
        self.flags & PE_LAZY != 0
    }

    /// One past the last byte of the run (checked not to overflow when parsed).
    pub fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE
    }

    /// Addresses of the run's pages, in order.
    pub fn pages(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.nr_pages).map(move |i| self.vaddr + i * PAGE)
    }
}

/// One page map (`pagemap-*.img`) and the pages file it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageMap {
    /// Whose memory it is.
    pub owner: Owner,
    /// File name of the page map, e.g. `pagemap-1.img`.
    pub pagemap_file: String,
    /// The `<id>` of its pages file.
    pub pages_id: u32,
    /// Its runs, in file order (which is also the order of their data in the pages file).
    pub entries: Vec<MapEntry>,
    /// (start, end, entry index), sorted by start, for lookups.
    index: Vec<(u64, u64, usize)>,
}

impl PageMap {
    /// Parses a page map image. `name` is its file name, which gives the owner.
    pub fn parse(name: &str, buf: &[u8]) -> Result<PageMap, PagesError> {
        let owner = owner_of(name)?;
        let bad = |what: String| PagesError::Malformed {
            path: PathBuf::from(name),
            what,
        };
        let mut at = 0;
        let mut magic = read_u32(buf, at).ok_or_else(|| bad("shorter than its magic".into()))?;
        at += 4;
        if magic == IMG_COMMON_MAGIC {
            magic = read_u32(buf, at).ok_or_else(|| bad("shorter than its magic".into()))?;
            at += 4;
        }
        if magic != PAGEMAP_MAGIC {
            return Err(bad(format!(
                "magic {magic:#x}, expected {PAGEMAP_MAGIC:#x}"
            )));
        }
        let head: PagemapHead = match next_entry(buf, &mut at).map_err(&bad)? {
            Some(body) => PagemapHead::decode(body).map_err(|e| bad(format!("bad head: {e}")))?,
            None => return Err(bad("no pagemap head".into())),
        };
        let mut entries = Vec::new();
        let mut data_bytes: u64 = 0;
        while let Some(body) = next_entry(buf, &mut at).map_err(&bad)? {
            let n = entries.len();
            let raw = PagemapEntry::decode(body).map_err(|e| bad(format!("bad entry {n}: {e}")))?;
            let e = normalise(&raw);
            if e.flags & !KNOWN_FLAGS != 0 {
                return Err(bad(format!(
                    "entry {n} at {:#x} has unknown flags {:#x}",
                    e.vaddr, e.flags
                )));
            }
            if e.has_data() && e.in_parent() {
                return Err(bad(format!(
                    "entry {n} at {:#x} is both present and in the parent",
                    e.vaddr
                )));
            }
            if e.vaddr % PAGE != 0 {
                return Err(bad(format!(
                    "entry {n} address {:#x} is not page-aligned",
                    e.vaddr
                )));
            }
            let len = e.nr_pages.checked_mul(PAGE);
            if len.and_then(|l| e.vaddr.checked_add(l)).is_none() {
                return Err(bad(format!(
                    "entry {n} at {:#x}: {} pages overflow the address space",
                    e.vaddr, e.nr_pages
                )));
            }
            if e.has_data() {
                data_bytes = len
                    .and_then(|l| data_bytes.checked_add(l))
                    .ok_or_else(|| bad("data length overflows".into()))?;
            }
            entries.push(e);
        }
        let mut index: Vec<(u64, u64, usize)> = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| e.nr_pages > 0)
            .map(|(i, e)| (e.vaddr, e.end(), i))
            .collect();
        index.sort_unstable();
        for w in index.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(bad(format!(
                    "entries {} ({:#x}..{:#x}) and {} ({:#x}..{:#x}) overlap",
                    w[0].2, w[0].0, w[0].1, w[1].2, w[1].0, w[1].1
                )));
            }
        }
        Ok(PageMap {
            owner,
            pagemap_file: name.to_string(),
            pages_id: head.pages_id,
            entries,
            index,
        })
    }

    /// File name of the pages file, `pages-<id>.img`.
    pub fn pages_file(&self) -> String {
        pages_file_name(self.pages_id)
    }

    /// Number of pages whose data is in the pages file.
    pub fn data_pages(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.has_data())
            .map(|e| e.nr_pages)
            .sum()
    }

    /// Length the pages file must have.
    pub fn data_len(&self) -> u64 {
        self.data_pages() * PAGE
    }

    /// Addresses of the pages whose data is in the pages file, in file order.
    pub fn data_page_addrs(&self) -> impl Iterator<Item = u64> + '_ {
        self.entries
            .iter()
            .filter(|e| e.has_data())
            .flat_map(MapEntry::pages)
    }

    /// The entry covering `vaddr`, if any.
    pub fn entry_at(&self, vaddr: u64) -> Option<&MapEntry> {
        self.entry_index_at(vaddr).map(|e| &self.entries[e])
    }

    /// The index in [`entries`](Self::entries) of the entry covering `vaddr`, if any.
    pub fn entry_index_at(&self, vaddr: u64) -> Option<usize> {
        let i = self.index.partition_point(|&(s, _, _)| s <= vaddr);
        let &(_, end, e) = self.index.get(i.checked_sub(1)?)?;
        (vaddr < end).then_some(e)
    }

    /// Whether the page at `vaddr` has its data in the pages file.
    pub fn has_data_at(&self, vaddr: u64) -> bool {
        self.entry_at(vaddr).is_some_and(MapEntry::has_data)
    }
}

fn normalise(raw: &PagemapEntry) -> MapEntry {
    // As CRIU's init_compat_pagemap_entry.
    let mut flags = raw.flags.unwrap_or(0);
    if raw.in_parent == Some(true) {
        flags |= PE_PARENT;
    } else if raw.flags.is_none() {
        flags = PE_PRESENT;
    }
    MapEntry {
        vaddr: raw.vaddr,
        nr_pages: raw.nr_pages.unwrap_or(u64::from(raw.compat_nr_pages)),
        flags,
    }
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at.checked_add(4)?)?.try_into().ok()?;
    Some(u32::from_ne_bytes(bytes))
}

/// The next `u32 len | body` entry's body, `None` at a clean end of file.
fn next_entry<'a>(buf: &'a [u8], at: &mut usize) -> Result<Option<&'a [u8]>, String> {
    if *at == buf.len() {
        return Ok(None);
    }
    let len =
        read_u32(buf, *at).ok_or_else(|| format!("truncated entry length at byte {at}"))? as usize;
    if len > MAX_ENTRY {
        return Err(format!("entry of {len} bytes at byte {at}"));
    }
    let body = buf
        .get(*at + 4..*at + 4 + len)
        .ok_or_else(|| format!("truncated entry at byte {at}"))?;
    *at += 4 + len;
    Ok(Some(body))
}

fn pages_file_name(id: u32) -> String {
    format!("pages-{id}.img")
}

fn digits(s: &str) -> Option<&str> {
    (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then_some(s)
}

/// The owner a page map file name stands for.
fn owner_of(name: &str) -> Result<Owner, PagesError> {
    let unknown = || PagesError::UnknownImage {
        name: name.to_string(),
    };
    let stem = name
        .strip_prefix("pagemap-")
        .and_then(|s| s.strip_suffix(".img"))
        .ok_or_else(unknown)?;
    if let Some(id) = stem.strip_prefix("shmem-") {
        let id: u64 = digits(id)
            .and_then(|d| d.parse().ok())
            .ok_or_else(unknown)?;
        if id & SHMEM_BIT != 0 {
            return Err(unknown());
        }
        return Ok(Owner::Shmem(id));
    }
    let pid: i32 = digits(stem)
        .and_then(|d| d.parse().ok())
        .filter(|p| *p > 0)
        .ok_or_else(unknown)?;
    Ok(Owner::Pid(pid))
}

/// Whether `name` is a page map image (`pagemap*.img`).
pub fn is_pagemap_file(name: &str) -> bool {
    name.starts_with("pagemap") && name.ends_with(".img")
}

/// Whether `name` is a pages file (`pages-<id>.img`): raw page data that the destination rebuilds
/// instead of receiving.
pub fn is_pages_file(name: &str) -> bool {
    name.strip_prefix("pages-")
        .and_then(|s| s.strip_suffix(".img"))
        .and_then(digits)
        .is_some()
}

/// Totals of a pass over memory images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Page maps (and pages files) handled.
    pub maps: usize,
    /// Data pages read or written.
    pub pages: u64,
    /// Of which: pages a lazy restore copies in at once (hot pages first, see
    /// [`eager`](super::eager)); 0 where no choice was made.
    pub eager: u64,
    /// Of a draft [finished for a served restore](super::rebuild::PagesDraft::finish_served):
    /// pages written into the pages files (the rest are served from the page store).
    pub written: u64,
}

/// The memory images of a dump directory: every page map found in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryImages {
    dir: PathBuf,
    /// The page maps, sorted by owner.
    pub maps: Vec<PageMap>,
}

impl MemoryImages {
    /// Reads every `pagemap*.img` in `dir`. The pages files need not be there (on the
    /// destination they are rebuilt).
    pub fn load(dir: &Path) -> Result<MemoryImages, PagesError> {
        let mut maps = Vec::new();
        for ent in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let ent = ent.map_err(io_err(dir))?;
            let Some(name) = ent.file_name().to_str().map(str::to_string) else {
                continue;
            };
            if !is_pagemap_file(&name) {
                continue;
            }
            let path = ent.path();
            let buf = std::fs::read(&path).map_err(io_err(&path))?;
            maps.push(PageMap::parse(&name, &buf).map_err(|e| match e {
                PagesError::Malformed { what, .. } => PagesError::Malformed {
                    path: path.clone(),
                    what,
                },
                e => e,
            })?);
        }
        maps.sort_by_key(|m| m.owner);
        let mut ids = HashSet::new();
        for w in maps.windows(2) {
            if w[0].owner == w[1].owner {
                return Err(PagesError::Malformed {
                    path: dir.join(&w[1].pagemap_file),
                    what: format!("{} has two page maps", w[1].owner),
                });
            }
        }
        for m in &maps {
            if !ids.insert(m.pages_id) {
                return Err(PagesError::Malformed {
                    path: dir.join(&m.pagemap_file),
                    what: format!("pages id {} is used by another page map too", m.pages_id),
                });
            }
        }
        Ok(MemoryImages {
            dir: dir.to_path_buf(),
            maps,
        })
    }

    /// The page data all page maps declare, if at most `max` bytes: check it before anything is
    /// sized by the maps (the rebuild keeps a flag per declared page).
    pub fn data_len_within(&self, max: u64) -> Result<u64, PagesError> {
        let declared = self
            .maps
            .iter()
            .try_fold(0u64, |sum, m| sum.checked_add(m.data_len()))
            .unwrap_or(u64::MAX);
        if declared > max {
            return Err(PagesError::TooLarge { declared, max });
        }
        Ok(declared)
    }

    /// The directory the images were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The page map of `owner`.
    pub fn map(&self, owner: Owner) -> Option<&PageMap> {
        self.maps
            .binary_search_by_key(&owner, |m| m.owner)
            .ok()
            .map(|i| &self.maps[i])
    }

    /// Whether the dump holds data for the page at `vaddr` of `owner` (a final difference may
    /// only carry such pages).
    pub fn has_data_at(&self, owner: Owner, vaddr: u64) -> bool {
        self.map(owner).is_some_and(|m| m.has_data_at(vaddr))
    }

    /// Total data pages of all page maps.
    pub fn data_pages(&self) -> u64 {
        self.maps.iter().map(PageMap::data_pages).sum()
    }

    /// Whether any run's data is in a parent dump (`PE_PARENT`): such an image set restores only
    /// together with its parent images.
    pub fn has_parent_refs(&self) -> bool {
        self.maps
            .iter()
            .any(|m| m.entries.iter().any(MapEntry::in_parent))
    }

    /// Whether any run is lazy without data in this dump (`PE_LAZY` without `PE_PRESENT`, from
    /// `--lazy-pages`): restoring it needs the source's page server.
    pub fn has_remote_lazy(&self) -> bool {
        self.maps
            .iter()
            .any(|m| m.entries.iter().any(|e| e.lazy() && !e.has_data()))
    }

    /// Calls `f` with every data page of the dump, page map by page map, in pages-file order.
    /// Each pages file's length is checked before any of its pages is passed on. Stops at the
    /// first error, `f`'s included.
    pub fn for_each_page<E, F>(&self, mut f: F) -> Result<Totals, E>
    where
        E: From<PagesError>,
        F: FnMut(Owner, u64, &[u8; PAGE_SIZE]) -> Result<(), E>,
    {
        let mut totals = Totals::default();
        let mut buf = vec![0u8; CHUNK];
        for m in &self.maps {
            let (path, mut file) = self.open_pages(m)?;
            let mut addrs = m.data_page_addrs();
            let mut left = m.data_len();
            while left > 0 {
                let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                file.read_exact(&mut buf[..n]).map_err(io_err(&path))?;
                left -= n as u64;
                for page in buf[..n].chunks_exact(PAGE_SIZE) {
                    // `page` is PAGE_SIZE long (chunks_exact) and `addrs` yields exactly
                    // data_len / PAGE_SIZE addresses, which is what is read in all.
                    let page: &[u8; PAGE_SIZE] =
                        page.try_into().expect("chunks_exact yields whole pages");
                    let vaddr = addrs.next().expect("one address per data page");
                    f(m.owner, vaddr, page)?;
                    totals.pages += 1;
                }
            }
            totals.maps += 1;
        }
        Ok(totals)
    }
}

impl MemoryImages {
    /// Opens the pages file of `m`, checking that it holds exactly the page map's data.
    fn open_pages(&self, m: &PageMap) -> Result<(PathBuf, File), PagesError> {
        let path = self.dir.join(m.pages_file());
        let file = File::open(&path).map_err(io_err(&path))?;
        let actual = file.metadata().map_err(io_err(&path))?.len();
        let expected = m.data_len();
        if actual != expected {
            return Err(PagesError::Length {
                path,
                expected,
                actual,
            });
        }
        Ok((path, file))
    }

    /// [`for_each_page`](Self::for_each_page) on `threads` threads at once (at least one): the
    /// pages files are read in chunks of 4 MiB, each by whichever thread is free, and each
    /// thread calls `f` with its own state (made by `init`); pages come in no particular order.
    /// Returns every thread's state. The first error stops every thread soon after.
    pub fn par_for_each_page<T, E, I, F>(
        &self,
        threads: usize,
        init: I,
        f: F,
    ) -> Result<(Vec<T>, Totals), E>
    where
        T: Send,
        E: From<PagesError> + Send,
        I: Fn() -> T + Sync,
        F: Fn(&mut T, Owner, u64, &[u8; PAGE_SIZE]) -> Result<(), E> + Sync,
    {
        use std::os::unix::fs::FileExt;
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        struct Unit {
            map: usize,
            /// First data page of the chunk.
            first: usize,
            pages: usize,
        }
        let chunk_pages = CHUNK / PAGE_SIZE;
        let mut files = Vec::with_capacity(self.maps.len());
        let mut addrs = Vec::with_capacity(self.maps.len());
        let mut units = Vec::new();
        for (i, m) in self.maps.iter().enumerate() {
            let (path, file) = self.open_pages(m)?;
            let a: Vec<u64> = m.data_page_addrs().collect();
            for first in (0..a.len()).step_by(chunk_pages) {
                units.push(Unit {
                    map: i,
                    first,
                    pages: chunk_pages.min(a.len() - first),
                });
            }
            files.push((path, file));
            addrs.push(a);
        }
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let results: Vec<Result<(T, u64), E>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..threads.max(1))
                .map(|_| {
                    scope.spawn(|| -> Result<(T, u64), E> {
                        let mut state = init();
                        let mut buf = vec![0u8; CHUNK];
                        let mut pages = 0u64;
                        loop {
                            if failed.load(Ordering::Relaxed) {
                                return Ok((state, pages));
                            }
                            let Some(u) = units.get(next.fetch_add(1, Ordering::Relaxed)) else {
                                return Ok((state, pages));
                            };
                            let (path, file) = &files[u.map];
                            let owner = self.maps[u.map].owner;
                            let n = u.pages * PAGE_SIZE;
                            let read = file
                                .read_exact_at(&mut buf[..n], (u.first * PAGE_SIZE) as u64)
                                .map_err(io_err(path));
                            if let Err(e) = read {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e.into());
                            }
                            let at = &addrs[u.map][u.first..u.first + u.pages];
                            for (page, vaddr) in buf[..n].chunks_exact(PAGE_SIZE).zip(at) {
                                // `chunks_exact` yields whole pages.
                                let page: &[u8; PAGE_SIZE] =
                                    page.try_into().expect("chunks_exact yields whole pages");
                                if let Err(e) = f(&mut state, owner, *vaddr, page) {
                                    failed.store(true, Ordering::Relaxed);
                                    return Err(e);
                                }
                            }
                            pages += u.pages as u64;
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| match w.join() {
                    Ok(r) => r,
                    // A panic in `f` is a bug: carried on as one.
                    Err(p) => std::panic::resume_unwind(p),
                })
                .collect()
        });
        let mut states = Vec::with_capacity(results.len());
        let mut totals = Totals {
            maps: self.maps.len(),
            ..Totals::default()
        };
        for r in results {
            let (state, pages) = r?;
            totals.pages += pages;
            states.push(state);
        }
        Ok((states, totals))
    }
}

/// Calls `f` with every data page of the dump in `dir` (see [`MemoryImages::for_each_page`]).
pub fn for_each_page<E, F>(dir: &Path, f: F) -> Result<Totals, E>
where
    E: From<PagesError>,
    F: FnMut(Owner, u64, &[u8; PAGE_SIZE]) -> Result<(), E>,
{
    MemoryImages::load(dir)?.for_each_page(f)
}

/// A page map image as CRIU writes it (magics, head, entries): what [`PageMap::parse`] reads.
/// For tests and tools that make image sets; tether itself only reads them.
pub fn pagemap_image(pages_id: u32, entries: &[PagemapEntry]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IMG_COMMON_MAGIC.to_ne_bytes());
    v.extend_from_slice(&PAGEMAP_MAGIC.to_ne_bytes());
    let mut push = |body: Vec<u8>| {
        v.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        v.extend_from_slice(&body);
    };
    push(PagemapHead { pages_id }.encode_to_vec());
    for e in entries {
        push(e.encode_to_vec());
    }
    v
}

/// Rebuilds every pages file in `dir` from the page maps there and `source` (see
/// [`MemoryImages::write_pages`]).
pub fn rebuild_pages<'a, S>(dir: &Path, source: S) -> Result<Totals, PagesError>
where
    S: FnMut(Owner, u64) -> Option<&'a [u8]>,
{
    MemoryImages::load(dir)?.write_pages(dir, source)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn entry(vaddr: u64, nr: u64, flags: Option<u32>) -> PagemapEntry {
        PagemapEntry {
            vaddr,
            compat_nr_pages: 0,
            in_parent: None,
            flags,
            nr_pages: Some(nr),
        }
    }

    fn page_of(owner: Owner, vaddr: u64) -> Vec<u8> {
        let mut p = vec![0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = (owner.code() as usize ^ (vaddr >> 12) as usize ^ i.wrapping_mul(31)) as u8;
        }
        p
    }

    /// Writes a page map and its pages file (data per `page_of`), returns the pages written.
    fn write_dump(dir: &Path, owner: Owner, pages_id: u32, entries: &[PagemapEntry]) -> u64 {
        let name = match owner {
            Owner::Pid(p) => format!("pagemap-{p}.img"),
            Owner::Shmem(id) => format!("pagemap-shmem-{id}.img"),
        };
        std::fs::write(dir.join(name), pagemap_image(pages_id, entries)).expect("write pagemap");
        let mut data = Vec::new();
        for e in entries {
            let e = normalise(e);
            if e.has_data() {
                for a in e.pages() {
                    data.extend_from_slice(&page_of(owner, a));
                }
            }
        }
        std::fs::write(dir.join(pages_file_name(pages_id)), &data).expect("write pages");
        (data.len() / PAGE_SIZE) as u64
    }

    fn collect(dir: &Path) -> HashMap<(Owner, u64), Vec<u8>> {
        let mut got = HashMap::new();
        for_each_page::<PagesError, _>(dir, |o, a, p| {
            assert!(got.insert((o, a), p.to_vec()).is_none(), "page seen twice");
            Ok(())
        })
        .expect("iterate");
        got
    }

    fn copy_pagemaps(from: &Path, to: &Path) {
        for ent in std::fs::read_dir(from).expect("read dir") {
            let ent = ent.expect("entry");
            let name = ent.file_name().into_string().expect("utf-8 name");
            if is_pagemap_file(&name) {
                std::fs::copy(ent.path(), to.join(&name)).expect("copy");
            }
        }
    }

    fn synthetic() -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        // Unsorted entries (CRIU writes them in page-pipe order), a parent hole, a lazy run
        // without data, an old-style entry without flags and an empty pages file.
        write_dump(
            d.path(),
            Owner::Pid(1),
            2,
            &[
                entry(0x7f00_0000_0000, 3, Some(PE_PRESENT | PE_LAZY)),
                entry(0x40_0000, 2, Some(PE_PRESENT)),
                entry(0x50_0000, 4, Some(PE_PARENT)),
                entry(0x60_0000, 2, Some(PE_LAZY)),
                PagemapEntry {
                    vaddr: 0x70_0000,
                    compat_nr_pages: 1,
                    in_parent: None,
                    flags: None,
                    nr_pages: None,
                },
            ],
        );
        write_dump(d.path(), Owner::Pid(7), 3, &[]);
        write_dump(
            d.path(),
            Owner::Shmem(198),
            1,
            &[
                entry(0, 2, Some(PE_PRESENT)),
                entry(0x3000, 1, Some(PE_PRESENT)),
            ],
        );
        std::fs::write(d.path().join("core-1.img"), b"not a pagemap").expect("other image");
        d
    }

    #[test]
    fn owner_codes_round_trip() {
        for o in [
            Owner::Pid(1),
            Owner::Pid(i32::MAX),
            Owner::Shmem(0),
            Owner::Shmem(198),
        ] {
            assert_eq!(Owner::from_code(o.code()), Some(o));
        }
        assert_ne!(Owner::Pid(5).code(), Owner::Shmem(5).code());
        assert_eq!(Owner::from_code(0), None);
        assert_eq!(Owner::from_code(1 << 40), None);
        assert_eq!(Owner::from_code(Owner::Pid(-5).code()), None);
        assert_eq!(Owner::Shmem(198).to_string(), "shmem 198");
    }

    #[test]
    fn file_names() {
        assert_eq!(owner_of("pagemap-12.img").ok(), Some(Owner::Pid(12)));
        assert_eq!(
            owner_of("pagemap-shmem-198.img").ok(),
            Some(Owner::Shmem(198))
        );
        for bad in [
            "pagemap-0.img",
            "pagemap-+1.img",
            "pagemap-1.img.bak",
            "pagemap-x.img",
            "pagemap-shmem-.img",
            "pagemap-lazy-1.img",
            "pagemap-99999999999.img",
            "pagemap-shmem-18446744073709551615.img",
        ] {
            assert!(
                matches!(owner_of(bad), Err(PagesError::UnknownImage { .. })),
                "{bad}"
            );
        }
        assert!(is_pages_file("pages-1.img"));
        assert!(!is_pages_file("pages-.img"));
        assert!(!is_pages_file("pagemap-1.img"));
        assert!(is_pagemap_file("pagemap-shmem-3.img"));
        assert!(!is_pagemap_file("pages-3.img"));
    }

    #[test]
    fn parses_flags_and_compat_entries() {
        let d = synthetic();
        let imgs = MemoryImages::load(d.path()).expect("load");
        assert_eq!(
            imgs.maps.iter().map(|m| m.owner).collect::<Vec<_>>(),
            vec![Owner::Pid(1), Owner::Pid(7), Owner::Shmem(198)]
        );
        let m = imgs.map(Owner::Pid(1)).expect("pid 1");
        assert_eq!(m.pages_id, 2);
        assert_eq!(m.pages_file(), "pages-2.img");
        assert_eq!(m.entries.len(), 5);
        assert_eq!(
            m.entries[4],
            MapEntry {
                vaddr: 0x70_0000,
                nr_pages: 1,
                flags: PE_PRESENT
            }
        );
        assert_eq!(m.data_pages(), 3 + 2 + 1);
        assert!(m.has_data_at(0x7f00_0000_2000));
        assert!(!m.has_data_at(0x7f00_0000_3000));
        assert!(!m.has_data_at(0x50_0000), "parent hole");
        assert!(m.entry_at(0x50_3000).is_some_and(MapEntry::in_parent));
        assert!(!m.has_data_at(0x60_0000), "lazy without data");
        assert!(!m.has_data_at(0x3f_f000));
        assert!(imgs.has_data_at(Owner::Shmem(198), 0x1000));
        assert!(!imgs.has_data_at(Owner::Shmem(198), 0x2000));
        assert!(!imgs.has_data_at(Owner::Pid(2), 0x40_0000));
        assert!(imgs.has_parent_refs());
        assert!(imgs.has_remote_lazy());
        assert_eq!(imgs.data_pages(), 6 + 3);
        // Old in_parent entries are parent holes whatever their flags.
        let old = PagemapEntry {
            vaddr: 0,
            compat_nr_pages: 2,
            in_parent: Some(true),
            flags: None,
            nr_pages: None,
        };
        assert_eq!(normalise(&old).flags, PE_PARENT);
    }

    #[test]
    fn iterates_in_file_order_and_rebuilds_byte_identical() {
        let d = synthetic();
        let got = collect(d.path());
        assert_eq!(got.len(), 9);
        for ((o, a), p) in &got {
            assert_eq!(*p, page_of(*o, *a), "{o} {a:#x}");
        }
        let mut order = Vec::new();
        MemoryImages::load(d.path())
            .expect("load")
            .for_each_page::<PagesError, _>(|o, a, _| {
                order.push((o, a));
                Ok(())
            })
            .expect("iterate");
        assert_eq!(order[0], (Owner::Pid(1), 0x7f00_0000_0000));
        assert_eq!(order[3], (Owner::Pid(1), 0x40_0000));

        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let totals = rebuild_pages(out.path(), |o: Owner, a: u64| {
            got.get(&(o, a)).map(Vec::as_slice)
        })
        .expect("rebuild");
        assert_eq!(
            totals,
            Totals {
                maps: 3,
                pages: 9,
                eager: 0,
                written: 0
            }
        );
        for id in 1..=3 {
            let name = pages_file_name(id);
            assert_eq!(
                std::fs::read(out.path().join(&name)).expect("rebuilt"),
                std::fs::read(d.path().join(&name)).expect("original"),
                "{name}"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(out.path())
            .expect("read dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn rebuild_rejects_missing_and_wrong_sized_pages_and_leaves_nothing() {
        let d = synthetic();
        let mut got = collect(d.path());
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());

        got.remove(&(Owner::Shmem(198), 0x1000));
        got.remove(&(Owner::Shmem(198), 0x3000));
        let err = rebuild_pages(out.path(), |o: Owner, a: u64| {
            got.get(&(o, a)).map(Vec::as_slice)
        })
        .expect_err("pages are missing");
        match &err {
            PagesError::MissingPage {
                owner,
                vaddr,
                missing,
                ..
            } => {
                assert_eq!((*owner, *vaddr, *missing), (Owner::Shmem(198), 0x1000, 2));
            }
            e => panic!("wrong error {e}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("shmem 198") && msg.contains("0x1000"), "{msg}");
        let files: Vec<_> = std::fs::read_dir(out.path())
            .expect("read dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !is_pagemap_file(n))
            .collect();
        assert!(files.is_empty(), "nothing written on failure: {files:?}");

        let short = vec![0u8; 100];
        let err = rebuild_pages(out.path(), |_: Owner, _: u64| Some(short.as_slice()))
            .expect_err("short page");
        assert!(matches!(err, PagesError::BadPage { len: 100, .. }), "{err}");

        // Extra pages in the source are ignored.
        let full = vec![7u8; PAGE_SIZE];
        let totals = rebuild_pages(out.path(), |_: Owner, _: u64| Some(full.as_slice()))
            .expect("any content will do");
        assert_eq!(totals.pages, 9);
    }

    fn non_pagemap_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .expect("read dir")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !is_pagemap_file(n))
            .collect()
    }

    #[test]
    fn a_draft_with_holes_patched_by_the_final_difference_is_byte_identical() {
        let d = synthetic();
        let got = collect(d.path());
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        // The destination holds pid 1's first run with stale content and none of shmem 198.
        let stale = vec![0xAAu8; PAGE_SIZE];
        let mut draft = images
            .draft_pages(out.path(), |o: Owner, a: u64| match o {
                Owner::Pid(1) if a >= 0x7f00_0000_0000 => Some(stale.as_slice()),
                Owner::Shmem(198) => None,
                _ => got.get(&(o, a)).map(Vec::as_slice),
            })
            .expect("draft");
        assert_eq!(draft.missing(), 3);
        // Nothing is in place before the draft is finished.
        assert!(!out.path().join(pages_file_name(1)).exists());
        let page = |o: Owner, a: u64| (a, Some(got[&(o, a)].as_slice()));
        draft
            .patch(
                Owner::Pid(1),
                [0x7f00_0000_0000, 0x7f00_0000_1000, 0x7f00_0000_2000]
                    .map(|a| page(Owner::Pid(1), a)),
            )
            .expect("patch pid 1");
        draft
            .patch(
                Owner::Shmem(198),
                [0, 0x1000, 0x3000].map(|a| page(Owner::Shmem(198), a)),
            )
            .expect("patch shmem");
        assert_eq!(draft.missing(), 0);
        let totals = draft.finish().expect("finish");
        assert_eq!(totals.pages, 9);
        for id in [1, 2, 3] {
            let a = std::fs::read(d.path().join(pages_file_name(id))).expect("original");
            let b = std::fs::read(out.path().join(pages_file_name(id))).expect("rebuilt");
            assert!(a == b, "pages-{id}.img differs");
        }
        assert_eq!(
            non_pagemap_files(out.path()).len(),
            3,
            "no temporary file left"
        );
    }

    #[test]
    fn hot_first_clears_lazy_on_small_regions_and_patched_pages_only_in_process_maps() {
        let d = tempfile::tempdir().expect("tempdir");
        // pid 1: a 2-page region, then a 6-page one; the final difference patches 2 pages of
        // the big one.
        write_dump(
            d.path(),
            Owner::Pid(1),
            1,
            &[
                entry(0x1000_0000, 2, Some(PE_PRESENT | PE_LAZY)),
                entry(0x2000_0000, 6, Some(PE_PRESENT | PE_LAZY)),
            ],
        );
        let got = collect(d.path());
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        let mut draft = images
            .draft_pages(out.path(), |o: Owner, a: u64| {
                got.get(&(o, a)).map(Vec::as_slice)
            })
            .expect("draft");
        let hot = [0x2000_3000u64, 0x2000_4000];
        draft
            .patch(
                Owner::Pid(1),
                hot.map(|a| (a, Some(got[&(Owner::Pid(1), a)].as_slice()))),
            )
            .expect("patch");
        let totals = draft.finish_hot_first(4).expect("finish");
        assert_eq!(totals.eager, 4, "the 2-page region and the 2 patched pages");
        let a = std::fs::read(d.path().join(pages_file_name(1))).expect("original");
        let b = std::fs::read(out.path().join(pages_file_name(1))).expect("rebuilt");
        assert!(a == b, "the pages file is unchanged");
        let map = MemoryImages::load(out.path())
            .expect("reload")
            .map(Owner::Pid(1))
            .expect("pid 1")
            .clone();
        let runs: Vec<(u64, u64, bool)> = map
            .entries
            .iter()
            .map(|e| (e.vaddr, e.nr_pages, e.lazy()))
            .collect();
        assert_eq!(
            runs,
            vec![
                (0x1000_0000, 2, false),
                (0x2000_0000, 3, true),
                (0x2000_3000, 2, false),
                (0x2000_5000, 1, true),
            ]
        );
        assert_eq!(
            non_pagemap_files(out.path()).len(),
            1,
            "no temporary file left"
        );
    }

    #[test]
    fn the_parallel_scan_sees_every_page_once_with_its_data() {
        let d = synthetic();
        // A map larger than one chunk, so that threads share it.
        let big = 3 * (CHUNK / PAGE_SIZE) as u64 + 5;
        write_dump(
            d.path(),
            Owner::Pid(9),
            4,
            &[entry(0x7000_0000, big, Some(PE_PRESENT | PE_LAZY))],
        );
        let want = collect(d.path());
        let images = MemoryImages::load(d.path()).expect("load");
        for threads in [1, 3] {
            let (parts, totals) = images
                .par_for_each_page::<_, PagesError, _, _>(threads, Vec::new, |v, o, a, p| {
                    v.push(((o, a), p.to_vec()));
                    Ok(())
                })
                .expect("scan");
            assert_eq!(parts.len(), threads);
            let got: Vec<_> = parts.into_iter().flatten().collect();
            assert_eq!(got.len(), want.len(), "{threads} threads");
            assert_eq!(totals.pages, want.len() as u64);
            let got: HashMap<_, _> = got.into_iter().collect();
            assert!(got == want, "{threads} threads: same pages, same data");
        }
        std::fs::write(d.path().join(pages_file_name(4)), b"short").expect("truncate");
        let images = MemoryImages::load(d.path()).expect("load");
        let err = images
            .par_for_each_page::<(), PagesError, _, _>(2, || (), |_, _, _, _| Ok(()))
            .expect_err("a pages file of the wrong length");
        assert!(matches!(err, PagesError::Length { .. }), "{err}");
    }

    #[test]
    fn a_served_draft_writes_only_what_the_restore_reads_itself() {
        let d = tempfile::tempdir().expect("tempdir");
        // pid 1: a 2-page lazy region, a 6-page lazy region, a 2-page region CRIU never
        // restores lazily; shared memory, restored whole by the restore.
        write_dump(
            d.path(),
            Owner::Pid(1),
            1,
            &[
                entry(0x1000_0000, 2, Some(PE_PRESENT | PE_LAZY)),
                entry(0x2000_0000, 6, Some(PE_PRESENT | PE_LAZY)),
                entry(0x3000_0000, 2, Some(PE_PRESENT)),
            ],
        );
        write_dump(
            d.path(),
            Owner::Shmem(5),
            2,
            &[entry(0, 3, Some(PE_PRESENT))],
        );
        let got = collect(d.path());
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        let source = |o: Owner, a: u64| got.get(&(o, a)).map(Vec::as_slice);
        // Drafted from a store that lacks one page of the big region, which the final
        // difference then brings.
        let late = 0x2000_4000u64;
        let mut draft = images
            .draft_sparse(out.path(), |o: Owner, a: u64| {
                (a != late).then(|| source(o, a)).flatten()
            })
            .expect("draft");
        assert_eq!(draft.missing(), 1);
        draft
            .patch(
                Owner::Pid(1),
                [(late, Some(got[&(Owner::Pid(1), late)].as_slice()))],
            )
            .expect("patch");
        let totals = draft.finish_served(3, source).expect("finish");
        // Hot: the 2-page region (smallest), then the patched page; the 2 pages not lazy and
        // the 3 pages of shared memory are written too.
        assert_eq!(totals.eager, 3);
        assert_eq!(totals.written, 3 + 2 + 3);
        let a = std::fs::read(d.path().join(pages_file_name(1))).expect("original");
        let b = std::fs::read(out.path().join(pages_file_name(1))).expect("drafted");
        assert_eq!(a.len(), b.len(), "the file has its full length");
        let page = |f: &[u8], i: usize| f[i * PAGE_SIZE..(i + 1) * PAGE_SIZE].to_vec();
        for i in 0..10 {
            // Data order: 0-1 small region, 2-7 big region (6 = 0x2000_4000), 8-9 not lazy.
            let expect_written = matches!(i, 0 | 1 | 6 | 8 | 9);
            if expect_written {
                assert_eq!(page(&b, i), page(&a, i), "page {i} written");
            } else {
                assert!(page(&b, i).iter().all(|x| *x == 0), "page {i} left a hole");
            }
        }
        let shm_a = std::fs::read(d.path().join(pages_file_name(2))).expect("original");
        let shm_b = std::fs::read(out.path().join(pages_file_name(2))).expect("drafted");
        assert_eq!(shm_a, shm_b, "shared memory written whole");
        let map = MemoryImages::load(out.path())
            .expect("reload")
            .map(Owner::Pid(1))
            .expect("pid 1")
            .clone();
        let runs: Vec<(u64, u64, bool)> = map
            .entries
            .iter()
            .map(|e| (e.vaddr, e.nr_pages, e.lazy()))
            .collect();
        assert_eq!(
            runs,
            vec![
                (0x1000_0000, 2, false),
                (0x2000_0000, 4, true),
                (0x2000_4000, 1, false),
                (0x2000_5000, 1, true),
                (0x3000_0000, 2, false),
            ],
            "exactly the pages written are not lazy: the daemon asks for all the others"
        );
    }

    #[test]
    fn a_served_draft_without_a_hot_budget_writes_only_what_is_never_lazy() {
        let d = tempfile::tempdir().expect("tempdir");
        write_dump(
            d.path(),
            Owner::Pid(1),
            1,
            &[
                entry(0x1000_0000, 2, Some(PE_PRESENT | PE_LAZY)),
                entry(0x3000_0000, 2, Some(PE_PRESENT)),
            ],
        );
        write_dump(
            d.path(),
            Owner::Shmem(5),
            2,
            &[entry(0, 3, Some(PE_PRESENT))],
        );
        let got = collect(d.path());
        let source = |o: Owner, a: u64| got.get(&(o, a)).map(Vec::as_slice);
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        let totals = images
            .draft_sparse(out.path(), source)
            .expect("draft")
            .finish_served(0, source)
            .expect("finish");
        assert_eq!(totals.eager, 0);
        assert_eq!(
            totals.written,
            2 + 3,
            "the entry never lazy and the shared memory"
        );
    }

    #[test]
    fn a_served_draft_without_its_daemon_writes_every_page_and_refuses_a_plain_finish() {
        let d = tempfile::tempdir().expect("tempdir");
        write_dump(
            d.path(),
            Owner::Pid(1),
            1,
            &[entry(0x2000_0000, 6, Some(PE_PRESENT | PE_LAZY))],
        );
        let got = collect(d.path());
        let source = |o: Owner, a: u64| got.get(&(o, a)).map(Vec::as_slice);
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        let err = images
            .draft_sparse(out.path(), source)
            .expect("draft")
            .finish()
            .expect_err("a sparse draft holds holes");
        assert!(matches!(err, PagesError::Sparse), "{err}");
        let totals = images
            .draft_sparse(out.path(), source)
            .expect("draft")
            .finish_whole(source)
            .expect("whole");
        assert_eq!(totals.written, 6);
        let a = std::fs::read(d.path().join(pages_file_name(1))).expect("original");
        let b = std::fs::read(out.path().join(pages_file_name(1))).expect("rebuilt");
        assert!(a == b, "byte-identical to CRIU's");
    }

    #[test]
    fn pages_written_during_pre_copy_are_marked_by_address_and_others_ignored() {
        let d = tempfile::tempdir().expect("tempdir");
        write_dump(
            d.path(),
            Owner::Pid(1),
            1,
            &[entry(0x2000_0000, 40, Some(PE_PRESENT | PE_LAZY))],
        );
        let got = collect(d.path());
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        let mut draft = images
            .draft_pages(out.path(), |o: Owner, a: u64| {
                got.get(&(o, a)).map(Vec::as_slice)
            })
            .expect("draft");
        draft.mark_recent([
            (Owner::Pid(1), 0x2000_1000),
            (Owner::Pid(1), 0x2000_5000),
            (Owner::Pid(1), 0x9000_0000),
            (Owner::Pid(9), 0x2000_2000),
        ]);
        // A budget below the 40-page region: only the two listed pages of pid 1.
        let totals = draft.finish_hot_first(10).expect("finish");
        assert_eq!(totals.eager, 2);
    }

    #[test]
    fn patches_outside_the_page_maps_are_refused_and_unfinished_drafts_leave_nothing() {
        let d = synthetic();
        let out = tempfile::tempdir().expect("tempdir");
        copy_pagemaps(d.path(), out.path());
        let images = MemoryImages::load(out.path()).expect("load");
        let mut draft = images
            .draft_pages(out.path(), |_: Owner, _: u64| None)
            .expect("draft");
        assert_eq!(draft.missing(), 9);
        // In a parent run (no data here), between runs, an unknown owner, a short page.
        for (o, a) in [
            (Owner::Pid(1), 0x50_0000),
            (Owner::Pid(1), 0x40_2000),
            (Owner::Pid(7), 0x40_0000),
        ] {
            let err = draft.patch(o, [(a, None)]).expect_err("not listed");
            assert!(matches!(err, PagesError::NotInPageMap { .. }), "{err}");
        }
        let err = draft
            .patch(Owner::Pid(9), [(0x40_0000, None)])
            .expect_err("no such owner");
        assert!(err.to_string().contains("no page map of pid 9"), "{err}");
        let short = [0u8; 10];
        let err = draft
            .patch(Owner::Pid(1), [(0x40_0000, Some(&short[..]))])
            .expect_err("short page");
        assert!(matches!(err, PagesError::BadPage { len: 10, .. }), "{err}");
        assert_eq!(draft.missing(), 9, "refused pages count as nothing");
        // A zero page fills a hole.
        draft
            .patch(Owner::Pid(1), [(0x40_0000, None)])
            .expect("zero page");
        assert_eq!(draft.missing(), 8);
        let err = draft.finish().expect_err("still missing");
        // The first missing page in file order: pid 1 lists its 0x7f00... run first.
        assert!(err.to_string().contains("0x7f0000000000"), "{err}");
        assert!(
            non_pagemap_files(out.path()).is_empty(),
            "a failed finish leaves nothing"
        );

        let draft = images
            .draft_pages(out.path(), |_: Owner, _: u64| None)
            .expect("draft");
        assert!(!non_pagemap_files(out.path()).is_empty());
        drop(draft);
        assert!(
            non_pagemap_files(out.path()).is_empty(),
            "a dropped draft leaves nothing"
        );
    }

    #[test]
    fn pages_file_of_the_wrong_length_is_rejected() {
        let d = synthetic();
        let p = d.path().join("pages-1.img");
        let data = std::fs::read(&p).expect("read");
        std::fs::write(&p, &data[..data.len() - 1]).expect("truncate");
        let mut seen = 0;
        let err = for_each_page::<PagesError, _>(d.path(), |o, _, _| {
            assert_ne!(o, Owner::Shmem(198), "no page of a bad file is passed on");
            seen += 1;
            Ok(())
        })
        .expect_err("too short");
        assert!(
            matches!(err, PagesError::Length { expected, actual, .. }
                if expected == 3 * PAGE && actual == 3 * PAGE - 1),
            "{err}"
        );
        std::fs::write(&p, [data.as_slice(), &[0u8; PAGE_SIZE]].concat()).expect("extend");
        assert!(matches!(
            for_each_page::<PagesError, _>(d.path(), |_, _, _| Ok(())),
            Err(PagesError::Length { .. })
        ));
        std::fs::remove_file(&p).expect("remove");
        assert!(matches!(
            for_each_page::<PagesError, _>(d.path(), |_, _, _| Ok(())),
            Err(PagesError::Io { .. })
        ));
    }

    #[test]
    fn callback_errors_stop_the_walk() {
        #[derive(Debug)]
        enum E {
            Pages,
            Stop,
        }
        impl From<PagesError> for E {
            fn from(_: PagesError) -> E {
                E::Pages
            }
        }
        let d = synthetic();
        let mut n = 0;
        let r = for_each_page(d.path(), |_, _, _| {
            n += 1;
            if n == 2 {
                Err(E::Stop)
            } else {
                Ok(())
            }
        });
        assert!(matches!(r, Err(E::Stop)));
        assert_eq!(n, 2);
        let r = for_each_page(Path::new("/nonexistent/tether"), |_, _, _| Ok::<(), E>(()));
        assert!(matches!(r, Err(E::Pages)));
    }

    fn parse(buf: &[u8]) -> Result<PageMap, PagesError> {
        PageMap::parse("pagemap-1.img", buf)
    }

    fn assert_malformed(buf: &[u8], needle: &str) {
        match parse(buf) {
            Err(PagesError::Malformed { what, .. }) => {
                assert!(what.contains(needle), "{what:?} lacks {needle:?}")
            }
            other => panic!("expected malformed ({needle}), got {other:?}"),
        }
    }

    #[test]
    fn malformed_page_maps() {
        let good = pagemap_image(1, &[entry(0x1000, 1, Some(PE_PRESENT))]);
        assert!(parse(&good).is_ok());
        // Without the common magic (v1 images) is fine too.
        assert!(parse(&good[4..]).is_ok());

        let mut wrong = good.clone();
        wrong[4..8].copy_from_slice(&0x1234_5678u32.to_ne_bytes());
        assert_malformed(&wrong, "magic");
        assert_malformed(&good[..2], "shorter than its magic");
        assert_malformed(&good[..8], "no pagemap head");
        assert_malformed(&good[..good.len() - 1], "truncated entry");
        assert_malformed(&good[..good.len() - 4], "truncated entry");
        let mut huge = good[..8].to_vec();
        huge.extend_from_slice(&u32::MAX.to_ne_bytes());
        assert_malformed(&huge, "entry of");
        let mut garbage = good.clone();
        garbage.extend_from_slice(&3u32.to_ne_bytes());
        garbage.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert_malformed(&garbage, "bad entry 1");

        assert_malformed(
            &pagemap_image(1, &[entry(0x1000, u64::MAX / 2, Some(PE_PRESENT))]),
            "overflow",
        );
        assert_malformed(
            &pagemap_image(1, &[entry(u64::MAX - 0xfff, 2, Some(PE_PRESENT))]),
            "overflow",
        );
        assert_malformed(
            &pagemap_image(1, &[entry(0x1001, 1, Some(PE_PRESENT))]),
            "aligned",
        );
        assert_malformed(
            &pagemap_image(1, &[entry(0x1000, 1, Some(0x10))]),
            "unknown flags",
        );
        assert_malformed(
            &pagemap_image(1, &[entry(0x1000, 1, Some(PE_PRESENT | PE_PARENT))]),
            "both present and in the parent",
        );
        assert_malformed(
            &pagemap_image(
                1,
                &[
                    entry(0x1000, 2, Some(PE_PRESENT)),
                    entry(0x2000, 1, Some(PE_PRESENT)),
                ],
            ),
            "overlap",
        );
    }

    #[test]
    fn load_rejects_unknown_and_duplicate_images() {
        let d = synthetic();
        std::fs::write(d.path().join("pagemap-lazy-3.img"), pagemap_image(9, &[])).expect("write");
        assert!(matches!(
            MemoryImages::load(d.path()),
            Err(PagesError::UnknownImage { .. })
        ));
        std::fs::remove_file(d.path().join("pagemap-lazy-3.img")).expect("remove");
        std::fs::write(d.path().join("pagemap-9.img"), pagemap_image(2, &[])).expect("write");
        let err = MemoryImages::load(d.path()).expect_err("pages id 2 twice");
        assert!(err.to_string().contains("pages id 2"), "{err}");
        std::fs::write(d.path().join("pagemap-9.img"), b"junk").expect("write");
        let err = MemoryImages::load(d.path()).expect_err("junk");
        assert!(err.to_string().contains("pagemap-9.img"), "{err}");
    }

    /// Against a real CRIU dump: a process with private, shared, zero-filled and zero-page-mapped
    /// memory is dumped with `--leave-running`; every page is read, and the pages files rebuilt
    /// from the collected pages must be byte-identical. Under `CI=true`, missing CRIU or root is
    /// a failure.
    #[test]
    fn real_criu_dump_round_trips() {
        let criu = real::criu_or_fail();
        let work = tempfile::tempdir().expect("tempdir");
        let dump = work.path().join("dump");
        std::fs::create_dir(&dump).expect("mkdir");
        let proc = real::Victim::start(work.path());
        real::dump(&criu, proc.pid(), &dump);
        drop(proc);

        let imgs = MemoryImages::load(&dump).expect("load the dump");
        assert!(
            imgs.maps.iter().any(|m| matches!(m.owner, Owner::Pid(_))),
            "{imgs:?}"
        );
        assert!(!imgs.has_parent_refs() && !imgs.has_remote_lazy());
        let got = collect(&dump);
        assert_eq!(got.len() as u64, imgs.data_pages());

        // The shared mapping: 256 pages of 0xab written, as offsets 0.. of one object.
        let shm = imgs
            .maps
            .iter()
            .find(|m| matches!(m.owner, Owner::Shmem(_)))
            .expect("a shmem page map");
        for i in 0..256u64 {
            let p = got.get(&(shm.owner, i * PAGE)).expect("shmem page");
            assert_eq!(p[0], 0xab);
        }
        // Private memory: the pattern pages are there.
        let pattern: Vec<_> = got
            .iter()
            .filter(|((o, _), p)| matches!(o, Owner::Pid(_)) && p.starts_with(b"tether-page-"))
            .map(|(k, _)| *k)
            .collect();
        assert_eq!(pattern.len(), 512, "pattern pages found in the dump");
        let thp_always = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .is_ok_and(|s| s.contains("[always]"));
        if !thp_always {
            // Written zero pages are dumped; pages only read (the kernel's zero page) are not.
            let (owner, base) = pattern.iter().min().copied().expect("a pattern page");
            let zero = got
                .get(&(owner, base + 600 * PAGE))
                .expect("written zero page");
            assert!(zero.iter().all(|b| *b == 0));
            assert!(
                !imgs.has_data_at(owner, base + 900 * PAGE),
                "a zero-page page dumped"
            );
        }

        let out = work.path().join("rebuilt");
        std::fs::create_dir(&out).expect("mkdir");
        copy_pagemaps(&dump, &out);
        let totals = rebuild_pages(&out, |o: Owner, a: u64| got.get(&(o, a)).map(Vec::as_slice))
            .expect("rebuild");
        assert_eq!(totals.pages, imgs.data_pages());
        for m in &imgs.maps {
            let a = std::fs::read(dump.join(m.pages_file())).expect("original");
            let b = std::fs::read(out.join(m.pages_file())).expect("rebuilt");
            assert!(a == b, "{} differs after the rebuild", m.pages_file());
        }
    }

    mod real {
        use std::path::{Path, PathBuf};
        use std::process::{Child, Command, Stdio};
        use std::time::{Duration, Instant};

        /// Private memory with a recognisable pattern (512 pages), written zero pages (256),
        /// read-only pages (the kernel's zero page, never dumped), and a shared anonymous
        /// mapping with 256 written pages.
        const PROGRAM: &str = r#"
import mmap, os, sys, time
os.closerange(3, 1 << 20)  # descriptors leaked by whatever started the tests: not ours to dump
priv = mmap.mmap(-1, 4 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(512):
    priv[i * 4096:i * 4096 + 16] = b"tether-page-%04d" % i
for i in range(512, 768):
    priv[i * 4096] = 0
x = sum(priv[i * 4096] for i in range(768, 1024))
sh = mmap.mmap(-1, 2 << 20)
for i in range(256):
    sh[i * 4096] = 0xab
open(sys.argv[1], "w").write("ready")
time.sleep(600)
"#;

        fn find_criu() -> Option<PathBuf> {
            let preferred = Path::new("/usr/local/sbin/criu");
            if preferred.is_file() {
                return Some(preferred.to_path_buf());
            }
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("criu"))
                .find(|p| p.is_file())
        }

        /// CRIU's path; panics with the reason when it cannot run here (never a silent skip).
        pub fn criu_or_fail() -> PathBuf {
            let root = nix::unistd::geteuid().is_root();
            let python = Path::new("/usr/bin/python3").is_file() && Path::new(SETSID).is_file();
            let problem = match (find_criu(), root, python) {
                (None, _, _) => "no criu binary (run scripts/setup.sh as root)",
                (_, false, _) => "not running as root",
                (_, _, false) => "no /usr/bin/python3 or /usr/bin/setsid to run the dumped process",
                (Some(criu), true, true) => return criu,
            };
            // Fails, never skips: a missing prerequisite must not pass as a green test.
            panic!("the real CRIU dump test cannot run: {problem}");
        }

        /// util-linux `setsid`, which starts the dumped process in a session of its own.
        const SETSID: &str = "/usr/bin/setsid";

        /// The dumped process; killed (by pid) and reaped on drop.
        pub struct Victim(Child);

        impl Victim {
            pub fn start(work: &Path) -> Victim {
                let ready = work.join("ready");
                // In its own session: CRIU refuses a tree whose session leader is outside its
                // PID namespace, which is where the test runner's leader is when the suite runs
                // inside a PID namespace (as CI does). `setsid` execs in place (the child is not
                // a process group leader), so the pid stays the one CRIU is given.
                let child = Command::new(SETSID)
                    .arg("/usr/bin/python3")
                    .arg("-c")
                    .arg(PROGRAM)
                    .arg(&ready)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start python3");
                let v = Victim(child);
                let start = Instant::now();
                while !ready.exists() {
                    assert!(
                        start.elapsed() < Duration::from_secs(20),
                        "the test process did not get ready"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
                v
            }

            pub fn pid(&self) -> u32 {
                self.0.id()
            }
        }

        impl Drop for Victim {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }

        pub fn dump(criu: &Path, pid: u32, dir: &Path) {
            let out = Command::new(criu)
                .args([
                    "dump",
                    "--shell-job",
                    "--leave-running",
                    "-o",
                    "dump.log",
                    "-t",
                ])
                .arg(pid.to_string())
                .arg("-D")
                .arg(dir)
                .stdin(Stdio::null())
                .output()
                .expect("run criu");
            let log = std::fs::read_to_string(dir.join("dump.log")).unwrap_or_default();
            assert!(
                out.status.success(),
                "criu dump failed ({}): {}\n{log}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
