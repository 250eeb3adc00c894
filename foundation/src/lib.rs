//! The thingport foundation worker: the thing model and the embedded consistent-hash cache ring that every worker
//! of a pool shares, a link server for gateways, and a REST API.
//!
//! Data flow: a gateway's `UPSTREAM` frame is applied to the thing's partition ([`links`], [`model`],
//! [`ring::store`]) and answered with `STORED`; applications read and write through [`api`]; service calls wait in
//! [`calls`] for the device's answer.
//!
//! Built so far: placement ([`ring::placement`]), the model and the partition stores, the link server, the API.
//! Not built yet: a pool of workers sharing the ring (forwarding to a partition's primary, synchronous replication,
//! membership with failure detection, moving partitions on join and leave). Today each worker holds every
//! partition itself, so a worker is a pool of one.

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

use anyhow::{Context, Result};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// State every task of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub store: ring::Store,
    pub links: links::Links,
    pub calls: calls::Calls,
    pub api_keys: HashSet<String>,
}

/// Where a bound worker listens.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub link: SocketAddr,
    pub api: SocketAddr,
    pub admin: Option<SocketAddr>,
}

/// A worker with its sockets bound.
#[derive(Debug)]
pub struct Worker {
    shared: Arc<Shared>,
    link: TcpListener,
    api: TcpListener,
    admin: Option<TcpListener>,
    addrs: Addrs,
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
        let addrs = Addrs {
            link: link.local_addr()?,
            api: api.local_addr()?,
            admin: admin.as_ref().map(TcpListener::local_addr).transpose()?,
        };
        let shared = Arc::new(Shared {
            config,
            store: ring::Store::default(),
            links: links::Links::default(),
            calls: calls::Calls::default(),
            api_keys,
        });
        Ok(Worker { shared, link, api, admin, addrs })
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Serves until `shutdown` completes.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Worker { shared, link, api, admin, .. } = self;
        let stop = CancellationToken::new();
        tokio::spawn(links::serve(shared.clone(), link, stop.clone()));
        let router = api::router(shared.clone());
        let api_stop = stop.clone();
        tokio::spawn(async move {
            let _ =
                axum::serve(api, router).with_graceful_shutdown(api_stop.cancelled_owned()).await;
        });
        if let Some(admin) = admin {
            let handle = metrics_handle();
            let admin_router = axum::Router::new()
                .route("/metrics", axum::routing::get(move || std::future::ready(handle.render())))
                .route("/healthz", axum::routing::get(|| async { "ok\n" }))
                .route("/readyz", axum::routing::get(|| async { "ready\n" }));
            let admin_stop = stop.clone();
            tokio::spawn(async move {
                let _ = axum::serve(admin, admin_router)
                    .with_graceful_shutdown(admin_stop.cancelled_owned())
                    .await;
            });
        }
        tracing::info!(id = %shared.config.id, "foundation worker running");
        shutdown.await;
        stop.cancel();
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
