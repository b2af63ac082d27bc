//! The migration model: predicted rounds, downtime and total time of iterative pre-copy and of
//! stop-and-copy (pure).
//!
//! It follows the processing-aware model tether comes from, `T_mig = sum_i T_i + T_down` with
//! `T_0 = rho (tau1 M + eps)` and `T_i = rho (tau2 N_i sigma + eps)`, made concrete for tether's
//! pre-copy without soft-dirty, where every round reads (and hashes) the whole state to find what
//! changed:
//!
//! - `T_0 = rho (M / S + M / B + eps)`: round 0 reads and sends all `M` bytes;
//! - `N_i = min(R_{i-1} T_{i-1}, W / sigma)`: the pages dirtied during the previous round, at most
//!   the working set `W` (by default `M`); `R_{i-1}` is the dirty rate during that round, cut by
//!   the throttle then in force (dirty rate assumed proportional to CPU time);
//! - `T_i = rho (M / S + N_i sigma / B + eps)` for `i > 0`;
//! - `T_down = C + M / D + M / S + N_final sigma / B`: the fixed cost `C` of dump and restore of a
//!   minimal process, the memory-proportional part of dump, rebuild and restore at throughput
//!   `D`, reading the dump to find the final difference, and sending it;
//! - stop-and-copy: `T_down = T_mig = C + M / D + M / B`.
//!
//! So `tau1 = 1/S + 1/B` and `tau2 = 1/B` (plus the per-round scan `M/S`, which the original
//! model folds into `eps`). With `S = D = infinity`, `rho = 1`, it is exactly the original model.
//! Scanning and sending are taken as sequential, an upper bound when tether overlaps them.
//!
//! Which round is the last one is decided by the real [`Policy`], fed the predicted figures, so a
//! prediction stops where a migration with the same settings would.

use std::time::Duration;

use crate::policy::{self, Decision, Policy, RoundStats, StopReason};

/// Errors in model parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A parameter is out of its range.
    #[error("invalid model parameter {param}: {value} ({why})")]
    Invalid {
        /// The parameter.
        param: &'static str,
        /// Its value.
        value: f64,
        /// The range it must be in.
        why: &'static str,
    },
    /// The policy settings are invalid.
    #[error(transparent)]
    Policy(#[from] policy::PolicyError),
}

/// Model parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// `M`: state size, bytes (the present pages of the tree).
    pub state_bytes: u64,
    /// `R`: dirty page rate, pages/s (unthrottled).
    pub dirty_rate: f64,
    /// `sigma`: page size, bytes.
    pub page_size: u64,
    /// `B`: link bandwidth, bytes/s.
    pub bandwidth: f64,
    /// `eps`: fixed overhead per round.
    pub round_overhead: Duration,
    /// `S`: throughput of reading and hashing memory, bytes/s (`f64::INFINITY`: free).
    pub scan_throughput: f64,
    /// `C`: fixed cost of the stop phase: dump and restore of a minimal process.
    pub fixed_cost: Duration,
    /// `D`: throughput of the memory-proportional part of dump, rebuild and restore, bytes/s
    /// (`f64::INFINITY`: free).
    pub restore_throughput: f64,
    /// `W`: the working set the dirty pages are drawn from, bytes; `None` for the whole state.
    pub working_set_bytes: Option<u64>,
    /// `rho`: processing factor scaling each round's duration (1 for none).
    pub processing_factor: f64,
}

