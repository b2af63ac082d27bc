//! The destination's copy of the memory pages it has received (pure: no I/O, unit-tested).
//!
//! Pre-copy rounds fill it while the service still runs on the source; each round overwrites the
//! pages that changed. Pages are accepted only for owners and address ranges the source has
//! announced (its processes' mappings); anything else is a protocol error. At the end, CRIU's
//! `pages-*.img` files are rebuilt from the store plus the final difference.
//!
//! The store's limit counts all the memory a peer can make it hold: page data (freed slots
//! included, the slab does not shrink), an index entry per page, data or zero, and the
//! announced ranges.

use std::collections::HashMap;

use crate::protocol::{PageBatch, PAGE};

/// Errors applying pages.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum StoreError {
    /// Pages for an owner nobody announced.
    #[error("page for owner {owner:#x}, which the source did not announce")]
    UnknownOwner {
        /// The owner code.
        owner: u64,
    },
    /// A page outside the owner's announced ranges.
    #[error("page {addr:#x} of owner {owner:#x} lies outside the announced mappings")]
    OutOfRange {
        /// The owner code.
        owner: u64,
        /// The page address.
        addr: u64,
    },
    /// The store would exceed its memory limit.
    #[error("page store limit of {limit} bytes exceeded")]
    Full {
        /// The limit.
        limit: u64,
    },
    /// A malformed layout.
    #[error("bad layout for owner {owner:#x}: {what}")]
    BadLayout {
        /// The owner code.
        owner: u64,
        /// What is wrong.
        what: String,
    },
}

#[derive(Debug, Clone, Copy)]
enum Slot {
    Zero,
    Data(u32),
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    slot: Slot,
    /// Sent again after its first round: the service wrote it during pre-copy.
    rewritten: bool,
}

/// Pages received so far, keyed by (owner, address).
#[derive(Debug)]
pub struct PageStore {
    layout: HashMap<u64, Vec<(u64, u64)>>,
    index: HashMap<(u64, u64), Entry>,
    slab: Vec<u8>,
    free: Vec<u32>,
    /// Ranges announced, all owners together.
    ranges: u64,
    limit: u64,
}

/// What the store counts for a page's index entry (its key, its slot and the hash table's
/// overhead), data or zero.
pub const ENTRY_COST: u64 = 32;
/// What the store counts for an announced range.
pub const RANGE_COST: u64 = 16;

static ZERO: [u8; PAGE] = [0; PAGE];

/// Most ranges one owner may announce.
pub const MAX_RANGES: usize = 65_536;

impl PageStore {
    /// An empty store that holds at most `limit` bytes of page data.
    pub fn new(limit: u64) -> PageStore {
        PageStore {
            layout: HashMap::new(),
            index: HashMap::new(),
            slab: Vec::new(),
            free: Vec::new(),
            ranges: 0,
            limit,
        }
    }

