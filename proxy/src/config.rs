//! The proxy's configuration: services and their limits, from TOML or built in code.
//!
//! ```toml
//! control = "/run/tether/proxy.sock"   # optional; the CLI's --control overrides it
//! metrics = "127.0.0.1:9464"           # optional; Prometheus text format at /metrics
//!
//! [[service]]
//! name = "kv"
//! tcp_listen = ["0.0.0.0:7000"]
//! udp_listen = ["0.0.0.0:7000"]
//! backend = "10.77.0.100:7000"
//!
//! [service.limits]                     # optional; every field optional
//! max_hold_ms = 5000
//! udp_max_flows = 4096
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::hold::HoldLimits;

/// Longest quiescence wait a pause may have, configured or asked for in a command.
pub const MAX_PAUSE_TIMEOUT_MS: u64 = 3_600_000;

/// Descriptors [`Config::descriptors_needed`] counts besides the services' own.
pub const DESCRIPTOR_MARGIN: u64 = 64;

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped fields.
    #[error("parsing the configuration: {0}")]
    Parse(toml::de::Error),
    /// A value is out of range or inconsistent.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The configured flow limits need more open files than the process may have.
    #[error(
        "the configured flow limits need {needed} open files (max_tcp_flows: two per TCP flow; \
         udp_max_flows: one per UDP flow and listener; {margin} more for the proxy itself), but \
         this process may open only {limit}: raise the hard limit (`ulimit -Hn {needed}` in the \
         shell that starts it, LimitNOFILE={needed} in a systemd unit) or lower the limits"
    )]
    DescriptorsShort {
        /// What the limits need.
        needed: u64,
        /// What the process may open.
        limit: u64,
        /// The part of `needed` that is the proxy's own.
        margin: u64,
    },
}

/// A flow limit: a number set in the configuration, or the default, which
/// [`Config::fit_open_files`] lowers to what the process's open-files limit allows. Two limits
/// are equal when their numbers are.
#[derive(Debug, Clone, Copy)]
pub struct FlowLimit {
    value: usize,
    set: bool,
}

impl FlowLimit {
    /// The default `value`, which may be lowered to fit.
    pub const fn default_of(value: usize) -> FlowLimit {
        FlowLimit { value, set: false }
    }
    /// The limit.
    pub fn get(self) -> usize {
        self.value
    }
    /// Whether it was set rather than defaulted.
    pub fn is_set(self) -> bool {
        self.set
    }
}

impl PartialEq for FlowLimit {
    fn eq(&self, other: &FlowLimit) -> bool {
        self.value == other.value
    }
}

impl Eq for FlowLimit {}

impl From<usize> for FlowLimit {
    fn from(value: usize) -> FlowLimit {
        FlowLimit { value, set: true }
    }
}

impl serde::Serialize for FlowLimit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.value as u64)
    }
}

impl<'de> serde::Deserialize<'de> for FlowLimit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FlowLimit, D::Error> {
        usize::deserialize(d).map(FlowLimit::from)
    }
}

/// Fewest flows a defaulted limit is lowered to; below it the proxy refuses to start.
pub const MIN_FITTED_FLOWS: usize = 64;

/// The whole proxy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Path of the control socket (created fresh, mode 0600).
    #[serde(default)]
    pub control: Option<PathBuf>,
    /// Address of the metrics HTTP server; none if absent.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// The services.
    #[serde(rename = "service", default)]
    pub services: Vec<ServiceConfig>,
}

/// One service: where clients connect and where the service is.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Unique name, used in control commands and metrics (letters, digits, `-`, `_`, `.`).
    pub name: String,
    /// TCP addresses to accept client connections on.
    #[serde(default)]
    pub tcp_listen: Vec<SocketAddr>,
    /// UDP addresses to receive client datagrams on.
    #[serde(default)]
    pub udp_listen: Vec<SocketAddr>,
    /// The service's address (for TCP and UDP alike).
    pub backend: SocketAddr,
    /// Limits; defaults for missing fields.
    #[serde(default)]
    pub limits: Limits,
}

