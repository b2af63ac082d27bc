//! The machine-readable report of a migration (JSON), written by the source for every migration,
//! successful or not, and by `tether migrate --recover` for a migration it resolved.

use serde::{Deserialize, Serialize};

use crate::plan::{MethodPlan, Plan};
use crate::protocol::stats::{CriuDumpStats, CriuRestoreStats, FinalReport, RoundReport};
use crate::protocol::{ErrorCode, Phase, Side};

/// How a migration ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Outcome {
    /// The service runs on the destination; the source copy is gone.
    Committed,
    /// The migration failed and was undone; the service runs on the source (thawed, never
    /// killed: its clients continue).
    RolledBack,
    /// The migration failed before anything was changed; the service runs on the source.
    NotStarted,
    /// The source's copy was ended at the commit, but the destination failed to run its copy;
    /// the service was restored on the source from the source's image set.
    RestoredOnSource,
    /// The source's copy was ended at the commit and the destination could not be reached to
    /// learn whether its copy runs. The image set and the journal are kept; `tether migrate
    /// --recover` resolves it once the agent is reachable.
    InDoubt,
    /// No copy of the service runs. The image set is kept (see the error); only a second fault
    /// leads here.
    Failed,
}

impl Outcome {
    /// Whether the service runs somewhere at the end of the migration.
    pub fn service_runs(self) -> bool {
        matches!(
            self,
            Outcome::Committed
                | Outcome::RolledBack
                | Outcome::NotStarted
                | Outcome::RestoredOnSource
        )
    }
}

/// Why a migration did not commit: which side failed, in which phase, and what kind of
/// failure.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportError {
    /// Where it failed.
    pub side: Side,
    /// In which phase.
    pub phase: Phase,
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened, in words.
    pub message: String,
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
    /// Sending the images while frozen, until the agent reported the restore, less the
    /// restore.
    pub transfer_ms: f64,
    /// On the destination: from all images received to the restored (stopped) tree.
    pub restore_ms: f64,
    /// From the restore report to the agent's confirmation that the service runs there: the
    /// commit answer to CRIU, the `Commit` round trip, the destination lifting its block and
    /// resuming the tree.
    pub commit_ms: f64,
    /// Of which: from the restore report to `Commit` leaving (journal, CRIU's answer).
    #[serde(default)]
    pub commit_sent_ms: f64,
    /// Of which: the destination's time from `Commit` to the running, reachable service.
    #[serde(default)]
    pub go_live_ms: f64,
    /// The service is stopped: from letting CRIU freeze the tree to the confirmation that it
    /// runs on the destination (as seen by the source, so it includes one network delay). An
    /// upper bound: the tree stops within CRIU's freezing time after the start.
    pub downtime_ms: f64,
    /// From the confirmation to the proxy's resume reply: the part of the clients' stall after
    /// the downtime (0 without a proxy).
    pub resume_ms: f64,
    /// The downtime as the clients see it: from letting CRIU freeze the tree to the service's
    /// first answer through the proxy after the resume (`downtime_ms + resume_ms +` the
    /// earliest of the proxy's `first_*_answer_ms`). A lazily restored service still faulting
    /// its memory in, or an interpreted one, answers some milliseconds after CRIU returns.
    /// `None` without a proxy, or when no client spoke within the proxy's wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answered_ms: Option<f64>,
    /// The whole command.
    pub total_ms: f64,
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
    pub error: Option<ReportError>,
    /// What went wrong without changing the outcome (a proxy that resumed by itself, an
    /// address that could not be removed, ...).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// Whether this report comes from resolving a migration an earlier `tether migrate` left
    /// unfinished (`--recover`).
    #[serde(default)]
    pub recovered: bool,
    /// The source pid of the service.
    pub source_pid: i32,
    /// The sockets of the service's tree when the migration started (the model's `n`, whose
    /// cost `K n` the frozen phase pays).
    #[serde(default)]
    pub sockets: u64,
    /// The destination pid of the service, when committed.
    pub destination_pid: Option<i32>,
    /// The Podman container moved (its name), if the migration moved one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
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
    /// The most memory the migration used beyond the service's own, per host.
    #[serde(default)]
    pub memory: MemoryPeaks,
    /// The model's prediction made before the migration started (state size and dirty rate
    /// measured live, the calibration profile's host terms), if one was made.
    #[serde(default)]
    pub prediction: Option<Plan>,
    /// How far the prediction was off, once the migration committed.
    #[serde(default)]
    pub prediction_error: Option<PredictionError>,
}

