//! Rebuilding CRIU's pages files on the destination, in two steps so that most of the writing
//! happens while the source still compares its dump.
//!
//! 1. [`MemoryImages::draft_pages`], as soon as the page maps have arrived: every pages file is
//!    written from the pages the destination already holds (pre-copy), at the offsets the page
//!    map gives them; the pages it lacks are left as holes and counted.
//! 2. [`PagesDraft::patch`] for each page of the final difference (it overwrites what the
//!    store held), then [`PagesDraft::finish`]: a page the page maps list that nobody sent fails
//!    here, naming it; otherwise the files are renamed into place, byte-identical to CRIU's.
//!
//! A draft that is dropped unfinished, or fails, leaves none of its files behind.

use std::fs::File;
use std::io::IoSlice;
use std::path::{Path, PathBuf};

use super::eager::{self, EagerMarks};
use super::pages::{pagemap_image, MemoryImages, Owner, PageMap, PagesError, Totals, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;
/// Largest write: contiguous pages are gathered up to this many (the kernel's `IOV_MAX`)
/// before one `pwritev`.
const RUN_PAGES: usize = 1024;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PagesError + '_ {
    move |source| PagesError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Pages files being rebuilt: written from the pages at hand, with holes where pages are still
/// to come. See the [module documentation](self).
#[derive(Debug)]
pub struct PagesDraft {
    /// One per page map, in the maps' (owner) order.
    files: Vec<DraftFile>,
    /// Only the pages a lazy restore copies in itself are written, at [`PagesDraft::finish_served`]:
    /// the rest stay holes, served from the page store instead.
    sparse: bool,
    /// Paths already renamed into place by a `finish` that then failed.
    placed: Vec<PathBuf>,
}

#[derive(Debug)]
struct DraftFile {
    map: PageMap,
    pagemap: PathBuf,
    path: PathBuf,
    tmp: PathBuf,
    file: File,
    /// Offset in the pages file of each entry's first page (entries without data: unused).
    offsets: Vec<u64>,
    /// Per data page (by file offset / page size): still missing.
    missing: Vec<bool>,
    missing_count: u64,
    /// Per data page: written by a patch (the final difference: the service's latest writes).
    patched: Vec<bool>,
    /// Per data page: written by the service while pre-copy ran ([`PagesDraft::mark_recent`]).
    recent: Vec<bool>,
}

/// Contiguous pages gathered for one `pwritev`, written straight from where they are held.
struct Run<'a> {
    pages: Vec<&'a [u8]>,
    at: u64,
}

