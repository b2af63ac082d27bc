//! Framing of a migration stream, and its bounds.
//!
//! One QUIC bidirectional stream per migration carries frames `u32 length | u8 kind | body`
//! (big-endian length of the body). A control frame's body is one JSON message (see
//! [`crate::protocol::message`]), at most [`MAX_CONTROL`] bytes; a data frame carries at most
//! [`MAX_DATA`] bytes of the file announced last; a page-batch frame carries up to
//! [`PageBatch::MAX_PAGES`] memory pages. Everything is checked on receipt: unknown kinds,
//! oversized frames, malformed batches and file names that are not plain CRIU image names are
//! [`WireError`]s.

use serde::{Deserialize, Serialize};

use super::error::WireError;
use super::types::PAGE;

/// Largest control message body.
pub const MAX_CONTROL: usize = 64 * 1024;
/// Largest data frame body.
pub const MAX_DATA: usize = 1024 * 1024;
/// Most image files one migration may carry.
pub const MAX_FILES: u32 = 100_000;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Kind {
    /// A JSON control message.
    Control = 1,
    /// A chunk of the current file.
    Data = 2,
    /// A batch of memory pages (see [`PageBatch`]).
    Pages = 3,
}

/// Frame header length.
pub const HEADER: usize = 5;

/// A frame as received: its kind and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A control message body (JSON; decode with [`decode`]).
    Control(Vec<u8>),
    /// A chunk of the file announced last.
    Data(Vec<u8>),
    /// A page batch body (decode with [`PageBatch::decode`]).
    Pages(Vec<u8>),
}

impl Frame {
    /// The frame kind's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            Frame::Control(_) => "control message",
            Frame::Data(_) => "file data",
            Frame::Pages(_) => "page batch",
        }
    }
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Control => "control",
            Kind::Data => "data",
            Kind::Pages => "page batch",
        }
    }
}

/// Parses a frame header into kind and body length, enforcing the limits.
pub fn parse_header(h: [u8; HEADER]) -> Result<(Kind, usize), WireError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let kind = match h[4] {
        1 => Kind::Control,
        2 => Kind::Data,
        3 => Kind::Pages,
        k => return Err(WireError::UnknownKind(k)),
    };
    let max = match kind {
        Kind::Control => MAX_CONTROL,
        Kind::Data => MAX_DATA,
        Kind::Pages => PageBatch::MAX_BODY,
    };
    if len > max {
        return Err(WireError::TooLarge {
            kind: kind.name(),
            len,
            max,
        });
    }
    Ok((kind, len))
}

/// Encodes a frame header.
pub fn header(kind: Kind, len: usize) -> [u8; HEADER] {
    let l = (len as u32).to_be_bytes();
    [l[0], l[1], l[2], l[3], kind as u8]
}

/// A batch of memory pages of one owner (a process, by its pid inside the tree's PID namespace,
/// or a shared-memory object), for pre-copy rounds and the final difference.
///
/// Body: `u64 owner | u32 count | count x (u64 vaddr | u8 flags) | page data`, where data follows
/// for every page without the zero flag, in order. Addresses are page-aligned and strictly
/// increasing; a zero page costs its 9-byte header only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// The owner code: a process by its pid inside the tree's PID namespace, or a shared-memory
    /// object (see `criu::pages::Owner`).
    pub owner: u64,
    /// (address, content); `None` for a page of zeros.
    pub pages: Vec<(u64, Option<Vec<u8>>)>,
}

const ZERO_FLAG: u8 = 1;

impl PageBatch {
    /// Most pages in one batch.
    pub const MAX_PAGES: usize = 256;
    /// Largest batch body.
    pub const MAX_BODY: usize = 12 + Self::MAX_PAGES * (9 + PAGE);

    /// Encodes a batch as a whole frame from borrowed pages (`None` = zero page).
    pub fn encode(owner: u64, pages: &[(u64, Option<&[u8]>)]) -> Vec<u8> {
        let data = pages.iter().filter(|(_, d)| d.is_some()).count();
        let len = 12 + pages.len() * 9 + data * PAGE;
        let mut v = Vec::with_capacity(HEADER + len);
        v.extend_from_slice(&header(Kind::Pages, len));
        v.extend_from_slice(&owner.to_be_bytes());
        v.extend_from_slice(&(pages.len() as u32).to_be_bytes());
        for (addr, d) in pages {
            v.extend_from_slice(&addr.to_be_bytes());
            v.push(if d.is_none() { ZERO_FLAG } else { 0 });
        }
        for d in pages.iter().filter_map(|(_, d)| *d) {
            v.extend_from_slice(d);
        }
        v
    }

