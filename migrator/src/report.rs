//! The machine-readable report of a migration (JSON).

use serde::{Deserialize, Serialize};

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The service runs on the destination; the source copy is gone.
    Committed,
    /// The migration failed and was undone; the service runs on the source.
    RolledBack,
    /// The migration failed before anything was changed; the service runs on the source.
    NotStarted,
}

/// Phase timings in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Connecting to the agent and agreeing on the migration.
    pub handshake_ms: f64,
    /// CRIU's freezing of the tree (its own statistic).
    pub freeze_ms: f64,
    /// From the dump request to complete images (includes the freeze).
    pub dump_ms: f64,
    /// Sending the images, until the agent has them all.
    pub transfer_ms: f64,
    /// On the destination: from all images received to a running service.
    pub restore_ms: f64,
    /// The service is stopped: from letting CRIU freeze the tree to running on the destination
    /// (as seen by the source, so it includes one network delay). An upper bound: the tree
    /// stops within CRIU's freezing time after the start.
    pub downtime_ms: f64,
    /// Committing (source kill, address removal) after the restore.
    pub commit_ms: f64,
    /// The whole command.
    pub total_ms: f64,
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

/// Sizes of what was sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageSizes {
    /// Image files.
    pub files: u32,
    /// All image bytes.
    pub total_bytes: u64,
    /// Memory page bytes (`pages-*.img`).
    pub pages_bytes: u64,
}

/// The report of one migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Identifier shared with the destination's logs.
    pub migration_id: String,
    /// The outcome.
    pub outcome: Outcome,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// The source pid of the service.
    pub source_pid: i32,
    /// The destination pid of the service, when committed.
    pub destination_pid: Option<i32>,
    /// The agent's address.
    pub destination: String,
    /// The service address.
    pub service_addr: String,
    /// Phase timings.
    pub timings: Timings,
    /// Image sizes.
    pub images: ImageSizes,
    /// CRIU's dump statistics.
    pub criu_dump: Option<CriuDumpStats>,
    /// CRIU's restore statistics.
    pub criu_restore: Option<CriuRestoreStats>,
    /// The CRIU binary used.
    pub criu: String,
    /// Pre-copy rounds and the final difference.
    pub precopy: PrecopySummary,
    /// The proxy's pause, if a proxy was used.
    pub proxy: Option<ProxyReport>,
}

/// What the proxy did during the migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// Time until every flow was quiet (no unacknowledged bytes toward the service), ms.
    pub quiesce_ms: f64,
    /// Time from the pause to the resume: the clients' stall, ms.
    pub held_ms: f64,
    /// From asking the proxy to pause to CRIU's first notification with the tree frozen: the
    /// part of the hold before the downtime starts (quiesce, redirect, the service draining
    /// its UDP queues, the freeze itself), ms.
    pub before_downtime_ms: f64,
    /// From the destination's restore report to the proxy's resume reply: the part of the hold
    /// after the downtime ends, ms.
    pub after_downtime_ms: f64,
    /// TCP connections held.
    pub tcp_flows: u64,
    /// UDP flows held.
    pub udp_flows: u64,
    /// Datagrams held and released on resume.
    pub released_datagrams: u64,
}

/// Memory transfer figures: pre-copy rounds (none for stop-and-copy) and the final difference.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrecopySummary {
    /// Per-round figures.
    pub rounds: Vec<crate::precopy::RoundReport>,
    /// Why pre-copy stopped.
    pub stop_reason: Option<String>,
    /// The highest auto-converge throttle applied, percent.
    pub max_throttle: Option<u8>,
    /// Time spent in pre-copy, ms.
    pub precopy_ms: f64,
    /// The frozen phase's fixed cost the policy assumed last (from the fastest scan), ms.
    pub frozen_cost_ms: Option<f64>,
    /// The final difference sent after the dump.
    pub final_difference: Option<crate::precopy::FinalReport>,
}
