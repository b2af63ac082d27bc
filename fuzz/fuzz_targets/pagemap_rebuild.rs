//! The destination's rebuild of CRIU's pages files: page maps as received (written to an images
//! directory, then loaded), a draft from the pages pre-copy left in the store, patches with the
//! final difference, and the finish.
//!
//! Checks: what loads is consistent (owners sorted and unique, pages ids unique, entries
//! page-aligned and disjoint); the draft counts exactly the pages nobody has sent yet; a patch
//! fails exactly for an owner without a page map or a page the map does not list with data; the
//! finish fails exactly when a listed page is still missing, naming the first one and leaving no
//! file behind, and otherwise writes every pages file byte for byte as the model says (the last
//! content sent for each page, in page-map order).
//!
//! Page maps declaring more than [`MAX_PAGES`] data pages in all must be refused by
//! `data_len_within`, the check the agent makes before the rebuild sizes anything by them.
#![no_main]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tether_fuzz::criu::pages::{
    pagemap_image, MemoryImages, Owner, PagemapEntry, PagesError, PAGE_SIZE,
};

const P: u64 = PAGE_SIZE as u64;
/// Most data pages a fuzzed dump may declare: the bound passed to `data_len_within`.
const MAX_PAGES: u64 = 2048;

#[derive(Debug, Arbitrary)]
enum Count {
    Small(u8),
    Raw(u64),
}

#[derive(Debug, Arbitrary)]
struct EntrySpec {
    page: u16,
    misalign: bool,
    count: Count,
    /// As stored: `None` is an entry of CRIU before flags existed.
    flags: Option<u8>,
    in_parent: Option<bool>,
    /// The count in `compat_nr_pages` (and no `nr_pages`), as older CRIU wrote it.
    compat: bool,
}

#[derive(Debug, Arbitrary)]
enum OwnerSpec {
    Pid(u8),
    Shmem(u8),
}

#[derive(Debug, Arbitrary)]
struct MapSpec {
    owner: OwnerSpec,
    pages_id: u8,
    common_magic: bool,
    entries: Vec<EntrySpec>,
    /// One byte of the image overwritten: (position, value).
    corrupt: Option<(u16, u8)>,
}

#[derive(Debug, Arbitrary)]
struct PatchSpec {
    /// Index into the loaded page maps; past them, an owner without one.
    map: u8,
    /// (page number, zero page?)
    pages: Vec<(u16, bool)>,
    /// The last page is sent with a wrong length.
    short_last: bool,
}

#[derive(Debug, Arbitrary)]
struct Input {
    maps: Vec<MapSpec>,
    /// Which listed data pages the store holds before the draft, cycled over them.
    held: Vec<bool>,
    /// Pages the store holds outside the page maps (ignored by the rebuild).
    extra: Vec<(u8, u16)>,
    /// A held page of the wrong length, by index into the listed data pages.
    short_held: Option<u16>,
    patches: Vec<PatchSpec>,
}

fn owner(o: &OwnerSpec) -> Owner {
    match o {
        OwnerSpec::Pid(p) => Owner::Pid(i32::from(*p) + 1),
        OwnerSpec::Shmem(id) => Owner::Shmem(u64::from(*id) + 1000),
    }
}

fn file_name(o: Owner) -> String {
    match o {
        Owner::Pid(p) => format!("pagemap-{p}.img"),
        Owner::Shmem(id) => format!("pagemap-shmem-{id}.img"),
        _ => unreachable!("only pids and shmem ids are generated"),
    }
}

fn image(m: &MapSpec) -> Vec<u8> {
    let entries: Vec<PagemapEntry> = m
        .entries
        .iter()
        .take(16)
        .map(|e| {
            let n = match e.count {
                Count::Small(n) => u64::from(n),
                Count::Raw(n) => n,
            };
            PagemapEntry {
                vaddr: u64::from(e.page) * P + u64::from(e.misalign),
                compat_nr_pages: if e.compat { n as u32 } else { 0 },
                in_parent: e.in_parent,
                flags: e.flags.map(|f| u32::from(f & 0xf)),
                nr_pages: (!e.compat).then_some(n),
            }
        })
        .collect();
    let mut v = pagemap_image(u32::from(m.pages_id), &entries);
    if !m.common_magic {
        // Without CRIU's common magic in front (as some images are).
        v.drain(..4);
    }
    if let Some((at, b)) = m.corrupt {
        let at = usize::from(at) % v.len();
        v[at] = b;
    }
    v
}

fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = Path::new("/dev/shm");
        let base = if base.is_dir() {
            base.to_path_buf()
        } else {
            std::env::temp_dir()
        };
        base.join(format!("tether-fuzz-rebuild-{}", std::process::id()))
    })
}

/// A page's content: its owner and address, then `version` repeated.
fn content(o: Owner, vaddr: u64, version: u8) -> Vec<u8> {
    let mut d = vec![version; PAGE_SIZE];
    d[..8].copy_from_slice(&o.code().to_le_bytes());
    d[8..16].copy_from_slice(&vaddr.to_le_bytes());
    d
}

fn listed_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .expect("scratch directory")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with("pagemap"))
        .collect();
    v.sort();
    v
}

fn check_loaded(images: &MemoryImages) {
    for w in images.maps.windows(2) {
        assert!(w[0].owner < w[1].owner, "owners sorted and unique");
    }
    let mut ids: Vec<u32> = images.maps.iter().map(|m| m.pages_id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), images.maps.len(), "pages ids unique");
    for m in &images.maps {
        for (i, e) in m.entries.iter().enumerate() {
            assert_eq!(e.vaddr % P, 0);
            assert!(!(e.has_data() && e.in_parent()));
            if e.nr_pages > 0 {
                assert_eq!(m.entry_index_at(e.vaddr), Some(i));
                assert_eq!(m.entry_index_at(e.end() - P), Some(i));
            }
        }
    }
}

