//! Predicting a migration: the model's rounds, decided by the real pre-copy policy (pure).
//!
//! [`predict`] runs the [`crate::model`] round by round and asks the same [`Policy`] a real
//! migration asks after each round, so a prediction stops where a migration with the same
//! settings would; [`stop_and_copy`] is the one-shot alternative. [`Plan`] puts both side by
//! side, with whether the downtime limit holds and the throttle auto-converge would need: what
//! `tether plan` prints and what every migration report carries as its prediction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::{secs, ModelError, Params};
use crate::policy::{self, Decision, Policy, RoundStats, StopReason};

/// Errors in a prediction's inputs.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// A model parameter is out of range.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The policy settings are invalid.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
}

/// One predicted pre-copy round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundPrediction {
    /// Pages sent (`N_i`; all the state's pages in round 0).
    pub pages: u64,
    /// Bytes sent (`V_i`).
    pub bytes: u64,
    /// Duration (`T_i`).
    pub duration: Duration,
    /// Dirty rate during the round, pages/s (after the throttle).
    pub dirty_rate: f64,
    /// Throttle in force during the round, percent.
    pub throttle: Option<u8>,
    /// Pages dirtied during the round (what the next round or the final difference sends).
    pub pages_dirty_next: u64,
}

/// A predicted migration.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    /// Pre-copy rounds (none for stop-and-copy).
    pub rounds: Vec<RoundPrediction>,
    /// Why pre-copy stopped (`None` for stop-and-copy).
    pub stop: Option<StopReason>,
    /// Bytes sent while the service is frozen.
    pub final_bytes: u64,
    /// Of the downtime, the time sending `final_bytes`.
    pub downtime_transfer: Duration,
    /// Downtime (`T_down`).
    pub downtime: Duration,
    /// Total migration time (`T_mig`).
    pub total: Duration,
    /// All bytes sent, rounds and final.
    pub bytes_sent: u64,
}

impl Prediction {
    /// The highest throttle of any round.
    pub fn max_throttle(&self) -> Option<u8> {
        self.rounds.iter().filter_map(|r| r.throttle).max()
    }
}

/// Most rounds a prediction simulates, whatever the policy's cap.
pub const MAX_SIMULATED_ROUNDS: u32 = 10_000;

/// Predicts a pre-copy migration with the given policy settings (their page size is replaced by
/// the model's). As in a real migration, round 0 never ends pre-copy when more rounds are
/// allowed (the dirty rate is not known before a second scan), and the frozen phase's cost the
/// policy weighs is the model's [`Params::stop_cost`].
pub fn predict(params: &Params, config: &policy::Config) -> Result<Prediction, PlanError> {
    params.validate()?;
    let mut policy = Policy::new(policy::Config {
        page_size: params.page_size,
        costs: params.costs.clone(),
        ..config.clone()
    })?;
    policy.observe_fixed_cost(params.stop_cost());
    let sigma = params.page_size;
    let mut rounds = Vec::new();
    let mut pages = params.state_pages();
    let mut throttle: Option<u8> = None;
    let mut total = params.costs.setup;
    let mut bytes_sent = 0u64;
    let (stop, final_pages) = loop {
        let bytes = pages.saturating_mul(sigma);
        let t = params.round_secs(bytes as f64);
        let rate = params.dirty_rate * (1.0 - f64::from(throttle.unwrap_or(0)) / 100.0);
        let dirty_next = params.dirtied(rate, t);
        let duration = secs(t);
        total = total.saturating_add(duration);
        bytes_sent = bytes_sent.saturating_add(bytes);
        rounds.push(RoundPrediction {
            pages,
            bytes,
            duration,
            dirty_rate: rate,
            throttle,
            pages_dirty_next: dirty_next,
        });
        // After round 0 a real migration knows no dirty rate yet (one scan): the policy sees
        // none, which also leaves its count of rounds that did not shrink alone, and round 0
        // never ends pre-copy while more rounds are allowed.
        let blind = rounds.len() == 1 && config.max_rounds > 1;
        let decision = policy.decide(&RoundStats {
            pages_sent: pages,
            pages_dirty_next: if blind { 0 } else { dirty_next },
            bytes,
            duration,
            bandwidth: params.bandwidth / params.costs.processing_factor,
            dirty_rate: if blind { 0.0 } else { rate },
        });
        let decision = if blind { Decision::Continue } else { decision };
        match decision {
            Decision::StopAndCopy { reason, .. } => break (reason, dirty_next),
            _ if rounds.len() >= MAX_SIMULATED_ROUNDS as usize => {
                break (StopReason::MaxRounds, dirty_next)
            }
            Decision::Throttle { percent, .. } => throttle = Some(percent),
            _ => {}
        }
        pages = dirty_next;
    };
    let final_bytes = final_pages.saturating_mul(sigma);
    let downtime_transfer = secs(params.frozen_transfer_secs(final_bytes as f64));
    let downtime = params.stop_cost().saturating_add(downtime_transfer);
    Ok(Prediction {
        rounds,
        stop: Some(stop),
        final_bytes,
        downtime_transfer,
        downtime,
        total: total.saturating_add(downtime),
        bytes_sent: bytes_sent.saturating_add(final_bytes),
    })
}

