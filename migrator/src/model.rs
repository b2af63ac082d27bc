//! The migration model: the duration of each pre-copy round, the pages it leaves dirty, the
//! downtime and the migration time, as functions of state size and dirty rate (pure).
//!
//! It follows the processing-aware model tether comes from, `T_mig = sum_i T_i + T_down` with
//! `T_0 = rho (tau1 M + eps)` and `T_i = rho (tau2 N_i sigma + eps)`, made concrete for tether's
//! pre-copy without soft-dirty, where every round reads (and hashes) the whole state to find what
//! changed:
//!
//! - `T_0 = rho (max(M / S, M / B) + eps)`: round 0 reads and sends all `M` bytes; tether scans
//!   and sends in a pipeline (a bounded channel of page batches between them), so a round takes
//!   as long as the slower of the two;
//! - `N_i = D(R_{i-1}, T_{i-1})`: the distinct pages dirtied during the previous round, at most
//!   the working set `W` (by default `M`); `R_{i-1}` is the dirty rate during that round, cut by
//!   the throttle then in force (dirty rate assumed proportional to CPU time). With
//!   [`DirtyPattern::Linear`] `D = min(R T, W / sigma)`, the original model; with
//!   [`DirtyPattern::Uniform`] (writes to pages drawn at random from the working set, the
//!   default) `D = w (1 - exp(-R T / w))` for `w = W / sigma` pages, since a page written twice
//!   is sent once;
//! - `T_i = rho (max(M / S, N_i sigma / B) + eps)` for `i > 0`;
//! - `T_down = C + M / D + M / S + V (rho / B + 1 / F)` with `V = N_final sigma`: the fixed cost
//!   `C` of the frozen phase for a minimal process (dump and restore set-up, the commit's round
//!   trips), its memory-proportional part at throughput `D` (CRIU's dump to tmpfs, the
//!   destination's page files), reading the dump to find the final difference, and sending that
//!   difference, whose bytes also pass through the frozen path's own processing at throughput
//!   `F` (read back from the dump, stored and written into page files at the destination);
//! - stop-and-copy: `T_down = C + M / D + M (rho / B + 1 / F)`;
//! - `T_mig = T_setup + sum_i T_i + T_down`, `T_setup` being what a migration costs outside the
//!   rounds and the downtime (handshake, checks, the end of the command).
//!
//! So `tau1 = max(1/S, 1/B)` and `tau2 = 1/B` while the link is slower than the scan (the
//! per-round scan `M/S` is what the original model folds into `eps`). With `S = D = F =
//! infinity`, `C = T_setup = 0` and the linear pattern it is exactly the original model.
//!
//! The host-dependent terms (`S`, `eps`, `rho`, `C`, `D`, `F`, `T_setup`) are [`HostCosts`]; a
//! calibration profile stores them, and predictions run these formulas through the real policy
//! (the profile and plan modules, which build on this one).

use std::time::Duration;

/// Size of a memory page.
pub const PAGE_SIZE: u64 = 4096;

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
}

/// How the service's writes spread over its pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum DirtyPattern {
    /// Every write hits a page not written since the last scan (the original model):
    /// `min(R T, W / sigma)` pages per round.
    Linear,
    /// Writes hit pages drawn uniformly at random from the working set: `w (1 - exp(-R T / w))`
    /// distinct pages of `w`.
    #[default]
    Uniform,
}