    /// Decodes and checks a batch body.
    pub fn decode(body: &[u8]) -> Result<PageBatch, WireError> {
        let bad = |what: &str| WireError::BadPages(what.to_string());
        if body.len() < 12 {
            return Err(bad("shorter than its header"));
        }
        let owner = u64::from_be_bytes(body[0..8].try_into().map_err(|_| bad("owner"))?);
        let count = u32::from_be_bytes(body[8..12].try_into().map_err(|_| bad("count"))?) as usize;
        if count == 0 || count > Self::MAX_PAGES {
            return Err(bad(&format!(
                "{count} pages (1..={} allowed)",
                Self::MAX_PAGES
            )));
        }
        let table_end = 12 + count * 9;
        let table = body
            .get(12..table_end)
            .ok_or_else(|| bad("truncated page table"))?;
        let mut pages = Vec::with_capacity(count);
        let mut data_at = table_end;
        let mut last: Option<u64> = None;
        for e in table.chunks_exact(9) {
            let addr = u64::from_be_bytes(e[0..8].try_into().map_err(|_| bad("address"))?);
            if addr % PAGE as u64 != 0 {
                return Err(bad(&format!("address {addr:#x} is not page-aligned")));
            }
            if last.is_some_and(|l| addr <= l) {
                return Err(bad("addresses not strictly increasing"));
            }
            last = Some(addr);
            let data = match e[8] {
                ZERO_FLAG => None,
                0 => {
                    let d = body
                        .get(data_at..data_at + PAGE)
                        .ok_or_else(|| bad("truncated page data"))?;
                    data_at += PAGE;
                    Some(d.to_vec())
                }
                f => return Err(bad(&format!("unknown page flags {f:#x}"))),
            };
            pages.push((addr, data));
        }
        if data_at != body.len() {
            return Err(bad("trailing bytes after the page data"));
        }
        Ok(PageBatch { owner, pages })
    }
}

/// Checks that `name` is a plain CRIU image file name: no path separators, no leading dot,
/// printable ASCII, at most 128 characters.
pub fn check_file_name(name: &str) -> Result<(), WireError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'));
    if ok {
        Ok(())
    } else {
        Err(WireError::BadFileName(name.to_string()))
    }
}

/// Decodes a control message body.
pub fn decode<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, WireError> {
    serde_json::from_slice(body).map_err(|e| WireError::BadMessage(e.to_string()))
}

/// Encodes a control message as a whole frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain enums cannot fail (no maps with non-string keys, no custom
    // serializers that error).
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut v = Vec::with_capacity(HEADER + body.len());
    v.extend_from_slice(&header(Kind::Control, body.len()));
    v.extend_from_slice(&body);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_and_limits_hold() {
        assert_eq!(parse_header(header(Kind::Data, 10)), Ok((Kind::Data, 10)));
        assert_eq!(
            parse_header(header(Kind::Control, MAX_CONTROL + 1)),
            Err(WireError::TooLarge {
                kind: "control",
                len: MAX_CONTROL + 1,
                max: MAX_CONTROL
            })
        );
        assert!(parse_header(header(Kind::Data, MAX_DATA)).is_ok());
        assert!(parse_header(header(Kind::Data, MAX_DATA + 1)).is_err());
        assert_eq!(
            parse_header([0, 0, 0, 1, 9]),
            Err(WireError::UnknownKind(9))
        );
    }

    #[test]
    fn page_batches_round_trip_and_reject_hostile_input() {
        let a = vec![7u8; PAGE];
        let b = vec![9u8; PAGE];
        let frame = PageBatch::encode(
            42,
            &[(0x1000, Some(&a)), (0x2000, None), (0x5000, Some(&b))],
        );
        let (kind, len) =
            parse_header(frame[..HEADER].try_into().expect("5 bytes")).expect("header");
        assert_eq!(kind, Kind::Pages);
        let body = &frame[HEADER..];
        assert_eq!(len, body.len());
        let batch = PageBatch::decode(body).expect("decodes");
        assert_eq!(batch.owner, 42);
        assert_eq!(
            batch.pages,
            vec![(0x1000, Some(a.clone())), (0x2000, None), (0x5000, Some(b))]
        );
        // Truncated data, trailing bytes, unaligned and unordered addresses, bad flags, bad counts.
        assert!(PageBatch::decode(&body[..body.len() - 1]).is_err());
        let mut long = body.to_vec();
        long.push(0);
        assert!(PageBatch::decode(&long).is_err());
        let unaligned = PageBatch::encode(1, &[(0x1001, None)]);
        assert!(PageBatch::decode(&unaligned[HEADER..]).is_err());
        let unordered = PageBatch::encode(1, &[(0x2000, None), (0x1000, None)]);
        assert!(PageBatch::decode(&unordered[HEADER..]).is_err());
        let mut flags = PageBatch::encode(1, &[(0x1000, None)]);
        let last = flags.len() - 1;
        flags[last] = 0x80;
        assert!(PageBatch::decode(&flags[HEADER..]).is_err());
        let mut zero_count = PageBatch::encode(1, &[(0x1000, None)]);
        zero_count[HEADER + 8..HEADER + 12].copy_from_slice(&0u32.to_be_bytes());
        assert!(PageBatch::decode(&zero_count[HEADER..]).is_err());
        assert!(PageBatch::decode(&[0; 5]).is_err());
    }

    #[test]
    fn file_names_are_plain() {
        for ok in [
            "inventory.img",
            "pages-1.img",
            "tcp-stream-12ab.img",
            "stats-dump",
        ] {
            check_file_name(ok).expect(ok);
        }
        for bad in [
            "",
            "../etc/passwd",
            "a/b",
            ".hidden",
            "x\0y",
            &"a".repeat(200),
        ] {
            assert!(check_file_name(bad).is_err(), "{bad:?}");
        }
    }
}
