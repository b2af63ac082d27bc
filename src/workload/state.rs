//! Self-verifying memory state of the example service.
//!
//! The state is `mb` MiB of 4 KiB pages. Page `i` has a generation `g_i`; its whole contents are
//! a function of `(i, g_i)`: word 0 holds `g_i`, word `j > 0` holds [`word_value`]`(i, g_i, j)`.
//! [`State::touch`] increments a page's generation and rewrites the whole page. Besides the pages
//! the state keeps a shadow array of generations and a total-writes counter, so that
//! [`State::verify`] catches a page whose contents are corrupt (a wrong word, a zero page, a word
//! from another page), a page reverted to an older but self-consistent version (stored generation
//! behind the shadow), and lost or doubled writes (sum of generations != total writes).
//!
//! After a live migration that lost, duplicated or mixed up any dirty page, `verify` fails; when
//! it succeeds, the digest identifies the whole state (equal digests before and after a migration
//! with dirtying stopped mean an identical state).

use thiserror::Error;

/// Size of one page in bytes.
pub const PAGE_SIZE: usize = 4096;
/// 64-bit words per page.
pub const WORDS_PER_PAGE: usize = PAGE_SIZE / 8;
/// Pages per MiB.
pub const PAGES_PER_MIB: usize = (1024 * 1024) / PAGE_SIZE;

/// One page, aligned so that it covers exactly one 4 KiB memory page.
#[derive(Clone)]
#[repr(C, align(4096))]
struct Page([u64; WORDS_PER_PAGE]);

/// Errors of [`State`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    /// The requested size does not fit in memory arithmetic.
    #[error("state of {mb} MiB is too large")]
    TooLarge {
        /// The requested size.
        mb: usize,
    },
    /// A page index beyond the state.
    #[error("page {page} out of range (state has {pages} pages)")]
    PageOutOfRange {
        /// The index asked for.
        page: usize,
        /// Number of pages.
        pages: usize,
    },
    /// A page whose contents do not match its generation, or whose generation does not match the
    /// shadow record.
    #[error("page {page}: {detail}")]
    BadPage {
        /// Index of the first bad page.
        page: usize,
        /// What is wrong with it.
        detail: String,
    },
    /// All pages are self-consistent, but the generations do not add up to the writes made.
    #[error("sum of page generations is {sum} but {total_writes} writes were made")]
    WriteCount {
        /// Sum of the generations stored in the pages.
        sum: u64,
        /// The total-writes counter.
        total_writes: u64,
    },
}

/// SplitMix64 finaliser: a cheap, well-mixing bijection on `u64`.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Per-page seed from page index and generation.
fn page_seed(page: u64, generation: u64) -> u64 {
    mix64(page.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ mix64(generation ^ 0xD1B5_4A32_D192_ED03))
}

