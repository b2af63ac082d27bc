//! The CRIU image files tether reads from an images directory that a peer filled: page maps
//! (`pagemap-*.img`, by their file name), the inventory and the stats files, and the file-name
//! checks that decide what a received file may be called and what it is taken for.
//!
//! Checks: nothing panics; a page map that parses is consistent (entries page-aligned, not both
//! present and in the parent, disjoint, found by address, data pages within the address space);
//! an inventory or stats entry that parses re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use tether_fuzz::criu::images::{first_entry, INVENTORY_MAGIC, STATS_MAGIC};
use tether_fuzz::criu::pages::{self, Owner, PageMap, PAGE_SIZE};
use tether_fuzz::criu::rpc::{InventoryEntry, StatsEntry};
use tether_fuzz::protocol::frame::check_file_name;

const P: u64 = PAGE_SIZE as u64;

fn page_map(name: &str, buf: &[u8]) {
    let Ok(m) = PageMap::parse(name, buf) else {
        return;
    };
    assert_eq!(m.pagemap_file, name);
    assert!(pages::is_pagemap_file(name));
    assert!(m.pages_file().starts_with("pages-") && pages::is_pages_file(&m.pages_file()));
    assert_eq!(Owner::from_code(m.owner.code()), Some(m.owner));
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for (i, e) in m.entries.iter().enumerate() {
        assert_eq!(e.vaddr % P, 0);
        assert!(!(e.has_data() && e.in_parent()));
        let end = e
            .nr_pages
            .checked_mul(P)
            .and_then(|l| e.vaddr.checked_add(l))
            .expect("an entry ends inside the address space");
        assert_eq!(e.end(), end);
        if e.nr_pages > 0 {
            assert_eq!(m.entry_index_at(e.vaddr), Some(i));
            assert_eq!(m.entry_index_at(end - P), Some(i));
            assert_eq!(m.has_data_at(e.vaddr), e.has_data());
            spans.push((e.vaddr, end));
        }
    }
    spans.sort_unstable();
    assert!(
        spans.windows(2).all(|w| w[0].1 <= w[1].0),
        "entries disjoint"
    );
    let data: u64 = m
        .entries
        .iter()
        .filter(|e| e.has_data())
        .map(|e| e.nr_pages)
        .sum();
    assert_eq!(m.data_pages(), data);
    assert_eq!(m.data_len(), data * P);
    for a in m.data_page_addrs().take(64) {
        assert!(m.has_data_at(a));
    }
}

fn entry<M: Message + Default + PartialEq + std::fmt::Debug>(buf: &[u8], magic: u32) {
    if let Ok(e) = first_entry::<M>(buf, magic) {
        let again = M::decode(&e.encode_to_vec()[..]).expect("re-decodes");
        assert_eq!(again, e);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            // A file name (up to the first NUL) and the image.
            let (name, buf) = match rest.iter().position(|b| *b == 0) {
                Some(i) => (&rest[..i], &rest[i + 1..]),
                None => (rest, &[][..]),
            };
            let name = String::from_utf8_lossy(name);
            let ok = check_file_name(&name).is_ok();
            if ok {
                assert!(!name.contains('/') && !name.starts_with('.'));
            }
            let _ = pages::is_pages_file(&name);
            page_map(&name, buf);
        }
        1 => page_map("pagemap-1.img", rest),
        2 => page_map("pagemap-shmem-7.img", rest),
        _ => {
            entry::<InventoryEntry>(rest, INVENTORY_MAGIC);
            entry::<StatsEntry>(rest, STATS_MAGIC);
        }
    }
});
