//! A plain-WebSocket backend that speaks the server side of the device protocol and acknowledges every data frame
//! at once: what nginx and HAProxy proxy to in the side-by-side benchmark (they terminate TLS and forward the
//! WebSocket unchanged), so the same load generator drives all three.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use thingport_protocol::{Frame, Limits, ServerConfig, ServerEvent, ServerSession};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};

/// Serves until the process ends.
pub async fn serve(listen: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    eprintln!("WebSocket backend on {}", listener.local_addr()?);
    let mut next_id = 0u64;
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        tokio::spawn(async move {
            let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
            // answer with the device protocol's subprotocol, as the gateway does
            #[allow(
                clippy::result_large_err,
                reason = "the callback's error type is tungstenite's"
            )]
            let subprotocol =
                |_: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
                    response.headers_mut().insert(
                        "sec-websocket-protocol",
                        HeaderValue::from_static(thingport_protocol::WS_SUBPROTOCOL),
                    );
                    Ok(response)
                };
            let Ok(mut ws) =
                tokio_tungstenite::accept_hdr_async_with_config(stream, subprotocol, Some(config))
                    .await
            else {
                return;
            };
            let mut session = ServerSession::new(ServerConfig::default(), id, Instant::now());
            while let Some(Ok(message)) = ws.next().await {
                let Message::Binary(raw) = message else { continue };
                let Ok(frame) = Frame::decode(raw, &Limits::DEFAULT) else { return };
                match session.handle_frame(frame, Instant::now()) {
                    Ok(Some(ServerEvent::Hello(_))) => {
                        session.accept();
                    }
                    Ok(Some(ServerEvent::Data { seq })) => {
                        session.stored(seq);
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
                while let Some(reply) = session.poll_transmit() {
                    if ws.feed(Message::Binary(reply.to_bytes())).await.is_err() {
                        return;
                    }
                }
                if ws.flush().await.is_err() {
                    return;
                }
            }
        });
    }
}
