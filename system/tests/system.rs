//! A device through a real gateway to a foundation worker, and an application on the worker's REST API: what the
//! device reports is readable, what the application writes or calls reaches the device.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use support::{KEY, device, http, within};
use thingport_device::Endpoint;
use thingport_foundation::{Config as WorkerConfig, Worker};
use thingport_protocol::{
    DeviceEvent, Frame, Properties, PropertyUpdate, Quality, ServiceResponse, ServiceResult, Value,
};

struct System {
    _dir: tempfile::TempDir,
    api: SocketAddr,
    endpoint: Endpoint,
    stop: Vec<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> System {
    let dir = tempfile::tempdir().unwrap();
    let worker_config = WorkerConfig {
        link_address: "127.0.0.1:0".parse().unwrap(),
        api_address: "127.0.0.1:0".parse().unwrap(),
        peer_address: "127.0.0.1:0".parse().unwrap(),
        admin_address: None,
        api_keys_file: support::api_keys(dir.path()),
        storage: thingport_foundation::config::StorageConfig {
            data_dir: dir.path().join("store"),
            ..Default::default()
        },
        ..WorkerConfig::default()
    };
    let worker = Worker::bind(worker_config).await.unwrap();
    let addrs = worker.addrs();
    let mut ring_version = worker.table_version();
    let (worker_stop, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(worker.run(async move {
        let _ = rx.await;
    }));
    // a pool of one makes its partition table at once
    ring_version.wait_for(|v| *v > 0).await.unwrap();
    support::until_writable(addrs.api).await;
    let gateway = support::gateway(dir.path(), vec![addrs.link]).await;
    System {
        _dir: dir,
        api: addrs.api,
        endpoint: gateway.endpoint,
        stop: vec![gateway.stop, worker_stop],
    }
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
    assert_eq!(things["things"][0]["transport"], json!("wss"));
    let (_, thing) = http(system.api, "GET", "/v1/things/pump-1", Some(KEY), None).await;
    assert_eq!(thing["properties"]["mode"]["quality"], json!("uncertain"));

    // a write from the application is delivered to the device: the answer waits for its acknowledgement
    let api = system.api;
    let put = tokio::spawn(async move {
        let path = "/v1/things/pump-1/properties/setpoint";
        http(api, "PUT", path, Some(KEY), Some(json!({"value": 42}))).await
    });
    let write = within("property write", async {
        loop {
            if let DeviceEvent::Data(Frame::Properties(p)) = pump.next_event().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    assert_eq!((&*write.updates[0].name, &write.updates[0].value), ("setpoint", &Value::Int(42)));
    pump.flush().await.unwrap(); // the acknowledgement
    let (status, written) = within("the write's answer", put).await.unwrap();
    assert_eq!((status, written["delivered"].clone()), (200, json!(true)));

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
async fn each_role_does_what_it_may_and_a_revoked_key_is_refused_at_once() {
    use thingport_foundation::keys::{self, Role};
    let system = start().await;
    let file = system._dir.path().join("api-keys");
    let viewer = keys::add(&file, Role::Viewer, &[], "viewer").unwrap();
    let operator = keys::add(&file, Role::Operator, &["pump-".into()], "operator").unwrap();
    let api = system.api;
    let call = |method: &'static str,
                path: &'static str,
                key: String,
                body: Option<serde_json::Value>| async move {
        http(api, method, path, Some(&key), body).await
    };
    let admin = KEY.to_string();
    for thing in ["/v1/things/pump-1", "/v1/things/boiler-1"] {
        assert_eq!(call("PUT", thing, admin.clone(), None).await.0, 201, "{thing}");
    }
    let value = || Some(json!({"value": 1}));

    // a viewer reads, and nothing else
    assert_eq!(call("GET", "/v1/things/pump-1", viewer.clone(), None).await.0, 200);
    assert_eq!(call("GET", "/v1/cluster", viewer.clone(), None).await.0, 200);
    let (status, body) =
        call("PUT", "/v1/things/pump-1/properties/p", viewer.clone(), value()).await;
    assert_eq!(status, 403);
    assert!(body["error"].as_str().unwrap().contains("viewer"), "{body}");
    let echo = "/v1/things/pump-1/services/echo";
    assert_eq!(call("POST", echo, viewer.clone(), Some(json!({}))).await.0, 403);

    // an operator writes values within its prefixes, and changes no thing
    assert_eq!(
        call("PUT", "/v1/things/pump-1/properties/p", operator.clone(), value()).await.0,
        200
    );
    assert_eq!(
        call("PUT", "/v1/things/boiler-1/properties/p", operator.clone(), value()).await.0,
        403
    );
    assert_eq!(call("GET", "/v1/things/boiler-1", operator.clone(), None).await.0, 403);
    assert_eq!(call("DELETE", "/v1/things/pump-1", operator.clone(), None).await.0, 403);
    assert_eq!(call("PUT", "/v1/things/pump-2", operator.clone(), None).await.0, 403);
    let (_, listed) = call("GET", "/v1/things", operator.clone(), None).await;
    let names: Vec<&str> =
        listed["things"].as_array().unwrap().iter().map(|t| t["thing"].as_str().unwrap()).collect();
    assert_eq!(names, ["pump-1"], "a key with prefixes lists only the things it reaches");

    // an admin does everything; a revoked key is refused from the next request
    assert_eq!(call("DELETE", "/v1/things/boiler-1", admin.clone(), None).await.0, 204);
    keys::revoke(&file, "viewer").unwrap();
    assert_eq!(call("GET", "/v1/things/pump-1", viewer.clone(), None).await.0, 401);
    assert_eq!(call("GET", "/v1/things/pump-1", operator.clone(), None).await.0, 200);

    // an address that keeps sending unknown keys is slowed down, whatever key it then sends (the revoked key's
    // refusal above was the first)
    for _ in 0..thingport_foundation::keys::MAX_FAILURES - 2 {
        assert_eq!(call("GET", "/v1/things", "guess".into(), None).await.0, 401);
    }
    let (status, _) = call("GET", "/v1/things", admin.clone(), None).await;
    assert_eq!(status, 200, "below the limit a good key still works");
    assert_eq!(call("GET", "/v1/things", "guess".into(), None).await.0, 401);
    let (status, body) = call("GET", "/v1/things", admin.clone(), None).await;
    assert_eq!(status, 429, "{body}");
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
    let api = system.api;
    let put = tokio::spawn(async move {
        http(api, "PUT", "/v1/things/pump-2/properties/ok", Some(KEY), Some(json!({"value": true})))
            .await
    });
    within("the valid write", async {
        loop {
            if let DeviceEvent::Data(Frame::Properties(p)) = pump.next_event().await.unwrap() {
                assert_eq!(&*p.updates[0].name, "ok");
                return;
            }
        }
    })
    .await;
    pump.flush().await.unwrap();
    let (status, written) = within("the write's answer", put).await.unwrap();
    assert_eq!((status, written["delivered"].clone()), (200, json!(true)));
    for stop in system.stop {
        let _ = stop.send(());
    }
}

#[tokio::test]
async fn a_write_the_device_does_not_acknowledge_is_not_reported_delivered() {
    let system = start().await;
    // connected, but it never reads (and so never acknowledges) what the server sends
    let mut pump = device("pump-3");
    within("connect", pump.connect(&system.endpoint)).await.unwrap();
    let reading = PropertyUpdate {
        name: "level".into(),
        timestamp_ms: 1_000,
        quality: Quality::Good,
        value: Value::Int(1),
    };
    pump.send(Frame::Properties(Properties { seq: 0, updates: vec![reading] })).await.unwrap();
    within("the reading acknowledged", async {
        while !matches!(pump.next_event().await.unwrap(), DeviceEvent::Acked { seq: 1 }) {}
    })
    .await;
    let (status, written) = http(
        system.api,
        "PUT",
        "/v1/things/pump-3/properties/setpoint?wait_ms=300",
        Some(KEY),
        Some(json!({"value": 1})),
    )
    .await;
    assert_eq!((status, written), (200, json!({"stored": true, "delivered": false})));
    // and a device that is gone: nothing to wait for
    pump.disconnect().await;
    let (_, thing) = http(system.api, "GET", "/v1/things/pump-3", Some(KEY), None).await;
    assert_eq!(thing["properties"]["setpoint"]["value"], json!(1), "stored all the same");
    for stop in system.stop {
        let _ = stop.send(());
    }
}

/// What a [`Handler`] of the SDK client is asked, for the test to read.
struct Recorder {
    events: tokio::sync::mpsc::UnboundedSender<String>,
}

impl thingport_device::Handler for Recorder {
    fn disconnected(&mut self, reason: &str, _retry_in: Duration) {
        let _ = self.events.send(format!("disconnected: {reason}"));
    }

    fn property_write(&mut self, updates: &[PropertyUpdate]) {
        for u in updates {
            let _ = self.events.send(format!("write {} = {:?}", u.name, u.value));
        }
    }

    fn service_call(&mut self, call: &thingport_protocol::ServiceRequest) -> Option<ServiceResult> {
        Some(ServiceResult::Ok(call.params.clone()))
    }
}

#[tokio::test]
async fn the_device_sdk_resends_after_a_restart_what_was_never_acknowledged_and_answers_the_api() {
    use thingport_device::{Backoff, Client, Options};
    let system = start().await;
    let dir = tempfile::tempdir().unwrap();
    let outbox = dir.path().join("outbox");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let token = thingport_gateway::token::TokenKey::new(support::SECRET)
        .unwrap()
        .issue("sdk-1", now + 3_600);
    let options = |endpoint: Endpoint| {
        let mut options = Options::new(
            endpoint,
            "sdk-1",
            thingport_protocol::Credential::Token(token.clone().into_bytes().into()),
        );
        options.outbox = Some(outbox.clone());
        options.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        options
    };
    let reading = |i: u64| PropertyUpdate {
        name: "level".into(),
        timestamp_ms: 1_000 + i,
        quality: Quality::Good,
        value: Value::Int(i as i64),
    };

    // first run: nothing listens where the device connects, so 20 readings wait in the outbox
    let mut nowhere = system.endpoint.clone();
    nowhere.addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (client, handle) = Client::new(options(nowhere)).unwrap();
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let first = tokio::spawn(client.run(Recorder { events }, stop.clone().cancelled_owned()));
    for i in 1..=20 {
        assert_eq!(handle.properties(vec![reading(i)]).await.unwrap(), i);
    }
    let failed = within("a failed attempt", seen.recv()).await.unwrap();
    assert!(failed.starts_with("disconnected"), "{failed}");
    assert_eq!(handle.acked(), 0);
    // the device reboots
    stop.cancel();
    first.await.unwrap();
    drop(handle);

    // second run, reaching the gateway: the 20 go out with their numbers, then 5 more
    let (client, handle) = Client::new(options(system.endpoint.clone())).unwrap();
    assert_eq!(client.unacked(), 20);
    let (events, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let stop = tokio_util::sync::CancellationToken::new();
    let second = tokio::spawn(client.run(Recorder { events }, stop.clone().cancelled_owned()));
    within("the kept readings acknowledged", handle.wait_acked(20)).await.unwrap();
    for i in 21..=25 {
        assert_eq!(handle.properties(vec![reading(i)]).await.unwrap(), i);
    }
    within("all acknowledged", handle.wait_acked(25)).await.unwrap();
    let (status, page) = http(
        system.api,
        "GET",
        "/v1/things/sdk-1/properties/level/history?order=oldest&limit=250",
        Some(KEY),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let values: Vec<i64> =
        page["values"].as_array().unwrap().iter().map(|v| v["value"].as_i64().unwrap()).collect();
    assert_eq!(values, (1..=25).collect::<Vec<_>>(), "each reading once, in order");

    // the handler answers writes and calls from the API
    let (status, written) = http(
        system.api,
        "PUT",
        "/v1/things/sdk-1/properties/setpoint",
        Some(KEY),
        Some(json!({"value": 7})),
    )
    .await;
    assert_eq!((status, written["delivered"].clone()), (200, json!(true)));
    let write = within("the write reaches the handler", async {
        loop {
            let event = seen.recv().await.unwrap();
            if event.starts_with("write") {
                return event;
            }
        }
    })
    .await;
    assert_eq!(write, "write setpoint = Int(7)");
    // wait_ms=0: answered at once, not claimed delivered, and delivered all the same
    let (status, written) = http(
        system.api,
        "PUT",
        "/v1/things/sdk-1/properties/setpoint?wait_ms=0",
        Some(KEY),
        Some(json!({"value": 8})),
    )
    .await;
    assert_eq!((status, written["delivered"].clone()), (200, json!(false)));
    let write = within("the unwaited write reaches the handler", async {
        loop {
            let event = seen.recv().await.unwrap();
            if event.starts_with("write") {
                return event;
            }
        }
    })
    .await;
    assert_eq!(write, "write setpoint = Int(8)");
    let (status, result) = http(
        system.api,
        "POST",
        "/v1/things/sdk-1/services/echo?timeout_ms=5000",
        Some(KEY),
        Some(json!({"x": 1})),
    )
    .await;
    assert_eq!((status, result), (200, json!({"result": {"x": 1}})));
    stop.cancel();
    second.await.unwrap();
    for stop in system.stop {
        let _ = stop.send(());
    }
}

#[tokio::test]
async fn a_rebooted_device_reads_what_the_server_holds_for_it_and_the_server_time() {
    use thingport_device::{Backoff, Client, ClientError, Handle, NoHandler, Options};
    let system = start().await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let token = thingport_gateway::token::TokenKey::new(support::SECRET)
        .unwrap()
        .issue("boiler", now.as_secs() + 3_600);
    let run = || {
        let mut options = Options::new(
            system.endpoint.clone(),
            "boiler",
            thingport_protocol::Credential::Token(token.clone().into_bytes().into()),
        );
        options.backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(100));
        let (client, handle) = Client::new(options).unwrap();
        let stop = tokio_util::sync::CancellationToken::new();
        (tokio::spawn(client.run(NoHandler, stop.clone().cancelled_owned())), handle, stop)
    };
    let call = |handle: Handle, service: &'static str, params: Value| async move {
        within(service, handle.call(service, params, Duration::from_secs(5))).await
    };

    // the device reports a level, then goes away
    let (running, handle, stop) = run();
    let level = PropertyUpdate {
        name: "level".into(),
        timestamp_ms: now.as_millis() as u64,
        quality: Quality::Good,
        value: Value::Int(5),
    };
    let seq = handle.properties(vec![level]).await.unwrap();
    within("the level acknowledged", handle.wait_acked(seq)).await.unwrap();
    stop.cancel();
    running.await.unwrap();

    // while it is away an application sets its setpoint
    let (status, written) = http(
        system.api,
        "PUT",
        "/v1/things/boiler/properties/setpoint",
        Some(KEY),
        Some(json!({"value": 21})),
    )
    .await;
    assert_eq!((status, written["delivered"].clone()), (200, json!(false)), "{written}");

    // back up, it asks the server
    let (running, handle, stop) = run();
    let all = call(handle.clone(), "thingport.properties", Value::Null).await.unwrap();
    let expected = vec![("level".into(), Value::Int(5)), ("setpoint".into(), Value::Int(21))];
    assert_eq!(all, ServiceResult::Ok(Value::Map(expected)));
    let some = Value::List(vec![Value::from_static("setpoint"), Value::from_static("absent")]);
    let one = call(handle.clone(), "thingport.properties", some).await.unwrap();
    assert_eq!(one, ServiceResult::Ok(Value::Map(vec![("setpoint".into(), Value::Int(21))])));
    let ServiceResult::Err { code, .. } =
        call(handle.clone(), "thingport.properties", Value::Int(1)).await.unwrap()
    else {
        panic!("parameters that are not a list of names are refused");
    };
    assert_eq!(code, thingport_protocol::ServiceErrorCode::INVALID_PARAMS);

    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let ServiceResult::Ok(Value::Int(server_ms)) =
        call(handle.clone(), "thingport.time", Value::Null).await.unwrap()
    else {
        panic!("the server's time is an INT");
    };
    let after = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    let server_ms = server_ms as u128;
    assert!(before.as_millis() <= server_ms && server_ms <= after.as_millis(), "{server_ms}");

    let ServiceResult::Err { code, .. } =
        call(handle.clone(), "thingport.nothing", Value::Null).await.unwrap()
    else {
        panic!("an unknown server service is refused");
    };
    assert_eq!(code, thingport_protocol::ServiceErrorCode::NOT_FOUND);

    // more than one frame holds: refused with a reason, and one property at a time still works
    for i in 0..5 {
        let path = format!("/v1/things/boiler/properties/note{i}");
        let (status, _) =
            http(system.api, "PUT", &path, Some(KEY), Some(json!({"value": "x".repeat(15_000)})))
                .await;
        assert_eq!(status, 200);
    }
    let ServiceResult::Err { code, message } =
        call(handle.clone(), "thingport.properties", Value::Null).await.unwrap()
    else {
        panic!("75 KB of properties do not fit in one 64 KB frame");
    };
    assert_eq!(code, thingport_protocol::ServiceErrorCode::FAILED);
    assert!(message.contains("fewer properties"), "{message}");
    let one = Value::List(vec![Value::from_static("note0")]);
    let ServiceResult::Ok(Value::Map(entries)) =
        call(handle.clone(), "thingport.properties", one).await.unwrap()
    else {
        panic!("one property fits");
    };
    assert_eq!(entries.len(), 1);
    // a call nothing can answer in time ends with a timeout (the session has stopped)
    stop.cancel();
    running.await.unwrap();
    let late = handle.call("thingport.time", Value::Null, Duration::from_millis(50)).await;
    assert!(matches!(late, Err(ClientError::Stopped | ClientError::Timeout)), "{late:?}");
    for stop in system.stop {
        let _ = stop.send(());
    }
}
