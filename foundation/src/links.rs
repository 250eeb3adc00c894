//! Gateway links: each gateway connects a few links to every worker. Device data frames arrive as `UPSTREAM`, are
//! written to the ring, and are answered with `STORED` once they are stored as `durability` asks (or with
//! `REJECTED`); `OPEN` and `CLOSE` maintain the thing's binding and are answered with `BOUND` once handled (a
//! gateway sends them again until then); frames for devices leave as `DOWNSTREAM` on any link of the device's
//! gateway. Frames of one link are stored concurrently, at most `link_in_flight` at a time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use thingport_protocol::link::LINK_VERSION;
use thingport_protocol::peer::{CallOutcome, Op};
use thingport_protocol::{
    ByteString, DataHeader, ErrorCode, Frame, FrameType, LinkDecoder, LinkFrame,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::ring::RingError;

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A link's writer queue, with the link's id.
type LinkSender = (u64, mpsc::Sender<Bytes>);

/// The links of every connected gateway.
#[derive(Debug, Default)]
pub struct Links {
    next_id: AtomicU64,
    by_gateway: Mutex<HashMap<ByteString, Vec<LinkSender>>>,
}

impl Links {
    fn register(&self, gateway: &ByteString, tx: mpsc::Sender<Bytes>) -> u64 {
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
        (0..links.len()).any(|i| links[(start + i) % links.len()].1.try_send(bytes.clone()).is_ok())
    }

    /// Gateways with at least one link.
    pub fn gateways(&self) -> usize {
        self.by_gateway.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Accepts gateway links until `cancel`.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve_link(shared.clone(), stream, cancel.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "link accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn serve_link(shared: Arc<Shared>, stream: TcpStream, cancel: CancellationToken) {
    let (mut reader, mut writer) = stream.into_split();
    let decoder = LinkDecoder::new(shared.config.limits());
    let mut buf = BytesMut::with_capacity(64 * 1024);
    // the first frame is the gateway's HELLO
    let gateway = loop {
        match decoder.decode(&mut buf) {
            Ok(Some(LinkFrame::Hello { version: LINK_VERSION, gateway_id, .. })) => {
                break gateway_id;
            }
            Ok(Some(_)) | Err(_) => return,
            Ok(None) => {}
        }
        match reader.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    };
    let welcome = LinkFrame::Welcome {
        version: LINK_VERSION,
        worker_id: ByteString::from(shared.config.id.clone()),
    };
    if writer.write_all(&welcome.to_framed_bytes()).await.is_err() {
        return;
    }
    let (tx, rx) = mpsc::channel::<Bytes>(shared.config.link_queue_frames);
    let link_id = shared.links.register(&gateway, tx.clone());
    tracing::info!(gateway = %gateway, "gateway link up");

    let write = crate::ring::peers::write_batches(writer, rx);
    let in_flight = Arc::new(Semaphore::new(shared.config.link_in_flight));
    let read = async {
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        if !handle(&shared, &gateway, frame, &tx, &in_flight).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(gateway = %gateway, error = %e, "undecodable link frame; closing the link");
                        return;
                    }
                }
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = cancel.cancelled() => {}
        _ = write => {}
        _ = read => {}
    }
    shared.links.unregister(&gateway, link_id);
    tracing::info!(gateway = %gateway, "gateway link down");
}

/// Sends a reply on the link. A gateway that does not read its replies loses the link: it reconnects and sends the
/// unacknowledged frames again.
fn reply(tx: &mpsc::Sender<Bytes>, frame: LinkFrame) -> bool {
    tx.try_send(frame.to_framed_bytes()).is_ok()
}

/// Handles one link frame; false if the link must close.
async fn handle(
    shared: &Arc<Shared>,
    gateway: &ByteString,
    frame: LinkFrame,
    tx: &mpsc::Sender<Bytes>,
    in_flight: &Arc<Semaphore>,
) -> bool {
    let now = now_ms();
    let cluster = &shared.cluster;
    let open = matches!(frame, LinkFrame::Open { .. });
    match frame {
        LinkFrame::Ping { nonce } => reply(tx, LinkFrame::Pong { nonce }),
        LinkFrame::Open { session_id, thing, .. } | LinkFrame::Close { session_id, thing, .. } => {
            let gateway = gateway.clone();
            let create = shared.config.auto_provision;
            let op = if open {
                Op::Bind { thing, create, gateway, session_id, now_ms: now }
            } else {
                Op::Unbind { thing, create, gateway, session_id, now_ms: now }
            };
            let cluster = cluster.clone();
            let tx = tx.clone();
            spawn_bounded(in_flight, async move {
                match cluster.write(op).await {
                    Ok(()) => {}
                    Err(RingError::Unavailable) => {
                        // not confirmed: the gateway sends it again
                        tracing::warn!(
                            "a session binding could not be stored; the gateway will retry"
                        );
                        return;
                    }
                    Err(e) => tracing::info!(error = %e, "a session binding was refused"),
                }
                let _ = tx.send(LinkFrame::Bound { session_id, open }.to_framed_bytes()).await;
            })
            .await
        }
        LinkFrame::Upstream { session_id, incarnation, thing, frame } => {
            let header = match DataHeader::peek(&frame) {
                Ok(Some(header)) => header,
                _ => return true, // not a data frame: nothing to store or acknowledge
            };
            let seq = header.seq;
            if matches!(header.frame_type, FrameType::Properties | FrameType::Event) {
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
                            ::metrics::counter!("thingport_foundation_frames_stored_total")
                                .increment(1);
                            LinkFrame::Stored { session_id, seq }
                        }
                        Err(e) => {
                            let reason = match e {
                                RingError::UnknownThing => "unknown_thing",
                                RingError::Invalid => "invalid",
                                RingError::Unavailable => "unavailable",
                            };
                            ::metrics::counter!("thingport_foundation_frames_refused_total", "reason" => reason)
                                .increment(1);
                            LinkFrame::Rejected { session_id, seq, code: e.code() }
                        }
                    };
                    let _ = tx.send(answer.to_framed_bytes()).await;
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
            reply(tx, LinkFrame::Stored { session_id, seq })
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
/// bound is reached); false if the link is closing.
async fn spawn_bounded(
    in_flight: &Arc<Semaphore>,
    work: impl std::future::Future<Output = ()> + Send + 'static,
) -> bool {
    let Ok(permit) = in_flight.clone().acquire_owned().await else { return false };
    tokio::spawn(async move {
        work.await;
        drop(permit);
    });
    true
}
