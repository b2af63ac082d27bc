//! The migration protocol as two state machines without I/O: [`source::SourceMachine`] (what
//! `tether migrate` does) and [`agent::AgentMachine`] (what `tether agent` does per migration).
//!
//! Each machine is driven like quinn-proto's `Connection`: the driver feeds it events (a message
//! arrived, CRIU reached a point, a port finished its work, time passed) with the current time,
//! and takes actions out of it (send this, dump that, lift this block), which it performs and
//! whose results it feeds back as events. A machine holds no sockets, processes or clocks, so the
//! whole protocol, every path and every single fault at every step, runs in memory in tests
//! (`migrator/tests/protocol_faults.rs` over the simulated pair in `migrator/tests/sim/`), the
//! same code the real drivers run.
//!
//! # The commit protocol
//!
//! Invariants, for any single fault (a tether process killed or restarted, the link cut or
//! stalled, a message lost or duplicated, a port failing) at any step:
//!
//! 1. **Never two live copies.** The destination's copy becomes reachable and runs only after
//!    `Commit`, and the source sends `Commit` only after CRIU has ended the source's frozen copy
//!    (whose connections stay locked by the source's nftables lock until then). A source copy that
//!    comes back (CRIU thaws it when `tether migrate` dies before the commit point) therefore
//!    never meets a destination copy that ran.
//! 2. **Never zero copies without a way back.** Until the destination confirms that its copy
//!    runs, the source holds either its frozen copy or, after the commit point, its complete
//!    image set (CRIU's dump in its work directory), from which it restores the service on the
//!    source if the destination fails to run its copy.
//! 3. **Clients see a stall, nothing else.** The proxy resumes only toward a copy that runs and
//!    stays the serving copy: after `Committed`, or after a rollback has thawed the source.
//!    Bytes are held, never sent to a copy that is later discarded.
//! 4. **An in-doubt migration resolves the same way whoever restarts first.** The source decides
//!    from a fact it can always observe after a crash: whether its own copy still exists (CRIU
//!    thaws it if the source died before the commit point, ends it after). The agent never
//!    decides alone while its copy may be the only one: it keeps it stopped and unreachable and
//!    waits for the source's `Resolve`, and only after a long in-doubt timeout undoes it (the
//!    source still holds its image set then).

pub mod agent;
pub mod source;

use std::sync::Arc;

use crate::protocol::{ErrorCode, Phase, Side};

/// A failure reported by a port (CRIU, host network, proxy, journal) or by the transport.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PortError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
    /// The underlying error, if any.
    #[source]
    pub source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

impl PortError {
    /// A failure without an underlying error.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> PortError {
        PortError {
            code,
            message: message.into(),
            source: None,
        }
    }

    /// A failure caused by `e`, described as `what: e`.
    pub fn caused<E>(code: ErrorCode, what: &str, e: E) -> PortError
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        PortError {
            code,
            message: format!("{what}: {e}"),
            source: Some(Arc::new(e)),
        }
    }
}

impl PartialEq for PortError {
    fn eq(&self, other: &Self) -> bool {
        self.code == other.code && self.message == other.message
    }
}

/// Why a migration did not commit: where, in which phase, what kind of failure, and its cause.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{phase} failed on the {side} side: {message}")]
pub struct Failure {
    /// Where it failed.
    pub side: Side,
    /// In which phase.
    pub phase: Phase,
    /// What kind of failure.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
    /// The port error behind it, if any.
    #[source]
    pub cause: Option<PortError>,
}

impl Failure {
    /// A failure with a message and no port error behind it.
    pub fn new(side: Side, phase: Phase, code: ErrorCode, message: impl Into<String>) -> Failure {
        Failure {
            side,
            phase,
            code,
            message: message.into(),
            cause: None,
        }
    }

    /// Prefixes the message with `what`.
    pub fn context(mut self, what: impl std::fmt::Display) -> Failure {
        self.message = format!("{what}: {}", self.message);
        self
    }

    /// A failure of a port on `side` in `phase`.
    pub fn port(side: Side, phase: Phase, e: PortError) -> Failure {
        Failure {
            side,
            phase,
            code: e.code,
            message: e.message.clone(),
            cause: Some(e),
        }
    }
}

/// A connection that ended: why, and whether the peer closed it on purpose (an abort with a
/// reason) rather than being lost.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionEnd {
    /// What the transport said, or the peer's reason.
    pub reason: String,
    /// The peer closed the connection on purpose, saying why: a definite abort.
    pub by_peer: bool,
}
