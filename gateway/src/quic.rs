//! The QUIC listener (quinn): admission before the handshake (`refuse`), then one bidirectional stream per device
//! carrying varint length-prefixed frames.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls_pki_types::CertificateDer;
use thingport_protocol::codec::{CodecError, StreamCodec};
use thingport_protocol::{DecodeError, ErrorCode, Transport, stream};
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::config::Config;
use crate::metrics;
use crate::session::{self, Accepted, CloseCode, DeviceIo, IoError};
use crate::tls::{ServerTls, client_cert_names};

/// A QUIC endpoint on `socket` with the gateway's TLS and limits.
pub fn endpoint(
    config: &Config,
    tls: &ServerTls,
    socket: std::net::UdpSocket,
) -> anyhow::Result<Endpoint> {
    let crypto = QuicServerConfig::try_from(tls.quic.clone()).context("QUIC TLS configuration")?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let window = (config.limits.max_frame as u32).saturating_mul(2).max(16 * 1024);
    let idle = Duration::from_secs(u64::from(config.session.max_keepalive_secs) * 3 / 2)
        .max(config.limits.handshake_timeout);
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .stream_receive_window(window.into())
        .receive_window(window.into())
        .send_window(u64::from(window) * 2)
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(idle.try_into().context("QUIC idle timeout")?));
    server.transport_config(Arc::new(transport));
    let runtime = quinn::default_runtime().context("no async runtime for QUIC")?;
    Endpoint::new(quinn::EndpointConfig::default(), Some(server), socket, runtime)
        .context("QUIC endpoint")
}

/// Accepts QUIC connections until `cancel`.
pub async fn serve(shared: Arc<Shared>, endpoint: Endpoint, cancel: CancellationToken) {
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => return,
            incoming = endpoint.accept() => incoming,
        };
        let Some(incoming) = incoming else { return };
        // under load, a client proves its address with a Retry (stateless) before it may take a handshake slot
        let incoming = if !incoming.remote_address_validated() && shared.admission.busy("quic") {
            match incoming.retry() {
                Ok(()) => {
                    metrics::handshake("quic", "retry");
                    continue;
                }
                Err(cannot) => cannot.into_incoming(),
            }
        } else {
            incoming
        };
        // refused before the handshake: one CONNECTION_CLOSE, no crypto
        let Ok((permit, handshake)) =
            shared.admission.admit(incoming.remote_address().ip(), "quic")
        else {
            incoming.refuse();
            continue;
        };
        let at = Instant::now();
        let peer = incoming.remote_address();
        let shared = shared.clone();
        tokio::spawn(async move {
            let deadline =
                tokio::time::Instant::from_std(at + shared.config.limits.handshake_timeout);
            // boxed: the handshake's state is short-lived (see wss.rs)
            let connected = tokio::time::timeout_at(
                deadline,
                Box::pin(async {
                    incoming.accept().map_err(|_| "quic_failed")?.await.map_err(|_| "tls_failed")
                }),
            )
            .await;
            let connection = match connected {
                Ok(Ok(connection)) => connection,
                Ok(Err(reason)) => {
                    metrics::handshake("quic", reason);
                    return;
                }
                Err(_) => {
                    metrics::handshake("quic", "handshake_timeout");
                    return;
                }
            };
            let (send, recv) = match tokio::time::timeout_at(deadline, connection.accept_bi()).await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(_)) => {
                    metrics::handshake("quic", "no_stream");
                    return;
                }
                Err(_) => {
                    // up, but no stream before the deadline: the session ends with HANDSHAKE_TIMEOUT (§2.3)
                    metrics::handshake("quic", "handshake_timeout");
                    let code = ErrorCode::HANDSHAKE_TIMEOUT;
                    connection.close(VarInt::from_u32(code.0.into()), b"handshake deadline passed");
                    return;
                }
            };
            let cert_names = connection
                .peer_identity()
                .and_then(|identity| identity.downcast::<Vec<CertificateDer<'static>>>().ok())
                .and_then(|chain| chain.first().map(client_cert_names))
                .unwrap_or_default();
            let io = QuicIo {
                connection,
                send,
                recv,
                buf: BytesMut::new(),
                codec: StreamCodec { max_frame: shared.config.limits.max_frame },
            };
            let accepted =
                Accepted { transport: Transport::Quic, peer, at, cert_names, permit, handshake };
            // a task of its own, sized for the session only (see wss.rs)
            tokio::spawn(session::run(shared, io, accepted));
        });
    }
}

struct QuicIo {
    connection: Connection,
    send: SendStream,
    recv: RecvStream,
    /// Bytes read and not yet a whole frame. Empty (and without an allocation) between frames, so that an idle
    /// session holds no receive buffer.
    buf: BytesMut,
    codec: StreamCodec,
}

impl DeviceIo for QuicIo {
    async fn recv(&mut self) -> Result<Option<Bytes>, IoError> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(frame)) => {
                    if self.buf.is_empty() {
                        // the old allocation now lives only as long as the frames split from it
                        self.buf = BytesMut::new();
                    }
                    return Ok(Some(frame));
                }
                Ok(None) => {}
                Err(CodecError::Decode(e)) => {
                    let close = if matches!(e, DecodeError::TooLong { .. }) { 1009 } else { 1002 };
                    return Err(IoError::Refused { code: e.code(), close, message: e.to_string() });
                }
                Err(e) => return Err(IoError::Broken(e.to_string())),
            }
            match self.recv.read_chunk(64 * 1024, true).await {
                // Copied, not kept: a chunk shares quinn's receive buffer, and a frame is held until a worker
                // stores it, which would keep that whole buffer alive.
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(None) => return Ok(None),
                Err(e) => return Err(IoError::Broken(e.to_string())),
            }
        }
    }

    async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), IoError> {
        let total = frames.iter().map(|f| stream::framed_len(f.len())).sum();
        let mut out = BytesMut::with_capacity(total);
        for frame in &frames {
            self.codec.encode(&frame[..], &mut out).map_err(|e| IoError::Broken(e.to_string()))?;
        }
        self.send.write_all(&out).await.map_err(|e| IoError::Broken(e.to_string()))
    }

    async fn close(&mut self, code: CloseCode) {
        // let what was written (an ERROR, a GOAWAY) arrive before the connection closes
        let _ = self.send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.send.stopped()).await;
        self.connection.close(VarInt::from_u32(code.quic()), b"");
    }
}