    /// Sets the address ranges `[start, end)` an owner's pages may come from. Pages already held
    /// outside the new ranges are dropped (the mapping is gone).
    pub fn announce(&mut self, owner: u64, mut ranges: Vec<(u64, u64)>) -> Result<(), StoreError> {
        let bad = |what: String| StoreError::BadLayout { owner, what };
        if ranges.len() > MAX_RANGES {
            return Err(bad(format!("{} ranges", ranges.len())));
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(bad(format!("ranges {:#x?} and {:#x?} overlap", w[0], w[1])));
            }
        }
        for &(s, e) in &ranges {
            if s >= e || s % PAGE as u64 != 0 || e % PAGE as u64 != 0 {
                return Err(bad(format!(
                    "range {s:#x}..{e:#x} is empty or not page-aligned"
                )));
            }
        }
        let before = self.layout.get(&owner).map_or(0, |r| r.len() as u64);
        let ranges_after = self.ranges - before + ranges.len() as u64;
        if self.memory() - self.ranges * RANGE_COST + ranges_after * RANGE_COST > self.limit {
            return Err(StoreError::Full { limit: self.limit });
        }
        let gone: Vec<(u64, u64)> = self
            .index
            .keys()
            .filter(|(o, a)| *o == owner && !contains(&ranges, *a))
            .copied()
            .collect();
        for k in gone {
            if let Some(Entry {
                slot: Slot::Data(i),
                ..
            }) = self.index.remove(&k)
            {
                self.free.push(i);
            }
        }
        self.layout.insert(owner, ranges);
        self.ranges = ranges_after;
        Ok(())
    }

    /// Stores a batch, after checking every page against the owner's announced ranges; on error
    /// nothing of the batch is stored.
    pub fn apply(&mut self, batch: &PageBatch) -> Result<(), StoreError> {
        let ranges = self
            .layout
            .get(&batch.owner)
            .ok_or(StoreError::UnknownOwner { owner: batch.owner })?;
        if let Some((addr, _)) = batch.pages.iter().find(|(a, _)| !contains(ranges, *a)) {
            return Err(StoreError::OutOfRange {
                owner: batch.owner,
                addr: *addr,
            });
        }
        // At most what the batch adds (a page twice in one batch is counted twice).
        let (mut new_data, mut new_entries) = (0u64, 0u64);
        for (a, d) in &batch.pages {
            let held = self.index.get(&(batch.owner, *a)).map(|e| e.slot);
            new_entries += u64::from(held.is_none());
            new_data += u64::from(d.is_some() && !matches!(held, Some(Slot::Data(_))));
        }
        let new_slots = new_data.saturating_sub(self.free.len() as u64);
        if self.memory() + new_slots * PAGE as u64 + new_entries * ENTRY_COST > self.limit {
            return Err(StoreError::Full { limit: self.limit });
        }
        for (addr, data) in &batch.pages {
            let key = (batch.owner, *addr);
            let held = self.index.get(&key).map(|e| e.slot);
            let slot = match (data, held) {
                (None, Some(Slot::Data(i))) => {
                    self.free.push(i);
                    Slot::Zero
                }
                (None, _) => Slot::Zero,
                (Some(d), Some(Slot::Data(i))) => {
                    let at = i as usize * PAGE;
                    self.slab[at..at + PAGE].copy_from_slice(d);
                    Slot::Data(i)
                }
                (Some(d), _) => {
                    let i = match self.free.pop() {
                        Some(i) => {
                            let at = i as usize * PAGE;
                            self.slab[at..at + PAGE].copy_from_slice(d);
                            i
                        }
                        None => {
                            let i = (self.slab.len() / PAGE) as u32;
                            self.slab.extend_from_slice(d);
                            i
                        }
                    };
                    Slot::Data(i)
                }
            };
            self.index.insert(
                key,
                Entry {
                    slot,
                    rewritten: held.is_some(),
                },
            );
        }
        Ok(())
    }

    /// The pages sent again after the round that first brought them, as (owner, address): the
    /// service wrote them while pre-copy ran (its recent writes). Walks the index once, no
    /// lookups.
    pub fn rewritten_pages(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.index
            .iter()
            .filter(|(_, e)| e.rewritten)
            .map(|(k, _)| *k)
    }

    /// The held content of a page.
    pub fn get(&self, owner: u64, addr: u64) -> Option<&[u8]> {
        match self.index.get(&(owner, addr))?.slot {
            Slot::Zero => Some(&ZERO),
            Slot::Data(i) => {
                let at = i as usize * PAGE;
                self.slab.get(at..at + PAGE)
            }
        }
    }

    /// The memory the store counts against its limit, in bytes: the page slab, an index entry
    /// per page held (data or zero) and the announced ranges.
    pub fn memory(&self) -> u64 {
        self.slab.len() as u64 + self.index.len() as u64 * ENTRY_COST + self.ranges * RANGE_COST
    }

    /// Number of pages held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no page is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// Sorts `[start, end)` ranges and merges overlapping or adjacent ones.
