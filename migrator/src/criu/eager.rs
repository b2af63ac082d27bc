//! Hot pages first: which pages a lazy restore copies in before the service runs.
//!
//! CRIU's lazy restore leaves every page of a run marked [`PE_LAZY`] to the `lazy-pages`
//! daemon, which fills memory in behind the running service and serves a page the service
//! touches first on its fault. Each such fault waits for the daemon (which copies in chunks of
//! up to 4 MiB between looking at faults, and shares two cores with everything else), so the
//! pages the service needs to answer its first request should be in place when it resumes.
//! CRIU itself keeps only the page under each thread's stack pointer out of the lazy set.
//!
//! The destination clears [`PE_LAZY`] (splitting runs where needed) on, in this order, within
//! a budget of pages:
//!
//! 1. **the smallest regions**: maximal runs of contiguous lazy pages, smallest first, each
//!    whole or not at all: thread stacks, thread-local storage, heaps and the runtime's
//!    bookkeeping, where a reply's work happens; the bulk of a service's state lies in its
//!    largest regions, which stay lazy. (A first cut took only runs of at most 16 pages: 140
//!    of 16,739 pages of the example service, and its 14-31 faults after the restore stayed.)
//! 2. **the final difference**: the pages written while the service last ran (what pre-copy
//!    could not send before the freeze), if they fit the budget left: the service's current
//!    working set. After stop-and-copy it is all of memory and does not fit;
//! 3. **the pages written during pre-copy** (sent again after their first round), in address
//!    order, while the budget lasts.
//!
//! The budget bounds what this adds to the downtime (the restore copies these pages from the
//! local pages files, at memory speed).

use super::pages::{MapEntry, PageMap, PagemapEntry, PE_LAZY};

/// Pages a lazy restore copies in at once unless told otherwise (32 MiB: at most ~15-50 ms of
/// restore here). Measured on an interpreted service (README, "When the service answers"): with
/// 8 MiB it answered 15-19 ms after the release (median), with 32 MiB 18 ms but never more than
/// 27, with 64 MiB 9 ms at 50 ms more restore; the clients' whole stall was about the same for
/// 8 and 32 MiB and longer for 64.
pub const DEFAULT_BUDGET_PAGES: u64 = 8192;

/// Per page map, per data page (in the pages file's order): restored at once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EagerMarks {
    marks: Vec<bool>,
    /// Pages marked.
    pub count: u64,
}

impl EagerMarks {
    /// Nothing marked, for a map with `data_pages` data pages.
    pub fn new(data_pages: usize) -> EagerMarks {
        EagerMarks {
            marks: vec![false; data_pages],
            count: 0,
        }
    }

    fn mark(&mut self, i: usize) {
        if let Some(m) = self.marks.get_mut(i) {
            if !*m {
                *m = true;
                self.count += 1;
            }
        }
    }

    fn get(&self, i: usize) -> bool {
        self.marks.get(i).copied().unwrap_or(false)
    }

    /// Whether data page `i` (in the pages file's order) is marked.
    pub fn is_marked(&self, i: usize) -> bool {
        self.get(i)
    }
}

/// The data-page index of each lazy run with data, as (first index, pages), in file order.
fn lazy_entries(map: &PageMap) -> impl Iterator<Item = (&MapEntry, usize)> + '_ {
    let mut index = 0usize;
    map.entries.iter().filter_map(move |e| {
        if !e.has_data() {
            return None;
        }
        let first = index;
        index += e.nr_pages as usize;
        e.lazy().then_some((e, first))
    })
}

/// Step 1: marks whole regions of `map`, smallest first, while `budget` lasts.
pub fn mark_small_regions(map: &PageMap, marks: &mut EagerMarks, budget: &mut u64) {
    // Maximal runs of address-contiguous lazy entries: (first data index, pages).
    let mut runs: Vec<(usize, u64, u64)> = Vec::new(); // (first index, pages, end address)
    for (e, first) in lazy_entries(map) {
        match runs.last_mut() {
            Some(r) if r.2 == e.vaddr && r.0 + r.1 as usize == first => {
                r.1 += e.nr_pages;
                r.2 = e.end();
            }
            _ => runs.push((first, e.nr_pages, e.end())),
        }
    }
    runs.sort_by_key(|r| r.1);
    for (first, pages, _) in runs {
        if pages > *budget {
            break;
        }
        for i in first..first + pages as usize {
            marks.mark(i);
        }
        *budget -= pages;
    }
}

/// Step 2: marks the lazy pages `hot` names (by data-page index) not marked yet, all of them
/// if they fit `budget`, else none.
pub fn mark_hot(
    map: &PageMap,
    marks: &mut EagerMarks,
    budget: &mut u64,
    hot: impl Fn(usize) -> bool,
) {
    let wanted: Vec<usize> = lazy_entries(map)
        .flat_map(|(e, first)| first..first + e.nr_pages as usize)
        .filter(|&i| hot(i) && !marks.get(i))
        .collect();
    if wanted.len() as u64 > *budget {
        return;
    }
    *budget -= wanted.len() as u64;
    for i in wanted {
        marks.mark(i);
    }
}

/// Step 3: marks the lazy pages `pick` names not marked yet, in the page map's order, while
/// `budget` lasts.
pub fn mark_while(
    map: &PageMap,
    marks: &mut EagerMarks,
    budget: &mut u64,
    pick: impl Fn(usize) -> bool,
) {
    for (e, first) in lazy_entries(map) {
        for i in first..first + e.nr_pages as usize {
            if *budget == 0 {
                return;
            }
            if pick(i) && !marks.get(i) {
                marks.mark(i);
                *budget -= 1;
            }
        }
    }
}

