//! Calibration: fitting a [`Profile`] (the model's host terms) to measured migrations (pure).
//!
//! The inputs are migrations that committed ([`Sample`], usually read from their JSON reports)
//! and the link's nominal bandwidth `B`. Each term is fitted from the figures that isolate it:
//!
//! 1. `S`, scan throughput: the median of the rounds' read-and-hash rates, rounds after round 0
//!    only (round 0's scan is paced by the link);
//! 2. `rho` and `eps`: round 0 of each pre-copy fixes `rho = T_0 / (max(M/S, M/B) + eps)`, the
//!    later rounds `eps = T_i / rho - max(M/S, V_i/B)` (medians, two passes);
//! 3. `C` and `D`: the downtime of a migration that sent little while frozen (under a tenth of
//!    its state), less the terms already known (the frozen transfer `rho V_final / B`, and for
//!    pre-copy the read-back `M/S`), is `C + M/D`: a least-squares line over the state sizes
//!    (Theil-Sen, robust to one slow move; with a single size, `D` keeps the base profile's
//!    value and `C` takes the rest);
//! 4. `F`: what remains of the downtimes of migrations that sent a quarter of their state or
//!    more while frozen (stop-and-copy), per byte sent (median);
//! 5. `T_setup`: the median of the migration time less its rounds and downtime.
//!
//! Terms nothing measured keep the base profile's values (the result says which).

use serde::{Deserialize, Serialize};

use crate::model::PAGE_SIZE;
use crate::profile::Profile;
use crate::report::{Outcome, Report};

const MIB: f64 = 1_048_576.0;

/// One pre-copy round's measured figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleRound {
    /// Bytes of state read and hashed.
    pub scanned_bytes: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Time reading and hashing, ms.
    pub scan_ms: f64,
    /// Wall time of the round, ms.
    pub duration_ms: f64,
}

/// One measured migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// State size `M`, bytes.
    pub state_bytes: u64,
    /// Pre-copy rounds (empty for stop-and-copy).
    pub rounds: Vec<SampleRound>,
    /// Memory bytes sent while frozen.
    pub final_bytes: u64,
    /// Measured downtime, ms.
    pub downtime_ms: f64,
    /// Measured migration time, ms.
    pub total_ms: f64,
}

impl Sample {
    /// The figures of a committed migration's report; `None` for one that did not commit or
    /// carries no state size.
    pub fn from_report(r: &Report) -> Option<Sample> {
        if r.outcome != Outcome::Committed {
            return None;
        }
        let fin = r.precopy.final_difference;
        let state_pages = fin
            .map(|f| f.pages_dumped)
            .filter(|p| *p > 0)
            .or_else(|| r.precopy.rounds.first().map(|r| r.pages_scanned))?;
        Some(Sample {
            state_bytes: state_pages * PAGE_SIZE,
            rounds: r
                .precopy
                .rounds
                .iter()
                .map(|x| SampleRound {
                    scanned_bytes: x.pages_scanned * PAGE_SIZE,
                    bytes: x.bytes,
                    scan_ms: x.scan_ms,
                    duration_ms: x.duration_ms,
                })
                .collect(),
            final_bytes: fin.map_or(0, |f| f.bytes),
            downtime_ms: r.timings.downtime_ms,
            total_ms: r.timings.total_ms,
        })
    }

    fn pre_copy(&self) -> bool {
        !self.rounds.is_empty()
    }
}

/// Errors of a calibration.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum CalibrateError {
    /// No usable sample.
    #[error("no committed migration to calibrate from (need at least one report of a committed migration)")]
    NoSamples,
    /// The bandwidth is not a positive number.
    #[error("the link bandwidth must be a positive number of bytes/s, not {0}")]
    Bandwidth(f64),
}

/// A fitted profile and what it was fitted from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The profile.
    pub profile: Profile,
    /// Migrations used.
    pub samples: usize,
    /// Of which pre-copy.
    pub pre_copy_samples: usize,
    /// Distinct state sizes, MiB.
    pub state_sizes_mib: Vec<f64>,
    /// Terms left at the base profile's value, for want of figures that isolate them.
    pub kept_from_base: Vec<String>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// A line `y = a + b x` robust to an outlier (Theil-Sen: the median of the pairwise slopes, the
