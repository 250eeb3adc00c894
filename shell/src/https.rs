//! HTTPS for a server's HTTP API: a listener for `axum::serve` that accepts TCP connections and completes their TLS
//! handshakes in tasks of their own, so that a slow or silent client holds up no other. Without a certificate it
//! hands the TCP connections on as they are (plain HTTP).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::either::Either;
use tokio_util::sync::CancellationToken;

/// How long a client has to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; past it, accepting waits.
pub const MAX_HANDSHAKES: usize = 256;

/// The certificates of a PEM file, the leaf first; an error if it holds none.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificate {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificate {}", path.display()))?;
    if chain.is_empty() {
        bail!("no certificate in {}", path.display());
    }
    Ok(chain)
}

/// A TLS server configuration (TLS 1.3 and 1.2, ALPN `http/1.1`) from a PEM certificate chain and key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let chain = read_chain(cert)?;
    crate::admin::certificate_expiry("api", chain[0].as_ref());
    let key_der = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading private key {}", key.display()))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .with_context(|| format!("{} and {}", cert.display(), key.display()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// A connection of the API: plain TCP or TLS.
pub type ApiStream = Either<TcpStream, TlsStream<TcpStream>>;

/// The client's address, for `into_make_service_with_connect_info::<ClientAddr>()`.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

impl Connected<IncomingStream<'_, ApiListener>> for ClientAddr {
    fn connect_info(stream: IncomingStream<'_, ApiListener>) -> Self {
        ClientAddr(*stream.remote_addr())
    }
}

/// Connections ready for HTTP: accepted, and with TLS, past their handshake.
#[derive(Debug)]
pub struct ApiListener {
    ready: mpsc::Receiver<(ApiStream, SocketAddr)>,
    local: SocketAddr,
}

impl ApiListener {
    /// Accepts on `tcp` until `stop`; with `tls`, each connection's handshake runs in a task of its own.
    pub fn new(
        tcp: TcpListener,
        tls: Option<Arc<ServerConfig>>,
        stop: CancellationToken,
    ) -> Result<ApiListener> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let acceptor = tls.map(TlsAcceptor::from);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = tcp.accept() => accepted,
                };
                let (stream, addr) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "API accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Some(acceptor) = acceptor.clone() else {
                    if tx.send((Either::Left(stream), addr)).await.is_err() {
                        return;
                    }
                    continue;
                };
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            drop(permit);
                            let _ = tx.send((Either::Right(tls), addr)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "API TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%addr, "API TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(ApiListener { ready, local })
    }
}

impl Listener for ApiListener {
    type Io = ApiStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(ready) => ready,
            // the accepting task ended (the server stops): no connection will come
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
