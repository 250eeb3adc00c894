//! Gateway links: each gateway connects a few links to every worker. Device data frames arrive as `UPSTREAM`, are
//! written to the ring, and are answered with `STORED` once they are stored as `durability` asks (or with
//! `REJECTED`); `OPEN` and `CLOSE` maintain the thing's binding and are answered with `BOUND` once handled (a
//! gateway sends them again until then); frames for devices leave as `DOWNSTREAM` on any link of the device's
//! gateway. Frames of one link are stored concurrently, at most `link_in_flight` at a time.
//!
//! - **Routes**: each link is told the committed partition table's primaries (`ROUTES`) after `WELCOME` and on
//!   every table change, so the gateway sends a thing's frames to its primary and no worker has to pass them on.
//! - **Workers**: each link is told the pool's workers and their link addresses (`WORKERS`) after `WELCOME` and
//!   whenever the membership changes, so that a gateway links to workers its configuration does not list.
//! - **Load**: a link whose `link_in_flight` writes are all in progress is marked saturated (`LOAD`), so the
//!   gateway sends new frames on other links while it has any; the mark is lifted when half are free again.
//! - **Drain**: when the worker stops, each link is told `GOAWAY`, then a `PING`. The gateway answers `PONG` after
//!   every frame it queued before it read the `GOAWAY`; once that `PONG` is in and every frame read before it is
//!   answered, the link closes. No new link is accepted meanwhile.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::StreamExt;
use thingport_protocol::codec::{CodecError, LinkCodec};
use thingport_protocol::link::{self, LINK_VERSION, MAX_ROUTED_WORKERS};
use thingport_protocol::peer::{CallOutcome, Op};
use thingport_protocol::{ByteString, DataHeader, ErrorCode, Frame, FrameType, LinkFrame};
use thingport_shell::batch::{Batch, Flush, gather};
use thingport_shell::pool::{self, Acceptor, PoolStream};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::codec::FramedRead;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::Shared;
use crate::ring::membership::name_of;
use crate::ring::{PARTITIONS, RingError, Table};

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What a link's writer sends: an encoded link frame, or that a data frame is stored, which the writer folds with
/// the others of its session in the same write into `STORED_RUN`s.
#[derive(Debug)]
pub enum Reply {
    Frame(Bytes),
    Stored {
        session_id: u64,
        seq: u64,
    },
    /// The link is drained: the writer writes what it holds and the link closes.
    End,
}

impl From<LinkFrame> for Reply {
    fn from(frame: LinkFrame) -> Reply {
        Reply::Frame(frame.to_framed_bytes())
    }
}

/// A link's writer queue, with the link's id.
type LinkSender = (u64, mpsc::Sender<Reply>);

/// The links of every connected gateway.
#[derive(Debug, Default)]
pub struct Links {
    next_id: AtomicU64,
    by_gateway: Mutex<HashMap<ByteString, Vec<LinkSender>>>,
}

impl Links {
    fn register(&self, gateway: &ByteString, tx: mpsc::Sender<Reply>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.by_gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(gateway.clone())
            .or_default()
            .push((id, tx));
        id
    }

    fn unregister(&self, gateway: &ByteString, id: u64) {
        let mut map = self.by_gateway.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(links) = map.get_mut(gateway) {
            links.retain(|(i, _)| *i != id);
            if links.is_empty() {
                map.remove(gateway);
            }
        }
    }

    /// Sends a device frame to a session through one of its gateway's links; false if none can take it.
    pub fn downstream(
        &self,
        gateway: &str,
        session_id: u64,
        reference: u64,
        frame: &Frame,
    ) -> bool {
        let bytes = LinkFrame::Downstream { session_id, reference, frame: frame.to_bytes() }
            .to_framed_bytes();
        let map = self.by_gateway.lock().unwrap_or_else(|e| e.into_inner());
        let Some(links) = map.get(gateway) else { return false };
        let start = reference as usize;
        (0..links.len()).any(|i| {
            links[(start + i) % links.len()].1.try_send(Reply::Frame(bytes.clone())).is_ok()
        })
    }

