//! The WSS listener: TCP accept, admission, TLS (tokio-rustls), the WebSocket upgrade (tokio-tungstenite) with a
//! small read buffer and a header cap, then a device session.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use thingport_protocol::{ErrorCode, Transport, WS_PATH, WS_SUBPROTOCOL};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, error::CapacityError};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::metrics;
use crate::session::{self, Accepted, CloseCode, DeviceIo, IoError};
use crate::tls::client_cert_names;

/// Accepts WSS connections until `cancel`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // out of descriptors or memory: back off briefly rather than spin
                tracing::warn!(error = %e, "WSS accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // refused before any TLS work: the socket is simply closed
        let Ok(waiting) = shared.admission.wait(peer.ip()) else {
            continue;
        };
        let at = Instant::now();
        let shared = shared.clone();
        tokio::spawn(async move {
            // until its first bytes arrive a connection is a socket and this small task, with its own short
            // deadline, and takes no handshake slot: idle connections cannot lock devices out
            let limits = &shared.config.limits;
            let first_bytes = limits.first_bytes_timeout.min(limits.handshake_timeout);
            let first_bytes = tokio::time::Instant::from_std(at + first_bytes);
            // `peek`, not `readable`: readiness may be reported before any byte is there
            if tokio::time::timeout_at(first_bytes, stream.peek(&mut [0u8; 1])).await.is_err() {
                metrics::handshake("wss", "first_bytes_timeout");
                return;
            }
            drop(waiting);
            let Ok((permit, handshake)) = shared.admission.admit(peer.ip(), "wss") else {
                return;
            };
            let deadline = tokio::time::Instant::from_std(at + limits.handshake_timeout);
            // boxed: the handshake's state is large and short-lived, and would otherwise stay in the task's
            // allocation for the whole session
            let upgraded =
                tokio::time::timeout_at(deadline, Box::pin(upgrade(&shared, stream))).await;
            let (ws, cert_names) = match upgraded {
                Ok(Ok(upgraded)) => upgraded,
                Ok(Err(reason)) => {
                    metrics::handshake("wss", reason);
                    return;
                }
                Err(_) => {
                    metrics::handshake("wss", "handshake_timeout");
                    return;
                }
            };
            let io = WssIo { ws, linger: shared.config.session.close_linger };
            let accepted =
                Accepted { transport: Transport::Wss, peer, at, cert_names, permit, handshake };
            // a task of its own: this handshake task's allocation (sized for the handshake) is freed, and the
            // session's holds only what a session needs
            tokio::spawn(session::run(shared, io, accepted));
        });
    }
}

type Ws = WebSocketStream<HeaderCap<TlsStream<TcpStream>>>;

/// TLS and the WebSocket upgrade. The error is the label of the failed handshake.
async fn upgrade(shared: &Shared, stream: TcpStream) -> Result<(Ws, Vec<String>), &'static str> {
    let _ = stream.set_nodelay(true);
    let tls =
        TlsAcceptor::from(shared.tls.wss.clone()).accept(stream).await.map_err(|_| "tls_failed")?;
    let cert_names = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(client_cert_names)
        .unwrap_or_default();
    let max_frame = shared.config.limits.max_frame;
    let config = WebSocketConfig::default()
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(shared.config.session.send_queue_bytes.max(max_frame) * 2)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    let capped = HeaderCap { inner: tls, left: Some(shared.config.limits.max_header_bytes) };
    let mut ws =
        tokio_tungstenite::accept_hdr_async_with_config(capped, check_upgrade, Some(config))
            .await
            .map_err(|e| match e {
                tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::InvalidData => {
                    "headers_too_large"
                }
                _ => "upgrade_failed",
            })?;
    ws.get_mut().left = None;
    Ok((ws, cert_names))
}