/// The entries of `map` with [`PE_LAZY`] cleared on the marked pages, runs split where the
/// marks change. The data's order in the pages file is unchanged.
pub fn entries_with(map: &PageMap, marks: &EagerMarks) -> Vec<PagemapEntry> {
    let raw = |vaddr: u64, nr_pages: u64, flags: u32| PagemapEntry {
        vaddr,
        compat_nr_pages: 0,
        in_parent: None,
        flags: Some(flags),
        nr_pages: Some(nr_pages),
    };
    let mut out = Vec::with_capacity(map.entries.len());
    let mut index = 0usize;
    for e in &map.entries {
        if !e.has_data() {
            out.push(raw(e.vaddr, e.nr_pages, e.flags));
            continue;
        }
        let first = index;
        index += e.nr_pages as usize;
        if !e.lazy() {
            out.push(raw(e.vaddr, e.nr_pages, e.flags));
            continue;
        }
        let mut start = 0u64;
        while start < e.nr_pages {
            let eager = marks.get(first + start as usize);
            let mut end = start + 1;
            while end < e.nr_pages && marks.get(first + end as usize) == eager {
                end += 1;
            }
            let flags = if eager { e.flags & !PE_LAZY } else { e.flags };
            out.push(raw(
                e.vaddr + start * super::pages::PAGE_SIZE as u64,
                end - start,
                flags,
            ));
            start = end;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::pages::{pagemap_image, PAGE_SIZE, PE_PRESENT};

    const P: u64 = PAGE_SIZE as u64;

    fn map(entries: &[(u64, u64, u32)]) -> PageMap {
        let raw: Vec<PagemapEntry> = entries
            .iter()
            .map(|&(vaddr, n, flags)| PagemapEntry {
                vaddr,
                compat_nr_pages: 0,
                in_parent: None,
                flags: Some(flags),
                nr_pages: Some(n),
            })
            .collect();
        PageMap::parse("pagemap-1.img", &pagemap_image(1, &raw)).expect("parses")
    }

    const LAZY: u32 = PE_PRESENT | PE_LAZY;

    #[test]
    fn small_regions_first_then_the_final_difference_if_it_fits() {
        // A 2-page stack-like run, a big 100-page state region made of two adjacent entries,
        // a non-lazy page (CRIU's stack pointer page) and a 4-page heap-like run.
        let m = map(&[
            (0x10_000, 2, LAZY),
            (0x100_000, 60, LAZY),
            (0x100_000 + 60 * P, 40, LAZY),
            (0x300_000, 1, PE_PRESENT),
            (0x400_000, 4, LAZY),
        ]);
        let mut marks = EagerMarks::new(m.data_pages() as usize);
        let mut budget = 10;
        mark_small_regions(&m, &mut marks, &mut budget);
        assert_eq!(
            marks.count, 6,
            "the 2- and 4-page runs, not the 100-page one"
        );
        assert!(!marks.get(2), "the state region stays lazy");
        assert_eq!(budget, 4);
        // Hot: three pages of the state region (data indexes 2.. are that region).
        mark_hot(&m, &mut marks, &mut budget, |i| [5, 6, 70].contains(&i));
        assert_eq!(marks.count, 9);
        assert_eq!(budget, 1);

        let out = entries_with(&m, &marks);
        let got: Vec<(u64, u64, bool)> = out
            .iter()
            .map(|e| {
                (
                    e.vaddr,
                    e.nr_pages.expect("n"),
                    e.flags.expect("f") & PE_LAZY != 0,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0x10_000, 2, false),
                (0x100_000, 3, true),
                (0x100_000 + 3 * P, 2, false),
                (0x100_000 + 5 * P, 55, true),
                (0x100_000 + 60 * P, 8, true),
                (0x100_000 + 68 * P, 1, false),
                (0x100_000 + 69 * P, 31, true),
                (0x300_000, 1, false),
                (0x400_000, 4, false),
            ]
        );
        // The same pages, in the same order: the pages file needs no change.
        let again = PageMap::parse("pagemap-1.img", &pagemap_image(1, &out)).expect("parses");
        assert_eq!(again.data_pages(), m.data_pages());
        let a: Vec<u64> = again.data_page_addrs().collect();
        let b: Vec<u64> = m.data_page_addrs().collect();
        assert_eq!(a, b);
    }

    #[test]
    fn pages_written_during_pre_copy_fill_what_the_budget_leaves_in_order() {
        let m = map(&[(0x10_000, 10, LAZY), (0x100_000, 1, PE_PRESENT)]);
        let mut marks = EagerMarks::new(m.data_pages() as usize);
        let mut budget = 3;
        mark_while(&m, &mut marks, &mut budget, |i| i % 2 == 1 || i == 10);
        assert_eq!(marks.count, 3, "as many as the budget");
        assert_eq!(budget, 0);
        assert!(marks.get(1) && marks.get(3) && marks.get(5) && !marks.get(7));
        assert!(!marks.get(10), "a page that is not lazy is never counted");
    }

    #[test]
    fn a_final_difference_over_the_budget_stays_lazy_and_nothing_exceeds_it() {
        let m = map(&[(0x10_000, 20, LAZY), (0x100_000, 3, LAZY)]);
        let mut marks = EagerMarks::new(m.data_pages() as usize);
        let mut budget = 2;
        mark_small_regions(&m, &mut marks, &mut budget);
        assert_eq!(marks.count, 0, "the 3-page run does not fit a budget of 2");
        mark_hot(&m, &mut marks, &mut budget, |_| true);
        assert_eq!(
            marks.count, 0,
            "stop-and-copy: everything is hot, nothing fits"
        );
        let out = entries_with(&m, &marks);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|e| e.flags.expect("f") & PE_LAZY != 0));
    }
}
