//! An acknowledging worker: speaks the link protocol like a foundation worker but stores nothing. It answers
//! `STORED` for every device data frame at once. It is the backend for measuring the gateway alone, and for the
//! gateway's tests before (and besides) the real foundation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::{Bytes, BytesMut};
use thingport_protocol::link::LINK_VERSION;
use thingport_protocol::{ByteString, ErrorCode, Frame, Limits, LinkDecoder, LinkFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;

/// Something the worker saw.
#[derive(Debug, Clone)]
pub enum WorkerEvent {
    Open {
        session_id: u64,
        thing: ByteString,
    },
    Close {
        session_id: u64,
        thing: ByteString,
        code: ErrorCode,
    },
    /// A device frame (already answered with `STORED` if it is a data frame).
    Frame {
        session_id: u64,
        thing: ByteString,
        frame: Frame,
    },
    Undeliverable {
        session_id: u64,
        reference: u64,
        code: ErrorCode,
    },
    /// The device acknowledged the property write sent with this reference.
    Delivered {
        session_id: u64,
        reference: u64,
    },
}

#[derive(Debug, Default)]
struct State {
    /// Data frames stored, by thing: sequence numbers in arrival order.
    stored: HashMap<ByteString, Vec<u64>>,
    /// Writers of the open links.
    links: Vec<mpsc::UnboundedSender<Bytes>>,
    frames: u64,
}

/// A running acknowledging worker.
#[derive(Debug)]
pub struct AckWorker {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<WorkerEvent>,
    tasks: JoinSet<()>,
}

impl AckWorker {
    /// Starts a worker on `addr` (port 0 for any).
    pub async fn start(addr: SocketAddr, id: &str) -> Result<AckWorker> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let (events, _) = broadcast::channel(65_536);
        let mut tasks = JoinSet::new();
        let id = ByteString::from(id.to_string());
        {
            let state = state.clone();
            let events = events.clone();
            tasks.spawn(async move {
                let mut links = JoinSet::new();
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    links.spawn(serve_link(stream, id.clone(), state.clone(), events.clone()));
                }
            });
        }
        Ok(AckWorker { addr, state, events, tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<WorkerEvent> {
        self.events.subscribe()
    }

    /// Sequence numbers stored for `thing`, in arrival order.
    pub fn stored(&self, thing: &str) -> Vec<u64> {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.stored.get(thing).cloned().unwrap_or_default()
    }

    /// Device frames received in all.
    pub fn frames(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).frames
    }

    /// Sends a device frame to a session through the most recently opened link that is still up.
    pub fn send_downstream(&self, session_id: u64, reference: u64, frame: &Frame) -> bool {
        let bytes = LinkFrame::Downstream { session_id, reference, frame: frame.to_bytes() }
            .to_framed_bytes();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.links.retain(|l| !l.is_closed());
        state.links.last().is_some_and(|link| link.send(bytes).is_ok())
    }

    /// Sends a link frame (`ROUTES`, `LOAD`, …) on every open link; how many took it.
    pub fn send_link(&self, frame: &LinkFrame) -> usize {
        let bytes = frame.to_framed_bytes();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.links.retain(|l| !l.is_closed());
        state.links.iter().filter(|link| link.send(bytes.clone()).is_ok()).count()
    }

    /// Stops at once, dropping every connection (as a killed process would). Returns what it had stored by
    /// then, by thing.
    pub async fn kill(mut self) -> HashMap<ByteString, Vec<u64>> {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut state.stored)
    }
}

async fn serve_link(
    stream: tokio::net::TcpStream,
    id: ByteString,
    state: Arc<Mutex<State>>,
    events: broadcast::Sender<WorkerEvent>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
    state.lock().unwrap_or_else(|e| e.into_inner()).links.push(tx.clone());
    let write = async move {
        let mut batch = BytesMut::new();
        while let Some(first) = rx.recv().await {
            batch.extend_from_slice(&first);
            while let Ok(more) = rx.try_recv() {
                batch.extend_from_slice(&more);
            }
            if writer.write_all(&batch).await.is_err() {
                return;
            }
            batch.clear();
        }
    };
    let read = async move {
        let decoder = LinkDecoder::new(Limits::DEFAULT);
        let mut buf = BytesMut::with_capacity(64 * 1024);
        loop {
            while let Ok(Some(frame)) = decoder.decode(&mut buf) {
                let reply = handle(frame, &id, &state, &events);
                if let Some(reply) = reply {
                    let _ = tx.send(reply.to_framed_bytes());
                }
            }
            match reader.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::select! {
        _ = write => {}
        _ = read => {}
    }
}

fn handle(
    frame: LinkFrame,
    id: &ByteString,
    state: &Mutex<State>,
    events: &broadcast::Sender<WorkerEvent>,
) -> Option<LinkFrame> {
    match frame {
        LinkFrame::Hello { .. } => {
            Some(LinkFrame::Welcome { version: LINK_VERSION, worker_id: id.clone() })
        }
        LinkFrame::Ping { nonce } => Some(LinkFrame::Pong { nonce }),
        LinkFrame::Open { session_id, thing, .. } => {
            let _ = events.send(WorkerEvent::Open { session_id, thing });
            Some(LinkFrame::Bound { session_id, open: true })
        }
        LinkFrame::Close { session_id, thing, code } => {
            let _ = events.send(WorkerEvent::Close { session_id, thing, code });
            Some(LinkFrame::Bound { session_id, open: false })
        }
        LinkFrame::Undeliverable { session_id, reference, code } => {
            let _ = events.send(WorkerEvent::Undeliverable { session_id, reference, code });
            None
        }
        LinkFrame::Delivered { session_id, reference } => {
            let _ = events.send(WorkerEvent::Delivered { session_id, reference });
            None
        }
        LinkFrame::Upstream { session_id, thing, frame, .. } => {
            let frame = Frame::decode(frame, &Limits::DEFAULT).ok()?;
            let seq = frame.seq();
            {
                let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                state.frames += 1;
                if let Some(seq) = seq {
                    state.stored.entry(thing.clone()).or_default().push(seq);
                }
            }
            let _ = events.send(WorkerEvent::Frame { session_id, thing, frame });
            seq.map(|seq| LinkFrame::Stored { session_id, seq })
        }
        _ => None,
    }
}
