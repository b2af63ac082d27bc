//! Reading the few CRIU image files tether needs to look into: the inventory and the stats files
//! (CRIU's own timings).
//!
//! Image layout (CRIU `criu/image.c`): an optional common or service magic, the image's own magic,
//! then entries of `u32 length | protobuf message`, all in the host's byte order.

use std::path::Path;

use prost::Message;

use super::rpc::{InventoryEntry, StatsEntry};

const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
const IMG_SERVICE_MAGIC: u32 = 0x5510_5940;
/// CRIU's magic of `inventory.img`.
pub const INVENTORY_MAGIC: u32 = 0x5831_3116;
/// CRIU's magic of the stats images.
pub const STATS_MAGIC: u32 = 0x5709_3306;
/// No image entry tether reads comes close to this; a larger length means a corrupt file.
const MAX_ENTRY: usize = 1 << 20;

/// Errors reading a CRIU image file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The file could not be read.
    #[error("cannot read CRIU image {path}: {source}")]
    Io {
        /// The image file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not the image it should be, or is truncated.
    #[error("CRIU image {path} is malformed: {what}")]
    Malformed {
        /// The image file.
        path: String,
        /// What is wrong with it.
        what: String,
    },
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_ne_bytes(bytes))
}

/// Returns the first protobuf entry of an image whose own magic is `magic`.
pub fn first_entry<M: Message + Default>(buf: &[u8], magic: u32) -> Result<M, String> {
    let mut at = 0;
    let mut m = read_u32(buf, at).ok_or("shorter than its magic")?;
    at += 4;
    if m == IMG_COMMON_MAGIC || m == IMG_SERVICE_MAGIC {
        m = read_u32(buf, at).ok_or("shorter than its magic")?;
        at += 4;
    }
    if m != magic {
        return Err(format!("magic {m:#x}, expected {magic:#x}"));
    }
    let len = read_u32(buf, at).ok_or("no entry")? as usize;
    at += 4;
    if len > MAX_ENTRY {
        return Err(format!("entry of {len} bytes"));
    }
    let body = buf.get(at..at + len).ok_or("truncated entry")?;
    M::decode(body).map_err(|e| format!("bad entry: {e}"))
}

fn read_entry<M: Message + Default>(path: &Path, magic: u32) -> Result<M, ImageError> {
    let buf = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.display().to_string(),
        source,
    })?;
    first_entry(&buf, magic).map_err(|what| ImageError::Malformed {
        path: path.display().to_string(),
        what,
    })
}

/// The inventory of a dump (`inventory.img`).
pub fn inventory(dir: &Path) -> Result<InventoryEntry, ImageError> {
    read_entry(&dir.join("inventory.img"), INVENTORY_MAGIC)
}

/// CRIU's statistics file (`stats-dump` or `stats-restore`), if present.
pub fn stats(path: &Path) -> Result<Option<StatsEntry>, ImageError> {
    if !path.exists() {
        return Ok(None);
    }
    read_entry(path, STATS_MAGIC).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::criu::rpc::DumpStatsEntry;

    fn image(magics: &[u32], msg: &impl Message) -> Vec<u8> {
        let mut v = Vec::new();
        for m in magics {
            v.extend_from_slice(&m.to_ne_bytes());
        }
        let body = msg.encode_to_vec();
        v.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        v.extend_from_slice(&body);
        v
    }

    #[test]
    fn reads_inventory_without_common_magic() {
        let inv = InventoryEntry {
            img_version: 2,
            network_lock_method: Some(2),
            dump_criu_run_id: Some("abc123".into()),
        };
        let buf = image(&[INVENTORY_MAGIC], &inv);
        let got: InventoryEntry = first_entry(&buf, INVENTORY_MAGIC).expect("parses");
        assert_eq!(got, inv);
    }

    #[test]
    fn reads_stats_with_service_magic() {
        let st = StatsEntry {
            dump: Some(DumpStatsEntry {
                freezing_time: 10,
                frozen_time: 20,
                memdump_time: 3,
                memwrite_time: 4,
                pages_scanned: 5,
                pages_skipped_parent: 0,
                pages_written: 5,
                pages_lazy: 0,
            }),
            restore: None,
        };
        let buf = image(&[IMG_SERVICE_MAGIC, STATS_MAGIC], &st);
        let got: StatsEntry = first_entry(&buf, STATS_MAGIC).expect("parses");
        assert_eq!(got, st);
    }

    #[test]
    fn rejects_wrong_magic_truncation_and_huge_lengths() {
        let inv = InventoryEntry {
            img_version: 2,
            network_lock_method: None,
            dump_criu_run_id: None,
        };
        let buf = image(&[STATS_MAGIC], &inv);
        assert!(first_entry::<InventoryEntry>(&buf, INVENTORY_MAGIC).is_err());
        let buf = image(&[INVENTORY_MAGIC], &inv);
        assert!(first_entry::<InventoryEntry>(&buf[..buf.len() - 1], INVENTORY_MAGIC).is_err());
        let mut huge = INVENTORY_MAGIC.to_ne_bytes().to_vec();
        huge.extend_from_slice(&u32::MAX.to_ne_bytes());
        assert!(first_entry::<InventoryEntry>(&huge, INVENTORY_MAGIC).is_err());
        assert!(first_entry::<InventoryEntry>(&[1, 2], INVENTORY_MAGIC).is_err());
    }
}
