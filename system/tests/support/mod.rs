//! Helpers shared by the foundation's integration tests: a gateway in front of given workers, devices with tokens,
//! a minimal HTTP client for the API.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a different part")]

pub mod process;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value as Json;
use thingport_device::{Device, Endpoint, Transport};
use thingport_gateway::token::TokenKey;
use thingport_gateway::{Config as GatewayConfig, Gateway};
use thingport_protocol::{ByteString, Credential, DeviceConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const SECRET: &[u8] = b"system-test-secret-system-test-secret-01";
pub const KEY: &str = "app-key-1";

/// Writes the application keys file into `dir`.
pub fn api_keys(dir: &std::path::Path) -> std::path::PathBuf {
    let keys = dir.join("api-keys");
    let hash: String =
        thingport_foundation::keys::hash(KEY).iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&keys, format!("# test\nsha256:{hash} role=admin name=test\n")).unwrap();
    keys
}

/// A gateway linked to `foundations`, with a self-signed certificate in `dir`.
pub struct TestGateway {
    pub endpoint: Endpoint,
    pub handle: thingport_gateway::Handle,
    pub stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn gateway(dir: &std::path::Path, foundations: Vec<SocketAddr>) -> TestGateway {
    gateway_tuned(dir, foundations, |_| {}).await
}

/// [`gateway`], with `tune` applied to its configuration last.
pub async fn gateway_tuned(
    dir: &std::path::Path,
    foundations: Vec<SocketAddr>,
    tune: impl FnOnce(&mut GatewayConfig),
) -> TestGateway {
    let (cert, key) = thingport_gateway::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.join("key.pem"), key).unwrap();
    std::fs::write(dir.join("secret"), SECRET).unwrap();
    let mut config = GatewayConfig::default();
    config.listen.address = "127.0.0.1:0".parse().unwrap();
    config.admin.address = None;
    config.tls.cert = dir.join("cert.pem");
    config.tls.key = dir.join("key.pem");
    config.auth.secret_file = dir.join("secret");
    // a worker that stops answering loses its links within a second, and their frames go to the others
    config.upstream.heartbeat = Duration::from_millis(250);
    let links = foundations.len() * config.upstream.links_per_foundation;
    config.upstream.foundations = foundations;
    tune(&mut config);
    let gateway = Gateway::bind(config).await.unwrap();
    let wss = gateway.addrs().wss.unwrap();
    let handle = gateway.handle();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = rx.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while handle.links_up() < links {
        assert!(std::time::Instant::now() < deadline, "links never came up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let trusted = rustls_pki_types_from_pem(&cert);
    let endpoint = Endpoint::new(wss, "localhost", Transport::Wss, &[trusted]).unwrap();
    TestGateway { endpoint, handle, stop }
}

fn rustls_pki_types_from_pem(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

pub fn device(thing: &str) -> Device {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = TokenKey::new(SECRET).unwrap().issue(thing, now + 3_600);
    Device::new(
        DeviceConfig {
            thing: ByteString::from(thing.to_string()),
            credential: Credential::Token(token.into_bytes().into()),
            keepalive_secs: 30,
            handshake_timeout: Duration::from_secs(5),
            window: 64,
            incarnation: 7,
        },
        1,
    )
}

/// One HTTP/1.1 request with an optional JSON body; returns the status and the JSON body.
pub async fn http(
    api: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Json>,
) -> (u16, Json) {
    let mut stream = tokio::net::TcpStream::connect(api).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let key = key.map(|k| format!("x-api-key: {k}\r\n")).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{key}content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let text = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    (status, serde_json::from_str(text).unwrap_or(Json::Null))
}

/// Waits until the worker behind `api` acknowledges writes (a table, and a primary lease from the consensus group):
/// a thing is made and removed again.
#[allow(dead_code, reason = "not every test binary starts a worker in process")]
pub async fn until_writable(api: SocketAddr) {
    within("the first acknowledged write", async {
        while !matches!(http(api, "PUT", "/v1/things/warm-up", Some(KEY), None).await.0, 200 | 201)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(http(api, "DELETE", "/v1/things/warm-up", Some(KEY), None).await.0, 204);
}

pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A running count (acknowledgements, say) that tests wait on.
#[derive(Clone, Default)]
pub struct Count(std::sync::Arc<tokio::sync::watch::Sender<usize>>);

impl Count {
    pub fn add(&self, n: usize) {
        self.0.send_modify(|t| *t += n);
    }

    /// Waits until the count has grown by `more` since the call, at most 60 s.
    pub async fn grow_by(&self, more: usize, what: &str) {
        let target = *self.0.borrow() + more;
        let mut total = self.0.subscribe();
        let grown = tokio::time::timeout(Duration::from_secs(60), total.wait_for(|t| *t >= target));
        assert!(grown.await.is_ok(), "stalled {what}");
    }
}