    /// Gateways with at least one link.
    pub fn gateways(&self) -> usize {
        self.by_gateway.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The names of the gateways linked, in order.
    pub fn names(&self) -> Vec<String> {
        let by_gateway = self.by_gateway.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = by_gateway.keys().map(ToString::to_string).collect();
        names.sort();
        names
    }
}

/// Accepts gateway links until `drain` (a child of the worker's stop token), spawning each on `tracker`, which is
/// empty once every link has drained.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    tls: Option<Acceptor>,
    drain: CancellationToken,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let accepted = tokio::select! {
            _ = drain.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, from)) => {
                let (shared, tls, drain, stop) =
                    (shared.clone(), tls.clone(), drain.clone(), stop.clone());
                tracker.spawn(async move {
                    match pool::accept(tls.as_ref(), tcp).await {
                        Ok(stream) => serve_link(shared, stream, drain, stop).await,
                        Err(e) => {
                            ::metrics::counter!(crate::telemetry::FOUNDATION_HANDSHAKES_REFUSED_TOTAL, "port" => "link")
                                .increment(1);
                            tracing::warn!(%from, error = %e, "a gateway link was refused: no pool credentials");
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "link accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_link(
    shared: Arc<Shared>,
    stream: PoolStream,
    drain: CancellationToken,
    stop: CancellationToken,
) {
    let (reader, mut writer) = tokio::io::split(stream);
    let codec = LinkCodec::new(shared.config.limits());
    let mut frames = FramedRead::with_capacity(reader, codec, 64 * 1024);
    // the first frame is the gateway's HELLO
    // the first frame is the gateway's HELLO, within a bound and not past the drain
    let hello = tokio::select! {
        _ = drain.cancelled() => return,
        hello = tokio::time::timeout(HELLO_TIMEOUT, frames.next()) => hello,
    };
    let gateway = match hello {
        Ok(Some(Ok(LinkFrame::Hello { version: LINK_VERSION, gateway_id, .. }))) => gateway_id,
        _ => return,
    };
    let welcome = LinkFrame::Welcome {
        version: LINK_VERSION,
        worker_id: ByteString::from(shared.config.id.clone()),
    };
    if writer.write_all(&welcome.to_framed_bytes()).await.is_err() {
        return;
    }
    let (tx, rx) = mpsc::channel::<Reply>(shared.config.link_queue_frames);
    let link_id = shared.links.register(&gateway, tx.clone());
    tracing::info!(gateway = %gateway, "gateway link up");

    let write = write_replies(writer, rx);
    let in_flight = Arc::new(InFlight {
        permits: Arc::new(Semaphore::new(shared.config.link_in_flight)),
        limit: shared.config.link_in_flight,
        saturated: AtomicBool::new(false),
        told: Mutex::new(()),
        tx: tx.clone(),
    });
    let routes = async { tokio::join!(send_routes(&shared, &tx), send_workers(&shared, &tx)) };
    let drain_nonce: u64 = rand::random();
    let drain_pong = Notify::new();
    let read = async {
        while let Some(next) = frames.next().await {
            match next {
                Ok(LinkFrame::Pong { nonce }) if nonce == drain_nonce => drain_pong.notify_one(),
                Ok(frame) => {
                    if !handle(&shared, &gateway, frame, &tx, &in_flight).await {
                        return;
                    }
                }
                Err(CodecError::Decode(e)) => {
                    tracing::warn!(gateway = %gateway, error = %e, "undecodable link frame; closing the link");
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let drained = async {
        drain.cancelled().await;
        tracing::info!(gateway = %gateway, "draining the gateway link");
        let goaway = tx.send(LinkFrame::Goaway.into()).await;
        let ping = tx.send(LinkFrame::Ping { nonce: drain_nonce }.into()).await;
        if goaway.is_ok() && ping.is_ok() {
            // the gateway's frames queued before it read the GOAWAY have all been read: wait for their answers
            drain_pong.notified().await;
            let all = u32::try_from(in_flight.limit).unwrap_or(u32::MAX);
            let _ = in_flight.permits.acquire_many(all).await;
            let _ = tx.send(Reply::End).await;
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = stop.cancelled() => {}
        _ = write => {}
        _ = read => {}
        _ = routes => {}
        _ = drained => {}
    }
    shared.links.unregister(&gateway, link_id);
    tracing::info!(gateway = %gateway, "gateway link down");
}

/// Writes a link's replies, many per write. The `STORED` answers gathered for one write are sorted and folded:
/// consecutive data frames of a session become one `STORED_RUN`, a lone one stays `STORED`.
async fn write_replies(mut writer: impl AsyncWrite + Unpin, mut rx: mpsc::Receiver<Reply>) {
    let mut batch = Batch::default();
    let mut stored: Vec<(u64, u64)> = Vec::new();
    let policy = Flush::now(MAX_WRITE);
    let mut end = false;
    while let Some(first) = rx.recv().await {
        let put = |reply: Reply, batch: &mut Batch| {
            match reply {
                Reply::Frame(frame) => batch.push(frame),
                Reply::Stored { session_id, seq } => stored.push((session_id, seq)),
                Reply::End => end = true,
            }
            0
        };
        gather(&mut rx, first, &mut batch, policy, put).await;
        put_stored(&mut stored, &mut batch);
        if batch.write_to(&mut writer).await.is_err() {
            return;
        }
        if end {
            // TLS close_notify and FIN: the gateway reads a clean end after the last answer
            let _ = writer.shutdown().await;
            return;
        }
    }
}

/// How long a new link has to send its `HELLO`.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Bytes one write of a link carries at most (besides the `STORED` answers gathered with them).
const MAX_WRITE: usize = 256 * 1024;

/// Encodes `stored` (session, seq) pairs as `STORED` and `STORED_RUN` frames, and empties it.
fn put_stored(stored: &mut Vec<(u64, u64)>, batch: &mut Batch) {
    for frame in link::fold_stored(stored) {
        batch.encode(|b| frame.encode_framed(b));
    }
    stored.clear();
}

/// Sends the committed table's `ROUTES` on the link now and after every change; returns when the link's queue
/// closes.
async fn send_routes(shared: &Shared, tx: &mpsc::Sender<Reply>) {
    let mut version = shared.cluster.table_version();
    let mut sent = 0;
    loop {
        if let Some(table) = shared.cluster.table()
            && table.version > sent
        {
            sent = table.version;
            match routes(&table) {
                Some(frame) => {
                    if tx.send(frame.into()).await.is_err() {
                        return;
                    }
                }
                None => tracing::warn!(
                    version = table.version,
                    "the partition table names too many workers for ROUTES; gateways route round-robin"
                ),
            }
        }
        if version.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Tells the link the pool's workers and their link addresses, now and whenever the membership changes.
async fn send_workers(shared: &Shared, tx: &mpsc::Sender<Reply>) {
    let mut members = shared.cluster.watch_members();
    let mut sent = None;
    loop {
        let frame = workers(&members.borrow_and_update());
        if sent.as_ref() != Some(&frame) {
            if tx.send(frame.clone().into()).await.is_err() {
                return;
            }
            sent = Some(frame);
        }
        if members.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// The `WORKERS` frame of the active `members`: one entry per worker id (its latest run), leaving out a worker whose
/// link address no gateway could connect to.
pub fn workers(members: &crate::ring::membership::Members) -> LinkFrame {
    let mut by_id: BTreeMap<&str, &crate::ring::membership::Node> = BTreeMap::new();
    for node in members.values() {
        let newer = by_id.get(node.name.as_str()).is_none_or(|known| node.boot > known.boot);
        if newer && !node.link.ip().is_unspecified() && node.link.port() != 0 {
            by_id.insert(&node.name, node);
        }
    }
    let workers = by_id
        .into_iter()
        .take(MAX_ROUTED_WORKERS)
        .map(|(id, node)| (ByteString::from(id), node.link))
        .collect();
    LinkFrame::Workers { workers }
}

/// The `ROUTES` frame of `table`: each partition's primary, named by worker id (a member key without its boot
/// number, as the worker's `WELCOME` names it).
pub fn routes(table: &Table) -> Option<LinkFrame> {
    let mut workers: Vec<ByteString> = Vec::new();
    let mut index: BTreeMap<&str, u16> = BTreeMap::new();
    for member in &table.members {
        let name = name_of(member);
        let i = match workers.iter().position(|w| &**w == name) {
            Some(i) => i,
            None => {
                workers.push(ByteString::from(name));
                workers.len() - 1
            }
        };
        index.insert(member.as_str(), u16::try_from(i).ok()?);
    }
    if workers.len() > MAX_ROUTED_WORKERS {
        return None;
    }
    let primaries = (0..PARTITIONS as u16)
        .map(|p| table.primary(p).and_then(|key| index.get(key).copied()))
        .collect();
    Some(LinkFrame::Routes { version: table.version, workers, primaries })
}

/// A link's bound on frames handled at once, and whether the gateway has been told it is reached (`LOAD`).
#[derive(Debug)]
struct InFlight {
    permits: Arc<Semaphore>,
    limit: usize,
    /// What the gateway was last told. Written only under `told`, so that the frame queued last always says
    /// what the mark says; read without it as a hint.
    saturated: AtomicBool,
    told: Mutex<()>,
    tx: mpsc::Sender<Reply>,
}

impl InFlight {
    /// Tells the gateway when the link becomes saturated or stops being so. `LOAD` is a hint: when the queue is
    /// full it is not sent, and the mark stays as it was.
    fn load(&self, saturated: bool) {
        if self.saturated.load(Ordering::Relaxed) == saturated {
            return;
        }
        let _told = self.told.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.saturated.load(Ordering::Relaxed) != saturated
            && self.tx.try_send(LinkFrame::Load { saturated }.into()).is_ok()
        {
            self.saturated.store(saturated, Ordering::Relaxed);
            let event = if saturated { "saturated" } else { "unsaturated" };
            ::metrics::counter!(crate::telemetry::FOUNDATION_LINK_LOAD_TOTAL, "event" => event)
                .increment(1);
        }
    }

    /// Lifts the saturated mark once half the bound is free (checked as work completes, and on every `PING` in case
    /// the last attempt found the queue full).
    fn relieved(&self) {
        if self.saturated.load(Ordering::Relaxed)
            && self.permits.available_permits() >= self.limit.div_ceil(2)
        {
            self.load(false);
        }
    }
}

/// Sends a reply on the link. A gateway that does not read its replies loses the link: it reconnects and sends the
/// unacknowledged frames again.
fn reply(tx: &mpsc::Sender<Reply>, frame: LinkFrame) -> bool {
    tx.try_send(frame.into()).is_ok()
}

/// Writes a session's binding (`OPEN`) or its end (`CLOSE`) and confirms it with `BOUND`; false if the link must
/// close.
async fn bind(
    cluster: &Arc<crate::ring::Cluster>,
    op: Op,
    session_id: u64,
    tx: &mpsc::Sender<Reply>,
    in_flight: &Arc<InFlight>,
) -> bool {
    let open = matches!(op, Op::Bind { .. });
    let cluster = cluster.clone();
    let tx = tx.clone();
    spawn_bounded(in_flight, async move {
        match cluster.write(op).await {
            Ok(()) => {}
            Err(RingError::Unavailable) => {
                // not confirmed: the gateway sends it again
                tracing::warn!("a session binding could not be stored; the gateway will retry");
                return;
            }
            Err(e) => tracing::info!(error = %e, "a session binding was refused"),
        }
        let _ = tx.send(LinkFrame::Bound { session_id, open }.into()).await;
    })
    .await
}

/// Handles one link frame; false if the link must close.
async fn handle(
    shared: &Arc<Shared>,
    gateway: &ByteString,
    frame: LinkFrame,
    tx: &mpsc::Sender<Reply>,
    in_flight: &Arc<InFlight>,
) -> bool {
    let now = now_ms();
    let cluster = &shared.cluster;
    match frame {
        LinkFrame::Ping { nonce } => {
            in_flight.relieved();
            reply(tx, LinkFrame::Pong { nonce })
        }
        LinkFrame::Open { session_id, thing, transport, .. } => {
            let gateway = gateway.clone();
            let create = shared.config.auto_provision;
            let transport = transport as u8;
            let op = Op::Bind { thing, create, gateway, session_id, now_ms: now, transport };
            bind(cluster, op, session_id, tx, in_flight).await
        }
        LinkFrame::Close { session_id, thing, .. } => {
            let gateway = gateway.clone();
            let create = shared.config.auto_provision;
            let op = Op::Unbind { thing, create, gateway, session_id, now_ms: now };
            bind(cluster, op, session_id, tx, in_flight).await
        }
        LinkFrame::Upstream { session_id, incarnation, thing, frame } => {
            let header = match DataHeader::peek(&frame) {
                Ok(Some(header)) => header,
                _ => return true, // not a data frame: nothing to store or acknowledge
            };
            let seq = header.seq;
            if matches!(header.frame_type, FrameType::Properties | FrameType::Event) {
                if !cluster.leads(&thing) {
                    // the gateway did not know this worker's table, or the primary's links could not take it
                    crate::per_op().frames_forwarded.increment(1);
                }
                // stored through the partition's primary; answered when every copy has it
                let op = Op::Device {
                    thing,
                    create: shared.config.auto_provision,
                    now_ms: now,
                    incarnation,
                    epoch_ms: 0,
                    frame,
                };
                let cluster = cluster.clone();
                let tx = tx.clone();
                return spawn_bounded(in_flight, async move {
                    let answer = match cluster.write(op).await {
                        Ok(()) => {
                            crate::per_op().frames_stored.increment(1);
                            Reply::Stored { session_id, seq }
                        }
                        Err(e) => {
                            let reason = match e {
                                RingError::UnknownThing => "unknown_thing",
                                RingError::Invalid => "invalid",
                                RingError::Unavailable => "unavailable",
                            };
                            ::metrics::counter!(crate::telemetry::FOUNDATION_FRAMES_REFUSED_TOTAL, "reason" => reason)
                                .increment(1);
                            LinkFrame::Rejected { session_id, seq, code: e.code() }.into()
                        }
                    };
                    let _ = tx.send(answer).await;
                })
                .await;
            }
            let decoded = match Frame::decode(frame.clone(), &shared.config.limits()) {
                Ok(decoded) => decoded,
                Err(_) => {
                    let code = ErrorCode::MALFORMED_FRAME;
                    return reply(tx, LinkFrame::Rejected { session_id, seq, code });
                }
            };
            match decoded {
                Frame::ServiceResponse(response) => {
                    let cluster = cluster.clone();
                    let outcome = CallOutcome::Answered { frame };
                    let pass_on =
                        async move { cluster.complete_call(response.call_id, outcome).await };
                    if !spawn_bounded(in_flight, pass_on).await {
                        return false;
                    }
                }
                Frame::ServiceRequest(request) => {
                    // a device calling a server service
                    let shared = shared.clone();
                    let gateway = gateway.clone();
                    let answer = async move {
                        let result = crate::services::call(&shared.cluster, &thing, &request).await;
                        let answer = crate::services::response(request.call_id, result);
                        shared.links.downstream(&gateway, session_id, 0, &answer);
                    };
                    if !spawn_bounded(in_flight, answer).await {
                        return false;
                    }
                }
                _ => {}
            }
            tx.try_send(Reply::Stored { session_id, seq }).is_ok()
        }
        LinkFrame::Delivered { reference, .. } => {
            let cluster = cluster.clone();
            let outcome = CallOutcome::Delivered;
            spawn_bounded(in_flight, async move { cluster.complete_call(reference, outcome).await })
                .await
        }
        LinkFrame::Undeliverable { reference, code, .. } => {
            let cluster = cluster.clone();
            let outcome = CallOutcome::Undeliverable { code: code.0 };
            spawn_bounded(in_flight, async move { cluster.complete_call(reference, outcome).await })
                .await
        }
        _ => true,
    }
}

/// Runs `work` in the background within the link's in-flight bound (waiting, and so not reading the link, while the
/// bound is reached, and telling the gateway with `LOAD`); false if the link is closing.
async fn spawn_bounded(
    in_flight: &Arc<InFlight>,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> bool {
    if in_flight.permits.available_permits() == 0 {
        in_flight.load(true);
    }
    let Ok(permit) = in_flight.permits.clone().acquire_owned().await else { return false };
    let in_flight = in_flight.clone();
    tokio::spawn(async move {
        work.await;
        drop(permit);
        in_flight.relieved();
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn in_flight(limit: usize) -> (Arc<InFlight>, mpsc::Receiver<Reply>) {
        let (tx, rx) = mpsc::channel(16);
        let permits = Arc::new(Semaphore::new(limit));
        (
            Arc::new(InFlight {
                permits,
                limit,
                saturated: AtomicBool::new(false),
                told: Mutex::new(()),
                tx,
            }),
            rx,
        )
    }

    fn load(reply: Option<Reply>) -> Option<LinkFrame> {
        let Some(Reply::Frame(bytes)) = reply else { return None };
        let mut buf = bytes::BytesMut::from(&bytes[..]);
        thingport_protocol::LinkDecoder::new(thingport_protocol::Limits::DEFAULT)
            .decode(&mut buf)
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn a_link_with_every_write_in_progress_tells_the_gateway_until_half_are_done() {
        let (in_flight, mut rx) = in_flight(2);
        let (release, held) = tokio::sync::watch::channel(false);
        let hold = || {
            let mut held = held.clone();
            async move {
                let _ = held.wait_for(|r| *r).await;
            }
        };
        assert!(spawn_bounded(&in_flight, hold()).await);
        assert!(spawn_bounded(&in_flight, hold()).await);
        assert!(rx.try_recv().is_err(), "not saturated while a permit was free");
        // the third waits for a permit, and the gateway is told first
        let third = tokio::spawn({
            let in_flight = in_flight.clone();
            let work = hold();
            async move { spawn_bounded(&in_flight, work).await }
        });
        assert_eq!(load(rx.recv().await), Some(LinkFrame::Load { saturated: true }));
        release.send_replace(true);
        assert!(third.await.unwrap());
        assert_eq!(load(rx.recv().await), Some(LinkFrame::Load { saturated: false }));
        assert!(rx.try_recv().is_err(), "told once");
    }

    #[test]
    fn routes_name_each_partitions_primary_by_worker_id() {
        let table = Table::initial(&["w1#1".to_string(), "w2#1".to_string()], 2);
        let Some(LinkFrame::Routes { version, workers, primaries }) = routes(&table) else {
            panic!("a table of two fits")
        };
        assert_eq!((version, workers.clone()), (table.version, vec!["w1".into(), "w2".into()]));
        assert_eq!(primaries.len(), PARTITIONS);
        for (p, primary) in primaries.iter().enumerate() {
            let key = table.primary(p as u16).unwrap();
            assert_eq!(&*workers[usize::from(primary.unwrap())], name_of(key));
        }
    }
}
