//! Support code of the `tether` package shared by the CLI, the examples, the integration tests and
//! the benchmarks: the network-namespace test bed and the example workload's wire protocol.

pub mod scenario;
pub mod soak;
pub mod testbed;
pub mod workload;
