//! thingport-device: the Rust device SDK for thingport, on the wire formats of `thingport-protocol` and nothing
//! of the servers.
//!
//! - [`Client`] is what a device application uses: it connects over WSS or QUIC, sends `HELLO`, reports property
//!   batches and events that the server acknowledges ([`Handle::wait_acked`]), sends again everything
//!   unacknowledged after a reconnect, reconnects with exponential [`Backoff`] and full jitter, and passes property
//!   writes and service calls to a [`Handler`]. With an [`Outbox`] file it keeps unacknowledged frames across
//!   reboots (store-and-forward).
//! - [`Device`] is one connection driven by the caller (what the load generator runs thousands of), and
//!   [`FrameConn`] moves whole frames over a transport; [`Endpoint`] says where and with which TLS.
//!
//! It does not provision devices: the token comes from `thingport-gateway token issue`, the client certificate
//! for mutual TLS from the operator's CA. The wire protocol is specified in `docs/PROTOCOL.md`.
//!
//! # Example
//!
//! Report a temperature every second and answer the service `echo`, against `thingport-demo` (which prints the
//! certificate path and a token). `examples/device.rs` is the same as a program.
//!
//! ```no_run
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//!
//! use thingport_device::{Client, Endpoint, Handler, Options, Transport};
//! use thingport_protocol::{Credential, PropertyUpdate, Quality, ServiceRequest, ServiceResult, Value};
//!
//! struct Echo;
//!
//! impl Handler for Echo {
//!     fn service_call(&mut self, call: &ServiceRequest) -> Option<ServiceResult> {
//!         Some(ServiceResult::Ok(call.params.clone()))
//!     }
//! }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let trusted = thingport_device::read_certificates("/tmp/thingport-demo/cert.pem")?;
//! let endpoint = Endpoint::new("127.0.0.1:8443".parse()?, "localhost", Transport::Wss, &trusted)?;
//! let mut options = Options::new(endpoint, "demo-device", Credential::Token("TOKEN".into()));
//! options.outbox = Some("outbox.log".into()); // resend after a reboot what was never acknowledged
//! let (client, handle) = Client::new(options)?;
//! tokio::spawn(client.run(Echo, std::future::pending()));
//! loop {
//!     let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
//!     let seq = handle
//!         .properties(vec![PropertyUpdate {
//!             name: "temperature".into(),
//!             timestamp_ms: now,
//!             quality: Quality::Good,
//!             value: Value::Float(21.5),
//!         }])
//!         .await?;
//!     handle.wait_acked(seq).await?; // stored by the server
//!     tokio::time::sleep(Duration::from_secs(1)).await;
//! }
//! # }
//! ```

pub mod backoff;
pub mod client;
pub mod conn;
pub mod device;
pub mod outbox;

pub use backoff::Backoff;
pub use client::{Client, ClientError, Handle, Handler, NoHandler, Options};
pub use conn::{
    Closed, Endpoint, FrameConn, Identity, Transport, tls_config, tls_config_with_identity,
};
pub use device::{Device, DeviceError};
pub use outbox::Outbox;

/// The certificates of a PEM file (a gateway's self-signed certificate, or a CA bundle), to trust.
pub fn read_certificates(
    path: impl AsRef<std::path::Path>,
) -> anyhow::Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    let path = path.as_ref();
    rustls::pki_types::CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", path.display()))
}
