//! Foundation worker configuration (TOML; every key has a documented default, see `print-default-config`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::storage::Durability;

/// The default configuration, with a comment on every key.
pub const DEFAULT_CONFIG: &str = include_str!("../foundation.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This worker's name: unique in the pool, stable across restarts.
    pub id: String,
    /// Where gateways connect their links.
    pub link_address: SocketAddr,
    /// The REST API for people and applications.
    pub api_address: SocketAddr,
    /// HTTPS for the API: a PEM certificate chain and its key (both or neither).
    pub api_tls_cert: Option<PathBuf>,
    pub api_tls_key: Option<PathBuf>,
    /// Serve the API as plain HTTP on a non-loopback address (behind a proxy that terminates TLS, say).
    pub api_plain_http: bool,
    /// `/metrics`, `/healthz`, `/readyz`; loopback by default.
    pub admin_address: Option<SocketAddr>,
    /// File of application keys, one per line, accepted in the `x-api-key` header.
    pub api_keys_file: PathBuf,
    /// Create a thing at its first `HELLO` (otherwise unknown things are refused).
    pub auto_provision: bool,
    /// Largest device frame accepted from a gateway.
    pub max_frame: usize,
    /// Frames queued towards one gateway link before the link is dropped as too slow.
    pub link_queue_frames: usize,
    /// Device frames of one gateway link being stored at once; the link is not read beyond it.
    pub link_in_flight: usize,
    /// On shutdown: how long gateway links have, after `GOAWAY`, to have what they sent answered before they close.
    #[serde(with = "humantime_serde")]
    pub link_drain_timeout: Duration,
    /// The ring's peer address: UDP for membership, TCP for requests between workers.
    pub peer_address: SocketAddr,
    /// Peer addresses of other workers to join through (any one that is up suffices).
    pub seeds: Vec<SocketAddr>,
    /// Copies of each partition, the primary included.
    pub replicas: usize,
    /// Active workers needed before the first partition table is made.
    pub bootstrap_members: usize,
    /// How long a write or read keeps trying (through failover) before it fails.
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// How long one request to another worker may take.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Failure detection: how often each worker probes another.
    #[serde(with = "humantime_serde")]
    pub probe_period: Duration,
    /// Failure detection: how long a suspected worker has to refute before it is declared down.
    #[serde(with = "humantime_serde")]
    pub suspect_timeout: Duration,
    /// Largest message between workers (a copy of a partition travels in one).
    pub max_peer_message: usize,
    /// The pool's credentials directory (`thingport-foundation pool init`): mutual TLS on links and peer
    /// connections, sealed membership datagrams. Without it the link and peer addresses must be loopback.
    pub pool_credentials: Option<PathBuf>,
    /// When device data and API writes are acknowledged.
    pub durability: Durability,
    /// What the table coordinator does when every holder of some partition is gone (SQLite stores).
    pub partition_loss: crate::ring::PartitionLoss,
    /// Where things, values and history are kept.
    pub storage: StorageConfig,
    /// Streams of changes to API clients (`GET /v1/things/{thing}/stream`, `GET /v1/stream`).
    pub streams: StreamsConfig,
    /// The pool's consensus group and the locks it holds (`/v1/locks`).
    pub locks: LocksConfig,
}

/// The `[locks]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    /// Locks the pool holds at most; beyond it an acquire of a new lock gets 507.
    pub max_locks: usize,
    /// The longest lease one acquire or renewal may ask for.
    #[serde(with = "humantime_serde")]
    pub max_ttl: Duration,
    /// How often the consensus group's leader tells the others it is there.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// A member that hears no leader for this long (to twice as long, at random) calls an election.
    #[serde(with = "humantime_serde")]
    pub election_timeout: Duration,
    /// The lease of the pool's singleton role (`coord::singleton`): a worker that dies holding it is replaced
    /// after this long; workers ask for it every third of it.
    #[serde(with = "humantime_serde")]
    pub singleton_ttl: Duration,
    /// How long a primary may acknowledge writes after it last reached the consensus group (`coord::lease`): a
    /// worker cut off from the group stops acknowledging within this long.
    #[serde(with = "humantime_serde")]
    pub primary_lease: Duration,
}

