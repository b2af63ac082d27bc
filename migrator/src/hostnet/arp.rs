//! The gratuitous ARP that moves the service address on the LAN.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};

use super::NetError;

/// An interface's index and hardware address, looked up ahead of time (with
/// [`HostNet::link`](super::HostNet::link)) so that announcing the service address costs one
/// `sendto` when it matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Link {
    index: u32,
    mac: [u8; 6],
}

impl Link {
    pub(super) fn new(index: u32, mac: [u8; 6]) -> Link {
        Link { index, mac }
    }

    /// The interface index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The Ethernet address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Sends a gratuitous ARP for `addr` from this interface, so that hosts on the LAN send its
    /// packets here from now on. Returns once the frame is handed to the driver.
    ///
    /// The frame leaves through a packet socket, below nftables' `arp` hooks: a block's ARP
    /// output rule does not stop it.
    pub fn announce(&self, addr: Ipv4Addr) -> Result<(), NetError> {
        self.announce_on(&ArpSocket::new()?, addr)
    }

    /// [`announce`](Self::announce) through a socket kept open for it: the one-shot form pays
    /// for closing its socket (an RCU grace period, 7-19 ms here) before it returns.
    pub fn announce_on(&self, socket: &ArpSocket, addr: Ipv4Addr) -> Result<(), NetError> {
        crate::sys::send_gratuitous_arp_on(socket.0.as_fd(), self.index, self.mac, addr).map_err(
            |source| NetError::Announce {
                addr,
                index: self.index,
                source,
            },
        )
    }
}

/// A send-only packet socket for gratuitous ARPs, bound to the network namespace of the thread
/// that opened it. Opening needs CAP_NET_RAW; closing waits for an RCU grace period, so keep one.
#[derive(Debug)]
pub struct ArpSocket(OwnedFd);

impl ArpSocket {
    /// Opens the socket in the calling thread's network namespace.
    pub fn new() -> Result<ArpSocket, NetError> {
        crate::sys::packet_socket()
            .map(ArpSocket)
            .map_err(NetError::PacketSocket)
    }
}