/// Relative errors of a prediction, `(predicted - measured) / measured`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PredictionError {
    /// Of the downtime.
    pub downtime: Option<f64>,
    /// Of the migration time.
    pub total: Option<f64>,
    /// Of the number of pre-copy rounds (predicted minus measured, absolute).
    pub rounds: Option<i64>,
}

impl Report {
    /// The prediction of the method that ran: pre-copy when there were rounds, else
    /// stop-and-copy.
    pub fn predicted_method(&self) -> Option<&MethodPlan> {
        let plan = self.prediction.as_ref()?;
        Some(if self.precopy.rounds.is_empty() {
            &plan.stop_and_copy
        } else {
            &plan.pre_copy
        })
    }
}

/// `(predicted - measured) / measured`; `None` when nothing was measured.
pub fn relative_error(predicted: f64, measured: f64) -> Option<f64> {
    (measured > 0.0 && predicted.is_finite()).then(|| (predicted - measured) / measured)
}

impl Report {
    /// Fills in [`Report::prediction_error`] from the prediction and the measured timings of a
    /// committed migration (the method predicted is the one that ran: pre-copy when there were
    /// rounds).
    pub fn score_prediction(&mut self) {
        if self.outcome != Outcome::Committed {
            return;
        }
        let Some(method) = self.predicted_method() else {
            return;
        };
        let error = PredictionError {
            downtime: relative_error(method.downtime_ms, self.timings.downtime_ms),
            total: relative_error(method.total_ms, self.timings.total_ms),
            rounds: (!self.precopy.rounds.is_empty())
                .then(|| i64::from(method.rounds) - self.precopy.rounds.len() as i64),
        };
        self.prediction_error = Some(error);
    }
}

impl Report {
    /// An empty report of migration `id` of the service at `source_pid`.
    pub fn new(id: &str, source_pid: i32, destination: String, service_addr: String) -> Report {
        Report {
            migration_id: id.to_string(),
            outcome: Outcome::NotStarted,
            error: None,
            warnings: Vec::new(),
            recovered: false,
            source_pid,
            sockets: 0,
            destination_pid: None,
            container: None,
            destination,
            service_addr,
            timings: Timings::default(),
            images: ImageSizes::default(),
            criu_dump: None,
            criu_restore: None,
            criu: String::new(),
            precopy: PrecopySummary::default(),
            proxy: None,
            memory: MemoryPeaks::default(),
            prediction: None,
            prediction_error: None,
        }
    }
}

/// What the proxy did during the migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// Time until every flow was quiet (no unacknowledged bytes toward the service), ms.
    pub quiesce_ms: f64,
    /// Time from the pause to the resume: the clients' stall, ms.
    pub held_ms: f64,
    /// From asking the proxy to pause to letting CRIU freeze the tree: the part of the hold
    /// before the downtime starts (quiesce, the service draining its UDP queues), ms.
    pub before_downtime_ms: f64,
    /// From the agent's confirmation that the service runs to the proxy's resume reply: the
    /// part of the hold after the downtime ends, ms.
    pub after_downtime_ms: f64,
    /// TCP connections held.
    pub tcp_flows: u64,
    /// UDP flows held.
    pub udp_flows: u64,
    /// Datagrams held and released on resume.
    pub released_datagrams: u64,
    /// The hold the proxy still allowed when the pause was confirmed, ms: the frozen phase's
    /// deadline is kept below it.
    #[serde(default)]
    pub hold_left_ms: u64,
    /// From the resume to the service's first byte toward a TCP client, seen by the proxy, ms
    /// (`None`: no TCP client, or none answered within the proxy's wait).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_tcp_answer_ms: Option<f64>,
    /// From the resume to the service's first datagram toward a UDP client, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_udp_answer_ms: Option<f64>,
}