/// The host-dependent terms of the model (what calibration measures).
#[derive(Debug, Clone, PartialEq)]
pub struct HostCosts {
    /// `S`: throughput of reading and hashing live memory, bytes/s (`f64::INFINITY`: free).
    pub scan_throughput: f64,
    /// `eps`: fixed overhead per round.
    pub round_overhead: Duration,
    /// `rho`: processing factor scaling each round's duration and the frozen transfer (1 for
    /// none): what the protocol, encryption and the CPU cost on top of the link.
    pub processing_factor: f64,
    /// `C`: fixed cost of the frozen phase for a minimal process.
    pub frozen_fixed: Duration,
    /// `D`: throughput of the memory-proportional part of the frozen phase, bytes/s
    /// (`f64::INFINITY`: free).
    pub frozen_throughput: f64,
    /// `F`: throughput of the frozen path's processing of the bytes sent while frozen, bytes/s
    /// (`f64::INFINITY`: free).
    pub frozen_transfer_throughput: f64,
    /// `K`: the frozen phase's cost per socket of the tree (CRIU dumps each with its queues and
    /// TCP repair state, and restores it).
    pub frozen_per_socket: Duration,
    /// `T_setup`: what a migration costs outside its rounds and downtime.
    pub setup: Duration,
}

impl HostCosts {
    /// No costs at all: the original model's idealised host.
    pub fn free() -> HostCosts {
        HostCosts {
            scan_throughput: f64::INFINITY,
            round_overhead: Duration::ZERO,
            processing_factor: 1.0,
            frozen_fixed: Duration::ZERO,
            frozen_throughput: f64::INFINITY,
            frozen_transfer_throughput: f64::INFINITY,
            frozen_per_socket: Duration::ZERO,
            setup: Duration::ZERO,
        }
    }

    /// `K n`: the frozen phase's cost of `sockets` sockets.
    pub fn socket_cost(&self, sockets: u64) -> Duration {
        self.frozen_per_socket
            .saturating_mul(u32::try_from(sockets).unwrap_or(u32::MAX))
    }

    /// These terms for a tree of `sockets` sockets, their cost folded into the fixed cost `C`
    /// (what a live policy weighs: the tree's sockets are known before pre-copy starts).
    pub fn with_sockets(&self, sockets: u64) -> HostCosts {
        HostCosts {
            frozen_fixed: self.frozen_fixed.saturating_add(self.socket_cost(sockets)),
            ..self.clone()
        }
    }

    /// Checks every term's range.
    pub fn validate(&self) -> Result<(), ModelError> {
        let s = self.scan_throughput;
        check("scan_throughput", s, s > 0.0, "> 0")?;
        let d = self.frozen_throughput;
        check("frozen_throughput", d, d > 0.0, "> 0")?;
        let f = self.frozen_transfer_throughput;
        check("frozen_transfer_throughput", f, f > 0.0, "> 0")?;
        let rho = self.processing_factor;
        check(
            "processing_factor",
            rho,
            rho > 0.0 && rho.is_finite(),
            "finite, > 0",
        )
    }

    /// The part of a pre-copy downtime that does not depend on the final difference:
    /// `C + M / D + M / S` for a state of `state_bytes`.
    pub fn frozen_cost(&self, state_bytes: u64) -> Duration {
        let m = state_bytes as f64;
        self.frozen_fixed
            .saturating_add(secs(m / self.frozen_throughput))
            .saturating_add(secs(m / self.scan_throughput))
    }
}

fn check(param: &'static str, value: f64, ok: bool, why: &'static str) -> Result<(), ModelError> {
    if ok {
        Ok(())
    } else {
        Err(ModelError::Invalid { param, value, why })
    }
}

/// Model parameters: the service, the link and the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// `M`: state size, bytes (the present pages of the tree).
    pub state_bytes: u64,
    /// `R`: dirty page rate, pages/s (unthrottled).
    pub dirty_rate: f64,
    /// How the writes spread over the pages.
    pub dirty_pattern: DirtyPattern,
    /// `sigma`: page size, bytes.
    pub page_size: u64,
    /// `B`: link bandwidth, bytes/s.
    pub bandwidth: f64,
    /// `W`: the working set the dirty pages are drawn from, bytes; `None` for the whole state.
    pub working_set_bytes: Option<u64>,
    /// `n`: the tree's sockets.
    pub sockets: u64,
    /// The host's terms.
    pub costs: HostCosts,
}

