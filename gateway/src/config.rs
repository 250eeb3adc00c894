//! Gateway configuration: a TOML file whose every key has a documented default (`print-default-config`).
//!
//! [`Config::validate`] reports every problem at once, so an operator fixes a file in one pass; the binary prints
//! them and exits 64 (`EX_USAGE`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The default configuration, as shipped in `/etc/thingport/gateway.toml`, with a comment on every key.
pub const DEFAULT_CONFIG: &str = include_str!("../gateway.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this gateway in link `HELLO`s and logs.
    pub id: String,
    pub listen: Listen,
    pub tls: Tls,
    pub auth: Auth,
    pub upstream: Upstream,
    pub limits: Limits,
    pub session: Session,
    pub admin: Admin,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    /// Address of both listeners: WSS on TCP and QUIC on UDP, same port.
    pub address: SocketAddr,
    pub wss: bool,
    pub quic: bool,
    /// QUIC on another address than `address` (its port may be 0 when `address`'s is).
    pub quic_address: Option<SocketAddr>,
    /// TCP accept backlog.
    pub backlog: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// Also accept TLS 1.2 on WSS (QUIC is always TLS 1.3).
    pub allow_tls12: bool,
    /// PEM CA bundle; when set, devices may authenticate with a client certificate naming the thing (mTLS).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse devices that present no client certificate.
    pub require_client_cert: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// File holding the provisioning secret that signs device tokens (at least 32 bytes).
    pub secret_file: PathBuf,
    /// Optional file of revoked things and tokens, one per line; reloaded on SIGHUP.
    pub revocation_file: Option<PathBuf>,
}

/// Largest write a link makes at once.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// Link addresses of foundation workers; the gateway also links to every worker they list (`WORKERS`).
    pub foundations: Vec<SocketAddr>,
    /// Persistent links to each worker.
    pub links_per_foundation: usize,
    /// Bytes queued on a link above which new device frames go to other links.
    pub high_water_bytes: usize,
    /// Most frames a link queues before its senders wait.
    pub queue_frames: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    /// Link heartbeat interval; a link silent for 3 intervals is closed and its frames retried elsewhere.
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// How long a link's writer may hold the first frame of a write while more arrive, so that one write carries
    /// many frames; 0 writes as soon as the queue is empty. Timers count whole milliseconds.
    #[serde(with = "humantime_serde")]
    pub flush_delay: Duration,
    /// A write goes out at once when it holds this many bytes, whatever `flush_delay` says.
    pub flush_bytes: usize,
    /// The pool's credentials directory (made by `thingport-foundation pool init` / `pool issue`): links are
    /// mutual TLS with the pool's CA. Without it every worker address must be a loopback address.
    pub pool_credentials: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most device sessions at once, WSS and QUIC together (including those in handshake).
    pub max_sessions: usize,
    /// Most sessions from one source IP address.
    pub max_sessions_per_ip: usize,
    /// New connections accepted per second (burst of the same size), all listeners together.
    pub accept_rate: u32,
    /// Most WSS connections accepted and waiting for their first bytes (no TLS state yet) at once.
    pub max_waiting: usize,
    /// Most WSS connections from one source IP address waiting for their first bytes.
    pub max_waiting_per_ip: usize,
    /// Deadline for a WSS connection's first bytes (the TLS ClientHello), from the accept; the handshake deadline
    /// applies if it is shorter.
    #[serde(with = "humantime_serde")]
    pub first_bytes_timeout: Duration,
    /// Most connections in their handshake (TLS + upgrade + HELLO) at once, for each transport.
    pub max_handshakes: usize,
    /// Most connections from one source IP address in their handshake, both transports together.
    pub max_handshakes_per_ip: usize,
    /// Deadline for TLS + WebSocket upgrade + HELLO together, from the accept.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest device frame, in bytes.
    pub max_frame: usize,
    /// Device data frames per second per session (burst of the same size); reading pauses beyond it.
    pub message_rate: u32,
    /// Largest WebSocket upgrade request headers, in bytes.
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Session {
    /// Keepalive for devices that ask for 0, and bounds on what they may ask.
    pub keepalive_secs: u16,
    pub min_keepalive_secs: u16,
    pub max_keepalive_secs: u16,
    /// Device data frames in flight per session (told to the device in `WELCOME`).
    pub window: u32,
    /// Frames and bytes queued towards one device; beyond them telemetry is dropped oldest first and a session
    /// whose queue holds service traffic is closed with SLOW_CONSUMER.
    pub send_queue_frames: usize,
    pub send_queue_bytes: usize,
    /// On SIGTERM: how long sessions have to finish in-flight data after `GOAWAY`.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Reconnect hint in `GOAWAY`.
    #[serde(with = "humantime_serde")]
    pub reconnect_hint: Duration,
    /// After closing a WSS session, how long the gateway reads (and discards) what the device still sends, so
    /// that no reset destroys the `ERROR` and close frame on their way to it.
    #[serde(with = "humantime_serde")]
    pub close_linger: Duration,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// Metrics and health endpoints (`/metrics`, `/healthz`, `/readyz`); loopback by default.
    pub address: Option<SocketAddr>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            id: "gateway-1".into(),
            listen: Listen::default(),
            tls: Tls::default(),
            auth: Auth::default(),
            upstream: Upstream::default(),
            limits: Limits::default(),
            session: Session::default(),
            admin: Admin::default(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            address: SocketAddr::from(([0, 0, 0, 0], 8443)),
            wss: true,
            quic: true,
            quic_address: None,
            backlog: 4096,
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls {
            cert: "/etc/thingport/tls/cert.pem".into(),
            key: "/etc/thingport/tls/key.pem".into(),
            allow_tls12: false,
            client_ca: None,
            require_client_cert: false,
        }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth { secret_file: "/etc/thingport/provisioning.key".into(), revocation_file: None }
    }
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            foundations: vec![SocketAddr::from(([127, 0, 0, 1], 7101))],
            links_per_foundation: 2,
            high_water_bytes: 1 << 20,
            queue_frames: 8192,
            connect_timeout: Duration::from_secs(3),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            heartbeat: Duration::from_secs(2),
            flush_delay: Duration::ZERO,
            flush_bytes: 32 * 1024,
            pool_credentials: None,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_sessions: 100_000,
            max_sessions_per_ip: 1_000,
            accept_rate: 2_000,
            max_waiting: 16_384,
            max_waiting_per_ip: 1_024,
            first_bytes_timeout: Duration::from_secs(3),
            max_handshakes: 512,
            max_handshakes_per_ip: 32,
            handshake_timeout: Duration::from_secs(10),
            max_frame: 64 * 1024,
            message_rate: 100,
            max_header_bytes: 8 * 1024,
        }
    }
}

