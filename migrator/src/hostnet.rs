//! The network side of moving a service between hosts, as run on one host: the service address,
//! the destination's inbound block, CRIU's lock tables, and the gratuitous ARP that moves the
//! address on the LAN.
//!
//! The service keeps its address across the move (CRIU restores TCP sockets with their original
//! addresses). The destination adds the address, drops inbound packets to it until the restore is
//! done (else an early packet is answered with a reset), and announces it with a gratuitous ARP
//! once the source is frozen, so that peers' packets already take the new path when the restored
//! sockets go live. The block is a table named like CRIU's lock table of the dump
//! (`inet CRIU-<run id>`), which `criu restore` deletes at exactly the moment the connections go
//! live.
//!
//! Address and nftables changes use the `ip` and `nft` tools (one process, a few ms, each); the
//! announcement is one raw frame.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use tokio::process::Command;

/// Errors from the host's network tools.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// A tool could not be run.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The tool.
        tool: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A tool failed.
    #[error("`{command}` failed: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// What it printed.
        stderr: String,
    },
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
    /// Unparseable tool output.
    #[error("cannot parse output of {tool}: {what}")]
    Parse {
        /// The tool.
        tool: &'static str,
        /// What went wrong.
        what: String,
    },
}

/// An IPv4 address with its prefix length, e.g. `10.77.0.100/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceAddr {
    addr: Ipv4Addr,
    prefix: u8,
}

impl ServiceAddr {
    /// The address.
    pub fn addr(&self) -> Ipv4Addr {
        self.addr
    }

    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn contains(&self, other: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        u32::from(self.addr) & mask == u32::from(other) & mask
    }
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for ServiceAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not IPv4/PREFIX (e.g. 10.77.0.100/24)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("`{a}` is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("`{p}` is not a prefix length 1..=32"))?;
        if addr.is_unspecified() || addr.is_loopback() || addr.is_multicast() || addr.is_broadcast()
        {
            return Err(format!("{addr} cannot be a service address"));
        }
        Ok(ServiceAddr { addr, prefix })
    }
}

impl TryFrom<String> for ServiceAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<ServiceAddr> for String {
    fn from(a: ServiceAddr) -> String {
        a.to_string()
    }
}

