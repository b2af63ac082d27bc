//! tether-migrator: live migration of a running process tree between hosts with CRIU.
//!
//! - [`criu`]: CRIU driven through its RPC (`criu swrk`), holding a dump at post-dump.
//! - [`hostnet`]: the service address, destination-side blocking and lock tables on a host.
//! - [`tls`]: the development CA, host certificates and mutual-TLS configurations.
//! - [`wire`]: the migration protocol between source and destination (pure, bounded).
//! - [`transport`]: QUIC endpoints and the framed stream.
//! - [`agent`]: the destination side.
//! - [`migrate`]: the source side; the whole migration sequence, in one place.
//! - [`report`]: the machine-readable report of a migration.

pub mod agent;
pub mod criu;
pub mod hostnet;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod pagestore;
pub mod policy;
pub mod precopy;
pub mod procmem;
pub mod progress;
pub mod report;
mod sys;
pub mod throttle;
pub mod tls;
pub mod transport;
pub mod wire;