impl Default for Session {
    fn default() -> Self {
        Session {
            keepalive_secs: 60,
            min_keepalive_secs: 5,
            max_keepalive_secs: 1_200,
            window: 64,
            send_queue_frames: 256,
            send_queue_bytes: 256 * 1024,
            drain_timeout: Duration::from_secs(10),
            reconnect_hint: Duration::from_secs(2),
            close_linger: Duration::from_secs(2),
        }
    }
}

impl Default for Admin {
    fn default() -> Self {
        Admin { address: Some(SocketAddr::from(([127, 0, 0, 1], 9443))) }
    }
}

impl Config {
    /// Parses a TOML document; syntax and unknown keys are reported with their location.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        thingport_shell::config::parse(text)
    }

    /// Every problem of a parsed configuration, each on its own line; empty when it is usable. Files are checked
    /// for existence here, and the certificate and key are loaded (a chain and a key that belong together); the
    /// other files' contents are checked when loaded.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_string());
            }
        };
        check(!self.id.is_empty() && self.id.len() <= 64, "id: must be 1 to 64 bytes");
        check(self.listen.wss || self.listen.quic, "listen: enable at least one of wss and quic");
        check(self.listen.backlog > 0, "listen.backlog: must be at least 1");
        check(
            self.tls.cert.is_file(),
            &format!("tls.cert: no file at {}", self.tls.cert.display()),
        );
        check(self.tls.key.is_file(), &format!("tls.key: no file at {}", self.tls.key.display()));
        if self.tls.cert.is_file() && self.tls.key.is_file() {
            // what a reload would find: `systemctl reload` runs `check-config` first and fails on this
            let loaded = crate::tls::ReloadableCert::load(&self.tls.cert, &self.tls.key);
            let problem = loaded.as_ref().err().map(|e| format!("tls.cert, tls.key: {e:#}"));
            check(loaded.is_ok(), problem.as_deref().unwrap_or_default());
        }
        if let Some(ca) = &self.tls.client_ca {
            check(ca.is_file(), &format!("tls.client_ca: no file at {}", ca.display()));
        }
        check(
            self.tls.client_ca.is_some() || !self.tls.require_client_cert,
            "tls.require_client_cert: needs tls.client_ca",
        );
        check(
            self.auth.secret_file.is_file(),
            &format!("auth.secret_file: no file at {}", self.auth.secret_file.display()),
        );
        check(
            !self.upstream.foundations.is_empty(),
            "upstream.foundations: list at least one worker",
        );
        match &self.upstream.pool_credentials {
            Some(dir) => {
                for file in thingport_shell::pool::GATEWAY_FILES {
                    check(
                        dir.join(file).is_file(),
                        &format!("upstream.pool_credentials: no {file} in {}", dir.display()),
                    );
                }
            }
            None => {
                for addr in self.upstream.foundations.iter().filter(|a| !a.ip().is_loopback()) {
                    check(
                        false,
                        &format!(
                            "upstream.foundations: {addr} is not a loopback address; set \
                             upstream.pool_credentials so that links are authenticated and encrypted"
                        ),
                    );
                }
            }
        }
        check(
            (1..=64).contains(&self.upstream.links_per_foundation),
            "upstream.links_per_foundation: must be 1 to 64",
        );
        check(
            self.upstream.high_water_bytes >= 4096,
            "upstream.high_water_bytes: must be at least 4096",
        );
        check(self.upstream.queue_frames >= 16, "upstream.queue_frames: must be at least 16");
        check(
            self.upstream.reconnect_min <= self.upstream.reconnect_max,
            "upstream.reconnect_min: must not exceed reconnect_max",
        );
        check(!self.upstream.heartbeat.is_zero(), "upstream.heartbeat: must be more than 0");
        check(
            self.upstream.flush_delay <= Duration::from_millis(100),
            "upstream.flush_delay: must be at most 100ms",
        );
        check(
            (1..=MAX_BATCH_BYTES).contains(&self.upstream.flush_bytes),
            &format!("upstream.flush_bytes: must be 1 to {MAX_BATCH_BYTES}"),
        );
        check(self.limits.max_sessions > 0, "limits.max_sessions: must be at least 1");
        check(
            self.limits.max_sessions_per_ip > 0,
            "limits.max_sessions_per_ip: must be at least 1",
        );
        check(self.limits.accept_rate > 0, "limits.accept_rate: must be at least 1");
        check(self.limits.max_handshakes > 0, "limits.max_handshakes: must be at least 1");
        check(
            self.limits.max_handshakes_per_ip > 0,
            "limits.max_handshakes_per_ip: must be at least 1",
        );
        check(self.limits.max_waiting > 0, "limits.max_waiting: must be at least 1");
        check(self.limits.max_waiting_per_ip > 0, "limits.max_waiting_per_ip: must be at least 1");
        check(
            !self.limits.handshake_timeout.is_zero(),
            "limits.handshake_timeout: must be more than 0",
        );
        check(
            !self.limits.first_bytes_timeout.is_zero(),
            "limits.first_bytes_timeout: must be more than 0",
        );
        check(
            (64..=16 << 20).contains(&self.limits.max_frame),
            "limits.max_frame: must be 64 bytes to 16 MiB",
        );
        check(self.limits.message_rate > 0, "limits.message_rate: must be at least 1");
        check(
            self.limits.max_header_bytes >= 1024,
            "limits.max_header_bytes: must be at least 1024",
        );
        check(
            self.session.min_keepalive_secs >= 1
                && self.session.min_keepalive_secs <= self.session.keepalive_secs
                && self.session.keepalive_secs <= self.session.max_keepalive_secs,
            "session: need 1 <= min_keepalive_secs <= keepalive_secs <= max_keepalive_secs",
        );
        check((1..=65_536).contains(&self.session.window), "session.window: must be 1 to 65536");
        check(self.session.send_queue_frames >= 1, "session.send_queue_frames: must be at least 1");
        check(
            self.session.send_queue_bytes >= self.limits.max_frame,
            "session.send_queue_bytes: must hold at least one frame of limits.max_frame",
        );
        problems
    }

    /// The protocol limits this configuration enforces on device frames.
    pub fn protocol_limits(&self) -> thingport_protocol::Limits {
        thingport_protocol::Limits {
            max_frame: self.limits.max_frame,
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
    fn the_commented_default_file_is_the_default_configuration() {
        assert_eq!(Config::parse(DEFAULT_CONFIG).unwrap(), Config::default());
    }

    #[test]
    fn the_packaged_configuration_parses_and_names_the_installed_files() {
        let packaged = Config::parse(include_str!("../../packaging/gateway.toml")).unwrap();
        assert_eq!(packaged.tls.cert, PathBuf::from("/etc/thingport/tls/cert.pem"));
        assert_eq!(packaged.auth.secret_file, PathBuf::from("/etc/thingport/provisioning.key"));
        assert_eq!(packaged.upstream.foundations, vec![SocketAddr::from(([127, 0, 0, 1], 7101))]);
        assert_eq!(packaged.upstream.pool_credentials, Some(PathBuf::from("/etc/thingport/pool")));
    }
}