async fn run(tool: &'static str, args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let mut cmd = Command::new(tool);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|source| NetError::Spawn { tool, source })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .await
            .map_err(|source| NetError::Spawn { tool, source })?;
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(|source| NetError::Spawn { tool, source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Failed {
            command: format!("{tool} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[derive(Deserialize)]
struct IpAddrInfo {
    local: Option<String>,
    family: Option<String>,
    prefixlen: Option<u8>,
}

#[derive(Deserialize)]
struct IpLink {
    ifname: String,
    #[serde(default)]
    addr_info: Vec<IpAddrInfo>,
}

/// IPv4 addresses configured on this host: (interface, address, prefix length).
pub async fn addresses() -> Result<Vec<(String, Ipv4Addr, u8)>, NetError> {
    let out = run("ip", &["-j", "-4", "addr", "show"], None).await?;
    let links: Vec<IpLink> = serde_json::from_str(&out).map_err(|e| NetError::Parse {
        tool: "ip",
        what: e.to_string(),
    })?;
    let mut v = Vec::new();
    for l in links {
        for a in l.addr_info {
            if a.family.as_deref() != Some("inet") {
                continue;
            }
            if let (Some(local), Some(p)) = (a.local, a.prefixlen) {
                if let Ok(ip) = local.parse() {
                    v.push((l.ifname.clone(), ip, p));
                }
            }
        }
    }
    Ok(v)
}

/// The interface carrying `addr` here, if any.
pub async fn interface_of(addr: Ipv4Addr) -> Result<Option<String>, NetError> {
    Ok(addresses()
        .await?
        .into_iter()
        .find(|(_, a, _)| *a == addr)
        .map(|(dev, _, _)| dev))
}

/// Chooses the interface for a service address: `explicit` if given, else the interface with
/// another address in the service address's subnet. Fails if the address is already here.
pub async fn choose_interface(
    svc: ServiceAddr,
    explicit: Option<&str>,
) -> Result<String, NetError> {
    let addrs = addresses().await?;
    if let Some((dev, _, _)) = addrs.iter().find(|(_, a, _)| *a == svc.addr()) {
        return Err(NetError::AddressInUse {
            addr: svc.addr(),
            dev: dev.clone(),
        });
    }
    if let Some(dev) = explicit {
        return Ok(dev.to_string());
    }
    addrs
        .into_iter()
        .find(|(dev, a, _)| dev != "lo" && svc.contains(*a))
        .map(|(dev, _, _)| dev)
        .ok_or(NetError::NoInterface(svc.addr()))
}

/// Adds the service address to `dev`.
pub async fn add_address(svc: ServiceAddr, dev: &str) -> Result<(), NetError> {
    run("ip", &["addr", "add", &svc.to_string(), "dev", dev], None)
        .await
        .map(drop)
}

/// Removes the service address from `dev`; absent is fine.
pub async fn remove_address(svc: ServiceAddr, dev: &str) -> Result<(), NetError> {
    match run("ip", &["addr", "del", &svc.to_string(), "dev", dev], None).await {
        Ok(_) => Ok(()),
        Err(NetError::Failed { stderr, .. }) if stderr.contains("Cannot assign") => Ok(()),
        Err(e) => Err(e),
    }
}

fn block_ruleset(table: &str, addr: Ipv4Addr, dev: &str) -> String {
    // Priority -300 runs before conntrack (-200): nothing of a blocked packet reaches a socket.
    format!(
        "table inet {table} {{\n  chain input {{\n    type filter hook input priority -300; policy accept;\n    iifname \"{dev}\" ip daddr {addr} drop\n  }}\n}}\n"
    )
}

fn valid_table(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

fn bad_table(name: &str) -> NetError {
    NetError::Parse {
        tool: "nft",
        what: format!("refusing table name `{name}`"),
    }
}

/// Drops packets arriving on `dev` for `addr`, in table `inet <table>`.
pub async fn block_inbound(table: &str, addr: Ipv4Addr, dev: &str) -> Result<(), NetError> {
    if !valid_table(table) {
        return Err(bad_table(table));
    }
    run("nft", &["-f", "-"], Some(&block_ruleset(table, addr, dev)))
        .await
        .map(drop)
}

/// Atomically moves a block from table `from` to table `to` (one nft transaction: no gap).
pub async fn move_block(from: &str, to: &str, addr: Ipv4Addr, dev: &str) -> Result<(), NetError> {
    if !valid_table(from) {
        return Err(bad_table(from));
    }
    if !valid_table(to) {
        return Err(bad_table(to));
    }
    let batch = format!("{}delete table inet {from}\n", block_ruleset(to, addr, dev));
    run("nft", &["-f", "-"], Some(&batch)).await.map(drop)
}

/// Deletes table `inet <name>`; absent is fine.
pub async fn delete_table(name: &str) -> Result<(), NetError> {
    if !valid_table(name) {
        return Err(bad_table(name));
    }
    match run("nft", &["delete", "table", "inet", name], None).await {
        Ok(_) => Ok(()),
        Err(NetError::Failed { stderr, .. }) if stderr.contains("No such file") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Names of the `inet` tables on this host.
pub async fn inet_tables() -> Result<Vec<String>, NetError> {
    let out = run("nft", &["list", "tables", "inet"], None).await?;
    Ok(out
        .lines()
        .filter_map(|l| l.strip_prefix("table inet "))
        .map(|s| s.trim().to_string())
        .collect())
}

/// An interface's index and hardware address, looked up ahead of time so that announcing the
/// service address costs one `sendto` when it matters.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    index: u32,
    mac: [u8; 6],
}

impl Link {
    /// Looks up `dev` in this network namespace.
    pub fn lookup(dev: &str) -> Result<Link, NetError> {
        let index = nix::net::if_::if_nametoindex(dev).map_err(|e| NetError::Parse {
            tool: "if_nametoindex",
            what: format!("{dev}: {e}"),
        })?;
        let ifaddrs = nix::ifaddrs::getifaddrs().map_err(|e| NetError::Parse {
            tool: "getifaddrs",
            what: e.to_string(),
        })?;
        let mac = ifaddrs
            .filter(|i| i.interface_name == dev)
            .find_map(|i| {
                i.address
                    .and_then(|a| a.as_link_addr().and_then(|l| l.addr()))
            })
            .ok_or_else(|| NetError::Parse {
                tool: "getifaddrs",
                what: format!("{dev} has no hardware address"),
            })?;
        Ok(Link { index, mac })
    }

    /// Sends a gratuitous ARP for `addr` from this interface, so that hosts on the LAN send its
    /// packets here from now on. Returns once the frame is handed to the driver.
    pub fn announce(&self, addr: Ipv4Addr) -> Result<(), NetError> {
        crate::sys::send_gratuitous_arp(self.index, self.mac, addr).map_err(|e| NetError::Spawn {
            tool: "gratuitous ARP",
            source: e,
        })
    }
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

    #[test]
    fn parses_service_addresses() {
        let a: ServiceAddr = "10.77.0.100/24".parse().expect("valid");
        assert_eq!(a.addr(), Ipv4Addr::new(10, 77, 0, 100));
        assert_eq!(a.prefix(), 24);
        assert_eq!(a.to_string(), "10.77.0.100/24");
        assert!(a.contains(Ipv4Addr::new(10, 77, 0, 3)));
        assert!(!a.contains(Ipv4Addr::new(10, 78, 0, 3)));
        for bad in [
            "10.77.0.100",
            "10.77.0.100/33",
            "10.77.0.100/0",
            "x/24",
            "127.0.0.1/8",
            "0.0.0.0/8",
            "224.0.0.1/4",
        ] {
            assert!(bad.parse::<ServiceAddr>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn block_ruleset_names_table_device_and_address() {
        let r = block_ruleset("CRIU-abc", Ipv4Addr::new(10, 77, 0, 100), "eth0");
        assert!(r.contains("table inet CRIU-abc"));
        assert!(r.contains("iifname \"eth0\" ip daddr 10.77.0.100 drop"));
    }

    #[test]
    fn table_names_are_checked() {
        assert!(valid_table("CRIU-3f2a_x"));
        assert!(!valid_table("x; flush ruleset"));
        assert!(!valid_table(""));
    }
}
