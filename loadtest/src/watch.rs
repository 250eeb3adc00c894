//! Streams of changes read as an application reads them: many Server-Sent Event streams on a worker's API
//! (`GET /v1/things/{thing}/stream`, docs/API.md), each following one thing, with the delay from the partition's
//! primary receiving a value (its `received_ms`) to the stream delivering it, on this machine's clock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

/// Streams being opened at once.
const OPENING: usize = 16;

/// What the streams received.
#[derive(Debug, Serialize)]
pub struct WatchReport {
    pub streams: usize,
    pub properties: u64,
    pub cuts: u64,
    pub gaps: u64,
    /// Streams that failed or ended before the time was up.
    pub failed: u64,
    pub p50_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
}

impl WatchReport {
    pub fn table(&self) -> String {
        format!(
            "streams {}  property events {}  cuts {}  gaps {}  failed {}\n\
             delay from the primary's receipt to the stream: p50 {} ms  p99 {} ms  max {} ms\n",
            self.streams,
            self.properties,
            self.cuts,
            self.gaps,
            self.failed,
            self.p50_ms,
            self.p99_ms,
            self.max_ms
        )
    }
}

#[derive(Debug, Default)]
struct Counts {
    properties: AtomicU64,
    cuts: AtomicU64,
    gaps: AtomicU64,
    failed: AtomicU64,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Opens one stream per thing and reads them all until `duration` has passed since every one was open.
pub async fn watch(
    api: SocketAddr,
    key: &str,
    things: Vec<String>,
    duration: Duration,
    opened: impl FnOnce(usize),
) -> Result<WatchReport> {
    let delays = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1, 3_600_000, 3)?));
    let counts = Arc::new(Counts::default());
    let opening = Arc::new(Semaphore::new(OPENING));
    let mut open = Vec::new();
    for thing in &things {
        let permit = opening.clone().acquire_owned().await?;
        let stream =
            connect(api, key, thing).await.with_context(|| format!("the stream of {thing}"))?;
        drop(permit);
        open.push(stream);
    }
    opened(open.len());
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for lines in open {
        let (delays, counts) = (delays.clone(), counts.clone());
        tasks.push(tokio::spawn(async move {
            let read = read(lines, &delays, &counts);
            match tokio::time::timeout_at(deadline.into(), read).await {
                Ok(_) => counts.failed.fetch_add(1, Ordering::Relaxed),
                Err(_) => 0,
            };
        }));
    }
    for task in tasks {
        task.await?;
    }
    let delays = delays.lock().map_err(|_| anyhow::anyhow!("a stream task panicked"))?;
    Ok(WatchReport {
        streams: things.len(),
        properties: counts.properties.load(Ordering::Relaxed),
        cuts: counts.cuts.load(Ordering::Relaxed),
        gaps: counts.gaps.load(Ordering::Relaxed),
        failed: counts.failed.load(Ordering::Relaxed),
        p50_ms: delays.value_at_quantile(0.5),
        p99_ms: delays.value_at_quantile(0.99),
        max_ms: delays.max(),
    })
}

/// Sends the request (HTTP/1.0, so that the body is not chunked) and reads past the headers.
async fn connect(api: SocketAddr, key: &str, thing: &str) -> Result<BufReader<TcpStream>> {
    let mut tcp = TcpStream::connect(api).await?;
    tcp.set_nodelay(true)?;
    let request = format!("GET /v1/things/{thing}/stream HTTP/1.0\r\nx-api-key: {key}\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut lines = BufReader::new(tcp);
    let mut status = String::new();
    lines.read_line(&mut status).await?;
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("answered {}", status.trim());
    }
    loop {
        let mut header = String::new();
        if lines.read_line(&mut header).await? == 0 {
            bail!("closed in the headers");
        }
        if header.trim().is_empty() {
            return Ok(lines);
        }
    }
}

/// Reads events until the stream ends, recording each property event's delay.
async fn read(mut lines: BufReader<TcpStream>, delays: &Mutex<Histogram<u64>>, counts: &Counts) {
    let (mut kind, mut data) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let text = line.trim_end_matches(['\r', '\n']);
        if !text.is_empty() {
            if let Some(v) = text.strip_prefix("event:") {
                kind = v.trim().to_string();
            } else if let Some(v) = text.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
            continue;
        }
        match kind.as_str() {
            "property" => {
                let received = serde_json::from_str::<serde_json::Value>(&data)
                    .ok()
                    .and_then(|v| v["received_ms"].as_u64());
                if let Some(received) = received {
                    let delay = now_ms().saturating_sub(received).max(1);
                    if let Ok(mut delays) = delays.lock() {
                        let _ = delays.record(delay);
                    }
                    counts.properties.fetch_add(1, Ordering::Relaxed);
                }
            }
            "cut" => {
                counts.cuts.fetch_add(1, Ordering::Relaxed);
            }
            "gap" => {
                counts.gaps.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        kind.clear();
        data.clear();
    }
}
