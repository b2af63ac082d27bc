//! When to stop pre-copying: the convergence policy of iterative pre-copy.
//!
//! Pure and deterministic: the caller feeds it the figures of each finished round (durations
//! included, measured by the caller) and gets a [`Decision`] back. The rules, checked in this
//! order after every round:
//!
//! 1. **Downtime under the limit**: the predicted downtime (the pages still to send, times the
//!    page size, over the measured bandwidth, plus the fixed cost of dump and restore) is at most
//!    [`Config::downtime_limit`]: stop and copy now.
//! 2. **Nothing left**: no page changed during the round, yet the fixed cost alone exceeds the
//!    limit; more rounds cannot help: stop.
//! 3. **Round cap**: [`Config::max_rounds`] rounds are done: stop.
//! 4. **Auto-converge** ([`Config::auto_converge`]): when the dirty rate outruns the link (dirty
//!    bytes per second at least [`Config::throttle_trigger`] times the bandwidth) or the round
//!    did not shrink, ask for a CPU throttle, stepped up each time as QEMU's
//!    `cpu-throttle-initial`/`cpu-throttle-increment` do, up to [`ThrottleSteps::max`]. The
//!    throttle stays as set until the caller releases it after the final dump.
//! 5. **Not shrinking**: a round is shrinking when the pages it leaves dirty are fewer than
//!    [`Config::min_shrink`] times the pages it sent. After more than [`Config::shrink_patience`]
//!    consecutive rounds that do not shrink (counted afresh after every throttle step), stop.
//! 6. Otherwise continue.

use std::time::Duration;

use crate::model::HostCosts;
pub use crate::model::PAGE_SIZE;
use crate::profile::Profile;

/// Errors in a policy configuration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// A setting is out of its range.
    #[error("invalid pre-copy policy setting {setting}: {why}")]
    Invalid {
        /// The setting.
        setting: &'static str,
        /// What is wrong with it.
        why: String,
    },
}

/// CPU throttle steps for auto-converge, in percent of CPU time taken away from the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrottleSteps {
    /// The first throttle (QEMU's `cpu-throttle-initial`, default 20).
    pub initial: u8,
    /// Added at each further step (QEMU's `cpu-throttle-increment`, default 10).
    pub increment: u8,
    /// The highest throttle (QEMU's limit, 99).
    pub max: u8,
}

impl Default for ThrottleSteps {
    fn default() -> ThrottleSteps {
        ThrottleSteps {
            initial: 20,
            increment: 10,
            max: 99,
        }
    }
}

/// Policy settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Stop pre-copying once the predicted downtime is at most this.
    pub downtime_limit: Duration,
    /// Most pre-copy rounds (round 0, the full copy, included); at least 1.
    pub max_rounds: u32,
    /// A round shrinks when the pages it leaves dirty are fewer than `min_shrink` times the pages
    /// it sent; in (0, 1].
    pub min_shrink: f64,
    /// Consecutive rounds that fail to shrink which are tolerated; one more stops pre-copy.
    pub shrink_patience: u32,
    /// The host's terms of the migration model (from the calibration profile): the frozen
    /// phase's cost for the state size is predicted from them ([`Policy::observe_scan`]).
    pub costs: HostCosts,
    /// Page size, for converting pages and page rates to bytes.
    pub page_size: u64,
    /// Throttle the service instead of giving up when it dirties memory too fast.
    pub auto_converge: bool,
    /// Throttle steps for auto-converge.
    pub throttle: ThrottleSteps,
    /// The dirty rate outruns the link when dirty bytes per second reach this multiple of the
    /// bandwidth; > 0.
    pub throttle_trigger: f64,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            downtime_limit: Duration::from_millis(300),
            max_rounds: 10,
            min_shrink: 0.9,
            shrink_patience: 1,
            costs: Profile::default().costs(),
            page_size: PAGE_SIZE,
            auto_converge: false,
            throttle: ThrottleSteps::default(),
            throttle_trigger: 1.0,
        }
    }
}

