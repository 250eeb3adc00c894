//! An acknowledging worker: speaks the link protocol like a foundation worker but stores nothing. It answers
//! every device data frame at once, folding the answers to the frames of one read into `STORED_RUN`s as a worker
//! folds those of one write (or holds them, for tests, until told to release them; what it holds is not bounded,
//! so a test holds a few frames only). It is the backend for measuring the gateway alone, and for the gateway's
//! tests before (and besides) the real foundation.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use bytes::Bytes;
use futures_util::StreamExt;
use thingport_protocol::codec::LinkCodec;
use thingport_protocol::link::{self, LINK_VERSION};
use thingport_protocol::{ByteString, ErrorCode, Frame, Limits, LinkFrame};
use thingport_shell::batch::{Flush, write_queue};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinSet;
use tokio_util::codec::{Decoder, FramedRead};

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

/// A link's writer queue.
type LinkTx = mpsc::Sender<Bytes>;

#[derive(Debug, Default)]
struct State {
    /// Data frames stored, by thing: sequence numbers in arrival order.
    stored: HashMap<ByteString, Vec<u64>>,
    /// Writers of the open links.
    links: Vec<LinkTx>,
    frames: u64,
    /// While set, answers are kept here, by link, instead of sent.
    held: Option<Vec<(LinkTx, u64, u64)>>,
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
        state.links.last().is_some_and(|link| link.try_send(bytes).is_ok())
    }

    /// Sends a link frame (`ROUTES`, `LOAD`, …) on every open link; how many took it.
    pub fn send_link(&self, frame: &LinkFrame) -> usize {
        let bytes = frame.to_framed_bytes();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.links.retain(|l| !l.is_closed());
        state.links.iter().filter(|link| link.try_send(bytes.clone()).is_ok()).count()
    }

    /// Keeps the answers to data frames from now on, until [`AckWorker::release`].
    pub fn hold(&self) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).held.get_or_insert_with(Vec::new);
    }

    /// Sends the answers held since [`AckWorker::hold`], folded per link, and answers at once again. Returns the
    /// link frames sent.
    pub fn release(&self) -> Vec<LinkFrame> {
        let held =
            self.state.lock().unwrap_or_else(|e| e.into_inner()).held.take().unwrap_or_default();
        let mut sent = Vec::new();
        let mut by_link: Vec<(LinkTx, Vec<(u64, u64)>)> = Vec::new();
        for (link, session_id, seq) in held {
            match by_link.iter_mut().find(|(l, _)| l.same_channel(&link)) {
                Some((_, stored)) => stored.push((session_id, seq)),
                None => by_link.push((link, vec![(session_id, seq)])),
            }
        }
        for (link, mut stored) in by_link {
            for frame in link::fold_stored(&mut stored) {
                let _ = link.try_send(frame.to_framed_bytes());
                sent.push(frame);
            }
        }
        sent
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
    let (reader, writer) = stream.into_split();
    let (tx, rx) = mpsc::channel::<Bytes>(QUEUE);
    state.lock().unwrap_or_else(|e| e.into_inner()).links.push(tx.clone());
    let write = write_queue(writer, rx, Flush::now(256 * 1024));
    let read = async move {
        let mut frames =
            FramedRead::with_capacity(reader, LinkCodec::new(Limits::DEFAULT), 64 * 1024);
        let mut stored = Vec::new();
        // the answers to the frames of one read are folded: take what is decoded already, then answer
        while let Some(Ok(first)) = frames.next().await {
            let mut next = Some(first);
            while let Some(frame) = next.take() {
                match handle(frame, &id, &state, &events) {
                    Some(Answer::Stored { session_id, seq }) => stored.push((session_id, seq)),
                    Some(Answer::Frame(reply)) => {
                        let _ = tx.send(reply.to_framed_bytes()).await;
                    }
                    None => {}
                }
                // frames already read come with this one
                let mut codec = frames.decoder().clone();
                next = codec.decode(frames.read_buffer_mut()).ok().flatten();
            }
            if !stored.is_empty() {
                let held = {
                    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                    state.held.as_mut().map(|held| {
                        held.extend(stored.iter().map(|&(s, q)| (tx.clone(), s, q)));
                    })
                };
                if held.is_none() {
                    for frame in link::fold_stored(&mut stored) {
                        let _ = tx.send(frame.to_framed_bytes()).await;
                    }
                }
                stored.clear();
            }
        }
    };
    tokio::select! {
        _ = write => {}
        _ = read => {}
    }
}

/// Frames a link's writer queues at most; a reader finding it full waits, as a worker's does.
const QUEUE: usize = 65_536;

/// What the worker answers a link frame with.
enum Answer {
    Frame(LinkFrame),
    /// A data frame is stored: folded with the others of the same read.
    Stored {
        session_id: u64,
        seq: u64,
    },
}

fn handle(
    frame: LinkFrame,
    id: &ByteString,
    state: &Mutex<State>,
    events: &broadcast::Sender<WorkerEvent>,
) -> Option<Answer> {
    let frame = match frame {
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
            return seq.map(|seq| Answer::Stored { session_id, seq });
        }
        _ => None,
    };
    frame.map(Answer::Frame)
}
