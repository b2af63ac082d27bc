//! The migration protocol's vocabulary: what crosses the wire between the source (`tether
//! migrate`) and the destination agent, and the identifiers, limits, error codes and statistics
//! that both sides, their drivers and the reports share.
//!
//! This module is a leaf: no I/O, no clocks, and nothing of tether-migrator above it. The
//! protocol's behaviour (who sends what when, timeouts, the commit) lives in the two state
//! machines (`machine::source` and `machine::agent`); this module only says
//! what the words are and how they are framed.
//!
//! - [`frame`]: the framing of one migration stream (control, data and page-batch frames) and
//!   its bounds.
//! - [`message`]: the control messages, both directions.
//! - [`types`]: migration id, service address, page size.
//! - [`error`]: phases, sides and error codes (on the wire and in reports).
//! - [`stats`]: per-round and final-difference figures, CRIU's restore statistics.

pub mod error;
pub mod frame;
pub mod message;
pub mod stats;
pub mod types;

pub use error::{ErrorCode, Phase, Side, WireError};
pub use frame::{Frame, Kind, PageBatch};
pub use message::{Decision, FromAgent, Resolution, ToAgent, PROTOCOL};
pub use types::{ContainerSpec, MigrationId, ServiceAddr, PAGE};
