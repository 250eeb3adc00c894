//! RFC 6455 at the gateway's WebSocket endpoint, with frames written byte by byte (a normal client library cannot
//! send an unmasked frame or a reserved opcode): protocol violations close with 1002, a device's close frame is
//! echoed, and the server's keepalive ends a silent session and only a silent one.

#![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

mod support;

use std::time::{Duration, Instant};

use support::{Harness, within};
use thingport_device::Transport;
use thingport_protocol::{Credential, ErrorCode, Frame, Hello, Limits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// TLS, then the upgrade to the device protocol's WebSocket, by hand.
async fn upgraded(harness: &Harness) -> TlsStream<TcpStream> {
    let endpoint = harness.endpoint(Transport::Wss);
    let tcp = TcpStream::connect(endpoint.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(endpoint.wss_tls.clone())
        .connect(name, tcp)
        .await
        .unwrap();
    let request = "GET /v1/device HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Protocol: thingport.v1\r\n\r\n";
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(tls.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    tls
}

/// A masked client frame.
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x80 | opcode];
    match u16::try_from(payload.len()).unwrap() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&n.to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The next WebSocket frame the server sends: its opcode and payload; `None` if the connection ends.
async fn next_ws_frame(tls: &mut TlsStream<TcpStream>) -> Option<(u8, Vec<u8>)> {
    let first = tls.read_u8().await.ok()?;
    let len = match tls.read_u8().await.ok()? & 0x7f {
        126 => usize::from(tls.read_u16().await.ok()?),
        127 => usize::try_from(tls.read_u64().await.ok()?).ok()?,
        n => usize::from(n),
    };
    let mut payload = vec![0; len];
    tls.read_exact(&mut payload).await.ok()?;
    Some((first & 0x0f, payload))
}

/// The next device frame the server sends in a binary WebSocket frame; `None` at a close frame or the end.
async fn next_frame(tls: &mut TlsStream<TcpStream>) -> Option<Frame> {
    loop {
        match next_ws_frame(tls).await? {
            (0x2, payload) => {
                return Some(Frame::decode(payload.into(), &Limits::DEFAULT).unwrap());
            }
            (0x8, _) => return None,
            _ => {}
        }
    }
}

/// The code of the server's close frame, skipping other frames; `None` if the connection ends without one.
async fn close_code(tls: &mut TlsStream<TcpStream>) -> Option<u16> {
    loop {
        if let (0x8, payload) = next_ws_frame(tls).await? {
            return Some(payload.get(..2).map_or(1005, |c| u16::from_be_bytes([c[0], c[1]])));
        }
    }
}

#[tokio::test]
async fn protocol_violations_close_with_1002() {
    let harness = Harness::start(1, |_| {}).await;
    // an unmasked binary frame (RFC 6455 §5.1), and a reserved opcode (§5.2)
    for bad in [vec![0x82, 0x01, 0x42], masked(0x3, b"x")] {
        let mut tls = upgraded(&harness).await;
        tls.write_all(&bad).await.unwrap();
        assert_eq!(within("close", close_code(&mut tls)).await, Some(1002), "{bad:02x?}");
    }
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn a_device_close_is_echoed() {
    let harness = Harness::start(1, |_| {}).await;
    let mut tls = upgraded(&harness).await;
    tls.write_all(&masked(0x8, &1000u16.to_be_bytes())).await.unwrap();
    assert_eq!(within("close", close_code(&mut tls)).await, Some(1000));
    harness.stop().await.unwrap();
}

#[tokio::test]
async fn the_keepalive_ends_a_silent_session_and_not_one_that_talks() {
    let harness = Harness::start(1, |c| c.session.min_keepalive_secs = 1).await;
    let mut tls = upgraded(&harness).await;
    let hello = Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        thing: "keepalive-1".into(),
        credential: Credential::Token(harness.token("keepalive-1", 3_600).into()),
        keepalive_secs: 1,
        incarnation: 7,
        resume_seq: 1,
    });
    tls.write_all(&masked(0x2, &hello.to_bytes())).await.unwrap();
    match within("WELCOME", next_frame(&mut tls)).await {
        Some(Frame::Welcome(w)) => assert_eq!(w.keepalive_secs, 1),
        other => panic!("expected WELCOME, got {other:?}"),
    }
    // a PING every 400 ms for three seconds, twice the 1.5 s after which silence ends a session: each is answered
    let talking = Instant::now();
    let mut nonce = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(400));
    while talking.elapsed() < Duration::from_secs(3) {
        tick.tick().await;
        nonce += 1;
        tls.write_all(&masked(0x2, &Frame::Ping { nonce }.to_bytes())).await.unwrap();
        assert_eq!(within("PONG", next_frame(&mut tls)).await, Some(Frame::Pong { nonce }));
    }
    // then silence: the session ends with KEEPALIVE_TIMEOUT, not before 1.5 s of it
    let silent = Instant::now();
    match within("keepalive ERROR", next_frame(&mut tls)).await {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::KEEPALIVE_TIMEOUT),
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert!(silent.elapsed() >= Duration::from_millis(1_400), "{:?}", silent.elapsed());
    // the gateway's links, silent towards the worker in between, stayed up all along
    let (_, metrics) = harness.admin_get("/metrics").await;
    assert!(!metrics.contains(r#"event="failed""#), "{metrics}");
    harness.stop().await.unwrap();
}
