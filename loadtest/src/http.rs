//! A minimal HTTP/1.1 client for the foundation API, reusing one keep-alive connection.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// POSTs a JSON body; returns the status. Reconnects if the kept connection was closed.
pub async fn post(
    conn: &mut Option<TcpStream>,
    api: SocketAddr,
    path: &str,
    key: &str,
    body: &str,
) -> Result<u16> {
    Ok(request(conn, api, "POST", path, key, Some(body)).await?.0)
}

/// Sends a request (with a JSON body if given); returns the status and the body. Reconnects if the kept
/// connection was closed.
pub async fn request(
    conn: &mut Option<TcpStream>,
    api: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> Result<(u16, Vec<u8>)> {
    for attempt in 0..2 {
        if conn.is_none() {
            let stream = TcpStream::connect(api).await.context("connecting to the API")?;
            stream.set_nodelay(true)?;
            *conn = Some(stream);
        }
        let Some(stream) = conn.as_mut() else { bail!("no connection") };
        let request = match body {
            Some(body) => format!(
                "{method} {path} HTTP/1.1\r\nhost: api\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            ),
            None => format!("{method} {path} HTTP/1.1\r\nhost: api\r\nx-api-key: {key}\r\n\r\n"),
        };
        match exchange(stream, &request).await {
            Ok(answer) => return Ok(answer),
            Err(e) if attempt == 0 => {
                tracing::debug!(error = %e, "API connection lost; reconnecting");
                *conn = None;
            }
            Err(e) => return Err(e),
        }
    }
    bail!("unreachable")
}

async fn exchange(stream: &mut TcpStream, request: &str) -> Result<(u16, Vec<u8>)> {
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::with_capacity(1024);
    let header_end = loop {
        let mut chunk = [0u8; 1024];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 64 * 1024 {
            bail!("response headers too large");
        }
    };
    let head = std::str::from_utf8(&buf[..header_end])?;
    let status: u16 = head.split_whitespace().nth(1).context("no status")?.parse()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")))
        .map(|(_, v)| v.trim().parse())
        .transpose()?
        .unwrap_or(0);
    if length > 16 << 20 {
        bail!("response body of {length} bytes");
    }
    let mut body = buf.split_off(header_end);
    while body.len() < length {
        let mut chunk = vec![0u8; length - body.len()];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("connection closed in the body");
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok((status, body))
}
