//! RFC 6455 at the gateway's WebSocket endpoint, with frames written byte by byte (a normal client library cannot
//! send an unmasked frame or a reserved opcode): protocol violations close with 1002, and a device's close frame is
//! echoed.

#![allow(clippy::unwrap_used, reason = "in tests a panic is a failed assertion")]

mod support;

use support::{Harness, within};
use thingport_device::Transport;
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
    assert!(payload.len() < 126);
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut frame = vec![0x80 | opcode, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// The code of the server's close frame, skipping other frames; `None` if the connection ends without one.
async fn close_code(tls: &mut TlsStream<TcpStream>) -> Option<u16> {
    loop {
        let first = tls.read_u8().await.ok()?;
        let len = match tls.read_u8().await.ok()? & 0x7f {
            126 => usize::from(tls.read_u16().await.ok()?),
            127 => usize::try_from(tls.read_u64().await.ok()?).ok()?,
            n => usize::from(n),
        };
        let mut payload = vec![0; len];
        tls.read_exact(&mut payload).await.ok()?;
        if first & 0x0f == 0x8 {
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