impl<'a> Run<'a> {
    fn new() -> Run<'a> {
        Run {
            pages: Vec::with_capacity(RUN_PAGES),
            at: 0,
        }
    }

    /// Adds the page that belongs at `offset`, writing out what was gathered first if the page
    /// does not continue it or the run is full.
    fn push(&mut self, f: &DraftFile, offset: u64, page: &'a [u8]) -> Result<(), PagesError> {
        let continues = self.at + (self.pages.len() * PAGE_SIZE) as u64 == offset;
        if !self.pages.is_empty() && (!continues || self.pages.len() >= RUN_PAGES) {
            self.flush(f)?;
        }
        if self.pages.is_empty() {
            self.at = offset;
        }
        self.pages.push(page);
        Ok(())
    }

    fn flush(&mut self, f: &DraftFile) -> Result<(), PagesError> {
        let total = self.pages.len() * PAGE_SIZE;
        let mut done = 0usize;
        while done < total {
            // Every page is PAGE_SIZE long (checked before it is pushed).
            let (first, skip) = (done / PAGE_SIZE, done % PAGE_SIZE);
            let mut iov = Vec::with_capacity(self.pages.len() - first);
            iov.push(IoSlice::new(&self.pages[first][skip..]));
            iov.extend(self.pages[first + 1..].iter().map(|p| IoSlice::new(p)));
            let at = libc::off_t::try_from(self.at + done as u64).map_err(|_| {
                io_err(&f.tmp)(std::io::Error::from(std::io::ErrorKind::InvalidInput))
            })?;
            match nix::sys::uio::pwritev(&f.file, &iov, at) {
                Ok(0) => {
                    return Err(io_err(&f.tmp)(std::io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(io_err(&f.tmp)(e.into())),
            }
        }
        self.pages.clear();
        Ok(())
    }
}

impl DraftFile {
    /// The offset of `vaddr`'s page in the pages file, if the page map lists it with data.
    fn offset_of(&self, vaddr: u64) -> Option<u64> {
        let i = self.map.entry_index_at(vaddr)?;
        let e = &self.map.entries[i];
        e.has_data().then(|| self.offsets[i] + (vaddr - e.vaddr))
    }

    fn mark_received(&mut self, offset: u64) {
        let slot = usize::try_from(offset / PAGE)
            .ok()
            .and_then(|i| self.missing.get_mut(i));
        if let Some(m) = slot {
            if *m {
                *m = false;
                self.missing_count -= 1;
            }
        }
    }

    fn first_missing(&self) -> Option<u64> {
        let i = self.missing.iter().position(|m| *m)?;
        self.map.data_page_addrs().nth(i)
    }
}

impl MemoryImages {
    /// Starts rebuilding every pages file into `out` (normally [`dir`](MemoryImages::dir)
    /// itself): each file gets its page map's length and every page `source` has, at its place;
    /// the others are left to [`PagesDraft::patch`]. Fails on a page of the wrong size.
    pub fn draft_pages<'a, S>(&self, out: &Path, source: S) -> Result<PagesDraft, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        self.draft(out, source, false)
    }

    /// Starts pages files for a lazy restore whose daemon is served from the page store: the
    /// files get their page maps' lengths but no data yet (holes cost no memory on tmpfs); what
    /// `source` lacks is counted as missing, as in [`draft_pages`](Self::draft_pages), and
    /// [`PagesDraft::finish_served`] writes the pages the restore itself reads.
    pub fn draft_sparse<'a, S>(&self, out: &Path, source: S) -> Result<PagesDraft, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        self.draft(out, source, true)
    }

    fn draft<'a, S>(
        &self,
        out: &Path,
        mut source: S,
        sparse: bool,
    ) -> Result<PagesDraft, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        let mut draft = PagesDraft {
            files: Vec::with_capacity(self.maps.len()),
            sparse,
            placed: Vec::new(),
        };
        let mut run = Run::new();
        for m in &self.maps {
            let tmp = out.join(format!(".{}.part", m.pages_file()));
            let file = File::create(&tmp).map_err(io_err(&tmp))?;
            // In the draft from here on: removed with it whatever happens next.
            draft.files.push(DraftFile {
                map: m.clone(),
                pagemap: self.dir().join(&m.pagemap_file),
                path: out.join(m.pages_file()),
                tmp,
                file,
                offsets: vec![0; m.entries.len()],
                // A page map's data pages fit in memory: they were parsed from it.
                missing: vec![false; m.data_pages() as usize],
                missing_count: 0,
                patched: vec![false; m.data_pages() as usize],
                recent: vec![false; m.data_pages() as usize],
            });
            // Invariant: the element was pushed on the line above.
            let f = draft.files.last_mut().expect("just pushed");
            f.file.set_len(m.data_len()).map_err(io_err(&f.tmp))?;
            let mut offset = 0u64;
            for (i, e) in m.entries.iter().enumerate() {
                if !e.has_data() {
                    continue;
                }
                f.offsets[i] = offset;
                for vaddr in e.pages() {
                    match source(m.owner, vaddr) {
                        // A hole: the run's next push does not continue it and writes it out.
                        None => {
                            f.missing[(offset / PAGE) as usize] = true;
                            f.missing_count += 1;
                        }
                        Some(p) if p.len() != PAGE_SIZE => {
                            return Err(PagesError::BadPage {
                                owner: m.owner,
                                vaddr,
                                len: p.len(),
                            });
                        }
                        Some(_) if sparse => {}
                        Some(p) => run.push(f, offset, p)?,
                    }
                    offset += PAGE;
                }
            }
            run.flush(f)?;
        }
        Ok(draft)
    }

    /// Writes every pages file into `out` exactly as CRIU wrote it, from `source` alone
    /// ([`draft_pages`](Self::draft_pages) then [`finish`](PagesDraft::finish)). Fails, leaving
    /// none of the files, if `source` lacks a page the maps list or returns a page of the wrong
    /// size. Pages `source` holds beyond the maps are ignored.
    pub fn write_pages<'a, S>(&self, out: &Path, source: S) -> Result<Totals, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        self.draft_pages(out, source)?.finish()
    }
}