impl Params {
    /// Parameters for state `state_bytes`, dirty rate `dirty_rate` pages/s and link `bandwidth`
    /// bytes/s, with 4 KiB pages, no overheads, and free scanning and restoring.
    pub fn new(state_bytes: u64, dirty_rate: f64, bandwidth: f64) -> Params {
        Params {
            state_bytes,
            dirty_rate,
            page_size: policy::PAGE_SIZE,
            bandwidth,
            round_overhead: Duration::ZERO,
            scan_throughput: f64::INFINITY,
            fixed_cost: Duration::ZERO,
            restore_throughput: f64::INFINITY,
            working_set_bytes: None,
            processing_factor: 1.0,
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), ModelError> {
        let check = |param, value: f64, ok: bool, why| {
            if ok {
                Ok(())
            } else {
                Err(ModelError::Invalid { param, value, why })
            }
        };
        let d = self.dirty_rate;
        check("dirty_rate", d, d >= 0.0 && d.is_finite(), "finite, >= 0")?;
        let p = self.page_size as f64;
        check("page_size", p, self.page_size > 0, "> 0")?;
        let b = self.bandwidth;
        check("bandwidth", b, b > 0.0, "> 0")?;
        let s = self.scan_throughput;
        check("scan_throughput", s, s > 0.0, "> 0")?;
        let r = self.restore_throughput;
        check("restore_throughput", r, r > 0.0, "> 0")?;
        let rho = self.processing_factor;
        check(
            "processing_factor",
            rho,
            rho > 0.0 && rho.is_finite(),
            "finite, > 0",
        )?;
        Ok(())
    }

    fn m(&self) -> f64 {
        self.state_bytes as f64
    }

    /// Pages of the state, rounded up.
    pub fn state_pages(&self) -> u64 {
        self.state_bytes.div_ceil(self.page_size.max(1))
    }

    fn cap_pages(&self) -> u64 {
        let ws = self
            .working_set_bytes
            .map_or(self.state_bytes, |w| w.min(self.state_bytes));
        ws.div_ceil(self.page_size.max(1))
    }

    /// Seconds of one round that sends `bytes`.
    fn round_secs(&self, bytes: f64) -> f64 {
        self.processing_factor
            * (self.m() / self.scan_throughput
                + bytes / self.bandwidth
                + self.round_overhead.as_secs_f64())
    }

    /// Pages dirtied in `secs` at `rate` pages/s, capped at the working set.
    fn dirtied(&self, rate: f64, secs: f64) -> u64 {
        let n = (rate * secs).ceil();
        let cap = self.cap_pages();
        if n >= cap as f64 {
            cap
        } else {
            // n is finite, >= 0 and below a u64 here.
            n as u64
        }
    }

    /// The part of the downtime that does not depend on the final difference (pre-copy):
    /// fixed cost, memory-proportional restore work and reading the dump.
    pub fn stop_cost(&self) -> Duration {
        self.fixed_cost
            .saturating_add(secs(self.m() / self.restore_throughput))
            .saturating_add(secs(self.m() / self.scan_throughput))
    }

    /// Updates the parameters from a measured round. `weight` in (0, 1] is the weight of the new
    /// measurement in an exponentially weighted average (1: take it as is). Figures that cannot
    /// be measured from the round (zero time) leave their parameter alone.
    pub fn observe_round(&mut self, m: &MeasuredRound, weight: f64) {
        let w = weight.clamp(f64::MIN_POSITIVE, 1.0);
        if let Some(b) = fit_bandwidth(m.bytes_sent, m.transfer_time) {
            self.bandwidth = ewma(self.bandwidth, b, w);
        }
        if let Some(r) = fit_dirty_rate(m.pages_dirty, m.dirty_window) {
            self.dirty_rate = ewma(self.dirty_rate, r, w);
        }
        if let Some(s) = fit_scan_throughput(m.bytes_scanned, m.scan_time) {
            self.scan_throughput = ewma(self.scan_throughput, s, w);
        }
        if !m.duration.is_zero() {
            let eps = m
                .duration
                .saturating_sub(m.transfer_time)
                .saturating_sub(m.scan_time);
            self.round_overhead = secs(ewma(
                self.round_overhead.as_secs_f64(),
                eps.as_secs_f64(),
                w,
            ));
        }
    }

    /// Sets the fixed cost from a measured downtime that sent `final_bytes` (the downtime less
    /// the parts the model attributes to the transfer, restore work and reading the dump;
    /// never below zero).
    pub fn fit_fixed_cost(&mut self, downtime: Duration, final_bytes: u64) {
        let variable = final_bytes as f64 / self.bandwidth
            + self.m() / self.restore_throughput
            + self.m() / self.scan_throughput;
        self.fixed_cost = secs((downtime.as_secs_f64() - variable).max(0.0));
    }
}

/// Figures measured in one real round, for [`Params::observe_round`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MeasuredRound {
    /// Bytes sent.
    pub bytes_sent: u64,
    /// Time spent sending them.
    pub transfer_time: Duration,
    /// Bytes of memory read and hashed.
    pub bytes_scanned: u64,
    /// Time spent reading and hashing.
    pub scan_time: Duration,
    /// Pages found dirty.
    pub pages_dirty: u64,
    /// The time over which they were dirtied (from the previous scan of them to this one).
    pub dirty_window: Duration,
    /// Wall time of the round.
    pub duration: Duration,
}

/// `amount / elapsed`, if the elapsed time is positive.
fn rate(amount: u64, elapsed: Duration) -> Option<f64> {
    let s = elapsed.as_secs_f64();
    (s > 0.0).then(|| amount as f64 / s)
}