/// Predicts stop-and-copy: the whole state sent while the service is frozen.
pub fn stop_and_copy(params: &Params) -> Result<Prediction, PlanError> {
    params.validate()?;
    let final_bytes = params.state_pages().saturating_mul(params.page_size);
    let downtime_transfer = secs(params.frozen_transfer_secs(final_bytes as f64));
    let c = &params.costs;
    let downtime = c
        .frozen_fixed
        .saturating_add(c.socket_cost(params.sockets))
        .saturating_add(secs(params.state_bytes as f64 / c.frozen_throughput))
        .saturating_add(downtime_transfer);
    Ok(Prediction {
        rounds: Vec::new(),
        stop: None,
        final_bytes,
        downtime_transfer,
        downtime,
        total: c.setup.saturating_add(downtime),
        bytes_sent: final_bytes,
    })
}

/// One method's predicted figures, as `tether plan` prints them and reports carry them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodPlan {
    /// Pre-copy rounds (0 for stop-and-copy).
    pub rounds: u32,
    /// Why pre-copy stops (`None` for stop-and-copy).
    pub stop_reason: Option<String>,
    /// Predicted downtime, ms.
    pub downtime_ms: f64,
    /// Predicted migration time, ms.
    pub total_ms: f64,
    /// Bytes sent in all.
    pub bytes_sent: u64,
    /// Bytes sent while frozen (memory pages).
    pub final_bytes: u64,
    /// Whether the downtime is predicted to be within the limit.
    pub within_limit: bool,
    /// The highest auto-converge throttle, percent.
    pub max_throttle: Option<u8>,
    /// Per round: pages sent and duration (ms).
    pub round_pages: Vec<u64>,
    /// Per round: predicted duration, ms.
    pub round_ms: Vec<f64>,
}

impl MethodPlan {
    fn new(p: &Prediction, limit: Duration) -> MethodPlan {
        MethodPlan {
            rounds: p.rounds.len() as u32,
            stop_reason: p.stop.map(|s| format!("{s:?}")),
            downtime_ms: ms(p.downtime),
            total_ms: ms(p.total),
            bytes_sent: p.bytes_sent,
            final_bytes: p.final_bytes,
            within_limit: p.downtime <= limit,
            max_throttle: p.max_throttle(),
            round_pages: p.rounds.iter().map(|r| r.pages).collect(),
            round_ms: p.rounds.iter().map(|r| ms(r.duration)).collect(),
        }
    }
}

/// What the plan was computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanInputs {
    /// State size, bytes.
    pub state_bytes: u64,
    /// Dirty rate, pages/s.
    pub dirty_rate: f64,
    /// The tree's sockets.
    #[serde(default)]
    pub sockets: u64,
    /// Link bandwidth, bytes/s.
    pub bandwidth: f64,
    /// The downtime limit, ms.
    pub downtime_limit_ms: f64,
    /// Whether auto-converge was asked for.
    pub auto_converge: bool,
    /// Where the host terms come from (the profile's `source`).
    pub profile: String,
}