impl PagesDraft {
    /// Writes pages of `owner` (`None`: an all-zero page) at their places, over whatever the
    /// draft held there. Consecutive pages are written together. Fails on a page the page maps
    /// do not list with data, or of the wrong size; the pages before it are written.
    pub fn patch<'p>(
        &mut self,
        owner: Owner,
        pages: impl IntoIterator<Item = (u64, Option<&'p [u8]>)>,
    ) -> Result<(), PagesError> {
        static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        let not_listed = |vaddr| PagesError::NotInPageMap { owner, vaddr };
        let i = self
            .files
            .binary_search_by_key(&owner, |f| f.map.owner)
            .map_err(|_| PagesError::NoPageMap { owner })?;
        let f = &mut self.files[i];
        let mut run = Run::new();
        for (vaddr, data) in pages {
            let page = data.unwrap_or(&ZERO);
            if page.len() != PAGE_SIZE {
                run.flush(f)?;
                return Err(PagesError::BadPage {
                    owner,
                    vaddr,
                    len: page.len(),
                });
            }
            let Some(offset) = f.offset_of(vaddr) else {
                run.flush(f)?;
                return Err(not_listed(vaddr));
            };
            if !self.sparse {
                run.push(f, offset, page)?;
            }
            f.mark_received(offset);
            if let Some(p) = f.patched.get_mut((offset / PAGE) as usize) {
                *p = true;
            }
        }
        run.flush(f)
    }

    /// Notes the pages the service wrote while pre-copy ran, for
    /// [`finish_hot_first`](Self::finish_hot_first); pages outside the page maps are ignored.
    pub fn mark_recent(&mut self, pages: impl IntoIterator<Item = (Owner, u64)>) {
        for (owner, vaddr) in pages {
            let Ok(i) = self.files.binary_search_by_key(&owner, |f| f.map.owner) else {
                continue;
            };
            let f = &mut self.files[i];
            if let Some(r) = f
                .offset_of(vaddr)
                .and_then(|o| f.recent.get_mut((o / PAGE) as usize))
            {
                *r = true;
            }
        }
    }

    /// Pages the page maps list that neither the source of the draft nor a patch supplied.
    pub fn missing(&self) -> u64 {
        self.files.iter().map(|f| f.missing_count).sum()
    }

    /// Completes the rebuild: fails if any listed page is still missing (naming the first, and
    /// counting the missing pages of its page map), else renames every file into place. On
    /// failure none of the files remains.
    pub fn finish(self) -> Result<Totals, PagesError> {
        self.finish_hot_first(0)
    }

    /// [`finish`](Self::finish), and with a `budget` of pages above 0, rewrites the processes'
    /// page maps so that a lazy restore copies their hot pages in at once (see
    /// [`eager`](super::eager): the smallest regions, then the patched pages if they fit, then
    /// the pages written during pre-copy while the budget lasts). The
    /// pages files do not change; a full restore reads the same pages either way.
    pub fn finish_hot_first(self, budget: u64) -> Result<Totals, PagesError> {
        if self.sparse {
            return Err(PagesError::Sparse);
        }
        self.complete(
            budget,
            None::<fn(Owner, u64) -> Option<&'static [u8]>>,
            false,
        )
    }

    /// Completes a [sparse](MemoryImages::draft_sparse) draft for a lazy restore served from
    /// the page store: fails as [`finish`](Self::finish) does if a listed page is missing, then
    /// marks the hot pages as [`finish_hot_first`](Self::finish_hot_first) does and writes from
    /// `source` every page the restore itself copies in (those not lazy: the hot ones, shared
    /// memory, what CRIU never restores lazily). The lazy pages stay holes: the page server
    /// serves them.
    pub fn finish_served<'a, S>(self, budget: u64, source: S) -> Result<Totals, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        self.complete(budget, Some(source), false)
    }

    /// Completes a [sparse](MemoryImages::draft_sparse) draft for a full restore after all
    /// (its lazy-pages daemon is not there): writes every page from `source`.
    pub fn finish_whole<'a, S>(self, source: S) -> Result<Totals, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        self.complete(0, Some(source), true)
    }

    /// Checks the draft and writes its page maps; with `source`, writes the pages a lazy restore
    /// reads itself, or with `whole` every page.
    fn complete<'a, S>(
        mut self,
        budget: u64,
        source: Option<S>,
        whole: bool,
    ) -> Result<Totals, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        for f in &self.files {
            if let Some(vaddr) = f.first_missing() {
                return Err(PagesError::MissingPage {
                    owner: f.map.owner,
                    vaddr,
                    missing: f.missing_count,
                    pagemap: f.pagemap.clone(),
                });
            }
            let actual = f.file.metadata().map_err(io_err(&f.tmp))?.len();
            if actual != f.map.data_len() {
                return Err(PagesError::Length {
                    path: f.path.clone(),
                    expected: f.map.data_len(),
                    actual,
                });
            }
        }
        let mut totals = Totals::default();
        // With no budget nothing is marked, but process maps still get (empty) marks: `None`
        // means shared memory, which a served restore writes whole.
        let marks = self.hot_marks(budget);
        if let Some(mut source) = source {
            totals.written = self.write_restored_pages(&marks, &mut source, whole)?;
        }
        totals.eager = self.write_pagemaps(&marks)?;
        for f in &self.files {
            std::fs::rename(&f.tmp, &f.path).map_err(io_err(&f.path))?;
            self.placed.push(f.path.clone());
            totals.maps += 1;
            totals.pages += f.map.data_pages();
        }
        self.files.clear();
        self.placed.clear();
        Ok(totals)
    }
}

