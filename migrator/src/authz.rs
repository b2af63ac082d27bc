//! Who may migrate what to this agent: the sources (by certificate name), the service address
//! space and its prefix length, how many migrations at once and how much memory they may hold.
//!
//! Mutual TLS says who a peer is (a host with a certificate of the cluster's CA); this says what
//! that host may do here. The agent asks [`Authorization`] before it accepts anything of a
//! migration: a refused `Hello` changes nothing on this host. Pure: no I/O.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::protocol::ServiceAddr;

/// An address block services may claim, e.g. `10.77.0.0/24`: a service address must lie in it
/// and carry exactly its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServicePrefix {
    net: Ipv4Addr,
    len: u8,
}

impl ServicePrefix {
    fn mask(self) -> u32 {
        u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0)
    }

    /// Whether `addr` lies in the block.
    pub fn contains(self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & self.mask() == u32::from(self.net)
    }

    /// The block's network address (all host bits clear).
    pub fn network(self) -> Ipv4Addr {
        self.net
    }

    /// The block's broadcast address (all host bits set).
    pub fn broadcast(self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.net) | !self.mask())
    }

    /// The prefix length.
    pub fn prefix_len(self) -> u8 {
        self.len
    }
}

impl fmt::Display for ServicePrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.net, self.len)
    }
}

impl FromStr for ServicePrefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not NETWORK/PREFIX (e.g. 10.77.0.0/24)"))?;
        let net: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        // /31 and /32 blocks have no host addresses besides network and broadcast, and below
        // /8 a block is a good part of the internet: neither is a service subnet.
        let len: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("`{p}` is not a prefix length 8..=30"))?;
        let block = ServicePrefix { net, len };
        if u32::from(net) & !block.mask() != 0 {
            return Err(format!(
                "{s} has host bits set: did you mean {}/{len}?",
                Ipv4Addr::from(u32::from(net) & block.mask())
            ));
        }
        Ok(block)
    }
}

/// Why a migration is not allowed here. Each says what was asked and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The source's certificate name is not among the allowed sources.
    #[error("source `{name}` may not migrate to this host (allowed: {allowed})")]
    Source {
        /// The name its certificate carries.
        name: String,
        /// The allowed names.
        allowed: String,
    },
    /// The service address lies outside every allowed block.
    #[error(
        "service address {addr} is outside the address space services may claim here ({allowed})"
    )]
    Outside {
        /// The address asked for.
        addr: ServiceAddr,
        /// The allowed blocks.
        allowed: String,
    },
    /// The service address carries another prefix length than its block.
    #[error("service address {addr} must have the prefix length of its block {block} (/{})", block.prefix_len())]
    PrefixLength {
        /// The address asked for.
        addr: ServiceAddr,
        /// The block it lies in.
        block: ServicePrefix,
    },
    /// The network or broadcast address of its block.
    #[error("service address {addr} is the {what} address of {block}")]
    Reserved {
        /// The address asked for.
        addr: ServiceAddr,
        /// `network` or `broadcast`.
        what: &'static str,
        /// The block.
        block: ServicePrefix,
    },
    /// As many migrations as allowed are in progress.
    #[error(
        "{running} migrations are in progress here, the most allowed at once (--max-migrations)"
    )]
    TooMany {
        /// In progress now.
        running: usize,
    },
}

/// What the agent allows.
#[derive(Debug, Clone)]
pub struct Authorization {
    /// Certificate names allowed to migrate here.
    pub sources: Vec<String>,
    /// Address blocks services may claim.
    pub services: Vec<ServicePrefix>,
    /// Most migrations in progress at once (journaled ones resumed at start count).
    pub max_migrations: usize,
}

impl Authorization {
    /// Whether the source named `name` (its certificate's name) may migrate here.
    pub fn check_source(&self, name: &str) -> Result<(), Refusal> {
        if self.sources.iter().any(|s| s == name) {
            return Ok(());
        }
        Err(Refusal::Source {
            name: name.to_string(),
            allowed: list(&self.sources),
        })
    }

    /// Whether a service may claim `addr` here: inside an allowed block, with its prefix
    /// length, not its network or broadcast address. (The host's own addresses and its
    /// gateways are refused by the host network check, which knows them.)
    pub fn check_service(&self, addr: ServiceAddr) -> Result<(), Refusal> {
        let Some(&block) = self.services.iter().find(|b| b.contains(addr.addr())) else {
            return Err(Refusal::Outside {
                addr,
                allowed: list(&self.services),
            });
        };
        if addr.prefix() != block.prefix_len() {
            return Err(Refusal::PrefixLength { addr, block });
        }
        for (what, reserved) in [
            ("network", block.network()),
            ("broadcast", block.broadcast()),
        ] {
            if addr.addr() == reserved {
                return Err(Refusal::Reserved { addr, what, block });
            }
        }
        Ok(())
    }

