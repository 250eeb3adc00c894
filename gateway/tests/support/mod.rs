//! A gateway on loopback with real TLS, acknowledging workers behind it, and device clients.

#![allow(dead_code, unreachable_pub, reason = "each test binary uses a different part")]

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use thingport_device::{Device, Endpoint, Transport};
use thingport_gateway::{Addrs, Config, Gateway, Handle, token::TokenKey};
use thingport_loadtest::worker::AckWorker;
use thingport_protocol::{ByteString, Credential, DeviceConfig};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret-0123";

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub addrs: Addrs,
    pub handle: Handle,
    pub workers: Vec<AckWorker>,
    pub cert: CertificateDer<'static>,
    shutdown: Option<oneshot::Sender<()>>,
    pub run: Option<JoinHandle<anyhow::Result<()>>>,
}

/// Writes a self-signed certificate for localhost into `dir` under `name`.
pub fn write_cert(dir: &std::path::Path, name: &str) -> (PathBuf, PathBuf) {
    let (cert, key) = thingport_gateway::tls::self_signed(&["localhost".into()]).unwrap();
    let cert_path = dir.join(format!("{name}.pem"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, cert).unwrap();
    std::fs::write(&key_path, key).unwrap();
    (cert_path, key_path)
}

pub fn read_cert(path: &std::path::Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

impl Harness {
    /// A gateway with `workers` acknowledging workers; `tune` adjusts the configuration.
    pub async fn start(workers: usize, tune: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_cert(dir.path(), "server");
        let secret = dir.path().join("secret");
        std::fs::write(&secret, SECRET).unwrap();
        let mut started = Vec::new();
        for i in 0..workers {
            started.push(
                AckWorker::start("127.0.0.1:0".parse().unwrap(), &format!("worker-{i}"))
                    .await
                    .unwrap(),
            );
        }
        let mut config = Config::default();
        config.listen.address = "127.0.0.1:0".parse().unwrap();
        config.admin.address = Some("127.0.0.1:0".parse().unwrap());
        config.tls.cert = cert.clone();
        config.tls.key = key;
        config.auth.secret_file = secret;
        config.upstream.foundations = started.iter().map(AckWorker::addr).collect();
        config.upstream.reconnect_min = Duration::from_millis(20);
        config.upstream.reconnect_max = Duration::from_millis(200);
        config.upstream.heartbeat = Duration::from_millis(500);
        config.limits.message_rate = 10_000;
        tune(&mut config);
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let expected = workers * config.upstream.links_per_foundation;
        let gateway = Gateway::bind(config).await.unwrap();
        let addrs = gateway.addrs();
        let handle = gateway.handle();
        let (tx, rx) = oneshot::channel::<()>();
        let run = tokio::spawn(gateway.run(async move {
            let _ = rx.await;
        }));
        let harness = Harness {
            dir,
            addrs,
            handle,
            workers: started,
            cert: read_cert(&cert),
            shutdown: Some(tx),
            run: Some(run),
        };
        let handle = harness.handle.clone();
        wait_for("links up", || handle.links_up() == expected).await;
        harness
    }

    pub fn endpoint(&self, transport: Transport) -> Endpoint {
        let addr = match transport {
            Transport::Wss | Transport::Ws => self.addrs.wss.unwrap(),
            Transport::Quic => self.addrs.quic.unwrap(),
        };
        Endpoint::new(addr, "localhost", transport, std::slice::from_ref(&self.cert)).unwrap()
    }

    pub fn token(&self, thing: &str, ttl_secs: i64) -> Vec<u8> {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
                as i64;
        TokenKey::new(SECRET).unwrap().issue(thing, (now + ttl_secs).max(0) as u64).into_bytes()
    }

    pub fn device(&self, thing: &str) -> Device {
        let token = self.token(thing, 3_600);
        Device::new(device_config(thing, Credential::Token(token.into())), 1)
    }

    /// Begins the drain (what SIGTERM does).
    pub fn shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Drains and waits for the gateway to finish.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown();
        self.run.take().unwrap().await.unwrap()
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.addrs.admin.unwrap(), path).await
    }
}

pub fn device_config(thing: &str, credential: Credential) -> DeviceConfig {
    DeviceConfig {
        thing: ByteString::from(thing.to_string()),
        credential,
        keepalive_secs: 30,
        handshake_timeout: Duration::from_secs(5),
        window: 256,
        incarnation: 42,
    }
}

/// Waits until `condition` holds, failing the test after 10 s.
pub async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Awaits `future`, failing the test after 10 s.
pub async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out waiting for {what}"),
    }
}

/// A minimal HTTP/1.1 GET on loopback.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}
