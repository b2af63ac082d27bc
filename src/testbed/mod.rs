//! Network namespaces as hosts: the test bed used by the integration tests, the demo and the
//! benchmarks.
//!
//! A [`Topology`] is a small, isolated network on one machine. Every host is a network namespace
//! (created with `ip netns add`, so `/run/netns/NAME` exists and CRIU, `nsenter` and `ip -n` can
//! use it). Nothing in it is reachable from the machine's own namespace and no traffic leaves the
//! machine, so every topology reuses the same addresses:
//!
//! ```text
//!                          namespace "lan" (bridge br0, no address)
//!        +-------------------+-----------------+-----------------+-------------------+
//!        | v-client          | v-src           | v-dst           | v-proxy (optional)|
//!        |                   |                 |                 |                   |
//!   eth0 10.77.0.1      eth0 10.77.0.2    eth0 10.77.0.3    eth0 10.77.0.4
//!   +----------+        +----------+      +----------+      +----------+
//!   |  client  |        |   src    |      |   dst    |      |  proxy   |
//!   +----------+        +----------+      +----------+      +----------+
//!                       mig0 10.78.0.2    mig0 10.78.0.3
//!                            |                 |
//!                            +-----------------+
//!                       "migration link": a direct veth pair, optionally
//!                        rate-limited with tbf on both ends
//!
//!   free service address for the topology: 10.77.0.100/24 (configured nowhere at start)
//! ```
//!
//! - Namespace names are `<prefix><suffix>` where the prefix is `tt<pid>x<counter>` (the pid of
//!   the creating process in decimal, a per-process counter in base 36) and the suffix is `cli`,
//!   `src`, `dst`, `prx` or `lan`, e.g. `tt4242x1src`. Names stay within 15 characters and are
//!   unique across the threads and processes of one machine, so tests can run in parallel.
//! - Interface names never contain the prefix: every interface is created directly inside a
//!   namespace of its own topology (`eth0`, `mig0` in hosts; `br0`, `v-<host>` in `lan`).
//! - `lo` is up in every namespace.
//! - Dropping a [`Topology`] kills every process whose network namespace (of any of its threads)
//!   is one of the topology's, deletes the namespaces (which removes the veths and the bridge) and
//!   removes its work directory. This also happens when a test panics, and when `build()` fails
//!   half-way. A process that died without dropping its topologies (SIGKILL, abort) leaves them
//!   behind; the next process that creates a topology removes namespaces whose creating process is
//!   gone (see [`remove_stale_topologies`]).
//!
//! Running programs in hosts:
//!
//! - [`Topology::command`] gives a [`std::process::Command`] running a program inside a host's
//!   network namespace with `nsenter --net=/run/netns/NAME` (never `ip netns exec`, whose mount
//!   namespace CRIU refuses to dump).
//! - [`Topology::spawn_service`] starts a migratable service: in the host's network namespace and
//!   in its own PID namespace (`unshare --pid --fork`), guarded by a [`ServiceProcess`].
//! - [`Topology::spawn`] starts an ordinary process (an agent, a load client), guarded by a
//!   [`HostProcess`].
//! - Both first call [`set_cloexec_on_inherited_fds`], so that the child inherits only stdin,
//!   stdout and stderr (CRIU cannot dump a descriptor shared with a process outside the tree).
//! - [`Topology::in_host`], [`Topology::connect_in`], [`Topology::listen_in`] and
//!   [`Topology::wait_for_tcp`] run code of the current process inside a host's namespace, on a
//!   dedicated thread that calls `setns(2)` (a network namespace switch affects only the calling
//!   thread; sockets keep the namespace they were created in).
//!
//! The process that uses the test bed should be a child subreaper ([`become_subreaper`]): services
//! restored by CRIU and the children of dead launchers are then re-parented to it instead of to
//! PID 1 (which reaps orphans only after about 2 s on our machines). Processes a topology kills
//! are reaped by the topology; orphans that exit on their own stay zombies until the process
//! waits for them or exits (harmless in tests; a long-running program should reap them).
//!
//! [`require_prerequisites`] / [`prerequisites_or_fail`] check that the machine can run all this
//! (root, `ip`, `tc`, `nsenter`, `unshare`, `nft`, network namespaces, a working CRIU >= 4.2).

mod names;
mod netns;
mod podman;
mod prereq;
mod process;
mod topology;

#[cfg(test)]
mod tests;

use std::fmt;
use std::net::Ipv4Addr;

