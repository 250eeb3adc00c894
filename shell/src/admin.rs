//! The admin endpoint both servers serve: `/metrics` (Prometheus text), `/healthz` (the process runs) and
//! `/readyz` (`200` when the server's own readiness check passes, else `503` with the reason).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{PrometheusHandle, PrometheusRecorder};
use tokio::net::TcpListener;

/// How often the recorder folds the histogram samples recorded since the last time into their buckets.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs `recorder` as the process's metrics recorder and starts a thread that folds its histograms every
/// [`UPKEEP_INTERVAL`]: the recorder keeps each histogram sample until a scrape or an upkeep folds it, so a server
/// that nobody scrapes would otherwise grow by 24 bytes for every sample, one or two per frame. If another recorder is
/// already installed (a test process running several components), it stays, and the returned handle renders only
/// what `recorder` sees.
pub fn install(recorder: PrometheusRecorder) -> PrometheusHandle {
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_ok() {
        let kept = handle.clone();
        let upkeep = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                kept.run_upkeep();
            }
        });
        if let Err(e) = upkeep {
            tracing::warn!(error = %e, "cannot start the metrics upkeep thread: histograms grow until scraped");
        }
    }
    handle
}

/// `thingport_build_info{server, version}`, always 1: which program and release answers a scrape.
pub const BUILD_INFO: &str = "thingport_build_info";
/// `thingport_certificate_expiry_timestamp_seconds{cert}`: when a certificate the server presents stops being valid
/// (Unix time), `cert` `device` (the gateway's device-facing certificate), `api` (a worker's HTTPS certificate) or
/// `pool` (this host's pool certificate).
pub const CERT_EXPIRY: &str = "thingport_certificate_expiry_timestamp_seconds";

/// Sets [`BUILD_INFO`] for this process; the recorder must be installed.
pub fn build_info(server: &'static str, version: &'static str) {
    metrics::gauge!(BUILD_INFO, "server" => server, "version" => version).set(1.0);
}

/// Help texts of the metrics this module sets.
pub fn describe_build_info() {
    metrics::describe_gauge!(
        BUILD_INFO,
        "The server and release that answer this scrape (always 1)"
    );
    metrics::describe_gauge!(
        CERT_EXPIRY,
        metrics::Unit::Seconds,
        "When a certificate the server presents expires (Unix time), by cert (device, api, pool)"
    );
}

/// Sets [`CERT_EXPIRY`] for `cert` from the leaf certificate `der` (nothing if it does not parse).
pub fn certificate_expiry(cert: &'static str, der: &[u8]) {
    if let Ok((_, parsed)) = x509_parser::parse_x509_certificate(der) {
        let not_after = parsed.validity().not_after.timestamp();
        metrics::gauge!(CERT_EXPIRY, "cert" => cert).set(not_after as f64);
    }
}

/// A server's readiness: `Ok(detail)` when ready, `Err(reason)` when not.
pub type Readiness = Result<String, String>;

/// The admin router; `ready` is asked on every `/readyz`.
pub fn router(
    metrics: PrometheusHandle,
    ready: impl Fn() -> Readiness + Send + Sync + 'static,
) -> Router {
    let ready = Arc::new(ready);
    Router::new()
        .route("/metrics", get(move || std::future::ready(metrics.render())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let answer = match ready() {
                    Ok(detail) => (StatusCode::OK, format!("{detail}\n")),
                    Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
                };
                std::future::ready(answer)
            }),
        )
}

/// Serves `router` on `listener` until `shutdown` completes; a failure is logged.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(shutdown).await {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}