/// median intercept); `None` with fewer than two distinct `x`. A calibration has a few noisy
/// downtimes per state size, and one slow restore must not tilt the line.
fn line(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let mut slopes = Vec::new();
    for (i, p) in points.iter().enumerate() {
        for q in &points[i + 1..] {
            // Sizes within 5% of each other are one size: their slope is noise.
            if (q.0 - p.0).abs() > 0.05 * p.0.abs().max(q.0.abs()) {
                slopes.push((q.1 - p.1) / (q.0 - p.0));
            }
        }
    }
    let b = median(slopes)?;
    let a = median(points.iter().map(|p| p.1 - b * p.0).collect())?;
    Some((a, b))
}

/// Fits a profile to `samples` over a link of `bandwidth` bytes/s, starting from `base` for the
/// terms the samples cannot isolate. `source` goes into the profile's `source`.
pub fn fit(
    samples: &[Sample],
    bandwidth: f64,
    base: &Profile,
    source: &str,
) -> Result<Calibration, CalibrateError> {
    if !(bandwidth > 0.0 && bandwidth.is_finite()) {
        return Err(CalibrateError::Bandwidth(bandwidth));
    }
    if samples.is_empty() {
        return Err(CalibrateError::NoSamples);
    }
    let mut p = base.clone();
    let mut kept = Vec::new();
    let b = bandwidth;

    // 1. S from the rounds after round 0.
    let scan_rates: Vec<f64> = samples
        .iter()
        .flat_map(|s| s.rounds.iter().skip(1))
        .filter(|r| r.scan_ms > 0.0 && r.scanned_bytes > 0)
        .map(|r| r.scanned_bytes as f64 / MIB / (r.scan_ms / 1000.0))
        .collect();
    match median(scan_rates) {
        Some(s) if s > 0.0 => p.scan_mib_s = s,
        _ => kept.push("scan_mib_s".to_string()),
    }
    let s_bps = p.scan_mib_s * MIB;

    // 2. rho from round 0, eps from the later rounds (two passes).
    let mut eps = 0.0;
    let mut rho = None;
    for _ in 0..2 {
        rho = median(
            samples
                .iter()
                .filter_map(|s| s.rounds.first().map(|r| (s, r)))
                .map(|(s, r)| {
                    let m = s.state_bytes as f64;
                    (r.duration_ms / 1000.0) / ((m / s_bps).max(r.bytes as f64 / b) + eps)
                })
                .collect(),
        );
        let rho_now = rho.unwrap_or(p.processing_factor);
        if let Some(e) = median(
            samples
                .iter()
                .flat_map(|s| s.rounds.iter().skip(1))
                .map(|r| {
                    (r.duration_ms / 1000.0) / rho_now
                        - (r.scanned_bytes as f64 / s_bps).max(r.bytes as f64 / b)
                })
                .collect(),
        ) {
            eps = e.max(0.0);
        }
    }
    match rho {
        Some(r) if r > 0.0 => p.processing_factor = r,
        _ => kept.push("processing_factor".to_string()),
    }
    if samples.iter().any(|s| s.rounds.len() > 1) {
        p.round_overhead_ms = eps * 1000.0;
    } else {
        kept.push("round_overhead_ms".to_string());
    }

    // 3 and 4, twice: C + M/D from the migrations that sent little while frozen, then F from
    // those that sent much; the second pass takes F's share out of the first's residuals.
    let rho = p.processing_factor;
    let residual = |s: &Sample, f: Option<f64>| {
        let m = s.state_bytes as f64;
        let v = s.final_bytes as f64;
        let transfer = rho * v / b + f.map_or(0.0, |f| v / (f * MIB));
        let readback = if s.pre_copy() { m / s_bps } else { 0.0 };
        (m, s.downtime_ms / 1000.0 - transfer - readback)
    };
    let small_final = |s: &&Sample| s.final_bytes * 10 < s.state_bytes.max(1);
    let large_final = |s: &&Sample| s.final_bytes > 0 && s.final_bytes * 4 >= s.state_bytes;
    let mut f = p.frozen_transfer_mib_s;
    let mut kept_cd = false;
    let mut kept_f = false;
    for _ in 0..2 {
        let small: Vec<(f64, f64)> = samples
            .iter()
            .filter(small_final)
            .map(|s| residual(s, f))
            .collect();
        let all: Vec<(f64, f64)> = samples.iter().map(|s| residual(s, f)).collect();
        match line(&small).or_else(|| line(&all)) {
            Some((c, slope)) if slope > 0.0 => {
                p.frozen_mib_s = 1.0 / slope / MIB;
                p.frozen_fixed_ms = (c * 1000.0).max(0.0);
            }
            _ => {
                // One state size (or a slope the noise made negative): D from the base.
                kept_cd = true;
                p.frozen_mib_s = base.frozen_mib_s;
                let d = p.frozen_mib_s * MIB;
                let points = if small.is_empty() { &all } else { &small };
                if let Some(c) = median(points.iter().map(|(m, r)| r - m / d).collect()) {
                    p.frozen_fixed_ms = (c * 1000.0).max(0.0);
                }
            }
        }
        let (c_secs, d_bps) = (p.frozen_fixed_ms / 1000.0, p.frozen_mib_s * MIB);
        let per_byte = median(
            samples
                .iter()
                .filter(large_final)
                .map(|s| {
                    let (m, r) = residual(s, None);
                    (r - c_secs - m / d_bps) / s.final_bytes as f64
                })
                .collect(),
        );
        match per_byte {
            Some(x) if x > 0.0 => f = Some(1.0 / x / MIB),
            Some(_) => f = None,
            None => kept_f = true,
        }
    }
    p.frozen_transfer_mib_s = f;
    if kept_cd {
        kept.push("frozen_mib_s".to_string());
    }
    if kept_f {
        kept.push("frozen_transfer_mib_s".to_string());
    }

    // 5. The rest of the migration time.
    if let Some(setup) = median(
        samples
            .iter()
            .map(|s| {
                let rounds: f64 = s.rounds.iter().map(|r| r.duration_ms).sum();
                s.total_ms - rounds - s.downtime_ms
            })
            .collect(),
    ) {
        p.setup_ms = setup.max(0.0);
    }

    // Sizes within 5% of each other are one size (a 64 MiB service dumps 64-65 MiB).
    let mut sizes: Vec<f64> = samples.iter().map(|s| s.state_bytes as f64 / MIB).collect();
    sizes.sort_by(f64::total_cmp);
    sizes.dedup_by(|b, a| *b <= *a * 1.05);
    let sizes = sizes.into_iter().map(f64::round).collect();
    p.source = source.to_string();
    p.link_mbit = Some(bandwidth * 8.0 / 1e6);
    Ok(Calibration {
        profile: p,
        samples: samples.len(),
        pre_copy_samples: samples.iter().filter(|s| s.pre_copy()).count(),
        state_sizes_mib: sizes,
        kept_from_base: kept,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DirtyPattern, Params};
    use crate::plan::{predict, stop_and_copy};
    use crate::policy::Config;

    const MB: u64 = 1 << 20;

    /// Samples made by the model itself from `truth`: a fit must give `truth` back.
    fn synthetic(truth: &Profile, bw: f64) -> Vec<Sample> {
        let mut out = Vec::new();
        for m in [16 * MB, 64 * MB, 256 * MB] {
            for rate in [0.0, 500.0, 3000.0] {
                let p = Params {
                    dirty_pattern: DirtyPattern::Uniform,
                    costs: truth.costs(),
                    ..Params::new(m, rate, bw)
                };
                let pre = predict(&p, &Config::default()).expect("valid");
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                let scan_ms = ms(crate::model::secs(m as f64 / (truth.scan_mib_s * MIB)));
                out.push(Sample {
                    state_bytes: m,
                    rounds: pre
                        .rounds
                        .iter()
                        .map(|r| SampleRound {
                            scanned_bytes: m,
                            bytes: r.bytes,
                            scan_ms,
                            duration_ms: ms(r.duration),
                        })
                        .collect(),
                    final_bytes: pre.final_bytes,
                    downtime_ms: ms(pre.downtime),
                    total_ms: ms(pre.total),
                });
                let sc = stop_and_copy(&p).expect("valid");
                out.push(Sample {
                    state_bytes: m,
                    rounds: Vec::new(),
                    final_bytes: sc.final_bytes,
                    downtime_ms: ms(sc.downtime),
                    total_ms: ms(sc.total),
                });
            }
        }
        out
    }

    fn near(a: f64, b: f64, rel: f64) -> bool {
        (a - b).abs() <= rel * b.abs().max(1e-9)
    }

    #[test]
    fn recovers_the_terms_of_model_made_samples() {
        let truth = Profile {
            source: String::new(),
            scan_mib_s: 1500.0,
            round_overhead_ms: 12.0,
            processing_factor: 1.1,
            frozen_fixed_ms: 90.0,
            frozen_mib_s: 650.0,
            frozen_transfer_mib_s: Some(400.0),
            setup_ms: 75.0,
            link_mbit: None,
            frozen_per_socket_ms: None,
        };
        let bw = 12.5e6;
        let samples = synthetic(&truth, bw);
        let c = fit(&samples, bw, &Profile::default(), "synthetic").expect("fit");
        let p = &c.profile;
        assert!(c.kept_from_base.is_empty(), "{c:?}");
        assert!(near(p.scan_mib_s, 1500.0, 0.01), "{p:?}");
        assert!(near(p.processing_factor, 1.1, 0.01), "{p:?}");
        assert!(near(p.round_overhead_ms, 12.0, 0.05), "{p:?}");
        assert!(near(p.frozen_fixed_ms, 90.0, 0.02), "{p:?}");
        assert!(near(p.frozen_mib_s, 650.0, 0.02), "{p:?}");
        assert!(near(p.setup_ms, 75.0, 0.01), "{p:?}");
        let f = p.frozen_transfer_mib_s.expect("F fitted");
        assert!(near(f, 400.0, 0.02), "{p:?}");
        assert_eq!(p.source, "synthetic");
        assert_eq!(c.state_sizes_mib, vec![16.0, 64.0, 256.0]);
    }

    #[test]
    fn one_state_size_keeps_the_base_throughput() {
        let truth = Profile::default();
        let bw = 125e6;
        let samples: Vec<_> = synthetic(&truth, bw)
            .into_iter()
            .filter(|s| s.state_bytes == 64 * MB)
            .collect();
        let base = Profile {
            frozen_mib_s: 500.0,
            ..Profile::default()
        };
        let c = fit(&samples, bw, &base, "one size").expect("fit");
        assert!(
            c.kept_from_base.iter().any(|k| k == "frozen_mib_s"),
            "{c:?}"
        );
        assert_eq!(c.profile.frozen_mib_s, 500.0);
        // C absorbs the difference: the downtimes of that size are still predicted.
        let m = 64.0 * MIB;
        let want = truth.frozen_fixed_ms / 1000.0 + m / (truth.frozen_mib_s * MIB);
        let got = c.profile.frozen_fixed_ms / 1000.0 + m / (500.0 * MIB);
        assert!(near(got, want, 0.02), "{got} vs {want}");
    }

    #[test]
    fn refuses_nothing_to_fit() {
        let p = Profile::default();
        assert_eq!(fit(&[], 1e6, &p, ""), Err(CalibrateError::NoSamples));
        let s = Sample {
            state_bytes: MB,
            rounds: Vec::new(),
            final_bytes: MB,
            downtime_ms: 100.0,
            total_ms: 200.0,
        };
        assert_eq!(
            fit(std::slice::from_ref(&s), 0.0, &p, ""),
            Err(CalibrateError::Bandwidth(0.0))
        );
        // Stop-and-copy alone: the round terms stay as they were.
        let c = fit(&[s], 1e6, &p, "").expect("fit");
        for t in [
            "scan_mib_s",
            "processing_factor",
            "round_overhead_ms",
            "frozen_mib_s",
        ] {
            assert!(c.kept_from_base.iter().any(|k| k == t), "{t}: {c:?}");
        }
        assert!(c.profile.validate().is_ok());
    }

    #[test]
    fn one_outlier_does_not_tilt_the_line() {
        let mut pts: Vec<(f64, f64)> = (1..=6)
            .map(|i| (f64::from(i), 10.0 + 2.0 * f64::from(i)))
            .collect();
        pts[5].1 += 100.0;
        let (a, b) = line(&pts).expect("line");
        assert!((b - 2.0).abs() < 1e-9 && (a - 10.0).abs() < 1e-9, "{a} {b}");
        assert_eq!(line(&[(1.0, 1.0), (1.0, 5.0)]), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN]), None);
    }
}