impl Default for LocksConfig {
    fn default() -> Self {
        LocksConfig {
            max_locks: 100_000,
            max_ttl: Duration::from_secs(3600),
            heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(500),
            singleton_ttl: Duration::from_secs(5),
            primary_lease: Duration::from_secs(2),
        }
    }
}

/// The `[streams]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// Changes this worker acknowledged that it keeps in memory for streams to resume from (the oldest go first).
    pub log_changes: usize,
    /// The same log's bound in bytes.
    pub log_bytes: usize,
    /// Changes waiting for one client at most; a client that falls further behind is cut (it gets a `cut` event).
    pub client_buffer: usize,
    /// Streams this worker serves at once; beyond it a stream request gets 503.
    pub max_clients: usize,
    /// Thing names one stream may list.
    pub max_things: usize,
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            log_changes: 65_536,
            log_bytes: 32 << 20,
            client_buffer: 1_024,
            max_clients: 10_000,
            max_things: 1_000,
        }
    }
}

/// Which store keeps the worker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// One SQLite file in `data_dir`, this worker's own.
    Sqlite,
    /// One PostgreSQL database that every worker of the pool shares.
    Postgres,
}

/// The `[storage]` section.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub provider: ProviderKind,
    /// The worker's data directory (the SQLite file lives here); created if missing.
    pub data_dir: PathBuf,
    /// PostgreSQL connection string (`key=value` pairs or a `postgresql://` URL).
    pub postgres_url: String,
    /// Operations waiting for the store at most; beyond it writes wait (the device or API request behind them).
    pub queue: usize,
    /// Default retention of value streams and event streams by age (device timestamp); 0 keeps everything.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Default number of values kept per property; 0: no limit.
    pub max_values: u64,
    /// Number of events kept per thing; 0: no limit.
    pub max_events: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            provider: ProviderKind::Sqlite,
            data_dir: "/var/lib/thingport/foundation-1".into(),
            postgres_url: String::new(),
            queue: 65_536,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_values: 0,
            max_events: 100_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: "foundation-1".into(),
            link_address: SocketAddr::from(([127, 0, 0, 1], 7101)),
            api_address: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_tls_cert: None,
            api_tls_key: None,
            api_plain_http: false,
            admin_address: Some(SocketAddr::from(([127, 0, 0, 1], 9101))),
            api_keys_file: "/etc/thingport/api-keys".into(),
            auto_provision: true,
            max_frame: 64 * 1024,
            link_queue_frames: 65_536,
            link_in_flight: 4_096,
            link_drain_timeout: Duration::from_secs(5),
            peer_address: SocketAddr::from(([127, 0, 0, 1], 7201)),
            seeds: Vec::new(),
            replicas: 2,
            bootstrap_members: 1,
            write_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(2),
            probe_period: Duration::from_millis(500),
            suspect_timeout: Duration::from_millis(1500),
            max_peer_message: 64 << 20,
            pool_credentials: None,
            durability: Durability::Disk,
            partition_loss: crate::ring::PartitionLoss::Wait,
            storage: StorageConfig::default(),
            streams: StreamsConfig::default(),
            locks: LocksConfig::default(),
        }
    }
}

