//! A calibration profile: the host-dependent terms of the migration model, stored as TOML.
//!
//! `tether calibrate` writes one (by default to [`DEFAULT_PATH`]); `tether plan`, `tether
//! migrate`'s pre-copy policy and the migration benchmark read it. Without one, the built-in
//! [`Profile::default`] holds terms measured on the machines tether is developed on (a 2-core VM,
//! two network namespaces as hosts), stated as such in its `source`.
//!
//! ```toml
//! source = "bench-migration calibration: 12 moves at 1000 Mbit/s ([16, 64, 192] MiB, 500 pages/s)"
//! scan_mib_s = 3239.7          # S: reading and hashing live memory
//! round_overhead_ms = 0.00     # eps: fixed cost of a pre-copy round
//! processing_factor = 1.1112   # rho: protocol and CPU cost on top of the link
//! frozen_fixed_ms = 116.55     # C: frozen phase of a minimal process
//! frozen_mib_s = 1111.4        # D: memory-proportional part of the frozen phase
//! setup_ms = 58.52             # T_setup: the rest of a migration
//! frozen_transfer_mib_s = 570.1  # F: the frozen path's processing of bytes sent while frozen
//! link_mbit = 1000.0           # the pair's link when calibrated
//! ```

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::HostCosts;

/// `K` of profiles that do not give it, ms per socket: `scripts/bench-sockets.sh` on the
/// development VM (release build, 2026-12-03), dump + restore from 109 to 1,009 sockets
/// (190 -> 307 ms). The cost per socket grows with the count (10,007 sockets: 2,996 ms, 0.29 ms
/// per socket by least squares over all three), so above a few thousand sockets this
/// underestimates.
pub const BUILTIN_PER_SOCKET_MS: f64 = 0.13;

/// Where `tether calibrate` writes the profile and the other commands look for it.
pub const DEFAULT_PATH: &str = "/etc/tether/profile.toml";

/// Largest profile file read.
const MAX_FILE_BYTES: u64 = 64 * 1024;

const MIB: f64 = 1_048_576.0;

/// Errors reading or writing a profile.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// The file could not be read or written.
    #[error("profile {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid profile.
    #[error("profile {path}: {why}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        why: String,
    },
}

/// The host-dependent terms of the model, in operator units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Where the terms come from (free text: a calibration's date and sample count, or
    /// "built-in").
    #[serde(default)]
    pub source: String,
    /// `S`: reading and hashing live memory, MiB/s.
    pub scan_mib_s: f64,
    /// `eps`: fixed cost of a pre-copy round, ms.
    pub round_overhead_ms: f64,
    /// `rho`: processing factor on each round's duration and the frozen transfer.
    pub processing_factor: f64,
    /// `C`: the frozen phase of a minimal process (dump and restore set-up, commit), ms.
    pub frozen_fixed_ms: f64,
    /// `D`: the memory-proportional part of the frozen phase, MiB/s.
    pub frozen_mib_s: f64,
    /// `F`: the frozen path's processing of the bytes sent while frozen, MiB/s (none: only the
    /// link counts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_transfer_mib_s: Option<f64>,
    /// `T_setup`: what a migration costs besides its rounds and downtime, ms.
    pub setup_ms: f64,
    /// `K`: the frozen phase's cost per socket of the tree, ms (absent: the built-in value;
    /// measured by `scripts/bench-sockets.sh`, not by `tether calibrate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen_per_socket_ms: Option<f64>,
    /// The link rate of the host pair the profile was calibrated on, Mbit/s: the bandwidth
    /// `tether plan` and `tether migrate`'s prediction assume when none is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_mbit: Option<f64>,
}

impl Default for Profile {
    /// Terms measured on the development machines: the migration benchmark's calibration at 1
    /// Gbit/s on 2026-12-03 (2-core VM, release build, network namespaces joined by a veth pair
    /// with a tbf rate limit, lazy restore; 12 synthetic migrations of 16, 64 and 192 MiB).
    fn default() -> Profile {
        Profile {
            source: "built-in: measured on a 2-core development VM, 2026-12-03 \
                     (scripts/bench-migration.sh calibration at 1 Gbit/s)"
                .to_string(),
            scan_mib_s: 3240.0,
            round_overhead_ms: 0.0,
            processing_factor: 1.11,
            frozen_fixed_ms: 117.0,
            frozen_mib_s: 1111.0,
            frozen_transfer_mib_s: Some(570.0),
            setup_ms: 59.0,
            frozen_per_socket_ms: Some(BUILTIN_PER_SOCKET_MS),
            link_mbit: None,
        }
    }
}