/// Stop-and-copy and pre-copy predicted side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The inputs.
    pub inputs: PlanInputs,
    /// Stop-and-copy.
    pub stop_and_copy: MethodPlan,
    /// Pre-copy with the given settings.
    pub pre_copy: MethodPlan,
    /// Pre-copy with auto-converge, when the given settings do not meet the limit, auto-converge
    /// was not asked for and the limit is above the frozen phase's own cost: what it would take.
    pub with_auto_converge: Option<MethodPlan>,
    /// The frozen phase's cost with nothing left to send, ms: no pre-copy setting meets a
    /// downtime limit below it.
    #[serde(default)]
    pub frozen_cost_ms: f64,
    /// Whether the migration as asked for (pre-copy unless `stop_and_copy`) meets the limit.
    pub limit_holds: bool,
}

impl Plan {
    /// Plans a migration: `config` is the pre-copy policy the migration would use;
    /// `stop_and_copy_asked` whether the migration would send everything while frozen.
    pub fn new(
        params: &Params,
        config: &policy::Config,
        stop_and_copy_asked: bool,
        profile: &str,
    ) -> Result<Plan, PlanError> {
        let limit = config.downtime_limit;
        let sc = stop_and_copy(params)?;
        let pre = predict(params, config)?;
        let frozen_cost = params.stop_cost();
        let with_auto_converge =
            if !config.auto_converge && pre.downtime > limit && frozen_cost < limit {
                let c = policy::Config {
                    auto_converge: true,
                    ..config.clone()
                };
                Some(MethodPlan::new(&predict(params, &c)?, limit))
            } else {
                None
            };
        let chosen = if stop_and_copy_asked { &sc } else { &pre };
        Ok(Plan {
            inputs: PlanInputs {
                state_bytes: params.state_bytes,
                dirty_rate: params.dirty_rate,
                sockets: params.sockets,
                bandwidth: params.bandwidth,
                downtime_limit_ms: ms(limit),
                auto_converge: config.auto_converge,
                profile: profile.to_string(),
            },
            limit_holds: chosen.downtime <= limit,
            frozen_cost_ms: ms(frozen_cost),
            stop_and_copy: MethodPlan::new(&sc, limit),
            pre_copy: MethodPlan::new(&pre, limit),
            with_auto_converge,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DirtyPattern, HostCosts};
    use crate::policy::Config;

    const MIB: u64 = 1 << 20;
    /// 1 Gbit/s in bytes/s.
    const GBIT: f64 = 125e6;

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(1)
    }

    /// A policy that never stops early: no downtime is low enough, patience unlimited.
    fn exhaustive(rounds: u32) -> Config {
        Config {
            downtime_limit: Duration::ZERO,
            max_rounds: rounds,
            min_shrink: 1.0,
            shrink_patience: u32::MAX,
            ..Config::default()
        }
    }

    /// The original model's host (linear dirtying, nothing but a 100 ms fixed cost).
    fn params(m: u64, rate: f64, bw: f64) -> Params {
        Params {
            dirty_pattern: DirtyPattern::Linear,
            costs: HostCosts {
                frozen_fixed: Duration::from_millis(100),
                ..HostCosts::free()
            },
            ..Params::new(m, rate, bw)
        }
    }

    fn with_costs(p: Params, f: impl FnOnce(&mut HostCosts)) -> Params {
        let mut p = p;
        f(&mut p.costs);
        p
    }

    #[test]
    fn stop_and_copy_downtime_is_state_over_bandwidth_plus_fixed_cost() {
        let p = params(512 * MIB, 1000.0, 12.5e6);
        let s = stop_and_copy(&p).expect("valid");
        let expected =
            Duration::from_millis(100) + Duration::from_secs_f64(512.0 * MIB as f64 / 12.5e6);
        assert!(
            close(s.downtime, expected),
            "{:?} vs {expected:?}",
            s.downtime
        );
        assert_eq!(s.total, s.downtime);
        assert_eq!(s.final_bytes, 512 * MIB);
        assert_eq!(s.bytes_sent, 512 * MIB);
        assert!(s.rounds.is_empty() && s.stop.is_none());
        // With memory-proportional frozen work, a processing factor and a set-up cost.
        let p = with_costs(p, |c| {
            c.frozen_throughput = 1e9;
            c.processing_factor = 1.25;
            c.setup = Duration::from_millis(70);
        });
        let s2 = stop_and_copy(&p).expect("valid");
        let expected = Duration::from_millis(100)
            + Duration::from_secs_f64(512.0 * MIB as f64 / 1e9)
            + Duration::from_secs_f64(1.25 * 512.0 * MIB as f64 / 12.5e6);
        assert!(close(s2.downtime, expected), "{s2:?}");
        assert!(close(s2.total, expected + Duration::from_millis(70)));
    }

    #[test]
    fn zero_dirty_rate_converges_after_round_one() {
        let p = params(256 * MIB, 0.0, GBIT);
        let pr = predict(&p, &Config::default()).expect("valid");
        // Round 0 never stops pre-copy (a real migration knows no dirty rate then).
        assert_eq!(pr.rounds.len(), 2);
        assert_eq!(pr.rounds[0].pages, 256 * MIB / 4096);
        assert_eq!(pr.rounds[1].pages, 0);
        assert_eq!(pr.final_bytes, 0);
        assert_eq!(pr.stop, Some(StopReason::DowntimeUnderLimit));
        assert_eq!(pr.downtime, Duration::from_millis(100));
        assert!(close(
            pr.total,
            pr.rounds[0].duration + pr.rounds[1].duration + pr.downtime
        ));
        // With one round allowed it stops after round 0.
        let one = predict(
            &p,
            &Config {
                max_rounds: 1,
                ..Config::default()
            },
        )
        .expect("valid");
        assert_eq!(one.rounds.len(), 1);
        // A fixed cost above the limit: nothing left to gain, stop all the same.
        let p = with_costs(p, |c| c.frozen_fixed = Duration::from_secs(1));
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.rounds.len(), 2);
        assert_eq!(pr.stop, Some(StopReason::NothingLeft));
    }