/// The most memory a migration used beyond the service's own, per host. The target is at most
/// one extra copy of the state per host at any moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryPeaks {
    /// Source: CRIU's local dump on tmpfs (image files and every dumped page), bytes.
    pub source_dump_bytes: u64,
    /// Source: the peak resident memory of `tether migrate` itself, bytes.
    pub source_tether_rss_bytes: u64,
    /// Source: the peak resident memory of its largest child process (CRIU's worker), bytes.
    pub source_criu_rss_bytes: u64,
    /// Destination: the most memory the migration held there before the restore (page store,
    /// image files, rebuilt pages files), bytes; `None` from an agent that does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_held_bytes: Option<u64>,
}

/// Memory transfer figures: pre-copy rounds (none for stop-and-copy) and the final difference.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PrecopySummary {
    /// Per-round figures.
    pub rounds: Vec<RoundReport>,
    /// Why pre-copy stopped.
    pub stop_reason: Option<String>,
    /// The highest auto-converge throttle applied, percent.
    pub max_throttle: Option<u8>,
    /// Time spent in pre-copy, ms.
    pub precopy_ms: f64,
    /// The frozen phase's fixed cost the policy assumed last (from the fastest scan), ms.
    pub frozen_cost_ms: Option<f64>,
    /// The final difference sent after the dump.
    pub final_difference: Option<FinalReport>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Params;
    use crate::plan::Plan;
    use crate::policy::Config;

    #[test]
    fn relative_errors() {
        assert_eq!(relative_error(110.0, 100.0), Some(0.1));
        assert_eq!(relative_error(90.0, 100.0), Some(-0.1));
        assert_eq!(relative_error(1.0, 0.0), None);
    }

    #[test]
    fn a_committed_migration_scores_the_method_that_ran() {
        let params = Params::new(64 << 20, 1000.0, 125e6);
        let plan = Plan::new(&params, &Config::default(), false, "test").expect("plan");
        let mut r = Report::new("m", 1, "dst".into(), "10.0.0.1/24".into());
        r.prediction = Some(plan.clone());
        // Not committed: nothing to score.
        r.score_prediction();
        assert_eq!(r.prediction_error, None);
        r.outcome = Outcome::Committed;
        r.timings.downtime_ms = plan.stop_and_copy.downtime_ms / 2.0;
        r.timings.total_ms = plan.stop_and_copy.total_ms * 2.0;
        r.score_prediction();
        let e = r.prediction_error.expect("scored");
        // No rounds ran: stop-and-copy is the method scored.
        assert!((e.downtime.expect("downtime") - 1.0).abs() < 1e-9);
        assert!((e.total.expect("total") + 0.5).abs() < 1e-9);
        assert_eq!(e.rounds, None);
        // With rounds, pre-copy is.
        r.precopy.rounds = vec![RoundReport::default(); 3];
        r.timings.downtime_ms = plan.pre_copy.downtime_ms;
        r.score_prediction();
        let e = r.prediction_error.expect("scored");
        assert!(e.downtime.expect("downtime").abs() < 1e-9);
        assert_eq!(e.rounds, Some(i64::from(plan.pre_copy.rounds) - 3));
        // Nothing measured: no error rather than a division by zero.
        r.timings.downtime_ms = 0.0;
        r.score_prediction();
        assert_eq!(r.prediction_error.expect("scored").downtime, None);
    }
}