impl Config {
    /// Checks every setting's range.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let invalid = |setting, why: &str| {
            Err(PolicyError::Invalid {
                setting,
                why: why.to_string(),
            })
        };
        if self.max_rounds == 0 {
            return invalid(
                "max_rounds",
                "must be at least 1 (round 0 is the full copy)",
            );
        }
        if !(self.min_shrink > 0.0 && self.min_shrink <= 1.0) {
            return invalid(
                "min_shrink",
                &format!("{} is not in (0, 1]", self.min_shrink),
            );
        }
        if self.page_size == 0 {
            return invalid("page_size", "must not be 0");
        }
        if !(self.throttle_trigger > 0.0 && self.throttle_trigger.is_finite()) {
            return invalid(
                "throttle_trigger",
                &format!("{} is not a positive number", self.throttle_trigger),
            );
        }
        if let Err(e) = self.costs.validate() {
            return invalid("costs", &e.to_string());
        }
        let t = self.throttle;
        if t.initial == 0 || t.increment == 0 || t.max > 99 || t.initial > t.max {
            return invalid(
                "throttle",
                &format!(
                    "need 1 <= initial ({}) <= max ({}) <= 99 and increment ({}) >= 1",
                    t.initial, t.max, t.increment
                ),
            );
        }
        Ok(())
    }
}

/// Figures of one finished pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundStats {
    /// Pages sent in the round.
    pub pages_sent: u64,
    /// Pages found changed at the end of the round: what the next round, or the final
    /// difference, would send.
    pub pages_dirty_next: u64,
    /// Bytes sent in the round.
    pub bytes: u64,
    /// Wall time of the round.
    pub duration: Duration,
    /// Measured bandwidth of the round's transfer, bytes/s (0 or not finite if unknown).
    pub bandwidth: f64,
    /// Measured dirty rate, pages/s.
    pub dirty_rate: f64,
}

/// Why pre-copy stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StopReason {
    /// The predicted downtime is within the limit.
    DowntimeUnderLimit,
    /// No page changed, but the fixed cost alone exceeds the limit: more rounds cannot help.
    NothingLeft,
    /// Rounds stopped shrinking (with auto-converge: also at the highest throttle).
    NotShrinking,
    /// The round cap was reached.
    MaxRounds,
}

/// Why a throttle is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThrottleCause {
    /// The dirty rate reached the link's rate.
    DirtyRateOutrunsLink,
    /// The round did not shrink.
    NotShrinking,
}

/// What to do after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Run another round; any throttle stays as it is.
    Continue,
    /// Run another round with the service's CPU cut by `percent` (a step up from before).
    Throttle {
        /// CPU time to take away, in percent (1..=99).
        percent: u8,
        /// Why.
        cause: ThrottleCause,
    },
    /// Stop pre-copying: freeze, dump and send the final difference.
    StopAndCopy {
        /// Why.
        reason: StopReason,
        /// The predicted downtime, if the bandwidth is known.
        predicted_downtime: Option<Duration>,
    },
}

/// The convergence policy of one migration.
#[derive(Debug, Clone)]
pub struct Policy {
    config: Config,
    rounds: u32,
    throttle: Option<u8>,
    bandwidth: Option<f64>,
    fixed_cost: Duration,
    not_shrinking: u32,
    /// Bytes per second of the fastest scan seen.
    scan_throughput: Option<f64>,
    /// The state size of the last scan.
    state_bytes: Option<u64>,
}

fn positive(x: f64) -> Option<f64> {
    (x > 0.0 && x.is_finite()).then_some(x)
}

