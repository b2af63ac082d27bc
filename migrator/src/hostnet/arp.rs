//! The gratuitous ARP that moves the service address on the LAN.

use std::net::Ipv4Addr;

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
        crate::sys::send_gratuitous_arp(self.index, self.mac, addr).map_err(|source| {
            NetError::Announce {
                addr,
                index: self.index,
                source,
            }
        })
    }
}
