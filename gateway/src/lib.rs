//! The thingport gateway: the connection server between devices and the foundation pool.
//!
//! It terminates device WSS ([`wss`]) and QUIC ([`quic`]) connections under one set of limits ([`limits`]),
//! authenticates devices by signed token or client certificate without a round trip ([`token`], [`tls`]), runs
//! each device session ([`session`], on the protocol crate's state machine), and multiplexes the sessions' frames
//! over a few batched links to the workers ([`upstream`]). Frames from workers reach sessions through the
//! [`registry`]. Every process serves Prometheus metrics and health on an admin port ([`admin`], [`metrics`]).
//!
//! It does not store anything: device data is acknowledged only once a worker answers that it stored it.
//!
//! Tests and the binary drive it the same way: [`Gateway::bind`] (port 0 is fine), then [`Gateway::run`] with a
//! shutdown future; when that future completes the gateway drains (`GOAWAY`, wait for in-flight data, exit).

pub mod admin;
pub mod cli;
pub mod config;
pub mod limits;
pub mod metrics;
pub mod quic;
pub mod registry;
pub mod session;
pub mod tls;
pub mod token;
pub mod upstream;
pub mod wss;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use socket2::{Domain, Protocol, Socket, Type};
use thingport_protocol::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::limits::Admission;
use crate::registry::Registry;
use crate::tls::ServerTls;
use crate::token::{Revocations, TokenKey};
use crate::upstream::Pool;

/// State every connection task shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub limits: thingport_protocol::Limits,
    pub server_config: ServerConfig,
    pub registry: Arc<Registry>,
    pub pool: Arc<Pool>,
    pub tokens: TokenKey,
    pub revocations: ArcSwap<Revocations>,
    pub tls: ServerTls,
    pub admission: Admission,
    pub drain: watch::Sender<bool>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn draining(&self) -> bool {
        *self.drain.borrow()
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Where a bound gateway listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub wss: Option<SocketAddr>,
    pub quic: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// Reloads certificates and the revocation list of a running gateway (what SIGHUP does).
#[derive(Debug, Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// Reloads the certificate and key, and the revocation list. A certificate that fails to load is refused and
    /// the one in use kept; the error is returned.
    pub fn reload(&self) -> Result<()> {
        let cert = self.shared.tls.cert.reload();
        if cert.is_ok() {
            thingport_shell::admin::certificate_expiry(
                "device",
                self.shared.tls.cert.leaf().as_ref(),
            );
        }
        ::metrics::counter!(metrics::CERT_RELOADS, "result" => if cert.is_ok() { "ok" } else { "refused" })
            .increment(1);
        if let Some(path) = &self.shared.config.auth.revocation_file {
            let list = Revocations::load(path)?;
            tracing::info!(entries = list.len(), "revocation list reloaded");
            self.shared.revocations.store(Arc::new(list));
        }
        cert.context("certificate reload refused; the previous certificate stays in use")
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.shared.registry.len()
    }

    /// Upstream links up now.
    pub fn links_up(&self) -> usize {
        self.shared.pool.links_up()
    }

    /// Version of the partition table the gateway routes by (0 until a worker sent `ROUTES`).
    pub fn routes_version(&self) -> u64 {
        self.shared.pool.routes_version()
    }

    /// The link addresses of the workers this gateway links to: configured ones and those the pool's workers list
    /// (`WORKERS`), not those that left.
    pub fn linked_workers(&self) -> Vec<std::net::SocketAddr> {
        self.shared.pool.linked_workers()
    }
}

/// A gateway with its sockets bound, ready to run.
#[derive(Debug)]
pub struct Gateway {
    shared: Arc<Shared>,
    tcp: Option<TcpListener>,
    quic: Option<quinn::Endpoint>,
    admin: Option<TcpListener>,
    addrs: Addrs,
}