fn run(input: Input, dir: &Path) {
    for m in input.maps.iter().take(4) {
        std::fs::write(dir.join(file_name(owner(&m.owner))), image(m)).expect("write a page map");
    }
    let images = match MemoryImages::load(dir) {
        Ok(i) => i,
        Err(PagesError::Malformed { .. } | PagesError::UnknownImage { .. }) => return,
        Err(e) => panic!("loading page maps: {e}"),
    };
    check_loaded(&images);
    let declared: u128 = images.maps.iter().map(|m| u128::from(m.data_len())).sum();
    match images.data_len_within(MAX_PAGES * P) {
        Ok(n) => assert_eq!(u128::from(n), declared),
        Err(PagesError::TooLarge { max, .. }) => {
            assert!(
                declared > u128::from(max),
                "refused {declared} bytes under {max}"
            );
            return;
        }
        Err(e) => panic!("data_len_within: {e}"),
    }

    // The store before the draft.
    let listed: Vec<(Owner, u64)> = images
        .maps
        .iter()
        .flat_map(|m| m.data_page_addrs().take(4096).map(move |a| (m.owner, a)))
        .collect();
    let mut held: HashMap<(Owner, u64), Vec<u8>> = HashMap::new();
    if !input.held.is_empty() {
        for (i, &(o, a)) in listed.iter().enumerate() {
            if input.held[i % input.held.len()] {
                held.insert((o, a), content(o, a, 1));
            }
        }
    }
    for &(m, page) in input.extra.iter().take(16) {
        if let Some(map) = images.maps.get(usize::from(m) % images.maps.len().max(1)) {
            let a = u64::from(page) * P;
            if !map.has_data_at(a) {
                held.insert((map.owner, a), content(map.owner, a, 2));
            }
        }
    }
    let short = input
        .short_held
        .and_then(|i| listed.get(usize::from(i)))
        .filter(|k| held.contains_key(k))
        .copied();
    if let Some(k) = short {
        if let Some(d) = held.get_mut(&k) {
            d.truncate(100);
        }
    }

    let draft = images.draft_pages(dir, |o, a| held.get(&(o, a)).map(|d| &d[..]));
    let mut draft = match (draft, short) {
        (Err(PagesError::BadPage { owner, vaddr, len }), Some(k)) => {
            assert_eq!(((owner, vaddr), len), (k, 100));
            assert!(
                listed_files(dir).is_empty(),
                "a failed draft leaves no file"
            );
            return;
        }
        (Ok(_), Some(_)) => panic!("a held page of the wrong length was drafted"),
        (Ok(d), None) => d,
        (Err(e), _) => panic!("draft: {e}"),
    };
    // The model: every listed page's expected content (`None`: still missing).
    let mut model: BTreeMap<(Owner, u64), Option<Vec<u8>>> =
        listed.iter().map(|k| (*k, held.get(k).cloned())).collect();
    let missing = model.values().filter(|v| v.is_none()).count() as u64;
    assert_eq!(draft.missing(), missing);

    let mut version = 3u8;
    for p in input.patches.iter().take(8) {
        let o = match images.maps.get(usize::from(p.map)) {
            Some(m) => m.owner,
            None => Owner::Pid(1000 + i32::from(p.map)),
        };
        version = version.wrapping_add(1).max(3);
        let pages: Vec<(u64, Option<Vec<u8>>)> = p
            .pages
            .iter()
            .take(64)
            .map(|&(page, zero)| {
                let a = u64::from(page) * P;
                (a, (!zero).then(|| content(o, a, version)))
            })
            .collect();
        let mut sent: Vec<(u64, Option<&[u8]>)> =
            pages.iter().map(|(a, d)| (*a, d.as_deref())).collect();
        let short_page = vec![9u8; 100];
        if p.short_last {
            if let Some(last) = sent.last_mut() {
                last.1 = Some(&short_page);
            }
        }
        let result = draft.patch(o, sent.iter().copied());
        let Some(map) = images.map(o) else {
            assert!(matches!(result, Err(PagesError::NoPageMap { owner }) if owner == o));
            continue;
        };
        // The model applies pages up to the first refused one.
        let mut expected = Ok(());
        for (i, (a, d)) in sent.iter().enumerate() {
            if d.is_some_and(|d| d.len() != PAGE_SIZE) {
                expected = Err((*a, "bad page"));
                break;
            }
            if !map.has_data_at(*a) {
                expected = Err((*a, "not listed"));
                break;
            }
            let page = pages[i].1.clone().unwrap_or_else(|| vec![0; PAGE_SIZE]);
            model.insert((o, *a), Some(page));
        }
        match (result, expected) {
            (Ok(()), Ok(())) => {}
            (Err(PagesError::BadPage { vaddr, .. }), Err((a, "bad page"))) => assert_eq!(vaddr, a),
            (Err(PagesError::NotInPageMap { vaddr, .. }), Err((a, "not listed"))) => {
                assert_eq!(vaddr, a)
            }
            (got, want) => panic!("patch said {got:?}, model expected {want:?}"),
        }
        let missing = model.values().filter(|v| v.is_none()).count() as u64;
        assert_eq!(draft.missing(), missing);
    }

    let first_missing = model
        .iter()
        .find(|(_, v)| v.is_none())
        .map(|(k, _)| *k)
        // The model is ordered by (owner, address), the draft by owner then file order.
        .map(|(o, _)| {
            let a = listed
                .iter()
                .find(|(lo, la)| *lo == o && model[&(*lo, *la)].is_none())
                .map(|(_, a)| *a);
            (o, a)
        });
    match (draft.finish(), first_missing) {
        (Err(PagesError::MissingPage { owner, vaddr, .. }), Some((o, a))) => {
            assert_eq!((owner, Some(vaddr)), (o, a));
            assert!(
                listed_files(dir).is_empty(),
                "a failed finish leaves no file"
            );
        }
        (Ok(totals), None) => {
            assert_eq!(totals.maps, images.maps.len());
            assert_eq!(totals.pages, images.data_pages());
            for m in &images.maps {
                let data = std::fs::read(dir.join(m.pages_file())).expect("a pages file");
                assert_eq!(data.len() as u64, m.data_len());
                for (page, a) in data.chunks(PAGE_SIZE).zip(m.data_page_addrs()) {
                    let want = model[&(m.owner, a)].as_deref().expect("no page missing");
                    assert!(page == want, "page {a:#x} of {} differs", m.owner);
                }
            }
        }
        (got, want) => panic!("finish said {got:?}, model expected a missing page at {want:?}"),
    }
}

fuzz_target!(|input: Input| {
    let dir = scratch();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("scratch directory");
    run(input, dir);
    let _ = std::fs::remove_dir_all(dir);
});
