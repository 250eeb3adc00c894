//! Gateway links: each gateway connects a few links to every worker. Device data frames arrive as `UPSTREAM`, are
//! applied to the ring, and are answered with `STORED` (or `REJECTED`); `OPEN` and `CLOSE` maintain the thing's
//! binding; frames for devices leave as `DOWNSTREAM` on any link of the device's gateway.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use thingport_protocol::link::LINK_VERSION;
use thingport_protocol::{
    ByteString, DataHeader, ErrorCode, Frame, LinkDecoder, LinkFrame, ServiceErrorCode,
    ServiceResponse, ServiceResult,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::calls::CallOutcome;
use crate::model::{Binding, EventRecord, PropertyState, Version};

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
    /// Incarnation of each session, from `OPEN` (sessions are numbered by their gateway).
    incarnations: Mutex<HashMap<(ByteString, u64), u64>>,
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

    fn incarnation(&self, gateway: &ByteString, session_id: u64) -> u64 {
        let map = self.incarnations.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(gateway.clone(), session_id)).copied().unwrap_or(0)
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
    let (tx, mut rx) = mpsc::channel::<Bytes>(shared.config.link_queue_frames);
    let link_id = shared.links.register(&gateway, tx.clone());
    tracing::info!(gateway = %gateway, "gateway link up");

    let write = async move {
        let mut batch = BytesMut::with_capacity(64 * 1024);
        while let Some(first) = rx.recv().await {
            batch.extend_from_slice(&first);
            while batch.len() < 256 * 1024 {
                match rx.try_recv() {
                    Ok(more) => batch.extend_from_slice(&more),
                    Err(_) => break,
                }
            }
            if writer.write_all(&batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    };
    let read = async {
        loop {
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(frame)) => {
                        if let Some(reply) = handle(&shared, &gateway, frame) {
                            // a gateway that does not read its replies loses this link; it reconnects and
                            // sends the unacknowledged frames again
                            if tx.try_send(reply.to_framed_bytes()).is_err() {
                                return;
                            }
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

/// Applies one link frame; returns the reply for the gateway, if any.
fn handle(shared: &Shared, gateway: &ByteString, frame: LinkFrame) -> Option<LinkFrame> {
    let now = now_ms();
    match frame {
        LinkFrame::Ping { nonce } => Some(LinkFrame::Pong { nonce }),
        LinkFrame::Open { session_id, thing, incarnation, .. } => {
            shared
                .links
                .incarnations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert((gateway.clone(), session_id), incarnation);
            let binding = Binding { gateway: gateway.clone(), session_id, since_ms: now };
            shared.store.update(&thing, shared.config.auto_provision, now, |t| t.bind(binding));
            None
        }
        LinkFrame::Close { session_id, thing, .. } => {
            shared
                .links
                .incarnations
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&(gateway.clone(), session_id));
            shared.store.update(&thing, false, now, |t| t.unbind(gateway, session_id));
            None
        }
        LinkFrame::Upstream { session_id, thing, frame } => {
            let seq = match DataHeader::peek(&frame) {
                Ok(Some(header)) => header.seq,
                _ => return None, // not a data frame: nothing to store or acknowledge
            };
            let rejected = |code| Some(LinkFrame::Rejected { session_id, seq, code });
            let Ok(frame) = Frame::decode(frame, &shared.config.limits()) else {
                return rejected(ErrorCode::MALFORMED_FRAME);
            };
            let incarnation = shared.links.incarnation(gateway, session_id);
            let create = shared.config.auto_provision;
            let applied = match frame {
                Frame::Properties(batch) => shared.store.update(&thing, create, now, |t| {
                    for u in batch.updates {
                        let version = Version { timestamp_ms: u.timestamp_ms, incarnation, seq };
                        let state = PropertyState {
                            value: u.value,
                            quality: u.quality,
                            version,
                            received_ms: now,
                        };
                        t.apply_property(&u.name, state);
                    }
                }),
                Frame::Event(event) => shared.store.update(&thing, create, now, |t| {
                    let version = Version { timestamp_ms: event.timestamp_ms, incarnation, seq };
                    t.record_event(EventRecord {
                        name: event.name,
                        payload: event.payload,
                        version,
                        received_ms: now,
                    });
                }),
                Frame::ServiceResponse(response) => {
                    shared.calls.complete(response.call_id, CallOutcome::Answered(response.result));
                    Some(())
                }
                Frame::ServiceRequest(request) => {
                    // devices may call server services; none are defined yet
                    let answer = Frame::ServiceResponse(ServiceResponse {
                        seq: 0,
                        call_id: request.call_id,
                        result: ServiceResult::Err {
                            code: ServiceErrorCode::NOT_FOUND,
                            message: format!("no server service {}", request.service).into(),
                        },
                    });
                    shared.links.downstream(gateway, session_id, 0, &answer);
                    Some(())
                }
                _ => Some(()),
            };
            match applied {
                Some(()) => {
                    ::metrics::counter!("thingport_foundation_frames_stored_total").increment(1);
                    Some(LinkFrame::Stored { session_id, seq })
                }
                None => rejected(ErrorCode::THING_NOT_ALLOWED),
            }
        }
        LinkFrame::Undeliverable { reference, code, .. } => {
            shared.calls.complete(reference, CallOutcome::Undeliverable(code));
            None
        }
        _ => None,
    }
}
