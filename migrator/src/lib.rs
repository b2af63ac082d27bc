//! tether-migrator: live migration of a running process tree between hosts with CRIU.
//!
//! Layers, each depending only on those above it in this list:
//!
//! - [`protocol`]: the words of the migration protocol (messages, frames, ids, error codes,
//!   statistics). Pure, a leaf.
//! - [`model`], [`profile`], [`policy`], [`plan`], [`report`], [`calibrate`], [`authz`]: the
//!   migration model and its calibrated host terms, the pre-copy convergence policy (which asks
//!   the model), predictions through that policy, the JSON report, fitting a profile to
//!   reports, and who may migrate what to an agent. Pure.
//! - [`machine`]: the protocol's two sides as state machines without I/O
//!   ([`machine::source`], [`machine::agent`]), and the commit protocol's invariants.
//! - [`ports`]: the traits the drivers carry the machines' actions out through (checkpoint,
//!   host network, proxy, journal), and their fakes.
//! - The real adapters and tools: [`criu`] (CRIU over its RPC; [`criu::tree`] is the
//!   checkpointer of a process tree), [`hostnet`] (the service address, blocks, ARP),
//!   [`gate`] (tether-proxy), [`journal`] (records on disk), [`procmem`], [`pagestore`],
//!   [`precopy`], [`throttle`], [`tls`], [`transport`], [`dirs`], [`peaks`] (a process's peak
//!   memory and its children's).
//! - [`driver`]: the async drivers that run the machines against those: `tether migrate` and
//!   `tether agent`.
//! - [`metrics`], [`progress`]: the agent's Prometheus metrics, progress lines.

pub mod authz;
pub mod calibrate;
pub mod container;
pub mod criu;
pub mod dirs;
pub mod driver;
pub mod gate;
pub mod hostnet;
pub mod journal;
pub mod machine;
pub mod metrics;
pub mod model;
pub mod pagestore;
pub mod peaks;
pub mod plan;
pub mod policy;
pub mod ports;
pub mod precopy;
pub mod procmem;
pub mod profile;
pub mod progress;
pub mod protocol;
pub mod report;
mod sys;
pub mod throttle;
pub mod tls;
pub mod transport;