/// Word `j` of a page with seed `seed`. For a fixed seed this is injective in `j` (XOR with a
/// multiple by an odd constant, xorshift and multiplication by an odd constant are bijections),
/// so two swapped words of a page are always detected.
fn word_from_seed(seed: u64, j: u64) -> u64 {
    let x = seed ^ j.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let x = (x ^ (x >> 29)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// The value word `j` (`1 <= j < WORDS_PER_PAGE`) of page `page` holds at generation
/// `generation`. (Word 0 holds the generation itself.)
pub fn word_value(page: u64, generation: u64, j: u64) -> u64 {
    word_from_seed(page_seed(page, generation), j)
}

impl Page {
    fn fill(&mut self, page: u64, generation: u64) {
        let seed = page_seed(page, generation);
        self.0[0] = generation;
        for (j, w) in self.0.iter_mut().enumerate().skip(1) {
            *w = word_from_seed(seed, j as u64);
        }
    }

    /// Checks that the page is consistent with its own stored generation; returns the first
    /// wrong word as (index, found, expected).
    fn check(&self, page: u64) -> Option<(usize, u64, u64)> {
        let generation = self.0[0];
        let seed = page_seed(page, generation);
        self.0.iter().enumerate().skip(1).find_map(|(j, &w)| {
            let want = word_from_seed(seed, j as u64);
            (w != want).then_some((j, w, want))
        })
    }
}

/// The service's memory state; see the [module docs](self).
pub struct State {
    pages: Vec<Page>,
    generations: Vec<u64>,
    total_writes: u64,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("pages", &self.pages.len())
            .field("total_writes", &self.total_writes)
            .finish()
    }
}

impl State {
    /// Allocates `mb` MiB of pages and fills every page (generation 0), so that all of it is
    /// resident and none of it is zero.
    pub fn new(mb: usize) -> Result<State, StateError> {
        let n = mb
            .checked_mul(PAGES_PER_MIB)
            .filter(|n| {
                n.checked_mul(PAGE_SIZE)
                    .is_some_and(|b| b <= isize::MAX as usize)
            })
            .ok_or(StateError::TooLarge { mb })?;
        let mut pages = Vec::with_capacity(n);
        let mut page = Page([0; WORDS_PER_PAGE]);
        for i in 0..n {
            page.fill(i as u64, 0);
            pages.push(page.clone());
        }
        Ok(State {
            pages,
            generations: vec![0; n],
            total_writes: 0,
        })
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages.len()
    }

    /// Number of [`touch`](Self::touch) calls made.
    pub fn total_writes(&self) -> u64 {
        self.total_writes
    }

    /// Generation of page `i` as recorded in the shadow array.
    pub fn generation(&self, i: usize) -> Option<u64> {
        self.generations.get(i).copied()
    }

    /// Increments page `i`'s generation and rewrites the whole page.
    pub fn touch(&mut self, i: usize) -> Result<(), StateError> {
        let pages = self.pages.len();
        let (page, shadow) = self
            .pages
            .get_mut(i)
            .zip(self.generations.get_mut(i))
            .ok_or(StateError::PageOutOfRange { page: i, pages })?;
        let generation = shadow.wrapping_add(1);
        page.fill(i as u64, generation);
        *shadow = generation;
        self.total_writes = self.total_writes.wrapping_add(1);
        Ok(())
    }

    /// Scans every page. Succeeds with a digest of the whole state if every page is consistent
    /// with its stored generation, every stored generation matches the shadow record, and the
    /// generations add up to the total writes; otherwise describes the first problem found.
    pub fn verify(&self) -> Result<u64, StateError> {
        let mut sum = 0u64;
        let mut digest = mix64(self.pages.len() as u64 ^ 0x7465_7468_6572); // "tether"
        for (i, (page, &shadow)) in self.pages.iter().zip(&self.generations).enumerate() {
            let stored = page.0[0];
            if let Some((j, found, want)) = page.check(i as u64) {
                return Err(StateError::BadPage {
                    page: i,
                    detail: format!(
                        "word {j} is {found:#018x}, expected {want:#018x} for stored generation \
                         {stored} (shadow generation {shadow})"
                    ),
                });
            }
            if stored != shadow {
                return Err(StateError::BadPage {
                    page: i,
                    detail: format!(
                        "page is a consistent copy of generation {stored} but generation \
                         {shadow} was written (page reverted or shadow record damaged)"
                    ),
                });
            }
            sum = sum.wrapping_add(stored);
            digest = mix64(digest ^ stored.wrapping_add(i as u64));
        }
        if sum != self.total_writes {
            return Err(StateError::WriteCount {
                sum,
                total_writes: self.total_writes,
            });
        }
        Ok(mix64(digest ^ self.total_writes))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn fresh_state_is_filled_and_verifies() {
        let s = State::new(1).unwrap();
        assert_eq!(s.pages(), 256);
        assert_eq!(s.total_writes(), 0);
        for p in &s.pages {
            // no zero words except word 0 (generation 0)
            assert!(p.0[1..].iter().all(|&w| w != 0));
        }
        s.verify().unwrap();
    }

    #[test]
    fn empty_state_verifies() {
        let s = State::new(0).unwrap();
        assert_eq!(s.pages(), 0);
        s.verify().unwrap();
    }

    #[test]
    fn too_large_is_an_error() {
        assert!(matches!(
            State::new(usize::MAX),
            Err(StateError::TooLarge { .. })
        ));
    }

    #[test]
    fn touches_keep_it_consistent_and_change_the_digest() {
        let mut s = State::new(1).unwrap();
        let d0 = s.verify().unwrap();
        s.touch(5).unwrap();
        s.touch(5).unwrap();
        s.touch(200).unwrap();
        assert_eq!(s.total_writes(), 3);
        assert_eq!(s.generation(5), Some(2));
        assert_eq!(s.pages[5].0[0], 2);
        let d1 = s.verify().unwrap();
        assert_ne!(d0, d1);
        assert_eq!(s.verify().unwrap(), d1, "digest is deterministic");
        assert_eq!(
            s.touch(256),
            Err(StateError::PageOutOfRange {
                page: 256,
                pages: 256
            })
        );
    }

    #[test]
    fn equal_histories_give_equal_digests_different_ones_differ() {
        let mut a = State::new(1).unwrap();
        let mut b = State::new(1).unwrap();
        a.touch(1).unwrap();
        b.touch(1).unwrap();
        assert_eq!(a.verify().unwrap(), b.verify().unwrap());
        a.touch(2).unwrap();
        b.touch(3).unwrap();
        assert_ne!(a.verify().unwrap(), b.verify().unwrap());
    }

    #[test]
    fn corrupting_one_word_is_detected() {
        let mut s = State::new(1).unwrap();
        s.touch(77).unwrap();
        s.pages[77].0[300] ^= 1 << 17;
        match s.verify() {
            Err(StateError::BadPage { page: 77, detail }) => assert!(detail.contains("word 300")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn zeroed_page_and_swapped_words_are_detected() {
        let mut s = State::new(1).unwrap();
        s.pages[10].0 = [0; WORDS_PER_PAGE];
        assert!(matches!(
            s.verify(),
            Err(StateError::BadPage { page: 10, .. })
        ));

        let mut s = State::new(1).unwrap();
        s.pages[11].0.swap(3, 4);
        assert!(matches!(
            s.verify(),
            Err(StateError::BadPage { page: 11, .. })
        ));

        // a page holding another page's contents
        let mut s = State::new(1).unwrap();
        s.pages[12] = s.pages[13].clone();
        assert!(matches!(
            s.verify(),
            Err(StateError::BadPage { page: 12, .. })
        ));
    }

    #[test]
    fn reverting_a_page_is_detected() {
        let mut s = State::new(1).unwrap();
        s.touch(9).unwrap();
        let old = s.pages[9].clone();
        s.touch(9).unwrap();
        s.pages[9] = old;
        match s.verify() {
            Err(StateError::BadPage { page: 9, detail }) => assert!(detail.contains("reverted")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reverting_page_and_shadow_is_caught_by_the_write_count() {
        let mut s = State::new(1).unwrap();
        s.touch(9).unwrap();
        let old = s.pages[9].clone();
        s.touch(9).unwrap();
        s.pages[9] = old;
        s.generations[9] = 1;
        assert_eq!(
            s.verify(),
            Err(StateError::WriteCount {
                sum: 1,
                total_writes: 2
            })
        );
    }

    #[test]
    fn page_is_aligned_to_4k() {
        let s = State::new(1).unwrap();
        assert_eq!(std::mem::size_of::<Page>(), PAGE_SIZE);
        for p in &s.pages {
            assert_eq!((p as *const Page as usize) % PAGE_SIZE, 0);
        }
    }
}