/// Per-service limits and timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// A pause not resumed within this time resumes by itself toward the old backend.
    pub max_hold_ms: u64,
    /// How long a pause waits for quiescence when the command gives no timeout.
    pub pause_timeout_ms: u64,
    /// Size of each TCP copy buffer (two per connection, allocated on first data).
    pub tcp_buffer_bytes: usize,
    /// Most concurrent TCP connections; further ones are reset. Default 16,384, lowered to
    /// fit the open-files limit when not set.
    pub max_tcp_flows: FlowLimit,
    /// Timeout for opening a TCP connection to the backend.
    pub connect_timeout_ms: u64,
    /// Most UDP flows (client addresses) per UDP listener; datagrams of further ones are dropped.
    /// Default 4,096, lowered to fit the open-files limit when not set.
    pub udp_max_flows: FlowLimit,
    /// A UDP flow without traffic either way for this long is removed.
    pub udp_idle_timeout_ms: u64,
    /// Most datagrams held per UDP flow during a pause.
    pub hold_flow_datagrams: usize,
    /// Most bytes held per UDP flow during a pause.
    pub hold_flow_bytes: usize,
    /// Most datagrams held per UDP listener during a pause.
    pub hold_total_datagrams: usize,
    /// Most bytes held per UDP listener during a pause.
    pub hold_total_bytes: usize,
    /// Held datagrams older than this are discarded.
    pub hold_max_age_ms: u64,
}

impl ServiceConfig {
    /// File descriptors this service may hold at its limits: its listeners, two per TCP flow
    /// (client and backend) and one backend socket per UDP flow of each UDP listener.
    pub fn descriptors_needed(&self) -> u64 {
        let listeners = (self.tcp_listen.len() + self.udp_listen.len()) as u64;
        let tcp = if self.tcp_listen.is_empty() {
            0
        } else {
            2 * self.limits.max_tcp_flows.get() as u64
        };
        let udp = self.udp_listen.len() as u64 * self.limits.udp_max_flows.get() as u64;
        listeners + tcp + udp
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_hold_ms: 5_000,
            pause_timeout_ms: 1_000,
            tcp_buffer_bytes: 16 * 1024,
            max_tcp_flows: FlowLimit::default_of(16_384),
            connect_timeout_ms: 3_000,
            udp_max_flows: FlowLimit::default_of(4_096),
            udp_idle_timeout_ms: 120_000,
            hold_flow_datagrams: 1_024,
            hold_flow_bytes: 1 << 20,
            hold_total_datagrams: 65_536,
            hold_total_bytes: 64 << 20,
            hold_max_age_ms: 10_000,
        }
    }
}

impl Limits {
    /// [`max_hold_ms`](Self::max_hold_ms) as a duration.
    pub fn max_hold(&self) -> Duration {
        Duration::from_millis(self.max_hold_ms)
    }
    /// [`pause_timeout_ms`](Self::pause_timeout_ms) as a duration.
    pub fn pause_timeout(&self) -> Duration {
        Duration::from_millis(self.pause_timeout_ms)
    }
    /// [`connect_timeout_ms`](Self::connect_timeout_ms) as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    /// [`udp_idle_timeout_ms`](Self::udp_idle_timeout_ms) as a duration.
    pub fn udp_idle_timeout(&self) -> Duration {
        Duration::from_millis(self.udp_idle_timeout_ms)
    }
    /// The UDP hold queue's limits.
    pub fn hold(&self) -> HoldLimits {
        HoldLimits {
            flow_datagrams: self.hold_flow_datagrams,
            flow_bytes: self.hold_flow_bytes,
            total_datagrams: self.hold_total_datagrams,
            total_bytes: self.hold_total_bytes,
            max_age: Duration::from_millis(self.hold_max_age_ms),
        }
    }

