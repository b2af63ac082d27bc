//! The network side of moving a service between hosts, as run on one host: the service address,
//! the destination's block, CRIU's lock tables, and the gratuitous ARP that moves the address on
//! the LAN.
//!
//! The service keeps its address across the move (CRIU restores TCP sockets with their original
//! addresses). The destination blocks the address, then adds it, when the source is frozen: a
//! pair of tables, `inet` and `arp`, under a name of the agent's, drops its traffic both ways
//! and ARP for it, so that this host holds the address without answering for it (an early packet
//! would be answered with a reset; an ARP answer would pull the LAN's packets here while the
//! service may still come back on the source). The restored tree stays stopped behind that block
//! until the commit; then the block is deleted (both tables, one transaction) and the address
//! announced with a gratuitous ARP (see `driver::agent`).
//!
//! The ARP half must go with the IP half: while it stands, this host cannot resolve its peers
//! (their replies are addressed to the service address), and a failed resolution is retried a
//! second later, which stalls every flow by a second.
//!
//! Nothing here runs a tool. [`HostNet`] talks netlink: addresses and links through `rtnetlink`
//! (`NETLINK_ROUTE`, decisions on the kernel's errno), nftables through libnftables, loaded at
//! run time and fed JSON (one call is one nftables transaction; its results are read as JSON or
//! as a post-condition, never from its English messages). The announcement is one raw frame.
//!
//! - `addr.rs`: addresses and links.
//! - `nft.rs`: the destination's block, the source's lock, table removal and listing.
//! - `arp.rs`: [`Link`] and the gratuitous ARP.
//! - `mover.rs`: [`HostAddressMover`], the [`crate::ports::AddressMover`] over [`HostNet`].

mod addr;
mod arp;
mod mover;
#[cfg(test)]
mod netns_tests;
mod nft;

use std::fmt;
use std::io;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

pub use crate::protocol::ServiceAddr;
pub use addr::IfAddr;
pub use arp::{ArpSocket, Link};
pub use mover::HostAddressMover;
pub use nft::{Family, NftError};

