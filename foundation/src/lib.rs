//! The thingport foundation worker: the thing model and the embedded consistent-hash cache ring that every worker
//! of a pool shares, a link server for gateways, and a REST API.
//!
//! Data flow: a gateway's `UPSTREAM` frame becomes an operation on the thing's partition ([`links`]), which the
//! partition's primary applies and replicates to its backups before the worker answers `STORED` ([`ring`]);
//! applications read and write through [`api`]; service calls wait in [`calls`] for the device's answer, which
//! may reach any worker and is passed on to the caller's.

pub mod api;
pub mod calls;
pub mod config;
pub mod json;
pub mod links;
pub mod model;
pub mod ring;

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UdpSocket};
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// State every task of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub cluster: Arc<ring::Cluster>,
    pub links: links::Links,
    pub api_keys: HashSet<String>,
}

/// Where a bound worker listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub link: SocketAddr,
    pub api: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// UDP (membership) and TCP (ring requests), same port.
    pub peer: SocketAddr,
}

/// A worker with its sockets bound.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    link: TcpListener,
    api: TcpListener,
    admin: Option<TcpListener>,
    peer: TcpListener,
    addrs: Addrs,
    stop: CancellationToken,
    /// Ends once membership has announced this worker's departure.
    leaving: tokio::task::JoinHandle<()>,
}

/// Binds UDP and TCP on the same port: the configured one, or with port 0 one that is free for both.
async fn bind_peer(addr: SocketAddr) -> Result<(UdpSocket, TcpListener)> {
    let mut last = None;
    for _ in 0..if addr.port() == 0 { 32 } else { 1 } {
        let udp = UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding membership to udp/{addr}"))?;
        let bound = udp.local_addr()?;
        match TcpListener::bind(bound).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) => last = Some(e),
        }
    }
    let e = last.map_or_else(|| anyhow::anyhow!("no port"), anyhow::Error::from);
    Err(e.context(format!("binding ring requests to tcp/{addr}")))
}

impl Worker {
    pub async fn bind(config: Config) -> Result<Worker> {
        let keys = std::fs::read_to_string(&config.api_keys_file)
            .with_context(|| format!("reading {}", config.api_keys_file.display()))?;
        let api_keys = api::parse_keys(&keys);
        let link = TcpListener::bind(config.link_address)
            .await
            .with_context(|| format!("binding links to tcp/{}", config.link_address))?;
        let api = TcpListener::bind(config.api_address)
            .await
            .with_context(|| format!("binding the API to tcp/{}", config.api_address))?;
        let admin = match config.admin_address {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding admin to tcp/{addr}"))?,
            ),
            None => None,
        };
        let (udp, peer) = bind_peer(config.peer_address).await?;
        let addrs = Addrs {
            link: link.local_addr()?,
            api: api.local_addr()?,
            admin: admin.as_ref().map(TcpListener::local_addr).transpose()?,
            peer: peer.local_addr()?,
        };
        let boot = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let me =
            ring::membership::Node { name: config.id.clone(), addr: addrs.peer, boot, renewal: 0 };
        let stop = CancellationToken::new();
        let timing = ring::membership::Timing {
            probe_period: config.probe_period,
            suspect_timeout: config.suspect_timeout,
        };
        let (membership, leaving) =
            ring::membership::start(me, udp, config.seeds.clone(), timing, stop.child_token());
        let ring_config = ring::RingConfig {
            replicas: config.replicas,
            bootstrap_members: config.bootstrap_members,
            write_timeout: config.write_timeout,
            request_timeout: config.request_timeout,
            check_period: config.probe_period,
            // a worker without seeds is the pool's first: nobody can send it a table
            settle: if config.seeds.is_empty() {
                std::time::Duration::ZERO
            } else {
                config.probe_period * 4
            },
            limits: config.limits(),
            max_message: config.max_peer_message,
        };
        let cluster = Arc::new(ring::Cluster::new(&membership, ring_config));
        let shared = Arc::new(Shared { config, cluster, links: links::Links::default(), api_keys });
        Ok(Worker { shared, link, api, admin, peer, addrs, stop, leaving })
    }

    /// The ring as this worker sees it.
    pub fn cluster(&self) -> Arc<ring::Cluster> {
        self.shared.cluster.clone()
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Worker { shared, link, api, admin, peer, stop, leaving, .. } = self;
        let cluster = shared.cluster.clone();
        let handler = move |request| {
            let cluster = cluster.clone();
            async move { cluster.handle(request).await }
        };
        tokio::spawn(ring::peers::serve(
            peer,
            shared.config.max_peer_message,
            handler,
            stop.clone(),
        ));
        tokio::spawn(shared.cluster.clone().coordinate(stop.clone()));
        tokio::spawn(links::serve(shared.clone(), link, stop.clone()));
        let router = api::router(shared.clone());
        let api_stop = stop.clone();
        tokio::spawn(async move {
            let _ =
                axum::serve(api, router).with_graceful_shutdown(api_stop.cancelled_owned()).await;
        });
        if let Some(admin) = admin {
            let handle = metrics_handle();
            let cluster = shared.cluster.clone();
            let ready = move || {
                // ready once this worker has a partition table and sees a majority of its members: before that
                // it can store nothing
                let ready = cluster.table().is_some_and(|t| cluster.has_quorum(&t));
                let status = if ready {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::SERVICE_UNAVAILABLE
                };
                std::future::ready((
                    status,
                    if ready { "ready\n" } else { "no partition table yet\n" },
                ))
            };
            let admin_router = axum::Router::new()
                .route("/metrics", axum::routing::get(move || std::future::ready(handle.render())))
                .route("/healthz", axum::routing::get(|| async { "ok\n" }))
                .route("/readyz", axum::routing::get(ready));
            let admin_stop = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(admin, admin_router)
                    .with_graceful_shutdown(admin_stop.cancelled_owned())
                    .await;
            });
        }
        tracing::info!(id = %shared.config.id, "foundation worker running");
        let mut leaving = leaving;
        tokio::select! {
            _ = shutdown => {}
            _ = &mut leaving => {
                // membership ended by itself: this worker can no longer take part in the pool
                stop.cancel();
                anyhow::bail!("membership ended; exiting so that the worker restarts as a new member");
            }
        }
        stop.cancel();
        // the others then change the table at once instead of waiting to detect a failure
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), leaving).await;
        Ok(())
    }
}

/// The process's Prometheus recorder (installed on first use).
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
