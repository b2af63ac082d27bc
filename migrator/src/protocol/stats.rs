//! Figures a migration measures and both sides, the machines and the reports share.

use serde::{Deserialize, Serialize};

/// What the source's scan of one pre-copy round found and sent (the driver's measurement; the
/// source machine turns it into a [`RoundReport`] once the agent acknowledged the round).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundScan {
    /// Pages read from the tree.
    pub pages_scanned: u64,
    /// Pages whose content differed from the destination's copy, all sent.
    pub pages_sent: u64,
    /// Of those, all-zero pages (header only).
    pub pages_zero: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Time the scan took, ms.
    pub scan_ms: f64,
}

/// Figures of one pre-copy round.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number, from 0.
    pub round: u32,
    /// Pages read from the tree.
    pub pages_scanned: u64,
    /// Pages whose content differed from the destination's copy (the dirty pages).
    pub pages_dirty: u64,
    /// Pages sent (= dirty).
    pub pages_sent: u64,
    /// Of those, all-zero pages (header only).
    pub pages_zero: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Time to scan the tree.
    pub scan_ms: f64,
    /// Round duration until the destination acknowledged it.
    pub duration_ms: f64,
    /// Measured delivered bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Dirty pages per second since the previous round started.
    pub dirty_rate: f64,
    /// Downtime the policy predicted if the next step were the final one, ms.
    pub predicted_downtime_ms: Option<f64>,
    /// CPU throttle applied during the round, percent.
    pub throttle: Option<u8>,
    /// Pages the next round was predicted to send (the dirty rate over this round's duration).
    #[serde(default)]
    pub predicted_next_pages: Option<u64>,
    /// The next round's predicted duration, ms (the model's round time with this migration's
    /// scan throughput and bandwidth).
    #[serde(default)]
    pub predicted_next_ms: Option<f64>,
}

/// Figures of the final difference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct FinalReport {
    /// Pages in the dump.
    pub pages_dumped: u64,
    /// Pages sent (not already held by the destination with the same content).
    pub pages_sent: u64,
    /// Of those, all-zero pages.
    pub pages_zero: u64,
    /// Bytes of page batches.
    pub bytes: u64,
}

/// What the source sent while frozen: image files without page data, then the final
/// difference.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ImagesSent {
    /// Image files sent.
    pub files: u32,
    /// Their bytes.
    pub file_bytes: u64,
    /// The final difference.
    pub pages: FinalReport,
}

/// CRIU's own dump statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CriuDumpStats {
    /// Microseconds spent freezing.
    pub freezing_time_us: u32,
    /// Microseconds the tree was frozen during the dump.
    pub frozen_time_us: u32,
    /// Microseconds dumping memory.
    pub memdump_time_us: u32,
    /// Microseconds writing memory.
    pub memwrite_time_us: u32,
    /// Pages scanned.
    pub pages_scanned: u64,
    /// Pages written to the image.
    pub pages_written: u64,
}

/// CRIU's own restore statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CriuRestoreStats {
    /// Microseconds forking the tree.
    pub forking_time_us: u32,
    /// Microseconds restoring.
    pub restore_time_us: u32,
    /// Pages restored.
    pub pages_restored: u64,
    /// Whether anonymous memory was filled in after the restore (userfaultfd, `criu
    /// lazy-pages` on the destination) instead of during it.
    #[serde(default)]
    pub lazy: bool,
}