impl Gateway {
    /// Loads certificates and secrets and binds every listener. WSS and QUIC share a port number unless
    /// `listen.quic_address` is set; with port 0 the QUIC socket takes the port the kernel gave WSS.
    pub async fn bind(config: Config) -> Result<Gateway> {
        let tls = ServerTls::new(&config.tls)?;
        let tokens = TokenKey::from_file(&config.auth.secret_file)?;
        let revocations = match &config.auth.revocation_file {
            Some(path) => Revocations::load(path)?,
            None => Revocations::default(),
        };
        let (tcp, udp) = bind_listeners(&config)?;
        let wss_addr = tcp.as_ref().map(TcpListener::local_addr).transpose()?;
        let quic = match udp {
            Some(socket) => Some(quic::endpoint(&config, &tls, socket)?),
            None => None,
        };
        let quic_addr = quic.as_ref().map(quinn::Endpoint::local_addr).transpose()?;
        let admin = match config.admin.address {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding admin to tcp/{addr}"))?,
            ),
            None => None,
        };
        let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
        let registry = Arc::new(Registry::default());
        metrics::handle();
        ::metrics::gauge!(metrics::SESSIONS_LIMIT).set(config.limits.max_sessions as f64);
        thingport_shell::admin::certificate_expiry("device", tls.cert.leaf().as_ref());
        let link_tls = match &config.upstream.pool_credentials {
            Some(dir) => {
                let credentials = thingport_shell::pool::Credentials::load(dir)
                    .context("loading the pool's credentials")?;
                credentials.export_expiry();
                Some(credentials.connector(thingport_shell::pool::LINK_ALPN)?)
            }
            None => None,
        };
        let pool = Pool::new(&config, registry.clone(), link_tls);
        let server_config = ServerConfig {
            handshake_timeout: config.limits.handshake_timeout,
            default_keepalive_secs: config.session.keepalive_secs,
            min_keepalive_secs: config.session.min_keepalive_secs,
            max_keepalive_secs: config.session.max_keepalive_secs,
            window: config.session.window,
            send_window: config.session.send_queue_frames,
            max_frame: config.limits.max_frame as u32,
            max_batch: thingport_protocol::Limits::DEFAULT.max_batch as u32,
        };
        let (drain, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            limits: config.protocol_limits(),
            admission: Admission::new(&config.limits),
            config,
            server_config,
            registry,
            pool,
            tokens,
            revocations: ArcSwap::from_pointee(revocations),
            tls,
            drain,
            next_id: AtomicU64::new(1),
        });
        metrics::handle();
        Ok(Gateway {
            shared,
            tcp,
            quic,
            admin,
            addrs: Addrs { wss: wss_addr, quic: quic_addr, admin: admin_addr },
        })
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    pub fn handle(&self) -> Handle {
        Handle { shared: self.shared.clone() }
    }

    /// Serves until `shutdown` completes, then drains: no new connections, `GOAWAY` to every device, and up to
    /// `session.drain_timeout` for in-flight data to be acknowledged.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Gateway { shared, tcp, quic, admin, .. } = self;
        let stop = CancellationToken::new();
        let listeners = CancellationToken::new();
        shared.pool.start(stop.clone());
        if let Some(tcp) = tcp {
            tokio::spawn(wss::serve(shared.clone(), tcp, listeners.clone()));
        }
        if let Some(endpoint) = quic.clone() {
            tokio::spawn(quic::serve(shared.clone(), endpoint, listeners.clone()));
        }
        if let Some(admin) = admin {
            tokio::spawn(admin::serve(shared.clone(), admin, stop.clone()));
        }
        tracing::info!(id = %shared.config.id, "gateway running");

        shutdown.await;
        let started = Instant::now();
        tracing::info!(sessions = shared.registry.len(), "draining");
        listeners.cancel();
        shared.admission.close();
        let _ = shared.drain.send(true);
        let deadline = started + shared.config.session.drain_timeout;
        while !shared.registry.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = shared.registry.len();
        shared.pool.goaway();
        stop.cancel();
        if let Some(endpoint) = quic {
            endpoint.close(0u32.into(), b"shutdown");
            let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        }
        tracing::info!(left, elapsed_ms = started.elapsed().as_millis() as u64, "drained");
        Ok(())
    }
}

/// Binds the WSS (TCP) and QUIC (UDP) sockets. They share a port number unless `listen.quic_address` is set; with
/// port 0 the kernel picks the TCP port, and if that UDP port is taken both are bound again on another.
fn bind_listeners(config: &Config) -> Result<(Option<TcpListener>, Option<std::net::UdpSocket>)> {
    let listen = &config.listen;
    let bind_udp = |addr: SocketAddr| {
        std::net::UdpSocket::bind(addr).with_context(|| format!("binding QUIC to udp/{addr}"))
    };
    if !listen.wss {
        let udp = listen
            .quic
            .then(|| bind_udp(listen.quic_address.unwrap_or(listen.address)))
            .transpose()?;
        return Ok((None, udp));
    }
    let shared_port = listen.quic && listen.quic_address.is_none();
    let mut attempts = 0;
    loop {
        let tcp = bind_tcp(listen.address, listen.backlog)?;
        if !listen.quic {
            return Ok((Some(tcp), None));
        }
        let addr = match listen.quic_address {
            Some(addr) => addr,
            None => tcp.local_addr()?,
        };
        match bind_udp(addr) {
            Ok(udp) => return Ok((Some(tcp), Some(udp))),
            Err(_) if shared_port && listen.address.port() == 0 && attempts < 16 => attempts += 1,
            Err(e) => return Err(e),
        }
    }
}

fn bind_tcp(addr: SocketAddr, backlog: u32) -> Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding WSS to tcp/{addr}"))?;
    socket.listen(backlog.min(i32::MAX as u32) as i32)?;
    Ok(TcpListener::from_std(socket.into())?)
}
