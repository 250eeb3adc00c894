//! The thingport foundation worker: the thing model and the embedded consistent-hash cache ring that every worker
//! of a pool shares, a link server for gateways, and a REST API.
//!
//! Data flow: a gateway's `UPSTREAM` frame becomes an operation on the thing's partition ([`links`]), which the
//! partition's primary applies and replicates to its backups, and each keeps in its store ([`storage`]), before the
//! worker answers `STORED` ([`ring`]; when depends on `durability`); applications read and write through [`api`];
//! service calls wait in [`calls`] for the device's answer, which may reach any worker and is passed on to the
//! caller's. A worker that starts loads what its store holds before it joins the pool.

pub mod api;
pub mod calls;
pub mod cli;
pub mod config;
pub mod console;
pub mod coord;
pub mod json;
pub mod keys;
pub mod links;
pub mod locks;
pub mod model;
pub mod ring;
pub mod services;
pub mod sse;
pub mod storage;
pub mod streams;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use config::Config;
use storage::{Provider, Storage};

/// State every task of a worker shares.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub cluster: Arc<ring::Cluster>,
    pub links: Arc<links::Links>,
    pub keys: keys::Keys,
    pub failures: keys::Failures,
    pub streams: Arc<streams::Streams>,
    pub coord: Arc<coord::Consensus>,
    pub singleton: Arc<coord::singleton::Singleton>,
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
    config: Config,
    keys: keys::Keys,
    link: TcpListener,
    api: TcpListener,
    admin: Option<TcpListener>,
    peer: TcpListener,
    udp: UdpSocket,
    addrs: Addrs,
    storage: Arc<Storage>,
    version: watch::Sender<u64>,
    pool: Option<thingport_shell::pool::Credentials>,
    api_tls: Option<Arc<rustls::ServerConfig>>,
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
        metrics_handle();
        let keys = keys::Keys::load(&config.api_keys_file)?;
        let api_tls = match (&config.api_tls_cert, &config.api_tls_key) {
            (Some(cert), Some(key)) => Some(
                thingport_shell::https::server_config(cert, key)
                    .context("the API's certificate")?,
            ),
            _ => None,
        };
        let pool = match &config.pool_credentials {
            Some(dir) => {
                let credentials = thingport_shell::pool::Credentials::load(dir)
                    .context("loading the pool's credentials")?;
                if credentials.member() != thingport_shell::pool::Member::Worker
                    || credentials.swim().is_none()
                {
                    anyhow::bail!(
                        "{} holds a gateway's pool credentials; a worker needs a worker's (`pool issue --role worker`)",
                        dir.display()
                    );
                }
                Some(credentials)
            }
            None => None,
        };
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
        let storage = Storage::new(storage::QueueConfig {
            max_queued: config.storage.queue,
            retry: Duration::from_millis(100),
        });
        Ok(Worker {
            config,
            keys,
            link,
            api,
            admin,
            peer,
            udp,
            addrs,
            storage,
            version: watch::channel(0).0,
            pool,
            api_tls,
        })
    }

    /// The committed partition table's version (0 before the first), as it changes.
    pub fn table_version(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// Serves until `shutdown` completes. The admin endpoints answer at once (`/readyz` says what the worker waits
    /// for); the store is opened — retrying until it opens — and what it holds is loaded before the worker joins
    /// the pool and serves links and the API.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Worker {
            config,
            keys,
            link,
            api,
            admin,
            peer,
            udp,
            addrs,
            storage,
            version,
            pool,
            api_tls,
        } = self;
        metrics_handle();
        if let Some(pool) = &pool {
            pool.export_expiry();
        }
        use thingport_shell::pool::{LINK_ALPN, Member, PEER_ALPN};
        // links take a gateway's certificate or a worker's; the peer port a worker's only
        let acceptor = |alpn, from| pool.as_ref().map(|p| p.acceptor(alpn, from)).transpose();
        let link_tls = acceptor(LINK_ALPN, Member::Gateway)?;
        let peer_tls = acceptor(PEER_ALPN, Member::Worker)?;
        let stop = CancellationToken::new();
        let storage_stop = CancellationToken::new();
        let cluster_cell: Arc<OnceLock<Arc<ring::Cluster>>> = Arc::new(OnceLock::new());
        if let Some(admin) = admin {
            tokio::spawn(serve_admin(admin, storage.clone(), cluster_cell.clone(), stop.clone()));
        }
        let singleton = Arc::new(coord::singleton::Singleton::default());
        tokio::spawn(storage.clone().run(opener(&config, &singleton), storage_stop.clone()));
        tokio::pin!(shutdown);
        let started = Instant::now();
        let cluster = tokio::select! {
            _ = &mut shutdown => {
                storage_stop.cancel();
                stop.cancel();
                return Ok(());
            }
            cluster = start_ring(&config, addrs, udp, storage.clone(), version, pool.as_ref(), stop.clone()) => cluster,
        };
        let (cluster, leaving) = cluster?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store loaded; joining the pool"
        );
        let _ = cluster_cell.set(cluster.clone());
        let coord = coord::Consensus::start(
            &cluster,
            &config.storage.data_dir,
            config.locks.clone(),
            config.request_timeout,
        )
        .await
        .context("starting the consensus member")?;
        let _ = cluster.coord.set(coord.clone());
        let coord_stop = CancellationToken::new();
        let coord_task = tokio::spawn(coord.clone().run(coord_stop.clone()));
        tokio::spawn(coord.clone().keep_lease(coord_stop.clone()));
        let singleton_stop = CancellationToken::new();
        let singleton_task = tokio::spawn(singleton.clone().run(
            coord.clone(),
            config.id.clone(),
            config.locks.singleton_ttl,
            singleton_stop.clone(),
        ));
        let failures = keys::Failures::default();
        let links = Arc::new(links::Links::default());
        let _ = cluster.links.set(links.clone());
        let streams = streams::Streams::new(cluster.clone(), config.streams.clone(), stop.clone());
        let shared =
            Arc::new(Shared { config, cluster, links, keys, failures, streams, coord, singleton });
        let peer_cluster = shared.cluster.clone();
        let handler = move |request| {
            let cluster = peer_cluster.clone();
            async move { cluster.handle(request).await }
        };
        tokio::spawn(ring::peers::serve(
            peer,
            shared.config.max_peer_message,
            handler,
            peer_tls,
            stop.clone(),
        ));
        tokio::spawn(shared.cluster.clone().coordinate(stop.clone()));
        let drain = stop.child_token();
        let links = tokio_util::task::TaskTracker::new();
        tokio::spawn(links::serve(
            shared.clone(),
            link,
            link_tls,
            drain.clone(),
            stop.clone(),
            links.clone(),
        ));
        let router = api::router(shared.clone());
        let api_stop = stop.clone();
        tokio::spawn(async move {
            // the client's address: an address that keeps sending unknown keys is slowed down
            let service =
                router.into_make_service_with_connect_info::<thingport_shell::https::ClientAddr>();
            match thingport_shell::https::ApiListener::new(api, api_tls, api_stop.clone()) {
                Ok(listener) => {
                    let stopped = api_stop.cancelled_owned();
                    let _ = axum::serve(listener, service).with_graceful_shutdown(stopped).await;
                }
                Err(e) => tracing::error!(error = %e, "the API cannot listen"),
            }
        });
        if addrs.link.ip().is_unspecified() {
            tracing::warn!(link = %addrs.link, "link_address is unspecified: gateways cannot learn this worker from WORKERS; name the host's address");
        }
        tracing::info!(id = %shared.config.id, "foundation worker running");
        let mut leaving = leaving;
        let ended = tokio::select! {
            _ = &mut shutdown => false,
            _ = &mut leaving => true,
        };
        // the singleton role is released while the pool is still reachable, so another worker takes it at once
        singleton_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), singleton_task).await;
        // gateways are told GOAWAY and what they already sent is answered before the links close
        drain.cancel();
        links.close();
        let timeout = shared.config.link_drain_timeout;
        if tokio::time::timeout(timeout, links.wait()).await.is_err() {
            tracing::warn!(
                links = links.len(),
                "gateway links still busy after link_drain_timeout; closing them"
            );
        }
        // the peer port closes with `stop`, and a coordinator may take the refusals for this worker being gone:
        // it acknowledges nothing more from here
        shared.coord.give_up_lease();
        stop.cancel();
        coord_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), coord_task).await;
        // what was acknowledged before it was stored (durability memory or replicated) is written before exit
        if let Err(e) = storage.flush(Instant::now() + Duration::from_secs(5)).await {
            tracing::warn!(error = %e, queued = storage.queued(), "the store did not take everything queued before exit");
        }
        storage_stop.cancel();
        if ended {
            // membership ended by itself: this worker can no longer take part in the pool
            anyhow::bail!("membership ended; exiting so that the worker restarts as a new member");
        }
        // the others then change the table at once instead of waiting to detect a failure
        let _ = tokio::time::timeout(Duration::from_secs(1), leaving).await;
        Ok(())
    }
}