pub use names::remove_stale_topologies;
pub use netns::in_netns;
pub use podman::{podman_available, PODMAN_NETWORK, SERVICE_IMAGE};
pub use prereq::{criu_path, prerequisites_or_fail, require_prerequisites};
pub use process::{set_cloexec_on_inherited_fds, HostProcess, ServiceProcess};
pub use topology::{tbf_burst_bytes, Topology, TopologyBuilder};

/// The LAN subnet joining all hosts through the bridge in the `lan` namespace.
pub const LAN_SUBNET: &str = "10.77.0.0/24";
/// Prefix length of [`LAN_SUBNET`] and of the service address.
pub const LAN_PREFIX_LEN: u8 = 24;
/// The subnet of the direct migration link between `src` and `dst`.
pub const MIGRATION_SUBNET: &str = "10.78.0.0/24";
/// Prefix length of [`MIGRATION_SUBNET`].
pub const MIGRATION_PREFIX_LEN: u8 = 24;
/// The topology's free service address, configured nowhere when a topology is built.
pub const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// [`SERVICE_IP`] with its prefix length, as `ip addr add` takes it.
pub const SERVICE_CIDR: &str = "10.77.0.100/24";
/// Name of every host's LAN interface.
pub const LAN_IFNAME: &str = "eth0";
/// Name of the migration-link interface in `src` and `dst`.
pub const MIGRATION_IFNAME: &str = "mig0";
/// Name of the bridge inside the `lan` namespace.
pub const BRIDGE_NAME: &str = "br0";

/// A host of a [`Topology`]; each host is a network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Host {
    /// Where load clients run. LAN address 10.77.0.1.
    Client,
    /// The migration source. LAN address 10.77.0.2, migration link 10.78.0.2.
    Src,
    /// The migration destination. LAN address 10.77.0.3, migration link 10.78.0.3.
    Dst,
    /// The proxy host; only present when the topology was built with
    /// [`TopologyBuilder::with_proxy`]. LAN address 10.77.0.4.
    Proxy,
}

impl Host {
    /// All hosts, in the order of their LAN addresses.
    pub const ALL: [Host; 4] = [Host::Client, Host::Src, Host::Dst, Host::Proxy];

    /// The host's role name: `client`, `src`, `dst` or `proxy`.
    pub fn name(self) -> &'static str {
        match self {
            Host::Client => "client",
            Host::Src => "src",
            Host::Dst => "dst",
            Host::Proxy => "proxy",
        }
    }

    /// The three-letter suffix of the host's namespace name.
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Host::Client => "cli",
            Host::Src => "src",
            Host::Dst => "dst",
            Host::Proxy => "prx",
        }
    }

    /// The host's address on the LAN (on its [`LAN_IFNAME`] interface).
    pub fn lan_addr(self) -> Ipv4Addr {
        match self {
            Host::Client => Ipv4Addr::new(10, 77, 0, 1),
            Host::Src => Ipv4Addr::new(10, 77, 0, 2),
            Host::Dst => Ipv4Addr::new(10, 77, 0, 3),
            Host::Proxy => Ipv4Addr::new(10, 77, 0, 4),
        }
    }

    /// The host's address on the migration link ([`MIGRATION_IFNAME`]), for `src` and `dst`
    /// only.
    pub fn migration_addr(self) -> Option<Ipv4Addr> {
        match self {
            Host::Src => Some(Ipv4Addr::new(10, 78, 0, 2)),
            Host::Dst => Some(Ipv4Addr::new(10, 78, 0, 3)),
            Host::Client | Host::Proxy => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Makes the calling process a child subreaper (`PR_SET_CHILD_SUBREAPER`): orphaned descendants
/// (services whose launcher died, trees restored by `criu restore --restore-detached`) are
/// re-parented to this process instead of to PID 1.
///
/// The process should then reap such children; topologies reap the processes they kill, but no
/// background reaper is started here (one would steal exit statuses from `std::process::Child`
/// handles).
pub fn become_subreaper() -> anyhow::Result<()> {
    nix::sys::prctl::set_child_subreaper(true)
        .map_err(|e| anyhow::anyhow!("prctl(PR_SET_CHILD_SUBREAPER): {e}"))
}

/// Logs a problem found during cleanup: through `tracing` when a subscriber is installed, on
/// stderr otherwise (tests usually have none, and a leaked namespace must not go unnoticed).
pub(crate) fn report_problem(msg: &str) {
    if tracing::dispatcher::has_been_set() {
        tracing::warn!("{msg}");
    } else {
        eprintln!("tether testbed: {msg}");
    }
}
