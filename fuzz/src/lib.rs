//! The parts of tether the fuzz targets exercise.
//!
//! tether-migrator's migration protocol, page store and CRIU image code are leaves of that crate
//! (they use nothing of it but each other), so they are compiled here from its own source files
//! rather than through the crate, which pulls in QUIC, TLS and netlink: instrumented for the
//! fuzzer, those would make every CI build of the targets take many minutes. A module that
//! starts to use more of the crate breaks this build, which CI runs: add the module here too.
//!
//! tether-proxy is light and is used as a dependency.

#[path = "../../migrator/src/protocol/mod.rs"]
pub mod protocol;

#[path = "../../migrator/src/pagestore.rs"]
pub mod pagestore;

pub mod criu;
