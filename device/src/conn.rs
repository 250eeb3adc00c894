//! Transports: [`FrameConn`] moves whole device frames over WSS (RFC 6455 binary messages, subprotocol
//! `thingport.v1`), QUIC (one bidirectional stream of length-prefixed frames, ALPN `thingport/1`) or, for measuring
//! a backend directly, plain WebSocket. [`Endpoint`] says where and with which TLS settings.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use thingport_protocol::stream;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::{Message, WebSocketConfig};

/// Which transport a device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Transport {
    Wss,
    Quic,
    /// WebSocket without TLS: only for measuring a backend directly.
    Ws,
}

/// TLS settings of a client: trust one certificate (the gateway's self-signed one) or a CA bundle.
pub fn tls_config(
    trusted: &[CertificateDer<'static>],
    alpn: &[u8],
) -> Result<Arc<rustls::ClientConfig>> {
    tls_config_with_identity(trusted, alpn, None)
}

/// A client certificate chain and its key, for mutual TLS.
pub type Identity = (Vec<CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>);

/// TLS settings of a client that presents a client certificate when `identity` is given.
pub fn tls_config_with_identity(
    trusted: &[CertificateDer<'static>],
    alpn: &[u8],
    identity: Option<Identity>,
) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trusted {
        roots.add(cert.clone()).context("adding a trusted certificate")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => {
            builder.with_client_auth_cert(chain, key).context("client certificate")?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Name checked against the server certificate.
    pub server_name: String,
    pub transport: Transport,
    /// Client TLS for WSS (ALPN `http/1.1`) and QUIC (ALPN `thingport/1`).
    pub wss_tls: Arc<rustls::ClientConfig>,
    pub quic_tls: Arc<rustls::ClientConfig>,
    /// Local address to connect from (several source addresses get past the ephemeral-port limit).
    pub bind: Option<std::net::IpAddr>,
}

impl Endpoint {
    /// An endpoint trusting `cert` for both transports.
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        transport: Transport,
        trusted: &[CertificateDer<'static>],
    ) -> Result<Self> {
        Ok(Endpoint {
            addr,
            server_name: server_name.to_string(),
            transport,
            wss_tls: tls_config(trusted, b"http/1.1")?,
            quic_tls: tls_config(trusted, thingport_protocol::QUIC_ALPN)?,
            bind: None,
        })
    }
}

type Wss = WebSocketStream<ClientStream>;

/// A client's TCP stream, with or without TLS.
#[derive(Debug)]
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for ClientStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for ClientStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A connection moving whole device frames.
#[derive(Debug)]
pub enum FrameConn {
    Wss(Box<Wss>),
    Quic {
        connection: quinn::Connection,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        buf: BytesMut,
        _endpoint: quinn::Endpoint,
    },
}

/// How a connection ended, as the device saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// WebSocket close frame with this code, or a QUIC application close with this code.
    Code(u32),
    /// The connection ended without a code.
    Plain,
}

impl FrameConn {
    /// Connects and finishes TLS (and the WebSocket upgrade).
    pub async fn connect(endpoint: &Endpoint) -> Result<FrameConn> {
        let name = ServerName::try_from(endpoint.server_name.clone()).context("server name")?;
        match endpoint.transport {
            Transport::Wss | Transport::Ws => {
                let socket = match endpoint.addr {
                    SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
                    SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
                };
                if let Some(ip) = endpoint.bind {
                    socket.bind(SocketAddr::new(ip, 0))?;
                }
                let tcp = socket.connect(endpoint.addr).await.context("TCP connect")?;
                tcp.set_nodelay(true)?;
                let (stream, scheme) = if endpoint.transport == Transport::Ws {
                    (ClientStream::Plain(tcp), "ws")
                } else {
                    let tls = TlsConnector::from(endpoint.wss_tls.clone())
                        .connect(name, tcp)
                        .await
                        .context("TLS handshake")?;
                    (ClientStream::Tls(Box::new(tls)), "wss")
                };
                let url =
                    format!("{scheme}://{}{}", endpoint.server_name, thingport_protocol::WS_PATH);
                let mut request = url.into_client_request()?;
                request.headers_mut().insert(
                    "sec-websocket-protocol",
                    HeaderValue::from_static(thingport_protocol::WS_SUBPROTOCOL),
                );
                let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
                let (ws, _) =
                    tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                        .await
                        .context("WebSocket upgrade")?;
                Ok(FrameConn::Wss(Box::new(ws)))
            }
            Transport::Quic => {
                let bind = SocketAddr::new(
                    endpoint.bind.unwrap_or(if endpoint.addr.is_ipv4() {
                        [0, 0, 0, 0].into()
                    } else {
                        std::net::Ipv6Addr::UNSPECIFIED.into()
                    }),
                    0,
                );
                let mut quic = quinn::Endpoint::client(bind)?;
                let crypto =
                    quinn::crypto::rustls::QuicClientConfig::try_from(endpoint.quic_tls.clone())?;
                quic.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
                let connection = quic
                    .connect(endpoint.addr, &endpoint.server_name)?
                    .await
                    .context("QUIC handshake")?;
                let (send, recv) =
                    connection.open_bi().await.context("opening the device stream")?;
                Ok(FrameConn::Quic {
                    connection,
                    send,
                    recv,
                    buf: BytesMut::new(),
                    _endpoint: quic,
                })
            }
        }
    }

    /// Sends encoded frames, flushing once.
    pub async fn send(&mut self, frames: &[Bytes]) -> Result<()> {
        match self {
            FrameConn::Wss(ws) => {
                for frame in frames {
                    ws.feed(Message::Binary(frame.clone())).await?;
                }
                ws.flush().await?;
            }
            FrameConn::Quic { send, .. } => {
                let mut out = BytesMut::new();
                for frame in frames {
                    stream::put_len(&mut out, frame.len());
                    out.extend_from_slice(frame);
                }
                send.write_all(&out).await?;
            }
        }
        Ok(())
    }

    /// Sends one WebSocket text message (WSS only): a protocol violation, for tests.
    pub async fn send_text(&mut self, text: &str) -> Result<()> {
        match self {
            FrameConn::Wss(ws) => Ok(ws.send(Message::Text(text.into())).await?),
            FrameConn::Quic { .. } => bail!("text messages exist only on WSS"),
        }
    }

    /// The next frame, or how the connection closed. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Result<Bytes, Closed>> {
        match self {
            FrameConn::Wss(ws) => loop {
                match ws.next().await {
                    Some(Ok(Message::Binary(frame))) => return Ok(Ok(frame)),
                    Some(Ok(Message::Close(frame))) => {
                        return Ok(Err(
                            frame.map_or(Closed::Plain, |f| Closed::Code(u16::from(f.code).into()))
                        ));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Err(anyhow!(e)),
                    None => return Ok(Err(Closed::Plain)),
                }
            },
            FrameConn::Quic { connection, recv, buf, .. } => loop {
                if let Some(frame) = stream::next_frame(buf, usize::MAX >> 1)? {
                    return Ok(Ok(frame));
                }
                match recv.read_chunk(64 * 1024, true).await {
                    Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
                    Ok(None) => return Ok(Err(quic_close(connection).await)),
                    Err(quinn::ReadError::ConnectionLost(
                        quinn::ConnectionError::ApplicationClosed(close),
                    )) => {
                        return Ok(Err(Closed::Code(close.error_code.into_inner() as u32)));
                    }
                    Err(quinn::ReadError::ConnectionLost(_)) => return Ok(Err(Closed::Plain)),
                    Err(e) => return Err(anyhow!(e)),
                }
            },
        }
    }

    /// Closes the connection (a normal close).
    pub async fn close(&mut self) {
        match self {
            FrameConn::Wss(ws) => {
                let _ = tokio::time::timeout(Duration::from_secs(1), (**ws).close(None)).await;
            }
            FrameConn::Quic { connection, .. } => connection.close(0u32.into(), b""),
        }
    }
}

async fn quic_close(connection: &quinn::Connection) -> Closed {
    match tokio::time::timeout(Duration::from_secs(2), connection.closed()).await {
        Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
            Closed::Code(close.error_code.into_inner() as u32)
        }
        _ => Closed::Plain,
    }
}
