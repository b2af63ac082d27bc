//! The pre-copy settings `tether migrate` and `tether plan` share, so that a plan is made with
//! exactly the flags the migration would run with.

use std::time::Duration;

use tether_migrator::driver::source::PrecopyOptions;

use super::units::parse_duration;

/// Pre-copy settings.
#[derive(Debug, clap::Args)]
pub struct PrecopyArgs {
    /// Send all memory while frozen (no pre-copy rounds).
    #[arg(long)]
    pub stop_and_copy: bool,
    /// Pre-copy until the predicted downtime is at most this (e.g. 300ms, 1s).
    #[arg(long, value_parser = parse_duration, default_value = "300ms")]
    pub downtime_limit: Duration,
    /// Most pre-copy rounds (round 0, the full copy, included).
    #[arg(long, default_value_t = 10)]
    pub max_rounds: u32,
    /// Throttle the service's CPU (cgroup quota, stepped up each round) when it dirties memory
    /// faster than the link carries it; released before the final dump.
    #[arg(long)]
    pub auto_converge: bool,
    /// Auto-converge: the first CPU cut, percent of the service's CPU use.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_initial: u8,
    /// Auto-converge: added to the cut at each further round, percent.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u8).range(1..=99))]
    pub throttle_increment: u8,
}

impl PrecopyArgs {
    /// The pre-copy settings, whether or not --stop-and-copy was given.
    pub fn precopy(&self) -> PrecopyOptions {
        PrecopyOptions {
            downtime_limit: self.downtime_limit,
            max_rounds: self.max_rounds,
            auto_converge: self.auto_converge,
            throttle_steps: (self.throttle_initial, self.throttle_increment),
        }
    }

    /// What the migration runs: `None` for stop-and-copy.
    pub fn options(&self) -> Option<PrecopyOptions> {
        (!self.stop_and_copy).then(|| self.precopy())
    }
}