impl Profile {
    /// Checks every term's range.
    pub fn validate(&self) -> Result<(), String> {
        let positive = |name: &str, v: f64| {
            if v > 0.0 && v.is_finite() {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number, not {v}"))
            }
        };
        let non_negative = |name: &str, v: f64| {
            if v >= 0.0 && v.is_finite() && v <= 3_600_000.0 {
                Ok(())
            } else {
                Err(format!("{name} must be between 0 and 3600000 ms, not {v}"))
            }
        };
        positive("scan_mib_s", self.scan_mib_s)?;
        positive("frozen_mib_s", self.frozen_mib_s)?;
        positive("processing_factor", self.processing_factor)?;
        non_negative("round_overhead_ms", self.round_overhead_ms)?;
        non_negative("frozen_fixed_ms", self.frozen_fixed_ms)?;
        non_negative("setup_ms", self.setup_ms)?;
        if let Some(k) = self.frozen_per_socket_ms {
            non_negative("frozen_per_socket_ms", k)?;
        }
        if let Some(l) = self.link_mbit {
            positive("link_mbit", l)?;
        }
        if let Some(f) = self.frozen_transfer_mib_s {
            positive("frozen_transfer_mib_s", f)?;
        }
        Ok(())
    }

    /// The calibrated link's bandwidth, bytes/s.
    pub fn link_bandwidth(&self) -> Option<f64> {
        self.link_mbit.map(|m| m * 1e6 / 8.0)
    }

    /// The model's terms.
    pub fn costs(&self) -> HostCosts {
        HostCosts {
            scan_throughput: self.scan_mib_s * MIB,
            round_overhead: ms(self.round_overhead_ms),
            processing_factor: self.processing_factor,
            frozen_fixed: ms(self.frozen_fixed_ms),
            frozen_throughput: self.frozen_mib_s * MIB,
            frozen_transfer_throughput: self
                .frozen_transfer_mib_s
                .map_or(f64::INFINITY, |f| f * MIB),
            frozen_per_socket: ms(self.frozen_per_socket_ms.unwrap_or(BUILTIN_PER_SOCKET_MS)),
            setup: ms(self.setup_ms),
        }
    }

    /// Parses and checks a profile.
    pub fn from_toml(text: &str, path: &str) -> Result<Profile, ProfileError> {
        let invalid = |why: String| ProfileError::Invalid {
            path: path.to_string(),
            why,
        };
        let p: Profile = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        p.validate().map_err(invalid)?;
        Ok(p)
    }

    /// The profile as TOML, with a comment per term.
    pub fn to_toml(&self) -> String {
        format!(
            "# tether calibration profile (the host-dependent terms of the migration model)\n\
             source = {:?}\n\
             scan_mib_s = {:.1}          # S: reading and hashing live memory\n\
             round_overhead_ms = {:.2}   # eps: fixed cost of a pre-copy round\n\
             processing_factor = {:.4}   # rho: protocol and CPU cost on top of the link\n\
             frozen_fixed_ms = {:.2}     # C: frozen phase of a minimal process\n\
             frozen_mib_s = {:.1}        # D: memory-proportional part of the frozen phase\n\
             setup_ms = {:.2}            # T_setup: the rest of a migration\n{}{}{}",
            self.source,
            self.scan_mib_s,
            self.round_overhead_ms,
            self.processing_factor,
            self.frozen_fixed_ms,
            self.frozen_mib_s,
            self.setup_ms,
            self.frozen_transfer_mib_s
                .map(|f| format!(
                    "frozen_transfer_mib_s = {f:.1}  # F: the frozen path's processing of bytes sent while frozen\n"
                ))
                .unwrap_or_default(),
            self.link_mbit
                .map(|l| format!(
                    "link_mbit = {l:.1}           # the pair's link when calibrated\n"
                ))
                .unwrap_or_default(),
            self.frozen_per_socket_ms
                .map(|k| format!(
                    "frozen_per_socket_ms = {k:.4}  # K: frozen phase per socket of the tree\n"
                ))
                .unwrap_or_default()
        )
    }