    /// The research's closed form: with `S = D = infinity`, no fixed costs and linear dirtying,
    /// `T_i = rho (R T_{i-1} sigma / B + eps)`, i.e. `T_n = lambda^n T_0 + rho eps (1 - lambda^n)
    /// / (1 - lambda)` with `lambda = rho R sigma / B`, and `T_mig = sum T_i + T_down`.
    #[test]
    fn reproduces_the_papers_closed_form() {
        let (m, r, bw, rho, eps) = (100 * MIB, 2000.0, GBIT, 1.5, 0.010);
        let p = Params {
            dirty_pattern: DirtyPattern::Linear,
            costs: HostCosts {
                round_overhead: Duration::from_secs_f64(eps),
                processing_factor: rho,
                ..HostCosts::free()
            },
            ..Params::new(m, r, bw)
        };
        let pr = predict(&p, &exhaustive(6)).expect("valid");
        assert_eq!(pr.rounds.len(), 6);
        let t0 = rho * (m as f64 / bw + eps);
        let lambda = rho * r * 4096.0 / bw;
        let mut sum = 0.0;
        for (n, round) in pr.rounds.iter().enumerate() {
            let closed = lambda.powi(n as i32) * t0
                + rho * eps * (1.0 - lambda.powi(n as i32)) / (1.0 - lambda);
            let got = round.duration.as_secs_f64();
            // The model counts whole pages: each round rounds up by less than one page.
            assert!(
                (got - closed).abs() <= n as f64 * rho * 4096.0 / bw + 1e-9,
                "round {n}: {got} vs {closed}"
            );
            sum += got;
        }
        let last = pr.rounds.last().expect("rounds");
        let t_down = rho * (last.pages_dirty_next * 4096) as f64 / bw;
        assert!((pr.downtime.as_secs_f64() - t_down).abs() < 1e-6);
        assert!((pr.total.as_secs_f64() - (sum + t_down)).abs() < 1e-6);
        assert_eq!(
            pr.bytes_sent,
            pr.rounds.iter().map(|r| r.bytes).sum::<u64>() + pr.final_bytes
        );
    }

