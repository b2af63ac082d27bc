//! tether-proxy: a server-side L4 proxy for TCP and UDP/QUIC flows that can pause a service's
//! flows, redirect them to the service's new location and resume them, so that clients never
//! reconnect across a live migration.
//!
//! - [`config`]: services (listen addresses, backend) and limits, from TOML.
//! - [`state`]: the pure state machine of a service's flows (active, pausing, paused,
//!   redirecting, resuming), time passed in.
//! - [`hold`]: the pure, bounded queue of UDP datagrams held during a pause.
//! - [`Proxy`] / [`ProxyHandle`]: the running proxy (TCP relay with an own copy loop, UDP relay
//!   with a flow table) and its operations in-process.
//! - [`control`]: the control API on a Unix socket (newline-delimited JSON) and its
//!   [`Client`](control::Client), which the migrator uses. Its server serves the control
//!   commands through an interface defined in `api`, which [`ProxyHandle`] implements.
//! - [`api`]: the results and errors of control commands.
//! - [`metrics`]: counters and the Prometheus text endpoint.
//!
//! Inside, each module uses only modules listed before it: `state`, `metrics`, `sys` (the only
//! `unsafe`), `util`; `hold`; `config`; `api`; `control`; `answer` (when the service first answered after a
//! resume); `flowctx` (what a service shares with its TCP flows: limits, counters, the gate on
//! client data, the backend for new flows); `tcp`
//! (the TCP data path and the table of a service's open flows); `udp` (one actor per listen
//! address); `service` (one service: its state and the pause, redirect and resume sequences);
//! `server` ([`Proxy`], [`ProxyHandle`]).
//!
//! A migration drives it like this:
//!
//! 1. `pause`: client-to-service data stops (TCP: the proxy stops reading, the kernel's flow
//!    control holds the rest; UDP: datagrams are held in a bounded queue); service-to-client data
//!    keeps flowing. The reply comes once every upstream socket's send queue is empty
//!    (`SIOCOUTQ` 0: nothing unsent or unacknowledged, so the network lock drops nothing of
//!    ours), or at the deadline with the flows that were not quiet, the pause then undone.
//! 2. `redirect`: new connections and UDP flows go to the new backend; existing TCP
//!    connections keep their upstream sockets (the service keeps its address).
//! 3. `resume`: held data is released at once, in order.
//! 4. `answered` (optional): when the service first sent data toward a client after the resume,
//!    per transport: the end of the downtime as the clients see it.
//!
//! A pause never resumed ends by itself after the service's `max_hold_ms`, toward the backend
//! it had before the pause.

mod answer;
pub mod api;
pub mod config;
pub mod control;
mod flowctx;
pub mod hold;
pub mod metrics;
mod server;
mod service;
pub mod state;
mod sys;
mod tcp;
mod udp;
mod util;

pub use config::{Config, FlowLimit, Limits, ServiceConfig};
pub use server::{Proxy, ProxyError, ProxyHandle};
pub use state::Phase;