    fn validate(&self, service: &str) -> Result<(), ConfigError> {
        let bad = |what: &str| Err(ConfigError::Invalid(format!("service {service}: {what}")));
        if self.max_hold_ms == 0 || self.max_hold_ms > 3_600_000 {
            return bad("max_hold_ms must be between 1 and 3600000");
        }
        // The service refuses a pause whose timeout is over the maximum: a default over it
        // would make every pause without an explicit timeout fail.
        if self.pause_timeout_ms == 0 || self.pause_timeout_ms > MAX_PAUSE_TIMEOUT_MS {
            return bad("pause_timeout_ms must be between 1 and 3600000");
        }
        if !(1024..=(16 << 20)).contains(&self.tcp_buffer_bytes) {
            return bad("tcp_buffer_bytes must be between 1024 and 16777216");
        }
        if self.max_tcp_flows.get() == 0 || self.udp_max_flows.get() == 0 {
            return bad("max_tcp_flows and udp_max_flows must be positive");
        }
        if self.connect_timeout_ms == 0 || self.udp_idle_timeout_ms == 0 {
            return bad("connect_timeout_ms and udp_idle_timeout_ms must be positive");
        }
        if self.hold_flow_datagrams == 0
            || self.hold_flow_bytes == 0
            || self.hold_total_datagrams == 0
            || self.hold_total_bytes == 0
            || self.hold_max_age_ms == 0
        {
            return bad("hold limits must be positive");
        }
        Ok(())
    }
}

impl ServiceConfig {
    /// A service with default limits.
    pub fn new(name: impl Into<String>, backend: SocketAddr) -> ServiceConfig {
        ServiceConfig {
            name: name.into(),
            tcp_listen: Vec::new(),
            udp_listen: Vec::new(),
            backend,
            limits: Limits::default(),
        }
    }
}