/// Bandwidth in bytes/s from bytes sent over the time they took.
pub fn fit_bandwidth(bytes: u64, transfer: Duration) -> Option<f64> {
    rate(bytes, transfer).filter(|b| *b > 0.0)
}

/// Dirty rate in pages/s from pages found dirty over the time they were dirtied in.
pub fn fit_dirty_rate(pages: u64, elapsed: Duration) -> Option<f64> {
    rate(pages, elapsed)
}

/// Scan throughput in bytes/s from bytes read and hashed over the time it took.
pub fn fit_scan_throughput(bytes: u64, elapsed: Duration) -> Option<f64> {
    rate(bytes, elapsed).filter(|s| *s > 0.0)
}

/// Exponentially weighted average: `weight` of `new`, the rest of `old` (`new` alone if `old`
/// is not a finite number).
pub fn ewma(old: f64, new: f64, weight: f64) -> f64 {
    if old.is_finite() {
        weight * new + (1.0 - weight) * old
    } else {
        new
    }
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(if s > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
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

/// Most rounds a prediction simulates, whatever the policy's cap.
pub const MAX_SIMULATED_ROUNDS: u32 = 10_000;

/// Predicts a pre-copy migration with the given policy settings (their page size is replaced by
/// the model's). The policy's fixed cost is the model's [`Params::stop_cost`].
pub fn predict(params: &Params, config: &policy::Config) -> Result<Prediction, ModelError> {
    params.validate()?;
    let mut policy = Policy::new(policy::Config {
        page_size: params.page_size,
        ..config.clone()
    })?;
    policy.observe_fixed_cost(params.stop_cost());
    let sigma = params.page_size;
    let mut rounds = Vec::new();
    let mut pages = params.state_pages();
    let mut throttle: Option<u8> = None;
    let mut total = Duration::ZERO;
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
        let decision = policy.decide(&RoundStats {
            pages_sent: pages,
            pages_dirty_next: dirty_next,
            bytes,
            duration,
            bandwidth: params.bandwidth,
            dirty_rate: rate,
        });
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
    let downtime_transfer = secs(final_bytes as f64 / params.bandwidth);
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
pub fn stop_and_copy(params: &Params) -> Result<Prediction, ModelError> {
    params.validate()?;
    let final_bytes = params.state_pages().saturating_mul(params.page_size);
    let downtime_transfer = secs(final_bytes as f64 / params.bandwidth);
    let downtime = params
        .fixed_cost
        .saturating_add(secs(params.m() / params.restore_throughput))
        .saturating_add(downtime_transfer);
    Ok(Prediction {
        rounds: Vec::new(),
        stop: None,
        final_bytes,
        downtime_transfer,
        downtime,
        total: downtime,
        bytes_sent: final_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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

    fn params(m: u64, rate: f64, bw: f64) -> Params {
        Params {
            fixed_cost: Duration::from_millis(100),
            ..Params::new(m, rate, bw)
        }
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
        // With memory-proportional restore work.
        let p = Params {
            restore_throughput: 1e9,
            ..p
        };
        let s2 = stop_and_copy(&p).expect("valid");
        assert!(close(
            s2.downtime,
            expected + Duration::from_secs_f64(512.0 * MIB as f64 / 1e9)
        ));
    }

    #[test]
    fn zero_dirty_rate_converges_after_round_zero() {
        let p = params(256 * MIB, 0.0, GBIT);
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.rounds.len(), 1);
        assert_eq!(pr.rounds[0].pages, 256 * MIB / 4096);
        assert_eq!(pr.rounds[0].pages_dirty_next, 0);
        assert_eq!(pr.final_bytes, 0);
        assert_eq!(pr.stop, Some(StopReason::DowntimeUnderLimit));
        assert_eq!(pr.downtime, Duration::from_millis(100));
        assert!(close(pr.total, pr.rounds[0].duration + pr.downtime));
        // A fixed cost above the limit: nothing left to gain, stop all the same.
        let p = Params {
            fixed_cost: Duration::from_secs(1),
            ..p
        };
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.rounds.len(), 1);
        assert_eq!(pr.stop, Some(StopReason::NothingLeft));
    }

    #[test]
    fn round_durations_follow_the_papers_model() {
        // S = D = infinity: T_0 = rho (M/B + eps), T_i = rho (N_i sigma / B + eps).
        let p = Params {
            round_overhead: Duration::from_millis(10),
            processing_factor: 1.5,
            ..params(100 * MIB, 2000.0, GBIT)
        };
        let pr = predict(&p, &exhaustive(4)).expect("valid");
        assert_eq!(pr.rounds.len(), 4);
        let t0 = 1.5 * (100.0 * MIB as f64 / GBIT + 0.010);
        assert!(close(pr.rounds[0].duration, Duration::from_secs_f64(t0)));
        for w in pr.rounds.windows(2) {
            let n = (2000.0 * w[0].duration.as_secs_f64()).ceil() as u64;
            assert_eq!(w[1].pages, n);
            let t = 1.5 * (n as f64 * 4096.0 / GBIT + 0.010);
            assert!(close(w[1].duration, Duration::from_secs_f64(t)));
        }
        let rounds: Duration = pr.rounds.iter().map(|r| r.duration).sum();
        assert!(close(pr.total, rounds + pr.downtime));
        let last = pr.rounds.last().expect("rounds");
        assert_eq!(pr.final_bytes, last.pages_dirty_next * 4096);
        assert_eq!(
            pr.bytes_sent,
            pr.rounds.iter().map(|r| r.bytes).sum::<u64>() + pr.final_bytes
        );
    }

    #[test]
    fn scanning_costs_every_round_and_the_downtime() {
        let base = params(100 * MIB, 1000.0, GBIT);
        let scan = Params {
            scan_throughput: 1e9,
            ..base.clone()
        };
        let a = predict(&base, &exhaustive(3)).expect("valid");
        let b = predict(&scan, &exhaustive(3)).expect("valid");
        let m_over_s = Duration::from_secs_f64(100.0 * MIB as f64 / 1e9);
        assert!(close(b.rounds[0].duration, a.rounds[0].duration + m_over_s));
        assert!(b.rounds[1].duration > a.rounds[1].duration + m_over_s / 2);
        assert!(close(
            b.downtime,
            Duration::from_millis(100) + m_over_s + b.downtime_transfer
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
        // With the default policy it stops for not shrinking.
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.stop, Some(StopReason::NotShrinking));
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
        let plain = predict(
            &p,
            &Config {
                max_rounds: 30,
                ..Config::default()
            },
        )
        .expect("valid");
        let auto = predict(
            &p,
            &Config {
                max_rounds: 30,
                auto_converge: true,
                ..Config::default()
            },
        )
        .expect("valid");
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
    }

    #[test]
    fn pre_copy_meets_the_issue_target_in_the_model() {
        // 256 MB at 1000 pages/s on 1 Gbit/s: pre-copy downtime at most 0.1x stop-and-copy's.
        let p = Params {
            fixed_cost: Duration::from_millis(50),
            ..Params::new(256 * MIB, 1000.0, GBIT)
        };
        let pre = predict(&p, &Config::default()).expect("valid");
        let sc = stop_and_copy(&p).expect("valid");
        assert!(pre.downtime <= sc.downtime / 10, "{pre:?} vs {sc:?}");
        assert!(pre.total > sc.total);
        // A tighter limit takes more rounds and meets it.
        let c = Config {
            downtime_limit: Duration::from_millis(60),
            ..Config::default()
        };
        let tight = predict(&p, &c).expect("valid");
        assert!(tight.rounds.len() > 1, "{tight:?}");
        assert_eq!(tight.stop, Some(StopReason::DowntimeUnderLimit));
        assert!(tight.downtime <= c.downtime_limit);
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
    fn monotonicity() {
        let rounds = 5;
        // More dirtying: every round sends at least as much, and so does the final difference.
        let mut prev: Option<Prediction> = None;
        for rate in [0.0, 10.0, 100.0, 1000.0, 3000.0, 10_000.0, 100_000.0] {
            let pr = predict(&params(64 * MIB, rate, 12.5e6), &exhaustive(rounds)).expect("ok");
            if let Some(p) = &prev {
                let n = p.rounds.len().min(pr.rounds.len());
                for i in 0..n {
                    assert!(
                        pr.rounds[i].bytes >= p.rounds[i].bytes,
                        "rate {rate} round {i}"
                    );
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
            let p = params(64 * MIB, 1000.0, bw);
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
        // More state: longer round 0, longer stop-and-copy.
        let mut prev: Option<(Prediction, Prediction)> = None;
        for m in [MIB, 64 * MIB, 256 * MIB, 512 * MIB] {
            let p = params(m, 1000.0, 12.5e6);
            let pr = predict(&p, &exhaustive(rounds)).expect("ok");
            let sc = stop_and_copy(&p).expect("ok");
            if let Some((a, s)) = &prev {
                assert!(pr.rounds[0].duration > a.rounds[0].duration);
                assert!(pr.total >= a.total);
                assert!(sc.downtime > s.downtime);
            }
            prev = Some((pr, sc));
        }
    }

    #[test]
    fn invalid_parameters_are_refused() {
        let good = params(MIB, 10.0, 1e6);
        assert!(good.validate().is_ok());
        let bad = [
            Params {
                dirty_rate: -1.0,
                ..good.clone()
            },
            Params {
                dirty_rate: f64::NAN,
                ..good.clone()
            },
            Params {
                dirty_rate: f64::INFINITY,
                ..good.clone()
            },
            Params {
                page_size: 0,
                ..good.clone()
            },
            Params {
                bandwidth: 0.0,
                ..good.clone()
            },
            Params {
                bandwidth: f64::NAN,
                ..good.clone()
            },
            Params {
                scan_throughput: 0.0,
                ..good.clone()
            },
            Params {
                restore_throughput: -5.0,
                ..good.clone()
            },
            Params {
                processing_factor: 0.0,
                ..good.clone()
            },
        ];
        for p in bad {
            assert!(matches!(
                predict(&p, &Config::default()),
                Err(ModelError::Invalid { .. })
            ));
            assert!(stop_and_copy(&p).is_err());
        }
        let c = Config {
            max_rounds: 0,
            ..Config::default()
        };
        assert!(matches!(predict(&good, &c), Err(ModelError::Policy(_))));
    }

    #[test]
    fn huge_values_saturate_instead_of_panicking() {
        let p = params(u64::MAX / 2, 1e12, 1e-300);
        let pr = predict(&p, &Config::default()).expect("valid");
        assert_eq!(pr.downtime, Duration::MAX);
        let s = stop_and_copy(&Params::new(0, 0.0, 1.0)).expect("valid");
        assert_eq!(s.downtime, Duration::ZERO);
        let empty = predict(&Params::new(0, 1000.0, 1.0), &Config::default()).expect("valid");
        assert_eq!(empty.rounds.len(), 1);
        assert_eq!(empty.final_bytes, 0);
    }

    #[test]
    fn fitting_helpers() {
        assert_eq!(
            fit_bandwidth(125_000_000, Duration::from_secs(1)),
            Some(125e6)
        );
        assert_eq!(fit_bandwidth(1, Duration::ZERO), None);
        assert_eq!(fit_bandwidth(0, Duration::from_secs(1)), None);
        assert_eq!(
            fit_dirty_rate(2000, Duration::from_millis(500)),
            Some(4000.0)
        );
        assert_eq!(fit_dirty_rate(0, Duration::from_secs(1)), Some(0.0));
        assert_eq!(fit_dirty_rate(5, Duration::ZERO), None);
        assert_eq!(
            fit_scan_throughput(2_000_000_000, Duration::from_secs(1)),
            Some(2e9)
        );
        assert_eq!(ewma(10.0, 20.0, 0.25), 12.5);
        assert_eq!(ewma(f64::INFINITY, 20.0, 0.25), 20.0);

        let mut p = params(64 * MIB, 0.0, 1e6);
        let m = MeasuredRound {
            bytes_sent: 100_000_000,
            transfer_time: Duration::from_secs(1),
            bytes_scanned: 64 * MIB,
            scan_time: Duration::from_millis(100),
            pages_dirty: 3000,
            dirty_window: Duration::from_millis(1500),
            duration: Duration::from_millis(1150),
        };
        p.observe_round(&m, 1.0);
        assert_eq!(p.bandwidth, 1e8);
        assert_eq!(p.dirty_rate, 2000.0);
        assert!((p.scan_throughput - 64.0 * MIB as f64 / 0.1).abs() < 1.0);
        assert!(close(p.round_overhead, Duration::from_millis(50)));
        p.observe_round(
            &MeasuredRound {
                bytes_sent: 50_000_000,
                pages_dirty: 0,
                ..m
            },
            0.5,
        );
        assert_eq!(p.bandwidth, 0.75e8);
        assert_eq!(p.dirty_rate, 1000.0);
        // A round with no timings leaves everything alone.
        let before = p.clone();
        p.observe_round(&MeasuredRound::default(), 1.0);
        assert_eq!(p, before);

        let mut p = params(64 * MIB, 0.0, 1e8);
        p.fit_fixed_cost(Duration::from_millis(300), 10_000_000);
        assert!(close(p.fixed_cost, Duration::from_millis(200)));
        p.fit_fixed_cost(Duration::from_millis(50), 10_000_000);
        assert_eq!(p.fixed_cost, Duration::ZERO);
    }
}