impl PagesDraft {
    /// Per file, the hot pages a lazy restore copies in at once (`None`: shared memory, which a
    /// lazy restore copies in whole anyway).
    fn hot_marks(&self, budget: u64) -> Vec<Option<EagerMarks>> {
        let mut marks: Vec<Option<EagerMarks>> = self
            .files
            .iter()
            .map(|f| matches!(f.map.owner, Owner::Pid(_)).then(|| EagerMarks::new(f.patched.len())))
            .collect();
        let mut left = budget;
        for (f, m) in self.files.iter().zip(marks.iter_mut()) {
            if let Some(m) = m {
                eager::mark_small_regions(&f.map, m, &mut left);
            }
        }
        for (f, m) in self.files.iter().zip(marks.iter_mut()) {
            if let Some(m) = m {
                eager::mark_hot(&f.map, m, &mut left, |i| {
                    f.patched.get(i).copied().unwrap_or(false)
                });
            }
        }
        for (f, m) in self.files.iter().zip(marks.iter_mut()) {
            if let Some(m) = m {
                eager::mark_while(&f.map, m, &mut left, |i| {
                    f.recent.get(i).copied().unwrap_or(false)
                });
            }
        }
        marks
    }

    /// Writes the pages a lazy restore reads from the pages files (every page of an entry that
    /// is not lazy, and the marked ones), or with `all` every page; returns how many.
    fn write_restored_pages<'a, S>(
        &self,
        marks: &[Option<EagerMarks>],
        source: &mut S,
        all: bool,
    ) -> Result<u64, PagesError>
    where
        S: FnMut(Owner, u64) -> Option<&'a [u8]>,
    {
        let mut written = 0;
        for (f, m) in self.files.iter().zip(marks) {
            let mut run = Run::new();
            let mut index = 0usize;
            for (i, e) in f.map.entries.iter().enumerate() {
                if !e.has_data() {
                    continue;
                }
                let whole = all || !e.lazy() || m.is_none();
                for (k, vaddr) in e.pages().enumerate() {
                    let at = index + k;
                    if !whole && !m.as_ref().is_some_and(|m| m.is_marked(at)) {
                        continue;
                    }
                    let page = source(f.map.owner, vaddr).ok_or(PagesError::MissingPage {
                        owner: f.map.owner,
                        vaddr,
                        missing: 1,
                        pagemap: f.pagemap.clone(),
                    })?;
                    if page.len() != PAGE_SIZE {
                        return Err(PagesError::BadPage {
                            owner: f.map.owner,
                            vaddr,
                            len: page.len(),
                        });
                    }
                    run.push(f, f.offsets[i] + (k as u64) * PAGE, page)?;
                    written += 1;
                }
                index += e.nr_pages as usize;
            }
            run.flush(f)?;
        }
        Ok(written)
    }

    /// Rewrites the processes' page maps with their marked pages not lazy; returns how many.
    fn write_pagemaps(&self, marks: &[Option<EagerMarks>]) -> Result<u64, PagesError> {
        let mut total = 0;
        for (f, m) in self.files.iter().zip(marks) {
            let Some(m) = m.as_ref().filter(|m| m.count > 0) else {
                continue;
            };
            let image = pagemap_image(f.map.pages_id, &eager::entries_with(&f.map, m));
            let dir = f.path.parent().unwrap_or(Path::new("."));
            let path = dir.join(&f.map.pagemap_file);
            let tmp = dir.join(format!(".{}.part", f.map.pagemap_file));
            let written = std::fs::write(&tmp, image)
                .map_err(io_err(&tmp))
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(io_err(&path)));
            if written.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            written?;
            total += m.count;
        }
        Ok(total)
    }
}

impl Drop for PagesDraft {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(&f.tmp);
        }
        for p in &self.placed {
            let _ = std::fs::remove_file(p);
        }
    }
}