impl Config {
    /// Parses a TOML document; every problem is reported (see [`thingport_shell::config::parse`]).
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        thingport_shell::config::parse(text)
    }

    /// Every problem, one per line; empty when usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.id.is_empty() || self.id.len() > 64 {
            problems.push("id: must be 1 to 64 bytes".to_string());
        }
        match std::fs::read_to_string(&self.api_keys_file) {
            Err(_) if !self.api_keys_file.is_file() => {
                problems.push(format!("api_keys_file: no file at {}", self.api_keys_file.display()))
            }
            Err(e) => {
                problems.push(format!("api_keys_file: {}: {e}", self.api_keys_file.display()))
            }
            Ok(text) => {
                if let Err(bad) = crate::keys::parse(&text) {
                    problems.extend(bad.into_iter().map(|p| format!("api_keys_file: {p}")));
                }
            }
        }
        if !(64..=16 << 20).contains(&self.max_frame) {
            problems.push("max_frame: must be 64 bytes to 16 MiB".to_string());
        }
        if self.link_queue_frames < 16 {
            problems.push("link_queue_frames: must be at least 16".to_string());
        }
        if !(1..=1 << 20).contains(&self.link_in_flight) {
            problems.push("link_in_flight: must be 1 to 1048576".to_string());
        }
        if self.link_drain_timeout > Duration::from_secs(60) {
            problems.push("link_drain_timeout: must be at most 60s".to_string());
        }
        if !(1..=5).contains(&self.replicas) {
            problems.push("replicas: must be 1 to 5".to_string());
        }
        if self.bootstrap_members == 0 {
            problems.push("bootstrap_members: must be at least 1".to_string());
        }
        if self.id.contains('#') {
            problems.push("id: must not contain '#'".to_string());
        }
        if self.request_timeout.is_zero() || self.write_timeout < self.request_timeout {
            problems.push(
                "write_timeout, request_timeout: request_timeout must be positive and at most write_timeout"
                    .to_string(),
            );
        }
        if self.probe_period < Duration::from_millis(10) {
            problems.push("probe_period: must be at least 10ms".to_string());
        }
        if self.suspect_timeout < self.probe_period {
            problems.push("suspect_timeout: must be at least probe_period".to_string());
        }
        if self.max_peer_message < 1 << 20 {
            problems.push("max_peer_message: must be at least 1 MiB".to_string());
        }
        match (&self.api_tls_cert, &self.api_tls_key) {
            (Some(cert), Some(key)) => {
                for (name, file) in [("api_tls_cert", cert), ("api_tls_key", key)] {
                    if !file.is_file() {
                        problems.push(format!("{name}: no file at {}", file.display()));
                    }
                }
            }
            (None, None) => {
                if !self.api_address.ip().is_loopback() && !self.api_plain_http {
                    problems.push(format!(
                        "api_address: {} is not a loopback address; set api_tls_cert and api_tls_key (HTTPS), or \
                         api_plain_http = true",
                        self.api_address
                    ));
                }
            }
            _ => problems.push("api_tls_cert, api_tls_key: set both or neither".to_string()),
        }
        match &self.pool_credentials {
            Some(dir) => {
                for file in thingport_shell::pool::WORKER_FILES {
                    if !dir.join(file).is_file() {
                        problems.push(format!(
                            "pool_credentials: no {file} in {} (see `thingport-foundation pool init`)",
                            dir.display()
                        ));
                    }
                }
            }
            None => {
                let open =
                    [("link_address", self.link_address), ("peer_address", self.peer_address)]
                        .into_iter()
                        .chain(self.seeds.iter().map(|&seed| ("seeds", seed)))
                        .filter(|(_, addr)| !addr.ip().is_loopback());
                for (key, addr) in open {
                    problems.push(format!(
                        "{key}: {addr} is not a loopback address; set pool_credentials so that only the pool's \
                         members can use it"
                    ));
                }
            }
        }
        let storage = &self.storage;
        if storage.provider == ProviderKind::Sqlite && storage.data_dir.as_os_str().is_empty() {
            problems.push("storage.data_dir: must name a directory".to_string());
        }
        if storage.provider == ProviderKind::Postgres {
            if storage.postgres_url.is_empty() {
                problems.push(
                    "storage.postgres_url: required with provider = \"postgres\"".to_string(),
                );
            } else if let Err(e) = storage.postgres_url.parse::<tokio_postgres::Config>() {
                problems.push(format!("storage.postgres_url: {e}"));
            }
        }
        if !(16..=1 << 24).contains(&storage.queue) {
            problems.push("storage.queue: must be 16 to 16777216".to_string());
        }
        let streams = &self.streams;
        if !(16..=1 << 24).contains(&streams.log_changes) {
            problems.push("streams.log_changes: must be 16 to 16777216".to_string());
        }
        if !(1 << 16..=1 << 34).contains(&streams.log_bytes) {
            problems.push("streams.log_bytes: must be 64 KiB to 16 GiB".to_string());
        }
        if !(16..=1 << 20).contains(&streams.client_buffer) {
            problems.push("streams.client_buffer: must be 16 to 1048576".to_string());
        }
        if !(1..=1 << 20).contains(&streams.max_clients) {
            problems.push("streams.max_clients: must be 1 to 1048576".to_string());
        }
        if !(1..=100_000).contains(&streams.max_things) {
            problems.push("streams.max_things: must be 1 to 100000".to_string());
        }
        let locks = &self.locks;
        if !(1..=10_000_000).contains(&locks.max_locks) {
            problems.push("locks.max_locks: must be 1 to 10000000".to_string());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(7 * 24 * 3600)).contains(&locks.max_ttl) {
            problems.push("locks.max_ttl: must be 1 s to 7 days".to_string());
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&locks.heartbeat) {
            problems.push("locks.heartbeat: must be 10 ms to 10 s".to_string());
        } else if locks.election_timeout < locks.heartbeat * 3
            || locks.election_timeout > Duration::from_secs(60)
        {
            problems.push(
                "locks.election_timeout: must be at least 3 heartbeats and at most 60 s"
                    .to_string(),
            );
        }
        if locks.primary_lease < locks.election_timeout * 3
            || locks.primary_lease > Duration::from_secs(60)
        {
            problems.push(
                "locks.primary_lease: must be at least 3 times locks.election_timeout and at most 60 s"
                    .to_string(),
            );
        }
        if locks.singleton_ttl < locks.election_timeout * 2 || locks.singleton_ttl > locks.max_ttl {
            problems.push(
                "locks.singleton_ttl: must be at least twice locks.election_timeout and at most locks.max_ttl"
                    .to_string(),
            );
        }
        problems
    }

    pub fn limits(&self) -> thingport_protocol::Limits {
        thingport_protocol::Limits {
            max_frame: self.max_frame,
            ..thingport_protocol::Limits::DEFAULT
        }
    }
}