/// Accepts only `GET /v1/device` offering the `thingport.v1` subprotocol (`docs/PROTOCOL.md` §2.2).
#[allow(clippy::result_large_err, reason = "the error type is tungstenite's")]
fn check_upgrade(request: &Request, mut response: Response) -> Result<Response, ErrorResponse> {
    let refuse = |status: StatusCode, why: &str| {
        let mut response = ErrorResponse::new(Some(why.to_string()));
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != WS_PATH {
        return Err(refuse(StatusCode::NOT_FOUND, "the device endpoint is /v1/device\n"));
    }
    let offered = request
        .headers()
        .get_all("sec-websocket-protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == WS_SUBPROTOCOL);
    if !offered {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "offer the WebSocket subprotocol thingport.v1\n",
        ));
    }
    response
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static(WS_SUBPROTOCOL));
    Ok(response)
}

/// Caps the bytes read during the upgrade (the request headers); lifted once the upgrade is done.
#[derive(Debug)]
pub struct HeaderCap<S> {
    inner: S,
    left: Option<usize>,
}

impl<S: AsyncRead + Unpin> AsyncRead for HeaderCap<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(left)) = (&poll, self.left) {
            let read = buf.filled().len() - before;
            if read > left {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "upgrade headers too large",
                )));
            }
            self.left = Some(left - read);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HeaderCap<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct WssIo {
    ws: Ws,
    linger: Duration,
}

impl DeviceIo for WssIo {
    async fn recv(&mut self) -> Result<Option<Bytes>, IoError> {
        loop {
            return match self.ws.next().await {
                None => Ok(None),
                Some(Ok(Message::Close(_))) => {
                    // RFC 6455 §5.5.1: tungstenite queued the echo of the device's close frame; send it
                    let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.flush()).await;
                    Ok(None)
                }
                Some(Ok(Message::Binary(frame))) => Ok(Some(frame)),
                Some(Ok(Message::Text(_))) => Err(IoError::Refused {
                    code: ErrorCode::MALFORMED_FRAME,
                    close: 1003,
                    message: "text messages are not part of the protocol; send binary frames"
                        .into(),
                }),
                Some(Ok(_)) => continue, // ping and pong: tungstenite answers pings itself
                Some(Err(tungstenite::Error::Capacity(CapacityError::MessageTooLong {
                    size,
                    max_size,
                }))) => Err(IoError::Refused {
                    code: ErrorCode::FRAME_TOO_LARGE,
                    close: 1009,
                    message: format!("message of {size} bytes over the limit of {max_size}"),
                }),
                // RFC 6455 §7.4.1: an unmasked client frame, a reserved opcode or bits, a bad close frame
                Some(Err(tungstenite::Error::Protocol(e))) => Err(IoError::Refused {
                    code: ErrorCode::MALFORMED_FRAME,
                    close: 1002,
                    message: format!("WebSocket protocol error: {e}"),
                }),
                Some(Err(e)) => Err(IoError::Broken(e.to_string())),
            };
        }
    }

    async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), IoError> {
        for frame in frames {
            self.ws
                .feed(Message::Binary(frame))
                .await
                .map_err(|e| IoError::Broken(e.to_string()))?;
        }
        self.ws.flush().await.map_err(|e| IoError::Broken(e.to_string()))
    }

    /// Sends the close frame, then half-closes (TLS `close_notify` and TCP FIN) and reads what the device still
    /// sends, discarding it unread, until it closes its side or `linger` passes. A socket closed with unread data
    /// answers with a reset, and the device's stack would drop the `ERROR` and close frame still in flight to it.
    async fn close(&mut self, code: CloseCode) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let frame = CloseFrame { code: code.websocket().into(), reason: "".into() };
        let _ = tokio::time::timeout(Duration::from_secs(1), self.ws.close(Some(frame))).await;
        let tls = &mut self.ws.get_mut().inner;
        let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        // the raw TCP bytes: nothing of them is needed, so they are not decrypted
        let tcp = tls.get_mut().0;
        let _ = tokio::time::timeout(self.linger, async {
            // on the heap: a buffer in this future would enlarge every session task's allocation
            let mut discard = vec![0u8; 4096];
            while let Ok(1..) = tcp.read(&mut discard).await {}
        })
        .await;
    }
}
