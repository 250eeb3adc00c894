//! A worker with `api_tls_cert` and `api_tls_key` serves its API over HTTPS only.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use support::{KEY, within};
use thingport_foundation::{Config as WorkerConfig, Worker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_api_answers_https_and_not_plain_http_when_it_has_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = thingport_gateway::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    let config = WorkerConfig {
        link_address: "127.0.0.1:0".parse().unwrap(),
        api_address: "127.0.0.1:0".parse().unwrap(),
        peer_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: None,
        api_keys_file: support::api_keys(dir.path()),
        api_tls_cert: Some(dir.path().join("cert.pem")),
        api_tls_key: Some(dir.path().join("key.pem")),
        storage: thingport_foundation::config::StorageConfig {
            data_dir: dir.path().join("store"),
            ..Default::default()
        },
        ..WorkerConfig::default()
    };
    let worker = Worker::bind(config).await.unwrap();
    let api = worker.addrs().api;
    let mut version = worker.table_version();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(worker.run(async move {
        let _ = stopped.await;
    }));
    within("the first table", version.wait_for(|v| *v > 0)).await.unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut tls =
        tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp).await.unwrap();
    let request = format!(
        "GET /v1/cluster HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nx-api-key: {KEY}\r\n\r\n"
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    let _ = within("the HTTPS answer", tls.read_to_string(&mut response)).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("this_member"), "{response}");

    // plain HTTP on the same port gets no answer: the connection fails its TLS handshake
    let mut plain = tokio::net::TcpStream::connect(api).await.unwrap();
    plain.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = within("plain HTTP", plain.read_to_end(&mut answer)).await;
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&answer)
    );
    let _ = stop.send(());
}