    /// Pre-copy converges exactly while the dirty rate is below the link's: `R sigma < B`.
    #[test]
    fn convergence_boundary_is_where_the_dirty_rate_reaches_the_link() {
        let bw = 12.5e6;
        let boundary = bw / 4096.0;
        // Every shrinking round counts as one (the policy's default asks for 10% at least).
        let cfg = Config {
            max_rounds: 60,
            min_shrink: 1.0,
            ..Config::default()
        };
        let no_costs = |rate| Params {
            dirty_pattern: DirtyPattern::Linear,
            ..Params::new(64 * MIB, rate, bw)
        };
        for f in [0.5, 0.8, 0.9] {
            let pr = predict(&no_costs(boundary * f), &cfg).expect("valid");
            assert_eq!(pr.stop, Some(StopReason::DowntimeUnderLimit), "{f}: {pr:?}");
            for w in pr.rounds.windows(2) {
                assert!(w[1].pages < w[0].pages, "{f}");
            }
        }
        for f in [1.0, 1.1, 2.0] {
            let pr = predict(&no_costs(boundary * f), &cfg).expect("valid");
            assert_eq!(pr.stop, Some(StopReason::NotShrinking), "{f}: {pr:?}");
            for w in pr.rounds.windows(2) {
                assert!(w[1].pages >= w[0].pages, "{f}");
            }
        }
    }

    #[test]
    fn a_round_takes_the_slower_of_its_scan_and_its_send() {
        let base = params(100 * MIB, 1000.0, GBIT);
        let scan = with_costs(base.clone(), |c| c.scan_throughput = 1e9);
        let a = predict(&base, &exhaustive(3)).expect("valid");
        let b = predict(&scan, &exhaustive(3)).expect("valid");
        let m_over_s = Duration::from_secs_f64(100.0 * MIB as f64 / 1e9);
        // Round 0 sends 100 MiB (0.84 s), longer than its scan (0.1 s): the link paces it.
        assert!(close(b.rounds[0].duration, a.rounds[0].duration));
        // Round 1 sends a few MiB: the scan paces it.
        assert!(a.rounds[1].duration < m_over_s);
        assert!(close(b.rounds[1].duration, m_over_s), "{b:?}");
        // The frozen phase reads the dump back once.
        assert!(close(
            b.downtime,
            Duration::from_millis(100) + m_over_s + b.downtime_transfer
        ));
        // Bytes sent while frozen pass through the frozen path's processing too.
        let f = with_costs(scan, |c| c.frozen_transfer_throughput = 1e8);
        let sc = stop_and_copy(&f).expect("valid");
        let v = sc.final_bytes as f64;
        assert!(close(
            sc.downtime_transfer,
            Duration::from_secs_f64(v / GBIT + v / 1e8)
        ));
    }

