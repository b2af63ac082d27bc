//! A container's neighbour (ARP) table moves with it.
//!
//! Podman restores a container into a new network namespace, whose neighbour table is empty, and
//! lets it run at once; the destination's block drops the ARP requests it sends meanwhile (the
//! address must not answer there before the commit), so every peer's entry is left incomplete
//! and the kernel asks again only a second later (`retrans_time`): every client would stall a
//! second past the downtime. The source therefore writes the frozen container's complete
//! entries beside the images ([`FILE`]), and the destination installs them in the restored
//! container's namespace the moment its block is lifted: the packets the service queued behind
//! the incomplete entries leave at once, none lost.

use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::neighbour::NeighbourState;

use super::ContainerError;
use crate::protocol::types::parse_mac;

/// The file beside the images: one `address mac interface` line per complete IPv4 entry.
pub const FILE: &str = "neighbours";
/// Most entries carried (a container's LAN peers).
const MAX_ENTRIES: usize = 4096;

/// An IPv4 neighbour: its address, its MAC, and the container's interface it is on.
pub type Entry = (Ipv4Addr, [u8; 6], String);

/// The complete IPv4 entries in the network namespace of `pid` (`/proc/<pid>/net/arp`).
pub fn read(pid: i32) -> Result<Vec<Entry>, ContainerError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/arp")).map_err(
        ContainerError::io("reading the container's neighbour table"),
    )?;
    Ok(parse_proc_arp(&text))
}

fn format_mac(m: &[u8; 6]) -> String {
    m.map(|o| format!("{o:02x}")).join(":")
}

/// Entries of `/proc/net/arp` whose flags say complete (`ATF_COM`, 0x2), MAC not all zeros.
fn parse_proc_arp(text: &str) -> Vec<Entry> {
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (ip, flags, mac, dev) = (f.first()?, f.get(2)?, f.get(3)?, f.get(5)?);
            let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
            let mac = parse_mac(mac).filter(|m| *m != [0; 6])?;
            (flags & 0x2 != 0).then(|| Some((ip.parse().ok()?, mac, (*dev).to_string())))?
        })
        .take(MAX_ENTRIES)
        .collect()
}

/// Writes `entries` as [`FILE`] in `dir`.
pub fn write(dir: &Path, entries: &[Entry]) -> std::io::Result<()> {
    let text: String = entries
        .iter()
        .map(|(ip, mac, dev)| format!("{ip} {} {dev}\n", format_mac(mac)))
        .collect();
    std::fs::write(dir.join(FILE), text)
}

/// The entries of [`FILE`] in `dir` (none if it is absent; malformed lines are skipped, at most
/// [`MAX_ENTRIES`]: the file came over the network).
pub fn load(dir: &Path) -> Vec<Entry> {
    let Ok(text) = std::fs::read_to_string(dir.join(FILE)) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ip = f.next()?.parse().ok()?;
            let mac = parse_mac(f.next()?)?;
            let dev = f.next()?;
            (dev.len() < 16).then(|| (ip, mac, dev.to_string()))
        })
        .take(MAX_ENTRIES)
        .collect()
}

/// A route netlink socket in a container's network namespace.
#[derive(Debug)]
pub struct Neighbours {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Neighbours {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Neighbours {
    /// Opens the socket in the network namespace of `pid` (inside a tokio runtime).
    pub fn open(pid: i32) -> Result<Neighbours, ContainerError> {
        let (conn, handle, _) = super::in_netns_of(pid, || {
            rtnetlink::new_connection().map_err(|e| format!("a netlink socket: {e}"))
        })?;
        Ok(Neighbours {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// Installs `entries` as reachable (replacing what is there); returns how many.
    pub async fn install(&self, entries: &[Entry]) -> Result<usize, ContainerError> {
        let mut index = std::collections::HashMap::new();
        let mut n = 0;
        for (ip, mac, dev) in entries {
            let i = match index.get(dev) {
                Some(i) => *i,
                None => {
                    let Some(link) = self
                        .handle
                        .link()
                        .get()
                        .match_name(dev.clone())
                        .execute()
                        .try_next()
                        .await
                        .ok()
                        .flatten()
                    else {
                        continue;
                    };
                    index.insert(dev.clone(), link.header.index);
                    link.header.index
                }
            };
            self.handle
                .neighbours()
                .add(i, IpAddr::V4(*ip))
                .link_layer_address(mac)
                .state(NeighbourState::Reachable)
                .replace()
                .execute()
                .await
                .map_err(|e| ContainerError::Unsupported {
                    name: String::new(),
                    detail: format!("installing the neighbour {ip}: {e}"),
                })?;
            n += 1;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_entries_are_read_and_carried() {
        let proc =
            "IP address       HW type     Flags       HW address            Mask     Device\n\
                    10.77.0.4        0x1         0x2         4a:1b:00:00:00:04     *        eth0\n\
                    10.77.0.9        0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                    10.77.0.1        0x1         0x6         aa:bb:cc:dd:ee:ff     *        eth0\n";
        let e = parse_proc_arp(proc);
        assert_eq!(
            e,
            vec![
                (
                    "10.77.0.4".parse().expect("ip"),
                    [0x4a, 0x1b, 0, 0, 0, 4],
                    "eth0".into()
                ),
                (
                    "10.77.0.1".parse().expect("ip"),
                    [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff],
                    "eth0".into()
                ),
            ]
        );
        let dir = tempfile::tempdir().expect("dir");
        write(dir.path(), &e).expect("write");
        assert_eq!(load(dir.path()), e);
        std::fs::write(
            dir.path().join(FILE),
            "junk\n10.0.0.1 zz eth0\n10.0.0.2 01:02:03:04:05:06 eth0\n",
        )
        .expect("write");
        assert_eq!(load(dir.path()).len(), 1);
    }
}
