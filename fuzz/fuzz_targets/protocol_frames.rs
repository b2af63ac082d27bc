//! The migration protocol's decoder, as the agent and the source run it on bytes from the peer: a
//! stream of `u32 length | u8 kind | body` frames, control bodies decoded as JSON messages of
//! either direction, page-batch bodies as [`PageBatch`]es.
//!
//! Checks: nothing panics; what decodes re-encodes to something that decodes to the same (control
//! messages), or to exactly the bytes received (page batches, whose encoding is canonical); a
//! decoded batch keeps the bounds the decoder promises.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tether_fuzz::protocol::frame::{
    check_file_name, decode, encode, parse_header, Kind, HEADER, MAX_CONTROL, MAX_DATA,
};
use tether_fuzz::protocol::{FromAgent, PageBatch, ToAgent, PAGE};

fn control(body: &[u8]) {
    if let Ok(m) = decode::<ToAgent>(body) {
        let _ = m.name();
        if let ToAgent::File { name, .. } = &m {
            if check_file_name(name).is_ok() {
                assert!(!name.contains('/') && !name.starts_with('.') && name.len() <= 128);
            }
        }
        let frame = encode(&m);
        let again: ToAgent = decode(&frame[HEADER..]).expect("a message re-decodes");
        assert_eq!(again, m);
    }
    if let Ok(m) = decode::<FromAgent>(body) {
        let _ = m.name();
        let frame = encode(&m);
        let again: FromAgent = decode(&frame[HEADER..]).expect("a message re-decodes");
        assert_eq!(again, m);
    }
}

fn pages(body: &[u8]) {
    let Ok(batch) = PageBatch::decode(body) else {
        return;
    };
    assert!((1..=PageBatch::MAX_PAGES).contains(&batch.pages.len()));
    let mut last = None;
    for (addr, data) in &batch.pages {
        assert_eq!(addr % PAGE as u64, 0);
        assert!(last.is_none_or(|l| l < *addr));
        last = Some(*addr);
        assert!(data.as_ref().is_none_or(|d| d.len() == PAGE));
    }
    let borrowed: Vec<(u64, Option<&[u8]>)> = batch
        .pages
        .iter()
        .map(|(a, d)| (*a, d.as_deref()))
        .collect();
    let frame = PageBatch::encode(batch.owner, &borrowed);
    assert_eq!(&frame[HEADER..], body, "page batches encode canonically");
    let (kind, len) = parse_header(frame[..HEADER].try_into().expect("a header")).expect("valid");
    assert_eq!((kind, len), (Kind::Pages, body.len()));
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= HEADER {
        let (h, tail) = rest.split_at(HEADER);
        let Ok((kind, len)) = parse_header(h.try_into().expect("HEADER bytes")) else {
            return;
        };
        assert!(len <= MAX_DATA.max(MAX_CONTROL).max(PageBatch::MAX_BODY));
        // The stream ends early: the receiver waits for (or loses) the rest of the body.
        let Some(body) = tail.get(..len) else {
            return;
        };
        match kind {
            Kind::Control => control(body),
            Kind::Pages => pages(body),
            _ => {}
        }
        rest = &tail[len..];
    }
});
