//! The example workload: the wire protocol spoken between `examples/service.rs` and
//! `examples/client.rs`, and the service's self-verifying memory state.
//!
//! The service and client prove that a service survives live migration: the client runs closed
//! request/reply loops over TCP connections and QUIC streams across migrations and detects any
//! lost, duplicated, reordered or corrupted byte ([`proto`]), while the service keeps rewriting a
//! memory state whose integrity it can check on request ([`state`]).
//!
//! Everything here is pure (no I/O) and unit-tested; the examples add the sockets.

pub mod proto;
pub mod state;

pub use proto::{
    decode_reply, decode_request, echo_transform, encode_reply, encode_request, ClientConn, Kind,
    ProtocolError, Reply, ReplyMismatch, ReplyOutcome, Request, SequenceError, ServerConn, Status,
};
pub use state::{State, StateError};

/// QUIC ALPN protocol and certificate name of the example service.
pub const ALPN: &str = "tether-example";
