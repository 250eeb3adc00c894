//! Devices through the gateway over real TLS on loopback: both transports, acknowledgements, worker-initiated
//! service calls, and the refusals RELIABILITY.md asks for.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "in tests a panic is a failed assertion"
)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use thingport_gateway::session::CloseCode;

use support::{Harness, device_config, within};
use thingport_device::{Closed, DeviceError, FrameConn, Transport};
use thingport_loadtest::worker::WorkerEvent;
use thingport_protocol::{
    Credential, DeviceEvent, ErrorCode, Frame, LinkFrame, Properties, PropertyUpdate, Quality,
    ServiceRequest, ServiceResponse, ServiceResult, SessionError, Value,
};

fn reading(v: i64) -> Frame {
    Frame::Properties(Properties {
        seq: 0,
        updates: vec![PropertyUpdate {
            name: "level".into(),
            timestamp_ms: 1_000,
            quality: Quality::Good,
            value: Value::Int(v),
        }],
    })
}

async fn round_trip(transport: Transport) {
    let harness = Harness::start(1, |_| {}).await;
    let mut device = harness.device("pump-1");
    let welcome = within("connect", device.connect(&harness.endpoint(transport))).await.unwrap();
    assert_eq!(welcome.version, 1);
    for v in 0..3 {
        device.send(reading(v)).await.unwrap();
    }
    let mut acked = 0;
    while acked < 3 {
        if let DeviceEvent::Acked { seq } = within("acks", device.next_event()).await.unwrap() {
            acked = seq;
        }
    }
    assert_eq!(device.session.unacked(), 0);
    // frames of one device travel over both links, so the worker may see them in any order
    let mut stored = harness.workers[0].stored("pump-1");
    stored.sort_unstable();
    assert_eq!(stored, vec![1, 2, 3]);
    device.disconnect().await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn wss_device_sends_properties_and_gets_acks() {
    round_trip(Transport::Wss).await;
}

#[tokio::test]
async fn quic_device_sends_properties_and_gets_acks() {
    round_trip(Transport::Quic).await;
}

#[tokio::test]
async fn worker_initiated_service_call_reaches_the_device_and_its_answer_returns() {
    for transport in [Transport::Wss, Transport::Quic] {
        let harness = Harness::start(1, |_| {}).await;
        let mut events = harness.workers[0].subscribe();
        let mut device = harness.device("valve-7");
        within("connect", device.connect(&harness.endpoint(transport))).await.unwrap();
        let session_id = within("open", async {
            loop {
                if let Ok(WorkerEvent::Open { session_id, thing }) = events.recv().await {
                    assert_eq!(thing, "valve-7");
                    return session_id;
                }
            }
        })
        .await;
        let request = Frame::ServiceRequest(ServiceRequest {
            seq: 0,
            call_id: 99,
            timeout_ms: 5_000,
            service: "close".into(),
            params: Value::Map(vec![("speed".into(), Value::Int(3))]),
        });
        assert!(harness.workers[0].send_downstream(session_id, 1, &request));
        let call = within("service request", async {
            loop {
                if let DeviceEvent::Data(Frame::ServiceRequest(call)) =
                    device.next_event().await.unwrap()
                {
                    return call;
                }
            }
        })
        .await;
        assert_eq!((call.call_id, &*call.service, call.seq), (99, "close", 1));
        let answer = Frame::ServiceResponse(ServiceResponse {
            seq: 0,
            call_id: 99,
            result: ServiceResult::Ok(Value::from_static("closed")),
        });
        device.send(answer).await.unwrap();
        let response = within("service response at the worker", async {
            loop {
                if let Ok(WorkerEvent::Frame { frame: Frame::ServiceResponse(r), .. }) =
                    events.recv().await
                {
                    return r;
                }
            }
        })
        .await;
        assert_eq!(response.call_id, 99);
        assert_eq!(response.result, ServiceResult::Ok(Value::from_static("closed")));
        harness.stop().await.unwrap();
    }
}

#[tokio::test]
async fn a_property_write_is_reported_delivered_once_the_device_acknowledges_it() {
    let harness = Harness::start(1, |_| {}).await;
    let mut events = harness.workers[0].subscribe();
    let mut device = harness.device("valve-8");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    let session_id = within("open", async {
        loop {
            if let Ok(WorkerEvent::Open { session_id, .. }) = events.recv().await {
                return session_id;
            }
        }
    })
    .await;
    let write = |value: i64| {
        Frame::Properties(Properties {
            seq: 0,
            updates: vec![PropertyUpdate {
                name: "setpoint".into(),
                timestamp_ms: 1_000,
                quality: Quality::Good,
                value: Value::Int(value),
            }],
        })
    };
    assert!(harness.workers[0].send_downstream(session_id, 300, &write(1)));
    let received = within("the write at the device", async {
        loop {
            if let DeviceEvent::Data(Frame::Properties(p)) = device.next_event().await.unwrap() {
                return p;
            }
        }
    })
    .await;
    assert_eq!(received.updates[0].value, Value::Int(1));
    device.flush().await.unwrap(); // its acknowledgement
    let delivered = within("DELIVERED at the worker", async {
        loop {
            match events.recv().await {
                Ok(WorkerEvent::Delivered { session_id, reference }) => {
                    return (session_id, reference);
                }
                Ok(WorkerEvent::Undeliverable { .. }) => panic!("reported undeliverable"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(delivered, (session_id, 300));
    // a write the device never acknowledges: undeliverable when its session ends
    assert!(harness.workers[0].send_downstream(session_id, 301, &write(2)));
    within("the second write sent", async {
        while !matches!(device.recv_event().await.unwrap(), Some(DeviceEvent::Data(_))) {}
    })
    .await;
    device.abort();
    let undelivered = within("UNDELIVERABLE at the worker", async {
        loop {
            match events.recv().await {
                Ok(WorkerEvent::Undeliverable { reference, .. }) => return reference,
                Ok(WorkerEvent::Delivered { .. }) => panic!("reported delivered"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(undelivered, 301);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn frames_for_an_unknown_session_are_reported_undeliverable() {
    let harness = Harness::start(1, |_| {}).await;
    let mut events = harness.workers[0].subscribe();
    assert!(harness.workers[0].send_downstream(424_242, 7, &reading(1)));
    let (session_id, reference, code) = within("undeliverable", async {
        loop {
            if let Ok(WorkerEvent::Undeliverable { session_id, reference, code }) =
                events.recv().await
            {
                return (session_id, reference, code);
            }
        }
    })
    .await;
    assert_eq!((session_id, reference, code), (424_242, 7, ErrorCode::UNAVAILABLE));
    harness.stop().await.unwrap();
}

async fn refused_with(
    harness: &Harness,
    transport: Transport,
    credential: Credential,
) -> ErrorCode {
    let mut device = thingport_device::Device::new(device_config("pump-1", credential), 1);
    match within("refusal", device.connect(&harness.endpoint(transport))).await {
        Err(DeviceError::Session(SessionError::Peer { code, .. })) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_expired_and_revoked_tokens_are_refused() {
    let harness = Harness::start(1, |c| c.auth.revocation_file = None).await;
    for transport in [Transport::Wss, Transport::Quic] {
        let forged = Credential::Token(b"tp1.99999999999.AAAA".to_vec().into());
        assert_eq!(refused_with(&harness, transport, forged).await, ErrorCode::AUTH_FAILED);
        let expired = Credential::Token(harness.token("pump-1", -10).into());
        assert_eq!(refused_with(&harness, transport, expired).await, ErrorCode::TOKEN_EXPIRED);
        let other_thing = Credential::Token(harness.token("pump-2", 3_600).into());
        assert_eq!(refused_with(&harness, transport, other_thing).await, ErrorCode::AUTH_FAILED);
        assert_eq!(
            refused_with(&harness, transport, Credential::None).await,
            ErrorCode::AUTH_FAILED
        );
    }
    let (_, metrics) = harness.admin_get("/metrics").await;
    assert!(
        metrics.contains(
            "thingport_gateway_handshakes_total{transport=\"wss\",result=\"token_expired\"}"
        ),
        "{metrics}"
    );
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn revoked_things_are_refused_after_reload() {
    let lists = tempfile::tempdir().unwrap();
    let list = lists.path().join("revoked.txt");
    std::fs::write(&list, "").unwrap();
    let harness = Harness::start(1, |c| c.auth.revocation_file = Some(list.clone())).await;
    let mut device = harness.device("pump-1");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    device.disconnect().await;
    std::fs::write(&list, "# stolen\npump-1\n").unwrap();
    harness.handle.reload().unwrap();
    let token = Credential::Token(harness.token("pump-1", 3_600).into());
    assert_eq!(refused_with(&harness, Transport::Wss, token).await, ErrorCode::REVOKED);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn data_before_hello_is_a_protocol_error() {
    let harness = Harness::start(1, |_| {}).await;
    for transport in [Transport::Wss, Transport::Quic] {
        let mut conn =
            within("connect", FrameConn::connect(&harness.endpoint(transport))).await.unwrap();
        let mut frame = reading(1);
        frame.set_seq(1);
        conn.send(&[frame.to_bytes()]).await.unwrap();
        let reply = within("error", conn.recv()).await.unwrap().unwrap();
        let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
            panic!("not an ERROR")
        };
        assert_eq!(error.code, ErrorCode::UNEXPECTED_FRAME);
        let closed = within("close", conn.recv()).await.unwrap();
        let expected = match transport {
            Transport::Wss | Transport::Ws => Closed::Code(4302),
            Transport::Quic => Closed::Code(0x0302),
        };
        assert_eq!(closed, Err(expected));
    }
    harness.stop().await.unwrap();
}

/// Sends `ERROR` on `conn`; `Err` if the server answers it with an `ERROR` before the connection ends.
async fn send_error_unanswered(conn: &mut FrameConn) -> Result<(), String> {
    let error = Frame::Error(thingport_protocol::ErrorFrame {
        code: ErrorCode::UNAVAILABLE,
        retry_after_ms: 0,
        message: "device shutting down".into(),
    });
    conn.send(&[error.to_bytes()]).await.unwrap();
    within("close", async {
        loop {
            match conn.recv().await {
                Ok(Ok(raw)) => {
                    if let Ok(Frame::Error(e)) = Frame::decode(raw, &Default::default()) {
                        return Err(format!("answered with ERROR {}", e.code));
                    }
                }
                Ok(Err(_)) | Err(_) => return Ok(()),
            }
        }
    })
    .await
}

/// §5.11: the receiver of an `ERROR` does not reply; the gateway only closes, before `HELLO` and after `WELCOME`.
#[tokio::test]
async fn a_device_error_is_not_answered_with_an_error() {
    let harness = Harness::start(1, |_| {}).await;
    for transport in [Transport::Wss, Transport::Quic] {
        let mut conn =
            within("connect", FrameConn::connect(&harness.endpoint(transport))).await.unwrap();
        assert_eq!(send_error_unanswered(&mut conn).await, Ok(()), "{transport:?} before HELLO");
        let mut device = harness.device("pump-1");
        within("connect", device.connect(&harness.endpoint(transport))).await.unwrap();
        let conn = device.conn().unwrap();
        assert_eq!(send_error_unanswered(conn).await, Ok(()), "{transport:?} established");
    }
    harness.stop().await.unwrap();
}

/// §3.2: a HELLO of versions this server does not speak is refused as such, whatever its later bytes are; one that
/// offers version 1 is decoded as version 1.
#[tokio::test]
async fn a_hello_of_a_later_version_gets_unsupported_version() {
    let harness = Harness::start(1, |_| {}).await;
    for (bytes, code) in [
        (vec![0x01, 2, 3, 0xff, 0xfe, 0xfd], ErrorCode::UNSUPPORTED_VERSION),
        (vec![0x01, 2, 2], ErrorCode::UNSUPPORTED_VERSION),
        (vec![0x01, 1, 2, 0xff, 0xfe, 0xfd], ErrorCode::MALFORMED_FRAME),
    ] {
        for transport in [Transport::Wss, Transport::Quic] {
            let mut conn =
                within("connect", FrameConn::connect(&harness.endpoint(transport))).await.unwrap();
            conn.send(&[bytes.clone().into()]).await.unwrap();
            let reply = within("error", conn.recv()).await.unwrap().unwrap();
            let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
                panic!("not an ERROR")
            };
            assert_eq!(error.code, code, "{bytes:02x?} over {transport:?}");
        }
    }
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_end_the_session_with_a_readable_error() {
    let harness = Harness::start(1, |_| {}).await;
    for (bytes, code) in [
        (vec![0x42], ErrorCode::MALFORMED_FRAME),
        (vec![0x07, 0x80], ErrorCode::MALFORMED_FRAME),
        (vec![0x08, 0x01, 0x00], ErrorCode::MALFORMED_FRAME),
    ] {
        let mut conn = FrameConn::connect(&harness.endpoint(Transport::Wss)).await.unwrap();
        conn.send(&[bytes.into()]).await.unwrap();
        let reply = within("error", conn.recv()).await.unwrap().unwrap();
        let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
            panic!("not an ERROR")
        };
        assert_eq!(error.code, code);
    }
    // a text message on WSS
    let mut conn = FrameConn::connect(&harness.endpoint(Transport::Wss)).await.unwrap();
    conn.send_text("hello").await.unwrap();
    let reply = within("error", conn.recv()).await.unwrap().unwrap();
    let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
        panic!("not an ERROR")
    };
    assert_eq!(error.code, ErrorCode::MALFORMED_FRAME);
    assert_eq!(within("close", conn.recv()).await.unwrap(), Err(Closed::Code(1003)));
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_device_still_sending_when_it_breaks_a_rule_reads_the_error_and_the_close() {
    let harness = Harness::start(1, |_| {}).await;
    let mut conn = FrameConn::connect(&harness.endpoint(Transport::Wss)).await.unwrap();
    // a frame the server refuses, then a backlog of 8 MB it will never read as frames: what a device resending
    // after a reconnect looks like. The server must not reset the connection under it.
    let mut frames = vec![Bytes::from_static(&[0x42])];
    frames.extend(std::iter::repeat_n(Bytes::from(vec![0x03; 1024]), 8 * 1024));
    let sent = within("the backlog sent", conn.send(&frames)).await;
    assert!(sent.is_ok(), "the server reset the connection: {sent:?}");
    let reply = within("error", conn.recv()).await.unwrap().unwrap();
    let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
        panic!("not an ERROR")
    };
    assert_eq!(error.code, ErrorCode::MALFORMED_FRAME);
    let closed = within("close", conn.recv()).await.unwrap();
    assert_eq!(
        closed,
        Err(Closed::Code(u32::from(CloseCode::Error(ErrorCode::MALFORMED_FRAME).websocket())))
    );
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn frames_over_the_limit_are_refused() {
    let harness = Harness::start(1, |c| c.limits.max_frame = 1_024).await;
    // WSS: the WebSocket layer refuses the message with 1009
    let mut device = harness.device("pump-1");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    let conn = device.conn().unwrap();
    conn.send(&[vec![0x08; 4_096].into()]).await.unwrap();
    let closed = within("close", async {
        loop {
            match conn.recv().await {
                Ok(Ok(_)) => continue,
                Ok(Err(closed)) => return closed,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert_eq!(closed, Closed::Code(1009));

    // QUIC: a length prefix over the limit ends the session before the frame is buffered
    let mut device = harness.device("pump-2");
    within("connect", device.connect(&harness.endpoint(Transport::Quic))).await.unwrap();
    let conn = device.conn().unwrap();
    let mut frame = reading(1);
    if let Frame::Properties(p) = &mut frame {
        p.updates[0].value = Value::Bytes(vec![0u8; 2_000].into());
    }
    conn.send(&[frame.to_bytes()]).await.unwrap();
    let reply = within("error", conn.recv()).await.unwrap().unwrap();
    let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
        panic!("not an ERROR")
    };
    assert_eq!(error.code, ErrorCode::FRAME_TOO_LARGE);
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn quic_with_a_wrong_alpn_is_refused_in_the_tls_handshake() {
    let harness = Harness::start(1, |_| {}).await;
    let mut endpoint = harness.endpoint(Transport::Quic);
    endpoint.quic_tls =
        thingport_device::tls_config(std::slice::from_ref(&harness.cert), b"h3").unwrap();
    let err = within("refusal", FrameConn::connect(&endpoint)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("no_application_protocol")
            || format!("{err:#}").contains("120"),
        "{err:#}"
    );
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn tls12_only_clients_are_refused() {
    let harness = Harness::start(1, |_| {}).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(harness.cert.clone()).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(harness.addrs.wss.unwrap()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let err = within(
        "refusal",
        tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("ProtocolVersion"), "{err}");
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_handshake_is_cut_at_the_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let harness =
        Harness::start(1, |c| c.limits.handshake_timeout = Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    // TCP only: no ClientHello
    let mut silent = tokio::net::TcpStream::connect(harness.addrs.wss.unwrap()).await.unwrap();
    // TLS and upgrade done, no HELLO
    let mut no_hello = FrameConn::connect(&harness.endpoint(Transport::Wss)).await.unwrap();
    let mut buf = [0u8; 64];
    let n = within("silent close", silent.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "the server closes without answering");
    let reply = within("error", no_hello.recv()).await.unwrap().unwrap();
    let Frame::Error(error) = Frame::decode(reply, &Default::default()).unwrap() else {
        panic!("not an ERROR")
    };
    assert_eq!(error.code, ErrorCode::HANDSHAKE_TIMEOUT);
    assert!(started.elapsed() >= Duration::from_millis(300));
    // QUIC up, no stream opened (nothing written on it): closed with HANDSHAKE_TIMEOUT, not a normal end
    let mut no_stream = FrameConn::connect(&harness.endpoint(Transport::Quic)).await.unwrap();
    let closed = within("QUIC close", no_stream.recv()).await.unwrap();
    assert_eq!(closed, Err(Closed::Code(u32::from(ErrorCode::HANDSHAKE_TIMEOUT.0))));
    // a trickle (one byte every 50 ms, paced on purpose) does not extend the 300 ms deadline: the server cuts the
    // connection, and the writes start failing well before `within` gives up after 10 s
    let mut trickle = tokio::net::TcpStream::connect(harness.addrs.wss.unwrap()).await.unwrap();
    within("trickle cut at the deadline", async {
        while trickle.write_all(&[0x16]).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn admin_serves_metrics_and_health() {
    let harness = Harness::start(1, |_| {}).await;
    let mut device = harness.device("pump-1");
    device.connect(&harness.endpoint(Transport::Wss)).await.unwrap();
    let (status, body) = harness.admin_get("/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = harness.admin_get("/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (status, metrics) = harness.admin_get("/metrics").await;
    assert_eq!(status, 200);
    for name in [
        "thingport_gateway_sessions_active",
        "thingport_gateway_links_up",
        "thingport_gateway_handshakes_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from\n{metrics}");
    }
    harness.stop().await.unwrap();
}

/// Sends `n` readings and waits until the last is acknowledged.
async fn send_acked(device: &mut thingport_device::Device, n: usize) {
    let mut last = 0;
    for v in 0..n {
        last = device.send(reading(v as i64)).await.unwrap();
    }
    loop {
        if let DeviceEvent::Acked { seq } = within("acks", device.next_event()).await.unwrap()
            && seq >= last
        {
            return;
        }
    }
}

/// Waits until the gateway's `link_events_total{event}` reaches `count`.
async fn link_events(harness: &Harness, event: &str, count: u64) {
    let line = format!("thingport_gateway_link_events_total{{event=\"{event}\"}} ");
    within("link events", async {
        loop {
            let (_, metrics) = harness.admin_get("/metrics").await;
            let seen = metrics
                .lines()
                .find_map(|l| l.strip_prefix(line.as_str()))
                .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64);
            if seen >= count {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn frames_go_to_the_primary_the_routes_name_and_elsewhere_when_it_cannot_take_them() {
    let mut harness = Harness::start(2, |_| {}).await;
    let mut device = harness.device("pump-7");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    // worker-0 says worker-1 leads every partition; an older table from worker-1 changes nothing
    let routes = |version, primary: &str| LinkFrame::Routes {
        version,
        workers: vec![primary.into()],
        primaries: vec![Some(0); thingport_protocol::partition::PARTITIONS],
    };
    assert_eq!(harness.workers[0].send_link(&routes(5, "worker-1")), 2);
    let handle = harness.handle.clone();
    support::wait_for("routes", || handle.routes_version() == 5).await;
    assert_eq!(harness.workers[1].send_link(&routes(4, "worker-0")), 2);
    send_acked(&mut device, 20).await;
    assert_eq!(harness.workers[1].stored("pump-7"), (1..=20).collect::<Vec<_>>(), "in order");
    assert!(harness.workers[0].stored("pump-7").is_empty());

    // the primary's links are saturated: frames go to the other worker's links, and come back once it is relieved
    assert_eq!(harness.workers[1].send_link(&LinkFrame::Load { saturated: true }), 2);
    link_events(&harness, "saturated", 2).await;
    // each link reads in order, so the older table came before LOAD and was let go
    assert_eq!(harness.handle.routes_version(), 5);
    send_acked(&mut device, 5).await;
    assert_eq!(harness.workers[1].stored("pump-7").len(), 20);
    assert_eq!(harness.workers[0].stored("pump-7").len(), 5);
    assert_eq!(harness.workers[1].send_link(&LinkFrame::Load { saturated: false }), 2);
    link_events(&harness, "unsaturated", 2).await;
    send_acked(&mut device, 5).await;
    assert_eq!(harness.workers[1].stored("pump-7").len(), 25);

    // the primary is gone: its frames go to the worker that is left
    let primary = harness.workers.remove(1);
    primary.kill().await;
    send_acked(&mut device, 5).await;
    assert_eq!(harness.workers[0].stored("pump-7").len(), 10);
    assert_eq!(harness.handle.routes_version(), 5, "routes held while a link is up");

    // no link is up: the routes are forgotten, so a pool started again from version 1 is routed by its own
    harness.workers.remove(0).kill().await;
    let handle = harness.handle.clone();
    support::wait_for("routes forgotten", || handle.routes_version() == 0).await;
    device.disconnect().await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_worker_that_says_goaway_gets_no_new_frames_or_sessions() {
    let harness = Harness::start(2, |_| {}).await;
    let mut device = harness.device("pump-7");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    let routes = LinkFrame::Routes {
        version: 5,
        workers: vec!["worker-1".into()],
        primaries: vec![Some(0); thingport_protocol::partition::PARTITIONS],
    };
    assert_eq!(harness.workers[0].send_link(&routes), 2);
    let handle = harness.handle.clone();
    support::wait_for("routes", || handle.routes_version() == 5).await;
    send_acked(&mut device, 5).await;
    assert_eq!(harness.workers[1].stored("pump-7").len(), 5);

    // worker-1 drains: the primary's frames go to the other worker, and so do the OPENs of new sessions
    assert_eq!(harness.workers[1].send_link(&LinkFrame::Goaway), 2);
    link_events(&harness, "goaway", 2).await;
    let mut opened_at_draining = harness.workers[1].subscribe();
    let mut opened = harness.workers[0].subscribe();
    send_acked(&mut device, 5).await;
    assert_eq!(harness.workers[1].stored("pump-7").len(), 5, "no new frame on a draining link");
    assert_eq!(harness.workers[0].stored("pump-7").len(), 5);
    let mut others = Vec::new();
    for i in 0..8 {
        let mut other = harness.device(&format!("valve-{i}"));
        within("connect", other.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
        others.push(other);
    }
    within("the OPENs", async {
        let mut seen = 0;
        while seen < 8 {
            if let Ok(WorkerEvent::Open { .. }) = opened.recv().await {
                seen += 1;
            }
        }
    })
    .await;
    while let Ok(event) = opened_at_draining.try_recv() {
        assert!(!matches!(event, WorkerEvent::Open { .. }), "an OPEN reached the draining worker");
    }
    for mut other in others {
        other.disconnect().await;
    }
    device.disconnect().await;
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_stored_run_acknowledges_every_frame_it_covers_with_one_ack() {
    // one link, so that every frame and its answer share it
    let harness = Harness::start(1, |c| c.upstream.links_per_foundation = 1).await;
    let mut device = harness.device("pump-3");
    within("connect", device.connect(&harness.endpoint(Transport::Wss))).await.unwrap();
    harness.workers[0].hold();
    for v in 0..10 {
        device.send(reading(v)).await.unwrap();
    }
    let worker = &harness.workers[0];
    support::wait_for("frames at the worker", || worker.stored("pump-3").len() == 10).await;
    let sent = worker.release();
    assert!(
        matches!(sent.as_slice(), [LinkFrame::StoredRun { first: 1, last: 10, .. }]),
        "one run for the ten: {sent:?}"
    );
    let mut acks = Vec::new();
    while acks.last() != Some(&10) {
        if let DeviceEvent::Acked { seq } = within("ack", device.next_event()).await.unwrap() {
            acks.push(seq);
        }
    }
    assert_eq!(acks, vec![10], "one cumulative ACK");
    assert_eq!(device.session.unacked(), 0);
    device.disconnect().await;
    harness.stop().await.unwrap();
}
