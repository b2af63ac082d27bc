//! The control messages of the migration protocol, both directions.
//!
//! Which message may come when is the business of the two state machines
//! (`machine::source`, `machine::agent` in this crate); the sequence in short:
//!
//! ```text
//! source                                   agent
//! Hello ─────────────────────────────────▶ Ready | Refused
//! pre-copy rounds: Layout, page batches,
//!   RoundEnd ────────────────────────────▶ RoundAck
//! Frozen (the tree is frozen) ───────────▶ (address added, blocked)
//! File + data*, FinalPages, page batches,
//!   ImagesDone ──────────────────────────▶ Restored (restored, stopped, unreachable) | Failed
//! Commit (the source copy is gone) ──────▶ Committed (the service runs there) | Failed
//! Abort: any time before Commit (usually as the QUIC close reason)
//!
//! on a new connection, for a migration in doubt:
//! Resolve { decision } ──────────────────▶ Resolved { Committed | Aborted | Pending }
//! ```

use serde::{Deserialize, Serialize};

use super::error::{ErrorCode, Phase};
use super::stats::CriuRestoreStats;
use super::types::{ContainerSpec, MigrationId, ServiceAddr};

/// Protocol version in `Hello` and `Resolve`. Version 2 restores the tree stopped and
/// unreachable until `Commit`, which the source sends only once its own copy is gone.
pub const PROTOCOL: u32 = 2;

/// Messages from the source to the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ToAgent {
    /// Opens a migration.
    Hello {
        /// Must be [`PROTOCOL`].
        protocol: u32,
        /// Identifies the migration in logs, reports and names on both hosts; never reused.
        migration_id: MigrationId,
        /// The address the service keeps across the move.
        service_addr: ServiceAddr,
        /// The container the migration moves, if it moves one (else a process tree).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        container: Option<ContainerSpec>,
    },
    /// Opens a connection about a migration whose outcome one side does not know (a process
    /// died, or the connection was lost, between the commit messages). Carries the source's
    /// decision; the agent applies it if it can and answers [`FromAgent::Resolved`] with what
    /// the migration's outcome is on its side.
    Resolve {
        /// Must be [`PROTOCOL`].
        protocol: u32,
        /// The migration.
        migration_id: MigrationId,
        /// What the source decided.
        decision: Decision,
    },
    /// Pre-copy: the address ranges of an owner's memory (its private mappings). Page batches
    /// for that owner are accepted only inside them; pages held outside them are dropped.
    Layout {
        /// The owner code.
        owner: u64,
        /// `[start, end)` ranges, page-aligned, disjoint.
        ranges: Vec<(u64, u64)>,
    },
    /// Pre-copy: a round's pages are all sent; the agent answers [`FromAgent::RoundAck`] once
    /// it has stored them (so the source measures delivered, not buffered, bandwidth).
    RoundEnd {
        /// Its number, from 0.
        round: u32,
    },
    /// The source tree is frozen and its connections locked.
    Frozen,
    /// Announces the next image file; exactly `size` bytes of data frames follow.
    File {
        /// Plain image file name.
        name: String,
        /// Its size.
        size: u64,
    },
    /// All image files (with the dump's page maps, without its page data) are sent; page
    /// batches of the final difference follow, for pages of the dump's page maps only.
    FinalPages,
    /// All image files and final pages are sent.
    ImagesDone {
        /// How many files were sent.
        files: u32,
        /// Their total size.
        bytes: u64,
        /// How many pages the final difference carried.
        final_pages: u64,
    },
    /// The source's copy is gone (CRIU ended the frozen tree): make the restored service
    /// reachable and let it run.
    Commit,
    /// Undo everything; the source keeps the service.
    Abort {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
}

impl ToAgent {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            ToAgent::Hello { .. } => "hello",
            ToAgent::Resolve { .. } => "resolve",
            ToAgent::Layout { .. } => "layout",
            ToAgent::RoundEnd { .. } => "round_end",
            ToAgent::Frozen => "frozen",
            ToAgent::File { .. } => "file",
            ToAgent::FinalPages => "final_pages",
            ToAgent::ImagesDone { .. } => "images_done",
            ToAgent::Commit => "commit",
            ToAgent::Abort { .. } => "abort",
        }
    }
}

/// The source's decision about a migration in doubt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Decision {
    /// The source's copy is gone: the destination's must run.
    Commit,
    /// The source's copy runs (or will run again): the destination's must go.
    Abort,
}

/// What a migration came to on the agent's side, in answer to [`ToAgent::Resolve`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum Resolution {
    /// The service runs here.
    Committed {
        /// Its root's pid here.
        pid: i32,
    },
    /// Nothing of the migration is left here (undone, or never restored).
    Aborted {
        /// Why.
        reason: String,
    },
    /// The migration is still being restored here; ask again shortly.
    Pending,
}