    /// Reads a profile file.
    pub fn load(path: &Path) -> Result<Profile, ProfileError> {
        use std::io::Read;
        let name = path.display().to_string();
        let io = |source| ProfileError::Io {
            path: name.clone(),
            source,
        };
        let f = std::fs::File::open(path).map_err(io)?;
        let mut text = String::new();
        f.take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(ProfileError::Invalid {
                path: name,
                why: format!("larger than {MAX_FILE_BYTES} bytes"),
            });
        }
        Profile::from_toml(&text, &name)
    }

    /// The profile at `path` if given, else the one at [`DEFAULT_PATH`] if it exists, else the
    /// built-in one. A file that was named, or exists, but cannot be used is an error.
    pub fn resolve(path: Option<&Path>) -> Result<Profile, ProfileError> {
        match path {
            Some(p) => Profile::load(p),
            None if Path::new(DEFAULT_PATH).exists() => Profile::load(Path::new(DEFAULT_PATH)),
            None => Ok(Profile::default()),
        }
    }

    /// Writes the profile (creating its directory), replacing the file atomically.
    pub fn save(&self, path: &Path) -> Result<(), ProfileError> {
        let io = |source| ProfileError::Io {
            path: path.display().to_string(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.to_toml()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }
}

fn ms(v: f64) -> Duration {
    crate::model::secs(v / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_toml() {
        let p = Profile {
            source: "test \"quoted\"".into(),
            scan_mib_s: 1234.5,
            round_overhead_ms: 7.25,
            processing_factor: 1.0625,
            frozen_fixed_ms: 99.5,
            frozen_mib_s: 800.0,
            frozen_transfer_mib_s: Some(600.0),
            setup_ms: 50.0,
            link_mbit: Some(100.0),
            frozen_per_socket_ms: Some(0.125),
        };
        let back = Profile::from_toml(&p.to_toml(), "t").expect("valid");
        assert_eq!(back, p);
        let c = back.costs();
        assert_eq!(c.frozen_fixed, Duration::from_micros(99_500));
        assert_eq!(c.frozen_per_socket, Duration::from_micros(125));
        // A profile without K (older ones) takes the built-in value.
        let old = Profile {
            frozen_per_socket_ms: None,
            ..p
        };
        let back = Profile::from_toml(&old.to_toml(), "t").expect("valid");
        assert_eq!(back.frozen_per_socket_ms, None);
        assert_eq!(back.costs().frozen_per_socket, ms(BUILTIN_PER_SOCKET_MS));
        assert_eq!(c.scan_throughput, 1234.5 * MIB);
        assert!(Profile::default().validate().is_ok());
    }

    #[test]
    fn bad_profiles_say_what_is_wrong() {
        let good = Profile::default().to_toml();
        for (text, expect) in [
            (
                good.replace("scan_mib_s = ", "scan_mib_s = -"),
                "scan_mib_s",
            ),
            (good.replace("setup_ms = ", "setup_ms = 9e99 #"), "setup_ms"),
            (format!("{good}extra = 1\n"), "unknown field"),
            ("scan_mib_s = 1".to_string(), "missing field"),
            ("not toml".to_string(), "profile p"),
        ] {
            let e = Profile::from_toml(&text, "p").expect_err(&text).to_string();
            assert!(e.contains(expect), "{text}: {e}");
        }
        let zero = good.replace("processing_factor = ", "processing_factor = 0.0 #");
        let e = Profile::from_toml(&zero, "p")
            .expect_err("zero")
            .to_string();
        assert!(e.contains("processing_factor"), "{e}");
    }

    #[test]
    fn save_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub/profile.toml");
        let p = Profile::default();
        p.save(&path).expect("save");
        assert_eq!(Profile::load(&path).expect("load"), p);
        assert!(Profile::resolve(Some(&dir.path().join("missing"))).is_err());
        std::fs::write(&path, vec![b'#'; 70_000]).expect("write");
        let e = Profile::load(&path).expect_err("too large").to_string();
        assert!(e.contains("larger than"), "{e}");
    }
}
