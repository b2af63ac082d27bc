//! Addresses and links through `NETLINK_ROUTE` (the `rtnetlink` crate). Every decision on a
//! failure is made on the kernel's errno.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{AddressMessageBuilder, RouteMessageBuilder};

use super::{HostNet, Link, NetError, ServiceAddr};

/// An IPv4 address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    /// The interface's name.
    pub dev: String,
    /// The interface's index.
    pub index: u32,
    /// The (local) address.
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
}

/// The kernel's errno for a netlink error; anything else (a malformed answer) as "other".
pub(super) fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) if m.code.is_some() => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

fn errno(e: &io::Error) -> Option<i32> {
    e.raw_os_error()
}

/// Longest interface name the kernel takes (`IFNAMSIZ` less the NUL).
const IFNAMSIZ_MAX: usize = 15;

impl HostNet {
    /// The IPv4 addresses configured in this network namespace.
    pub async fn addresses(&self) -> Result<Vec<IfAddr>, NetError> {
        let names = self.link_names().await?;
        let mut req = self.route().address().get();
        // Dump the IPv4 family only (the kernel dispatches a dump by family).
        req.message_mut().header.family = AddressFamily::Inet;
        let mut dump = req.execute();
        let mut v = Vec::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetError::ListAddresses(to_io(e)))?
        {
            if let Some(a) = if_addr(&msg, &names) {
                v.push(a);
            }
        }
        Ok(v)
    }

    /// The IPv4 gateways of every route here (all tables).
    pub async fn gateways(&self) -> Result<Vec<Ipv4Addr>, NetError> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let mut dump = self.route().route().get(msg).execute();
        let mut v = Vec::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetError::ListRoutes(to_io(e)))?
        {
            for a in &msg.attributes {
                if let RouteAttribute::Gateway(RouteAddress::Inet(gw)) = a {
                    v.push(*gw);
                }
            }
        }
        Ok(v)
    }

    /// Interface index to name, for every interface here.
    async fn link_names(&self) -> Result<HashMap<u32, String>, NetError> {
        let mut dump = self.route().link().get().execute();
        let mut names = HashMap::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetError::ListLinks(to_io(e)))?
        {
            if let Some(name) = link_name(&msg) {
                names.insert(msg.header.index, name);
            }
        }
        Ok(names)
    }

    /// The interface carrying `addr` here, if any.
    pub async fn interface_of(&self, addr: Ipv4Addr) -> Result<Option<String>, NetError> {
        Ok(self
            .addresses()
            .await?
            .into_iter()
            .find(|a| a.addr == addr)
            .map(|a| a.dev))
    }

    /// Chooses the interface for a service address: `explicit` if given, else the interface with
    /// another address in the service address's subnet. Fails if the address is already here.
    pub async fn choose_interface(
        &self,
        svc: ServiceAddr,
        explicit: Option<&str>,
    ) -> Result<String, NetError> {
        let addrs = self.addresses().await?;
        if let Some(a) = addrs.iter().find(|a| a.addr == svc.addr()) {
            return Err(NetError::AddressInUse {
                addr: svc.addr(),
                dev: a.dev.clone(),
            });
        }
        // Claiming a router's address (then announcing it) would take the subnet's traffic.
        if self.gateways().await?.contains(&svc.addr()) {
            return Err(NetError::Gateway(svc.addr()));
        }
        if let Some(dev) = explicit {
            return Ok(dev.to_string());
        }
        addrs
            .into_iter()
            .find(|a| a.dev != "lo" && svc.contains(a.addr))
            .map(|a| a.dev)
            .ok_or(NetError::NoInterface(svc.addr()))
    }

    /// Adds the service address to `dev`. Already there (same address and prefix on `dev`,
    /// `EEXIST`) is fine.
    pub async fn add_address(&self, svc: ServiceAddr, dev: &str) -> Result<(), NetError> {
        let index = self.link_message(dev).await?.header.index;
        match self
            .route()
            .address()
            .add(index, IpAddr::V4(svc.addr()), svc.prefix())
            .execute()
            .await
            .map_err(to_io)
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            Err(source) => Err(NetError::AddAddress {
                addr: svc,
                dev: dev.to_string(),
                source,
            }),
        }
    }

    /// Removes the service address from `dev`. Absent (`EADDRNOTAVAIL`) is fine; a missing
    /// interface is not (it names the wrong place).
    pub async fn remove_address(&self, svc: ServiceAddr, dev: &str) -> Result<(), NetError> {
        let index = self.link_message(dev).await?.header.index;
        let msg = AddressMessageBuilder::<Ipv4Addr>::new()
            .index(index)
            .address(svc.addr(), svc.prefix())
            .build();
        match self
            .route()
            .address()
            .del(msg)
            .execute()
            .await
            .map_err(to_io)
        {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EADDRNOTAVAIL) => Ok(()),
            Err(source) => Err(NetError::RemoveAddress {
                addr: svc,
                dev: dev.to_string(),
                source,
            }),
        }
    }

    /// `dev`'s index and Ethernet address, looked up ahead of time so that announcing the
    /// service address costs one `sendto` when it matters.
    pub async fn link(&self, dev: &str) -> Result<Link, NetError> {
        let msg = self.link_message(dev).await?;
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
                _ => None,
            })
            .ok_or_else(|| NetError::NoHardwareAddress(dev.to_string()))?;
        Ok(Link::new(msg.header.index, mac))
    }

    /// `RTM_GETLINK` by name; `ENODEV` is [`NetError::NoSuchInterface`].
    async fn link_message(&self, dev: &str) -> Result<LinkMessage, NetError> {
        if dev.is_empty() || dev.len() > IFNAMSIZ_MAX {
            // The kernel cannot have it (and would answer EINVAL, not ENODEV).
            return Err(NetError::NoSuchInterface(dev.to_string()));
        }
        let mut answer = self.route().link().get().match_name(dev).execute();
        match answer.try_next().await.map_err(to_io) {
            Ok(Some(msg)) => Ok(msg),
            Ok(None) => Err(NetError::NoSuchInterface(dev.to_string())),
            Err(e) if errno(&e) == Some(libc::ENODEV) => {
                Err(NetError::NoSuchInterface(dev.to_string()))
            }
            Err(source) => Err(NetError::LinkLookup {
                dev: dev.to_string(),
                source,
            }),
        }
    }
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

/// An address message as an [`IfAddr`]: `IFA_LOCAL` (the local address; `IFA_ADDRESS` is the
/// peer's on point-to-point links), else `IFA_ADDRESS`.
fn if_addr(msg: &AddressMessage, names: &HashMap<u32, String>) -> Option<IfAddr> {
    let v4 = |a: &AddressAttribute, local: bool| match (a, local) {
        (AddressAttribute::Local(IpAddr::V4(ip)), true) => Some(*ip),
        (AddressAttribute::Address(IpAddr::V4(ip)), false) => Some(*ip),
        _ => None,
    };
    let addr = msg
        .attributes
        .iter()
        .find_map(|a| v4(a, true))
        .or_else(|| msg.attributes.iter().find_map(|a| v4(a, false)))?;
    let index = msg.header.index;
    Some(IfAddr {
        // An address whose interface vanished between the two dumps is dropped.
        dev: names.get(&index)?.clone(),
        index,
        addr,
        prefix: msg.header.prefix_len,
    })
}
