//! HTTPS for a server's HTTP API: a listener for `axum::serve` that accepts TCP connections and completes their TLS
//! handshakes in tasks of their own, so that a slow or silent client holds up no other: at most
//! [`MAX_HANDSHAKES`] run at once, [`MAX_HANDSHAKES_PER_ADDRESS`] from one address, each within
//! [`HANDSHAKE_TIMEOUT`], and a connection past either bound is closed at once rather than queued. Once past its
//! handshake a connection is axum's, which bounds no header or idle time. Without a certificate it
//! hands the TCP connections on as they are (plain HTTP).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
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
/// TLS handshakes in progress at once; past it, a new connection is closed at once.
pub const MAX_HANDSHAKES: usize = 256;
/// TLS handshakes in progress at once from one address; past it, its new connections are closed at once.
pub const MAX_HANDSHAKES_PER_ADDRESS: usize = 16;

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
        let per_address: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
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
                // neither the pool of handshakes nor one address's share of it is waited for: a client that holds
                // handshakes open gets its next connections closed, and the others go on
                let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                    tracing::debug!(%addr, "API connection closed: every TLS handshake slot is taken");
                    continue;
                };
                let Some(share) = PerAddress::take(&per_address, addr.ip()) else {
                    tracing::debug!(%addr, "API connection closed: too many TLS handshakes from this address");
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let handshake =
                        tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await;
                    drop((permit, share));
                    match handshake {
                        Ok(Ok(tls)) => {
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

/// One address's share of the handshakes in progress, given back when dropped.
struct PerAddress {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    addr: IpAddr,
}

impl PerAddress {
    fn take(counts: &Arc<Mutex<HashMap<IpAddr, usize>>>, addr: IpAddr) -> Option<PerAddress> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(addr).or_insert(0);
        if *count >= MAX_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *count += 1;
        Some(PerAddress { counts: counts.clone(), addr })
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.addr) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.addr);
            }
        }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn an_address_that_holds_handshakes_open_is_closed_on_and_others_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let config =
            server_config(&dir.path().join("cert.pem"), &dir.path().join("key.pem")).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let stop = CancellationToken::new();
        let mut listener = ApiListener::new(tcp, Some(config), stop.clone()).unwrap();

        // connections that send nothing hold their handshakes open; accepted in order, so the next one from the
        // same address finds its share taken and is closed at once
        let mut silent = Vec::new();
        for _ in 0..MAX_HANDSHAKES_PER_ADDRESS {
            silent.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut refused = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(HANDSHAKE_TIMEOUT / 2, refused.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "closed before any handshake timed out: {read:?}"
        );

        // another address is served meanwhile
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        let other = socket.connect(addr).await.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert.der().clone()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let connecting = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, other);
        let (served, _) = tokio::join!(connecting, listener.accept());
        assert!(served.is_ok());
        stop.cancel();
    }
}
