//! [`HostAddressMover`]: the [`AddressMover`] port over [`HostNet`] and the raw gratuitous ARP.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use super::{ArpSocket, HostNet, Link, NetError, ServiceAddr};
use crate::machine::PortError;
use crate::ports::AddressMover;
use crate::protocol::ErrorCode;

/// The service address on this host (the network namespace of the thread that created it).
#[derive(Debug, Clone)]
pub struct HostAddressMover {
    net: HostNet,
    /// Interfaces' index and MAC, looked up when an address is claimed on them, so that the
    /// announcement at the commit is one `sendto` (a netlink lookup there took 10-15 ms).
    links: Arc<Mutex<HashMap<String, Link>>>,
    /// Kept open: opening and closing one per announcement cost 7-19 ms at the commit.
    arp: Arc<ArpSocket>,
}

impl HostAddressMover {
    /// The mover of the calling thread's network namespace (inside a tokio runtime).
    pub fn new() -> Result<HostAddressMover, NetError> {
        Ok(HostAddressMover {
            net: HostNet::new()?,
            links: Arc::new(Mutex::new(HashMap::new())),
            arp: Arc::new(ArpSocket::new()?),
        })
    }

    async fn link(&self, dev: &str) -> Result<Link, NetError> {
        let cached = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(dev)
            .copied();
        if let Some(l) = cached {
            return Ok(l);
        }
        let l = self.net.link(dev).await?;
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(dev.to_string(), l);
        Ok(l)
    }

    fn forget_link(&self, dev: &str) {
        self.links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(dev);
    }
}

fn net_err(what: &str) -> impl FnOnce(NetError) -> PortError + '_ {
    move |e| {
        let code = match &e {
            NetError::AddressInUse { .. } => ErrorCode::AddressInUse,
            NetError::Gateway(_) => ErrorCode::Refused,
            NetError::NoInterface(_) => ErrorCode::NoInterface,
            _ => ErrorCode::HostNetwork,
        };
        PortError::caused(code, what, e)
    }
}

impl AddressMover for HostAddressMover {
    async fn check_free(
        &self,
        svc: ServiceAddr,
        explicit: Option<&str>,
    ) -> Result<String, PortError> {
        self.net
            .choose_interface(svc, explicit)
            .await
            .map_err(net_err("the service address"))
    }

    async fn interface_of(&self, addr: Ipv4Addr) -> Result<Option<String>, PortError> {
        self.net
            .interface_of(addr)
            .await
            .map_err(net_err("reading this host's addresses"))
    }

    async fn claim(&self, table: &str, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        // Blocked first: the address never answers here before the commit.
        self.net
            .block(table, svc.addr(), dev)
            .await
            .map_err(net_err("blocking the service address"))?;
        self.net
            .add_address(svc, dev)
            .await
            .map_err(net_err("adding the service address"))?;
        // Looked up now, used at the commit.
        if let Err(e) = self.link(dev).await {
            tracing::warn!("cannot look up interface {dev} for the announcement: {e}");
        }
        Ok(())
    }

    async fn add(&self, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        self.net
            .add_address(svc, dev)
            .await
            .map_err(net_err("adding the service address"))
    }

    async fn remove(&self, svc: ServiceAddr, dev: &str) -> Result<(), PortError> {
        self.net
            .remove_address(svc, dev)
            .await
            .map_err(net_err("removing the service address"))
    }

    async fn delete_table(&self, table: &str) -> Result<(), PortError> {
        self.net
            .delete_table(table)
            .await
            .map_err(net_err("deleting a table"))
    }

    async fn lock(&self, table: &str, addr: Ipv4Addr, owned: bool) -> Result<(), PortError> {
        self.net
            .lock(table, addr, owned)
            .await
            .map_err(net_err("locking the service address"))
    }

    async fn unlock(&self, tables: &[(String, bool)]) -> Result<(), PortError> {
        let tables: Vec<(&str, bool)> = tables.iter().map(|(t, o)| (t.as_str(), *o)).collect();
        self.net
            .unlock(&tables)
            .await
            .map_err(net_err("lifting the lock of the service address"))
    }

    async fn announce(&self, addr: Ipv4Addr, dev: &str) -> Result<(), PortError> {
        let link = self
            .link(dev)
            .await
            .map_err(net_err("announcing the service address"))?;
        match link.announce_on(&self.arp, addr) {
            Ok(()) => Ok(()),
            Err(_) => {
                // The interface may have changed since it was looked up: once more, afresh.
                self.forget_link(dev);
                self.link(dev)
                    .await
                    .and_then(|l| l.announce_on(&self.arp, addr))
                    .map_err(net_err("announcing the service address"))
            }
        }
    }

    async fn block_behind(
        &self,
        table: &str,
        svc: ServiceAddr,
        dev: &str,
        mac: Option<[u8; 6]>,
    ) -> Result<(), PortError> {
        self.net
            .block_behind(table, svc.addr(), dev, mac)
            .await
            .map_err(net_err("blocking the container's address"))?;
        if let Err(e) = self.link(dev).await {
            tracing::warn!("cannot look up interface {dev} for the announcement: {e}");
        }
        Ok(())
    }

    async fn announce_as(&self, addr: Ipv4Addr, dev: &str, mac: [u8; 6]) -> Result<(), PortError> {
        let link = self
            .link(dev)
            .await
            .map_err(net_err("announcing the container's address"))?;
        Link::new(link.index(), mac)
            .announce_on(&self.arp, addr)
            .map_err(net_err("announcing the container's address"))
    }
}