    #[test]
    fn a_dirty_rate_above_the_link_rate_never_shrinks() {
        // 64 MiB state, 100 Mbit/s link (12.5 MB/s = 3052 pages/s), 10_000 pages/s.
        let p = params(64 * MIB, 10_000.0, 12.5e6);
        let pr = predict(&p, &exhaustive(8)).expect("valid");
        assert_eq!(pr.rounds.len(), 8);
        for w in pr.rounds.windows(2) {
            assert!(
                w[1].pages >= w[0].pages,
                "{} then {}",
                w[0].pages,
                w[1].pages
            );
        }
        // Capped at the state.
        assert_eq!(pr.final_bytes, 64 * MIB);
        // With the default policy it stops for not shrinking, after rounds 1 and 2 (round 0 is
        // blind: a real migration knows no dirty rate after it), as the benchmark's migrations
        // of this cell do.
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.stop, Some(StopReason::NotShrinking));
        assert_eq!(pr.rounds.len(), 3);
        // A smaller working set caps the rounds there.
        let p = Params {
            working_set_bytes: Some(8 * MIB),
            ..p
        };
        let pr = predict(&p, &exhaustive(4)).expect("valid");
        assert!(pr.rounds[1..].iter().all(|r| r.pages == 8 * MIB / 4096));
    }

    #[test]
    fn auto_converge_throttles_and_converges_earlier() {
        // Dirtying at ~1.3x a 100 Mbit/s link.
        let p = params(64 * MIB, 4000.0, 12.5e6);
        let cfg = |auto_converge| Config {
            max_rounds: 30,
            auto_converge,
            ..Config::default()
        };
        let plain = predict(&p, &cfg(false)).expect("valid");
        let auto = predict(&p, &cfg(true)).expect("valid");
        assert_eq!(plain.stop, Some(StopReason::NotShrinking));
        assert_eq!(auto.stop, Some(StopReason::DowntimeUnderLimit));
        assert!(auto.downtime < plain.downtime / 10);
        let throttles: Vec<_> = auto.rounds.iter().filter_map(|r| r.throttle).collect();
        assert!(!throttles.is_empty());
        assert!(throttles.windows(2).all(|w| w[0] <= w[1]));
        for r in &auto.rounds {
            let cut = 1.0 - f64::from(r.throttle.unwrap_or(0)) / 100.0;
            assert!((r.dirty_rate - 4000.0 * cut).abs() < 1e-9);
        }
        // The plan shows what auto-converge would take when it was not asked for.
        let plan = Plan::new(&p, &cfg(false), false, "test").expect("valid");
        assert!(!plan.limit_holds);
        let ac = plan.with_auto_converge.expect("auto-converge plan");
        assert!(ac.within_limit);
        assert_eq!(ac.max_throttle, auto.max_throttle());
        let plan = Plan::new(&p, &cfg(true), false, "test").expect("valid");
        assert!(plan.limit_holds && plan.with_auto_converge.is_none());
        // A limit below the frozen phase's own cost: throttling cannot help, none is offered.
        let slow = with_costs(p, |c| c.frozen_fixed = Duration::from_secs(1));
        let plan = Plan::new(&slow, &cfg(false), false, "test").expect("valid");
        assert!(!plan.limit_holds && plan.with_auto_converge.is_none());
        assert!((plan.frozen_cost_ms - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn pre_copy_meets_the_issue_target_in_the_model() {
        // 256 MB at 1000 pages/s on 1 Gbit/s: pre-copy downtime at most 0.1x stop-and-copy's.
        let p = with_costs(Params::new(256 * MIB, 1000.0, GBIT), |c| {
            c.frozen_fixed = Duration::from_millis(50)
        });
        let pre = predict(&p, &Config::default()).expect("valid");
        let sc = stop_and_copy(&p).expect("valid");
        assert!(pre.downtime <= sc.downtime / 10, "{pre:?} vs {sc:?}");
        assert!(pre.total > sc.total);
        // A tighter limit takes more rounds and meets it.
        let c = Config {
            downtime_limit: Duration::from_millis(52),
            ..Config::default()
        };
        let tight = predict(&p, &c).expect("valid");
        assert!(tight.rounds.len() > pre.rounds.len(), "{tight:?}");
        assert_eq!(tight.stop, Some(StopReason::DowntimeUnderLimit));
        assert!(tight.downtime <= c.downtime_limit);
        let plan = Plan::new(&p, &c, false, "test").expect("valid");
        assert!(plan.limit_holds);
        assert!(!Plan::new(&p, &c, true, "test").expect("valid").limit_holds);
    }

    #[test]
    fn the_stop_under_the_limit_is_honest() {
        for rate in [0.0, 100.0, 1000.0, 5000.0, 20_000.0] {
            for bw in [12.5e6, GBIT] {
                let p = params(128 * MIB, rate, bw);
                let c = Config::default();
                let pr = predict(&p, &c).expect("valid");
                if pr.stop == Some(StopReason::DowntimeUnderLimit) {
                    assert!(pr.downtime <= c.downtime_limit, "{rate} {bw}: {pr:?}");
                }
                assert!(pr.rounds.len() <= c.max_rounds as usize);
                assert!(pr.total >= pr.downtime);
            }
        }
    }

    #[test]
    fn monotonic_in_dirty_rate_state_and_bandwidth() {
        let rounds = 5;
        for pattern in [DirtyPattern::Linear, DirtyPattern::Uniform] {
            let with = |p: Params| Params {
                dirty_pattern: pattern,
                costs: HostCosts {
                    scan_throughput: 2e9,
                    frozen_throughput: 1e9,
                    setup: Duration::from_millis(50),
                    ..p.costs.clone()
                },
                ..p
            };
            // More dirtying: every round sends at least as much, and so does the final
            // difference.
            let mut prev: Option<Prediction> = None;
            for rate in [0.0, 10.0, 100.0, 1000.0, 3000.0, 10_000.0, 100_000.0] {
                let pr = predict(&with(params(64 * MIB, rate, 12.5e6)), &exhaustive(rounds))
                    .expect("ok");
                if let Some(p) = &prev {
                    for i in 0..p.rounds.len().min(pr.rounds.len()) {
                        assert!(pr.rounds[i].bytes >= p.rounds[i].bytes, "{rate} {i}");
                        assert!(pr.rounds[i].duration >= p.rounds[i].duration);
                    }
                    assert!(pr.final_bytes >= p.final_bytes);
                    assert!(pr.downtime >= p.downtime);
                    assert!(pr.total >= p.total);
                }
                prev = Some(pr);
            }
            // More bandwidth: shorter rounds, downtime and total; stop-and-copy likewise.
            let mut prev: Option<(Prediction, Prediction)> = None;
            for bw in [1e6, 12.5e6, 125e6, 1.25e9] {
                let p = with(params(64 * MIB, 1000.0, bw));
                let pr = predict(&p, &exhaustive(rounds)).expect("ok");
                let sc = stop_and_copy(&p).expect("ok");
                if let Some((a, s)) = &prev {
                    for i in 0..a.rounds.len().min(pr.rounds.len()) {
                        assert!(pr.rounds[i].duration <= a.rounds[i].duration);
                    }
                    assert!(pr.downtime <= a.downtime && pr.total <= a.total);
                    assert!(sc.downtime < s.downtime);
                }
                prev = Some((pr, sc));
            }
            // More state: longer round 0, longer downtime and total, for both methods.
            let mut prev: Option<(Prediction, Prediction)> = None;
            for m in [MIB, 64 * MIB, 256 * MIB, 512 * MIB] {
                let p = with(params(m, 1000.0, 12.5e6));
                let pr = predict(&p, &exhaustive(rounds)).expect("ok");
                let sc = stop_and_copy(&p).expect("ok");
                if let Some((a, s)) = &prev {
                    assert!(pr.rounds[0].duration > a.rounds[0].duration);
                    assert!(pr.downtime >= a.downtime);
                    assert!(pr.total >= a.total);
                    assert!(sc.downtime > s.downtime && sc.total > s.total);
                }
                prev = Some((pr, sc));
            }
        }
    }

    #[test]
    fn invalid_inputs_are_refused() {
        let good = params(MIB, 10.0, 1e6);
        let bad = Params {
            bandwidth: 0.0,
            ..good.clone()
        };
        assert!(matches!(
            predict(&bad, &Config::default()),
            Err(PlanError::Model(_))
        ));
        assert!(stop_and_copy(&bad).is_err());
        let c = Config {
            max_rounds: 0,
            ..Config::default()
        };
        assert!(matches!(predict(&good, &c), Err(PlanError::Policy(_))));
    }

    #[test]
    fn huge_values_saturate_instead_of_panicking() {
        let p = params(u64::MAX / 2, 1e12, 1e-300);
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.downtime, Duration::MAX);
        let s = stop_and_copy(&Params::new(0, 0.0, 1.0)).expect("valid");
        assert_eq!(s.downtime, Duration::ZERO);
        let empty = predict(&Params::new(0, 1000.0, 1.0), &Config::default()).expect("valid");
        assert_eq!(empty.final_bytes, 0);
    }
}