/// Errors of the host's network operations. Each says what was being done; kernel errors keep
/// their errno (as the [`io::Error`] source).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// [`HostNet::new`] was called outside a tokio runtime.
    #[error("the host network handle needs a tokio runtime to run its netlink connection in")]
    NoRuntime,
    /// The `NETLINK_ROUTE` socket could not be opened.
    #[error("cannot open a netlink (route) socket: {0}")]
    RouteSocket(#[source] io::Error),
    /// libnftables could not be loaded or would not give a context.
    #[error("cannot use libnftables for nftables changes: {0}")]
    Nftables(#[source] io::Error),
    /// Listing the interfaces failed.
    #[error("cannot list the network interfaces: {0}")]
    ListLinks(#[source] io::Error),
    /// Listing the addresses failed.
    #[error("cannot list the IPv4 addresses: {0}")]
    ListAddresses(#[source] io::Error),
    /// Listing the routes failed.
    #[error("cannot list the IPv4 routes: {0}")]
    ListRoutes(#[source] io::Error),
    /// The address is a gateway of a route here.
    #[error("{0} is a gateway of this host's routes; a service may not claim it")]
    Gateway(Ipv4Addr),
    /// No interface by that name in this network namespace.
    #[error("no network interface named `{0}` here")]
    NoSuchInterface(String),
    /// Looking up an interface failed.
    #[error("cannot look up network interface `{dev}`: {source}")]
    LinkLookup {
        /// The interface.
        dev: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// The interface has no Ethernet address to announce from.
    #[error("network interface `{0}` has no Ethernet (6-byte) hardware address")]
    NoHardwareAddress(String),
    /// Adding an address failed.
    #[error("cannot add {addr} to `{dev}`: {source}")]
    AddAddress {
        /// The address.
        addr: ServiceAddr,
        /// The interface.
        dev: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Removing an address failed.
    #[error("cannot remove {addr} from `{dev}`: {source}")]
    RemoveAddress {
        /// The address.
        addr: ServiceAddr,
        /// The interface.
        dev: String,
        /// The kernel's answer.
        source: io::Error,
    },
    /// Installing a block failed; nothing of it was installed (one transaction).
    #[error("cannot block {addr} on `{dev}` in tables inet/arp {table}: {source}")]
    Block {
        /// The table name.
        table: String,
        /// The address.
        addr: Ipv4Addr,
        /// The interface.
        dev: String,
        /// What libnftables reported.
        source: NftError,
    },
    /// Installing a lock failed; nothing of it was installed (one transaction).
    #[error("cannot lock {addr} in table inet {table}: {source}")]
    Lock {
        /// The table name.
        table: String,
        /// The address.
        addr: Ipv4Addr,
        /// What libnftables reported.
        source: NftError,
    },
    /// Deleting tables failed.
    #[error("cannot delete tables inet/arp {table}: {source}")]
    DeleteTable {
        /// The table name.
        table: String,
        /// What libnftables reported.
        source: NftError,
    },
    /// Listing the nftables tables failed.
    #[error("cannot list the nftables tables: {0}")]
    ListTables(#[source] NftError),
    /// Sending the gratuitous ARP failed.
    #[error("cannot announce {addr} with a gratuitous ARP on interface #{index}: {source}")]
    Announce {
        /// The address.
        addr: Ipv4Addr,
        /// The interface index.
        index: u32,
        /// Why.
        source: io::Error,
    },
    /// Opening the packet socket for gratuitous ARPs failed (it needs CAP_NET_RAW).
    #[error("cannot open a packet socket for gratuitous ARPs: {0}")]
    PacketSocket(#[source] io::Error),
    /// The address is configured here already.
    #[error("address {addr} is already in use on this host (interface {dev})")]
    AddressInUse {
        /// The address.
        addr: Ipv4Addr,
        /// Where it is configured.
        dev: String,
    },
    /// No interface to put the address on.
    #[error(
        "no interface on this host has a subnet containing {0}; pass the interface explicitly"
    )]
    NoInterface(Ipv4Addr),
    /// A table name that is not `[A-Za-z0-9_-]{1,64}`.
    #[error("refusing nftables table name `{0}` (1 to 64 of A-Z a-z 0-9 _ -)")]
    BadTableName(String),
    /// An interface name that tether will not put in a rule.
    #[error(
        "refusing interface name `{0}` for a block (1 to 15 of A-Z a-z 0-9 . _ -, not the loopback)"
    )]
    BadInterfaceName(String),
}

/// A handle on this network namespace's netlink (the namespace of the thread that creates it):
/// a `NETLINK_ROUTE` connection (its task runs on the tokio runtime) and a libnftables context.
/// Cheap to clone; clones share both.
#[derive(Clone)]
pub struct HostNet {
    inner: Arc<Inner>,
}

struct Inner {
    route: rtnetlink::Handle,
    nft: Mutex<crate::sys::Nftables>,
    /// The context of locks and deletions only: its netlink socket owns the `owner` locks, so
    /// it must never be reopened (libnftables may reopen a socket whose dump was interrupted;
    /// this one never dumps).
    lock_nft: Mutex<crate::sys::Nftables>,
}

impl fmt::Debug for HostNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostNet")
            .field("route", &"netlink route connection")
            .field("nftables", &crate::sys::LIBNFTABLES)
            .finish()
    }
}

impl HostNet {
    /// Opens both sockets in the calling thread's network namespace and spawns the route
    /// connection's task. Must be called inside a tokio runtime; the task ends when the last
    /// clone is dropped.
    pub fn new() -> Result<HostNet, NetError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| NetError::NoRuntime)?;
        let nft = crate::sys::Nftables::new().map_err(NetError::Nftables)?;
        let lock_nft = crate::sys::Nftables::new().map_err(NetError::Nftables)?;
        let (conn, route, _) = rtnetlink::new_connection().map_err(NetError::RouteSocket)?;
        rt.spawn(conn);
        Ok(HostNet {
            inner: Arc::new(Inner {
                route,
                nft: Mutex::new(nft),
                lock_nft: Mutex::new(lock_nft),
            }),
        })
    }

    fn route(&self) -> &rtnetlink::Handle {
        &self.inner.route
    }

    /// Runs one libnftables transaction (blocking; well under a millisecond).
    fn nft_run(&self, commands: &str) -> Result<String, NftError> {
        run_on(&self.inner.nft, commands)
    }

    /// Runs one transaction on the lock context (see [`Inner::lock_nft`]).
    fn nft_lock_run(&self, commands: &str) -> Result<String, NftError> {
        run_on(&self.inner.lock_nft, commands)
    }
}

/// Runs `commands` as one transaction on `ctx`.
fn run_on(ctx: &Mutex<crate::sys::Nftables>, commands: &str) -> Result<String, NftError> {
    // A panic while holding the lock cannot leave the context half-used: every call into it
    // completes inside `run`.
    let mut nft = ctx
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    nft.run(commands).map_err(NftError::Rejected)
}

/// Bytes queued for reading on this host's UDP sockets bound to `addr` (from `/proc/net/udp`).
/// CRIU drops a UDP socket's queued data at dump time, so these should be read before the freeze.
pub fn udp_rx_queued(addr: Ipv4Addr) -> std::io::Result<u64> {
    let table = std::fs::read_to_string("/proc/net/udp")?;
    Ok(parse_udp_rx_queued(&table, addr))
}

fn parse_udp_rx_queued(table: &str, addr: Ipv4Addr) -> u64 {
    // `sl local_address rem_address st tx_queue:rx_queue ...`; addresses are the raw 32-bit
    // value in host byte order, in hex.
    let want = format!("{:08X}", u32::from_ne_bytes(addr.octets()));
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?.split(':').next()?;
            let rx = f.get(4)?.split(':').nth(1)?;
            (local == want)
                .then(|| u64::from_str_radix(rx, 16).ok())
                .flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udp_receive_queues_of_an_address() {
        let addr = Ipv4Addr::new(10, 77, 0, 100);
        let raw = format!("{:08X}", u32::from_ne_bytes(addr.octets()));
        let table = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
             1: {raw}:1B58 00000000:0000 07 00000000:00000400 00:00000000 00000000     0        0 1 2 0 0\n\
             2: 0100007F:0035 00000000:0000 07 00000000:00000200 00:00000000 00000000     0        0 3 2 0 0\n"
        );
        assert_eq!(parse_udp_rx_queued(&table, addr), 0x400);
        assert_eq!(parse_udp_rx_queued(&table, Ipv4Addr::new(10, 0, 0, 1)), 0);
    }
}