/// Opening a store.
type OpenFuture = std::pin::Pin<Box<dyn Future<Output = Result<Arc<dyn Provider>>> + Send>>;

/// How the configured store is opened (on a blocking thread for SQLite).
fn opener(
    config: &Config,
    singleton: &Arc<coord::singleton::Singleton>,
) -> impl Fn() -> OpenFuture + use<> {
    let singleton = singleton.clone();
    let storage = config.storage.clone();
    let fsync = config.durability == storage::Durability::Disk;
    let limits = config.limits();
    move || {
        let storage = storage.clone();
        let singleton = singleton.clone();
        Box::pin(async move {
            let retention = storage::Retention {
                max_age: storage.max_age,
                max_values: storage.max_values,
                max_events: storage.max_events,
            };
            let provider: Arc<dyn Provider> = match storage.provider {
                config::ProviderKind::Sqlite => {
                    let options = storage::sqlite::Options {
                        dir: storage.data_dir.clone(),
                        fsync,
                        retention,
                        limits,
                        readers: 2,
                        retention_period: storage::sqlite::RETENTION_PERIOD,
                        fold_after: storage::sqlite::COMPACT_AGE,
                    };
                    let opened =
                        tokio::task::spawn_blocking(move || storage::sqlite::Sqlite::open(options))
                            .await
                            .context("opening the store")??;
                    Arc::new(opened)
                }
                config::ProviderKind::Postgres => Arc::new(
                    storage::postgres::Postgres::open(
                        &storage.postgres_url,
                        retention,
                        limits,
                        singleton,
                    )
                    .await?,
                ),
            };
            Ok(provider)
        })
    }
}

