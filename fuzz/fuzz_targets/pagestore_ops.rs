//! The destination's page store under arbitrary sequences of layouts and page batches (the
//! batches pass through the wire encoding first, as they arrive from a source), against a plain
//! model: a map of (owner, address) to content, and each owner's announced ranges.
//!
//! Checks after every step: the store holds exactly what the model holds, with the same content;
//! a refused layout or batch changes nothing; a batch is refused if storing it would take the page
//! data over the limit; layouts and batches are refused exactly when they are malformed, for an
//! unknown owner or outside the owner's ranges.
//!
//! A store may refuse a batch for its budget where the model's data pages alone would fit: its
//! budget counts an index entry per page, zero pages included, and the announced ranges. What it
//! counts (`PageStore::memory`) never exceeds the limit, and covers every held page's entry.
#![no_main]

use std::collections::{BTreeMap, HashMap};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tether_fuzz::pagestore::{PageStore, StoreError, ENTRY_COST};
use tether_fuzz::protocol::frame::HEADER;
use tether_fuzz::protocol::{PageBatch, PAGE};

const P: u64 = PAGE as u64;
/// Addresses are page numbers from here, so that the top of the address space is exercised too.
/// The highest range ends two pages below the top of the address space.
const HIGH: u64 = (u64::MAX / P - 511) * P;

#[derive(Debug, Arbitrary)]
enum Op {
    /// Ranges as (first page, pages); `misalign` shifts one range's start off a page boundary.
    Announce {
        owner: u8,
        ranges: Vec<(u8, u8)>,
        high: bool,
        misalign: Option<u8>,
    },
    /// Pages by page number; `None` is a zero page, `Some(b)` a page filled with `b`.
    Apply {
        owner: u8,
        pages: Vec<(u8, Option<u8>)>,
        high: bool,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    limit_pages: u8,
    ops: Vec<Op>,
}

fn addr(page: u8, high: bool) -> u64 {
    if high {
        HIGH + u64::from(page) * P
    } else {
        u64::from(page) * P
    }
}

fn contains(ranges: &[(u64, u64)], a: u64) -> bool {
    ranges.iter().any(|&(s, e)| s <= a && a < e)
}

#[derive(Default)]
struct Model {
    layout: HashMap<u64, Vec<(u64, u64)>>,
    /// `None`: a zero page.
    pages: BTreeMap<(u64, u64), Option<Vec<u8>>>,
}

impl Model {
    fn data_pages(&self) -> u64 {
        self.pages.values().filter(|d| d.is_some()).count() as u64
    }

    fn check(&self, store: &PageStore, limit: u64) {
        assert_eq!(store.len(), self.pages.len());
        assert_eq!(store.is_empty(), self.pages.is_empty());
        assert!(self.data_pages() * P <= limit, "page data over the limit");
        assert!(
            store.memory() <= limit,
            "the store counts {} bytes, over its limit {limit}",
            store.memory()
        );
        assert!(
            self.data_pages() * P + self.pages.len() as u64 * ENTRY_COST <= store.memory(),
            "{} pages held (zero pages included) but only {} bytes counted",
            self.pages.len(),
            store.memory()
        );
        for (&(owner, a), d) in &self.pages {
            let got = store.get(owner, a).expect("a held page");
            match d {
                None => assert!(got.iter().all(|b| *b == 0)),
                Some(d) => assert_eq!(got, &d[..]),
            }
        }
    }
}

fn valid_layout(ranges: &[(u64, u64)]) -> bool {
    let mut r = ranges.to_vec();
    r.sort_unstable();
    r.iter().all(|&(s, e)| s < e && s % P == 0 && e % P == 0)
        && r.windows(2).all(|w| w[0].1 <= w[1].0)
}

fn announce(store: &mut PageStore, model: &mut Model, owner: u64, ranges: Vec<(u64, u64)>) {
    let valid = valid_layout(&ranges);
    match store.announce(owner, ranges.clone()) {
        Ok(()) => {
            assert!(valid, "accepted a bad layout {ranges:x?}");
            model
                .pages
                .retain(|&(o, a), _| o != owner || contains(&ranges, a));
            model.layout.insert(owner, ranges);
        }
        Err(StoreError::BadLayout { .. }) => assert!(!valid, "refused a good layout {ranges:x?}"),
        // A budget that counts layouts may refuse one; nothing changes then.
        Err(StoreError::Full { .. }) => {}
        Err(e) => panic!("unexpected layout error {e}"),
    }
}

fn apply(store: &mut PageStore, model: &mut Model, limit: u64, batch: PageBatch) {
    let expected = match model.layout.get(&batch.owner) {
        None => Some(StoreError::UnknownOwner { owner: batch.owner }),
        Some(r) => batch
            .pages
            .iter()
            .find(|(a, _)| !contains(r, *a))
            .map(|(a, _)| StoreError::OutOfRange {
                owner: batch.owner,
                addr: *a,
            }),
    };
    let new_data = batch
        .pages
        .iter()
        .filter(|(a, d)| {
            d.is_some() && !matches!(model.pages.get(&(batch.owner, *a)), Some(Some(_)))
        })
        .count() as u64;
    let over = (model.data_pages() + new_data) * P > limit;
    match (store.apply(&batch), expected) {
        (Err(got), Some(want)) => assert_eq!(got, want),
        (Err(StoreError::Full { .. }), None) => {}
        (Ok(()), None) => {
            assert!(!over, "a batch took the page data over the limit");
            for (a, d) in batch.pages {
                model.pages.insert((batch.owner, a), d);
            }
        }
        (got, want) => panic!("store said {got:?}, model expected {want:?}"),
    }
}

fuzz_target!(|input: Input| {
    let limit = u64::from(input.limit_pages) * P;
    let mut store = PageStore::new(limit);
    let mut model = Model::default();
    let mut stamp = 0u32;
    for op in input.ops.into_iter().take(64) {
        match op {
            Op::Announce {
                owner,
                ranges,
                high,
                misalign,
            } => {
                let mut ranges: Vec<(u64, u64)> = ranges
                    .into_iter()
                    .take(32)
                    .map(|(s, n)| (addr(s, high), addr(s, high) + u64::from(n) * P))
                    .collect();
                if let (Some(m), Some(r)) = (misalign, ranges.first_mut()) {
                    r.0 += u64::from(m);
                }
                announce(&mut store, &mut model, u64::from(owner % 4), ranges);
            }
            Op::Apply { owner, pages, high } => {
                let mut pages: Vec<(u64, Option<Vec<u8>>)> = pages
                    .into_iter()
                    .take(PageBatch::MAX_PAGES)
                    .map(|(p, fill)| {
                        stamp += 1;
                        let data = fill.map(|b| {
                            let mut d = vec![b; PAGE];
                            d[..4].copy_from_slice(&stamp.to_le_bytes());
                            d
                        });
                        (addr(p, high), data)
                    })
                    .collect();
                pages.sort_by_key(|(a, _)| *a);
                pages.dedup_by_key(|(a, _)| *a);
                if pages.is_empty() {
                    continue;
                }
                // Through the wire, as the agent receives it.
                let borrowed: Vec<(u64, Option<&[u8]>)> =
                    pages.iter().map(|(a, d)| (*a, d.as_deref())).collect();
                let frame = PageBatch::encode(u64::from(owner % 4), &borrowed);
                let batch = PageBatch::decode(&frame[HEADER..]).expect("a valid batch decodes");
                assert_eq!(batch.pages, pages);
                apply(&mut store, &mut model, limit, batch);
            }
        }
        model.check(&store, limit);
    }
});
