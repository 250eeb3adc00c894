//! A device through a real gateway to a foundation worker, and an application on the worker's REST API: what the
//! device reports is readable, what the application writes or calls reaches the device.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value as Json, json};
use thingport_foundation::{Config as WorkerConfig, Worker};
use thingport_gateway::token::TokenKey;
use thingport_gateway::{Config as GatewayConfig, Gateway};
use thingport_loadtest::client::{Device, Endpoint, Transport};
use thingport_protocol::{
    ByteString, Credential, DeviceConfig, DeviceEvent, Frame, Properties, PropertyUpdate, Quality,
    ServiceResponse, ServiceResult, Value,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &[u8] = b"system-test-secret-system-test-secret-01";
const KEY: &str = "app-key-1";

struct System {
    _dir: tempfile::TempDir,
    api: SocketAddr,
    endpoint: Endpoint,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> System {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api-keys");
    std::fs::write(&keys, format!("# test\n{KEY}\n")).unwrap();
    let worker_config = WorkerConfig {
        link_address: "127.0.0.1:0".parse().unwrap(),
        api_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: None,
        api_keys_file: keys,
        ..WorkerConfig::default()
    };
    let worker = Worker::bind(worker_config).await.unwrap();
    let addrs = worker.addrs();
    let (worker_stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));

    let (cert, key) = thingport_gateway::tls::self_signed(&["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), key).unwrap();
    std::fs::write(dir.path().join("secret"), SECRET).unwrap();
    let mut config = GatewayConfig::default();
    config.listen.address = "127.0.0.1:0".parse().unwrap();
    config.admin.address = None;
    config.tls.cert = dir.path().join("cert.pem");
    config.tls.key = dir.path().join("key.pem");
    config.auth.secret_file = dir.path().join("secret");
    config.upstream.foundations = vec![addrs.link];
    let gateway = Gateway::bind(config).await.unwrap();
    let wss = gateway.addrs().wss.unwrap();
    let handle = gateway.handle();
    let (gateway_stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(gateway.run(async move {
        let _ = rx.await;
    }));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while handle.links_up() < 2 {
        assert!(std::time::Instant::now() < deadline, "links never came up");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let trusted = rustls_pki_types_from_pem(&cert);
    let endpoint = Endpoint::new(wss, "localhost", Transport::Wss, &[trusted]).unwrap();
    System { _dir: dir, api: addrs.api, endpoint, stop: vec![gateway_stop, worker_stop] }
}

fn rustls_pki_types_from_pem(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

fn device(thing: &str) -> Device {
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
async fn http(
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

async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test]
async fn device_data_reaches_the_api_and_the_api_reaches_the_device() {
    let system = start().await;
    let mut pump = device("pump-1");
    within("connect", pump.connect(&system.endpoint)).await.unwrap();
    let batch = Frame::Properties(Properties {
        seq: 0,
        updates: vec![
            PropertyUpdate {
                name: "level".into(),
                timestamp_ms: 1_000,
                quality: Quality::Good,
                value: Value::Float(3.5),
            },
            PropertyUpdate {
                name: "mode".into(),
                timestamp_ms: 1_000,
                quality: Quality::Uncertain,
                value: Value::from_static("auto"),
            },
        ],
    });
    pump.send(batch).await.unwrap();
    within("ack", async {
        loop {
            if let DeviceEvent::Acked { seq: 1 } = pump.next_event().await.unwrap() {
                return;
            }
        }
    })
    .await;

    // acknowledged means stored: the API reads it back at once
    let (status, level) =
        http(system.api, "GET", "/v1/things/pump-1/properties/level", Some(KEY), None).await;
    assert_eq!(status, 200);
    assert_eq!(level["value"], json!(3.5));
    assert_eq!(level["timestamp_ms"], json!(1_000));
    let (_, things) = http(system.api, "GET", "/v1/things", Some(KEY), None).await;
    assert_eq!(things["things"][0]["thing"], json!("pump-1"));
    assert_eq!(things["things"][0]["online"], json!(true));
    let (_, thing) = http(system.api, "GET", "/v1/things/pump-1", Some(KEY), None).await;
    assert_eq!(thing["properties"]["mode"]["quality"], json!("uncertain"));

    // a write from the application is delivered to the device
    let (status, written) = http(
        system.api,
        "PUT",
        "/v1/things/pump-1/properties/setpoint",
        Some(KEY),
        Some(json!({"value": 42})),
    )
    .await;
    assert_eq!((status, written["delivered"].clone()), (200, json!(true)));
    let write = within("property write", async {
        loop {
            if let DeviceEvent::Data(Frame::Properties(p)) = pump.next_event().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    assert_eq!((&*write.updates[0].name, &write.updates[0].value), ("setpoint", &Value::Int(42)));

    // a service call from the application is answered by the device
    let api = system.api;
    let call = tokio::spawn(async move {
        http(
            api,
            "POST",
            "/v1/things/pump-1/services/flush?timeout_ms=5000",
            Some(KEY),
            Some(json!({"seconds": 3})),
        )
        .await
    });
    let request = within("service request", async {
        loop {
            if let DeviceEvent::Data(Frame::ServiceRequest(r)) = pump.next_event().await.unwrap() {
                return r;
            }
        }
    })
    .await;
    assert_eq!(&*request.service, "flush");
    let answer = Value::Map(vec![("flushed".into(), Value::Bool(true))]);
    pump.send(Frame::ServiceResponse(ServiceResponse {
        seq: 0,
        call_id: request.call_id,
        result: ServiceResult::Ok(answer),
    }))
    .await
    .unwrap();
    let (status, result) = within("call result", call).await.unwrap();
    assert_eq!((status, result), (200, json!({"result": {"flushed": true}})));

    // offline after the device leaves
    pump.disconnect().await;
    within("offline", async {
        loop {
            let (_, thing) = http(system.api, "GET", "/v1/things/pump-1", Some(KEY), None).await;
            if thing["online"] == json!(false) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let (status, _) =
        http(system.api, "POST", "/v1/things/pump-1/services/flush", Some(KEY), Some(json!({})))
            .await;
    assert_eq!(status, 409, "calling an offline thing is refused at once");
    for stop in system.stop {
        let _ = stop.send(());
    }
}

#[tokio::test]
async fn the_api_needs_an_application_key() {
    let system = start().await;
    assert_eq!(http(system.api, "GET", "/v1/things", None, None).await.0, 401);
    assert_eq!(http(system.api, "GET", "/v1/things", Some("wrong"), None).await.0, 401);
    assert_eq!(http(system.api, "GET", "/v1/things", Some(KEY), None).await.0, 200);
    assert_eq!(http(system.api, "GET", "/v1/things/nope", Some(KEY), None).await.0, 404);
    for stop in system.stop {
        let _ = stop.send(());
    }
}

#[tokio::test]
async fn requests_a_device_could_not_decode_are_refused_and_the_session_survives() {
    let system = start().await;
    let mut pump = device("pump-2");
    within("connect", pump.connect(&system.endpoint)).await.unwrap();
    let long = "n".repeat(300);
    let (status, _) = http(
        system.api,
        "PUT",
        &format!("/v1/things/pump-2/properties/{long}"),
        Some(KEY),
        Some(json!({"value": 1})),
    )
    .await;
    assert_eq!(status, 400, "a property name over the protocol's 256-byte limit");
    let (status, _) = http(
        system.api,
        "POST",
        &format!("/v1/things/pump-2/services/{long}"),
        Some(KEY),
        Some(json!(null)),
    )
    .await;
    assert_eq!(status, 400, "a service name over the limit");
    // the session is untouched: a valid write still arrives
    let (status, written) = http(
        system.api,
        "PUT",
        "/v1/things/pump-2/properties/ok",
        Some(KEY),
        Some(json!({"value": true})),
    )
    .await;
    assert_eq!((status, written["delivered"].clone()), (200, json!(true)));
    within("the valid write", async {
        loop {
            if let DeviceEvent::Data(Frame::Properties(p)) = pump.next_event().await.unwrap() {
                assert_eq!(&*p.updates[0].name, "ok");
                return;
            }
        }
    })
    .await;
    for stop in system.stop {
        let _ = stop.send(());
    }
}
