//! Identifiers and constants of a migration: its id, the service address, the page size.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Size of a memory page.
pub const PAGE: usize = 4096;

/// A migration identifier: 1 to 40 characters of `[A-Za-z0-9-]`. It names the migration in logs,
/// reports, journals and directories on both hosts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationId(String);

impl MigrationId {
    /// A fresh random identifier (`m` and 16 hex digits).
    pub fn random() -> MigrationId {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness per process; mixing in the time and
        // pid keeps two ids of one process apart.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        h.write_u32(std::process::id());
        MigrationId(format!("m{:016x}", h.finish()))
    }

    /// The identifier.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MigrationId {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if !s.is_empty()
            && s.len() <= 40
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            Ok(MigrationId(s))
        } else {
            Err(format!(
                "invalid migration id {s:?} (1-40 characters of A-Z, a-z, 0-9, -)"
            ))
        }
    }
}

impl FromStr for MigrationId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        MigrationId::try_from(s.to_string())
    }
}

impl From<MigrationId> for String {
    fn from(m: MigrationId) -> String {
        m.0
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An IPv4 address with its prefix length, e.g. `10.77.0.100/24`: the address a service keeps
/// across its moves (CRIU restores TCP sockets with their original addresses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

    /// Whether `other` lies in this address's subnet.
    pub fn contains(&self, other: Ipv4Addr) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn migration_ids_are_checked() {
        assert!("m0123-abc".parse::<MigrationId>().is_ok());
        for bad in ["", "../x", "a b", &"x".repeat(41)] {
            assert!(bad.parse::<MigrationId>().is_err(), "{bad:?}");
        }
        assert_ne!(MigrationId::random(), MigrationId::random());
    }
}

/// Most arguments a container's creation may have.
pub const MAX_CREATE_ARGS: usize = 512;
/// Longest argument of a container's creation, and longest host path it mounts.
pub const MAX_CREATE_ARG_BYTES: usize = 4096;

/// A Podman container as the unit of a migration: what the destination needs to create it again
/// (same name, image, configuration and address) before it restores it from the images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerSpec {
    /// Its name, kept on the destination.
    pub name: String,
    /// The options, image and command of the `podman run` or `podman create` that made it
    /// (Podman's record of its command line, from the subcommand's first argument on; the
    /// `--detach` of `run` dropped).
    pub create_args: Vec<String>,
    /// The host paths it bind-mounts: each must exist on the destination.
    pub bind_sources: Vec<String>,
    /// The named volumes it mounts: each must exist on the destination (Podman would create a
    /// missing one empty).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Its static MAC address (`--mac-address`), if it has one: it moves with it.
    pub mac: Option<String>,
}

impl ContainerSpec {
    /// Checks the bounds and shapes a destination relies on: a name Podman accepts, at most
    /// [`MAX_CREATE_ARGS`] arguments of at most [`MAX_CREATE_ARG_BYTES`] each, no NUL, absolute
    /// mount sources, a MAC of six hex octets.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 253
            && self.name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !name_ok {
            return Err(format!(
                "container name {:?} is not a Podman name",
                self.name
            ));
        }
        if self.create_args.is_empty() || self.create_args.len() > MAX_CREATE_ARGS {
            return Err(format!(
                "a container's creation has 1 to {MAX_CREATE_ARGS} arguments, not {}",
                self.create_args.len()
            ));
        }
        let too_long = |s: &String| s.len() > MAX_CREATE_ARG_BYTES || s.contains('\0');
        if let Some(a) = self.create_args.iter().find(|a| too_long(a)) {
            return Err(format!(
                "a creation argument is longer than {MAX_CREATE_ARG_BYTES} bytes or has a NUL: {:.64}",
                a
            ));
        }
        if self.bind_sources.len() > MAX_CREATE_ARGS {
            return Err(format!("more than {MAX_CREATE_ARGS} bind mounts"));
        }
        if let Some(p) = self
            .bind_sources
            .iter()
            .find(|p| too_long(p) || !p.starts_with('/'))
        {
            return Err(format!("bind mount source {p:.64} is not an absolute path"));
        }
        if self.volumes.len() > MAX_CREATE_ARGS {
            return Err(format!("more than {MAX_CREATE_ARGS} volumes"));
        }
        if let Some(v) = self.volumes.iter().find(|v| {
            v.is_empty()
                || v.len() > 255
                || !v
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }) {
            return Err(format!("{v:.64} is not a volume name"));
        }
        if let Some(mac) = &self.mac {
            let octets: Vec<&str> = mac.split(':').collect();
            if octets.len() != 6
                || !octets
                    .iter()
                    .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()))
            {
                return Err(format!("{mac:?} is not a MAC address"));
            }
        }
        Ok(())
    }

    /// The MAC address as octets, if it has a static one (and it is well-formed).
    pub fn mac_octets(&self) -> Option<[u8; 6]> {
        parse_mac(self.mac.as_deref()?)
    }
}

/// A MAC address written as six hex octets separated by `:` (`02:77:00:00:00:64`).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for o in &mut mac {
        *o = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}
