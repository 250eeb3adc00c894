//! The admin endpoint both servers serve: `/metrics` (Prometheus text), `/healthz` (the process runs) and
//! `/readyz` (`200` when the server's own readiness check passes, else `503` with the reason).

use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

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