/// Waits for the store, loads what it holds, and joins the pool: membership, then the ring.
async fn start_ring(
    config: &Config,
    addrs: Addrs,
    udp: UdpSocket,
    storage: Arc<Storage>,
    version: watch::Sender<u64>,
    pool: Option<&thingport_shell::pool::Credentials>,
    stop: CancellationToken,
) -> Result<(Arc<ring::Cluster>, tokio::task::JoinHandle<()>)> {
    storage.opened().await;
    let boot = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let me = ring::membership::Node {
        name: config.id.clone(),
        addr: addrs.peer,
        link: addrs.link,
        boot,
        renewal: 0,
    };
    let ring_config = ring::RingConfig {
        replicas: config.replicas,
        bootstrap_members: config.bootstrap_members,
        write_timeout: config.write_timeout,
        request_timeout: config.request_timeout,
        check_period: config.probe_period,
        // a worker without seeds is the pool's first: nobody can send it a table
        settle: if config.seeds.is_empty() { Duration::ZERO } else { config.probe_period * 4 },
        limits: config.limits(),
        max_message: config.max_peer_message,
        durability: config.durability,
        peer_tls: pool.map(|p| p.connector(thingport_shell::pool::PEER_ALPN)).transpose()?,
        change_log: (config.streams.log_changes, config.streams.log_bytes),
        partition_loss: config.partition_loss,
    };
    let timing = ring::membership::Timing {
        probe_period: config.probe_period,
        suspect_timeout: config.suspect_timeout,
    };
    // the ring's handle on membership exists before membership runs, so that nothing is announced before the
    // state is loaded
    let seal = pool.and_then(thingport_shell::pool::Credentials::swim);
    let (membership, start) =
        ring::membership::prepare(me, udp, config.seeds.clone(), timing, seal, stop.child_token());
    let cluster = ring::Cluster::new(&membership, ring_config, storage.clone(), version);
    let mut pause = Duration::from_millis(100);
    loop {
        match cluster.recover().await {
            Ok(_) => break,
            Err(e) => {
                tracing::error!(error = %e, "cannot load the store; retrying");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
        }
    }
    let leaving = start();
    Ok((cluster, leaving))
}

/// `/metrics`, `/healthz` and `/readyz` until `stop`.
async fn serve_admin(
    admin: TcpListener,
    storage: Arc<Storage>,
    cluster: Arc<OnceLock<Arc<ring::Cluster>>>,
    stop: CancellationToken,
) {
    // ready once the store is writable and this worker has a current partition table (one whose members are the
    // running workers) and sees a majority of its members: before that it can store nothing
    let ready = move || match (storage.health(), cluster.get()) {
        (storage::Health::Opening(m), _) => Err(format!("opening the store: {m}")),
        (storage::Health::Failing(m), _) => Err(format!("the store is failing: {m}")),
        (storage::Health::Ok, None) => Err("loading the store".to_string()),
        (storage::Health::Ok, Some(c)) if !c.is_current() => {
            Err("no current partition table yet".to_string())
        }
        (storage::Health::Ok, Some(c)) if !c.in_contact() => {
            Err("no primary lease from the consensus group".to_string())
        }
        (storage::Health::Ok, Some(_)) => Ok("ready".to_string()),
    };
    // the per-operation series exist from the start, at 0, so a scrape tells "none yet" from "not exported"
    per_op();
    let router = thingport_shell::admin::router(metrics_handle(), ready);
    thingport_shell::admin::serve(admin, router, stop.cancelled_owned()).await;
}

/// Handles of the counters a worker updates for every device frame or ring operation, registered once: a
/// `counter!` call looks its key up in the recorder's registry each time (see the gateway's `metrics::per_frame`).
#[derive(Debug)]
pub(crate) struct PerOp {
    pub ring_writes: metrics::Counter,
    pub ring_reads: metrics::Counter,
    pub ring_replications: metrics::Counter,
    pub frames_stored: metrics::Counter,
    pub frames_forwarded: metrics::Counter,
}

/// The per-operation handles, bound to the recorder [`metrics_handle`] installs.
pub(crate) fn per_op() -> &'static PerOp {
    static PER_OP: OnceLock<PerOp> = OnceLock::new();
    PER_OP.get_or_init(|| {
        metrics_handle();
        PerOp {
            ring_writes: metrics::counter!(crate::telemetry::RING_WRITES_TOTAL),
            ring_reads: metrics::counter!(crate::telemetry::RING_READS_TOTAL),
            ring_replications: metrics::counter!(crate::telemetry::RING_REPLICATIONS_TOTAL),
            frames_stored: metrics::counter!(crate::telemetry::FOUNDATION_FRAMES_STORED_TOTAL),
            frames_forwarded: metrics::counter!(
                crate::telemetry::FOUNDATION_FRAMES_FORWARDED_TOTAL
            ),
        }
    })
}

/// The process's Prometheus recorder (installed on first use).
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = thingport_shell::admin::install(
                metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder(),
            );
            telemetry::describe();
            telemetry::register_zeroes();
            thingport_shell::admin::build_info("foundation", env!("CARGO_PKG_VERSION"));
            handle
        })
        .clone()
}
