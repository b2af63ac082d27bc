//! Phases, sides and error codes: how a failure is named on the wire, in logs and in reports.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A phase of a migration, in the order a migration passes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Local checks before anything changes (pid, certificates, CRIU, proxy, address).
    Check,
    /// Connecting to the agent (QUIC, mutual TLS).
    Connect,
    /// `Hello` and the agent's answer.
    Handshake,
    /// Pre-copy rounds while the service runs.
    PreCopy,
    /// The proxy's pause of the service's flows.
    Pause,
    /// CRIU's freeze and dump.
    Dump,
    /// The proxy's redirect toward the new location.
    Redirect,
    /// Image files and the final difference, while the service is frozen.
    Transfer,
    /// Rebuilding CRIU's page files on the destination.
    Rebuild,
    /// CRIU's restore on the destination (the tree left stopped and unreachable).
    Restore,
    /// The commit: the source ends its copy, the destination's goes live.
    Commit,
    /// The proxy's resume toward the restored service.
    Resume,
    /// Resolving a migration left in doubt by a crash or a lost connection.
    Resolve,
    /// Undoing a migration that failed before its commit.
    Rollback,
    /// Removing what the migration left behind (addresses, tables, images).
    Cleanup,
}

impl Phase {
    /// The phase's name as written in reports and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Check => "check",
            Phase::Connect => "connect",
            Phase::Handshake => "handshake",
            Phase::PreCopy => "pre-copy",
            Phase::Pause => "pause",
            Phase::Dump => "dump",
            Phase::Redirect => "redirect",
            Phase::Transfer => "transfer",
            Phase::Rebuild => "rebuild",
            Phase::Restore => "restore",
            Phase::Commit => "commit",
            Phase::Resume => "resume",
            Phase::Resolve => "resolve",
            Phase::Rollback => "rollback",
            Phase::Cleanup => "cleanup",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Where a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Side {
    /// The source host (`tether migrate`, its CRIU, its host network).
    Source,
    /// The destination host (the agent, its CRIU, its host network).
    Destination,
    /// The connection between them.
    Network,
    /// The tether-proxy in front of the service.
    Proxy,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
            Side::Network => "network",
            Side::Proxy => "proxy",
        })
    }
}

/// What kind of failure, as a peer reports it on the wire. Codes a newer peer sends that this
/// build does not know arrive as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peer broke the protocol (a message out of sequence, a malformed frame).
    Protocol,
    /// A bound was exceeded (image size, file count, page count).
    Limit,
    /// The migration is not accepted (protocol version, policy, reused id).
    Refused,
    /// A migration of that service address is already in progress.
    Busy,
    /// The service address is configured on the destination already.
    AddressInUse,
    /// No interface on the destination can carry the service address.
    NoInterface,
    /// CRIU (or the container runtime) failed.
    Checkpoint,
    /// Changing the host's network failed (address, nftables, announcement).
    HostNetwork,
    /// Writing or reading the image set failed.
    Storage,
    /// The proxy in front of the service failed.
    Proxy,
    /// A deadline passed.
    Timeout,
    /// The user cancelled the migration.
    Cancelled,
    /// The other side aborted the migration.
    Aborted,
    /// The connection failed.
    Transport,
    /// A bug or an unexpected state.
    Internal,
    /// A code this build does not know.
    #[serde(other)]
    Unknown,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_else(|| format!("{self:?}"));
        f.write_str(&s)
    }
}

/// A protocol violation found while decoding or sequencing frames. Any of them aborts the
/// migration it happened in (rolled back) and nothing else.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WireError {
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// Frame larger than its kind allows.
    #[error("{kind} frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// The frame kind's name.
        kind: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A control message that does not parse.
    #[error("malformed control message: {0}")]
    BadMessage(String),
    /// A message or frame that is not allowed in the current state.
    #[error("unexpected {got} (expected {})", expected.join(" or "))]
    Unexpected {
        /// What may come now.
        expected: &'static [&'static str],
        /// What came.
        got: &'static str,
    },
    /// A file name that is not a plain image name.
    #[error("refusing image file name {0:?}")]
    BadFileName(String),
    /// A page batch that does not decode.
    #[error("page batch: {0}")]
    BadPages(String),
    /// File contents that do not match their announced size, or limits exceeded.
    #[error("{0}")]
    BadSize(String),
}

impl WireError {
    /// The code a peer is told.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::TooLarge { .. } | WireError::BadSize(_) => ErrorCode::Limit,
            _ => ErrorCode::Protocol,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_codes_from_newer_peers_parse() {
        let c: ErrorCode = serde_json::from_str("\"quantum_flux\"").expect("parses");
        assert_eq!(c, ErrorCode::Unknown);
        let c: ErrorCode = serde_json::from_str("\"address_in_use\"").expect("parses");
        assert_eq!(c, ErrorCode::AddressInUse);
        assert_eq!(ErrorCode::AddressInUse.to_string(), "address_in_use");
    }

    #[test]
    fn unexpected_says_what_was_expected_and_what_came() {
        let e = WireError::Unexpected {
            expected: &["commit", "abort"],
            got: "frozen",
        };
        assert_eq!(
            e.to_string(),
            "unexpected frozen (expected commit or abort)"
        );
        assert_eq!(Phase::PreCopy.to_string(), "pre-copy");
    }
}
