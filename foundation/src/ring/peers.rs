//! Connections between the workers of a pool (`docs/PROTOCOL.md` §10): one TCP connection from each worker to each
//! other it sends requests to, opened on first use and again after a failure. Requests are written in batches and
//! answered in any order, matched by id.
//!
//! Bounds: a connection queues at most [`QUEUE`] messages (a request finding it full fails at once, and the caller
//! retries as after any failure); a served connection runs at most [`IN_FLIGHT`] requests at a time and stops
//! reading beyond that; a message is at most the configured size, checked before it is buffered.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use thingport_protocol::codec::{CodecError, PeerCodec};
use thingport_protocol::peer::{PEER_VERSION, PeerMessage, Refusal, Request, Response};
use thingport_shell::batch::Flush;
use thingport_shell::pool::{self, Acceptor, Connector, PoolStream};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;

/// Messages queued on one connection.
pub const QUEUE: usize = 16_384;
/// Requests served at once on one connection.
pub const IN_FLIGHT: usize = 4_096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a failed connection attempt stands before the next one.
pub const RECONNECT_AFTER: Duration = Duration::from_millis(100);
const MAX_BATCH: usize = 256 * 1024;

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("could not connect")]
    Connect,
    /// Nothing listens on the member's peer port: its process is gone.
    #[error("connection refused")]
    Refused,
    #[error("connection queue full")]
    Busy,
    #[error("connection lost")]
    Lost,
    #[error("no answer in time")]
    Timeout,
    /// The request would pass the receiver's `max_peer_message`; it was not sent.
    #[error("request larger than max_peer_message")]
    TooLarge,
}

type Waiting = Mutex<HashMap<u64, oneshot::Sender<Response>>>;

#[derive(Debug)]
struct Conn {
    tx: mpsc::Sender<Bytes>,
    waiting: Waiting,
    next: AtomicU64,
    closed: AtomicBool,
    /// Ends the connection: a request that timed out closes it, so the next one connects afresh rather than queue
    /// behind segments that TCP is still retransmitting (after a network cut heals, its backoff can take many
    /// seconds to try again).
    stop: CancellationToken,
}

/// This worker's connections to the others.
#[derive(Debug)]
pub struct Peers {
    me: String,
    max_message: usize,
    conns: Arc<Mutex<HashMap<String, Arc<Conn>>>>,
    /// When connecting to a member last failed: requests to it fail at once for [`RECONNECT_AFTER`], rather than
    /// every waiting write trying to connect to a worker that is gone.
    /// The error it failed with is given again.
    failed: Mutex<HashMap<String, (Instant, PeerError)>>,
    /// Held while connecting, so that requests arriving together open one connection, not one each (a burst of
    /// connections overflows the listener's backlog, and a dropped SYN costs a second).
    connecting: tokio::sync::Mutex<()>,
    /// Mutual TLS with the pool's credentials; plain TCP without them.
    tls: Option<Connector>,
}