/// Messages from the agent to the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum FromAgent {
    /// The agent accepts the migration.
    Ready {
        /// The interface the service address will live on.
        interface: String,
    },
    /// The agent refuses the migration; nothing was changed.
    Refused {
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// A pre-copy round is stored.
    RoundAck {
        /// The round.
        round: u32,
        /// Pages the agent holds now.
        pages_held: u64,
    },
    /// The service is restored on the destination, stopped and unreachable (its address blocked)
    /// until [`ToAgent::Commit`].
    Restored {
        /// Its root's pid there.
        pid: i32,
        /// Milliseconds from `ImagesDone` to the restored tree (preparation + CRIU restore).
        restore_ms: f64,
        /// Milliseconds of the CRIU restore request alone.
        criu_restore_ms: f64,
        /// CRIU's restore statistics, if it wrote them.
        stats: Option<CriuRestoreStats>,
        /// The most memory the migration held on the destination before the restore (page
        /// store, image files, rebuilt pages files), bytes; absent from older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        held_bytes: Option<u64>,
    },
    /// The destination failed and has undone its part.
    Failed {
        /// The phase that failed.
        phase: Phase,
        /// Why, as a code.
        code: ErrorCode,
        /// Why, in words.
        reason: String,
    },
    /// The service runs on the destination and is reachable.
    Committed {
        /// Milliseconds from `Commit` to the running, reachable service.
        go_live_ms: f64,
    },
    /// The answer to [`ToAgent::Resolve`].
    Resolved {
        /// The migration's outcome on the agent's side.
        resolution: Resolution,
    },
}

impl FromAgent {
    /// The message's name, for errors and logs.
    pub fn name(&self) -> &'static str {
        match self {
            FromAgent::Ready { .. } => "ready",
            FromAgent::Refused { .. } => "refused",
            FromAgent::RoundAck { .. } => "round_ack",
            FromAgent::Restored { .. } => "restored",
            FromAgent::Failed { .. } => "failed",
            FromAgent::Committed { .. } => "committed",
            FromAgent::Resolved { .. } => "resolved",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::{decode, encode, parse_header, Kind, HEADER};

    fn round_trip<T>(m: &T) -> T
    where
        T: Serialize + for<'a> Deserialize<'a>,
    {
        let frame = encode(m);
        let (kind, len) =
            parse_header(frame[..HEADER].try_into().expect("5 bytes")).expect("header");
        assert_eq!(kind, Kind::Control);
        assert_eq!(len, frame.len() - HEADER);
        decode(&frame[HEADER..]).expect("decode")
    }

    #[test]
    fn messages_round_trip() {
        for m in [
            ToAgent::Hello {
                protocol: PROTOCOL,
                migration_id: MigrationId::random(),
                service_addr: "10.77.0.100/24".parse().expect("addr"),
                container: None,
            },
            ToAgent::Hello {
                protocol: PROTOCOL,
                migration_id: MigrationId::random(),
                service_addr: "10.77.0.100/24".parse().expect("addr"),
                container: Some(ContainerSpec {
                    name: "svc".into(),
                    create_args: vec!["--name".into(), "svc".into(), "localhost/svc:1".into()],
                    bind_sources: vec!["/srv/data".into()],
                    volumes: vec!["cache".into()],
                    mac: Some("02:77:00:00:00:64".into()),
                }),
            },
            ToAgent::Resolve {
                protocol: PROTOCOL,
                migration_id: "m1".parse().expect("id"),
                decision: Decision::Commit,
            },
            ToAgent::Abort {
                code: ErrorCode::Timeout,
                reason: "frozen too long".into(),
            },
            ToAgent::Commit,
        ] {
            assert_eq!(round_trip(&m), m);
        }
        for m in [
            FromAgent::Failed {
                phase: Phase::Restore,
                code: ErrorCode::Checkpoint,
                reason: "criu restore failed".into(),
            },
            FromAgent::Resolved {
                resolution: Resolution::Committed { pid: 42 },
            },
            FromAgent::Resolved {
                resolution: Resolution::Pending,
            },
            FromAgent::Committed { go_live_ms: 1.5 },
        ] {
            assert_eq!(round_trip(&m), m);
        }
    }

    #[test]
    fn hostile_messages_are_rejected() {
        for bad in [
            &br#"{"type":"hello","protocol":2,"migration_id":"../x","service_addr":"10.0.0.1/24"}"#
                [..],
            br#"{"type":"hello","protocol":2,"migration_id":"m1","service_addr":"10.0.0.1"}"#,
            br#"{"type":"file","name":"a","size":-1}"#,
            br#"{"type":"nope"}"#,
            br#"{"type":"resolve","protocol":2,"migration_id":"m1","decision":"maybe"}"#,
            b"\xff\xfe",
        ] {
            assert!(
                decode::<ToAgent>(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn unknown_fields_are_refused_where_serde_can_tell() {
        // Struct variants refuse unknown fields; serde ignores them on unit variants of an
        // internally tagged enum (`commit`, `frozen`, `final_pages`), which is harmless: the
        // message means the same.
        assert!(decode::<ToAgent>(br#"{"type":"round_end","round":1,"x":2}"#).is_err());
        assert_eq!(
            decode::<ToAgent>(br#"{"type":"commit","extra":1}"#),
            Ok(ToAgent::Commit)
        );
    }
}
