//! The drivers: async code that runs the protocol machines ([`crate::machine`]) against the
//! ports ([`crate::ports`]): QUIC connections, CRIU, the host's network, the proxy, the journal.
//! They carry out actions and report results; every decision is the machines'.
//!
//! - [`source`]: `tether migrate` (and `--recover`).
//! - [`agent`]: `tether agent`, one task per migration.
//! - [`receive`]: the agent's data plane of one migration (pages, image files, rebuild).
//! - [`hold`]: a pause at a named state, for tests that inject faults at exact steps.

pub mod agent;
pub mod hold;
pub mod receive;
pub mod source;

use crate::machine::ConnectionEnd;
use crate::transport::TransportError;

/// Locks `m`, taking the data of a poisoned mutex as it is: the drivers' mutexes guard plain
/// records and tables whose every update is one assignment, never left half done by a panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the end of a migration stream means for a machine: `err` is how reading it failed
/// (`None`: the peer finished the stream), `peer` names the peer in the reason.
pub(crate) fn connection_end(peer: &str, err: Option<TransportError>) -> ConnectionEnd {
    match err {
        None => ConnectionEnd {
            reason: format!("the {peer} closed the stream"),
            by_peer: false,
        },
        Some(TransportError::PeerAborted(why)) => ConnectionEnd {
            reason: format!("the {peer} aborted: {why}"),
            by_peer: true,
        },
        // A frame that breaks the bounds: the peer aborts the migration, in effect.
        Some(TransportError::Protocol(e)) => ConnectionEnd {
            reason: format!("the {peer} broke the protocol: {e}"),
            by_peer: true,
        },
        Some(e) => ConnectionEnd {
            reason: e.to_string(),
            by_peer: false,
        },
    }
}

/// Sleeps until a machine's `poll_timeout` (forever for `None`): the timer arm of a driver's
/// `select!`, after which the driver feeds the machine a tick.
pub(crate) async fn until(deadline: Option<std::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