impl thingport_shell::ServerConfig for Config {
    const DEFAULT_FILE: &'static str = DEFAULT_CONFIG;

    fn validate(&self) -> Vec<String> {
        Config::validate(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_configurations_parse() {
        assert_eq!(
            Config::parse(DEFAULT_CONFIG).unwrap(),
            Config::default(),
            "the commented default file"
        );
        let packaged = Config::parse(include_str!("../../packaging/foundation-1.toml")).unwrap();
        assert_eq!(packaged.id, "foundation-1");
        assert_eq!(packaged.pool_credentials, Some(PathBuf::from("/etc/thingport/pool")));
        assert_eq!(packaged.api_tls_cert, Some(PathBuf::from("/etc/thingport/tls/cert.pem")));
        assert!(Config::parse("unknown_key = 1").is_err());
    }

    #[test]
    fn every_problem_of_the_locks_section_is_named() {
        let config = Config::parse(
            "[locks]\nmax_locks = 0\nheartbeat = \"1ms\"\nsingleton_ttl = \"600ms\"\n",
        )
        .unwrap();
        let problems = config.validate();
        for key in ["locks.max_locks", "locks.heartbeat", "locks.singleton_ttl"] {
            assert!(problems.iter().any(|p| p.starts_with(key)), "{key} in {problems:?}");
        }
        let fine = Config::parse("[locks]\nsingleton_ttl = \"1s\"\n").unwrap();
        assert!(!fine.validate().iter().any(|p| p.starts_with("locks.")));
    }
}