impl Policy {
    /// A policy before round 0.
    pub fn new(config: Config) -> Result<Policy, PolicyError> {
        config.validate()?;
        Ok(Policy {
            fixed_cost: config.costs.frozen_fixed,
            config,
            rounds: 0,
            throttle: None,
            bandwidth: None,
            not_shrinking: 0,
            scan_throughput: None,
            state_bytes: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Rounds decided on so far.
    pub fn rounds(&self) -> u32 {
        self.rounds
    }

    /// The throttle asked for last, if any.
    pub fn throttle(&self) -> Option<u8> {
        self.throttle
    }

    /// The bandwidth predictions use: the last valid measurement.
    pub fn bandwidth(&self) -> Option<f64> {
        self.bandwidth
    }

    /// Replaces the fixed cost of dump and restore with a measured one.
    pub fn observe_fixed_cost(&mut self, cost: Duration) {
        self.fixed_cost = cost;
    }

    /// Predicts the frozen phase's cost for a state of `state_bytes` read and hashed in `scan`,
    /// with the model ([`HostCosts::frozen_cost`]): the profile's terms, with the scan
    /// throughput measured on this tree. The fastest scan so far counts: a round that sends
    /// much (round 0) is paced by the link, not by reading memory, and calibrating from it once
    /// predicted 15 s for a 256 MiB state whose frozen phase took 0.55 s. Returns the fixed cost
    /// now in use.
    pub fn observe_scan(&mut self, state_bytes: u64, scan: Duration) -> Duration {
        self.state_bytes = Some(state_bytes);
        if let Some(s) = crate::model::fit_scan_throughput(state_bytes, scan) {
            self.scan_throughput = Some(self.scan_throughput.map_or(s, |p| p.max(s)));
        }
        let costs = HostCosts {
            scan_throughput: self
                .scan_throughput
                .unwrap_or(self.config.costs.scan_throughput),
            ..self.config.costs.clone()
        };
        self.fixed_cost = costs.frozen_cost(state_bytes);
        self.fixed_cost
    }

    /// Whether the fixed cost alone exceeds the downtime limit: pre-copy then runs until rounds
    /// stop shrinking, and the limit will be missed.
    pub fn limit_below_fixed_cost(&self) -> bool {
        self.fixed_cost >= self.config.downtime_limit
    }

    /// The fixed cost in use (configured or measured).
    pub fn fixed_cost(&self) -> Duration {
        self.fixed_cost
    }

    /// Predicted downtime for a final difference of `pages` pages: their bytes over the
    /// bandwidth, plus the fixed cost. `None` if pages remain and no bandwidth is known.
    pub fn predicted_downtime(&self, pages: u64) -> Option<Duration> {
        if pages == 0 {
            return Some(self.fixed_cost);
        }
        let bw = self.bandwidth?;
        let bytes = pages as f64 * self.config.page_size as f64;
        let secs = bytes / bw + bytes / self.config.costs.frozen_transfer_throughput;
        let transfer = Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX);
        Some(transfer.saturating_add(self.fixed_cost))
    }

    /// Predicted duration of a round that sends `pages`: the model's round time (the slower of
    /// the scan of the state at the fastest throughput seen and the pages over the measured
    /// bandwidth, which already carries the processing factor, plus the profile's per-round
    /// overhead). `None` before a
    /// scan and a bandwidth are known.
    pub fn predicted_round(&self, pages: u64) -> Option<Duration> {
        let bw = self.bandwidth?;
        let m = self.state_bytes? as f64;
        let s = self.scan_throughput?;
        let secs = (m / s).max(pages as f64 * self.config.page_size as f64 / bw)
            + self.config.costs.round_overhead.as_secs_f64();
        Some(crate::model::secs(secs))
    }

    fn next_throttle(&self) -> Option<u8> {
        let t = self.config.throttle;
        match self.throttle {
            None => Some(t.initial),
            Some(cur) if cur < t.max => Some(cur.saturating_add(t.increment).min(t.max)),
            Some(_) => None,
        }
    }

    /// Decides what follows the round just finished.
    pub fn decide(&mut self, stats: &RoundStats) -> Decision {
        self.rounds = self.rounds.saturating_add(1);
        let measured = positive(stats.bandwidth).or_else(|| {
            positive(stats.bytes as f64 / stats.duration.as_secs_f64()).filter(|_| stats.bytes > 0)
        });
        if measured.is_some() {
            self.bandwidth = measured;
        }
        let predicted = self.predicted_downtime(stats.pages_dirty_next);
        let stop = |reason| Decision::StopAndCopy {
            reason,
            predicted_downtime: predicted,
        };
        if predicted.is_some_and(|p| p <= self.config.downtime_limit) {
            return stop(StopReason::DowntimeUnderLimit);
        }
        if stats.pages_dirty_next == 0 {
            return stop(StopReason::NothingLeft);
        }
        if self.rounds >= self.config.max_rounds {
            return stop(StopReason::MaxRounds);
        }
        let shrinking =
            (stats.pages_dirty_next as f64) < self.config.min_shrink * stats.pages_sent as f64;
        if shrinking {
            self.not_shrinking = 0;
        } else {
            self.not_shrinking += 1;
        }
        let outruns = self.bandwidth.is_some_and(|bw| {
            stats.dirty_rate.is_finite()
                && stats.dirty_rate * self.config.page_size as f64
                    >= self.config.throttle_trigger * bw
        });
        if self.config.auto_converge && (outruns || !shrinking) {
            if let Some(percent) = self.next_throttle() {
                self.throttle = Some(percent);
                self.not_shrinking = 0;
                let cause = if outruns {
                    ThrottleCause::DirtyRateOutrunsLink
                } else {
                    ThrottleCause::NotShrinking
                };
                return Decision::Throttle { percent, cause };
            }
        }
        if self.not_shrinking > self.config.shrink_patience {
            return stop(StopReason::NotShrinking);
        }
        Decision::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    /// 100 MB/s link, 100 ms fixed cost, 300 ms limit: 200 ms of transfer is 20 MB, 4882 pages.
    fn config() -> Config {
        Config {
            downtime_limit: MS(300),
            max_rounds: 5,
            min_shrink: 0.9,
            shrink_patience: 0,
            costs: fixed(MS(100)),
            page_size: PAGE_SIZE,
            auto_converge: false,
            throttle: ThrottleSteps::default(),
            throttle_trigger: 1.0,
        }
    }

    /// Host costs of a fixed frozen phase only.
    fn fixed(cost: Duration) -> HostCosts {
        HostCosts {
            frozen_fixed: cost,
            ..HostCosts::free()
        }
    }

    fn policy(c: Config) -> Policy {
        Policy::new(c).expect("valid config")
    }

    fn round(sent: u64, dirty_next: u64, dirty_rate: f64) -> RoundStats {
        RoundStats {
            pages_sent: sent,
            pages_dirty_next: dirty_next,
            bytes: sent * PAGE_SIZE,
            duration: MS(1000),
            bandwidth: 100.0 * MB,
            dirty_rate,
        }
    }

    fn stop(reason: StopReason) -> impl Fn(Decision) -> bool {
        move |d| matches!(d, Decision::StopAndCopy { reason: r, .. } if r == reason)
    }

    #[test]
    fn defaults_are_valid_and_bad_settings_are_refused() {
        assert!(Config::default().validate().is_ok());
        assert_eq!(ThrottleSteps::default().initial, 20);
        let bad = [
            Config {
                max_rounds: 0,
                ..config()
            },
            Config {
                min_shrink: 0.0,
                ..config()
            },
            Config {
                min_shrink: 1.5,
                ..config()
            },
            Config {
                min_shrink: f64::NAN,
                ..config()
            },
            Config {
                page_size: 0,
                ..config()
            },
            Config {
                throttle_trigger: 0.0,
                ..config()
            },
            Config {
                throttle_trigger: f64::INFINITY,
                ..config()
            },
            Config {
                throttle: ThrottleSteps {
                    initial: 0,
                    increment: 10,
                    max: 99,
                },
                ..config()
            },
            Config {
                throttle: ThrottleSteps {
                    initial: 20,
                    increment: 0,
                    max: 99,
                },
                ..config()
            },
            Config {
                throttle: ThrottleSteps {
                    initial: 20,
                    increment: 10,
                    max: 100,
                },
                ..config()
            },
            Config {
                throttle: ThrottleSteps {
                    initial: 50,
                    increment: 10,
                    max: 40,
                },
                ..config()
            },
        ];
        for c in bad {
            assert!(Policy::new(c.clone()).is_err(), "{c:?}");
        }
    }

    #[test]
    fn predicted_downtime_is_transfer_plus_fixed_cost() {
        let mut p = policy(config());
        assert_eq!(p.predicted_downtime(0), Some(MS(100)));
        assert_eq!(p.predicted_downtime(1), None, "no bandwidth known yet");
        p.decide(&round(100_000, 50_000, 0.0));
        assert_eq!(p.bandwidth(), Some(100.0 * MB));
        // 25_000 pages = 102.4 MB: 1.024 s + 0.1 s.
        assert_eq!(p.predicted_downtime(25_000), Some(MS(1124)));
        p.observe_fixed_cost(MS(40));
        assert_eq!(p.fixed_cost(), MS(40));
        assert_eq!(p.predicted_downtime(25_000), Some(MS(1064)));
        assert_eq!(
            p.predicted_downtime(u64::MAX).map(|d| d > MS(1000)),
            Some(true)
        );
    }

    #[test]
    fn stops_when_the_downtime_is_under_the_limit_even_after_round_zero() {
        let mut p = policy(config());
        let d = p.decide(&round(10_000, 4_000, 100.0));
        assert_eq!(
            d,
            Decision::StopAndCopy {
                reason: StopReason::DowntimeUnderLimit,
                // 4000 pages = 16.384 MB: 163.84 ms + 100 ms.
                predicted_downtime: Some(Duration::from_nanos(263_840_000)),
            }
        );
        assert_eq!(p.rounds(), 1);
    }

    #[test]
    fn continues_while_shrinking_then_stops_under_the_limit() {
        let mut p = policy(config());
        assert_eq!(p.decide(&round(100_000, 40_000, 100.0)), Decision::Continue);
        assert_eq!(p.decide(&round(40_000, 10_000, 100.0)), Decision::Continue);
        assert!(stop(StopReason::DowntimeUnderLimit)(
            p.decide(&round(10_000, 3_000, 100.0))
        ));
        assert_eq!(p.rounds(), 3);
    }

    #[test]
    fn the_limit_is_inclusive() {
        // 200 ms of transfer at 100 MB/s is 20 MB: 20e6 / 4096 pages is not whole, so use a
        // bandwidth that makes it whole: 4096 pages/s.
        let mut p = policy(config());
        let mut r = round(100_000, 819, 0.0);
        r.bandwidth = 4096.0 * 4096.0;
        // 819 pages at 4096 pages/s = 199.951 ms + 100 ms < 300 ms.
        assert!(stop(StopReason::DowntimeUnderLimit)(p.decide(&r)));
        let mut p = policy(Config {
            downtime_limit: MS(1100),
            ..config()
        });
        r.pages_dirty_next = 4096;
        // Exactly 1 s + 100 ms.
        assert!(stop(StopReason::DowntimeUnderLimit)(p.decide(&r)));
    }

    #[test]
    fn the_frozen_cost_comes_from_the_model_with_the_fastest_scan() {
        let costs = HostCosts {
            frozen_fixed: MS(100),
            frozen_throughput: 1e9,
            scan_throughput: 5e8,
            round_overhead: MS(10),
            ..HostCosts::free()
        };
        let mut p = policy(Config {
            costs: costs.clone(),
            ..config()
        });
        assert_eq!(p.fixed_cost(), MS(100));
        assert_eq!(p.predicted_round(10), None);
        // 1 GB read in 0.5 s: 2 GB/s, faster than the profile's 0.5 GB/s.
        let c = p.observe_scan(1_000_000_000, MS(500));
        assert_eq!(c, MS(100) + MS(1000) + MS(500));
        // A slower scan (paced by the link) does not count.
        assert_eq!(p.observe_scan(1_000_000_000, MS(4000)), c);
        assert_eq!(c, costs.frozen_cost(1_000_000_000) - MS(2000) + MS(500));
        p.decide(&round(1000, 100, 10.0));
        // The slower of the scan (0.5 s) and 100 pages over 100 MB/s, plus the overhead.
        let r = p.predicted_round(100).expect("known");
        assert!(r.abs_diff(MS(510)) < MS(1), "{r:?}");
        // 20,000 pages take 0.82 s to send: the link is the slower.
        let r = p.predicted_round(20_000).expect("known");
        assert!(
            r.abs_diff(MS(10) + Duration::from_secs_f64(0.8192)) < MS(1),
            "{r:?}"
        );
    }

    #[test]
    fn nothing_left_when_the_fixed_cost_alone_exceeds_the_limit() {
        let mut p = policy(Config {
            costs: fixed(MS(500)),
            ..config()
        });
        assert_eq!(
            p.decide(&round(100_000, 0, 0.0)),
            Decision::StopAndCopy {
                reason: StopReason::NothingLeft,
                predicted_downtime: Some(MS(500)),
            }
        );
    }

    #[test]
    fn stops_at_the_round_cap() {
        let mut p = policy(Config {
            max_rounds: 3,
            ..config()
        });
        assert_eq!(p.decide(&round(100_000, 80_000, 10.0)), Decision::Continue);
        assert_eq!(p.decide(&round(80_000, 60_000, 10.0)), Decision::Continue);
        assert!(stop(StopReason::MaxRounds)(
            p.decide(&round(60_000, 40_000, 10.0))
        ));
        // One round allowed: stop right after the full copy.
        let mut p = policy(Config {
            max_rounds: 1,
            ..config()
        });
        assert!(stop(StopReason::MaxRounds)(
            p.decide(&round(100_000, 80_000, 10.0))
        ));
    }

    #[test]
    fn the_limit_wins_over_the_cap_and_the_cap_over_throttling() {
        let mut p = policy(Config {
            max_rounds: 1,
            auto_converge: true,
            ..config()
        });
        assert!(stop(StopReason::DowntimeUnderLimit)(
            p.decide(&round(100_000, 10, 1e9))
        ));
        let mut p = policy(Config {
            max_rounds: 1,
            auto_converge: true,
            ..config()
        });
        assert!(stop(StopReason::MaxRounds)(
            p.decide(&round(100_000, 100_000, 1e9))
        ));
        assert_eq!(p.throttle(), None);
    }

    #[test]
    fn stops_when_not_shrinking_without_auto_converge() {
        let mut p = policy(config());
        // 0.9 * 50_000 = 45_000: exactly that is not shrinking.
        assert_eq!(p.decide(&round(100_000, 50_000, 10.0)), Decision::Continue);
        assert!(stop(StopReason::NotShrinking)(
            p.decide(&round(50_000, 45_000, 10.0))
        ));
        // Growing rounds too.
        let mut p = policy(config());
        assert!(stop(StopReason::NotShrinking)(
            p.decide(&round(10_000, 20_000, 10.0))
        ));
        // A round that sent nothing but left pages dirty does not shrink.
        let mut p = policy(config());
        let mut r = round(0, 20_000, 10.0);
        r.bandwidth = 100.0 * MB;
        assert!(stop(StopReason::NotShrinking)(p.decide(&r)));
    }

    #[test]
    fn patience_tolerates_non_shrinking_rounds_and_resets_on_shrinking() {
        let mut p = policy(Config {
            shrink_patience: 1,
            max_rounds: 10,
            ..config()
        });
        assert_eq!(p.decide(&round(100_000, 95_000, 10.0)), Decision::Continue);
        assert_eq!(p.decide(&round(95_000, 50_000, 10.0)), Decision::Continue);
        assert_eq!(p.decide(&round(50_000, 49_000, 10.0)), Decision::Continue);
        assert!(stop(StopReason::NotShrinking)(
            p.decide(&round(49_000, 48_000, 10.0))
        ));
    }

    #[test]
    fn outrunning_the_link_alone_does_not_stop_without_auto_converge() {
        let mut p = policy(config());
        // 100_000 pages/s = 409.6 MB/s > 100 MB/s, but the round still shrank.
        assert_eq!(
            p.decide(&round(100_000, 50_000, 100_000.0)),
            Decision::Continue
        );
        assert_eq!(p.throttle(), None);
    }

    #[test]
    fn auto_converge_steps_the_throttle_up_to_its_cap_then_stops() {
        let mut p = policy(Config {
            auto_converge: true,
            max_rounds: 100,
            ..config()
        });
        let fast = 100_000.0; // 409.6 MB/s against a 100 MB/s link
        let mut seen = Vec::new();
        for _ in 0..9 {
            match p.decide(&round(100_000, 100_000, fast)) {
                Decision::Throttle { percent, cause } => {
                    assert_eq!(cause, ThrottleCause::DirtyRateOutrunsLink);
                    seen.push(percent);
                }
                d => panic!("expected a throttle, got {d:?}"),
            }
        }
        assert_eq!(seen, vec![20, 30, 40, 50, 60, 70, 80, 90, 99]);
        assert_eq!(p.throttle(), Some(99));
        // At the cap a non-shrinking round stops.
        assert!(stop(StopReason::NotShrinking)(
            p.decide(&round(100_000, 100_000, fast))
        ));
    }

    #[test]
    fn auto_converge_at_the_cap_continues_while_shrinking_and_honours_patience() {
        let mut p = policy(Config {
            auto_converge: true,
            max_rounds: 100,
            shrink_patience: 1,
            throttle: ThrottleSteps {
                initial: 50,
                increment: 60,
                max: 99,
            },
            ..config()
        });
        let fast = 100_000.0;
        assert!(matches!(
            p.decide(&round(100_000, 100_000, fast)),
            Decision::Throttle { percent: 50, .. }
        ));
        assert!(matches!(
            p.decide(&round(100_000, 100_000, fast)),
            Decision::Throttle { percent: 99, .. }
        ));
        // Outrunning but shrinking at the cap: continue.
        assert_eq!(p.decide(&round(100_000, 80_000, fast)), Decision::Continue);
        // One non-shrinking round tolerated, the second stops.
        assert_eq!(p.decide(&round(80_000, 80_000, fast)), Decision::Continue);
        assert!(stop(StopReason::NotShrinking)(
            p.decide(&round(80_000, 80_000, fast))
        ));
    }

    #[test]
    fn auto_converge_throttles_rounds_that_do_not_shrink_at_a_slow_dirty_rate() {
        let mut p = policy(Config {
            auto_converge: true,
            ..config()
        });
        assert_eq!(
            p.decide(&round(100_000, 95_000, 10.0)),
            Decision::Throttle {
                percent: 20,
                cause: ThrottleCause::NotShrinking
            }
        );
        // A shrinking round with a slow dirty rate keeps the throttle as it is.
        assert_eq!(p.decide(&round(95_000, 50_000, 10.0)), Decision::Continue);
        assert_eq!(p.throttle(), Some(20));
    }

    #[test]
    fn the_trigger_ratio_sets_when_the_dirty_rate_outruns_the_link() {
        let rate = 50.0 * MB / PAGE_SIZE as f64; // 50 MB/s on a 100 MB/s link
        let mut p = policy(Config {
            auto_converge: true,
            throttle_trigger: 0.5,
            ..config()
        });
        assert!(matches!(
            p.decide(&round(100_000, 50_000, rate)),
            Decision::Throttle {
                cause: ThrottleCause::DirtyRateOutrunsLink,
                ..
            }
        ));
        let mut p = policy(Config {
            auto_converge: true,
            ..config()
        });
        assert_eq!(p.decide(&round(100_000, 50_000, rate)), Decision::Continue);
    }

    #[test]
    fn unknown_bandwidth_falls_back_to_bytes_over_duration_then_to_the_last_one() {
        let mut p = policy(config());
        let mut r = round(100_000, 50_000, 10.0);
        r.bandwidth = 0.0;
        r.bytes = 200_000_000;
        r.duration = MS(1000);
        assert_eq!(p.decide(&r), Decision::Continue);
        assert_eq!(p.bandwidth(), Some(200.0 * MB));
        r.bandwidth = f64::NAN;
        r.bytes = 0;
        r.pages_sent = 50_000;
        r.pages_dirty_next = 20_000;
        assert_eq!(p.decide(&r), Decision::Continue);
        assert_eq!(p.bandwidth(), Some(200.0 * MB), "kept");

        // Never known: no prediction, so never under the limit; the other rules still apply.
        let mut p = policy(config());
        let mut r = round(100_000, 10, 10.0);
        r.bandwidth = -1.0;
        r.bytes = 0;
        assert_eq!(p.decide(&r), Decision::Continue);
        r.pages_sent = 10;
        assert_eq!(
            p.decide(&r),
            Decision::StopAndCopy {
                reason: StopReason::NotShrinking,
                predicted_downtime: None
            }
        );
        // A zero duration does not divide by zero.
        let mut p = policy(config());
        let mut r = round(100_000, 10, 10.0);
        r.bandwidth = 0.0;
        r.duration = Duration::ZERO;
        assert_eq!(p.decide(&r), Decision::Continue);
        assert_eq!(p.bandwidth(), None);
    }

    #[test]
    fn deterministic() {
        let run = || {
            let mut p = policy(Config {
                auto_converge: true,
                max_rounds: 20,
                ..config()
            });
            (0..20u64)
                .map(|i| p.decide(&round(100_000 - i, 99_000 - i, 30_000.0)))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }
}