impl Peers {
    pub fn new(me: String, max_message: usize, tls: Option<Connector>) -> Peers {
        Peers {
            me,
            max_message,
            tls,
            conns: Arc::default(),
            failed: Mutex::default(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Sends a request to the member `key` at `addr` and waits up to `timeout` for its answer.
    pub async fn request(
        &self,
        key: &str,
        addr: SocketAddr,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, PeerError> {
        let conn = self.conn(key, addr).await?;
        let id = conn.next.fetch_add(1, Ordering::Relaxed);
        let message = PeerMessage::Request { id, body };
        let bytes = message.to_framed_bytes().map_err(|_| PeerError::Lost)?;
        if bytes.len() > self.max_message {
            // the receiver would close the connection, failing every call on it
            return Err(PeerError::TooLarge);
        }
        let (tx, rx) = oneshot::channel();
        lock(&conn.waiting).insert(id, tx);
        if let Err(e) = conn.tx.try_send(bytes) {
            lock(&conn.waiting).remove(&id);
            return Err(match e {
                mpsc::error::TrySendError::Full(_) => PeerError::Busy,
                mpsc::error::TrySendError::Closed(_) => PeerError::Lost,
            });
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) => Err(PeerError::Lost),
            Err(_) => {
                lock(&conn.waiting).remove(&id);
                conn.closed.store(true, Ordering::Release);
                conn.stop.cancel();
                Err(PeerError::Timeout)
            }
        }
    }

    /// The error of the last attempt to connect to `key`, if it failed within [`RECONNECT_AFTER`].
    fn failed_lately(&self, key: &str) -> Option<PeerError> {
        lock(&self.failed)
            .get(key)
            .filter(|(at, _)| at.elapsed() < RECONNECT_AFTER)
            .map(|(_, e)| *e)
    }

    fn open_conn(&self, key: &str) -> Option<Arc<Conn>> {
        lock(&self.conns).get(key).filter(|c| !c.closed.load(Ordering::Acquire)).cloned()
    }

    async fn conn(&self, key: &str, addr: SocketAddr) -> Result<Arc<Conn>, PeerError> {
        if let Some(conn) = self.open_conn(key) {
            return Ok(conn);
        }
        if let Some(e) = self.failed_lately(key) {
            return Err(e);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(conn) = self.open_conn(key) {
            return Ok(conn);
        }
        // another request may have failed to connect while this one waited
        if let Some(e) = self.failed_lately(key) {
            return Err(e);
        }
        let stream = match pool::connect(self.tls.as_ref(), addr, CONNECT_TIMEOUT).await {
            Ok(stream) => stream,
            Err(e) => {
                if e.kind() != std::io::ErrorKind::ConnectionRefused {
                    tracing::debug!(member = key, error = %e, "connecting to a member failed");
                }
                let refused = e.kind() == std::io::ErrorKind::ConnectionRefused;
                let error = if refused { PeerError::Refused } else { PeerError::Connect };
                lock(&self.failed).insert(key.to_string(), (Instant::now(), error));
                return Err(error);
            }
        };
        lock(&self.failed).remove(key);
        let (reader, mut writer) = tokio::io::split(stream);
        let hello = PeerMessage::Hello { version: PEER_VERSION, member: self.me.clone() };
        let hello = hello.to_framed_bytes().map_err(|_| PeerError::Connect)?;
        writer.write_all(&hello).await.map_err(|_| PeerError::Connect)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let conn = Arc::new(Conn {
            tx,
            waiting: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            stop: CancellationToken::new(),
        });
        lock(&self.conns).insert(key.to_string(), conn.clone());
        let max_message = self.max_message;
        let running = conn.clone();
        let conns = self.conns.clone();
        let key = key.to_string();
        tokio::spawn(async move {
            tokio::select! {
                _ = write_batches(writer, rx) => {}
                _ = read_responses(reader, &running, max_message) => {}
                _ = running.stop.cancelled() => {}
            }
            running.closed.store(true, Ordering::Release);
            // waiting requests fail now rather than at their timeout
            lock(&running.waiting).clear();
            let mut conns = lock(&conns);
            if conns.get(&key).is_some_and(|c| Arc::ptr_eq(c, &running)) {
                conns.remove(&key);
            }
        });
        Ok(conn)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Writes queued messages, as many per write as are ready (up to 256 KiB), until the queue closes or a write fails.
pub(crate) async fn write_batches(writer: impl AsyncWrite + Unpin, rx: mpsc::Receiver<Bytes>) {
    thingport_shell::batch::write_queue(writer, rx, Flush::now(MAX_BATCH)).await;
}

async fn read_responses(reader: impl AsyncRead + Unpin, conn: &Conn, max_message: usize) {
    let mut messages = FramedRead::with_capacity(reader, PeerCodec { max_message }, 64 * 1024);
    while let Some(Ok(PeerMessage::Response { id, body })) = messages.next().await {
        if let Some(tx) = lock(&conn.waiting).remove(&id) {
            let _ = tx.send(body);
        }
    }
}

/// Serves peer connections until `stop`, answering each request with `handle`. With `tls`, only members of the
/// pool (a certificate its CA signed) get past the handshake.
pub async fn serve<H, F>(
    listener: TcpListener,
    max_message: usize,
    handle: H,
    tls: Option<Acceptor>,
    stop: CancellationToken,
) where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, from)) => {
                let handle = handle.clone();
                let stop = stop.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let serving = async {
                        match pool::accept(tls.as_ref(), tcp).await {
                            Ok(stream) => serve_conn(stream, max_message, handle).await,
                            Err(e) => refused(from, &e),
                        }
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = serving => {}
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A peer connection whose handshake failed (no pool certificate, another pool's, or no TLS at all).
fn refused(from: SocketAddr, e: &std::io::Error) {
    ::metrics::counter!(crate::telemetry::FOUNDATION_HANDSHAKES_REFUSED_TOTAL, "port" => "peer")
        .increment(1);
    tracing::warn!(%from, error = %e, "a peer connection was refused: no pool credentials");
}

async fn serve_conn<H, F>(stream: PoolStream, max_message: usize, handle: H)
where
    H: Fn(Request) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    let writing = tokio::spawn(write_batches(writer, rx));
    let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
    let mut messages = FramedRead::with_capacity(reader, PeerCodec { max_message }, 64 * 1024);
    let mut greeted = false;
    while let Some(next) = messages.next().await {
        let message = match next {
            Ok(message) => message,
            Err(CodecError::Decode(e)) => {
                tracing::warn!(error = %e, "undecodable peer message; closing the connection");
                break;
            }
            Err(_) => break,
        };
        match message {
            PeerMessage::Hello { version: PEER_VERSION, .. } if !greeted => greeted = true,
            PeerMessage::Request { id, body } if greeted => {
                let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
                let handle = handle.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let body = handle(body).await;
                    if let Some(bytes) = framed_answer(id, body, max_message) {
                        let _ = tx.send(bytes).await;
                    }
                    drop(permit);
                });
            }
            other => {
                tracing::warn!(message = ?other, "unexpected peer message; closing the connection");
                break;
            }
        }
    }
    drop(tx);
    let _ = writing.await;
}

/// The framed answer to request `id`. One the asker could not take (it would close the connection, failing every
/// call on it) is replaced by a refusal.
fn framed_answer(id: u64, body: Response, max_message: usize) -> Option<Bytes> {
    let bytes = match (PeerMessage::Response { id, body }).to_framed_bytes() {
        Ok(bytes) if bytes.len() <= max_message => return Some(bytes),
        Ok(bytes) => bytes,
        Err(e) => {
            tracing::warn!(id, error = %e, "a peer answer could not be encoded");
            return None;
        }
    };
    tracing::warn!(
        id,
        bytes = bytes.len(),
        max_message,
        "a peer answer is larger than max_peer_message"
    );
    let body = Response::Refused { refusal: Refusal::TooLarge, table_version: 0 };
    PeerMessage::Response { id, body }.to_framed_bytes().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use thingport_protocol::peer::ThingSummary;

    const MAX: usize = 1 << 20;

    /// An answer of about 2 MiB to `Read { thing: "big" }`, `Done` to anything else.
    async fn answer(request: Request) -> Response {
        match request {
            Request::Read { thing } if thing == "big" => Response::Things {
                things: (0..20_000)
                    .map(|i| ThingSummary {
                        name: format!("{i:0100}"),
                        gateway: None,
                        transport: 0,
                        properties: 0,
                        created_ms: 0,
                        tags: Vec::new(),
                        last_seen_ms: 0,
                    })
                    .collect(),
                matching: 20_000,
                table_version: 1,
            },
            _ => Response::Done,
        }
    }

    #[tokio::test]
    async fn a_message_past_the_limit_is_refused_and_the_connection_lives_on() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, MAX, answer, None, stop.clone()));
        let peers = Peers::new("me".to_string(), MAX, None);
        let call =
            |thing: String, timeout| peers.request("w2", addr, Request::Read { thing }, timeout);

        assert!(matches!(call("small".into(), Duration::from_secs(10)).await, Ok(Response::Done)));
        let conn = lock(&peers.conns).get("w2").cloned().unwrap();
        let big = "x".repeat(2 * MAX);
        assert!(matches!(call(big, Duration::from_secs(10)).await, Err(PeerError::TooLarge)));
        // the caller would refuse the answer and lose the connection with every call on it: it is told instead
        let answered = call("big".into(), Duration::from_secs(10)).await;
        assert!(
            matches!(answered, Ok(Response::Refused { refusal: Refusal::TooLarge, .. })),
            "{answered:?}"
        );
        assert!(matches!(call("small".into(), Duration::from_secs(10)).await, Ok(Response::Done)));
        let now = lock(&peers.conns).get("w2").cloned().unwrap();
        assert!(Arc::ptr_eq(&conn, &now), "one connection all along");
        stop.cancel();
    }
}