pub fn merge_ranges(it: impl IntoIterator<Item = (u64, u64)>) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = it.into_iter().collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn contains(ranges: &[(u64, u64)], addr: u64) -> bool {
    // Ranges are sorted and disjoint: find the last range starting at or before addr.
    let i = ranges.partition_point(|&(s, _)| s <= addr);
    i > 0 && addr < ranges[i - 1].1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Option<Vec<u8>> {
        Some(vec![b; PAGE])
    }

    fn batch(owner: u64, pages: Vec<(u64, Option<Vec<u8>>)>) -> PageBatch {
        PageBatch { owner, pages }
    }

    #[test]
    fn stores_overwrites_and_zeroes() {
        let mut s = PageStore::new(1 << 20);
        s.announce(1, vec![(0x1000, 0x4000)]).expect("layout");
        s.apply(&batch(1, vec![(0x1000, page(1)), (0x2000, None)]))
            .expect("apply");
        assert_eq!(s.get(1, 0x1000), Some(&[1u8; PAGE][..]));
        assert_eq!(s.get(1, 0x2000), Some(&[0u8; PAGE][..]));
        assert_eq!(s.get(1, 0x3000), None);
        s.apply(&batch(1, vec![(0x1000, None), (0x2000, page(2))]))
            .expect("overwrite");
        assert_eq!(s.get(1, 0x1000), Some(&[0u8; PAGE][..]));
        assert_eq!(s.get(1, 0x2000), Some(&[2u8; PAGE][..]));
        assert_eq!(s.len(), 2);
        assert_eq!(s.slab.len(), PAGE, "the freed slot was reused");
    }

    #[test]
    fn pages_sent_again_after_their_first_round_are_the_services_recent_writes() {
        struct Recent<'a>(&'a PageStore);
        impl Recent<'_> {
            fn rewritten(&self, owner: u64, addr: u64) -> bool {
                self.0.rewritten_pages().any(|p| p == (owner, addr))
            }
        }
        let mut s = PageStore::new(1 << 20);
        s.announce(1, vec![(0x1000, 0x5000)]).expect("layout");
        s.apply(&batch(
            1,
            vec![(0x1000, page(1)), (0x2000, page(1)), (0x3000, None)],
        ))
        .expect("round 0");
        assert!(!Recent(&s).rewritten(1, 0x1000) && !Recent(&s).rewritten(1, 0x3000));
        s.apply(&batch(
            1,
            vec![(0x2000, page(2)), (0x3000, page(3)), (0x4000, page(4))],
        ))
        .expect("round 1");
        assert!(!Recent(&s).rewritten(1, 0x1000), "not sent again");
        assert!(
            Recent(&s).rewritten(1, 0x2000) && Recent(&s).rewritten(1, 0x3000),
            "sent again"
        );
        assert!(!Recent(&s).rewritten(1, 0x4000), "first sent in round 1");
        s.apply(&batch(1, vec![(0x1000, page(5))]))
            .expect("round 2");
        assert!(
            Recent(&s).rewritten(1, 0x1000) && Recent(&s).rewritten(1, 0x2000),
            "a rewrite is remembered"
        );
        assert!(
            !Recent(&s).rewritten(2, 0x1000) && !Recent(&s).rewritten(1, 0x9000),
            "unknown pages"
        );
    }

    #[test]
    fn rejects_unknown_owners_and_addresses_atomically() {
        let mut s = PageStore::new(1 << 20);
        s.announce(1, vec![(0x1000, 0x3000)]).expect("layout");
        assert_eq!(
            s.apply(&batch(2, vec![(0x1000, page(1))])),
            Err(StoreError::UnknownOwner { owner: 2 })
        );
        assert_eq!(
            s.apply(&batch(1, vec![(0x1000, page(1)), (0x3000, page(1))])),
            Err(StoreError::OutOfRange {
                owner: 1,
                addr: 0x3000
            })
        );
        assert!(s.is_empty(), "nothing of a rejected batch is stored");
    }

    #[test]
    fn layout_changes_drop_unmapped_pages_and_bad_layouts_are_refused() {
        let mut s = PageStore::new(1 << 20);
        s.announce(1, vec![(0x1000, 0x3000)]).expect("layout");
        s.apply(&batch(1, vec![(0x1000, page(1)), (0x2000, page(2))]))
            .expect("apply");
        s.announce(1, vec![(0x2000, 0x3000)]).expect("shrink");
        assert_eq!(s.get(1, 0x1000), None);
        assert!(s.get(1, 0x2000).is_some());
        assert!(s
            .announce(1, vec![(0x1000, 0x3000), (0x2000, 0x4000)])
            .is_err());
        assert!(s.announce(1, vec![(0x1001, 0x3000)]).is_err());
        assert!(s.announce(1, vec![(0x3000, 0x3000)]).is_err());
    }

    #[test]
    fn the_limit_holds() {
        // Two pages, their entries, one zero page's entry and the range.
        let limit = 2 * PAGE as u64 + 3 * ENTRY_COST + RANGE_COST;
        let mut s = PageStore::new(limit);
        s.announce(1, vec![(0, 0x10000)]).expect("layout");
        s.apply(&batch(1, vec![(0, page(1)), (0x1000, page(1))]))
            .expect("fits");
        s.apply(&batch(1, vec![(0, page(3))]))
            .expect("overwrite fits");
        s.apply(&batch(1, vec![(0x2000, None)]))
            .expect("a zero page costs its entry");
        assert_eq!(s.memory(), limit);
        assert_eq!(
            s.apply(&batch(1, vec![(0x3000, page(1))])),
            Err(StoreError::Full { limit })
        );
        assert_eq!(
            s.apply(&batch(1, vec![(0x3000, None)])),
            Err(StoreError::Full { limit }),
            "zero pages count"
        );
    }

    #[test]
    fn zero_pages_and_layouts_count_against_the_limit() {
        let mut s = PageStore::new(PAGE as u64);
        s.announce(1, vec![(0, 1 << 40)]).expect("layout");
        // A peer sending only zero pages cannot grow the index without bound.
        let zeros: Vec<(u64, Option<Vec<u8>>)> =
            (0..1000).map(|i| (i * PAGE as u64, None)).collect();
        assert_eq!(
            s.apply(&batch(1, zeros)),
            Err(StoreError::Full { limit: PAGE as u64 })
        );
        assert!(s.is_empty(), "nothing of a refused batch is stored");
        // Nor the layouts.
        let many: Vec<(u64, u64)> = (0..1000u64)
            .map(|i| (i * 0x2000, i * 0x2000 + 0x1000))
            .collect();
        assert_eq!(
            s.announce(2, many),
            Err(StoreError::Full { limit: PAGE as u64 })
        );
        assert!(s.memory() <= PAGE as u64);
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges([
                (0x3000, 0x4000),
                (0x1000, 0x2000),
                (0x2000, 0x3000),
                (0x8000, 0x9000)
            ]),
            vec![(0x1000, 0x4000), (0x8000, 0x9000)]
        );
    }

    #[test]
    fn range_lookup() {
        let r = vec![(0x1000, 0x2000), (0x5000, 0x8000)];
        assert!(!contains(&r, 0));
        assert!(contains(&r, 0x1000));
        assert!(!contains(&r, 0x2000));
        assert!(contains(&r, 0x7000));
        assert!(!contains(&r, 0x8000));
    }
}