impl Params {
    /// Parameters for state `state_bytes`, dirty rate `dirty_rate` pages/s and link `bandwidth`
    /// bytes/s, with 4 KiB pages, uniform writes and a free host ([`HostCosts::free`]).
    pub fn new(state_bytes: u64, dirty_rate: f64, bandwidth: f64) -> Params {
        Params {
            state_bytes,
            dirty_rate,
            dirty_pattern: DirtyPattern::Uniform,
            page_size: PAGE_SIZE,
            bandwidth,
            working_set_bytes: None,
            sockets: 0,
            costs: HostCosts::free(),
        }
    }

    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), ModelError> {
        let d = self.dirty_rate;
        check("dirty_rate", d, d >= 0.0 && d.is_finite(), "finite, >= 0")?;
        let p = self.page_size as f64;
        check("page_size", p, self.page_size > 0, "> 0")?;
        let b = self.bandwidth;
        check("bandwidth", b, b > 0.0, "> 0")?;
        self.costs.validate()
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

    /// Seconds of one round that sends `bytes`: `rho (max(M / S, bytes / B) + eps)`.
    pub fn round_secs(&self, bytes: f64) -> f64 {
        let c = &self.costs;
        c.processing_factor
            * ((self.m() / c.scan_throughput).max(bytes / self.bandwidth)
                + c.round_overhead.as_secs_f64())
    }

    /// Seconds sending `bytes` while frozen: `bytes (rho / B + 1 / F)`.
    pub fn frozen_transfer_secs(&self, bytes: f64) -> f64 {
        let c = &self.costs;
        bytes * (c.processing_factor / self.bandwidth + 1.0 / c.frozen_transfer_throughput)
    }

    /// Distinct pages dirtied in `secs` at `rate` pages/s, capped at the working set.
    pub fn dirtied(&self, rate: f64, secs: f64) -> u64 {
        let writes = (rate * secs).max(0.0);
        let cap = self.cap_pages();
        let n = match self.dirty_pattern {
            DirtyPattern::Linear => writes.ceil(),
            DirtyPattern::Uniform if cap == 0 => 0.0,
            DirtyPattern::Uniform => {
                let w = cap as f64;
                (w * -(-writes / w).exp_m1()).ceil()
            }
        };
        if n.is_nan() || n >= cap as f64 {
            cap
        } else {
            // n is finite, >= 0 and below a u64 here.
            n as u64
        }
    }

    /// The part of the pre-copy downtime that does not depend on the final difference:
    /// `C + K n + M / D + M / S`.
    pub fn stop_cost(&self) -> Duration {
        self.costs
            .frozen_cost(self.state_bytes)
            .saturating_add(self.costs.socket_cost(self.sockets))
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
        let c = &mut self.costs;
        if let Some(s) = fit_scan_throughput(m.bytes_scanned, m.scan_time) {
            c.scan_throughput = ewma(c.scan_throughput, s, w);
        }
        if !m.duration.is_zero() {
            let eps = m
                .duration
                .saturating_sub(m.transfer_time)
                .saturating_sub(m.scan_time);
            c.round_overhead = secs(ewma(c.round_overhead.as_secs_f64(), eps.as_secs_f64(), w));
        }
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

/// Seconds as a duration, saturating (negative and NaN: zero).
pub fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(if s > 0.0 {
        Duration::MAX
    } else {
        Duration::ZERO
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn close(a: Duration, b: Duration) -> bool {
        a.abs_diff(b) <= Duration::from_micros(1)
    }

    #[test]
    fn the_uniform_pattern_counts_distinct_pages() {
        let mut p = Params::new(64 * MIB, 0.0, 1e9);
        let w = (64 * MIB / 4096) as f64;
        // Few writes: nearly all distinct.
        assert_eq!(p.dirtied(100.0, 1.0), 100);
        // As many writes as pages: 1 - 1/e of them.
        let n = p.dirtied(w, 1.0) as f64;
        assert!((n / w - (1.0 - (-1.0f64).exp())).abs() < 1e-3, "{n}");
        // Never above the working set, never below zero.
        assert_eq!(p.dirtied(1e12, 1e6), 64 * MIB / 4096);
        assert_eq!(p.dirtied(0.0, 5.0), 0);
        p.dirty_pattern = DirtyPattern::Linear;
        assert_eq!(p.dirtied(w, 1.0), 64 * MIB / 4096);
        assert_eq!(p.dirtied(1000.0, 0.5), 500);
        // An empty state has nothing to dirty.
        let e = Params::new(0, 1000.0, 1e9);
        assert_eq!(e.dirtied(1000.0, 1.0), 0);
    }

    #[test]
    fn frozen_cost_is_fixed_plus_memory_terms() {
        let c = HostCosts {
            frozen_fixed: Duration::from_millis(80),
            frozen_throughput: 1e9,
            scan_throughput: 2e9,
            ..HostCosts::free()
        };
        let expected = Duration::from_millis(80)
            + Duration::from_secs_f64(512.0 * MIB as f64 / 1e9)
            + Duration::from_secs_f64(512.0 * MIB as f64 / 2e9);
        assert!(close(c.frozen_cost(512 * MIB), expected));
        assert_eq!(HostCosts::free().frozen_cost(512 * MIB), Duration::ZERO);
    }

    #[test]
    fn sockets_add_k_per_socket_to_the_frozen_phase() {
        let c = HostCosts {
            frozen_fixed: Duration::from_millis(100),
            frozen_per_socket: Duration::from_micros(100),
            ..HostCosts::free()
        };
        assert_eq!(c.socket_cost(10_000), Duration::from_secs(1));
        assert_eq!(
            c.with_sockets(10_000).frozen_fixed,
            Duration::from_millis(1100)
        );
        let p = Params {
            costs: c.clone(),
            sockets: 1000,
            ..Params::new(64 * MIB, 0.0, 1e8)
        };
        assert_eq!(p.stop_cost(), Duration::from_millis(200));
        // Folded or not, the same cost.
        let folded = Params {
            costs: c.with_sockets(1000),
            sockets: 0,
            ..p.clone()
        };
        assert_eq!(folded.stop_cost(), p.stop_cost());
    }

    #[test]
    fn invalid_parameters_are_refused() {
        let good = Params::new(MIB, 10.0, 1e6);
        assert!(good.validate().is_ok());
        let costs = |c: HostCosts| Params {
            costs: c,
            ..good.clone()
        };
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
                page_size: 0,
                ..good.clone()
            },
            Params {
                bandwidth: f64::NAN,
                ..good.clone()
            },
            costs(HostCosts {
                scan_throughput: 0.0,
                ..HostCosts::free()
            }),
            costs(HostCosts {
                frozen_throughput: -5.0,
                ..HostCosts::free()
            }),
            costs(HostCosts {
                processing_factor: f64::INFINITY,
                ..HostCosts::free()
            }),
        ];
        for p in bad {
            assert!(
                matches!(p.validate(), Err(ModelError::Invalid { .. })),
                "{p:?}"
            );
        }
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

        let mut p = Params::new(64 * MIB, 0.0, 1e6);
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
        assert!((p.costs.scan_throughput - 64.0 * MIB as f64 / 0.1).abs() < 1.0);
        assert!(close(p.costs.round_overhead, Duration::from_millis(50)));
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
    }

    #[test]
    fn secs_saturates() {
        assert_eq!(secs(-1.0), Duration::ZERO);
        assert_eq!(secs(f64::NAN), Duration::ZERO);
        assert_eq!(secs(1e300), Duration::MAX);
        assert_eq!(secs(1.5), Duration::from_millis(1500));
    }
}