/// Whether `name` is a valid service name.
pub fn valid_service_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Config {
    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let c: Config = toml::from_str(text).map_err(ConfigError::Parse)?;
        c.validate()?;
        Ok(c)
    }

    /// Reads, parses and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::from_toml(&text)
    }

    /// File descriptors the proxy may hold at its configured limits: every service's
    /// ([`ServiceConfig::descriptors_needed`]) and a margin for the control socket, metrics,
    /// the runtime and the standard streams.
    pub fn descriptors_needed(&self) -> u64 {
        DESCRIPTOR_MARGIN
            + self
                .services
                .iter()
                .map(ServiceConfig::descriptors_needed)
                .sum::<u64>()
    }

    /// Makes the flow limits fit in `open_files` descriptors (the process's open-files limit):
    /// nothing changes if they fit; otherwise the limits left at their defaults are lowered in
    /// proportion (each to at least [`MIN_FITTED_FLOWS`]) and what was lowered is returned, for
    /// the log. Limits that were set are never changed: if they (with the defaulted ones at
    /// their minimum) do not fit, the configuration is refused, saying what it needs.
    pub fn fit_open_files(&mut self, open_files: u64) -> Result<Vec<String>, ConfigError> {
        let needed = self.descriptors_needed();
        if needed <= open_files {
            return Ok(Vec::new());
        }
        // What the set limits and the listeners need, what the defaulted limits need, and what
        // those need at their floor.
        let (mut fixed, mut scalable, mut floor) = (DESCRIPTOR_MARGIN, 0u64, 0u64);
        for s in &self.services {
            fixed += (s.tcp_listen.len() + s.udp_listen.len()) as u64;
            let tcp = if s.tcp_listen.is_empty() { 0 } else { 2 };
            let udp = s.udp_listen.len() as u64;
            for (limit, per) in [(s.limits.max_tcp_flows, tcp), (s.limits.udp_max_flows, udp)] {
                if limit.is_set() {
                    fixed += per * limit.get() as u64;
                } else {
                    scalable += per * limit.get() as u64;
                    floor += per * MIN_FITTED_FLOWS as u64;
                }
            }
        }
        if scalable == 0 || fixed + floor > open_files {
            let at_least = if scalable == 0 { needed } else { fixed + floor };
            return Err(ConfigError::DescriptorsShort {
                needed: at_least,
                limit: open_files,
                margin: DESCRIPTOR_MARGIN,
            });
        }
        let room = open_files - fixed;
        let mut lowered = Vec::new();
        for s in &mut self.services {
            for (what, limit) in [
                ("max_tcp_flows", &mut s.limits.max_tcp_flows),
                ("udp_max_flows", &mut s.limits.udp_max_flows),
            ] {
                if limit.is_set() {
                    continue;
                }
                let v = ((limit.get() as u128 * room as u128) / scalable as u128) as usize;
                let v = v.max(MIN_FITTED_FLOWS);
                lowered.push(format!("service {}: {what} {} -> {v}", s.name, limit.get()));
                *limit = FlowLimit::default_of(v);
            }
        }
        Ok(lowered)
    }

    /// Checks names, addresses and limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.services.is_empty() {
            return Err(ConfigError::Invalid("no [[service]] configured".into()));
        }
        let mut names = HashSet::new();
        let mut tcp = HashSet::new();
        let mut udp = HashSet::new();
        for s in &self.services {
            if !valid_service_name(&s.name) {
                return Err(ConfigError::Invalid(format!(
                    "service name {:?}: use 1-64 letters, digits, '-', '_' or '.'",
                    s.name
                )));
            }
            if !names.insert(s.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "service {} is configured twice",
                    s.name
                )));
            }
            if s.tcp_listen.is_empty() && s.udp_listen.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "service {}: no tcp_listen or udp_listen address",
                    s.name
                )));
            }
            if s.backend.ip().is_unspecified() || s.backend.port() == 0 {
                return Err(ConfigError::Invalid(format!(
                    "service {}: backend {} needs an address and a port",
                    s.name, s.backend
                )));
            }
            for a in &s.tcp_listen {
                if a.port() != 0 && !tcp.insert(*a) {
                    return Err(ConfigError::Invalid(format!("tcp_listen {a} used twice")));
                }
            }
            for a in &s.udp_listen {
                if a.port() != 0 && !udp.insert(*a) {
                    return Err(ConfigError::Invalid(format!("udp_listen {a} used twice")));
                }
            }
            s.limits.validate(&s.name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_service(tcp: Option<usize>, udp: Option<usize>) -> Config {
        let mut s = ServiceConfig::new("a", "10.0.0.1:80".parse().expect("addr"));
        s.tcp_listen = vec!["127.0.0.1:1".parse().expect("addr")];
        s.udp_listen = vec!["127.0.0.1:2".parse().expect("addr")];
        if let Some(t) = tcp {
            s.limits.max_tcp_flows = t.into();
        }
        if let Some(u) = udp {
            s.limits.udp_max_flows = u.into();
        }
        Config {
            control: None,
            metrics: None,
            services: vec![s],
        }
    }

    #[test]
    fn limits_that_fit_are_left_alone() {
        let mut c = one_service(None, None);
        let needed = c.descriptors_needed();
        assert_eq!(needed, DESCRIPTOR_MARGIN + 2 + 2 * 16_384 + 4_096);
        assert!(c.fit_open_files(needed).expect("fits").is_empty());
        assert_eq!(c, one_service(None, None));
    }

    #[test]
    fn defaulted_limits_shrink_to_fit_in_proportion() {
        let mut c = one_service(None, None);
        let lowered = c.fit_open_files(20_000).expect("fits once lowered");
        let l = c.services[0].limits;
        assert!(
            c.descriptors_needed() <= 20_000,
            "{}",
            c.descriptors_needed()
        );
        // 19,934 descriptors shared 32,768 : 4,096 between the two.
        assert_eq!(l.max_tcp_flows.get(), 16_384 * 19_934 / 36_864);
        assert_eq!(l.udp_max_flows.get(), 4_096 * 19_934 / 36_864);
        assert!(!l.max_tcp_flows.is_set());
        assert_eq!(lowered.len(), 2);
        assert!(
            lowered[0].contains("max_tcp_flows 16384 -> "),
            "{lowered:?}"
        );
        // A set limit stays; the defaulted one takes what is left.
        let mut c = one_service(Some(9_000), None);
        c.fit_open_files(20_000).expect("fits");
        assert_eq!(c.services[0].limits.max_tcp_flows.get(), 9_000);
        assert_eq!(
            c.services[0].limits.udp_max_flows.get(),
            (20_000 - DESCRIPTOR_MARGIN - 2 - 18_000) as usize
        );
    }

    #[test]
    fn set_limits_that_do_not_fit_are_refused_with_what_they_need() {
        let mut c = one_service(Some(16_384), Some(4_096));
        let e = c.fit_open_files(20_000).expect_err("too many");
        let msg = e.to_string();
        assert!(
            matches!(
                e,
                ConfigError::DescriptorsShort {
                    needed: 36_930,
                    limit: 20_000,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(
            msg.contains("ulimit -Hn 36930") && msg.contains("LimitNOFILE=36930"),
            "{msg}"
        );
        // Defaulted limits that would have to go below the floor: refused too.
        let mut c = one_service(None, None);
        let e = c.fit_open_files(200).expect_err("too few");
        assert!(
            matches!(e, ConfigError::DescriptorsShort { needed, limit: 200, .. }
                if needed == DESCRIPTOR_MARGIN + 2 + 3 * MIN_FITTED_FLOWS as u64),
            "{e:?}"
        );
    }

    #[test]
    fn descriptors_needed_counts_listeners_and_flows_at_their_limits() {
        let mut s = ServiceConfig::new("a", "10.0.0.1:80".parse().expect("addr"));
        s.tcp_listen = vec!["127.0.0.1:1".parse().expect("addr")];
        s.udp_listen = vec![
            "127.0.0.1:2".parse().expect("addr"),
            "127.0.0.1:3".parse().expect("addr"),
        ];
        s.limits.max_tcp_flows = 100.into();
        s.limits.udp_max_flows = 10.into();
        assert_eq!(s.descriptors_needed(), 3 + 200 + 20);
        let mut udp_only = s.clone();
        udp_only.tcp_listen.clear();
        assert_eq!(udp_only.descriptors_needed(), 2 + 20);
        let c = Config {
            control: None,
            metrics: None,
            services: vec![s, udp_only],
        };
        assert_eq!(c.descriptors_needed(), DESCRIPTOR_MARGIN + 223 + 22);
    }

    #[test]
    fn parses_a_full_config_with_partial_limits() {
        let c = Config::from_toml(
            r#"
            control = "/tmp/p.sock"
            metrics = "127.0.0.1:9464"
            [[service]]
            name = "kv"
            tcp_listen = ["0.0.0.0:7000", "[::]:7000"]
            udp_listen = ["0.0.0.0:7001"]
            backend = "10.77.0.100:7000"
            [service.limits]
            max_hold_ms = 2000
            udp_max_flows = 10
            [[service]]
            name = "b"
            tcp_listen = ["127.0.0.1:0"]
            backend = "127.0.0.1:1"
            "#,
        )
        .expect("valid");
        assert_eq!(c.control.as_deref(), Some(Path::new("/tmp/p.sock")));
        assert_eq!(c.services.len(), 2);
        let kv = &c.services[0];
        assert_eq!(kv.tcp_listen.len(), 2);
        assert_eq!(kv.limits.max_hold(), Duration::from_secs(2));
        assert_eq!(kv.limits.udp_max_flows, 10.into());
        assert_eq!(
            kv.limits.tcp_buffer_bytes,
            Limits::default().tcp_buffer_bytes
        );
        assert_eq!(c.services[1].limits, Limits::default());
    }

    #[test]
    fn the_example_config_is_valid_and_shows_the_defaults() {
        let c = Config::from_toml(include_str!("../proxy.example.toml")).expect("valid");
        assert_eq!(c.services.len(), 1);
        assert_eq!(c.services[0].limits, Limits::default());
    }

    #[test]
    fn rejects_bad_configs() {
        let cases = [
            ("", "no [[service]]"),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'\nbogus=1\ntcp_listen=['127.0.0.1:1']",
                "unknown field",
            ),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'",
                "no tcp_listen",
            ),
            (
                "[[service]]\nname='a b'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']",
                "service name",
            ),
            (
                "[[service]]\nname='a'\nbackend='0.0.0.0:5'\ntcp_listen=['127.0.0.1:1']",
                "needs an address",
            ),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']\n\
                 [[service]]\nname='a'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:2']",
                "configured twice",
            ),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']\n\
                 [[service]]\nname='b'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']",
                "used twice",
            ),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']\n\
                 [service.limits]\ntcp_buffer_bytes=1",
                "tcp_buffer_bytes",
            ),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']\n\
                 [service.limits]\nmax_hold_ms=0",
                "max_hold_ms",
            ),
            (
                "[[service]]\nname='a'\nbackend='1.2.3.4:5'\ntcp_listen=['127.0.0.1:1']\n\
                 [service.limits]\npause_timeout_ms=3600001",
                "pause_timeout_ms",
            ),
            (
                "[[service]]\nname='a'\nbackend='nope'\ntcp_listen=['127.0.0.1:1']",
                "invalid socket address",
            ),
        ];
        for (text, want) in cases {
            let e = Config::from_toml(text).expect_err(text).to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