    /// Whether one more migration may start while `running` are in progress.
    pub fn check_count(&self, running: usize) -> Result<(), Refusal> {
        if running >= self.max_migrations {
            return Err(Refusal::TooMany { running });
        }
        Ok(())
    }
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Memory that all migrations on this host together may hold (image files plus page stores).
/// Each migration charges its own [`Reservation`], which gives back what it took when dropped.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: u64,
    used: AtomicU64,
}

/// The budget was exhausted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the migrations on this host would hold more than {limit} bytes together (this one holds \
     {mine}, all {used}; --max-memory-mib)"
)]
pub struct BudgetExceeded {
    /// The budget.
    pub limit: u64,
    /// What all migrations hold.
    pub used: u64,
    /// What this one holds.
    pub mine: u64,
}

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// What all migrations hold now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// A reservation for one migration, holding nothing yet.
    pub fn reserve(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: self.clone(),
            held: 0,
        }
    }
}

/// One migration's share of the [`MemoryBudget`].
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    held: u64,
}

impl Reservation {
    /// Takes `n` more bytes, or nothing if that would exceed the budget.
    pub fn charge(&mut self, n: u64) -> Result<(), BudgetExceeded> {
        let b = &self.budget;
        let r = b
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&u| u <= b.limit)
            });
        match r {
            Ok(_) => {
                self.held += n;
                Ok(())
            }
            Err(used) => Err(BudgetExceeded {
                limit: b.limit,
                used,
                mine: self.held,
            }),
        }
    }

    /// Sets what this migration holds to `n` bytes (charging or giving back the difference).
    pub fn set(&mut self, n: u64) -> Result<(), BudgetExceeded> {
        if n >= self.held {
            self.charge(n - self.held)
        } else {
            self.budget.used.fetch_sub(self.held - n, Ordering::AcqRel);
            self.held = n;
            Ok(())
        }
    }

    /// What this migration holds.
    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authz() -> Authorization {
        Authorization {
            sources: vec!["src".into()],
            services: vec!["10.77.0.0/24".parse().expect("block")],
            max_migrations: 2,
        }
    }

    fn svc(s: &str) -> ServiceAddr {
        s.parse().expect("service address")
    }

    #[test]
    fn only_named_sources_may_migrate() {
        let a = authz();
        assert_eq!(a.check_source("src"), Ok(()));
        let e = a.check_source("mallory").expect_err("refused");
        assert!(
            e.to_string().contains("`mallory`") && e.to_string().contains("src"),
            "{e}"
        );
        let none = Authorization {
            sources: vec![],
            ..authz()
        };
        assert!(
            none.check_source("src").is_err(),
            "no source allowed by default"
        );
    }

    #[test]
    fn services_stay_in_their_block_with_its_prefix() {
        let a = authz();
        assert_eq!(a.check_service(svc("10.77.0.100/24")), Ok(()));
        assert!(matches!(
            a.check_service(svc("10.77.0.100/1")),
            Err(Refusal::PrefixLength { .. })
        ));
        assert!(matches!(
            a.check_service(svc("10.77.0.100/32")),
            Err(Refusal::PrefixLength { .. })
        ));
        assert!(matches!(
            a.check_service(svc("10.78.0.100/24")),
            Err(Refusal::Outside { .. })
        ));
        assert!(matches!(
            a.check_service(svc("10.77.0.0/24")),
            Err(Refusal::Reserved {
                what: "network",
                ..
            })
        ));
        assert!(matches!(
            a.check_service(svc("10.77.0.255/24")),
            Err(Refusal::Reserved {
                what: "broadcast",
                ..
            })
        ));
    }

    #[test]
    fn prefixes_parse_strictly() {
        let p: ServicePrefix = "192.168.4.0/22".parse().expect("block");
        assert_eq!(p.broadcast(), Ipv4Addr::new(192, 168, 7, 255));
        assert!(p.contains(Ipv4Addr::new(192, 168, 6, 1)));
        assert!(!p.contains(Ipv4Addr::new(192, 168, 8, 1)));
        for bad in [
            "10.77.0.1/24",
            "10.0.0.0/1",
            "10.0.0.0/31",
            "10.0.0.0",
            "x/24",
        ] {
            assert!(bad.parse::<ServicePrefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_count_is_bounded() {
        let a = authz();
        assert_eq!(a.check_count(1), Ok(()));
        assert_eq!(a.check_count(2), Err(Refusal::TooMany { running: 2 }));
    }

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let b = MemoryBudget::new(100);
        let mut one = b.reserve();
        let mut two = b.reserve();
        one.charge(60).expect("fits");
        let e = two.charge(50).expect_err("over");
        assert_eq!((e.used, e.mine), (60, 0));
        two.charge(40).expect("fits");
        one.set(10).expect("shrinks");
        assert_eq!(b.used(), 50);
        drop(one);
        assert_eq!(b.used(), 40);
        drop(two);
        assert_eq!(b.used(), 0);
        assert!(b.reserve().charge(u64::MAX).is_err(), "no overflow");
    }
}
