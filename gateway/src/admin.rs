//! The gateway's admin endpoint (the shared router of [`thingport_shell::admin`]): `/metrics`, `/healthz`, and
//! `/readyz` — ready when it can take devices: not draining, and at least one upstream link up.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::metrics;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    let ready = move || {
        let links = shared.pool.links_up();
        if shared.draining() {
            Err("draining".to_string())
        } else if links == 0 {
            Err("no upstream link is up".to_string())
        } else {
            Ok(format!("ready: {links} upstream links up, {} sessions", shared.registry.len()))
        }
    };
    let router = thingport_shell::admin::router(metrics::handle().clone(), ready);
    thingport_shell::admin::serve(listener, router, cancel.cancelled_owned()).await;
}
