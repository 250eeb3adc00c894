//! The admin HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process runs) and `/readyz` (it can take
//! devices: not draining, and at least one upstream link up).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::metrics;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    let router = Router::new()
        .route("/metrics", get(|| async { metrics::handle().render() }))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(shared);
    let served =
        axum::serve(listener, router).with_graceful_shutdown(cancel.cancelled_owned()).await;
    if let Err(e) = served {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}

async fn ready(State(shared): State<Arc<Shared>>) -> (StatusCode, String) {
    let links = shared.pool.links_up();
    if shared.draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
    } else if links == 0 {
        (StatusCode::SERVICE_UNAVAILABLE, "no upstream link is up\n".into())
    } else {
        (
            StatusCode::OK,
            format!("ready: {links} upstream links up, {} sessions\n", shared.registry.len()),
        )
    }
}
